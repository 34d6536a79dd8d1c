"""For notebooks: a progress bar per build, and which packages make an image big.

* :func:`progress_bar` is a :data:`~nixery_core.results.ProgressCallback`
  drawing one tqdm bar per image being built (Jupyter's widget through
  ``tqdm.auto``, text in a terminal): pass it as ``Builder(progress=...)``.
  It needs the ``notebook`` extra (``pip install nixery-core[notebook]``).
* :func:`closure_sizes` asks Nix for the image's store paths and sizes and
  tells, for each top-level package, its own size, its closure's size and
  the bytes only it brings; :class:`ClosureSizes` shows as a table in
  Jupyter and draws a bar chart with :meth:`ClosureSizes.plot` (matplotlib,
  in the same extra).
* :meth:`BuildResult.compare <nixery_core.results.BuildResult.compare>`
  (:mod:`nixery_core.comparison`) tells what changed between two builds.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from nixery_core.display import human_size
from nixery_core.errors import NixBuildFailed
from nixery_core.graph import StorePath, store_path_name
from nixery_core.nix import parse_path_info_output, path_info_argv
from nixery_core.protocols import Runner
from nixery_core.results import BuildResult, ProgressCallback, ProgressEvent
from nixery_core.runner import SubprocessRunner

__all__ = ["ClosureSizes", "PackageSize", "closure_sizes", "progress_bar"]


def _tqdm() -> Any:
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415 - the optional notebook extra
    except ImportError as exc:
        raise ImportError(
            "progress_bar needs tqdm: pip install 'nixery-core[notebook]'"
        ) from exc
    return tqdm


def progress_bar(*, leave: bool = True) -> ProgressCallback:
    """A progress callback drawing one bar per image: its layers, packed or reused.

    A bar starts at the image's ``resolve`` event, learns its length at the
    ``layers`` stage, advances once per layer (the postfix says how many
    were reused) and closes at ``done``; a cache hit is a bar that closes at
    once.  Safe for builds running in several threads.  ``leave=False``
    removes finished bars.  Raises ImportError without the ``notebook`` extra.
    """
    tqdm = _tqdm()
    bars: dict[object, Any] = {}
    reused: dict[object, int] = {}
    lock = threading.Lock()

    def on_event(event: ProgressEvent) -> None:
        key = event.image if event.image is not None else "build"
        name = event.image.reference if event.image is not None else "build"
        with lock:
            bar = bars.get(key)
            if event.stage == "resolve" and bar is None:
                bars[key] = tqdm(total=None, desc=name, unit="layer", leave=leave)
                reused[key] = 0
                return
            if bar is None:
                return
            if event.total is not None:
                bar.reset(total=event.total)
            if event.layer is not None:
                reused[key] += event.layer.reused
                bar.set_postfix(reused=reused[key], refresh=False)
                bar.update(1)
            if event.stage == "done":
                bar.set_description(f"{name} {event.message.split(':')[0]}", refresh=False)
                bar.close()
                del bars[key], reused[key]

    return on_event


@attrs.frozen
class PackageSize:
    """One top-level package of an image and what it weighs (NAR bytes).

    ``own`` is its store path alone, ``closure`` with everything it
    references, ``exclusive`` the bytes that leave the image with it (paths
    no other top-level package needs).
    """

    name: str
    path: str
    own: int
    closure: int
    exclusive: int


@attrs.frozen
class ClosureSizes:
    """Which packages make an image big: top-level packages, largest closure first."""

    packages: tuple[PackageSize, ...]
    total: int

    def table(self) -> str:
        """A fixed-width text table."""
        rows = [f"{'package':<32} {'own':>10} {'closure':>10} {'only this':>10}"]
        rows.extend(
            f"{p.name[:32]:<32} {human_size(p.own):>10} {human_size(p.closure):>10} "
            f"{human_size(p.exclusive):>10}"
            for p in self.packages
        )
        rows.append(f"{'image (all paths)':<32} {'':>10} {human_size(self.total):>10}")
        return "\n".join(rows)

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<tr><td>{html.escape(p.name)}</td><td>{html.escape(human_size(p.own))}</td>"
            f"<td>{html.escape(human_size(p.closure))}</td>"
            f"<td>{html.escape(human_size(p.exclusive))}</td></tr>"
            for p in self.packages
        )
        return (
            "<table><thead><tr><th>package</th><th>own</th><th>closure</th>"
            "<th>only this package</th></tr></thead><tbody>" + cells
            + f"<tr><td><b>image</b></td><td></td><td>{html.escape(human_size(self.total))}"
            "</td><td></td></tr></tbody></table>"
        )

    def plot(self, *, top: int = 15) -> Any:
        """A matplotlib ``Figure``: closure and exclusive sizes of the ``top`` largest packages.

        Drawn with the Agg backend (no display needed); Jupyter shows a
        returned figure.  Raises ImportError without matplotlib.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
        from matplotlib.figure import Figure  # noqa: PLC0415 - optional extra

        shown = list(self.packages[:top])
        figure = Figure(figsize=(7, 0.35 * len(shown) + 1.2))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        names = [p.name for p in shown]
        axes.barh(names, [p.closure / 2**20 for p in shown], color="tab:blue", label="closure")
        axes.barh(names, [p.exclusive / 2**20 for p in shown], color="tab:orange",
                  label="only this package")
        axes.invert_yaxis()
        axes.set_xlabel("NAR size (MiB)")
        axes.set_title(f"which packages make the image big ({human_size(self.total)} in all)")
        axes.legend(loc="lower right")
        figure.tight_layout()
        return figure


def closure_sizes(
    result: BuildResult,
    *,
    runner: Runner | None = None,
    nix_options: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> ClosureSizes:
    """The sizes of ``result``'s top-level packages, asked of Nix (``nix path-info``).

    The store paths must be in the local Nix store (they are after a build
    on this machine).  Top-level packages are the image's store paths no
    other path references.  Raises the :class:`~nixery_core.errors.NixError`
    types when Nix fails or answers nonsense.
    """
    runner = runner if runner is not None else SubprocessRunner()
    paths = sorted({path for layer in result.layers for path in layer.paths})
    if not paths:
        return ClosureSizes((), 0)
    argv = path_info_argv(paths, nix_options=nix_options)
    answer = runner.run(argv, timeout=timeout)
    if answer.returncode != 0:
        raise NixBuildFailed(argv, answer.returncode, answer.stderr.decode(errors="replace"))
    return _sizes(parse_path_info_output(argv, answer.stdout))


def _sizes(store_paths: Iterable[StorePath]) -> ClosureSizes:
    by_path = {sp.path: sp for sp in store_paths}
    referenced = {ref for sp in by_path.values() for ref in sp.references if ref != sp.path}
    roots = sorted(path for path in by_path if path not in referenced)

    def closure(root: str) -> set[str]:
        seen, stack = {root}, [root]
        while stack:
            for ref in by_path[stack.pop()].references:
                if ref in by_path and ref not in seen:
                    seen.add(ref)
                    stack.append(ref)
        return seen

    closures = {root: closure(root) for root in roots}
    needed_by: dict[str, int] = {}
    for members in closures.values():
        for path in members:
            needed_by[path] = needed_by.get(path, 0) + 1
    packages = [
        PackageSize(
            name=store_path_name(root),
            path=root,
            own=by_path[root].nar_size,
            closure=sum(by_path[p].nar_size for p in members),
            exclusive=sum(by_path[p].nar_size for p in members if needed_by[p] == 1),
        )
        for root, members in closures.items()
    ]
    packages.sort(key=lambda p: (-p.closure, p.name))
    return ClosureSizes(tuple(packages), sum(sp.nar_size for sp in by_path.values()))

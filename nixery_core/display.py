"""Human-readable views of a build: a text table for terminals, HTML for Jupyter."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Protocol

__all__ = [
    "LayerLike",
    "LayerView",
    "ResultView",
    "build_result_html",
    "build_result_table",
    "human_size",
]


class LayerLike(Protocol):
    """What a view or a comparison reads of a layer (a :class:`~nixery_core.results.BuiltLayer`).

    Its digest, compressed size and packages; :mod:`nixery_core.comparison`
    reads these and no more.
    """

    @property
    def digest(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def packages(self) -> tuple[str, ...]: ...


class LayerView(LayerLike, Protocol):
    """What the tables show of a layer: a :class:`LayerLike` that says whether it was reused."""

    @property
    def reused(self) -> bool: ...


class _ImageView(Protocol):
    @property
    def reference(self) -> str: ...


class ResultView(Protocol):
    """What the tables show of a build (a :class:`~nixery_core.results.BuildResult`).

    Structural, so this module depends on no build module (they import it).
    """

    @property
    def image(self) -> _ImageView: ...

    @property
    def layers(self) -> Sequence[LayerView]: ...

    @property
    def manifest_digest(self) -> str: ...

    @property
    def manifest_media_type(self) -> str: ...

    @property
    def from_cache(self) -> bool: ...

    @property
    def total_size(self) -> int: ...


def human_size(size: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover - the loop always returns


def _packages(names: tuple[str, ...], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" +{len(names) - limit}" if len(names) > limit else "") or "(customisation)"


def build_result_table(result: ResultView) -> str:
    """The layers as a fixed-width table: number, state, size, digest, packages."""
    rows = [f"{'#':>3}  {'state':<7} {'size':>10}  {'digest':<19}  packages"]
    for index, layer in enumerate(result.layers, 1):
        state = "reused" if layer.reused else "new"
        rows.append(
            f"{index:>3}  {state:<7} {human_size(layer.size):>10}  {layer.digest[:19]:<19}  "
            f"{_packages(layer.packages)}"
        )
    rows.append(
        f"manifest {result.manifest_digest} ({result.manifest_media_type}), "
        f"{len(result.layers)} layers, {human_size(result.total_size)}"
        + (" [from cache]" if result.from_cache else "")
    )
    return "\n".join(rows)


def build_result_html(result: ResultView) -> str:
    """The layers as an HTML table, for Jupyter's rich display."""
    cells = []
    for index, layer in enumerate(result.layers, 1):
        state = "reused" if layer.reused else "new"
        cells.append(
            "<tr>"
            f"<td>{index}</td><td>{state}</td><td>{html.escape(human_size(layer.size))}</td>"
            f"<td><code>{html.escape(layer.digest[:19])}</code></td>"
            f"<td>{html.escape(_packages(layer.packages, 8))}</td>"
            "</tr>"
        )
    return (
        f"<p><b>{html.escape(result.image.reference)}</b> "
        f"<code>{html.escape(result.manifest_digest)}</code>"
        f"{' (from cache)' if result.from_cache else ''}</p>"
        "<table><thead><tr><th>#</th><th>state</th><th>size</th><th>digest</th>"
        "<th>packages</th></tr></thead><tbody>" + "".join(cells) + "</tbody></table>"
    )

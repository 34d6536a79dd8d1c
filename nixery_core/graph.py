"""The runtime closure of an image: store paths, their sizes and references."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import attrs

from nixery_core.package_meta import PackageMeta

__all__ = ["RuntimeGraph", "StorePath", "store_path_name"]

STORE_DIR = "/nix/store"


def store_path_name(path: str) -> str:
    """``/nix/store/<hash>-bash-5.2`` -> ``bash-5.2`` (the name without the hash)."""
    base = path.rsplit("/", 1)[-1]
    return base.split("-", 1)[1] if "-" in base else base


@attrs.frozen
class StorePath:
    """One store path: its NAR size and the store paths it references (self excluded).

    ``nar_hash`` is the NAR's hash as Nix printed it (``sha256-<base64>`` or
    ``sha256:<base-32>``), when known; SBOMs report it.
    """

    path: str
    nar_size: int
    references: tuple[str, ...] = ()
    nar_hash: str | None = None

    @property
    def name(self) -> str:
        """The name part, without the hash (``bash-5.2``)."""
        return store_path_name(self.path)


@attrs.frozen
class RuntimeGraph:
    """A realised closure: every store path, keyed by path, and what was requested.

    ``requested`` maps each package name the image asked for to its output
    paths (the roots of the closure).  References are only ever to paths in
    ``paths``; self references are dropped on construction.  ``meta`` holds
    what the package set says of requested outputs (keyed by output path),
    for SBOMs; it never changes layering.
    """

    paths: Mapping[str, StorePath]
    requested: Mapping[str, tuple[str, ...]]
    meta: Mapping[str, PackageMeta] = attrs.field(factory=dict)

    @classmethod
    def build(
        cls,
        store_paths: Iterable[StorePath],
        requested: Mapping[str, Iterable[str]],
        meta: Mapping[str, PackageMeta] | None = None,
    ) -> RuntimeGraph:
        """Normalise: drop self references, sort references, check closure."""
        by_path: dict[str, StorePath] = {}
        for sp in store_paths:
            refs = tuple(sorted({r for r in sp.references if r != sp.path}))
            by_path[sp.path] = StorePath(sp.path, sp.nar_size, refs, sp.nar_hash)
        for sp in by_path.values():
            missing = [r for r in sp.references if r not in by_path]
            if missing:
                raise ValueError(f"{sp.path} references paths outside the graph: {missing}")
        req = {name: tuple(sorted(outs)) for name, outs in sorted(requested.items())}
        for name, outs in req.items():
            for out in outs:
                if out not in by_path:
                    raise ValueError(f"requested output {out} of {name} is not in the graph")
        known = {path: m for path, m in sorted((meta or {}).items()) if path in by_path}
        return cls(dict(sorted(by_path.items())), req, known)

    @property
    def roots(self) -> tuple[str, ...]:
        """The requested output paths, sorted and de-duplicated."""
        return tuple(sorted({p for outs in self.requested.values() for p in outs}))

    @property
    def total_size(self) -> int:
        return sum(sp.nar_size for sp in self.paths.values())

    def __iter__(self) -> Iterator[StorePath]:
        return iter(self.paths.values())

    def __len__(self) -> int:
        return len(self.paths)

    def closure_of(self, roots: Iterable[str]) -> frozenset[str]:
        """Every path reachable from ``roots`` (roots included)."""
        seen: set[str] = set()
        stack = list(roots)
        while stack:
            path = stack.pop()
            if path in seen:
                continue
            seen.add(path)
            stack.extend(self.paths[path].references)
        return frozenset(seen)

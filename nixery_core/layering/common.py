"""What every layering strategy shares: package names, the indexed graph, checks.

Strategies work on an :class:`IndexedGraph`: the closure's store paths sorted
by path and numbered, so that every later step iterates in an order fixed by
the paths themselves, never by the order of the input mapping or by hash
randomisation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import attrs

from nixery_core.errors import InvalidInput
from nixery_core.graph import RuntimeGraph, store_path_name
from nixery_core.protocols import LayerGroup

__all__ = [
    "DEFAULT_MAX_LAYERS",
    "IndexedGraph",
    "check_budget",
    "package_name",
    "validate_grouping",
]

#: Layers in an image, as Nixery: Docker allows about 125, the rest is room
#: for images built on top.  The builder adds one customisation layer, so it
#: asks a strategy for ``DEFAULT_MAX_LAYERS - 1`` store-path layers.
DEFAULT_MAX_LAYERS = 94

# A version starts at the first dash followed by a digit (Nix's parseDrvName).
_VERSION_START = re.compile(r"-(?=[0-9])")


def package_name(path: str) -> str:
    """The package name of a store path: no store directory, hash or version.

    ``/nix/store/<hash>-openssl-3.0.8-bin`` -> ``openssl``;
    ``python3.11-numpy-1.26.0`` -> ``python3.11-numpy``; a name without a
    version is returned whole.  The version starts at the first ``-`` that is
    followed by a digit, as in Nix's ``builtins.parseDrvName``, so every
    output of a package (``-bin``, ``-lib``, ``-man``) shares its name, and a
    version bump does not change it.  Popularity tables are keyed by this.
    """
    name = store_path_name(path) if "/" in path else path
    match = _VERSION_START.search(name)
    return name[: match.start()] if match else name


def check_budget(budget: int) -> None:
    """Refuse a layer budget below one with :class:`~nixery_core.errors.InvalidInput`."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise InvalidInput(f"layer budget must be an integer of at least 1, got {budget!r}")


def validate_grouping(graph: RuntimeGraph, groups: Sequence[LayerGroup], budget: int) -> None:
    """Check a strategy kept its promise; raise :class:`~nixery_core.errors.InvalidInput` if not.

    Every store path of ``graph`` in exactly one group, no unknown or empty
    group, paths sorted inside each group, at most ``budget`` groups.  A
    builder can run this on the answer of a strategy it did not write.
    """
    if len(groups) > budget:
        raise InvalidInput(f"{len(groups)} layers exceed the budget of {budget}")
    seen: set[str] = set()
    for group in groups:
        if not group.paths:
            raise InvalidInput("a layer group is empty")
        if list(group.paths) != sorted(group.paths):
            raise InvalidInput(f"layer group starting {group.paths[0]} is not sorted")
        for path in group.paths:
            if path not in graph.paths:
                raise InvalidInput(f"layer group names {path}, which is not in the closure")
            if path in seen:
                raise InvalidInput(f"{path} is in more than one layer group")
            seen.add(path)
    missing = sorted(set(graph.paths) - seen)
    if missing:
        raise InvalidInput(f"{len(missing)} store paths are in no layer group, e.g. {missing[0]}")


@attrs.frozen
class IndexedGraph:
    """A closure numbered by sorted store path, with both edge directions.

    ``roots`` are the requested outputs plus every path nothing references
    (so that every path is reachable from a synthetic root even if the graph
    carries paths outside the requested closure).  ``topo`` lists every
    index with each path's references before the path itself.
    """

    paths: tuple[str, ...]
    sizes: tuple[int, ...]
    refs: tuple[tuple[int, ...], ...]
    users: tuple[tuple[int, ...], ...]
    roots: tuple[int, ...]
    topo: tuple[int, ...]

    @classmethod
    def of(cls, graph: RuntimeGraph) -> IndexedGraph:
        """Index ``graph``; a reference cycle raises :class:`~nixery_core.errors.InvalidInput`."""
        paths = tuple(sorted(graph.paths))
        index = {path: i for i, path in enumerate(paths)}
        sizes = tuple(graph.paths[path].nar_size for path in paths)
        refs: list[tuple[int, ...]] = []
        users: list[list[int]] = [[] for _ in paths]
        for i, path in enumerate(paths):
            own = tuple(sorted({index[r] for r in graph.paths[path].references if r != path}))
            refs.append(own)
            for r in own:
                users[r].append(i)
        requested = {index[p] for p in graph.roots if p in index}
        roots = tuple(sorted(requested | {i for i, u in enumerate(users) if not u}))
        topo = _topological(refs)
        return cls(paths, sizes, tuple(refs), tuple(tuple(u) for u in users), roots, topo)

    def __len__(self) -> int:
        return len(self.paths)

    def closure(self, *starts: int) -> set[int]:
        """Indices reachable from ``starts`` through references, ``starts`` included."""
        return _walk(starts, self.refs)

    def dependents(self, *starts: int) -> set[int]:
        """Indices that reach ``starts`` through references, ``starts`` included."""
        return _walk(starts, self.users)

    def closure_bits(self) -> list[int]:
        """For each index, its closure as a bitset (bit ``i`` set for index ``i``)."""
        bits = [0] * len(self.paths)
        for v in self.topo:
            acc = 1 << v
            for r in self.refs[v]:
                acc |= bits[r]
            bits[v] = acc
        return bits

    def group(self, members: Sequence[int], rating: float) -> LayerGroup:
        """A :class:`LayerGroup` of these indices (sorted indices are sorted paths)."""
        return LayerGroup(tuple(self.paths[i] for i in sorted(members)), rating)


def _walk(starts: Sequence[int], edges: Sequence[Sequence[int]]) -> set[int]:
    seen = set(starts)
    stack = list(starts)
    while stack:
        v = stack.pop()
        for w in edges[v]:
            if w not in seen:
                seen.add(w)
                stack.append(w)
    return seen


def _topological(refs: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Kahn's algorithm over references: dependencies first, ties by index."""
    pending = [len(r) for r in refs]
    users: list[list[int]] = [[] for _ in refs]
    for v, own in enumerate(refs):
        for r in own:
            users[r].append(v)
    ready = [v for v, n in enumerate(pending) if n == 0]
    order: list[int] = []
    while ready:
        v = ready.pop()
        order.append(v)
        for u in users[v]:
            pending[u] -= 1
            if pending[u] == 0:
                ready.append(u)
    if len(order) != len(refs):
        raise InvalidInput("the store paths' references form a cycle; a closure must be acyclic")
    return tuple(order)

"""Nixery's grouping: popularity plus the dominator tree of the closure.

A synthetic root points at every root of the closure (the requested outputs,
and any path nothing references).  A path whose closure exceeds
``big_closure_bytes`` or whose popularity reaches ``popular_threshold`` gets
an extra edge from the root, so it cannot hide inside another package's
layer.  In the dominator tree from the root (networkx'
``immediate_dominators``), each child of the root together with everything
it dominates is one candidate layer, rated ``popularity x layer size`` with
the popularity of that child.  As Nixery does (``layers.go``: the layers are
sorted by rating once, then the first is folded into the second until the
budget holds, without sorting again), the ``candidates - budget + 1``
lowest-rated layers become one layer rated the sum of theirs (ties broken by
the smallest path in the layer).  Layers come out highest rating first, so
widely shared layers sit at the bottom.

Popularity is keyed by :func:`~nixery_core.layering.common.package_name`
(no hash, no version: ``openssl`` for ``...-openssl-3.0.8-bin``), so one
table serves every output and every version of a package.  Without a table
a path's popularity is the number of paths in this closure that reference
it; with a table, a package the table does not list counts 1, as in Nixery.
``cacert`` (``nss-cacert``) and ``iana-etc`` count as more popular than
anything else, as in Nixery, since every image carries them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence

import attrs
import networkx as nx

from nixery_core.errors import InvalidInput
from nixery_core.graph import RuntimeGraph
from nixery_core.layering.common import IndexedGraph, check_budget, package_name
from nixery_core.protocols import JSONValue, LayerGroup

__all__ = ["ALWAYS_POPULAR", "NixeryPopularity", "PopularityTable"]

#: Package names treated as more popular than anything in the table.
ALWAYS_POPULAR = frozenset({"cacert", "iana-etc", "nss-cacert"})


class PopularityTable(Mapping[str, int]):
    """An immutable, hashable ``package name -> popularity`` mapping.

    Values must be non-negative integers (reference counts or percentiles);
    anything else raises :class:`~nixery_core.errors.InvalidInput`.
    """

    __slots__ = ("_data", "_digest")

    def __init__(self, data: Mapping[str, int]) -> None:
        for key, value in data.items():
            if not isinstance(key, str):
                raise InvalidInput(f"popularity keys must be package names, got {key!r}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInput(
                    f"popularity of {key!r} must be a non-negative integer, got {value!r}"
                )
        self._data = dict(sorted(data.items()))
        canonical = json.dumps(self._data, separators=(",", ":")).encode()
        self._digest = hashlib.sha256(canonical).hexdigest()

    @property
    def digest(self) -> str:
        """sha256 of the table as canonical JSON (sorted keys), for cache keys."""
        return self._digest

    def __getitem__(self, key: str) -> int:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(self._digest)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PopularityTable):
            return self._digest == other._digest
        return isinstance(other, Mapping) and dict(other.items()) == self._data

    def __repr__(self) -> str:
        return f"PopularityTable({len(self._data)} packages, sha256={self._digest[:12]})"


def _to_table(value: Mapping[str, int] | None) -> PopularityTable | None:
    if value is None or isinstance(value, PopularityTable):
        return value
    return PopularityTable(value)


def _positive(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{attribute.name} must be a non-negative integer, got {value!r}")


_ROOT = -1


@attrs.frozen
class NixeryPopularity:
    """Candidate layers from the dominator tree; the lowest ``popularity x size`` become one."""

    popularity: PopularityTable | None = attrs.field(default=None, converter=_to_table)
    big_closure_bytes: int = attrs.field(default=100_000_000, validator=_positive)
    popular_threshold: int = attrs.field(default=100, validator=_positive)

    @property
    def name(self) -> str:
        return "nixery-popularity"

    def parameters(self) -> Mapping[str, JSONValue]:
        return {
            "popularity_sha256": None if self.popularity is None else self.popularity.digest,
            "big_closure_bytes": self.big_closure_bytes,
            "popular_threshold": self.popular_threshold,
        }

    def group(self, graph: RuntimeGraph, budget: int) -> Sequence[LayerGroup]:
        check_budget(budget)
        ig = IndexedGraph.of(graph)
        if not len(ig):
            return []
        popularity = self._popularity(ig)
        big = self._big(ig)
        dg: nx.DiGraph[int] = nx.DiGraph()
        dg.add_node(_ROOT)
        dg.add_nodes_from(range(len(ig)))
        forced = {i for i in range(len(ig)) if big[i] or popularity[i] >= self.popular_threshold}
        dg.add_edges_from((_ROOT, i) for i in sorted(set(ig.roots) | forced))
        dg.add_edges_from((v, r) for v in range(len(ig)) for r in ig.refs[v])
        idom = nx.immediate_dominators(dg, _ROOT)
        top: dict[int, int] = {}
        for v in reversed(ig.topo):  # a dominator comes before what it dominates
            parent = idom[v]
            top[v] = v if parent == _ROOT else top[parent]
        members: dict[int, list[int]] = {}
        for v in range(len(ig)):
            members.setdefault(top[v], []).append(v)
        layers = sorted(
            (popularity[head] * sum(ig.sizes[i] for i in paths), min(paths), paths)
            for head, paths in members.items()
        )
        if len(layers) > budget:
            # Nixery sorts once and folds the lowest-rated layer into the next
            # one until the budget holds, without sorting again: the lowest
            # ``len - budget + 1`` layers become one.
            cut = len(layers) - budget + 1
            low = layers[:cut]
            merged = (sum(r for r, _, _ in low), min(f for _, f, _ in low),
                      [i for _, _, paths in low for i in paths])
            layers = [merged, *layers[cut:]]
        layers.sort(key=lambda layer: (-layer[0], layer[1]))
        return [ig.group(paths, float(rating)) for rating, _, paths in layers]

    def _popularity(self, ig: IndexedGraph) -> list[int]:
        names = [package_name(p) for p in ig.paths]
        if self.popularity is None:
            counts = [len(users) for users in ig.users]
        else:
            counts = [self.popularity.get(name, 1) for name in names]
        most = max([*counts, self.popular_threshold]) + 1
        return [
            most if name in ALWAYS_POPULAR else c for name, c in zip(names, counts, strict=True)
        ]

    def _big(self, ig: IndexedGraph) -> list[bool]:
        """Whether each path's closure exceeds ``big_closure_bytes``.

        A path above a big path is big; otherwise its closure is walked and
        the walk stops as soon as the limit is passed.
        """
        limit = self.big_closure_bytes
        big = [False] * len(ig)
        for v in ig.topo:
            if any(big[r] for r in ig.refs[v]):
                big[v] = True
                continue
            total = 0
            seen = {v}
            stack = [v]
            while stack and total <= limit:
                w = stack.pop()
                total += ig.sizes[w]
                for r in ig.refs[w]:
                    if r not in seen:
                        seen.add(r)
                        stack.append(r)
            big[v] = total > limit
        return big

"""Ours: merge paths along the dominator tree where the fewest unchanged bytes get re-pulled.

What makes a client pull again: a layer is a new blob as soon as any of its
store paths changes, and a store path changes whenever anything in its
closure changes (input addressing).  So a layer made of a path ``h`` and
paths in ``h``'s closure changes exactly when ``h`` changes, and the bytes
pulled in vain are those of its members that did not change.

The strategy therefore works on the dominator tree of the closure: a path's
immediate dominator is the nearest path every route to it passes through,
so a subtree is one package with the dependencies only it uses.  It starts
with one layer per store path and, while there are more layers than the
budget, makes the cheapest merge, where the cost of merging group ``g``
into the group holding its dominator ``h`` is its size times how much more
often ``h`` changes than ``g``::

    cost = bytes(g) * (exposure(h) - exposure(g))
    exposure(p) = 1 - exp(-change_rate * |closure(p)|)

``exposure`` estimates how likely a path is to have changed after an update
of the package set: the more store paths under it, the more likely.  Paths
dominated by nothing but the synthetic root (top-level packages, and
libraries used by several of them) can only move into one catch-all layer
whose exposure is 1 (it is assumed to change every time), so the cheapest
of them, small ones, go there.  Ties are broken by store path, so the
result depends on the graph alone.

Why each part:

- dominator subtrees keep a package with what only it uses, so a changed
  dependency never drags in an unrelated package;
- merging by cost keeps big paths that change rarely (``glibc``, ``icu``,
  ``llvm``) in layers of their own, where other images share them, and lets
  small or equally volatile paths ride along with their dependents;
- tiny groups (under ``min_layer_bytes``) are merged into their dominator's
  group first when that group is itself small (under 16 x
  ``min_layer_bytes``): a layer of a few kilobytes is not worth a pull
  round-trip, and a big path keeps the layer other images share.

Stability: the requested outputs (the roots) get a layer each, and the rest
of the closure is grouped as if they were absent, so adding one more
package to an image moves no existing layer (see :meth:`leaf_stable` for
the exact condition).  Up to ``root_slots`` roots are kept apart like this;
the rest of the budget is for the remaining paths.  An image that fits in
the budget gets one layer per path (less the tiny merges).

The strategy takes no popularity table: in the simulator
(``benchmarks/layering_sim.py``) weighting by Nixery-style popularity made
no difference, and a grouping that depends only on the closure is one fewer
input to keep in sync.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence

import attrs
import networkx as nx

from nixery_core.errors import InvalidInput
from nixery_core.graph import RuntimeGraph
from nixery_core.layering.common import IndexedGraph, check_budget
from nixery_core.protocols import JSONValue, LayerGroup

__all__ = ["ChurnAwareDominators"]

_ROOT = -1  # the synthetic root of the dominator tree
_CATCH_ALL = -2  # the group of paths with no dominator that had to be merged


def _non_negative_int(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{attribute.name} must be a non-negative integer, got {value!r}")


def _rate(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise InvalidInput(f"{attribute.name} must be a number in (0, 1), got {value!r}")


@attrs.frozen
class ChurnAwareDominators:
    """Dominator subtrees merged where the expected re-pulled bytes are smallest.

    ``change_rate`` is the chance, per store path in a path's closure, that
    an update of the package set replaces it; only its order of magnitude
    matters.  ``root_slots`` is how many roots get a layer of their own
    while the rest of the closure is grouped without them.
    ``min_layer_bytes``: smaller groups are merged into their dominator's
    when that one is small too.
    """

    change_rate: float = attrs.field(default=0.01, validator=_rate)
    root_slots: int = attrs.field(default=12, validator=_non_negative_int)
    min_layer_bytes: int = attrs.field(default=64 * 1024, validator=_non_negative_int)

    @property
    def name(self) -> str:
        return "churn-aware-dominators"

    def parameters(self) -> Mapping[str, JSONValue]:
        return {
            "change_rate": self.change_rate,
            "root_slots": self.root_slots,
            "min_layer_bytes": self.min_layer_bytes,
        }

    def leaf_stable(self, graph: RuntimeGraph, budget: int) -> bool:
        """Whether adding one new root package to ``graph`` leaves every layer as it is.

        True when the closure plus one path still fits the budget with a
        layer per path, or when the roots are set apart (at most
        ``root_slots - 1`` of them, so one more still fits) and the rest
        already needed grouping.  The new package must bring one store
        path of its own; its references may be any paths of the closure.
        """
        check_budget(budget)
        if len(graph) + 1 <= budget:
            return True
        roots = len(IndexedGraph.of(graph).roots)
        return len(graph) > budget and roots + 1 <= self.root_slots < budget

    def group(self, graph: RuntimeGraph, budget: int) -> Sequence[LayerGroup]:
        check_budget(budget)
        ig = IndexedGraph.of(graph)
        n = len(ig)
        if not n:
            return []
        roots = ig.roots
        if n <= budget:
            pinned, cap = roots, n
        elif len(roots) <= self.root_slots < budget:
            pinned, cap = roots, budget - self.root_slots
        else:
            pinned, cap = (), budget
        bits = ig.closure_bits()
        exposure = [1.0 - math.exp(-self.change_rate * b.bit_count()) for b in bits]
        del bits
        merger = _Merger(ig, frozenset(pinned), exposure)
        merger.merge_tiny(self.min_layer_bytes)
        layers = [[v] for v in pinned] + merger.merge_down_to(cap)
        layers.sort(key=lambda m: (max(exposure[v] for v in m), m[0]))
        return [ig.group(m, 1.0 - max(exposure[v] for v in m)) for m in layers]


class _Merger:
    """Groups of the closure minus the pinned roots, merged cheapest first.

    A group is named by its head, the member every other member is
    dominated by; its exposure is the head's.  Costs only grow as groups
    merge (a group's size grows; the group holding its dominator can only be
    replaced by one further up, with higher exposure), so the heap is kept
    lazily: a popped entry is re-costed and pushed back if it went up.
    """

    def __init__(self, ig: IndexedGraph, pinned: frozenset[int], exposure: list[float]) -> None:
        self.ig = ig
        self.rest = [v for v in range(len(ig)) if v not in pinned]
        edges = [(_ROOT, v) for v in self.rest if all(u in pinned for u in ig.users[v])]
        edges.extend((v, r) for v in self.rest for r in ig.refs[v] if r not in pinned)
        dg: nx.DiGraph[int] = nx.DiGraph(edges)
        dg.add_node(_ROOT)
        self.idom: dict[int, int] = dict(nx.immediate_dominators(dg, _ROOT))
        self.idom[_ROOT] = _ROOT
        self.up = {v: v for v in self.rest}
        self.up[_CATCH_ALL] = _CATCH_ALL
        self.size = {v: ig.sizes[v] for v in self.rest}
        self.size[_CATCH_ALL] = 0
        self.members: dict[int, list[int]] = {v: [v] for v in self.rest}
        self.members[_CATCH_ALL] = []
        self.exposure = {v: exposure[v] for v in self.rest}
        self.exposure[_CATCH_ALL] = 1.0
        self.count = len(self.rest)

    def find(self, v: int) -> int:
        up = self.up
        while up[v] != v:
            up[v] = up[up[v]]
            v = up[v]
        return v

    def target(self, g: int) -> int:
        """The group holding ``g``'s dominator, or the catch-all for a top-level group."""
        head = self.idom[g]
        return _CATCH_ALL if head == _ROOT else self.find(head)

    def cost(self, g: int, target: int) -> float:
        return self.size[g] * (self.exposure[target] - self.exposure[g])

    def merge(self, g: int, target: int) -> None:
        if target == _CATCH_ALL and not self.members[_CATCH_ALL]:
            self.count += 1
        self.up[g] = target
        self.size[target] += self.size.pop(g)
        self.members[target].extend(self.members.pop(g))
        self.count -= 1

    def merge_tiny(self, min_bytes: int) -> None:
        """Merge groups under ``min_bytes`` into a small dominator's group, dependencies first."""
        if not min_bytes:
            return
        for v in self.ig.topo:
            if v in self.members and self.size[v] < min_bytes and self.idom[v] != _ROOT:
                target = self.target(v)
                if self.size[target] < 16 * min_bytes:
                    self.merge(v, target)

    def merge_down_to(self, cap: int) -> list[list[int]]:
        """Merge cheapest first until at most ``cap`` groups remain; return them."""
        heap = []
        for g in self.members:
            if g != _CATCH_ALL:
                target = self.target(g)
                heap.append((self.cost(g, target), g, target))
        heapq.heapify(heap)
        while self.count > cap and heap:
            cost, g, target = heapq.heappop(heap)
            if g not in self.members:
                continue
            now = self.target(g)
            fresh = self.cost(g, now)
            if now != target or fresh > cost:
                heapq.heappush(heap, (fresh, g, now))
                continue
            self.merge(g, target)
        return [sorted(m) for m in self.members.values() if m]

"""nixpkgs' ``referencesByPopularity``: the most referenced paths get their own layers.

The strategy behind ``dockerTools.buildLayeredImage`` and nix2container's
``maxLayers``: count, for each store path, how many routes lead to it from
the roots of the closure; order paths by that count (most first, ties by
the name without the hash, then by the hash); give each of the first
``budget - 1`` paths its own layer and put every other path into one
catch-all layer on top.

nixpkgs' counter adds one per level of an unfolded tree rather than one per
route; both rank paths that everything depends on first and the closure's
own roots last, which is what decides the layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs

from nixery_core.graph import RuntimeGraph, store_path_name
from nixery_core.layering.common import IndexedGraph, check_budget
from nixery_core.protocols import JSONValue, LayerGroup

__all__ = ["ReferencesByPopularity", "route_counts"]


def route_counts(graph: IndexedGraph) -> list[int]:
    """For each index, the number of routes from any root to it (a root counts one)."""
    counts = [0] * len(graph)
    for root in graph.roots:
        counts[root] += 1
    for v in reversed(graph.topo):  # dependents before their references
        for r in graph.refs[v]:
            counts[r] += counts[v]
    return counts


@attrs.frozen
class ReferencesByPopularity:
    """Own layers for the ``budget - 1`` paths reached by most routes; the rest share one."""

    @property
    def name(self) -> str:
        return "references-by-popularity"

    def parameters(self) -> Mapping[str, JSONValue]:
        return {}

    def group(self, graph: RuntimeGraph, budget: int) -> Sequence[LayerGroup]:
        check_budget(budget)
        ig = IndexedGraph.of(graph)
        counts = route_counts(ig)
        order = sorted(
            range(len(ig)),
            key=lambda i: (-counts[i], store_path_name(ig.paths[i]), ig.paths[i]),
        )
        if len(order) <= budget:
            own, rest = order, []
        else:
            own, rest = order[: budget - 1], order[budget - 1 :]
        groups = [ig.group([i], float(len(order) - rank)) for rank, i in enumerate(own)]
        if rest:
            groups.append(ig.group(rest, 0.0))
        return groups

"""nixpkgs' ``auto-layer``: the largest paths become "primaries" that name the layers.

Primaries are taken one at a time, largest NAR size first (ties by the name
without the hash, then by path).  Every path carries a label: the set of
primaries it belongs to.  When primary ``P`` is added, each dependency ``D``
of ``P`` drops the primaries that depend on ``P`` (``P`` now stands between
them and ``D``) and gains ``P`` unless it already carries a primary that is
itself a dependency of ``P``.  So ``D`` lands in ``P``'s layer exactly when
no other primary's path to ``D`` avoids ``P``; a dependency reached through
several primaries lands in a layer of its own, one per set of primaries.
Paths with the same label form one layer; paths under no primary (the
closure's small roots) share the layer with the empty label.  Primaries are
added while the number of distinct labels stays within the budget.

Layers are ordered by the total size of their closure, smallest first, so
every layer comes after the layers it depends on.  Adding a small leaf path
(a root below every primary's size) moves no primary's layer; it joins the
layer of paths under no primary.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import attrs

from nixery_core.graph import RuntimeGraph, store_path_name
from nixery_core.layering.common import IndexedGraph, check_budget
from nixery_core.protocols import JSONValue, LayerGroup

__all__ = ["SizeFirst"]

_Label = frozenset[int]


@attrs.frozen
class SizeFirst:
    """Largest paths first as primaries; paths grouped by the set of primaries they serve."""

    @property
    def name(self) -> str:
        return "size-first"

    def parameters(self) -> Mapping[str, JSONValue]:
        return {}

    def group(self, graph: RuntimeGraph, budget: int) -> Sequence[LayerGroup]:
        check_budget(budget)
        ig = IndexedGraph.of(graph)
        if not len(ig):
            return []
        labels = _label(ig, budget)
        members: dict[_Label, list[int]] = {}
        for i, label in enumerate(labels):
            members.setdefault(label, []).append(i)
        keyed = []
        for paths in members.values():
            closure_size = sum(ig.sizes[j] for j in ig.closure(*paths))
            keyed.append((closure_size, ig.paths[paths[0]], paths))
        keyed.sort()
        return [ig.group(paths, float(-closure)) for closure, _, paths in keyed]


def _label(ig: IndexedGraph, budget: int) -> list[_Label]:
    """Add primaries largest first until one more would exceed ``budget`` labels."""
    empty: _Label = frozenset()
    labels: list[_Label] = [empty] * len(ig)
    counts: Counter[_Label] = Counter({empty: len(ig)})
    by_size = sorted(
        range(len(ig)), key=lambda i: (-ig.sizes[i], store_path_name(ig.paths[i]), ig.paths[i])
    )
    for primary in by_size:
        deps = ig.closure(primary)
        deps.discard(primary)
        users = ig.dependents(primary)
        users.discard(primary)
        changes = {primary: frozenset({primary})}
        for dep in deps:
            label = labels[dep] - users
            if not any(p in deps for p in label):
                label |= {primary}
            if label != labels[dep]:
                changes[dep] = label
        for i, label in changes.items():
            _move(counts, labels[i], label)
        if len(counts) > budget:
            for i, label in changes.items():
                _move(counts, label, labels[i])
            break
        for i, label in changes.items():
            labels[i] = label
    return labels


def _move(counts: Counter[_Label], old: _Label, new: _Label) -> None:
    counts[old] -= 1
    if not counts[old]:
        del counts[old]
    counts[new] += 1

"""How to judge a grouping: bytes a caching client pulls, bytes a registry stores.

Store paths are input-addressed, so a layer's contents are fixed by its set
of store paths: two layers with the same path set are the same blob, and a
layer with any other path set is a new blob.  These measures therefore need
no tarballs, only path sets and NAR sizes; they are what
``benchmarks/layering_sim.py`` reports, and they let an embedder compare a
strategy of their own on their own closures.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from nixery_core.graph import RuntimeGraph
from nixery_core.protocols import LayerGroup

__all__ = ["PullingClient", "layer_bytes", "unique_layer_bytes"]


def layer_bytes(graph: RuntimeGraph, group: LayerGroup) -> int:
    """The NAR bytes of one layer's store paths."""
    return sum(graph.paths[p].nar_size for p in group.paths)


@attrs.define
class PullingClient:
    """A registry client that keeps every blob it ever pulled.

    :meth:`pull` returns the bytes of the layers it does not hold yet and
    keeps them; ``pulled`` is the running total.
    """

    _held: set[tuple[str, ...]] = attrs.Factory(set)
    pulled: int = 0

    def pull(self, graph: RuntimeGraph, groups: Sequence[LayerGroup]) -> int:
        """Pull one image; return the bytes fetched for it."""
        fetched = 0
        for group in groups:
            if group.paths not in self._held:
                self._held.add(group.paths)
                fetched += layer_bytes(graph, group)
        self.pulled += fetched
        return fetched


def unique_layer_bytes(images: Iterable[tuple[RuntimeGraph, Sequence[LayerGroup]]]) -> int:
    """Bytes a registry stores for these images: each distinct layer counted once."""
    stored: dict[tuple[str, ...], int] = {}
    for graph, groups in images:
        for group in groups:
            if group.paths not in stored:
                stored[group.paths] = layer_bytes(graph, group)
    return sum(stored.values())

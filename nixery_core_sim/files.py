"""Files inside store paths, for measuring clients that pull files instead of layers.

A whole-layer client (Docker, containerd without a stargz snapshotter, any
client of a gzip layer) fetches every layer blob it does not hold, so a
store path that merely got a new hash costs its whole size again.  A
partial-pull client (podman with ``enable_partial_images`` and an eStargz or
zstd:chunked layer, see :mod:`nixery_core.chunked`) fetches a new layer's
table of contents, then only the files (or chunks of files) whose content
it holds nowhere.  In Nix the two differ most in exactly the common case: a
rebuilt low-level package gives every store path above it a new hash, but a
file's bytes change only where it embeds a store path (a RUNPATH, an ELF
interpreter, a shebang), and nixery-core's chunked layers put each cluster
of such references in a chunk of its own.

The model (:class:`FileModel`) needs no file lists: a store path of ``n``
bytes holds ``ceil(n / mean_file_bytes)`` files, ``embedding_share`` of
which embed references to other store paths.  A store path's *content*
is named by its package, output and version (:func:`content_keys`): a new
version is new content, a new hash with the same version (a dependency was
rebuilt) is the same content with renamed references.  What a
partial-pull client then fetches for a path it does not hold
(:class:`PartialPullingClient`):

* content it has never seen: the whole path (its NAR bytes, as the
  whole-layer measures count them);
* content it holds under another store path: ``reference_chunk_bytes`` per
  embedding file, the chunks that hold the renamed references;
* a store path it holds: nothing (the files are on disk already);

plus ``toc_entry_bytes`` per file for the table of contents of every layer
blob it had not seen.  The defaults are measured on real layers
(``benchmarks/bench_partial.py`` and ``docs/performance.md``): a TOC entry
costs about 40 compressed bytes (zstd:chunked, 5,354 entries in 213 KB); a
cluster of references costs its chunk, about 100-300 bytes with its TOC
entries.  All byte counts are NAR (uncompressed) bytes, as elsewhere in the
simulator; the overheads are stated at the same scale (compressed sizes
times about 2.5, the closures' compression ratio).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import attrs

from nixery_core.graph import RuntimeGraph
from nixery_core.protocols import LayerGroup

__all__ = ["FileModel", "PartialPullingClient"]


@attrs.frozen
class FileModel:
    """How a store path's bytes split into files, and what each kind of change costs."""

    mean_file_bytes: int = 40_000
    embedding_share: float = 0.5
    reference_chunk_bytes: int = 500
    toc_entry_bytes: int = 100

    def files(self, nar_size: int) -> int:
        """Files in a store path of ``nar_size`` bytes (at least one)."""
        return max(1, math.ceil(nar_size / self.mean_file_bytes))

    def rename_cost(self, nar_size: int) -> int:
        """Bytes refetched for a path whose content is held under another store path."""
        embedding = math.ceil(self.files(nar_size) * self.embedding_share)
        return min(nar_size, embedding * self.reference_chunk_bytes)

    def toc_bytes(self, nar_size: int) -> int:
        """Table-of-contents bytes for a layer holding ``nar_size`` bytes of one path."""
        return self.files(nar_size) * self.toc_entry_bytes


@attrs.define
class PartialPullingClient:
    """A client that keeps what it pulled and fetches only files and chunks it lacks.

    :meth:`pull` takes the image's grouping and, for every store path, its
    content key (package, output, version); it returns the bytes fetched
    (module docstring) and keeps everything.
    """

    model: FileModel = attrs.Factory(FileModel)
    _layers: set[tuple[str, ...]] = attrs.Factory(set)
    _paths: set[str] = attrs.Factory(set)
    _contents: set[Hashable] = attrs.Factory(set)
    pulled: int = 0

    def pull(
        self,
        graph: RuntimeGraph,
        groups: Sequence[LayerGroup],
        contents: Mapping[str, Hashable],
    ) -> int:
        """Pull one image; return the bytes fetched for it."""
        fetched = 0
        for group in groups:
            if group.paths in self._layers:
                continue
            self._layers.add(group.paths)
            for path in group.paths:
                size = graph.paths[path].nar_size
                fetched += self.model.toc_bytes(size)
                if path in self._paths:
                    continue
                self._paths.add(path)
                key = contents[path]
                if key in self._contents:
                    fetched += self.model.rename_cost(size)
                else:
                    self._contents.add(key)
                    fetched += size
        self.pulled += fetched
        return fetched

"""A chunked layer's table of contents, spooled as the JSON bytes it will hold.

One job: keep the TOC of an eStargz or zstd:chunked layer out of the
Python heap while the layer is packed.  Each entry, once final (its offsets
and digests known, in TOC order), is serialized at once to exactly the
bytes it takes in the TOC (:func:`~nixery_core.chunked.compact_json` of the
entry with its keys in the format's order) and appended to a buffer of at
most :data:`SPOOL_MEMORY` bytes, which spills to an unnamed temporary file
(:func:`tempfile.TemporaryFile`: it has no name, so nothing is left behind
whatever happens; :meth:`TocSpool.close` frees it at once).  A Python dict
per tar member and chunk (about 3 KB each) becomes about 300 bytes of JSON
on disk.

The document ``{"version":1,"entries":[e1,e2,...]}`` is the same bytes as
``compact_json`` of the whole document: compact separators, and each entry
encoded as :func:`~nixery_core.chunked.compact_json` would encode it within
the whole (the orjson and :mod:`json` encodings agree wherever orjson is
used, see there).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import IO

__all__ = ["SPOOL_MEMORY", "SPOOL_READ", "TOC_PREFIX", "TOC_SUFFIX", "TocSpool"]

#: Bytes of TOC JSON held in memory before the spool moves to a temporary file.
SPOOL_MEMORY = 1 << 20
#: What the TOC JSON starts with, before its first entry.
TOC_PREFIX = b'{"version":1,"entries":['
#: What it ends with, after its last entry.
TOC_SUFFIX = b"]}"
#: Bytes read back from a spool's temporary file at a time (this one's, and zstd:chunked's
#: compressed TOC's).
SPOOL_READ = 1 << 20


class TocSpool:
    """Serialized TOC entries, in memory up to ``limit`` bytes, then in an unnamed file.

    The document is :data:`TOC_PREFIX`, the entries joined by commas,
    :data:`TOC_SUFFIX`.  :meth:`add` takes one entry's JSON bytes;
    :meth:`pieces` gives the whole TOC JSON a piece at a time (compressed
    as it streams); :meth:`mark` and :meth:`rewind` take back entries added
    since a point; :meth:`close` (idempotent) frees the file.
    """

    def __init__(self, limit: int = SPOOL_MEMORY) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._file: IO[bytes] | None = None
        self._entries = 0
        self._size = 0

    @property
    def entries(self) -> int:
        """How many entries were added."""
        return self._entries

    @property
    def size(self) -> int:
        """Bytes of the whole TOC JSON (prefix, entries, commas and suffix)."""
        return len(TOC_PREFIX) + self._size + len(TOC_SUFFIX)

    def add(self, entry_json: bytes) -> None:
        """Append one entry's JSON (a comma goes before every entry but the first)."""
        if self._entries:
            self._buffer += b","
            self._size += 1
        self._buffer += entry_json
        self._size += len(entry_json)
        self._entries += 1
        if len(self._buffer) >= self._limit:
            self._spill()

    def add_many(self, entries_json: bytes, count: int) -> None:
        """Append ``count`` entries' JSON, already joined by commas (as a JSON list holds them).

        The same document as :meth:`add` of each in turn: one encoding of
        many entries costs less than one per entry.
        """
        if not count:
            return
        self.add(entries_json)
        self._entries += count - 1

    def _spill(self) -> None:
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="nixery-toc-")  # noqa: SIM115 - closed in close()
        self._file.write(self._buffer)
        self._buffer = bytearray()

    def pieces(self) -> Iterator[bytes | bytearray]:
        """The TOC JSON in pieces, in order: memory holds one piece, whatever the TOC's size.

        Called once every entry is added.  The spilled part is read back
        :data:`SPOOL_READ` bytes at a time; the pieces are never changed
        afterwards (a consumer may keep them).
        """
        yield TOC_PREFIX
        done = len(TOC_PREFIX)
        if self._file is not None:
            self._file.flush()
            self._file.seek(0)
            while piece := self._file.read(SPOOL_READ):
                done += len(piece)
                yield piece
        if self._buffer:
            done += len(self._buffer)
            yield self._buffer
        done += len(TOC_SUFFIX)
        yield TOC_SUFFIX
        if done != self.size:  # pragma: no cover - the file lost bytes
            raise OSError(f"the TOC spool read back {done} bytes of {self.size}")

    def mark(self) -> tuple[int, int]:
        """Where the spool is now, for :meth:`rewind`."""
        return self._entries, self._size

    def rewind(self, mark: tuple[int, int]) -> None:
        """Drop the entries added since :meth:`mark` gave ``mark``.

        What a copied fragment's entries need when its TOC part turns out
        damaged midway (:meth:`~nixery_core.chunked.ChunkedCompressor.put_fragment`):
        the TOC goes on as if they had never come.
        """
        entries, size = mark
        spilled = self._size - len(self._buffer)
        if size >= spilled:
            del self._buffer[size - spilled :]
        elif self._file is not None:
            self._file.flush()
            self._file.truncate(size)
            self._file.seek(size)
            self._buffer = bytearray()
        self._entries, self._size = entries, size

    def close(self) -> None:
        """Free the temporary file and the buffer (the spool is empty after)."""
        file, self._file = self._file, None
        self._buffer = bytearray()
        if file is not None:
            file.close()

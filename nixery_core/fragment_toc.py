"""A chunked fragment's TOC part: its entries as JSON Lines, written and read a record at a time.

A store path recorded as a fragment of an eStargz or zstd:chunked layer
(:mod:`nixery_core.chunked`, :mod:`nixery_core.fragments`) keeps, beside
its frames, its *TOC part*: the TOC entries of its files, so that they can
be moved to wherever the fragment lands in another layer.  Its frames are
bytes of the layer blob (a copy, or a byte range of the stored blob); the
TOC part is not, so it is always kept as a small copy in the fragment
cache, beside the frames' row, under a key of its own
(:func:`toc_part_parameters`).

**Layout 3** (:data:`TOC_PART_LAYOUT`, in the TOC part's cache key): one
zstd frame (level 1, with its checksum) of JSON Lines: first
``{"start":N}``, where the fragment's first byte was in the layer it was
recorded in, then its entries in TOC order, the very bytes that layer's
TOC got for them (:func:`~nixery_core.chunked.compact_json`: ASCII only,
never a raw newline; offsets counted in that layer), so recording costs no
second serialization: each line one or more entries (up to 256), joined
by commas as the TOC encoded them together.  :class:`TocPartWriter`
compresses the lines as they come (a 64 KiB buffer, then the compressor's
stream; a chunked packer with a pool has its hashing queue do that, off the
packing thread, and hands the part over once compressed) and hands the
compressed pieces to the fragment's recorder;
:func:`toc_part_lines` decompresses a kept TOC part 16 KiB of input at a
time and yields it line by line, and
:meth:`~nixery_core.chunked.ChunkedCompressor.put_fragment` moves each
entry by the difference of the two starts.  Memory holds a buffer, the
compressor's state and one line, whatever the store path's number of
files: a store path of 200,000 files costs what one of 20,000 does
(``tests/test_fragment_toc.py``).

Layout 1 (the entries with offsets from the fragment's start, as one JSON
list compressed in one shot, read back and parsed whole) held every entry
of a store path in memory twice; layout 2 (the same entries as JSON Lines,
serialized a second time) was never released.  Their keys are not looked
up any more, so their rows are misses, evicted by use.  Layer bytes did not
change: only where a fragment's entries are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import zstandard

from nixery_core.compression import zstd_window

__all__ = [
    "TOC_PART_LAYOUT",
    "Defer",
    "TocPartWriter",
    "Updated",
    "toc_part_lines",
    "toc_part_parameters",
]

#: The TOC part's layout version, in its fragment key (1: one JSON list, read whole).
TOC_PART_LAYOUT = 3
#: Lines buffered before they go to the compressor.
_BUFFER = 64 << 10
#: Compressed bytes decompressed per call when read back (bounds each call's output).
_READ_STEP = 16 << 10
#: zstd level of TOC parts (kept in the cache only, never in a layer): 1 is twice as fast
#: as 3 on TOC JSON, and smaller.
_LEVEL = 1
#: Compressors no TOC part is using, reused by the next (:func:`_take_context`).  Making a
#: zstd context and its first frame's tables costs about 20 µs, as much as compressing a
#: small store path's part: once per store path of a cold pack, about 0.02-0.04 CPU-s per
#: 300 MB layer.  A reused context gives the same frame, byte for byte (``compressobj()``
#: starts a new session on it); each is taken by one part at a time (``list.pop``).
_IDLE: list[zstandard.ZstdCompressor] = []
#: At most this many are kept idle (one layer records one or two parts at a time).
_IDLE_MAX = 4


def _take_context() -> zstandard.ZstdCompressor:
    try:
        return _IDLE.pop()
    except IndexError:
        return zstandard.ZstdCompressor(level=_LEVEL, write_checksum=True)


def _give_back_context(context: zstandard.ZstdCompressor | None) -> None:
    """A context no part uses any more, kept idle for the next (up to :data:`_IDLE_MAX`)."""
    if context is not None and len(_IDLE) < _IDLE_MAX:
        _IDLE.append(context)


def toc_part_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """The archive parameters that key a store path's TOC part (its frames' plus the part)."""
    return {**parameters, "part": "toc", "toc_layout": TOC_PART_LAYOUT}


class _Recorder(Protocol):
    """Where the compressed TOC part goes (a :class:`~nixery_core.fragments.FragmentWriter`)."""

    def add(self, piece: bytes) -> None: ...

    def commit(self, uncompressed_size: int) -> None: ...

    def discard(self) -> None: ...


class Updated(Protocol):
    """What a :data:`Defer` queue feeds: something taking bytes, in order."""

    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...


#: Queues ``target.update(data)`` to run later, in order with every call queued before, on
#: whichever thread applies the queue (a chunked layer's: the one hashing its ``diff_id``).
Defer = Callable[[Updated, bytes | bytearray], None]


class _Compressing:
    """A TOC part's compression, applied by a :data:`Defer` queue: the pieces, then done."""

    __slots__ = ("compressor", "context", "done", "pieces")

    def __init__(self, context: zstandard.ZstdCompressor) -> None:
        self.context: zstandard.ZstdCompressor | None = context
        self.compressor: Any = context.compressobj()
        self.pieces: list[bytes] = []
        self.done = False

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        piece = self.compressor.compress(data)
        if piece:
            self.pieces.append(piece)


class _Finishing:
    """Queued after a part's last lines: its frame ended, its context given back."""

    __slots__ = ("work",)

    def __init__(self, work: _Compressing) -> None:
        self.work = work

    def update(self, _data: bytes | bytearray | memoryview, /) -> None:
        work = self.work
        work.pieces.append(work.compressor.flush())
        context, work.context = work.context, None
        _give_back_context(context)
        work.done = True


class TocPartWriter:
    """A TOC part being recorded: entries' JSON in, compressed pieces out to ``recorder``.

    With ``defer`` (a chunked layer's packer gives its hashing queue), the
    lines are compressed by that queue, off the packing thread: :meth:`commit`
    only queues the frame's end, and :meth:`hand_over` (on the packing
    thread, called until it returns true) gives the recorder the pieces and
    commits it once they are all compressed.  Same bytes either way.
    """

    def __init__(self, recorder: _Recorder, defer: Defer | None = None) -> None:
        self._recorder = recorder
        #: A compressor of the pool (its context reused: see :data:`_IDLE`), this part's own
        #: until :meth:`commit` or :meth:`discard` gives it back.
        self._context: zstandard.ZstdCompressor | None = _take_context()
        self._defer = defer
        #: The compression a deferring part queues (its compressor is the queue's alone).
        self._work = _Compressing(self._context) if defer is not None else None
        self._compressor: Any = (
            self._work.compressor if self._work is not None else self._context.compressobj()
        )
        if self._work is not None:
            self._context = None  # given back by the queue (_Finishing), never by discard
        self._buffer = bytearray()
        self._size = 0
        self._done = False
        #: Whether :meth:`start` gave the first line (entries may follow).
        self.started = False

    def start(self, offset: int) -> None:
        """The first line: where the fragment starts in the layer being packed."""
        self.add(b'{"start":%d}' % offset)
        self.started = True

    def add(self, entry_json: bytes) -> None:
        """A line: one entry's compact JSON, or several joined by commas."""
        buffer = self._buffer
        buffer += entry_json
        buffer += b"\n"
        if len(buffer) >= _BUFFER:
            self._compress()

    def _compress(self) -> None:
        self._size += len(self._buffer)
        if self._work is not None and self._defer is not None:
            if self._buffer:
                self._defer(self._work, self._buffer)
            self._buffer = bytearray()
            return
        piece = self._compressor.compress(self._buffer)
        self._buffer = bytearray()
        if piece:
            self._recorder.add(piece)

    def commit(self) -> None:
        """The last entry was added: the rest compressed, the part kept by its recorder.

        A deferring part is kept by :meth:`hand_over`, once its queue has
        compressed it.
        """
        self._compress()
        self._done = True
        if self._work is not None and self._defer is not None:
            self._defer(_Finishing(self._work), bytearray())
            return
        self._recorder.add(self._compressor.flush())
        self._give_back()
        self._recorder.commit(self._size)

    def hand_over(self) -> bool:
        """A deferring part committed: its pieces to its recorder, kept, once all compressed.

        Returns whether it was (``False``: its queue is not through yet;
        call again later).  A part that does not defer was kept by :meth:`commit`.
        """
        work = self._work
        if work is None:
            return True
        if not work.done:
            return False
        self._work = None
        for piece in work.pieces:
            self._recorder.add(piece)
        self._recorder.commit(self._size)
        return True

    def discard(self) -> None:
        """Drop the part (its recorder's bytes too); nothing after it was kept."""
        if not self._done or self._work is not None:
            self._done = True
            self._work = None
            self._buffer = bytearray()
            self._give_back()
            self._recorder.discard()

    def _give_back(self) -> None:
        context, self._context = self._context, None
        _give_back_context(context)


def toc_part_lines(pieces: Iterable[bytes], uncompressed_size: int) -> Iterator[bytes]:
    """The lines of a kept TOC part (its compressed ``pieces`` in order), one at a time.

    Raises :class:`ValueError` where the part is damaged: it does not
    decompress, stops before its frame's end, holds bytes after it, or
    decompresses to another size than ``uncompressed_size`` (lines already
    yielded may then be wrong: the caller takes nothing from a part until
    it was read to its end).
    """
    # No larger window than its level gives: a frame declaring more is refused unallocated.
    inflate = zstandard.ZstdDecompressor(max_window_size=zstd_window(_LEVEL)).decompressobj()
    rest = b""
    produced = 0
    try:
        for piece in pieces:
            view = memoryview(piece)
            for start in range(0, len(view), _READ_STEP):
                if inflate.eof:
                    raise ValueError("bytes after the TOC part's frame")
                out = inflate.decompress(view[start : start + _READ_STEP])
                if not out:
                    continue
                produced += len(out)
                if produced > uncompressed_size:
                    raise ValueError("the TOC part decompresses to more than recorded")
                lines = (rest + out).split(b"\n")
                rest = lines.pop()
                yield from lines
    except zstandard.ZstdError as exc:
        raise ValueError(f"the TOC part does not decompress ({exc})") from exc
    if not inflate.eof or inflate.unused_data or rest or produced != uncompressed_size:
        raise ValueError("the TOC part ends early or is not whole lines")

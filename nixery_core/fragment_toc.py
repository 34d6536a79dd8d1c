"""A chunked fragment's TOC part: its entries as JSON Lines, written and read a record at a time.

A store path recorded as a fragment of an eStargz or zstd:chunked layer
(:mod:`nixery_core.chunked`, :mod:`nixery_core.fragments`) keeps, beside
its frames, its *TOC part*: the TOC entries of its files, so that they can
be moved to wherever the fragment lands in another layer.  Its frames are
bytes of the layer blob (a copy, or a byte range of the stored blob); the
TOC part is not, so it is always kept as a small copy in the fragment
cache, beside the frames' row, under a key of its own
(:func:`toc_part_parameters`).

**Layout 4** (:data:`TOC_PART_LAYOUT`, in the TOC part's cache key): JSON
Lines, kept as they are (not compressed): first ``{"start":N}``, where the
fragment's first byte was in the layer it was recorded in, then its
entries in TOC order, the very bytes that layer's TOC got for them
(:func:`~nixery_core.chunked.compact_json`: ASCII only, never a raw
newline; offsets counted in that layer), so recording costs no second
serialization: each line one or more entries (up to :data:`MAX_LINE_ENTRIES`),
joined by commas as the TOC encoded them together.  :class:`TocPartWriter`
hands the lines to the fragment's recorder in pieces of about 64 KiB, on
the packing thread (a copy into a buffer; the cache's writing thread takes
their CRC-32 and writes them).  :func:`toc_part_lines` yields a kept part
line by line, holding one line (at most :data:`MAX_LINE` bytes: a longer
one is a damaged part), and
:meth:`~nixery_core.chunked.ChunkedCompressor.put_fragment` moves each
entry by the difference of the two starts.  Memory holds a buffer and one
line, whatever the store path's number of files: a store path of 200,000
files costs what one of 20,000 does (``tests/test_fragment_toc.py``).

A damaged part is a miss, never wrong entries: the cache checks a part's
length and CRC-32 as it checks frames (on lookup, and again as it is read
for the copy), a bucket its sha256 (:mod:`nixery_core.fragment_bucket`),
and every entry read is checked against the fragment
(:meth:`~nixery_core.chunked.ChunkedCompressor.put_fragment`).

Layout 3 compressed the same lines into one zstd frame (level 1): about
6x smaller (5.8 MB of lines for the 300 MB benchmark closure kept as
0.94 MB), but the compression cost a chunked cold pack 15-20 ms of CPU on
its hashing queue (and a zstd context per part), which a pack keeping
both cores busy pays in wall time; kept plain, a part costs its copy into
the buffer and its CRC-32.  Layout 1 (the entries with offsets from the
fragment's start, as one JSON list compressed in one shot, read back and
parsed whole) held every entry of a store path in memory twice; layout 2
(the same entries as JSON Lines, serialized a second time) was never
released.  Their keys are not looked up any more, so their rows are
misses, evicted by use.  Layer bytes did not change: only where a
fragment's entries are kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

__all__ = [
    "MAX_LINE",
    "MAX_LINE_ENTRIES",
    "PART_START",
    "TOC_PART_LAYOUT",
    "TocPartWriter",
    "toc_part_lines",
    "toc_part_parameters",
]

#: The TOC part's layout version, in its fragment key (see the module docstring).
TOC_PART_LAYOUT = 4
#: How every TOC part of this layout begins (its first line's start).
PART_START = b'{"start":'
#: Lines buffered before they go to the recorder, as one piece.
_BUFFER = 64 << 10
#: Entries on one line at most (the packer encodes no more together: ``chunked._GROUP``).
MAX_LINE_ENTRIES = 256
#: An entry's JSON is shorter than this: its name and link target are paths the packer
#: opened or read (at most ``PATH_MAX``, 4096 bytes, each byte at most six characters
#: escaped), its other fields a few hundred bytes.
_MAX_ENTRY = 64 << 10
#: The longest line a part may hold (its entries, their commas); a longer one is damaged.
MAX_LINE = MAX_LINE_ENTRIES * _MAX_ENTRY


def toc_part_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """The archive parameters that key a store path's TOC part (its frames' plus the part)."""
    return {**parameters, "part": "toc", "toc_layout": TOC_PART_LAYOUT}


class _Recorder(Protocol):
    """Where the TOC part goes (a :class:`~nixery_core.fragments.FragmentWriter`)."""

    def add(self, piece: bytes) -> None: ...

    def commit(self, uncompressed_size: int) -> None: ...

    def discard(self) -> None: ...


class TocPartWriter:
    """A TOC part being recorded: entries' JSON in, pieces of lines out to ``recorder``."""

    __slots__ = ("_buffered", "_done", "_dropped", "_lines", "_recorder", "_size", "started")

    def __init__(self, recorder: _Recorder) -> None:
        self._recorder = recorder
        #: Lines not handed on yet (each followed by its newline), and their bytes.
        self._lines: list[bytes] = []
        self._buffered = 0
        self._size = 0
        self._done = False
        self._dropped = False
        #: Whether :meth:`start` gave the first line (entries may follow).
        self.started = False

    def start(self, offset: int) -> None:
        """The first line: where the fragment starts in the layer being packed."""
        self.add(PART_START + b"%d}" % offset)
        self.started = True

    def add(self, entry_json: bytes) -> None:
        """A line: one entry's compact JSON, or several joined by commas."""
        lines = self._lines
        lines.append(entry_json)
        lines.append(b"\n")
        self._buffered += len(entry_json) + 1
        if self._buffered >= _BUFFER:
            self._hand_on()

    def _hand_on(self) -> None:
        """The lines buffered to the recorder, joined: one piece (one copy of them).

        None once the part is discarded: its fragment may be dropped in the packer's
        queue (a failure there) while the packer still adds its entries here, and its
        recorder, given more, would hold them again (past 1 MiB in a file no one removes).
        """
        if self._lines:
            if not self._done:
                self._size += self._buffered
                self._recorder.add(b"".join(self._lines))
            self._lines, self._buffered = [], 0

    def commit(self) -> None:
        """The last entry was added: the rest to the recorder, the part kept by it."""
        self._hand_on()
        self._done = True
        self._recorder.commit(self._size)

    def discard(self) -> None:
        """Drop the part (its recorder's bytes too, withdrawn once committed: its frames
        failed); nothing after it was kept."""
        if not self._dropped:
            self._done = self._dropped = True
            self._lines, self._buffered = [], 0
            self._recorder.discard()


def toc_part_lines(pieces: Iterable[bytes], size: int) -> Iterator[bytes]:
    """The lines of a kept TOC part (its ``pieces`` in order, ``size`` bytes), one at a time.

    Raises :class:`ValueError` where the part is damaged: it holds another
    number of bytes than ``size``, does not end with a line's end, or holds
    a line longer than :data:`MAX_LINE` (lines already yielded may then be
    wrong: the caller takes nothing from a part until it was read to its
    end).  Holds one line, and the piece it ends in.
    """
    rest: list[bytes] = []
    held = 0
    read = 0
    for piece in pieces:
        read += len(piece)
        if read > size:
            raise ValueError("the TOC part holds more than recorded")
        lines = piece.split(b"\n")
        last = lines.pop()
        if lines:
            if rest:
                if held + len(lines[0]) > MAX_LINE:
                    raise ValueError("a TOC part's line longer than any line of entries")
                rest.append(lines[0])
                lines[0] = b"".join(rest)
                rest, held = [], 0
            yield from lines
        if last:
            held += len(last)
            if held > MAX_LINE:
                raise ValueError("a TOC part's line longer than any line of entries")
            rest.append(last)
    if rest or read != size:
        raise ValueError("the TOC part ends early or is not whole lines")

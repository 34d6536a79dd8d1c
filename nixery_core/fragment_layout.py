"""A fragment's uncompressed bytes, rebuilt from the store instead of decompressed.

A layer assembled from cached fragments (:mod:`nixery_core.fragments`)
still needs its ``diff_id``: the sha256 of the whole uncompressed tar.  The
compressed bytes are copied, but the tar bytes must be produced again.  A
fragment's tar is its members' header blocks and padding (*literal* bytes)
around the contents of its regular files, so when a fragment is packed its
*layout* is recorded next to it: the literal bytes, and for each file its
path below the store path and its size, in order, plus the running CRC-32
of the fragment's uncompressed bytes at the end of every 1 MiB block
(blocks counted from the fragment's start, wherever the packer cut the
pieces it gave; a gzip member's compressor computes that CRC for its
trailer anyway at the same cuts, so the packer takes it from there,
:class:`~nixery_core.compression.ReportsCrc32`; a chunked layer's blocks
are CRC'd on the thread hashing the ``diff_id``, right after their sha256
update, off the packing thread: :meth:`LayoutRecorder.deferred`).

:func:`rebuild` makes the bytes again: literal bytes copied, files read from
the store (page cache, for a store path packed recently), each block
checked against its recorded running CRC-32 *before* it is handed on (the
blocks before it having matched, a block matches exactly when the running
CRC after it does).  The first
block that differs (a file changed or vanished, a damaged layout) stops it:
the caller inflates the fragment from there on.  So the ``diff_id`` only
ever covers bytes that match, block for block, the tar that was
compressed into the fragment being shipped.

Why rebuild rather than inflate: ISA-L inflates about 0.5-0.65 GB of output
per CPU-second here; rebuilding is a copy from the page cache plus an
``open``/``readv``/``close`` per file and a CRC-32 (ISA-L's, about 10 GB/s):
0.11 CPU-seconds against 0.48 for the 313 MB of the benchmark closure's
fragments, 0.03 against 0.13 for the quick one
(``benchmarks/bench_rebuild.py``, docs/performance.md).

A layout is a few hundred bytes per file before compression (the header
blocks), deflated (ISA-L level 0, its fastest) to a tenth or less; a store path whose
headers come to more than :data:`MAX_LITERALS` bytes gets none (it is
inflated).  Format ``NXL2``: header ``<4sIIQ`` (magic, segments, blocks,
literal bytes), then the segments as three arrays, ``<Q`` each literal
bytes before the file, ``<I`` each length of its path, ``<Q`` each its size
(size 0: no file), then the running CRC-32s (``<I`` each), the paths, and
the literal bytes (arrays, so that encoding a layout is a few calls
whatever its number of files).

A fragment is recorded with no call per file at all: the packer already
announces every header it writes to a chunked layer's compressor (the
header and what it says, so that it is not parsed back), and while a
fragment is recorded, in any layer, it also appends to the layout's
:class:`HeaderCapture` (:meth:`LayoutRecorder.captured`) the header, its
size (to an array) and, for a file with content, its name: a few
appends per member on the busiest thread, and no object kept per member
but the header and the name, neither tracked by the cyclic garbage
collector (the tuple of what the header says is let go: kept, as until
the tenth session, the 15k of a cold pack of the 300 MB benchmark closure
each counted towards the collector's next young collection, and the
encode took their sizes and names in two more passes; the layouts
encoded are the same bytes either way).  Every byte of
a fragment is an announced header, the content of the regular file it
announces (its size), or that file's padding to 512 bytes, so the layout
is the headers in order, encoded by the cache's writing thread with
C-level iterations only (the headers' lengths, then one join and one
deflate).  Appending the headers to one ``bytearray`` instead (no join
later) cost the packing thread more than the join saves (its growth
copies it again and again; docs/performance.md).  Format ``NXL3``: header
``<4sIIQII`` (magic, members, blocks, literal bytes, name bytes, length of
the store path's member name), then ``<I`` each member's header length,
``<Q`` each its size (0: no content), the running CRC-32s (``<I`` each, as
``NXL2``), the member names of the files with content joined by NUL bytes
(cut below the store path when decoded), and the headers.  The padding
after a file is not stored: :func:`rebuild` leaves it as the zeros its new
block holds.  A header written without an announcement would make the
layout's size differ from the fragment's, and a layout whose size is not
its fragment's is never used (nor one whose block CRC-32s differ: the
fragment is inflated from there).  Chunked layers' fragments were recorded
so first, gzip and zstd layers' are too now; an ``NXL2`` layout (one of
those kept before, or one recorded by :meth:`~LayoutRecorder.literal`,
:meth:`~LayoutRecorder.file` and :meth:`~LayoutRecorder.member`) decodes
as before; a version without ``NXL3`` finds no layout there and inflates
the fragment (the same bytes), so no fragment key changed.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from array import array
from collections.abc import Callable, Iterator
from itertools import accumulate, chain, compress, repeat
from operator import mod, neg, sub
from typing import cast

import attrs
from isal import isal_zlib

from nixery_core.chunked import HeaderFields
from nixery_core.compression import BLOCK_SIZE

__all__ = ["MAX_LITERALS", "FragmentLayout", "HeaderCapture", "LayoutRecorder", "rebuild"]

# ISA-L (a required dependency): CRC-32 about ten times zlib's, deflate and
# inflate several times as fast, with the same formats.
_compress = isal_zlib.compress
_crc32 = isal_zlib.crc32
_decompress = isal_zlib.decompress
#: What decoding a damaged layout may raise (ISA-L's stub declares its error loosely).
_DECODE_ERRORS: tuple[type[Exception], ...] = (
    cast("type[Exception]", isal_zlib.error), zlib.error, struct.error, ValueError
)

#: ISA-L's fastest deflate level for layouts (encoded on the cache's writing thread, during
#: a cold pack): the 153 layouts of a cold gzip pack of the 300 MB benchmark closure, 9.2 MB
#: before deflating, take 4.4 ms at level 0 against 5.1 at level 1 (thread time, best of 9,
#: alone) and inflate in 4.0 ms against 4.5, for 0.59 MB against 0.49 (docs/performance.md,
#: "The gzip cold pack's cost").  Any level inflates the same: no format change.
_LEVEL = 0
#: A store path whose literal bytes (headers, padding) exceed this gets no layout.
MAX_LITERALS = 16 << 20
_MAGIC = b"NXL2"
_NULS = bytes(512)
_HEAD = struct.Struct("<4sIIQ")
#: A layout of announced headers (a chunked layer's fragment), padding left out.
_MAGIC_HEADERS = b"NXL3"
_HEAD_HEADERS = struct.Struct("<4sIIQII")
#: Arrays are kept in this byte order (swapped on a big-endian host).
_LITTLE = sys.byteorder == "little"
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class HeaderCapture:
    """A fragment's announced members as the packer appends them (see the module docstring).

    Per member, in order: its header (``headers``) and the size of its
    content (``sizes``, 0: none); for a file with content, also its member
    name (``names``).  The packing thread appends to these (:meth:`add`,
    inlined there) and lets what else the header says go; encoding takes
    the headers' lengths and joins them, with C-level iterations only.
    """

    __slots__ = ("headers", "names", "sizes")

    def __init__(self) -> None:
        self.headers: list[bytes] = []
        self.sizes = array("Q")
        self.names: list[bytes] = []

    def add(self, header: bytes, fields: HeaderFields) -> None:
        """A member announced: ``header`` and what it says (name, mode, size, ...)."""
        self.headers.append(header)
        size = fields[2]
        self.sizes.append(size)
        if size:
            self.names.append(fields[0])

    def clear(self) -> None:
        """Drop everything captured (the layout is given up); appending may go on."""
        self.headers.clear()
        self.names.clear()
        del self.sizes[:]


class LayoutRecorder:
    """Records a fragment's layout while it is packed (see the module docstring).

    ``top`` is the store path's member name (``nix/store/<name>``); file
    paths are kept relative to it.
    """

    def __init__(self, top: bytes) -> None:
        self._cut = len(top)
        self._literals = bytearray()
        self._runs = array("Q")
        self._sizes = array("Q")
        self._paths: list[bytes] = []
        self._run = 0
        self._crcs = array("I")
        self._crc = 0
        #: Bytes of the fragment since the last 1 MiB boundary (whose CRC is in ``_crcs``).
        self._fill = 0
        #: Past :data:`MAX_LITERALS`: nothing more is kept (memory stays bounded).
        self._overflow = False
        #: Blocks come from another thread (:meth:`deferred`): what brings them all in, and
        #: whether :meth:`seal` said they did.
        self._settle: Callable[[], None] | None = None
        self._sealed = False
        #: Members announced instead (:meth:`captured`): their headers, sizes and the names
        #: of the files with content.
        self._captured: HeaderCapture | None = None
        #: How many captured headers :meth:`bound` counted, and their bytes.
        self._counted = 0
        self._counted_bytes = 0

    def literal(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes of the tar that are not file content (headers, padding)."""
        if self._overflow:
            return
        self._literals += data
        self._run += len(data)
        if len(self._literals) > MAX_LITERALS:
            self._overflowed()

    def _overflowed(self) -> None:
        self._overflow = True
        self._literals, self._paths = bytearray(), []
        self._runs, self._sizes, self._crcs = array("Q"), array("Q"), array("I")
        if self._captured is not None:
            self._captured.clear()

    def captured(self) -> HeaderCapture:
        """Where the packer appends each member's header and size, and the name of each file
        with content, in order (:class:`HeaderCapture`).

        Instead of :meth:`literal`, :meth:`file` and :meth:`member`, for a
        fragment whose every header is announced (every one the packer
        records: see the module docstring); the content and padding of each
        regular file are implied by its size.  :meth:`bound` keeps memory in check.
        """
        self._captured = HeaderCapture()
        return self._captured

    def bound(self, given: int) -> None:
        """Past :data:`MAX_LITERALS` bytes of announced headers, no layout (nothing more kept).

        Called by the packer now and then (every block), ``given`` the
        fragment's bytes so far: headers are among them, so only past
        :data:`MAX_LITERALS` of those are the captured headers measured
        (memory holds at most a block's more).
        """
        captured = self._captured
        if captured is None or (given <= MAX_LITERALS and not self._overflow):
            return
        if self._overflow:  # kept none (or another thread failed it): what came since goes
            captured.clear()
            return
        headers = captured.headers
        count = len(headers)
        self._counted_bytes += sum(map(len, headers[self._counted : count]))
        self._counted = count
        if self._counted_bytes > MAX_LITERALS:
            self._overflowed()

    def file(self, member: bytes, size: int) -> None:
        """``size`` bytes of the file ``member`` (a member name under the store path)."""
        if size and not self._overflow:
            self._runs.append(self._run)
            self._paths.append(member[self._cut :])
            self._sizes.append(size)
            self._run = 0

    def member(self, header: bytes, member: bytes, size: int, pad: int) -> None:
        """A whole member: ``header``, ``size`` bytes of the file ``member``, ``pad`` NULs.

        The same as :meth:`literal`, :meth:`file`, :meth:`literal` in one call.
        """
        if self._overflow:
            return
        literals = self._literals
        literals += header
        if size:
            self._runs.append(self._run + len(header))
            self._paths.append(member[self._cut :])
            self._sizes.append(size)
            self._run = pad
        else:
            self._run += len(header) + pad
        if pad:
            literals += _NULS[:pad]
        if len(literals) > MAX_LITERALS:
            self._overflowed()

    def block(self, data: bytes | bytearray | memoryview) -> None:
        """The fragment's next uncompressed bytes, as compressed, in pieces of any length.

        The running CRC-32 is kept at every 1 MiB counted from the
        fragment's start, wherever the pieces are cut (a chunked layer's
        shared tar block goes on after a store path's end, so the next one's
        first piece is shorter), and at its end (:meth:`encode`).  None once the
        layout is given up (too many literal bytes, or its recording failed):
        nothing of it is kept.
        """
        if self._overflow:
            return
        view = memoryview(data)
        crc, fill = self._crc, self._fill
        while view:
            take = min(len(view), BLOCK_SIZE - fill)
            crc = _crc32(view[:take], crc)
            fill += take
            view = view[take:]
            if fill == BLOCK_SIZE:
                self._crcs.append(crc)
                fill = 0
        self._crc, self._fill = crc, fill

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """:meth:`block`, under the name a queue of ordered hash updates calls."""
        self.block(data)

    def deferred(self, settle: Callable[[], None]) -> None:
        """Blocks are given by another thread from now on, and :meth:`seal` after the last.

        A chunked layer's packer hands its blocks to the queue hashing the
        ``diff_id`` (whose CRC-32 then reads them while they are still in
        the CPU's cache), off the packing thread.  :meth:`encode` (on the
        cache's writing thread, maybe before that queue is through) first
        calls ``settle``, which applies whatever is queued on the calling
        thread (never waiting for a pool that may be busy), unless the
        layout is sealed already (a range's is: its commit is queued after
        the seal), so the encoding thread neither drains the layer's hashing
        nor waits on a drain running; a layout not sealed by then gets none.
        """
        self._settle = settle

    def seal(self, *, whole: bool = True) -> None:
        """The last block was given (``whole=False``: some never will be, so no layout)."""
        if not whole:
            self._overflowed()
        self._sealed = True

    def block_crc(self, running: int, length: int) -> None:
        """The next ``length`` bytes, given as the running CRC-32 of the fragment up to their
        end (a compressor's, for pieces cut at the 1 MiB boundaries; else no layout)."""
        fill = self._fill + length
        if fill > BLOCK_SIZE:  # pragma: no cover - such pieces go to block()
            self._overflowed()
            return
        self._crc = running
        self._fill = 0 if fill == BLOCK_SIZE else fill
        if fill == BLOCK_SIZE:
            self._crcs.append(running)

    def encode(self) -> bytes | None:
        """The layout, compressed; ``None`` when it is too large to be worth keeping."""
        if self._settle is not None and not self._sealed:  # sealed: every block is in
            self._settle()
            if not self._sealed:  # some blocks never came: no layout rather than a short one
                return None
        if self._overflow:
            return None
        if self._captured is not None:
            return self._encode_captured(self._captured)
        runs, sizes, crcs = array("Q", self._runs), array("Q", self._sizes), self._block_crcs()
        runs.append(self._run)
        sizes.append(0)
        lengths = array("I", map(len, self._paths))
        lengths.append(0)
        head = _HEAD.pack(_MAGIC, len(runs), len(crcs), len(self._literals))
        parts: list[bytes | bytearray] = [head, *_stored((runs, lengths, sizes, crcs))]
        parts += self._paths
        parts.append(self._literals)
        return _compress(b"".join(parts), _LEVEL)

    def _encode_captured(self, captured: HeaderCapture) -> bytes | None:
        """``NXL3`` from the captured members, with C-level iterations only (no loop per member)."""
        headers, sizes = captured.headers, captured.sizes
        if len(headers) != len(sizes):  # pragma: no cover - appended together
            return None
        lengths = array("I", map(len, headers))
        literal_size = sum(lengths)
        if literal_size > MAX_LITERALS:
            return None
        crcs = self._block_crcs()
        # Whole member names: cut below the store path when decoded (fewer objects made here).
        paths = b"\0".join(captured.names)
        head = _HEAD_HEADERS.pack(
            _MAGIC_HEADERS, len(sizes), len(crcs), literal_size, len(paths), self._cut
        )
        return _compress(
            b"".join((head, *_stored((lengths, sizes, crcs)), paths, *headers)), _LEVEL
        )

    def _block_crcs(self) -> array[int]:
        """The running CRC-32 at the end of every block, the last, partial one's included."""
        crcs = array("I", self._crcs)
        if self._fill:  # the last, partial block
            crcs.append(self._crc)
        return crcs


@attrs.frozen
class FragmentLayout:
    """A decoded layout: segments (literal bytes before, path, size), block CRCs, literals.

    ``padding``: the bytes of the files' padding to 512 bytes, when it
    follows each file without being among the literal bytes (an ``NXL3``
    layout's; 0 for ``NXL2``, whose literal bytes hold it).
    """

    segments: tuple[tuple[int, bytes, int], ...]
    crcs: tuple[int, ...]
    literals: bytes
    padding: int = 0

    @property
    def size(self) -> int:
        """The fragment's uncompressed size."""
        return len(self.literals) + sum(size for _run, _path, size in self.segments) + self.padding

    @classmethod
    def decode(cls, raw: bytes) -> FragmentLayout | None:
        """The layout in ``raw``, or ``None`` when it is not a well-formed one."""
        try:
            data = _decompress(raw)
            if data[:4] == _MAGIC_HEADERS:
                return cls._decode_announced(data)
            return cls._decode(data)
        except _DECODE_ERRORS:
            return None
        except _Malformed:
            return None

    @classmethod
    def _decode_announced(cls, data: bytes) -> FragmentLayout:
        """An ``NXL3`` layout (see the module docstring), into segments as ``NXL2`` has them
        but for the padding, which :func:`rebuild` leaves as zeros."""
        _magic, count, blocks, literal_size, path_size, cut = _HEAD_HEADERS.unpack_from(data)
        (lengths, sizes, crcs), offset = _arrays(
            data, _HEAD_HEADERS.size, (("I", count), ("Q", count), ("I", blocks))
        )
        paths_end = offset + path_size
        literals = data[paths_end:]
        if paths_end > len(data) or len(literals) != literal_size or sum(lengths) != literal_size:
            raise _Malformed
        files = [size for size in sizes if size]
        names = data[offset:paths_end].split(b"\0") if files else []
        if len(names) != len(files) or (not files and path_size):
            raise _Malformed
        paths = []
        for name in names:
            path = name[cut:]
            if len(name) < cut or (path and not path.startswith(b"/")) or b"/.." in path:
                raise _Malformed  # only ever a path below the store path
            paths.append(path)
        # Where each file goes among the literal bytes: after its header.
        ends = list(compress(accumulate(lengths), sizes))
        runs = map(sub, ends, chain((0,), ends))
        tail = literal_size - (ends[-1] if ends else 0)
        segments = (*zip(runs, paths, files, strict=True), (tail, b"", 0))
        padding = sum(map(mod, map(neg, files), repeat(512)))
        layout = cls(segments, tuple(crcs), literals, padding)
        if -(-layout.size // BLOCK_SIZE) != blocks:
            raise _Malformed
        return layout

    @classmethod
    def _decode(cls, data: bytes) -> FragmentLayout:
        magic, count, blocks, literal_size = _HEAD.unpack_from(data)
        if magic != _MAGIC:
            raise _Malformed
        (runs, lengths, sizes, crcs), offset = _arrays(
            data, _HEAD.size, (("Q", count), ("I", count), ("Q", count), ("I", blocks))
        )
        segments = []
        for run, length, size in zip(runs, lengths, sizes, strict=True):
            path = data[offset : offset + length]
            offset += length
            if len(path) != length or (path and not path.startswith(b"/")) or b"/.." in path:
                raise _Malformed  # only ever a path below the store path
            segments.append((run, path, size))
        literals = data[offset:]
        if len(literals) != literal_size or sum(runs) != literal_size:
            raise _Malformed
        layout = cls(tuple(segments), tuple(crcs), literals)
        if -(-layout.size // BLOCK_SIZE) != blocks:
            raise _Malformed
        return layout


class _Malformed(Exception):
    """Raised inside :meth:`FragmentLayout.decode` for bytes that are not a layout."""


def _stored(arrays: tuple[array[int], ...]) -> Iterator[bytes]:
    """Each of ``arrays``' bytes as a layout keeps them (little-endian; swapped in place)."""
    for values in arrays:
        if not _LITTLE:  # pragma: no cover - every supported host is little-endian
            values.byteswap()
        yield values.tobytes()


def _arrays(
    data: bytes, offset: int, shapes: tuple[tuple[str, int], ...]
) -> tuple[list[array[int]], int]:
    """The arrays of ``shapes`` (type code, length) stored in ``data`` from ``offset`` on,
    and the offset after them."""
    arrays = []
    for code, length in shapes:
        values = array(code)
        end = offset + values.itemsize * length
        if end > len(data):
            raise _Malformed
        values.frombytes(data[offset:end])
        if not _LITTLE:  # pragma: no cover - every supported host is little-endian
            values.byteswap()
        arrays.append(values)
        offset = end
    return arrays, offset


def rebuild(source: bytes, layout: FragmentLayout, emit: Callable[[bytearray], None]) -> int:
    """Feed ``emit`` the fragment's uncompressed bytes rebuilt from ``source``, block by block.

    ``source`` is the store path as read when the fragment was packed.  Each
    block is checked against its recorded CRC-32 before ``emit`` gets it
    (and ``emit`` keeps it: a new buffer follows).  Returns how many bytes
    were fed: all of them, or those before the first block that differs or
    a file that cannot be read, where the caller takes over.
    """
    blocks = _Blocks(layout.crcs, emit)
    literals = memoryview(layout.literals)
    padded = layout.padding > 0
    taken = 0
    try:
        for run, path, size in layout.segments:
            if run:
                blocks.copy(literals[taken : taken + run])
                taken += run
            if size:
                blocks.read(source + path, size, -size % 512 if padded else 0)
        blocks.close()
    except _Differs:
        pass
    return blocks.fed


class _Differs(Exception):
    """The bytes being rebuilt differ from those packed (or cannot be read)."""


class _Blocks:
    """Fills 1 MiB blocks, checks each against its CRC-32 and hands it on."""

    def __init__(self, crcs: tuple[int, ...], emit: Callable[[bytearray], None]) -> None:
        self._crcs = crcs
        self._emit = emit
        self._block = bytearray(BLOCK_SIZE)
        self._view = memoryview(self._block)
        self._pos = 0
        self._index = 0
        self._crc = 0
        #: Bytes handed on so far.
        self.fed = 0

    def copy(self, data: memoryview) -> None:
        while data:
            take = min(len(data), BLOCK_SIZE - self._pos)
            self._view[self._pos : self._pos + take] = data[:take]
            self._pos += take
            data = data[take:]
            if self._pos == BLOCK_SIZE:
                self._full()

    def read(self, path: bytes, size: int, padding: int = 0) -> None:
        """``size`` bytes of the file at ``path``, then ``padding`` zeros (an ``NXL3`` layout's)."""
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError as exc:
            raise _Differs from exc
        try:
            while size:
                pos = self._pos
                want = min(size, BLOCK_SIZE - pos)
                got = os.readv(fd, (self._view[pos : pos + want],))
                if not got:
                    raise _Differs  # shorter than when packed
                self._pos = pos + got
                size -= got
                if self._pos == BLOCK_SIZE:
                    self._full()
        except OSError as exc:
            raise _Differs from exc
        finally:
            os.close(fd)
        if padding:
            # Zeros already: every block is new.  Padding ends where a 512-byte record
            # does, so at a block's end at the furthest (fragments start on one).
            self._pos += padding
            if self._pos >= BLOCK_SIZE:
                over = self._pos - BLOCK_SIZE
                self._pos = BLOCK_SIZE
                self._full()
                self._pos = over

    def _full(self) -> None:
        self._crc = _crc32(self._view, self._crc)
        if self._crc != self._crcs[self._index]:
            raise _Differs
        self._emit(self._block)
        self._index += 1
        self.fed += BLOCK_SIZE
        self._block = bytearray(BLOCK_SIZE)
        self._view = memoryview(self._block)
        self._pos = 0

    def close(self) -> None:
        """Check and hand on the last, partial block."""
        pos = self._pos
        if not pos:
            return
        self._crc = _crc32(self._view[:pos], self._crc)
        if self._crc != self._crcs[self._index]:
            raise _Differs
        self._view.release()
        del self._block[pos:]
        self._emit(self._block)
        self._index += 1
        self.fed += pos
        self._pos = 0

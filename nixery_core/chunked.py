"""File-granular layer blobs: the framing eStargz and zstd:chunked share.

One job: turn the uncompressed tar stream of a layer into independently
compressed *frames* cut at file boundaries, and describe every file in a
table of contents (TOC) with the compressed byte range that holds it, so a
client that already has a file (or a piece of one) fetches only the rest
with HTTP ``Range`` requests.  The two formats differ only in how a frame
is compressed and how the TOC and footer are written; each lives in its own
module (:mod:`nixery_core.estargz`, :mod:`nixery_core.zstd_chunked`) as a
:class:`FrameFormat`.

**Input.**  The tar stream the archive writer produces (ustar headers,
optional pax ``x`` headers, regular files, hard links, symlinks,
directories), fed in pieces of any size, *without* its end-of-archive
blocks: the format writes its own end (eStargz puts its TOC entry before
it).  The parser reads exactly what :mod:`nixery_core.archive` writes;
other tar features (GNU long names, sparse files, global pax headers) raise
:class:`~nixery_core.errors.LayerError`.

**Frames.**  Tar headers (and the padding before them) go in *metadata*
pieces; the content of each regular file is cut into *chunks* by
content-defined chunking (FastCDC 2020, :data:`CHUNK_AVERAGE` bytes on
average, between :data:`CHUNK_MIN` and :data:`CHUNK_MAX`; the cut points
restart at each file).  Content-defined cut points are what make an edit
near the start of a big file cost one chunk instead of the file: the chunks
after it are byte-identical, so their digests match what the client already
holds.  In files of at least :data:`REFERENCE_SPLIT_MIN` bytes, each cluster
of store path references (``/nix/store/<hash>``) is moreover a chunk of its
own (:func:`plan_chunks`): when a dependency gets a new store path, as every
package above a rebuilt one does in Nix, only those few-dozen-byte chunks
differ, not the ~40 KiB chunk around a RUNPATH or shebang.
The format decides how pieces become frames (zstd:chunked: every piece its
own frame; eStargz: a chunk plus the metadata that follows it, as the
stargz writer does).

**Determinism.**  Cut points depend only on file content and the chunk
parameters; frames are compressed one-shot, each independently, so the
bytes depend only on the input, the format and the compressor spec, never
on how the input was split into calls or on the number of threads.

**Fragments.**  A layer is assembled from per-store-path *fragments*
(:mod:`nixery_core.fragments`), as gzip and zstd layers are: between
:meth:`ChunkedCompressor.begin_fragment` and
:meth:`~ChunkedCompressor.end_fragment` (one store path) no frame reaches
outside, so the store path's frames are the same bytes wherever it lands in
a layer.  A recorded fragment is those frames (their recorder learns where
the first one starts in the blob, so they can be kept as a byte range of
it) plus, as a part of its own, where it started and its TOC entries, the
very JSON the layer's TOC got (:mod:`nixery_core.fragment_toc`: JSON
Lines, kept as they come); :meth:`~ChunkedCompressor.put_fragment`
takes that part back a line at a time, moving the offsets to where the
frames land, before the frames are copied.  The TOC and footer are written at the end as always,
so a layer is byte-identical whether its store paths were compressed now
or copied.

**Parallelism and memory.**  The caller's thread parses the tar and plans
the cuts of big files (those not whole within a window of about 4 MiB,
cut as they stream in); sealed frames, grouped into batches of about
:data:`BATCH_BYTES`, go to the executor (at most ``4 * threads *
BATCH_BYTES`` uncompressed bytes in flight, output in order).  There a
batch's chunks are hashed, a file that arrived whole is cut (a *job*:
:func:`plan_chunks` runs on the worker, its chunks' TOC entries are made
when the batch is collected), and the batch is compressed in one call
(:func:`~nixery_core.compression.frames_compressor`); a big file's
chunks join its sha256 a window at a time, in batch order, on whichever
worker is free (:class:`_OrderedFileHashing`).  Few, long calls matter:
Python's lock is free only inside them.  Given worker processes
(:class:`BatchProcesses`, :mod:`nixery_core.frame_processes`), a batch
goes there instead (:func:`compress_packed` is what a worker runs): a
frame lying whole in the pool's shared memory (:class:`SharedSlots`, where
the tar writer reads files and big files' windows are cut) as its place,
any other as its pieces, unjoined; only the file hashing stays on the
executor.  Memory holds a big file's current chunk window (at
most :data:`CHUNK_MAX` plus about 4 MiB; chunks are views of it, not
copies), the batches in flight, and the TOC entries still waiting for
their batch's offsets and digests.  An entry final and next in TOC order
is serialized at once to the JSON bytes it takes in the TOC and spooled
(:class:`~nixery_core.toc_spool.TocSpool`: 1 MiB in memory, then an
unnamed temporary file), so the number of files in a layer costs disk, not
memory.  A fragment being recorded streams the same bytes of its own
entries into its TOC part, and a copied fragment's TOC
part is read, moved and spooled one line at a time, so a store path's
number of files costs no memory either.  At the end the TOC is read back from the
spool a piece at a time and compressed as it streams
(:func:`~nixery_core.compression.frame_stream`, fed fixed pieces, so the
bytes are still a function of the input alone), so the end of a layer
holds a piece and the compressor's state too, whatever its number of
files.
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import hashlib
import json
import logging
import mmap
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future
from concurrent.futures import wait as wait_futures
from typing import Any, Protocol, cast

import attrs
import orjson

from nixery_core.compression import FramesCompressor
from nixery_core.compression import crc32 as _crc32
from nixery_core.errors import LayerError, MissingEncoder
from nixery_core.fragment_toc import MAX_LINE_ENTRIES, TocPartWriter
from nixery_core.released import released
from nixery_core.toc_spool import TocSpool

__all__ = [
    "BATCH_BYTES",
    "CHUNKED_FORMAT",
    "CHUNK_AVERAGE",
    "CHUNK_MAX",
    "CHUNK_MIN",
    "PACKED_FRAME",
    "Annotations",
    "BatchProcesses",
    "ChunkedCompressor",
    "Defer",
    "FragmentRecorder",
    "FrameFormat",
    "HeaderFields",
    "Sink",
    "Updated",
    "chunker_parameters",
    "compress_packed",
    "cut_points",
    "each_frame",
    "modtime_rfc3339",
    "new_chunker",
    "plan_chunks",
]

log = logging.getLogger(__name__)

#: The chunked formats' own version, in cache keys: bumped whenever their
#: bytes change for the same input and compressor.  ``nixery-chunked/2``:
#: the TOC (and eStargz's TOC member) is compressed while it streams
#: (:func:`~nixery_core.compression.frame_stream`); before, in one shot
#: (version 1, which cache keys did not name).
CHUNKED_FORMAT = "nixery-chunked/2"
#: FastCDC's average chunk size parameter (the real average is about this
#: plus :data:`CHUNK_MIN`).
CHUNK_AVERAGE = 32 * 1024
#: Smallest chunk (except a file's last); files up to this size are one chunk.
CHUNK_MIN = 8 * 1024
#: Largest chunk.
CHUNK_MAX = 256 * 1024
#: Files at least this big get each cluster of store path references in a
#: chunk of its own (see :func:`plan_chunks`); smaller files are one or a
#: few chunks anyway.
REFERENCE_SPLIT_MIN = 4 * 1024
#: References closer than this (bytes between one's hash and the next's
#: ``/nix/store/``) share a chunk, as the entries of a RUNPATH do.
REFERENCE_GAP = 256
_REFERENCE = b"/nix/store/"
#: ``/nix/store/`` and the 32 characters of the hash: what a rebuild changes.
_REFERENCE_LENGTH = len(_REFERENCE) + 32
#: Chunks must end this far before the data seen so far, so a reference
#: that starts near the end of a window is never inside an emitted chunk.
_MARGIN = 64
#: Uncompressed bytes per batch of frames handed to a worker.
BATCH_BYTES = 1 << 20
#: A big file's content is cut once this much of it is held (the last
#: :data:`CHUNK_MAX` bytes or so wait for more), so most bytes are copied
#: and scanned once.
_WINDOW = CHUNK_MAX + 4 * BATCH_BYTES
#: Window buffers kept waiting to be filled again once released (see
#: ChunkedCompressor._window_buffer).
_WINDOW_BUFFERS = 4
#: Uncollected bytes allowed, as a multiple of the bytes still to compress, when
#: worker processes answer out of order (ChunkedCompressor._room_for_more).
_HELD = 4
#: A metadata piece (headers of directories, symlinks, links) is sealed into
#: a frame of its own once it reaches this size, so it never grows unbounded.
_META_LIMIT = 1 << 20


def _import_fastcdc() -> Any:
    try:
        import pyfastcdc  # noqa: PLC0415 - imported on demand, a required dependency
    except ImportError as exc:
        raise MissingEncoder("pyfastcdc", "eStargz and zstd:chunked layers") from exc
    return pyfastcdc


def chunker_parameters() -> dict[str, int | str]:
    """The chunked formats' version and content-defined chunking parameters, for cache keys."""
    return {
        "chunked_format": CHUNKED_FORMAT,
        "chunker": "fastcdc2020",
        "chunk_average": CHUNK_AVERAGE,
        "chunk_min": CHUNK_MIN,
        "chunk_max": CHUNK_MAX,
        "reference_split_min": REFERENCE_SPLIT_MIN,
        "reference_gap": REFERENCE_GAP,
    }


def _new_chunker() -> Any:
    return _import_fastcdc().FastCDC(
        CHUNK_AVERAGE, min_size=CHUNK_MIN, max_size=CHUNK_MAX, normalized_chunking=1, seed=0
    )


def cut_points(data: bytes | bytearray | memoryview) -> list[int]:
    """Lengths of the chunks ``data`` is cut into, as if it were a whole file."""
    return [chunk.length for chunk in _new_chunker().cut_buf(data)]


_Buffer = bytes | bytearray | memoryview

#: What a tar header the archive writer made says: name, mode, size, type
#: flag, uid, gid and link target, as given to it (see
#: :meth:`ChunkedCompressor.announce`).
HeaderFields = tuple[bytes, int, int, bytes, int, int, bytes]

#: The order of TOC entry keys: insertion order depends on when a frame's
#: offsets arrive from a worker, so the TOC is always written in this order.
TOC_KEYS = (
    "name",
    "type",
    "linkName",
    "mode",
    "size",
    "modtime",
    "uid",
    "gid",
    "digest",
    "offset",
    "endOffset",
    "chunkOffset",
    "chunkSize",
    "chunkDigest",
)


def compact_json(document: Any) -> bytes:
    """``json.dumps(document, separators=(",", ":")).encode()``, byte for byte, faster.

    orjson writes the same bytes for the TOC's values (ints, ASCII strings)
    about ten times faster; where the two differ (non-ASCII or control
    characters, which :mod:`json` escapes as ``\\uXXXX`` and orjson writes
    raw, and names that are not valid UTF-8, which orjson refuses) the
    :mod:`json` encoding is used, so the TOC bytes never depend on it.
    """
    try:
        out: bytes = orjson.dumps(document)
    except TypeError:  # a surrogate-escaped name: not UTF-8
        out = b""
    if not out or not out.isascii() or b"\x7f" in out or b"\\u" in out:
        out = json.dumps(document, separators=(",", ":")).encode()
    return out


def _libc_memmem() -> Any:
    """libc's ``memmem``, or ``None`` where there is none.

    Found through :mod:`ctypes`, whose foreign calls release Python's lock:
    the reference search runs alongside the thread parsing the tar, and
    glibc's ``memmem`` (two-way, vectorised) is about 2.5x faster than
    ``bytes.find`` on binaries.
    """
    try:
        memmem = ctypes.CDLL(ctypes.util.find_library("c")).memmem
    except (OSError, AttributeError, TypeError):  # pragma: no cover - a libc without memmem
        return None
    memmem.restype = ctypes.c_void_p
    memmem.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t)
    return memmem


_MEMMEM = _libc_memmem()


def _finder(window: _Buffer) -> Callable[[int, int], int]:
    """``find(start, end)``: ``window.find(_REFERENCE, start, end)``, through memmem if any.

    ``window`` must stay alive and unchanged while the finder is used.  A
    bytes object or a writable buffer (a worker's received batch) is
    searched in place; a read-only view is copied first.
    """
    size = len(window)
    memmem = _MEMMEM
    keep: object = window
    if memmem is not None and isinstance(window, bytes):
        # A bytes object's buffer, without a copy (c_char_p points into it).
        base = ctypes.cast(ctypes.c_char_p(window), ctypes.c_void_p).value or 0
    elif memmem is not None and size:
        try:
            keep = (ctypes.c_char * size).from_buffer(window)
        except TypeError:  # read-only: search a copy
            return _finder(bytes(window))
        base = ctypes.addressof(keep)
    else:
        data = bytes(window) if isinstance(window, memoryview) else window
        return lambda start, end: data.find(_REFERENCE, start, end)
    needle = _REFERENCE
    length = len(needle)

    def find(start: int, end: int, _keep: object = keep) -> int:
        # _keep: the searched buffer (or the ctypes array over it) stays alive.
        end = min(end, size)
        if end - start < length:
            return -1
        at = memmem(base + start, end - start, needle, length)
        return -1 if at is None else int(at) - base

    return find


def _nowhere(start: int, end: int) -> int:
    """No reference anywhere (files too small to split around them)."""
    return -1


def plan_chunks(
    chunker: Any, window: _Buffer, *, last: bool, split_references: bool
) -> list[int]:
    """Lengths of the chunks to emit from the start of ``window`` (a file's pending content).

    With ``split_references``, every cluster of store path references
    (``/nix/store/`` and its 32-character hash; references less than
    :data:`REFERENCE_GAP` apart form one cluster, at most :data:`CHUNK_MAX`
    long) is a chunk of its own, and content-defined chunking cuts the
    stretches between clusters.  A Nix rebuild that renames a dependency
    changes exactly those hash characters, so the chunks around them stay
    byte-identical and a client that has the old file fetches only the
    tiny reference chunks.  Unless ``last`` (the window ends the file),
    chunks whose cut point could still depend on data not yet seen are
    held back: the result is the same however the file is split into
    windows.
    """
    size = len(window)
    lengths: list[int] = []
    pos = 0
    find = _finder(window) if split_references else _nowhere
    with memoryview(window) as view:
        while pos < size:
            found = find(pos, size)
            region: tuple[int, int] | None = None
            wait = False
            segment_end = size
            if found != -1:
                segment_end = found
                end = found + _REFERENCE_LENGTH
                while True:
                    if not last and end + REFERENCE_GAP + len(_REFERENCE) > size:
                        wait = True  # the cluster's end is not known yet
                        break
                    following = find(end, end + REFERENCE_GAP + len(_REFERENCE))
                    if following == -1 or following + _REFERENCE_LENGTH - found > CHUNK_MAX:
                        break
                    end = following + _REFERENCE_LENGTH
                region = (found, min(end, size))
            fixed_end = found != -1 or last
            start = pos
            if segment_end > pos:
                for chunk in chunker.cut_buf(view[pos:segment_end]):
                    if not fixed_end and start + CHUNK_MAX > size - _MARGIN:
                        return lengths
                    lengths.append(chunk.length)
                    start += chunk.length
            if region is None or wait:
                return lengths
            lengths.append(region[1] - region[0])
            pos = region[1]
    return lengths


def each_frame(compress: Callable[[bytes], bytes]) -> FramesCompressor:
    """A :data:`~nixery_core.compression.FramesCompressor` calling ``compress`` once per frame."""

    def frames(data: Sequence[_Buffer]) -> tuple[bytes, list[int]]:
        out = [compress(bytes(frame)) for frame in data]
        return b"".join(out), [len(frame) for frame in out]

    return frames


def modtime_rfc3339(mtime: int) -> str:
    """A tar mtime as the TOC's RFC 3339 UTC timestamp."""
    import time  # noqa: PLC0415 - only for this conversion

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime))


#: Annotations for a layer's descriptor in an OCI manifest: (key, value) pairs.
Annotations = tuple[tuple[str, str], ...]
#: Where the end of a layer goes, piece by piece, as it is made.
Sink = Callable[[bytes | bytearray], object]


class BatchProcesses(Protocol):
    """Worker processes compressing packed batches (a :mod:`~nixery_core.frame_processes` pool).

    It promises: :meth:`submit` never blocks for long, and its future gives
    what :func:`compress_packed` returns for the same arguments (or raises
    :class:`~nixery_core.errors.LayerError`).
    """

    def submit(
        self,
        settings: tuple[str, int, str],
        table: bytes,
        payload: Sequence[_Buffer],
        places: bytes = b"",
        hold: Sequence[memoryview] = (),
        *,
        checksum: bool = False,
    ) -> Future[_Batch]: ...


class SharedSlots(Protocol):
    """Buffers worker processes read in place (:class:`~nixery_core.shared_buffers.SharedBuffers`).

    It promises: :meth:`take` gives a writable buffer nothing else refers
    to, or ``None``; :meth:`place` gives the offset a worker reads a view
    of one (followed by ``after``) at, or -1 if it cannot.
    """

    def take(self, size: int) -> mmap.mmap | None: ...

    def place(self, view: memoryview, after: bytes | bytearray = b"") -> int: ...


def _prefix(head: _Buffer | _Pieces, size: int) -> _Buffer:
    """The first ``size`` bytes of a frame's head (in pieces only for worker processes)."""
    if isinstance(head, _Pieces):  # pragma: no cover - only jobs are in pieces
        raise LayerError("a chunk in pieces")
    return head if size == len(head) else memoryview(head)[:size]


@attrs.frozen
class _Pieces:
    """A whole file's content still in the pieces it came in (for a worker process)."""

    pieces: list[_Buffer]

    def __len__(self) -> int:
        return sum(len(piece) for piece in self.pieces)


class FrameFormat(Protocol):
    """A file-granular format: how frames are compressed and the TOC is written.

    It promises: :meth:`compress_frame` is a pure function of its input
    (safe to call from several threads at once); :meth:`trailer` writes
    the blob's tail from the finished TOC entries and the offset where it
    starts (``tar_size`` is the length of the tar fed in so far): the
    compressed bytes to ``write`` and the tar bytes it adds (part of the
    ``diff_id``) to ``tar``, each in order and in pieces, holding no more
    than a piece or so whatever the number of entries; it returns the
    layer's annotations.  The entries come spooled, each as
    :attr:`toc_keys` order writes it.
    """

    #: Whether the metadata after a file's last chunk joins that chunk's frame
    #: (eStargz) instead of a frame of its own (zstd:chunked).
    merge_metadata: bool
    #: The keys a TOC entry keeps, in the order the TOC writes them.
    toc_keys: tuple[str, ...]

    def compress_frame(self, data: _Buffer) -> bytes: ...

    def compress_frames(self, frames: Sequence[_Buffer]) -> tuple[bytes, list[int]]:
        """Many frames compressed as :meth:`compress_frame` would, joined; each one's length."""
        ...

    def trailer(
        self, toc: TocSpool, offset: int, tar_size: int, write: Sink, tar: Sink
    ) -> Annotations: ...


@attrs.define
class _Frame:
    """Uncompressed bytes of one frame and the TOC fields that wait for its offsets.

    The frame is ``head`` (a chunk, kept as it came: no copy) then ``data``
    (headers and padding).
    """

    data: bytearray
    head: _Buffer | _Pieces = b""
    #: TOC entries whose ``offset`` is this frame's start.
    starts: list[dict[str, Any]] = attrs.Factory(list)
    #: TOC entries whose ``endOffset`` is this frame's end.
    ends: list[dict[str, Any]] = attrs.Factory(list)
    #: The chunk entry whose ``chunkDigest`` this frame's (first) bytes give.
    chunk: dict[str, Any] | None = None
    #: Bytes of the chunk at the start of the frame (``len(head)``).
    chunk_size: int = 0
    #: The running sha256 of a file of several chunks, which ``file_update`` joins.
    file_hash: Any = None
    #: The chunks of the file's window from this one (its first) on, as one
    #: view: hashed in one call, not one per chunk (fewer hand-offs of
    #: Python's lock between the hashing thread and the one cutting the tar).
    file_update: _Buffer | None = None
    #: The file entry whose ``digest`` that hash gives once this chunk (its last)
    #: joined it, and the hash.
    file_end: tuple[dict[str, Any], Any] | None = None
    #: A whole file cut on the worker: its entry and whether its store
    #: references get chunks of their own (the frame's ``head`` is the file).
    job: tuple[dict[str, Any], bool] | None = None
    #: The file entry this frame (its last chunk) completes once collected.
    final: dict[str, Any] | None = None
    #: A recorded fragment this frame is the first of, or the last of.
    opens: _Fragment | None = None
    closes: _Fragment | None = None
    #: Whether its batch was collected (its offsets known).
    collected: bool = False

    def __len__(self) -> int:
        return len(self.head) + len(self.data)

    def handed_on(self) -> None:
        """Drop the bytes (and hash work) handed to a worker: only the TOC fields stay."""
        self.data, self.head, self.file_hash, self.file_update = bytearray(), b"", None, None


#: A compressed batch: the frames joined, each frame's length, each frame's
#: chunk digest, for each frame given, how its file was cut (jobs only), and the
#: CRC-32 of the joined frames when asked for (``checksum``; else -1): taken where
#: they were just compressed, for a recorded fragment's range (:meth:`_Fragment.add_frames`).
_Batch = tuple[bytes, list[int], list[str], list["tuple[list[int], str] | None"], int]
#: A frame for a worker: head, data (joined unless a job), chunk size, (file hash,
#: the bytes joining it) or None, job split.
_Item = tuple[_Buffer, _Buffer, int, Any, "bool | None"]


class _OrderedFileHashing:
    """Chunks joining their file's sha256 in batch order, on whichever worker is free.

    A file of several chunks may span batches compressed at the same time;
    its digest needs its chunks in order.  A batch hands over its chunks
    when compressed (:meth:`ready`); the thread that finds the next batch in
    order ready applies it, and any ready after it, without waiting for
    anything, so no worker blocks and the producing thread never hashes.
    :meth:`wait` returns once every batch up to a given one is applied.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ready: dict[int, list[tuple[Any, _Buffer]]] = {}
        self._next = 0  # the next batch to apply
        self._busy = False

    def ready(self, index: int, updates: list[tuple[Any, _Buffer]]) -> None:
        with self._cond:
            self._ready[index] = updates
            if self._busy:
                return  # the applying thread picks it up
            self._busy = True
        while True:
            with self._cond:
                work = self._ready.pop(self._next, None)
                if work is None:
                    self._busy = False
                    return
            try:
                for digest, data in work:
                    digest.update(data)
            finally:
                with self._cond:
                    self._next += 1
                    self._cond.notify_all()

    def wait(self, index: int) -> None:
        """Block until batches ``0..index`` are applied."""
        with self._cond:
            while self._next <= index:
                self._cond.wait()


def _compress_batch(
    frames: list[_Item],
    index: int,
    *,
    compress_frames: FramesCompressor,
    chunker: Any,
    merge: bool,
    hashing: _OrderedFileHashing,
    checksum: bool = False,
) -> _Batch:
    """The frames compressed and joined, each one's length and the sha256 of its chunk.

    The digest is ``""`` for a frame with no chunk.  The first chunk of
    each window of a file of several chunks brings the window's chunks to
    join their file's digest, in order (see :class:`_OrderedFileHashing`).
    A *job* (a whole file, ``split`` not ``None``) is cut here
    (:func:`plan_chunks`) into one frame per chunk, the last followed by the
    job's ``data`` when ``merge``; its plan (chunk lengths, and the file's
    digest when it has several) comes back too.
    """
    payloads: list[_Buffer] = []
    digests: list[str] = []
    plans: list[tuple[list[int], str] | None] = []
    updates: list[tuple[Any, _Buffer]] = []
    try:
        for head, data, chunk_size, file_update, split in frames:
            if split is not None:
                plans.append(
                    _cut_job(chunker, head, data, payloads, digests, merge=merge, split=split)
                )
                continue
            plans.append(None)
            payload = head if not data else b"".join((head, data))
            digest = ""
            if chunk_size:
                chunk = head if chunk_size == len(head) else memoryview(head)[:chunk_size]
                digest = "sha256:" + hashlib.sha256(chunk).hexdigest()
                if file_update is not None:
                    updates.append(file_update)
            payloads.append(payload)
            digests.append(digest)
    finally:
        hashing.ready(index, updates)
    blob, lengths = compress_frames(payloads)
    return blob, lengths, digests, plans, _crc32(blob) if checksum else -1


def _cut_job(
    chunker: Any,
    content: _Buffer,
    data: _Buffer,
    payloads: list[_Buffer],
    digests: list[str],
    *,
    merge: bool,
    split: bool,
    joined: memoryview | None = None,
) -> tuple[list[int], str]:
    """A whole file's chunks as frames (appended to ``payloads``/``digests``); its plan.

    ``joined``, when given, is ``content`` then ``data`` in one buffer (a
    packed batch holds them back to back): the last chunk's frame is a view
    of it instead of a copy.
    """
    if not split and len(content) <= CHUNK_MIN:
        # One chunk, as plan_chunks would say, without a copy or the chunker.
        digests.append("sha256:" + hashlib.sha256(content).hexdigest())
        if merge and data:
            payloads.append(b"".join((content, data)) if joined is None else joined)
        else:
            payloads.append(content)
        return [len(content)], ""
    # Searched in place when it is bytes or writable (a worker's batch), else copied.
    window = content
    lengths = plan_chunks(chunker, window, last=True, split_references=split)
    view = memoryview(window)
    start = 0
    for length in lengths:
        chunk = view[start : start + length]
        start += length
        digests.append("sha256:" + hashlib.sha256(chunk).hexdigest())
        if start == len(window) and merge and data:
            payloads.append(b"".join((chunk, data)) if joined is None else joined[start - length :])
        else:
            payloads.append(chunk)
    file_digest = "sha256:" + hashlib.sha256(window).hexdigest() if len(lengths) > 1 else ""
    return lengths, file_digest


#: A frame in a packed batch (see :func:`compress_packed`): head length,
#: data length, chunk size, and -1 (not a job) or the job's split (0 or 1).
PACKED_FRAME = struct.Struct("<qqqq")


def new_chunker() -> Any:
    """A content-defined chunker with this module's parameters (its calls keep no state)."""
    return _new_chunker()


def compress_packed(
    payload: _Buffer,
    table: bytes,
    *,
    compress_frames: FramesCompressor,
    chunker: Any,
    merge: bool,
    places: bytes = b"",
    shared: memoryview | None = None,
    shared_fd: int = -1,
    checksum: bool = False,
) -> _Batch:
    """A batch packed into one buffer, compressed as :func:`_compress_batch` would.

    ``payload`` holds each frame's head then data, back to back; ``table``
    one :data:`PACKED_FRAME` per frame.  ``places``, when given, says in
    int64s where each frame is: -1, in ``payload``; an offset, whole at that
    offset in ``shared`` (the pool's shared memory); -2 then a count ``n``
    and ``n`` (offset, length) pairs, in those pieces of ``shared`` (a file
    read across blocks), joined here.  Without ``shared``, ``shared_fd``
    (-1: none) is the shared memory's file, read with ``pread`` (a worker
    the kernel would not let map it): the same frames.  What a worker
    process runs (:mod:`nixery_core.frame_processes`): chunks of files of
    several chunks join their file's digest in the calling process instead.
    """
    view = memoryview(payload)
    payloads: list[_Buffer] = []
    digests: list[str] = []
    plans: list[tuple[list[int], str] | None] = []
    pos = 0
    where = _Places(places, shared, shared_fd)
    for head_len, data_len, chunk_size, job in PACKED_FRAME.iter_unpack(table):
        size = head_len + data_len
        frame = where.next(size)
        if frame is None:
            frame = view[pos : pos + size]
            pos += size
        if job >= 0:
            split = bool(job)
            plans.append(
                _cut_job(
                    chunker, frame[:head_len], frame[head_len:], payloads, digests,
                    merge=merge, split=split, joined=frame,
                )
            )
        else:
            plans.append(None)
            payloads.append(frame)
            digests.append(
                "sha256:" + hashlib.sha256(frame[:chunk_size]).hexdigest() if chunk_size else ""
            )
    if not where.done():
        raise LayerError("more places than frames in a packed batch")
    if pos != len(payload):
        raise LayerError(f"a packed batch of {len(payload)} bytes has a table for {pos}")
    blob, lengths = compress_frames(payloads)
    return blob, lengths, digests, plans, _crc32(blob) if checksum else -1


class _Places:
    """Reads the ``places`` of :func:`compress_packed`, frame by frame."""

    def __init__(self, places: bytes, shared: memoryview | None, shared_fd: int = -1) -> None:
        self._places = array.array("q", places)
        self._shared = shared
        self._fd = shared_fd
        self._at = 0

    def _take(self) -> int:
        if self._at >= len(self._places):
            raise LayerError("fewer places than frames in a packed batch")
        self._at += 1
        return self._places[self._at - 1]

    def _slice(self, at: int, size: int) -> memoryview:
        shared = self._shared
        if at >= 0 and size >= 0:
            if shared is not None and at + size <= len(shared):
                return shared[at : at + size]
            if shared is None and self._fd >= 0:  # the file, where it could not be mapped
                piece = os.pread(self._fd, size, at)
                if len(piece) == size:
                    return memoryview(piece)
        raise LayerError(f"a frame at {at} outside the shared memory")

    def next(self, size: int) -> memoryview | None:
        """The next frame (``size`` bytes) in shared memory, or ``None``: it is in the payload."""
        if not self._places:
            return None
        at = self._take()
        if at == -1:
            return None
        if at != -2:
            return self._slice(at, size)
        count = self._take()
        pieces = [self._slice(self._take(), self._take()) for _ in range(count)]
        if sum(len(piece) for piece in pieces) != size:
            raise LayerError(f"a frame of {size} bytes placed in pieces of another size")
        return memoryview(b"".join(pieces))

    def done(self) -> bool:
        """Whether every place was read (none left over)."""
        return self._at == len(self._places)


_NUL = 0
_EMPTY_DIGEST = "sha256:" + hashlib.sha256(b"").hexdigest()
_HEADER = 512


def _octal(field: bytes) -> int:
    text = field.split(b"\0", 1)[0].strip(b" ")
    return int(text, 8) if text else 0


class Updated(Protocol):
    """What a :data:`Defer` queue feeds: something taking bytes, in order."""

    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...


#: Queues ``target.update(data)`` to run later, in order with every call queued before, on
#: whichever thread applies the queue (a chunked layer's: the one hashing its ``diff_id``).
Defer = Callable[[Updated, bytes | bytearray | memoryview], None]


class FragmentRecorder(Protocol):
    """Where a recorded fragment's bytes go (a :class:`~nixery_core.fragments.FragmentWriter`).

    It promises: :meth:`add` takes the compressed bytes in order,
    :meth:`commit` keeps them with the uncompressed size given, and
    :meth:`discard` drops them.  A frames recorder's :attr:`offset` is set
    to where its first byte is in the layer blob before that byte is added
    (what keeping the frames as a byte range of the blob needs).  :attr:`key`
    names the fragment (its cache key) where a failure to record it is logged.
    """

    key: str
    offset: int | None

    def add(self, piece: bytes) -> None: ...

    def commit(self, uncompressed_size: int) -> None: ...

    def discard(self) -> None: ...


@attrs.define
class _Fragment:
    """A fragment being recorded: its recorders and where it starts and ends."""

    frames: FragmentRecorder
    toc: FragmentRecorder
    tar_start: int
    #: The packer's queue off the packing thread (see :attr:`frames_defer`).
    defer: Defer | None = None
    #: Its TOC part: each of its entries' JSON as the layer's TOC gets it.
    toc_part: TocPartWriter = attrs.Factory(lambda self: TocPartWriter(self.toc), takes_self=True)
    tar_end: int = 0
    #: Recording it failed: nothing of it is kept (:meth:`fail`).
    failed: bool = attrs.field(init=False, default=False)
    #: ``defer`` where its frames' recorder only checksums them (a range of the blob:
    #: ``checksums_only``), so that is done in the queue too, its commit (and its TOC
    #: part's, so that a failure of either drops both) queued after it.
    frames_defer: Defer | None = attrs.field(
        init=False,
        default=attrs.Factory(
            lambda self: self.defer if getattr(self.frames, "checksums_only", False) else None,
            takes_self=True,
        ),
    )
    #: A deferred frames recorder's ``add_checksummed(size, crc)``, when it has one: bytes
    #: given by their CRC-32 (a whole batch's, taken where it was compressed).
    frames_combine: Callable[[int, int], None] | None = attrs.field(
        init=False,
        default=attrs.Factory(
            lambda self: (
                getattr(self.frames, "add_checksummed", None)
                if self.frames_defer is not None
                else None
            ),
            takes_self=True,
        ),
    )

    def add_frames(
        self, blob: bytes, start: int = 0, end: int | None = None, crc: int = -1
    ) -> None:
        """Compressed bytes of its frames, ``blob[start:end]``, in order, to its frames' recorder.

        A recorder that only checksums them (deferred) gets a view of the
        batch's bytes, not a copy (about 40 MB of the 120 MB of a cold
        eStargz pack of the 300 MB corpus into ranges were copied to be
        CRC'd and dropped); one that keeps them gets bytes of their own.
        ``crc`` (-1: unknown) is the CRC-32 of the whole ``blob``, taken
        where it was compressed: a deferred recorder given the whole batch
        then only combines it (``add_checksummed``) instead of reading the
        bytes again (about two thirds of a cold pack's compressed bytes).
        """
        if self.frames_defer is not None:
            if start or (end is not None and end != len(blob)):
                self.frames_defer(_Adding(self), memoryview(blob)[start:end])
            else:
                self.frames_defer(_Adding(self, crc), blob)
        else:
            self.frames.add(blob[start:end])

    def commit(self) -> None:
        """Its frames were all added and its TOC part's entries too: keep both (after the
        frames' additions queued, if deferred)."""
        if self.frames_defer is not None:
            self.frames_defer(_Committing(self), b"")
        else:
            self.keep()

    def keep(self) -> None:
        """Keep its frames, then its TOC part: a failure to keep either (the cache's
        writing thread cannot be started, a bug) drops both, logged; the pack goes on
        (the cache only saves work, and one part is of no use without the other).

        A range's commit is withdrawn until its layer is stored; a copy's is withdrawn
        from the cache's queue, or its row deleted once written (``FragmentWriter.discard``).
        """
        if self.failed:
            self.dispose()
            return
        try:
            self.frames.commit(self.tar_end - self.tar_start)
            self.toc_part.commit()
        except Exception as exc:  # noqa: BLE001 - a recording's failure is a miss, never the pack's
            self.fail(exc)

    def fail(self, exc: Exception) -> None:
        """Recording it failed: drop what it recorded (once), logged."""
        if not self.failed:
            self.failed = True
            log.warning("fragment %s not kept: recording it failed (%s)", self.frames.key, exc)
        self.dispose()

    def dispose(self) -> None:
        self.frames.discard()
        self.toc_part.discard()


class _Adding:
    """A deferred frames recorder's next compressed bytes (see :attr:`_Fragment.defer`),
    or, ``crc`` given (not -1) and the recorder able to combine it, a whole batch given
    by the CRC-32 its compressing worker took (see :meth:`_Fragment.add_frames`); a
    failure drops the fragment (:meth:`_Fragment.fail`), never the pack."""

    __slots__ = ("crc", "fragment")

    def __init__(self, fragment: _Fragment, crc: int = -1) -> None:
        self.fragment = fragment
        self.crc = crc

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        fragment = self.fragment
        if fragment.failed:
            return
        combine = fragment.frames_combine
        try:
            if self.crc >= 0 and combine is not None:
                combine(len(data), self.crc)
            else:
                fragment.frames.add(data)  # type: ignore[arg-type]  # add_frames queued bytes or a view
        except Exception as exc:  # noqa: BLE001 - a recording's failure is a miss, never the pack's
            fragment.fail(exc)


class _Committing:
    """A deferred fragment's commit, queued after its frames' last bytes (see
    :meth:`_Fragment.keep`)."""

    __slots__ = ("fragment",)

    def __init__(self, fragment: _Fragment) -> None:
        self.fragment = fragment

    def update(self, _data: bytes | bytearray | memoryview, /) -> None:
        self.fragment.keep()

    def drop(self) -> None:
        """Dropped unapplied (the pack failed): nothing of the fragment is kept."""
        self.fragment.dispose()


_NOTHING: _Batch = (b"", [], [], [], -1)


@attrs.define
class _InFlight:
    """A batch of frames being compressed, or a marker between batches, in output order."""

    frames: list[_Frame]
    #: The batch's number (file digests are applied in this order); -1 for a marker.
    index: int
    result: _Batch | Future[_Batch]
    #: Uncompressed bytes of the batch.
    size: int = 0
    #: Its chunks joining their files' digests, when the batch went to a worker process.
    hashing: Future[None] | None = None


class ChunkedCompressor:
    """Tar bytes in (no end-of-archive), framed and compressed bytes out.

    Use like a :class:`~nixery_core.compression.StreamCompressor`:
    :meth:`compress` returns compressed bytes in order; :meth:`finish`
    hands the rest over as it is made (the frames still in flight, then the
    format's trailer), with the tar bytes the format adds (for the
    ``diff_id``), and returns the manifest annotations.
    """

    def __init__(
        self,
        fmt: FrameFormat,
        *,
        mtime: int,
        executor: Executor | None,
        threads: int,
        processes: BatchProcesses | None = None,
        settings: tuple[str, int, str] = ("", 0, ""),
        shared: SharedSlots | None = None,
        defer: Defer | None = None,
    ) -> None:
        self._fmt = fmt
        #: Where recorded fragments' ranges are checksummed and committed, in order, off this
        #: thread (the packer's diff_id hashing queue); ``None``: here.
        self._defer = defer
        self._executor = executor
        # Big files' windows are cut in shared memory, and frames found whole
        # there go to the workers by place, not through their sockets.
        self._shared = shared if processes is not None else None
        # Batches go to worker processes when given (compression and hashing
        # then never wait for Python's lock); files of several chunks are
        # still hashed here, on the executor.
        self._processes = processes
        self._settings = settings
        # Bounded by bytes, not batches: a batch with a whole file in it (a
        # job) takes longer than one of chunks, and others go on meanwhile.
        self._max_in_flight = 4 * max(1, threads) * BATCH_BYTES
        # With worker processes, batches compressed but not collected yet
        # (waiting behind an older one) count up to this (see _room_for_more).
        self._max_held = _HELD * self._max_in_flight
        self._modtime = modtime_rfc3339(mtime)
        self._chunker = _new_chunker()
        # Parser state.
        self._buf = bytearray()
        self._pax: dict[bytes, bytes] = {}
        self._pax_size = 0
        self._pax_left = 0
        self._pax_bytes = bytearray()
        self._remaining = 0  # content bytes of the current file still to come
        self._padding = 0  # padding after the current file's content
        #: Content held back, not yet cut into chunks (a view of the last window's buffer).
        self._window: _Buffer = b""
        #: Buffers big files were cut in, oldest first, until released and filled again.
        self._window_buffers: deque[bytearray] = deque()
        #: Content after the window, as given (views of buffers never changed again).
        self._pending: list[_Buffer] = []
        self._pending_bytes = 0
        self._split = False  # whether the current file's store references get chunks of their own
        self._file: dict[str, Any] | None = None
        self._file_digest: Any = None
        self._chunk_offset = 0
        self._chunks_of_file = 0
        #: Headers announced by the writer, not parsed yet: (tar offset, bytes, fields).
        self._known: deque[tuple[int, bytes, HeaderFields]] = deque()
        # Framing state.
        self._meta = _Frame(bytearray())
        self._batch: list[_Frame] = []
        self._batch_bytes = 0
        self._in_flight: deque[_InFlight] = deque()
        self._bytes_in_flight = 0
        # Fragments (see begin_fragment): the one being cut, the one being collected,
        # and every one not yet committed (discarded on close).
        self._cutting_fragment: _Fragment | None = None
        self._collecting_fragment: _Fragment | None = None
        self._fragments: list[_Fragment] = []
        #: Fragments whose every frame is collected, kept once their entries are spooled.
        self._closed: deque[_Fragment] = deque()
        #: A fragment begun whose first frame is not queued yet, and the last frame queued:
        #: a fragment's first and last frames say where it starts and ends in the output,
        #: so its boundaries cut no batch.
        self._opening: _Fragment | None = None
        self._last_queued: _Frame | None = None
        self._submitted = 0
        self._file_hashing = _OrderedFileHashing()
        self._offset = 0
        self._tar_size = 0
        #: TOC entries in order, not yet spooled: the first ones still wait
        #: for their frames (those marked _WAIT), the rest come after them.
        self._entries: deque[dict[str, Any]] = deque()
        self._toc = TocSpool()

    # --- input ---------------------------------------------------------------

    def compress(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Take more of the tar stream; the compressed bytes ready so far, in order.

        ``data`` must never change after this call: pieces of it are kept
        (as views, not copies) until they are compressed.
        """
        out = self._cut(data)
        self._spool_final()
        return out

    def announce(self, pending: int, header: bytes, fields: HeaderFields) -> None:
        """The writer's word for a header still to come, ``pending`` bytes after those given.

        ``header`` is a whole member header (pax header included) and
        ``fields`` what it says.  When the parser reaches that offset and
        finds those very bytes there, it takes the fields instead of parsing
        them back (the same entry, less work); anything else is parsed.
        """
        self._known.append((self._tar_size + pending, header, fields))

    # --- fragments ---------------------------------------------------------------

    def begin_fragment(
        self, frames: FragmentRecorder | None = None, toc: FragmentRecorder | None = None
    ) -> list[bytes]:
        """Start a fragment (a store path): no frame spans its start or its end.

        Every byte given from here to :meth:`end_fragment` is framed on its
        own, so the fragment's compressed bytes are the same wherever it sits
        in a layer.  With recorders, those bytes go to ``frames`` (committed
        with the fragment's uncompressed size; its ``offset`` set to where
        they start in the blob) and, to ``toc`` as a TOC part, that offset and
        its TOC entries as the layer's TOC gets them
        (:class:`~nixery_core.fragment_toc.TocPartWriter`, committed with its
        uncompressed size once they are all spooled): what
        :meth:`put_fragment` takes back.  Returns
        compressed bytes ready, like :meth:`compress`.
        """
        out: list[bytes] = []
        self._begin(out, None if frames is None or toc is None else (frames, toc))
        self._spool_final()
        return out

    def end_fragment(self) -> list[bytes]:
        """End the fragment :meth:`begin_fragment` started (the stream must be between members)."""
        out: list[bytes] = []
        self._end(out)
        self._spool_final()
        return out

    def put_fragment(
        self, lines: Iterable[bytes], uncompressed_size: int, compressed_size: int
    ) -> list[bytes] | None:
        """Start copying a recorded fragment: its TOC part's ``lines``, taken one at a time.

        ``lines`` are the part as recorded (:mod:`nixery_core.fragment_toc`:
        where the fragment started in the layer it was recorded in, then its
        entries as that layer's TOC holds them), from an iterable that raises
        :class:`ValueError` where it finds its part damaged, or
        :class:`~nixery_core.errors.LayerError` where its cached file changed
        since its check.  Every batch still in flight is collected first, so
        where the fragment lands is known and each entry joins the TOC moved
        there as soon as it is read: memory holds one entry, whatever the
        store path's number of files.  The fragment's ``compressed_size``
        bytes follow, in order, through :meth:`put_compressed`.

        Returns the compressed bytes ready, or ``None`` when the TOC part is
        damaged (a line that is not an entry, offsets outside the fragment,
        a part that does not read to its end): the entries taken from it are
        taken back and the caller packs the store path instead.
        """
        out: list[bytes] = []
        self._boundary(out, marker=True)
        self._collect(out, wait=True)
        self._spool_final()
        if self._entries:  # pragma: no cover - every frame before is collected
            raise LayerError("a TOC entry still waits for its frame before a copied fragment")
        toc = self._toc
        mark = toc.mark()
        try:
            lines = iter(lines)
            start = _toc_part_start(next(lines, b""))
            move, end = self._offset - start, start + compressed_size
            for line in lines:
                group = _loads_entries(line, start, end)
                if move:
                    for entry in group:
                        if "offset" in entry:
                            entry["offset"] += move
                        if "endOffset" in entry:
                            entry["endOffset"] += move
                toc.add_many(compact_json(group)[1:-1], len(group))
        except (ValueError, LayerError) as exc:  # LayerError: its file changed since its check
            toc.rewind(mark)
            log.warning("a cached fragment's TOC part is damaged (%s); packing it", exc)
            return None
        self._tar_size += uncompressed_size
        return out

    def put_compressed(self, piece: bytes) -> list[bytes]:
        """Copy compressed bytes of the fragment :meth:`put_fragment` started."""
        out: list[bytes] = []
        self._marker(out, _InFlight([], -1, (piece, [], [], [], -1)))
        self._spool_final()
        return out

    def _boundary(self, out: list[bytes], *, marker: bool) -> None:
        """No frame spans this point; with ``marker``, no batch either (a marker follows)."""
        if self._inside_member():
            raise LayerError("a fragment boundary inside a tar member")
        self._seal_meta(out)
        if marker:
            self._submit(out)

    def _inside_member(self) -> bool:
        """Whether the stream so far stops inside a tar member (header, pax, content, padding)."""
        return bool(self._remaining or self._padding or self._buf or self._pax or self._pax_left)

    def _marker(self, out: list[bytes], item: _InFlight) -> None:
        self._in_flight.append(item)
        self._collect(out, wait=False)

    def _begin(
        self, out: list[bytes], recording: tuple[FragmentRecorder, FragmentRecorder] | None
    ) -> None:
        self._boundary(out, marker=False)
        if recording is None:
            return
        fragment = _Fragment(
            *recording, tar_start=self._tar_size,
            defer=self._defer,
        )
        self._fragments.append(fragment)
        self._cutting_fragment = self._opening = fragment

    def _end(self, out: list[bytes]) -> None:
        self._boundary(out, marker=False)
        fragment, self._cutting_fragment = self._cutting_fragment, None
        if fragment is None:
            return
        fragment.tar_end = self._tar_size
        last = self._last_queued
        if self._opening is fragment or last is None:  # pragma: no cover - a path has a header
            self._opening = None
            self._fragments.remove(fragment)
            fragment.dispose()
        elif last.collected:  # its last frame is out already: so is every other
            if self._collecting_fragment is fragment:
                self._collecting_fragment = None
            self._closed.append(fragment)
        else:
            last.closes = fragment

    def _commit_closed(self) -> None:
        """Keep the recorded fragments whose frames are all collected and entries spooled.

        A fragment's entries are spooled in TOC order, after every entry
        before them: its last one is spooled once the first entry waiting is
        no longer one of its own.
        """
        closed, entries = self._closed, self._entries
        while closed:
            fragment = closed[0]
            if entries and entries[0].get(_PART) is fragment.toc_part:
                return
            closed.popleft()
            self._fragments.remove(fragment)
            fragment.commit()

    def _cut(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        out: list[bytes] = []
        view = memoryview(data)
        self._tar_size += len(view)
        while view:
            if self._remaining:
                take = min(self._remaining, len(view))
                self._content(view[:take], out)
                view = view[take:]
            elif self._padding:
                take = min(self._padding, len(view))
                self._meta.data += view[:take]
                self._padding -= take
                view = view[take:]
            elif self._pax_left:
                take = min(self._pax_left, len(view))
                self._meta.data += view[:take]
                self._pax_bytes += view[:take]
                self._pax_left -= take
                view = view[take:]
                if not self._pax_left:
                    self._pax = _parse_pax(bytes(self._pax_bytes[: self._pax_size]))
            else:
                # Not after a pax header of its own: that one speaks for the next header.
                if self._known and not self._buf and not self._pax:
                    taken = self._take_known(view, out)
                    if taken:
                        view = view[taken:]
                        continue
                need = _HEADER - len(self._buf)
                self._buf += view[:need]
                view = view[need:]
                if len(self._buf) == _HEADER:
                    self._header(out)
        return out

    def _take_known(self, view: memoryview, out: list[bytes]) -> int:
        """An announced header at the start of ``view``, taken whole; its length (0: none)."""
        known = self._known
        at = self._tar_size - len(view)
        while known and known[0][0] < at:
            known.popleft()  # not written where announced (or parsed in pieces)
        if not known or known[0][0] != at:
            return 0
        _, header, fields = known[0]
        size = len(header)
        if len(view) < size or view[:size] != header:
            return 0  # across a block boundary: parsed
        known.popleft()
        name, mode, size_field, typeflag, uid, gid, linkname = fields
        entry: dict[str, Any] = {
            "name": name.decode("utf-8", "surrogateescape"),
            "type": "",
            "mode": mode,
            "uid": uid,
            "gid": gid,
            "modtime": self._modtime,
        }
        self._meta.data += header
        if len(self._meta.data) >= _META_LIMIT:
            self._seal_meta(out)
        self._member(entry, typeflag, size_field, linkname, out)
        return size

    def finish(self, write: Sink, tar: Sink) -> Annotations:
        """End the layer: the compressed bytes still to come to ``write``, in order, in pieces.

        The frames still in flight, then the format's trailer (TOC and
        footer), streamed from the spool: memory does not grow with the
        number of entries.  The tar bytes the format adds after the stream
        (eStargz's TOC member, the end-of-archive blocks) go to ``tar``, in
        order.  Returns the annotations for the layer's descriptor.
        """
        out: list[bytes] = []
        if self._inside_member():
            raise LayerError("tar stream ended inside a member")
        self._seal_meta(out)
        self._submit(out)
        while True:
            for piece in out:
                write(piece)
            out.clear()
            if not self._in_flight:
                break
            self._collect(out, wait=True)
        self._spool_final()
        if self._entries:  # pragma: no cover - every frame is collected
            raise LayerError("a TOC entry still waits for its frame at the end")
        try:
            return self._fmt.trailer(self._toc, self._offset, self._tar_size, write, tar)
        finally:
            self._toc.close()

    def _add_entry(self, entry: dict[str, Any]) -> None:
        """A new TOC entry, in order (its JSON also to the TOC part of the fragment being cut)."""
        if self._cutting_fragment is not None:
            entry[_PART] = self._cutting_fragment.toc_part
        self._entries.append(entry)

    def _spool_final(self) -> None:
        """Serialize and spool the entries at the front that are final.

        Called only between public calls: a file's entry is final once its
        last frame is collected *and* the parser has finished the file
        (one-chunk files lose their chunk fields then).
        """
        _spool_front(self._entries, self._toc, self._fmt.toc_keys)
        self._commit_closed()

    def _dispose(self) -> None:
        """Drop the TOC: entries waiting and the spool."""
        self._entries.clear()
        self._toc.close()

    def close(self) -> None:
        """Stop: batches not started are cancelled, fragments not committed dropped."""
        while self._in_flight:
            item = self._in_flight.popleft()
            if isinstance(item.result, Future):
                item.result.cancel()
            if item.hashing is not None:
                item.hashing.cancel()
        for fragment in self._fragments:
            fragment.dispose()
        self._fragments.clear()
        self._closed.clear()
        self._dispose()

    # --- tar parsing -----------------------------------------------------------

    def _header(self, out: list[bytes]) -> None:
        block = bytes(self._buf)
        self._buf.clear()
        if block.count(_NUL) == _HEADER:
            raise LayerError("unexpected end-of-archive block inside the layer stream")
        typeflag = block[156:157]
        size = _octal(block[124:136])
        if typeflag == b"x":
            # The pax payload (and its padding) follows; it belongs to the next member.
            self._meta.data += block
            self._pax_size = size
            self._pax_left = size + (-size % _HEADER)
            self._pax_bytes = bytearray()
            return
        pax, self._pax = self._pax, {}
        name = pax.get(b"path")
        if name is None:
            name = block[:100].split(b"\0", 1)[0]
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        linkname = pax.get(b"linkpath", block[157:257].split(b"\0", 1)[0])
        if b"size" in pax:
            size = int(pax[b"size"])
        entry: dict[str, Any] = {
            "name": name.decode("utf-8", "surrogateescape"),
            "type": "",
            "mode": _octal(block[100:108]),
            "uid": int(pax.get(b"uid", b"%d" % _octal(block[108:116]))),
            "gid": int(pax.get(b"gid", b"%d" % _octal(block[116:124]))),
            "modtime": self._modtime,
        }
        self._meta.data += block
        if len(self._meta.data) >= _META_LIMIT:
            self._seal_meta(out)
        self._member(entry, typeflag, size, linkname, out)

    def _member(
        self, entry: dict[str, Any], typeflag: bytes, size: int, linkname: bytes, out: list[bytes]
    ) -> None:
        """A member whose header is in the metadata: its TOC entry, and its content expected."""
        if typeflag in (b"0", b"\0"):
            entry["type"] = "reg"
            entry["size"] = size
            if size:
                self._start_file(entry, size, out)
            else:
                entry["digest"] = _EMPTY_DIGEST
            self._add_entry(entry)
        elif typeflag == b"5":
            entry["type"] = "dir"
            self._add_entry(entry)
        elif typeflag in (b"1", b"2"):
            entry["type"] = "hardlink" if typeflag == b"1" else "symlink"
            entry["linkName"] = linkname.decode("utf-8", "surrogateescape")
            self._add_entry(entry)
        else:
            raise LayerError(f"tar member type {typeflag!r} is not supported in chunked layers")

    # --- file content ----------------------------------------------------------

    def _start_file(self, entry: dict[str, Any], size: int, out: list[bytes]) -> None:
        entry[_WAIT] = True  # until its last frame is collected
        self._file = entry
        self._split = size >= REFERENCE_SPLIT_MIN
        self._remaining = size
        self._padding = -size % _HEADER
        self._chunk_offset = 0
        self._chunks_of_file = 0
        # The metadata before this file's content becomes (or ends) a frame.
        self._seal_meta(out)

    def _content(self, data: memoryview, out: list[bytes]) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        self._remaining -= len(data)
        last = not self._remaining
        if not last and len(self._window) + self._pending_bytes < _WINDOW:
            return
        if last and self._chunk_offset == 0:
            self._job(out)
            return
        # One copy of each byte into one buffer the chunker can scan.
        view = self._fill_window()
        self._pending = []
        self._pending_bytes = 0
        lengths = plan_chunks(self._chunker, view, last=last, split_references=self._split)
        run = view[: sum(lengths)]  # what the chunks cover: joins the file's hash at once
        start = 0
        # Chunks are views of the window, never copied: its buffer is not
        # written again while anything refers to it (_window_buffer).
        for length in lengths:
            chunk_last = last and start + length == len(view)
            self._chunk(
                view[start : start + length], out, last=chunk_last, run=None if start else run
            )
            start += length
        self._window = view[start:] if start < len(view) else b""
        if last:
            self._end_file(out)

    def _fill_window(self) -> memoryview:
        """The content held back, then the pieces pending, copied into one buffer."""
        size = len(self._window) + self._pending_bytes
        buffer = self._window_buffer(size)
        at = 0
        for piece in (self._window, *self._pending):
            buffer[at : at + len(piece)] = piece
            at += len(piece)
        return memoryview(buffer)[:size]

    def _window_buffer(self, size: int) -> bytearray | mmap.mmap:
        """A buffer of at least ``size`` bytes: the oldest one released since its use, or a new one.

        A buffer is released when nothing but this list refers to it: every
        chunk cut in it (a view of it, waiting in a batch, in a worker's
        socket or for its file's hashing) counts in its reference count.
        Reusing them spares a new multi-megabyte buffer, zeroed and faulted
        in, for every window of a big file.
        """
        size = max(size, _WINDOW + BATCH_BYTES)
        if self._shared is not None:
            slot = self._shared.take(size)
            if slot is not None:
                return slot
        buffers = self._window_buffers
        if buffers:
            oldest = buffers[0]
            if len(oldest) >= size and released(oldest):
                buffers.rotate(-1)
                return oldest
            if len(buffers) >= _WINDOW_BUFFERS:
                buffers.popleft()  # still held: the holder keeps it alive, not us
        buffer = bytearray(size)
        buffers.append(buffer)
        return buffer

    def _job(self, out: list[bytes]) -> None:
        """The whole file is here: it is cut on a worker, with its batch (_cut_job)."""
        file = self._file
        if file is None:  # pragma: no cover - content only comes after a header
            raise LayerError("file content outside a file")
        pending = self._pending
        content: _Buffer | _Pieces
        if len(pending) == 1:
            content = pending[0]
        elif self._processes is not None:
            content = _Pieces(pending)  # sent as they are: never joined here
        else:
            content = b"".join(pending)
        self._pending = []
        self._pending_bytes = 0
        frame = _Frame(bytearray(), content, job=(file, self._split))
        if self._fmt.merge_metadata:
            # The headers that follow join its last chunk's frame.
            self._seal_meta(out, frame)
        else:
            self._queue(frame, out)
        self._file = None

    def _chunk(
        self, data: memoryview, out: list[bytes], *, last: bool, run: memoryview | None
    ) -> None:
        """A chunk of the current file; ``run``, for a window's first chunk, is all it emits."""
        file = self._file
        if file is None:  # pragma: no cover - content only comes after a header
            raise LayerError("file content outside a file")
        if self._chunk_offset == 0:
            entry = file
            # Files of one chunk take their digest from the chunk's; others
            # hash their windows' chunks in order on the pool (_OrderedFileHashing).
            self._file_digest = None if last else hashlib.sha256()
        else:
            entry = {"name": file["name"], "type": "chunk"}
            self._add_entry(entry)
        entry["chunkOffset"] = self._chunk_offset
        entry["chunkSize"] = len(data)
        self._chunks_of_file += 1
        self._chunk_offset += len(data)
        frame = _Frame(
            bytearray(),
            data,
            starts=[entry],
            ends=[entry],
            chunk=entry,
            chunk_size=len(data),
            file_hash=None if run is None else self._file_digest,
            file_update=run,
            file_end=(file, self._file_digest) if last and self._file_digest is not None else None,
            final=file if last else None,
        )
        if self._fmt.merge_metadata:
            # The headers that follow join this frame (see FrameFormat.merge_metadata).
            self._seal_meta(out, frame)
        else:
            self._queue(frame, out)

    def _end_file(self, out: list[bytes]) -> None:
        file = self._file
        if file is None:  # pragma: no cover - only called at a file's end
            raise LayerError("file end outside a file")
        if self._chunks_of_file == 1:
            # A one-chunk file: its digest says it all, as containers-storage
            # writes it; the chunk's digest becomes the file's when it is known.
            del file["chunkOffset"], file["chunkSize"]
        # A file of several chunks gets its digest when its last chunk is collected.
        self._file = None
        self._file_digest = None

    # --- frames and batches ------------------------------------------------------

    def _seal_meta(self, out: list[bytes], then: _Frame | None = None) -> None:
        """Queue the metadata frame if it holds anything; ``then`` (or a new, empty one) follows.

        An empty one stays as it is (never queued, nothing refers to it): most
        calls find it so, and a new frame for each was a tenth of the frames made.
        """
        meta = self._meta
        if meta.data or meta.head or meta.starts:
            self._queue(meta, out)
            self._meta = _Frame(bytearray()) if then is None else then
        elif then is not None:
            self._meta = then

    def _queue(self, frame: _Frame, out: list[bytes]) -> None:
        if self._opening is not None:
            frame.opens, self._opening = self._opening, None
        self._last_queued = frame
        self._batch.append(frame)
        self._batch_bytes += len(frame)
        if self._batch_bytes >= BATCH_BYTES:
            self._submit(out)

    def _submit(self, out: list[bytes]) -> None:
        if not self._batch:
            return
        size = self._batch_bytes
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        index = self._submitted
        self._submitted += 1
        if self._processes is not None:
            self._submit_packed(batch, index, size, out)
            return
        payloads: list[_Item] = [
            (
                _prefix(frame.head, len(frame.head)),
                frame.data,
                frame.chunk_size,
                None if frame.file_hash is None else (frame.file_hash, frame.file_update),
                None if frame.job is None else frame.job[1],
            )
            if frame.head
            else (bytes(frame.data), b"", 0, None, None)
            for frame in batch
        ]
        for frame in batch:
            frame.handed_on()
        work = {
            "compress_frames": self._fmt.compress_frames,
            "chunker": self._chunker,
            "merge": self._fmt.merge_metadata,
            "hashing": self._file_hashing,
            "checksum": self._checksummed(),
        }
        if self._executor is None:
            self._in_flight.append(
                _InFlight(batch, index, _compress_batch(payloads, index, **work))
            )
        else:
            future = self._executor.submit(_compress_batch, payloads, index, **work)
            self._in_flight.append(_InFlight(batch, index, future, size=size))
            self._bytes_in_flight += size
        self._collect(out, wait=False)

    def _submit_packed(self, batch: list[_Frame], index: int, size: int, out: list[bytes]) -> None:
        """A batch to a worker process, packed in one buffer; its file hashing on the executor."""
        if self._processes is None:  # pragma: no cover - only called with processes
            raise LayerError("no worker processes")
        parts: list[_Buffer] = []
        table: list[int] = []
        updates: list[tuple[Any, _Buffer]] = []
        places: list[int] = []
        hold: list[memoryview] = []
        for frame in batch:
            head = frame.head
            placed = self._place(frame, places, hold)
            if head:
                if placed:
                    pass
                elif isinstance(head, _Pieces):
                    parts += head.pieces
                else:
                    parts.append(head)
                job = -1 if frame.job is None else int(frame.job[1])
                table += (len(head), len(frame.data), frame.chunk_size, job)
                if frame.file_hash is not None and frame.file_update is not None:
                    updates.append((frame.file_hash, frame.file_update))
            else:
                table += (0, len(frame.data), 0, -1)
            if not placed:
                parts.append(frame.data)
            frame.handed_on()
        packed = array.array("q", table).tobytes()
        located = array.array("q", places).tobytes() if hold else b""
        future = self._processes.submit(
            self._settings, packed, parts, located, hold, checksum=self._checksummed()
        )
        hashing: Future[None] | None = None
        if self._executor is None or not updates:
            # Nothing to hash (most batches: files of one chunk) is no task.
            self._file_hashing.ready(index, updates)
        else:
            hashing = self._executor.submit(self._file_hashing.ready, index, updates)
        self._in_flight.append(_InFlight(batch, index, future, size=size, hashing=hashing))
        self._bytes_in_flight += size
        self._collect(out, wait=False)

    def _checksummed(self) -> bool:
        """Whether a batch submitted now asks for its CRC-32: a recorded fragment whose
        frames are only checksummed is open (its frames may be in it); a pack recording
        nothing takes none."""
        return any(fragment.frames_combine is not None for fragment in self._fragments)

    def _place(self, frame: _Frame, places: list[int], hold: list[memoryview]) -> bool:
        """Where a worker finds ``frame`` in shared memory, added to ``places``; whether it does.

        Its head (a chunk, or a whole file in the pieces it was read in) then
        its data (the tar padding and headers after it) as they lie in blocks
        read into shared memory; the views read are added to ``hold``.
        """
        shared = self._shared
        head = frame.head
        if shared is not None and isinstance(head, memoryview):
            at = shared.place(head, frame.data)
            if at >= 0:
                places.append(at)
                hold.append(head)
                return True
        elif shared is not None and isinstance(head, _Pieces):
            pieces = head.pieces
            where = [-2, len(pieces)]
            for number, piece in enumerate(pieces):
                if not isinstance(piece, memoryview):
                    break
                after = frame.data if number == len(pieces) - 1 else b""
                at = shared.place(piece, after)
                if at < 0:
                    break
                where += (at, len(piece) + len(after))
            else:
                places += where
                hold += pieces  # type: ignore[arg-type]  # every one a memoryview: checked
                return True
        places.append(-1)
        return False

    def _collect(self, out: list[bytes], *, wait: bool) -> None:
        while self._in_flight:
            item = self._in_flight[0]
            pending = item.result
            if isinstance(pending, Future):
                if not (wait or pending.done()):
                    if self._bytes_in_flight <= self._max_in_flight:
                        return
                    if self._processes is not None and self._bytes_in_flight <= self._max_held:
                        if self._room_for_more():
                            return
                        continue
                batch = pending.result()
                if item.hashing is not None:
                    item.hashing.result()  # runs it here if no thread has started it
                self._bytes_in_flight -= item.size
            else:
                batch = pending
            self._in_flight.popleft()
            self._take_collected(item, batch, out)

    def _room_for_more(self) -> bool:
        """Whether the batches not compressed yet leave room for more; if not, wait for any.

        Worker processes answer in any order: while the oldest batch (a big
        file cut in one, say) is still being compressed, the other workers
        finish theirs.  Blocking on the oldest left them idle; instead the
        bound is on the bytes still to compress (:attr:`_max_in_flight`), so
        a worker done with its batches gets more at once, and on the bytes
        not yet collected (:attr:`_max_held`: those of compressed batches
        are only their output, their input given back), which waits for the
        oldest.
        """
        waiting: list[Future[_Batch]] = []
        size = 0
        for item in self._in_flight:
            result = item.result
            if isinstance(result, Future) and not result.done():
                waiting.append(result)
                size += item.size
        if size <= self._max_in_flight:
            return True
        wait_futures(waiting, return_when=FIRST_COMPLETED)
        return False

    def _take_job(
        self,
        frame: _Frame,
        plan: tuple[list[int], str],
        lengths: list[int],
        digests: list[str],
        at: int,
    ) -> int:
        """A file cut on a worker: its entry, and one entry per further chunk (after it)."""
        if frame.job is None:  # pragma: no cover - plans come only for jobs
            raise LayerError("a plan for a frame that is not a job")
        file = frame.job[0]
        sizes, file_digest = plan
        chunks = []
        chunk_offset = 0
        for number, size in enumerate(sizes):
            entry = file if number == 0 else {"name": file["name"], "type": "chunk"}
            if len(sizes) > 1:
                entry["chunkOffset"] = chunk_offset
                entry["chunkSize"] = size
            entry["chunkDigest"] = digests[at]
            entry["offset"] = self._offset
            self._offset += lengths[at]
            entry["endOffset"] = self._offset
            chunk_offset += size
            at += 1
            if number:
                chunks.append(entry)
        if file_digest:
            file["digest"] = file_digest
        if chunks:
            file[_CHUNKS] = chunks
        del file[_WAIT]
        return at

    def _take_frame(
        self, frame: _Frame, length: int, digest: str, index: int, *, hashed: bool
    ) -> bool:
        """A frame cut here: its offsets and digests into the TOC; whether ``index`` is hashed."""
        if frame.chunk is not None:
            frame.chunk["chunkDigest"] = digest
        for entry in frame.starts:
            entry["offset"] = self._offset
        self._offset += length
        for entry in frame.ends:
            entry["endOffset"] = self._offset
        if frame.file_end is not None:
            if not hashed:
                self._file_hashing.wait(index)
                hashed = True
            file, file_hash = frame.file_end
            file["digest"] = "sha256:" + file_hash.hexdigest()
        if frame.final is not None:
            del frame.final[_WAIT]
        return hashed

    def _take_collected(self, item: _InFlight, batch: _Batch, out: list[bytes]) -> None:
        """Offsets and digests of a collected batch (or marker) into the TOC; its bytes out.

        A recorded fragment's bytes go to its recorder: from its first
        frame's start to its last frame's end (a batch may hold the end of
        one and the start of the next).
        """
        blob, lengths, digests, plans, crc = batch
        base = self._offset
        if not item.frames:
            self._offset += len(blob)
        collecting, start = self._collecting_fragment, 0
        hashed = False
        at = 0  # the frame compressed, in lengths and digests
        for frame, plan in zip(item.frames, plans, strict=True):
            frame.collected = True
            if frame.opens is not None:
                collecting, start = frame.opens, self._offset - base
                collecting.frames.offset = self._offset
                collecting.toc_part.start(self._offset)
            if plan is not None:
                at = self._take_job(frame, plan, lengths, digests, at)
            else:
                hashed = self._take_frame(
                    frame, lengths[at], digests[at], item.index, hashed=hashed
                )
                at += 1
            if frame.closes is not None:
                if collecting is frame.closes:
                    collecting.add_frames(blob, start, self._offset - base, crc)
                # Kept between public calls, once its entries are spooled (_commit_closed).
                self._closed.append(frame.closes)
                collecting = None
        if blob:
            if collecting is not None:
                collecting.add_frames(blob, start, crc=crc)
            out.append(blob)
        self._collecting_fragment = collecting


_ENTRY_TYPES = frozenset({"reg", "dir", "symlink", "hardlink", "chunk"})


def _loads_escaped(toc: bytes) -> Any:
    """A TOC orjson refused (a lone surrogate escape from a non-UTF-8 name): json reads it."""
    try:
        return json.loads(toc)
    except ValueError:
        return None


def _is_entry(entry: object) -> bool:
    """Whether ``entry`` looks like a TOC entry this module wrote."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("name"), str)
        and entry.get("type") in _ENTRY_TYPES
        and all(isinstance(entry.get(k, 0), int) for k in ("offset", "endOffset", "size"))
    )


def _toc_part_start(line: bytes) -> int:
    """Where a TOC part's fragment started in its layer, from its first line; or ValueError."""
    header = orjson.loads(line)
    start = header.get("start") if isinstance(header, dict) else None
    if type(start) is not int or start < 0:
        raise ValueError(f"a TOC part that does not start with its offset: {line[:80]!r}")
    return start


def _loads_entries(line: bytes, start: int, end: int) -> list[dict[str, Any]]:
    """A TOC part's line as its entries (one or more, comma-joined), each within the fragment
    (its frame between ``start`` and ``end``) and one a TOC may hold; ValueError if not."""
    document = b"[" + line + b"]"
    try:
        group = orjson.loads(document)
    except orjson.JSONDecodeError:  # damaged, or a lone surrogate escape (json reads it)
        group = _loads_escaped(document)
    if not isinstance(group, list) or not group:
        raise ValueError(f"a line that is not TOC entries: {line[:80]!r}")
    for entry in group:
        _check_entry(entry, start, end, line)
    return cast("list[dict[str, Any]]", group)


def _check_entry(entry: object, start: int, end: int, line: bytes) -> None:
    """Raise ValueError unless ``entry`` is one a TOC may hold, its frame within the fragment."""
    if not _is_entry(entry):
        raise ValueError(f"a line that is not TOC entries: {line[:80]!r}")
    entry = cast("dict[str, Any]", entry)
    offset = entry.get("offset")
    if offset is not None and not start <= offset <= entry.get("endOffset", offset) <= end:
        raise ValueError(f"an entry outside the fragment: {line[:80]!r}")
    if "endOffset" in entry and offset is None:
        raise ValueError(f"an entry outside the fragment: {line[:80]!r}")
    if entry["type"] == "reg" and entry.get("size") and not isinstance(entry.get("digest"), str):
        raise ValueError(f"a file entry without its digest: {line[:80]!r}")


#: Where a file cut on a worker keeps its further chunks' entries until the TOC is written.
_CHUNKS = "_chunks"
#: Marks an entry whose offsets or digests are not known yet (never in the TOC).
_WAIT = "_wait"
#: The TOC part of the fragment an entry belongs to, if it is recorded (never in the TOC).
_PART = "_part"


def _spool_front(
    entries: deque[dict[str, Any]], spool: TocSpool, keys: tuple[str, ...]
) -> None:
    """Spool the entries at the front of ``entries`` that are final, as the TOC writes them.

    Each file cut on a worker is followed by its further chunks' entries.
    Entries final together are encoded in one call, up to :data:`_GROUP`
    at a time.  Those of a fragment being recorded go to its TOC part too,
    the same bytes, once the part has its first line (where the fragment
    starts, known when its first frame is collected): they wait till then.
    """
    final: list[dict[str, Any]] = []
    part: TocPartWriter | None = None
    while entries:
        entry = entries[0]
        owner = entry.get(_PART)
        if _WAIT in entry or (owner is not None and not owner.started):
            break  # its frames, or where its fragment starts, not known yet
        if owner is not part or len(final) >= _GROUP:
            _spool_group(final, spool, part)
            part = owner
        entries.popleft()
        final.append(_toc_entry(entry, keys))
        for chunk in entry.get(_CHUNKS, ()):
            if len(final) >= _GROUP:  # a line of a TOC part holds no more (its reader's bound)
                _spool_group(final, spool, part)
            final.append(_toc_entry(chunk, keys))
    _spool_group(final, spool, part)


#: Entries encoded in one call at most (a TOC part's line holds as many).
_GROUP = MAX_LINE_ENTRIES


def _spool_group(
    final: list[dict[str, Any]], spool: TocSpool, part: TocPartWriter | None
) -> None:
    """Spool ``final`` (then emptied) in one encoding: the entries comma-joined, as the list
    writes them; the same bytes to ``part``, as one line, when they are a recorded fragment's."""
    if not final:
        return
    data = compact_json(final)[1:-1]
    spool.add_many(data, len(final))
    if part is not None:
        part.add(data)
    final.clear()


def _toc_entry(entry: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The entry as the layer's TOC writes it: ``keys`` in order, a one-chunk file's digest.

    A regular file of one chunk takes its chunk's digest as its own (the
    entry itself is not changed).
    """
    if entry["type"] == "reg" and "digest" not in entry and entry.get("size"):
        entry = dict(entry)
        entry["digest"] = entry.pop("chunkDigest")
    return {key: entry[key] for key in keys if key in entry}


def _parse_pax(payload: bytes) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(payload):
        space = payload.index(b" ", pos)
        length = int(payload[pos:space])
        record = payload[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        records[key] = value
        pos += length
    return records

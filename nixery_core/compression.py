"""Streaming compressors for layer blobs: gzip (ISA-L or zlib), zstd, or none.

One job: turn a stream of uncompressed bytes into compressed bytes whose
value depends only on the input and on a :class:`CompressorSpec`, never on
how the input was split into calls, on the number of threads, or on timing.

**gzip** is compressed the way pigz does it, in independent blocks of
:data:`BLOCK_SIZE` uncompressed bytes.  Each block is raw deflate primed with
the previous block's last 32 KiB as dictionary and ends on a sync flush;
an empty final block, our own 10-byte header and the CRC-32/size trailer
frame the result as one ordinary gzip member that every gunzip, Python's
``gzip`` module, Go's ``compress/gzip`` and containerd read.  Blocks are
what make it parallel (a thread pool compresses several at once) and what
make it deterministic: ISA-L's streaming output *does* depend on how the
input is split into ``compress()`` calls (measured: four chunkings, four
different outputs), so the input is always cut at fixed offsets.

The header is pinned: ``1f 8b 08 00  00 00 00 00  00 ff`` (deflate, no flags,
mtime 0, no extra flags, OS 255 "unknown").  zlib with ``wbits=31`` would
write OS 3 and an XFL byte that depends on the level; ISA-L writes OS 255.
One header for both backends means their outputs differ only inside the
deflate blocks.

**Backends.**  ISA-L (``isal.isal_zlib``) compresses several times faster
than zlib at levels 0-3; it is a required dependency and the default
(``"auto"`` means ISA-L).  zlib (levels 0-9) is used only when asked for by
name.  The two produce different compressed bytes for the same input (the
uncompressed tar, and so the ``diff_id``, is identical), so a missing
``isal`` (or ``zstandard`` for zstd) raises
:class:`~nixery_core.errors.MissingEncoder` instead of switching encoders:
two installs sharing a bucket must agree on every digest.  To keep
"same cache key, same bytes", :meth:`CompressorSpec.parameters` names the
resolved backend, its library version and a *fingerprint*: the digest of a
fixed 96 KiB sample compressed through the same block code.  Two machines
whose compressors would disagree (another zlib build, another ISA-L version)
therefore get different cache keys instead of different bytes under one key.
ISA-L picks code paths by CPU features; upstream does not promise identical
output across them, and the fingerprint only catches a difference that the
sample shows.  The ``diff_id`` never depends on any of this.

**Default levels**, chosen on the benchmark closures (docs/performance.md):
ISA-L level 3 with memLevel 3: output 1.075x ``pigz -6``'s on the 300 MB
closure and 1.09x on the 60 MB one, the only ISA-L level within 1.10x on
both (level 2: 1.094x and 1.105x for ~15% less CPU; level 1: 1.107x and
1.12x).  zlib level 1: 1.095x ``pigz -6``, half of pigz's CPU time (level 6
takes 2.3x the CPU of level 1).  zstd level 3, zstd's own default.

**zstd** uses ``zstandard`` in its multi-threaded streaming mode with at
least one worker: that output is the same for any number of workers and any
input chunking (measured), but differs from single-threaded mode, which is
therefore never used.

**none** passes the bytes through.

**estargz** and **zstd-chunked** are file-granular layers
(:mod:`nixery_core.chunked`): their frames are compressed one-shot and
independently by :func:`frame_compressor` (an ordinary gzip member with the
pinned header, or a single-threaded zstd frame with its content size), with
the gzip backends and levels above and zstd as for ``zstd``.

**Members.**  A compressor makes one gzip member or one zstd frame.  Layers
are concatenations of several (one per store path: see
:mod:`nixery_core.fragments`), which every reader of the formats accepts.
To keep the deflate threads busy across member boundaries, compressors of
consecutive members can share one :class:`OrderedOutput`: each hands its
pieces there, finished or still being compressed, and the owner takes them
out in order, each with the tag of the member it belongs to.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from functools import cache
from types import ModuleType
from typing import Any, Literal, Protocol, runtime_checkable

import attrs

from nixery_core.errors import InvalidInput, LayerError, MissingEncoder
from nixery_core.protocols import JSONValue

__all__ = [
    "BLOCK_SIZE",
    "DEFAULT_LEVELS",
    "FORMAT_DEFAULT_LEVELS",
    "GZIP_HEADER",
    "STREAM_PIECE",
    "Compression",
    "CompressorSpec",
    "FrameStream",
    "GzipBackend",
    "OrderedOutput",
    "ReportsCrc32",
    "StreamCompressor",
    "crc32",
    "frame_compressor",
    "frame_stream",
    "frames_compressor",
    "isal_available",
    "open_compressor",
    "resolve_compressor",
    "zstd_available",
    "zstd_window",
]

Compression = Literal["gzip", "zstd", "none", "estargz", "zstd-chunked"]
#: The file-granular compressions (see :mod:`nixery_core.chunked`).
CHUNKED: frozenset[str] = frozenset({"estargz", "zstd-chunked"})
GzipBackend = Literal["auto", "isal", "zlib"]
_Backend = Literal["isal", "zlib", "zstd", "none"]

#: Uncompressed bytes per independently compressed gzip block.
BLOCK_SIZE = 1 << 20
#: Deflate's window: the dictionary each block is primed with.
WINDOW = 32 * 1024
#: The pinned gzip member header (see the module docstring).
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
#: Level used when none is given, per backend.
DEFAULT_LEVELS: dict[str, int] = {"isal": 3, "zlib": 1, "zstd": 3, "none": 0}
#: Where a compression's default differs from its backend's.  zstd:chunked
#: frames use zstd level 2: on 439 MB of Debian packages outside the
#: benchmark corpus (held out from this choice) it took 5-7% fewer
#: CPU-seconds than level 3 for output 1.109x ``pigz -6`` against 1.097x
#: (``benchmarks/bench_chunked_level.py``); the blobs were already new in
#: ``nixery-chunked/2``.  Plain zstd layers keep level 3.
#: eStargz used ISA-L level 2 (a fifth less time than level 3 for one gzip
#: member per chunk), but one-shot ISA-L compression (how frames are
#: compressed) at levels 1 and 2 is not deterministic in a process with
#: several threads: the same chunk compressed to members 1 to 5 bytes apart
#: from run to run (300 MB benchmark closure, threads=2: two or more blobs
#: in most sessions of 6 to 14 runs), whatever the locking around the call
#: or a copy of its input; level 3 gave one blob in every session (34
#: runs).  The output evidently depends on memory the library does not
#: initialise.  See docs/performance.md, "Reproducibility".
FORMAT_DEFAULT_LEVELS: dict[tuple[str, str], int] = {("zstd-chunked", "zstd"): 2}
#: ISA-L levels refused for eStargz frames (see :data:`FORMAT_DEFAULT_LEVELS`);
#: gzip layers (1 MiB blocks through ``compressobj``) gave one blob at both.
_UNREPRODUCIBLE_FRAME_LEVELS = frozenset({1, 2})
#: zlib's memLevel.  For ISA-L it picks the size of the level buffer, and with
#: it how often a deflate block with fresh Huffman tables starts: 3 (ISA-L's
#: "small" buffer) made level 3 output 1% smaller than memLevel 8 and level 2
#: output as small as level 3 with memLevel 8, on 200 MB of binaries and
#: libraries.  zlib keeps its default, 8.
MEM_LEVELS: dict[str, int] = {"isal": 3, "zlib": 8}
_LEVEL_RANGES: dict[str, tuple[int, int]] = {
    "isal": (0, 3),
    "zlib": (0, 9),
    "zstd": (-7, 22),
    "none": (0, 0),
}
_Z_SYNC_FLUSH = zlib.Z_SYNC_FLUSH
#: An empty deflate block with BFINAL set (fixed Huffman, just the end code).
_FINAL_BLOCK = b"\x03\x00"
try:  # ISA-L's CRC-32 (a required dependency): the same values as zlib's, several times as fast
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a required dependency
    crc32 = zlib.crc32


def _import_isal() -> ModuleType | None:
    try:
        from isal import isal_zlib  # noqa: PLC0415 - imported on demand, so a missing one is a typed error
    except ImportError:
        return None
    return isal_zlib


def _import_zstd() -> ModuleType | None:
    try:
        import zstandard  # noqa: PLC0415 - imported on demand, so a missing one is a typed error
    except ImportError:
        return None
    return zstandard


def isal_available() -> bool:
    """Whether ``isal`` (ISA-L) is importable (it is a required dependency)."""
    return _import_isal() is not None


def zstd_available() -> bool:
    """Whether ``zstandard`` is importable (it is a required dependency)."""
    return _import_zstd() is not None


@cache
def zstd_window(level: int) -> int:
    """The largest window a zstd frame of ours compressed at ``level`` declares.

    libzstd picks the window by level (``windowLog``: 512 KiB at level 1,
    2 MiB at 3, 8 MiB at 19, 128 MiB at 22); a frame whose size the encoder
    knew (a chunked layer's, one-shot) declares at most its size instead.
    A decoder of our own frames is bounded by it (``max_window_size``), so
    a damaged or hostile frame declaring more (up to libzstd's default limit
    of 128 MiB, allocated outside Python) is refused before any allocation.
    """
    zstandard = _import_zstd()
    if zstandard is None:  # pragma: no cover - a required dependency
        raise MissingEncoder("zstandard", "zstd frames")
    return 1 << int(zstandard.ZstdCompressionParameters.from_level(level).window_log)


@attrs.frozen
class CompressorSpec:
    """Everything that decides the compressed bytes, resolved for this machine.

    Build one with :func:`resolve_compressor`.  ``library`` is the version of
    the C library doing the work; ``fingerprint`` is the short sha256 of a
    fixed sample compressed with exactly this spec (empty for ``none``).
    """

    compression: Compression
    backend: _Backend
    level: int
    library: str
    block_size: int
    fingerprint: str
    mem_level: int = 8

    def parameters(self) -> dict[str, JSONValue]:
        """The spec as JSON, for cache keys."""
        params: dict[str, JSONValue] = {"compression": self.compression}
        if self.compression == "none":
            return params
        params.update(
            backend=self.backend,
            level=self.level,
            library=self.library,
            fingerprint=self.fingerprint,
        )
        if self.compression == "gzip":
            params.update(block_size=self.block_size, mem_level=self.mem_level)
        return params

    @property
    def chunked(self) -> bool:
        """Whether this is a file-granular compression (eStargz, zstd:chunked)."""
        return self.compression in CHUNKED


def resolve_compressor(
    compression: Compression,
    level: int | None = None,
    gzip_backend: GzipBackend = "auto",
) -> CompressorSpec:
    """Pick the backend and level for ``compression`` on this machine.

    ``gzip_backend="auto"`` means ISA-L (a required dependency); ``"zlib"``
    picks zlib by name.  A missing ``isal`` (for gzip) or ``zstandard`` (for
    zstd) raises :class:`~nixery_core.errors.MissingEncoder` naming the
    package: another encoder would write other bytes, so nothing falls back.
    A level outside the backend's range raises
    :class:`~nixery_core.errors.InvalidInput`.
    """
    return _resolve(compression, level, gzip_backend)


def _check_reproducible(compression: str, backend: str, level: int) -> None:
    """Refuse a level whose output changes from run to run (see FORMAT_DEFAULT_LEVELS)."""
    if compression == "estargz" and backend == "isal" and level in _UNREPRODUCIBLE_FRAME_LEVELS:
        raise InvalidInput(
            f"estargz with ISA-L level {level} is not reproducible (the same frame compresses "
            "to different bytes from run to run under threads): use level 0 or 3"
        )


@cache
def _resolve(compression: str, level: int | None, gzip_backend: str) -> CompressorSpec:
    # Cached: the fingerprint compresses a 96 KiB sample; the answer cannot
    # change while the process runs (the libraries are loaded once).
    backend: _Backend
    if compression == "none":
        backend, library = "none", ""
    elif compression in ("zstd", "zstd-chunked"):
        zstandard = _import_zstd()
        if zstandard is None:
            raise MissingEncoder("zstandard", f"{compression} layers")
        backend, library = "zstd", "zstd " + ".".join(map(str, zstandard.ZSTD_VERSION))
    elif compression in ("gzip", "estargz"):
        if gzip_backend not in ("auto", "isal", "zlib"):
            raise InvalidInput(f"unknown gzip backend {gzip_backend!r}: use auto, isal or zlib")
        isal = _import_isal() if gzip_backend != "zlib" else None
        if gzip_backend != "zlib" and isal is None:
            raise MissingEncoder("isal", f"gzip layers (gzip_backend={gzip_backend!r})")
        if isal is not None:
            from isal import _isal  # noqa: PLC0415 - only present with isal

            backend, library = "isal", f"isa-l {_isal.ISAL_VERSION}"
        else:
            backend, library = "zlib", f"zlib {zlib.ZLIB_RUNTIME_VERSION}"
    else:
        raise InvalidInput(
            f"unknown compression {compression!r}: use gzip, zstd, none, estargz or zstd-chunked"
        )
    if level is None:
        level = FORMAT_DEFAULT_LEVELS.get((compression, backend), DEFAULT_LEVELS[backend])
    low, high = _LEVEL_RANGES[backend]
    if isinstance(level, bool) or not isinstance(level, int) or not low <= level <= high:
        raise InvalidInput(
            f"{compression} level {level!r} is out of range for the {backend} backend "
            f"({low}..{high})"
        )
    _check_reproducible(compression, backend, level)
    spec = CompressorSpec(
        compression,  # type: ignore[arg-type]  # checked just above
        backend,
        level,
        library,
        BLOCK_SIZE,
        "",
        MEM_LEVELS.get(backend, 8),
    )
    if backend == "none":
        return spec
    return attrs.evolve(spec, fingerprint=_fingerprint(spec))


def _canary() -> bytes:
    """96 KiB mixing text, structured binary and incompressible bytes (fixed forever)."""
    text = b"".join(
        b"line %d: the quick brown fox jumps over the lazy dog %x\n" % (i, i * 2654435761)
        for i in range(600)
    )
    binary = b"".join(struct.pack("<IHHQ", i, i % 7, i * 31 % 65536, i * i) for i in range(2000))
    noise = b"".join(hashlib.sha256(b"nixery %d" % i).digest() for i in range(1024))
    return (text + binary + noise)[: 96 * 1024].ljust(96 * 1024, b"\0")


def _fingerprint(spec: CompressorSpec) -> str:
    sample = _canary()
    if spec.chunked:
        frame = frame_compressor(spec)
        digest = hashlib.sha256()
        for start in range(0, len(sample), 16 * 1024):
            digest.update(frame(sample[start : start + 16 * 1024]))
        # And a frame streamed in more than one piece, as a layer's TOC is.
        long = sample * (STREAM_PIECE // len(sample) + 1)
        stream = frame_stream(spec)(len(long))
        digest.update(stream.compress(long))
        digest.update(stream.finish())
        return digest.hexdigest()[:16]
    # Small blocks, so the dictionary path of the block code is exercised too.
    compressor = _make(attrs.evolve(spec, block_size=WINDOW), executor=None, threads=1)
    digest = hashlib.sha256()
    for chunk in (*compressor.compress(sample), *compressor.finish()):
        digest.update(chunk)
    return digest.hexdigest()[:16]


class StreamCompressor(Protocol):
    """A compressor being fed.

    It promises: the concatenation of everything :meth:`compress` and
    :meth:`finish` return depends only on the concatenated input and the
    spec.  ``compress`` may keep a reference to ``data`` until ``finish``
    (callers hand over a buffer they no longer change).  :meth:`close`
    releases workers and is safe after errors and after ``finish``.
    """

    def compress(self, data: bytes | bytearray | memoryview) -> list[bytes]: ...

    def finish(self) -> list[bytes]: ...

    def close(self) -> None: ...


@runtime_checkable
class ReportsCrc32(Protocol):
    """A compressor that keeps the CRC-32 of its input (a gzip member does, for its trailer).

    It promises: :attr:`running_crc32` is the CRC-32 and the length of the
    input compressed so far (input it still buffers is not counted).
    """

    @property
    def running_crc32(self) -> tuple[int, int]: ...


class OrderedOutput:
    """Compressed pieces of consecutive members, in order, some still being compressed.

    Each piece carries the tag of its member.  :meth:`take_ready` hands back
    the finished pieces at the front, waiting for the oldest piece while
    more than ``max_in_flight`` blocks' worth of input (:data:`BLOCK_SIZE`
    bytes each) is being compressed, so memory stays bounded.  Counted in
    bytes, not pieces: a layer of many small store paths hands over one
    small partial block per member, and with at most ``2 * threads`` pieces
    in flight (the limit until the twelfth session) the packing thread waited
    for the oldest of a few tiny ones while the deflate threads ran dry.  In
    the first fifth of the quick benchmark closure's gzip pack (its small
    store paths) the pool's threads were busy 1.2-1.6 of 2 cores with that
    limit, 1.5-1.7 with this one, as for the pack before fragments (one
    stream of full blocks: 1.6-1.8; ``perf``, docs/performance.md).  At most
    :data:`_MAX_PIECES` pieces per block of the limit are in flight whatever
    their sizes.
    """

    def __init__(self, max_in_flight: int) -> None:
        self._items: deque[tuple[object, bytes | Future[bytes], int]] = deque()
        self._pending = 0
        self._pending_bytes = 0
        self._max = max(1, max_in_flight)
        self._max_bytes = self._max * BLOCK_SIZE

    def add(self, tag: object, item: bytes | Future[bytes], size: int = BLOCK_SIZE) -> None:
        """Queue ``item``; one still being compressed counts ``size`` bytes of input (a
        block's unless said) until it is taken."""
        if isinstance(item, bytes):
            size = 0
        else:
            self._pending += 1
            self._pending_bytes += size
        self._items.append((tag, item, size))

    def _pop(self) -> tuple[object, bytes]:
        tag, item, size = self._items.popleft()
        if isinstance(item, bytes):
            return tag, item
        self._pending -= 1
        self._pending_bytes -= size
        return tag, item.result()

    def _full(self) -> bool:
        return self._pending_bytes > self._max_bytes or self._pending > _MAX_PIECES * self._max

    def take_ready(self) -> list[tuple[object, bytes]]:
        out: list[tuple[object, bytes]] = []
        items = self._items
        while items and (
            isinstance(items[0][1], bytes) or items[0][1].done() or self._full()
        ):
            out.append(self._pop())
        return out

    def take_all(self) -> list[tuple[object, bytes]]:
        return [self._pop() for _ in range(len(self._items))]

    def cancel(self) -> None:
        while self._items:
            _tag, item, _size = self._items.popleft()
            if not isinstance(item, bytes):
                item.cancel()
        self._pending = self._pending_bytes = 0


#: Pieces in flight in an :class:`OrderedOutput` at most, per block of its limit.
_MAX_PIECES = 16


def open_compressor(
    spec: CompressorSpec,
    *,
    executor: Executor | None = None,
    threads: int = 1,
    output: OrderedOutput | None = None,
    tag: object = None,
    checksummed: bool = False,
) -> StreamCompressor:
    """A fresh compressor for one gzip member or zstd frame.

    gzip blocks are compressed on ``executor`` when given (at most
    ``2 * threads`` blocks in flight), else on the calling thread; zstd runs
    ``threads`` (at least 1) of its own workers.  The bytes are the same
    either way.  With ``output``, :meth:`~StreamCompressor.compress` and
    :meth:`~StreamCompressor.finish` return nothing: every piece goes to
    ``output``, tagged with ``tag``, without waiting for the deflate threads;
    with ``checksummed`` too, a gzip block deflated on ``executor`` is
    tagged with a :class:`Checksummed` wrapping ``tag``, its CRC-32 taken there.
    """
    return _make(
        spec, executor=executor, threads=threads, output=output, tag=tag, checksummed=checksummed
    )


def _make(
    spec: CompressorSpec,
    *,
    executor: Executor | None,
    threads: int,
    output: OrderedOutput | None = None,
    tag: object = None,
    checksummed: bool = False,
) -> StreamCompressor:
    if spec.chunked:
        raise InvalidInput(
            f"{spec.compression} layers are written by nixery_core.chunked, not as a stream"
        )
    inner: StreamCompressor
    if spec.backend == "none":
        inner = _Passthrough()
    elif spec.backend == "zstd":
        inner = _Zstd(spec.level, max(1, threads))
    else:
        module = _import_isal() if spec.backend == "isal" else zlib
        if module is None:  # pragma: no cover - the spec was resolved with isal present
            raise ImportError("the isal package disappeared after the spec was resolved")
        return _GzipBlocks(
            module,
            spec.level,
            mem_level=spec.mem_level,
            block_size=spec.block_size,
            executor=executor,
            threads=max(1, threads),
            output=output,
            tag=tag,
            checksummed=checksummed,
        )
    return inner if output is None else _ToOutput(inner, output, tag)


class _ToOutput:
    """A compressor whose pieces go to an :class:`OrderedOutput` instead of back."""

    def __init__(self, inner: StreamCompressor, output: OrderedOutput, tag: object) -> None:
        self._inner, self._output, self._tag = inner, output, tag

    def compress(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        for piece in self._inner.compress(data):
            self._output.add(self._tag, piece)
        return []

    def finish(self) -> list[bytes]:
        for piece in self._inner.finish():
            self._output.add(self._tag, piece)
        return []

    def close(self) -> None:
        self._inner.close()


class _Passthrough:
    def compress(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        return [bytes(data)] if data else []

    def finish(self) -> list[bytes]:
        return []

    def close(self) -> None:
        return None


_zstd_contexts = threading.local()


def _zstd_context(level: int, threads: int) -> Any:
    """A ZstdCompressor per thread and setting: one per member would start workers each time."""
    contexts: dict[tuple[int, int], Any] | None = getattr(_zstd_contexts, "by_setting", None)
    if contexts is None:
        contexts = _zstd_contexts.by_setting = {}
    context = contexts.get((level, threads))
    if context is None:
        zstandard = _import_zstd()
        if zstandard is None:  # pragma: no cover - the spec was resolved with zstandard
            raise ImportError("the zstandard package disappeared after the spec was resolved")
        context = contexts[(level, threads)] = zstandard.ZstdCompressor(
            level=level, threads=threads, write_content_size=False, write_checksum=False
        )
    return context


class _Zstd:
    def __init__(self, level: int, threads: int) -> None:
        self._obj = _zstd_context(level, threads).compressobj()

    def compress(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        out: bytes = self._obj.compress(data)
        return [out] if out else []

    def finish(self) -> list[bytes]:
        out: bytes = self._obj.flush()
        return [out] if out else []

    def close(self) -> None:
        return None


def _deflate_block(
    module: ModuleType, level: int, mem_level: int, block: bytes | bytearray | memoryview,
    zdict: bytes,
) -> bytes:
    """Raw deflate of one block, primed with ``zdict``, ending on a sync flush."""
    if zdict:
        obj = module.compressobj(level, module.DEFLATED, -15, mem_level, 0, zdict)
    else:
        obj = module.compressobj(level, module.DEFLATED, -15, mem_level, 0)
    out: bytes = obj.compress(block) + obj.flush(_Z_SYNC_FLUSH)
    return out


class Checksummed:
    """The tag of a piece whose CRC-32 was taken where it was compressed (``crc``).

    A member opened with ``checksummed=True`` (:func:`open_compressor`)
    tags each block deflated on the pool with one of these, wrapping its own
    tag: the pool's thread takes the CRC-32 of the deflated bytes right
    after making them, while they are still in the CPU's cache (about a
    third of the cost of reading them again later, and off the thread that
    consumes the output), set before the piece's future is done.  Pieces
    made on the calling thread (the member's header and trailer) carry the
    plain tag.
    """

    __slots__ = ("crc", "tag")

    def __init__(self, tag: object) -> None:
        self.tag = tag
        self.crc = 0

    def deflate(
        self, module: ModuleType, level: int, mem_level: int,
        block: bytes | bytearray | memoryview, zdict: bytes,
    ) -> bytes:
        """:func:`_deflate_block`, the CRC-32 of its output kept in :attr:`crc`."""
        out = _deflate_block(module, level, mem_level, block, zdict)
        self.crc = crc32(out)
        return out


class _GzipBlocks:
    """One gzip member made of independently deflated blocks (see module docstring)."""

    def __init__(
        self,
        module: ModuleType,
        level: int,
        *,
        mem_level: int,
        block_size: int,
        executor: Executor | None,
        threads: int,
        output: OrderedOutput | None = None,
        tag: object = None,
        checksummed: bool = False,
    ) -> None:
        self._module = module
        #: Blocks deflated on the pool for ``output`` carry their CRC-32 (:class:`Checksummed`).
        self._checksummed = checksummed and executor is not None and output is not None
        self._output = output
        self._tag = tag
        self._level = level
        self._mem_level = mem_level
        self._block_size = block_size
        self._executor = executor
        self._max_in_flight = 2 * threads
        self._crc32: Callable[[bytes | bytearray | memoryview, int], int] = module.crc32
        self._crc = 0
        self._length = 0
        self._pending = bytearray()
        #: Input shorter than a block kept as handed over, not copied: a member's
        #: last, partial block usually comes alone, and goes on to be deflated as is.
        self._held: bytes | bytearray | memoryview | None = None
        self._previous_tail = b""
        self._in_flight: deque[Future[bytes]] = deque()
        self._started = False

    @property
    def running_crc32(self) -> tuple[int, int]:
        """The CRC-32 and length of the blocks submitted so far (see :class:`ReportsCrc32`)."""
        return self._crc, self._length

    def _put(self, out: list[bytes], piece: bytes) -> None:
        if self._output is None:
            out.append(piece)
        else:
            self._output.add(self._tag, piece)

    def compress(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        out: list[bytes] = []
        if not self._started:
            self._started = True
            self._put(out, GZIP_HEADER)
        size = self._block_size
        held = self._held
        if held is not None:
            self._held = None
            self._pending += held
        elif not self._pending and len(data) <= size:
            if len(data) == size:
                # The archive writer hands over whole blocks: no copy.
                self._submit(data, out)
            elif data:
                # And a member's last, partial one: kept as it is (the protocol lets
                # us), deflated as it is by finish unless more input comes first.
                self._held = data
            return out
        self._pending += data
        while len(self._pending) >= size:
            block = bytes(self._pending[:size])
            del self._pending[:size]
            self._submit(block, out)
        return out

    def finish(self) -> list[bytes]:
        out: list[bytes] = []
        if not self._started:
            self._started = True
            self._put(out, GZIP_HEADER)
        held, self._held = self._held, None
        if held is not None:
            self._submit(held, out, last=True)
        elif self._pending:
            # Handed on as it is: nothing writes to it again.
            block, self._pending = self._pending, bytearray()
            self._submit(block, out, last=True)
        while self._in_flight:
            out.append(self._in_flight.popleft().result())
        self._put(out, _FINAL_BLOCK + struct.pack("<II", self._crc, self._length & 0xFFFFFFFF))
        return out

    def close(self) -> None:
        self._held = None
        while self._in_flight:
            self._in_flight.popleft().cancel()

    def _submit(
        self, block: bytes | bytearray | memoryview, out: list[bytes], *, last: bool = False
    ) -> None:
        self._crc = self._crc32(block, self._crc)
        self._length += len(block)
        zdict = self._previous_tail
        if not last:  # the next block's dictionary; the last block has no next
            self._previous_tail = bytes(block[-WINDOW:])
        if self._executor is None:
            self._put(out, _deflate_block(self._module, self._level, self._mem_level, block, zdict))
            return
        if self._checksummed and self._output is not None:
            cell = Checksummed(self._tag)
            self._output.add(cell, self._executor.submit(
                cell.deflate, self._module, self._level, self._mem_level, block, zdict
            ), len(block))
            return
        future = self._executor.submit(
            _deflate_block, self._module, self._level, self._mem_level, block, zdict
        )
        if self._output is not None:
            self._output.add(self._tag, future, len(block))
            return
        self._in_flight.append(future)
        # Hand back every block already done, in order; wait when too many are queued.
        while self._in_flight and (
            self._in_flight[0].done() or len(self._in_flight) > self._max_in_flight
        ):
            out.append(self._in_flight.popleft().result())


def frame_compressor(spec: CompressorSpec) -> Callable[[bytes | bytearray | memoryview], bytes]:
    """One-shot compression of one independent frame, safe to call from many threads.

    gzip backends give one complete gzip member (pinned header, raw deflate
    at ``spec.level``, CRC-32 and size); zstd gives one frame with its content
    size and no checksum, from a single-threaded compressor per thread.
    The output depends only on ``data`` and ``spec``.
    """
    if spec.backend == "zstd":
        return _zstd_frames(spec.level)
    if spec.backend in ("isal", "zlib"):
        module = _import_isal() if spec.backend == "isal" else zlib
        if module is None:  # pragma: no cover - the spec was resolved with isal present
            raise ImportError("the isal package disappeared after the spec was resolved")
        return _gzip_members(module, spec.level)
    raise InvalidInput(f"no frame compressor for the {spec.backend} backend")


#: Independent frames in, their compressed bytes joined and each one's length out.
FramesCompressor = Callable[[Sequence["bytes | bytearray | memoryview"]], tuple[bytes, list[int]]]


def frames_compressor(spec: CompressorSpec) -> FramesCompressor:
    """Many independent frames compressed in one call, each as :func:`frame_compressor` would.

    Returns the compressed frames joined and the length of each.  The bytes
    are exactly those of :func:`frame_compressor`, frame by frame; only the
    calls differ: zstd compresses the whole list in one call that leaves
    Python's lock free throughout (``multi_compress_to_buffer``), and ISA-L
    writes each gzip member, header and trailer included, in one call.  Few,
    long calls are what let the threads compressing batches of small frames
    run alongside the thread that cuts them.
    """
    if spec.backend == "zstd":
        return _zstd_batches(spec.level)
    if spec.backend == "isal" and spec.level >= 1:
        if _import_isal() is None:  # pragma: no cover - the spec was resolved with isal present
            raise ImportError("the isal package disappeared after the spec was resolved")
        from isal import igzip_lib  # noqa: PLC0415 - present with isal_zlib

        compress = igzip_lib.compress
        gzip = igzip_lib.COMP_GZIP
        level = spec.level

        def members(frames: Sequence[bytes | bytearray | memoryview]) -> tuple[bytes, list[int]]:
            # ISA-L's own gzip wrapper writes GZIP_HEADER (mtime 0, OS 255) and
            # the CRC-32 and size: the same member as _gzip_members, in one call.
            # igzip_lib directly: the same bytes as isal_zlib.compress(frame,
            # level, 31), with less work per call (5% of the time, per frame).
            out = [compress(frame, level, gzip) for frame in frames]
            return b"".join(out), [len(member) for member in out]

        return members
    return _one_by_one(frame_compressor(spec))


def _one_by_one(single: Callable[[bytes | bytearray | memoryview], bytes]) -> FramesCompressor:
    """A :data:`FramesCompressor` calling ``single`` once per frame."""

    def each(frames: Sequence[bytes | bytearray | memoryview]) -> tuple[bytes, list[int]]:
        out = [single(frame) for frame in frames]
        return b"".join(out), [len(frame) for frame in out]

    return each


def _gzip_members(
    module: ModuleType, level: int
) -> Callable[[bytes | bytearray | memoryview], bytes]:
    compress = module.compress
    crc32 = module.crc32

    def member(data: bytes | bytearray | memoryview) -> bytes:
        body: bytes = compress(data, level, -15)
        trailer = struct.pack("<II", crc32(data) & 0xFFFFFFFF, len(data) & 0xFFFFFFFF)
        return b"".join((GZIP_HEADER, body, trailer))

    return member


def _zstd_batches(level: int) -> FramesCompressor:
    zstandard = _import_zstd()
    if zstandard is None:  # pragma: no cover - the spec was resolved with zstandard
        raise ImportError("the zstandard package disappeared after the spec was resolved")
    one_by_one = _one_by_one(_zstd_frames(level))
    local = threading.local()

    def frames(data: Sequence[bytes | bytearray | memoryview]) -> tuple[bytes, list[int]]:
        if not data:
            return b"", []
        compressor = getattr(local, "compressor", None)
        if compressor is None:
            compressor = local.compressor = zstandard.ZstdCompressor(
                level=level, write_content_size=True, write_checksum=False
            )
        try:
            result = compressor.multi_compress_to_buffer(list(data), threads=0)
        except NotImplementedError:  # pragma: no cover - the cffi backend lacks it
            return one_by_one(data)
        segments = [result[i] for i in range(len(result))]
        return b"".join(segments), [len(segment) for segment in segments]

    return frames


def _zstd_frames(level: int) -> Callable[[bytes | bytearray | memoryview], bytes]:
    zstandard = _import_zstd()
    if zstandard is None:  # pragma: no cover - the spec was resolved with zstandard
        raise ImportError("the zstandard package disappeared after the spec was resolved")
    local = threading.local()

    def frame(data: bytes | bytearray | memoryview) -> bytes:
        compressor = getattr(local, "compressor", None)
        if compressor is None:
            compressor = local.compressor = zstandard.ZstdCompressor(
                level=level, write_content_size=True, write_checksum=False
            )
        out: bytes = compressor.compress(data)
        return out

    return frame


#: Uncompressed bytes per call into a streamed frame's compressor (the last
#: call takes what is left).  Fixed, and so part of the format: ISA-L's
#: output depends on how its input is split into calls (see the module
#: docstring); zstd's and zlib's do not, but are fed the same way.
STREAM_PIECE = 1 << 20


class FrameStream(Protocol):
    """One frame compressed while its input streams in (made by :func:`frame_stream`).

    It promises: what :meth:`compress` and then :meth:`finish` return, joined,
    is one frame of the kind :func:`frame_compressor` makes, and depends only
    on the bytes given and the spec, never on how they were split into calls;
    it holds at most :data:`STREAM_PIECE` bytes of input and the
    compressor's own state, whatever the frame's size.  ``finish`` raises
    :class:`~nixery_core.errors.LayerError` when the bytes given were not
    the size promised.
    """

    def compress(self, data: bytes | bytearray | memoryview) -> bytes: ...

    def finish(self) -> bytes: ...


def frame_stream(spec: CompressorSpec) -> Callable[[int], FrameStream]:
    """The streaming twin of :func:`frame_compressor`: ``size`` bytes in pieces, one frame out.

    For a frame too big to hold (a chunked layer's TOC): the same kind of
    frame, backend and level (a gzip member with the pinned header, CRC-32
    and size; a zstd frame with its content size, given beforehand, and no
    checksum), compressed by the library's streaming compressor fed exactly
    :data:`STREAM_PIECE` bytes at a time.  The bytes are not always those
    of :func:`frame_compressor` for the same input: ISA-L, and zstd beyond
    its window, write other blocks when the input comes in pieces (zlib at
    levels 1-9 writes the same).
    """
    if spec.backend == "zstd":
        level = spec.level
        zstandard = _import_zstd()
        if zstandard is None:  # pragma: no cover - the spec was resolved with zstandard
            raise ImportError("the zstandard package disappeared after the spec was resolved")

        def zstd_frame(size: int) -> FrameStream:
            compressor = zstandard.ZstdCompressor(
                level=level, write_content_size=True, write_checksum=False
            )
            return _ZstdStream(compressor.compressobj(size=size), size, zstandard.ZstdError)

        return zstd_frame
    if spec.backend in ("isal", "zlib"):
        module = _import_isal() if spec.backend == "isal" else zlib
        if module is None:  # pragma: no cover - the spec was resolved with isal present
            raise ImportError("the isal package disappeared after the spec was resolved")
        level = spec.level
        return lambda size: _GzipStream(module, level, size)
    raise InvalidInput(f"no frame compressor for the {spec.backend} backend")


class _FixedPieces:
    """Input regrouped into pieces of exactly :data:`STREAM_PIECE` bytes for :meth:`_feed`."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._given = 0
        self._pending = bytearray()

    def _feed(self, piece: bytes | bytearray | memoryview) -> bytes:
        raise NotImplementedError

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        view = memoryview(data)
        self._given += len(view)
        out: list[bytes] = []
        pending = self._pending
        if pending:
            take = STREAM_PIECE - len(pending)
            pending += view[:take]
            view = view[take:]
            if len(pending) < STREAM_PIECE:
                return b""
            out.append(self._feed(pending))
            self._pending = pending = bytearray()
        while len(view) >= STREAM_PIECE:
            out.append(self._feed(view[:STREAM_PIECE]))
            view = view[STREAM_PIECE:]
        pending += view
        return b"".join(out)

    def _rest(self) -> bytes:
        """The input still pending, compressed; refuses a size other than the one promised."""
        if self._given != self._size:
            raise LayerError(f"a streamed frame was given {self._given} bytes of {self._size}")
        out = self._feed(self._pending) if self._pending else b""
        self._pending = bytearray()
        return out


class _GzipStream(_FixedPieces):
    """One gzip member (the pinned header, raw deflate, CRC-32 and size), fed in pieces."""

    def __init__(self, module: ModuleType, level: int, size: int) -> None:
        super().__init__(size)
        # memLevel as frame_compressor's one-shot compress() has it (its default).
        self._obj = module.compressobj(level, module.DEFLATED, -15)
        self._crc32 = module.crc32
        self._crc = 0
        self._header = GZIP_HEADER

    def _feed(self, piece: bytes | bytearray | memoryview) -> bytes:
        self._crc = self._crc32(piece, self._crc)
        header, self._header = self._header, b""
        body: bytes = self._obj.compress(piece)
        return header + body if header else body

    def finish(self) -> bytes:
        rest = self._rest()
        header, self._header = self._header, b""
        trailer = struct.pack("<II", self._crc & 0xFFFFFFFF, self._size & 0xFFFFFFFF)
        return b"".join((header, rest, self._obj.flush(), trailer))


class _ZstdStream(_FixedPieces):
    """One zstd frame with its content size, fed in pieces."""

    def __init__(self, obj: Any, size: int, error: type[Exception]) -> None:
        super().__init__(size)
        self._obj = obj
        self._error = error

    def _feed(self, piece: bytes | bytearray | memoryview) -> bytes:
        out: bytes = self._obj.compress(piece)
        return out

    def finish(self) -> bytes:
        rest = self._rest()
        try:
            end: bytes = self._obj.flush()
        except self._error as exc:  # pragma: no cover - the size was checked just above
            raise LayerError(f"zstd refused the streamed frame: {exc}") from exc
        return rest + end

"""Per-store-path compressed fragments: compress a store path once, reuse it in any layer.

A layer blob is the concatenation of independently compressed *fragments*
(gzip members, zstd frames; plain bytes for uncompressed layers), one per
store path, plus a first fragment holding the ``nix/`` and ``nix/store/``
directory members and a last one holding the end of the archive (see
:mod:`nixery_core.archive`).  Every gzip reader (gzip, Python's ``gzip`` and
``tarfile``, GNU tar, Go's ``compress/gzip`` in containerd, skopeo, umoci)
reads concatenated members as one stream, and every zstd reader
concatenated frames.  A store path's fragment depends only on its content
and the archive options, so once compressed it can be copied into any
grouping of store paths into layers without compressing it again.

:class:`FragmentCache` keeps fragments on local disk: a :mod:`diskcache`
directory bounded by ``size_limit`` bytes, evicting the least recently
*used* fragment (fragments are many and large, so which ones get reused
matters).  A hit does not write: reading is diskcache's no-transaction
path, and the hits' access times are recorded together, in one
transaction, before the next fragment is stored (only storing evicts) and
at :meth:`FragmentCache.close`, or every :data:`_TOUCH_BATCH` hits.
Committed fragments are written by a background thread, several per
transaction, so a pack never waits on the database; a lookup of a fragment
still queued waits for its write, and :meth:`FragmentCache.close` writes
what is left.  A
fragment is keyed by :func:`fragment_key`: the path it was read from and the
archive options (Nix never changes a valid store path's content).  Each
entry records the fragment's uncompressed size and the CRC-32 of its
compressed bytes; a fragment whose bytes no longer match is a miss (and is
dropped), so a damaged cache file can never reach a layer.

The layer's ``diff_id`` needs the sha256 of the *uncompressed* tar.  A
sha256 state cannot be carried from one grouping to another (it depends on
every byte before it), so the tar bytes of each reused fragment must be
produced again.  **Re-read, not decompress**: each fragment is kept with its
*layout* (:mod:`nixery_core.fragment_layout`: its header and padding bytes,
the path and size of each file's content, the CRC-32 of each 1 MiB block of
its uncompressed bytes), and assembling a layer rebuilds the tar from the
store by it, checking every block against its recorded CRC-32 before it is
hashed.  Why: rebuilding is a copy from the page cache and a few syscalls
per file plus a CRC-32 at about 10 GB/s, where ISA-L inflates 0.5-0.65 GB
of output per CPU-second; on the benchmark closures rebuilding takes about
a quarter of the CPU time of inflating (``benchmarks/bench_rebuild.py``).
The ``diff_id`` still covers exactly the bytes shipped: from the first
block that does not match (a file changed or removed since, a damaged
layout), and for a fragment without a layout (one fetched from a bucket
tier, or whose headers exceed
:data:`~nixery_core.fragment_layout.MAX_LITERALS`), the fragment is
decompressed instead.  The layout lives in the entry's tag (after the sizes
and CRC), so a lookup stays one database read.

The cache only saves work: when its disk or database fails, a read is a
miss and a write is skipped, each with a warning.

:func:`~nixery_core.archive.pack_store_paths` takes any
:class:`FragmentSource`: this cache, or tiers in front of it
(:class:`~nixery_core.fragment_bucket.BucketFragments`, which fills this
cache from the bucket on :meth:`FragmentSource.prefetch` and uploads what is
packed).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import sqlite3
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import attrs
import diskcache

from nixery_core.errors import StorageUnavailable
from nixery_core.protocols import JSONValue

__all__ = [
    "DEFAULT_FRAGMENT_LIMIT",
    "CachedFragment",
    "EncodesLayout",
    "FragmentCache",
    "FragmentSource",
    "FragmentWriter",
    "fragment_key",
]

log = logging.getLogger(__name__)

try:  # ISA-L's CRC-32 is about ten times zlib's, with the same values
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal is a required dependency
    _crc32 = zlib.crc32

#: Bytes of compressed fragments kept by default.
DEFAULT_FRAGMENT_LIMIT = 4 << 30
#: Pieces a cached fragment is read in.
_READ_SIZE = 1 << 20
#: A fragment being recorded is kept in memory up to this size, then in a temporary file.
_SPILL_SIZE = 16 << 20
#: Committed fragments held in memory until written, at most (then committing waits).
_MAX_PENDING = 64 << 20
#: Hits whose access times are recorded at most this many at a time.
_TOUCH_BATCH = 256
#: diskcache's least-recently-used eviction (by ``access_time``) without its write on every
#: read: :class:`FragmentCache` records the access times of its hits in batches.
_EVICTION_POLICY = "nixery-lru-batched"
diskcache.core.EVICTION_POLICY.setdefault(
    _EVICTION_POLICY, {**diskcache.core.EVICTION_POLICY["least-recently-used"], "get": None}
)
#: A cached fragment up to this size is kept in memory from its check to its copy (read once).
_HOLD_SIZE = 8 << 20


def fragment_key(source: bytes, parameters: Mapping[str, JSONValue]) -> str:
    """The cache key of the fragment read from ``source`` (a path) with these archive options."""
    payload = json.dumps(
        {"source": source.decode("utf-8", "surrogateescape"), "archive": parameters},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8", "surrogateescape")).hexdigest()


@attrs.frozen
class CachedFragment:
    """A fragment found in the cache: its compressed bytes (a stream) and sizes.

    ``held`` are the bytes read when the fragment was checked, kept when it
    is small so that they are not read again.
    """

    stream: BinaryIO
    size: int
    uncompressed_size: int
    crc32: int
    held: tuple[bytes, ...] | None = None
    #: How its uncompressed bytes are rebuilt from the store
    #: (:mod:`nixery_core.fragment_layout`, encoded); ``None``: they are decompressed.
    layout: bytes | None = None

    def pieces(self) -> Iterator[bytes]:
        """The compressed bytes, in pieces, from the start."""
        if self.held is not None:
            yield from self.held
            return
        self.stream.seek(0)
        while piece := self.stream.read(_READ_SIZE):
            yield piece


class FragmentSource(Protocol):
    """Where a pack finds fragments and keeps new ones, by :func:`fragment_key`.

    It promises: :meth:`get` yields a fragment whose bytes were checked
    (``None``: a miss, and the caller compresses the store path); a
    :meth:`writer` committed keeps the fragment for later packs; a failure
    of the source itself is a miss or a skipped write, never an error.
    :meth:`prefetch` is told every key of a layer before it is packed, so a
    remote tier can fetch the ones it has all at once.
    """

    def prefetch(self, keys: Sequence[str]) -> None: ...

    def get(self, key: str) -> contextlib.AbstractContextManager[CachedFragment | None]: ...

    def writer(self, key: str) -> FragmentWriter: ...


@attrs.define
class FragmentCache:
    """Compressed fragments on local disk, size-bounded, least recently used evicted first."""

    directory: Path = attrs.field(converter=Path)
    size_limit: int = DEFAULT_FRAGMENT_LIMIT
    _cache: diskcache.Cache = attrs.field(init=False)
    #: Lookups answered from the cache, and not (counted across threads).
    hits: int = attrs.field(init=False, default=0)
    misses: int = attrs.field(init=False, default=0)
    _count_lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    #: Keys hit since access times were last recorded (guarded by ``_count_lock``).
    _touched: list[str] = attrs.field(init=False, factory=list)
    #: Fragments committed but not yet written, by key, and the keys not yet taken
    #: by the writing thread, in order (all guarded by ``_written``).
    _pending: dict[str, _Pending] = attrs.field(init=False, factory=dict)
    _queued: dict[str, None] = attrs.field(init=False, factory=dict)
    _pending_bytes: int = attrs.field(init=False, default=0)
    _written: threading.Condition = attrs.field(init=False, factory=threading.Condition)
    _thread: threading.Thread | None = attrs.field(init=False, default=None)
    _closing: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        try:
            self._cache = diskcache.Cache(
                str(self.directory),
                size_limit=self.size_limit,
                eviction_policy=_EVICTION_POLICY,
                statistics=False,  # with statistics on, every read is a write again
            )
        except (OSError, sqlite3.Error) as exc:
            raise StorageUnavailable(
                f"cannot open the fragment cache in {self.directory}: {exc}", str(self.directory)
            ) from exc

    @property
    def min_file_size(self) -> int:
        """Fragments smaller than this are kept in the database, larger ones in files."""
        size: int = self._cache.disk_min_file_size
        return size

    def close(self) -> None:
        """Write the fragments still queued, then close the database."""
        with self._written:
            self._closing = True
            self._written.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._record_touches()
        self._cache.close()

    def flush(self) -> None:
        """Wait until every fragment committed so far is written (or given up)."""
        with self._written:
            while self._pending:
                self._written.wait()

    def _settle(self, key: str) -> None:
        """Wait until a fragment committed under ``key`` is written (or given up)."""
        with self._written:
            while key in self._pending:
                self._written.wait()

    def _submit(self, key: str, item: _Pending) -> None:
        """Queue a committed fragment for the writing thread (waits while too much is queued)."""
        with self._written:
            while self._pending_bytes > _MAX_PENDING and self._pending:
                self._written.wait()
            if self._closing:  # closed meanwhile: not kept
                item.discard()
                return
            replaced = self._pending.get(key) if key in self._queued else None
            if replaced is not None:  # the same path committed twice before either was written
                self._pending_bytes -= replaced.memory
                replaced.discard()
            self._pending[key] = item
            self._queued[key] = None
            self._pending_bytes += item.memory
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._write_queued, name="nixery-fragment-writer", daemon=True
                )
                self._thread.start()
            self._written.notify_all()

    def _write_queued(self) -> None:
        """The writing thread: stores what is queued, several fragments per transaction."""
        while True:
            with self._written:
                while not self._queued and not self._closing:
                    self._written.wait()
                if not self._queued:
                    self._thread = None
                    return
                batch = [(key, self._pending[key]) for key in self._queued]
                self._queued.clear()
            self._record_touches()  # storing may evict: by use up to now
            try:
                with self._cache.transact():
                    for key, item in batch:
                        self._cache.set(key, item.value, read=item.read, tag=item.tag())
            except (OSError, sqlite3.Error) as exc:
                log.warning("fragment cache write of %d fragments failed (%s); not kept",
                            len(batch), exc)
            finally:
                for _key, item in batch:
                    item.discard()
            with self._written:
                for key, item in batch:
                    if self._pending.get(key) is item:
                        del self._pending[key]
                    self._pending_bytes -= item.memory
                self._written.notify_all()

    def _record_touches(self) -> None:
        """Record the access times of the hits so far, in one transaction."""
        with self._count_lock:
            keys, self._touched = self._touched, []
        if not keys:
            return
        now = time.time()
        try:
            with self._cache.transact():
                for key in keys:
                    # diskcache has no public way to set an entry's access time.
                    self._cache._sql(
                        "UPDATE Cache SET access_time = ? WHERE key = ? AND raw = 1", (now, key)
                    )
        except (OSError, sqlite3.Error) as exc:
            log.warning("fragment cache access times not recorded (%s)", exc)

    def __enter__(self) -> FragmentCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prefetch(self, keys: Sequence[str]) -> None:
        """Nothing to do: every fragment here is local."""

    def __contains__(self, key: object) -> bool:
        """Whether a fragment is kept under ``key`` (not checked, not counted as a use)."""
        with self._written:
            if key in self._pending:
                return True
        try:
            return key in self._cache
        except (OSError, sqlite3.Error):
            return False

    @contextlib.contextmanager
    def peek(self, key: str) -> Iterator[CachedFragment | None]:
        """The fragment under ``key``, checked, but not counted as a hit or a use."""
        found = self._lookup(key)
        try:
            yield found
        finally:
            if found is not None:
                found.stream.close()

    @contextlib.contextmanager
    def get(self, key: str) -> Iterator[CachedFragment | None]:
        """The fragment under ``key``, checked against its CRC-32 (``None``: a miss)."""
        found = self._lookup(key)
        batch = False
        with self._count_lock:
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
                self._touched.append(key)
                batch = len(self._touched) >= _TOUCH_BATCH
        if found is not None and batch:
            self._record_touches()
        if found is None:
            yield None
            return
        try:
            yield found
        finally:
            found.stream.close()

    def _lookup(self, key: str) -> CachedFragment | None:
        self._settle(key)
        try:
            value, tag = self._cache.get(key, read=True, tag=True)
        except (OSError, sqlite3.Error) as exc:
            log.warning("fragment cache read of %s failed (%s); packing it", key, exc)
            return None
        if value is None:
            return None
        # Small values live in the database and come back as bytes, large ones as files.
        stream: BinaryIO = io.BytesIO(value) if isinstance(value, bytes) else value
        try:
            # "<uncompressed size>:<crc>", then a newline and the layout if it has one.
            layout: bytes | None = None
            if isinstance(tag, bytes):
                head, _, layout = tag.partition(b"\n")
                uncompressed, crc = (int(part) for part in head.split(b":"))
            else:
                uncompressed, crc = (int(part) for part in str(tag).split(":"))
            size, actual = 0, 0
            held: list[bytes] | None = []
            while piece := stream.read(_READ_SIZE):
                size += len(piece)
                actual = _crc32(piece, actual)
                if held is not None and size <= _HOLD_SIZE:
                    held.append(piece)
                else:
                    held = None
        except (ValueError, OSError) as exc:
            stream.close()
            self._drop(key, f"unreadable ({exc})")
            return None
        if actual != crc:
            stream.close()
            self._drop(key, "its bytes changed")
            return None
        kept = None if held is None else tuple(held)
        return CachedFragment(stream, size, uncompressed, crc, kept, layout or None)

    def _drop(self, key: str, why: str) -> None:
        log.warning("dropping cached fragment %s: %s", key, why)
        with contextlib.suppress(OSError, sqlite3.Error):
            self._cache.delete(key)

    def put(self, key: str, pieces: Sequence[bytes], uncompressed_size: int) -> None:
        """Keep a fragment of ``pieces`` (its compressed bytes, in order); written on return."""
        writer = self.writer(key)
        for piece in pieces:
            writer.add(piece)
        writer.commit(uncompressed_size)
        self._settle(key)

    def writer(self, key: str) -> FragmentWriter:
        """Record a fragment piece by piece while it is compressed; kept at ``commit``."""
        return FragmentWriter(self, key)


class EncodesLayout(Protocol):
    """A fragment layout still to encode (a :class:`~.fragment_layout.LayoutRecorder`)."""

    def encode(self) -> bytes | None: ...


@attrs.frozen
class _Pending:
    """A committed fragment waiting for the writing thread."""

    #: Bytes (kept in the database), or a stream diskcache copies into a file.
    value: bytes | BinaryIO | _Pieces
    uncompressed_size: int
    crc: int
    layout: bytes | EncodesLayout | None
    #: Bytes of memory it holds until written (a spill file holds none).
    memory: int

    @property
    def read(self) -> bool:
        return not isinstance(self.value, bytes)

    def tag(self) -> str | bytes:
        """``<uncompressed size>:<crc>``, then a newline and the layout if it has one."""
        layout = self.layout
        if layout is not None and not isinstance(layout, bytes):
            layout = layout.encode()
        if layout is None:
            return f"{self.uncompressed_size}:{self.crc}"
        return b"%d:%d\n%s" % (self.uncompressed_size, self.crc, layout)

    def discard(self) -> None:
        if not isinstance(self.value, bytes | _Pieces):
            self.value.close()


class _Pieces:
    """The pieces of a fragment as a stream diskcache reads (no joining them first)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces = pieces
        self._next = 0

    def read(self, _size: int = -1) -> bytes:
        """The next piece (each at most ~1 MiB, under diskcache's 4 MiB reads); b"" at the end."""
        if self._next == len(self._pieces):
            return b""
        self._next += 1
        return self._pieces[self._next - 1]


@attrs.define
class FragmentWriter:
    """A fragment being recorded: in memory up to 16 MiB, then in a temporary file."""

    _cache: FragmentCache
    key: str
    _pieces: list[bytes] = attrs.field(init=False, factory=list)
    _size: int = attrs.field(init=False, default=0)
    _crc: int = attrs.field(init=False, default=0)
    _spill: Any = attrs.field(init=False, default=None)
    #: Kept with the fragment: how its uncompressed bytes are rebuilt from the store
    #: (:mod:`nixery_core.fragment_layout`), set by the packer before :meth:`commit`;
    #: encoded by the writing thread when given unencoded.
    layout: bytes | EncodesLayout | None = attrs.field(init=False, default=None)

    def add(self, piece: bytes) -> None:
        self._crc = _crc32(piece, self._crc)
        self._size += len(piece)
        if self._spill is not None:
            self._spill.write(piece)
            return
        self._pieces.append(piece)
        if self._size > _SPILL_SIZE:
            try:
                self._spill = tempfile.TemporaryFile(dir=self._cache.directory)  # noqa: SIM115 - closed in commit/discard
                for held in self._pieces:
                    self._spill.write(held)
            except OSError as exc:
                log.warning("cannot spill fragment %s to disk (%s); not kept", self.key, exc)
                self._spill = _Discarded()
            self._pieces = []

    def commit(self, uncompressed_size: int) -> None:
        """Keep the fragment: queued, written by the cache's writing thread.

        Looking the key up waits until it is written; a failure to write is
        a warning (the cache only saves work).
        """
        spill, self._spill = self._spill, None
        if isinstance(spill, _Discarded):
            return
        pieces, self._pieces = self._pieces, []
        fields = (uncompressed_size, self._crc, self.layout)
        if spill is not None:
            try:
                spill.seek(0)
            except OSError as exc:
                spill.close()
                log.warning("fragment %s unreadable (%s); not kept", self.key, exc)
                return
            item = _Pending(spill, *fields, memory=0)
        elif self._size < self._cache.min_file_size:  # kept in the database
            item = _Pending(b"".join(pieces), *fields, memory=self._size)
        else:
            # Given as a stream: diskcache writes bytes given as such line by line.
            item = _Pending(_Pieces(pieces), *fields, memory=self._size)
        self._cache._submit(self.key, item)

    def discard(self) -> None:
        self._pieces = []
        spill, self._spill = self._spill, None
        if spill is not None and not isinstance(spill, _Discarded):
            spill.close()


class _Discarded:
    """Stands in for a spill file that could not be made: pieces are dropped."""

    def write(self, data: bytes) -> int:
        return len(data)

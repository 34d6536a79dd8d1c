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

:class:`FragmentCache` keeps fragments on local disk, bounded by
``size_limit`` bytes, evicting the least recently *used* fragment
(fragments are many and large, so which ones get reused matters).  Its
directory holds an index (SQLite, ``index.sqlite``: per fragment its size,
uncompressed size, CRC-32, layout and last use) and a ``data/`` directory
with one file per fragment of 32 KiB or more (smaller ones live in their
row).  A hit does not write: the hits' last uses are recorded together, in
one transaction, before the next fragments are stored (only storing
evicts) and at :meth:`FragmentCache.close`, or every :data:`_TOUCH_BATCH`
hits.  Recording a fragment costs the packing thread only references to
the compressed pieces it produces anyway: a background thread computes
their CRC-32, writes each fragment's file and adds the
rows of everything queued in one transaction, so a pack never waits on
the disk or the index; a fragment past 16 MiB goes straight into its file
as it is compressed (memory stays bounded).  A lookup of a fragment still
queued waits for its write, and :meth:`FragmentCache.close` writes what is
left.  (An earlier version kept fragments in :mod:`diskcache`: a file, a
directory check and several statements per fragment cost a cold pack of
the 300 MB benchmark closure 0.15 CPU-seconds on the writing thread; such
a directory is cleared when opened.)  A
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
decompressed instead.  The layout lives in the fragment's index row (beside
its sizes and CRC), so a lookup stays one database read.

The cache only saves work: when its disk or database fails, a read is a
miss and a write is skipped, each with a warning.  Opening it raises
:class:`~nixery_core.errors.StorageUnavailable` (chained to the error), and
so do :meth:`FragmentCache.keys`, :meth:`~FragmentCache.volume` and
:meth:`~FragmentCache.check` when the index or the directory cannot be
read, and :meth:`~FragmentCache.sweep` when ``owners/`` cannot.

Nothing is left behind by a killed process.  Each open cache holds an
exclusive ``flock`` on its own owner file ``owners/<token>`` (the kernel
drops it when the process dies, SIGKILL included) and names its data files
``<random>.<token>``.  A process killed between writing a fragment's file
and committing its row leaves the file and its owner file; the next
:class:`FragmentCache` opened on the directory finds that owner file
unlocked and removes the dead owner's files no row names (and the owner
file), while files of live owners (possibly waiting for their rows) stay.
A damaged index started afresh is followed by the same sweep, which then
removes every file but those of live owners.  The sweep costs nothing
when no owner died: opening lists ``owners/`` only (see :meth:`FragmentCache.sweep`).

**Ranges instead of copies.**  Writing a second copy of every compressed
byte is most of what a cold pack pays for its fragments (the kernel's copy
into the page cache and the hand-offs with the writing thread: about 8% of
the wall time of a pack of the 300 MB benchmark closure, see
docs/performance.md).  Where the layer blob itself is stored on local disk,
:meth:`FragmentCache.on_store` gives a view (:class:`StoreFragments`) whose
:meth:`~StoreFragments.layer` records each new fragment as a *range* of the
layer blob: a :class:`RangeWriter` keeps only the fragment's offset (set by
the packer when its first byte is written), size and CRC-32, and
:meth:`LayerRanges.stored`, called once the blob is committed, queues one
row per fragment naming the blob's digest (no row for a layer whose commit
failed), written at once rather than batched; each row's layout was encoded
by the writing thread while the pack went on, so little is left for the end
of the pack (or a :meth:`FragmentCache.close` right after it).  A lookup
through the view opens the blob in the store
(:class:`~nixery_core.protocols.SupportsReading`), reads the range and
checks its length and CRC-32 as for a copy; a blob gone, short or changed
is a miss and the row is dropped (a store that does not answer,
:class:`~nixery_core.errors.StorageUnavailable`, is a miss that keeps it).
On a store without local blob files
(:class:`~nixery_core.protocols.SupportsBlobFiles`) ranges are read with one
ranged request each where the store offers
:class:`~nixery_core.protocols.SupportsRangeReads`, and those a layer reuses
are read ahead (:meth:`StoreFragments.plan`, :mod:`nixery_core.fragment_reads`);
there a range's first reuse keeps a copy, replacing the range (:attr:`StoreFragments.copy_on_reuse`;
written as the range is read for its check, and the layer served from that
copy, so the store is read once): later reuses are local and outlive the
blob; on one with them it does not (the copy would cost the writes ranges
save).  A lookup without a store
(:meth:`FragmentCache.get`) takes a range for a miss and leaves it.  A
range's charge against ``size_limit`` is its row and layout only.
Which layers keep ranges is ``BuildCache(fragment_mode=...)``'s choice.

:func:`~nixery_core.archive.pack_store_paths` takes any
:class:`FragmentSource`: this cache, or tiers in front of it
(:class:`~nixery_core.fragment_bucket.BucketFragments`, which fills this
cache from the bucket on :meth:`FragmentSource.prefetch` and uploads what is
packed).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, ClassVar, Protocol, cast, runtime_checkable

import attrs

# The CRC-32 of two runs of bytes joined, from theirs (ISA-L, a required dependency).
from isal.isal_zlib import crc32_combine as _crc32_combine

from nixery_core.compression import crc32 as _crc32
from nixery_core.errors import (
    BadCachedFragment,
    LayerError,
    NixeryError,
    StorageError,
    StorageUnavailable,
)
from nixery_core.fragment_reads import MAX_REQUEST, KeptRange, RangeReads, reads_ranges_remotely
from nixery_core.protocols import (
    JSONValue,
    SupportsBlobFiles,
    SupportsBlobInfo,
    SupportsRangeReads,
    SupportsReading,
)

__all__ = [
    "DEFAULT_FRAGMENT_LIMIT",
    "CachedFragment",
    "EncodesLayout",
    "FragmentCache",
    "FragmentSource",
    "FragmentWriter",
    "LayerRanges",
    "RangeRecord",
    "RangeWriter",
    "StoreFragments",
    "SupportsFrameWindow",
    "fragment_key",
    "fragment_keys",
    "open_range",
]

log = logging.getLogger(__name__)


#: Bytes of compressed fragments kept by default.
DEFAULT_FRAGMENT_LIMIT = 4 << 30
#: Pieces a cached fragment is read in.
_READ_SIZE = 1 << 20
#: A fragment being recorded is kept in memory up to this size, then written as it comes.
_SPILL_SIZE = 16 << 20
#: Committed fragments held in memory until written, at most (then committing waits).
_MAX_PENDING = 64 << 20
#: The writing thread writes once this much is queued, or after _BATCH_DELAY seconds.
_BATCH_BYTES = 8 << 20
_BATCH_DELAY = 0.2
#: The delay when only layouts wait to be encoded ahead (:meth:`FragmentCache._encode_ahead`):
#: those of the last delay before a layer's blob is committed are encoded after it, in the
#: tail the pack's end waits for.  A 300 MB gzip cold pack's close took 4.4-5.2 ms with
#: _BATCH_DELAY (1.6-1.9 ms of it such layouts), 3.0-3.5 ms with 0.05 s, the writing
#: thread's CPU the same (0.013-0.015 s); 0.02 s cost it a few ms more in wake-ups.
_ENCODE_DELAY = 0.05
#: Pages of the index's WAL past which a commit checkpoints it (SQLite's default: 1000).
#: A cold pack of the 300 MB benchmark closure (153 store paths) left its TOC parts and
#: rows in the WAL, and closing the cache right after the pack checkpointed them on the
#: calling thread: 2.1-2.3 ms of a 5.2-6.7 ms serial tail; with 64 pages (256 KiB)
#: closing took 0.6 ms of it and the writing thread's commits no more CPU (1.0-2.9 ms a
#: transaction, before and after: a small WAL is also quicker to look pages up in).
_WAL_PAGES = 64
#: Keys a prefetch asks the index about in one query (SQLite allows 32,766 parameters).
_KEYS_PER_QUERY = 500
#: Keys remembered absent by prefetches, at most (more: forgotten, looked up one by one).
_MAX_ABSENT = 100_000
#: Hits whose access times are recorded at most this many at a time.
_TOUCH_BATCH = 256
#: A cached fragment up to this size is kept in memory from its check to its copy (read once).
_HOLD_SIZE = 8 << 20
#: A side part (see FragmentSource) is kept in memory up to this size, then written as it comes;
#: looked up, it is never held (read again as a stream).  1 MiB of a TOC part's plain lines
#: (fragment_toc layout 4) is about what 256 KiB of layout 3's zstd held; at 256 KiB, the
#: parts of the 300 MB benchmark closure spilled on the packing thread cost it 3.2 ms of
#: thread time (file creation and writes) against 0.45 ms, the writing thread the same.
_SIDE_SPILL_SIZE = 1 << 20


def fragment_key(source: bytes, parameters: Mapping[str, JSONValue]) -> str:
    """The cache key of the fragment read from ``source`` (a path) with these archive options."""
    return fragment_keys([source], parameters)[0]


def fragment_keys(sources: Iterable[bytes], parameters: Mapping[str, JSONValue]) -> list[str]:
    """:func:`fragment_key` of each of ``sources`` with the same archive options.

    The key hashes ``{"archive": parameters, "source": source}`` as compact
    JSON with sorted keys; the options' part is serialized once here, not
    once per store path (which cost a cold pack about 11 microseconds per
    key: 2-4 ms of its packing thread for the 300 MB benchmark closure).
    """
    head = '{"archive":' + json.dumps(parameters, sort_keys=True, separators=(",", ":"))
    return [
        hashlib.sha256(
            (head + ',"source":' + json.dumps(source.decode("utf-8", "surrogateescape")) + "}")
            .encode("utf-8", "surrogateescape")
        ).hexdigest()
        for source in sources
    ]


@attrs.frozen
class CachedFragment:
    """A fragment found in the cache: its compressed bytes (a stream) and sizes.

    ``held`` are the bytes read when the fragment was checked, kept when it
    is small (or, for a range copied into the cache as it was checked, while
    the copy holds them in memory) so that they are not read again.
    """

    stream: BinaryIO
    size: int
    uncompressed_size: int
    crc32: int
    held: tuple[bytes, ...] | None = None
    #: How its uncompressed bytes are rebuilt from the store
    #: (:mod:`nixery_core.fragment_layout`, encoded); ``None``: they are decompressed.
    layout: bytes | None = None
    #: The layer blob it is a range of (``None``: a copy kept by the cache).
    blob: str | None = None
    #: Its cache key, and what drops it from the cache it was found in (:meth:`refused`).
    key: str = ""
    #: The layer blob a copy was made from as it was found (a range's first reuse).
    copied_from: str | None = None
    _drop: Callable[[str], None] | None = attrs.field(
        default=None, eq=False, repr=False, alias="drop"
    )

    def refused(self, detail: str, path: str = "") -> BadCachedFragment:
        """What to raise when the fragment fails as it is copied (``detail``: how), once it
        is dropped from its cache: packing the layer again compresses the store path
        (``path``, as read) rather than failing on the same row again."""
        if self._drop is not None:
            self._drop(detail)
        blob = self.blob if self.blob is not None else self.copied_from
        return BadCachedFragment(path or "a store path", self.key, blob, detail)

    def pieces(self) -> Iterator[bytes]:
        """The compressed bytes, in pieces, from the start.

        Bytes not held are read again, and checked against the CRC-32 as they
        are: a file changed since its check raises
        :class:`~nixery_core.errors.BadCachedFragment` after its last piece,
        the fragment dropped (its bytes are copied already, so the layer being
        packed must fail; packed again, it compresses the store path).  A failure
        to read them again (the disk's, or the store's for a range) raises
        :class:`~nixery_core.errors.LayerError` too, chained to it.
        """
        if self.held is not None:
            yield from self.held
            return
        size, crc = 0, 0
        try:
            self.stream.seek(0)
            while piece := self.stream.read(_READ_SIZE):
                size += len(piece)
                crc = _crc32(piece, crc)
                yield piece
        except (OSError, StorageError) as exc:
            raise LayerError(f"a cached fragment could not be read again: {exc}") from exc
        if (size, crc) != (self.size, self.crc32):
            raise self.refused("changed between its check and its copy")


class FragmentSource(Protocol):
    """Where a pack finds fragments and keeps new ones, by :func:`fragment_key`.

    It promises: :meth:`get` yields a fragment whose bytes were checked
    (``None``: a miss, and the caller compresses the store path); a
    :meth:`writer` committed keeps the fragment for later packs; a failure
    of the source itself is a miss or a skipped write, never an error.
    :meth:`prefetch` is told every key of a layer before it is packed, so a
    remote tier can fetch the ones it has all at once, and which of them are
    side parts (``sides``), so it checks what it fetches for each as what the
    pack will read: a side part's plain lines, any other key's compressed
    frames (inflated to the size recorded).

    A *side* part (``side=True``: a chunked layer's TOC part,
    :mod:`nixery_core.fragment_toc`) is kept beside a fragment but is no
    bytes of a layer blob: always a copy (never a range of the blob),
    written to its file past 1 MiB and, looked up, read as a stream
    (never held whole), so its size costs no memory.
    """

    def prefetch(self, keys: Sequence[str], *, sides: Collection[str] = ()) -> None: ...

    def get(
        self, key: str, *, side: bool = False
    ) -> contextlib.AbstractContextManager[CachedFragment | None]: ...

    def writer(self, key: str, *, side: bool = False) -> FragmentWriter: ...


@runtime_checkable
class SupportsFrameWindow(Protocol):
    """A :class:`FragmentSource` that checks the fragments it fetches against the zstd
    window the pack's level gives (the bucket tier, :mod:`nixery_core.fragment_bucket`).

    It promises: :meth:`prefetch_window` is :meth:`FragmentSource.prefetch`, and a
    fetched fragment of zstd frames declaring a larger window than ``window`` bytes is
    refused (a miss) before the decoder allocates it, never kept to fail the pack that
    would copy it.  An optional ability: a pack of a zstd layer checks for it and
    otherwise calls :meth:`~FragmentSource.prefetch`.
    """

    def prefetch_window(
        self, keys: Sequence[str], *, sides: Collection[str] = (), window: int
    ) -> None: ...


@attrs.define
class FragmentCache:
    """Compressed fragments on local disk, size-bounded, least recently used evicted first."""

    directory: Path = attrs.field(converter=Path)
    size_limit: int = DEFAULT_FRAGMENT_LIMIT
    #: Lookups answered from the cache, and not (counted across threads).
    hits: int = attrs.field(init=False, default=0)
    misses: int = attrs.field(init=False, default=0)
    #: Stray data files removed by sweeps (the one at open included).
    swept: int = attrs.field(init=False, default=0)
    #: Fragments that passed their check but failed as a pack copied them, dropped
    #: (:meth:`CachedFragment.refused`); their keys, for the bucket tier not to fetch
    #: the same pointer again (guarded by ``_count_lock``).
    refused: int = attrs.field(init=False, default=0)
    _refused_keys: set[str] = attrs.field(init=False, factory=set)
    _count_lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    #: Keys hit since access times were last recorded (guarded by ``_count_lock``).
    _touched: list[str] = attrs.field(init=False, factory=list)
    #: Keys a :meth:`prefetch` found absent and no :meth:`get` has asked for since
    #: (guarded by ``_count_lock``): their lookup is a miss without a query.
    _absent: set[str] = attrs.field(init=False, factory=set)
    #: Fragments committed but not yet written, by key, and the keys not yet taken
    #: by the writing thread, in order (all guarded by ``_written``).
    _pending: dict[str, _Pending] = attrs.field(init=False, factory=dict)
    _queued: dict[str, None] = attrs.field(init=False, factory=dict)
    _pending_bytes: int = attrs.field(init=False, default=0)
    _written: threading.Condition = attrs.field(init=False, factory=threading.Condition)
    _thread: threading.Thread | None = attrs.field(init=False, default=None)
    _closing: bool = attrs.field(init=False, default=False)
    #: Threads waiting for a fragment to be written (it then writes at once), and the bytes
    #: queued since the writing thread last took a batch (both guarded by ``_written``).
    _urgent: int = attrs.field(init=False, default=0)
    _queued_bytes: int = attrs.field(init=False, default=0)
    #: Whether what is queued is written without the batching delay (a stored layer's rows),
    #: and the layouts of ranges recorded but not yet stored, to encode meanwhile (both
    #: guarded by ``_written``; see :meth:`_encode_ahead`).
    _now: bool = attrs.field(init=False, default=False)
    _encoding: list[_EncodedAhead] = attrs.field(init=False, factory=list)
    #: The index, opened once (per-thread connections cost a packing thread its own open
    #: and schema read), used by one thread at a time: every statement takes microseconds.
    _con: sqlite3.Connection | None = attrs.field(init=False, default=None)
    _con_lock: threading.RLock = attrs.field(init=False, factory=threading.RLock)
    #: This cache's owner token and the descriptor of its owner file (``flock``ed while open).
    _owner: tuple[str, int] = attrs.field(init=False, default=("", -1))

    def __attrs_post_init__(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            _remove_diskcache_layout(self.directory)
            for sub in _SUBDIRECTORIES:
                (self._data / sub).mkdir(parents=True, exist_ok=True)
            self._owner = _claim_owner(self.directory / _OWNERS)
            afresh = False
            try:
                self._open_index()
            except sqlite3.DatabaseError as exc:
                if isinstance(exc, sqlite3.OperationalError):  # locked, unwritable: not damage
                    raise
                # Damaged (the index is not synced to disk: an OS crash can do this).
                afresh = self._start_afresh(exc)
            # Files left by processes killed between writing a file and committing its row.
            live, dead = self._scan_owners()
            if dead or afresh:
                self._sweep(live, dead)
            else:
                _release(dead)
            # Started now, not by the first fragment: starting a thread waits until it runs,
            # which a pack under load felt (a registry opens its cache once).
            with self._written:
                self._start_writer()
        except (OSError, sqlite3.Error) as exc:
            self._close_index()
            self._release_owner()
            raise StorageUnavailable(
                f"cannot open the fragment cache in {self.directory}: {exc}", str(self.directory)
            ) from exc

    def _start_afresh(self, exc: sqlite3.DatabaseError) -> bool:
        """Replace a damaged index by an empty one; whether this process did.

        Under an exclusive ``flock`` on ``reset.lock``, and only when the
        index is still damaged once the lock is held: two processes opening
        a damaged index at once (after a reboot) replace it once, so neither
        keeps a connection to an index the other removed.
        """
        self._close_index()
        fd = os.open(self.directory / _RESET_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                self._open_index()
            except sqlite3.DatabaseError as again:
                if isinstance(again, sqlite3.OperationalError):
                    raise
            else:
                return False  # started afresh by another process meanwhile
            log.warning("fragment index in %s is damaged (%s); starting afresh",
                        self.directory, exc)
            self._close_index()
            for name in (_INDEX, f"{_INDEX}-wal", f"{_INDEX}-shm"):
                (self.directory / name).unlink(missing_ok=True)
            self._open_index()
            return True
        finally:
            os.close(fd)  # releases the flock

    def _scan_owners(self) -> tuple[set[str], dict[str, int]]:
        """The caches open on this directory (``live``), and those whose process is gone.

        Each open cache holds an exclusive ``flock`` on its owner file
        ``owners/<token>`` (the kernel drops it when the process dies, even
        by SIGKILL).  An owner file this process can lock belongs to a dead
        process: it is returned with the descriptor holding its lock, so no
        other process takes that owner for dead at the same time.
        ``<token>.claim`` files of makers that died before renaming them go.
        """
        live: set[str] = {self._owner[0]}
        dead: dict[str, int] = {}
        try:
            self._scan_into(live, dead)
        except BaseException:
            _release(dead)
            raise
        return live, dead

    def _scan_into(self, live: set[str], dead: dict[str, int]) -> None:
        for entry in os.scandir(self.directory / _OWNERS):
            token = entry.name.removesuffix(_CLAIM)
            if token == self._owner[0]:
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: its process is alive (or cannot be told: taken as alive)
                os.close(fd)
                live.add(token)
                continue
            if entry.name.endswith(_CLAIM):  # its maker died, or will fail to rename and retry
                with contextlib.suppress(OSError):
                    Path(entry.path).unlink()
                os.close(fd)
                continue
            dead[token] = fd

    def sweep(self) -> int:
        """Remove the data files no index row names and no live process may still commit.

        Opening the cache sweeps when a process that had it open died
        without closing it, or when the index was started afresh; this is
        for a caller that wants it now (``nixery-core gc --cache DIR``).
        Returns how many files were removed.
        """
        with self._translated("sweep"):
            live, dead = self._scan_owners()
        return self._sweep(live, dead)

    def _sweep(self, live: set[str], dead: dict[str, int]) -> int:
        """Remove unnamed data files of ``dead`` owners, and of unknown ones if older than now.

        A file is named by its owner's token (``<random>.<token>``).  Safe
        against other processes: a live owner's file may be waiting for its
        row (the writing thread queues rows, and the index may be busy), so
        it stays.  A dead owner commits nothing more, and its lock is held
        here from before the rows are read until its files are gone.  An
        owner neither live nor dead when the owners were scanned had closed
        before (its rows are all read here) or opened after (its files are
        no older than this cache's owner file, touched before the scan:
        they stay).  Files of the earlier naming (no token) go after an hour.
        """
        removed = 0
        try:
            os.utime(self._owner[1])
            reference = os.fstat(self._owner[1]).st_mtime_ns
            named = self._named_files()
            for sub in _SUBDIRECTORIES:
                for entry in os.scandir(self._data / sub):
                    name = f"{sub}/{entry.name}"
                    owner = _owner_of(entry.name)
                    if name in named or owner in live:
                        continue
                    if owner not in dead:
                        before = reference - (_UNOWNED_GRACE if owner is None else 0)
                        with contextlib.suppress(FileNotFoundError):
                            if entry.stat().st_mtime_ns >= before:
                                continue
                    (self._data / name).unlink(missing_ok=True)
                    removed += 1
        except (OSError, sqlite3.Error) as exc:
            log.warning("sweeping the fragment files of %s failed (%s)", self.directory, exc)
            _release(dead)
            return removed
        for token in dead:  # swept: its owner file goes (while still locked here)
            with contextlib.suppress(OSError):
                (self.directory / _OWNERS / token).unlink()
        _release(dead)
        self.swept += removed
        if removed:
            log.info("removed %d fragment files no index row names in %s",
                     removed, self.directory)
        return removed

    def _named_files(self) -> set[str]:
        """The data files the index's rows name."""
        with self._index() as con:
            rows = con.execute("SELECT file FROM fragments WHERE file IS NOT NULL")
            return {file for (file,) in rows}

    def _release_owner(self) -> None:
        """Give up this cache's owner file (its files are then no longer in flight)."""
        owner, self._owner = self._owner, ("", -1)
        if owner[1] < 0:
            return
        with contextlib.suppress(OSError):
            (self.directory / _OWNERS / owner[0]).unlink()
        os.close(owner[1])  # releases the flock

    def _open_index(self) -> None:
        self._con = sqlite3.connect(
            self.directory / _INDEX, timeout=60, isolation_level=None,
            check_same_thread=False,  # used by any thread, one at a time (_con_lock)
        )
        self._con.execute("PRAGMA journal_mode = WAL")
        # Never synced: a killed process loses nothing (WAL), an OS crash may lose or damage
        # the index, which is then started afresh.  Syncing cost each close a checkpoint's
        # fsync: 17-62 ms here, more than a regrouped layer of the quick benchmark closure.
        self._con.execute("PRAGMA synchronous = OFF")
        # A small WAL: checkpointed by the commit that takes it past _WAL_PAGES (on the
        # writing thread, while the pack goes on), not all at once by closing the index.
        self._con.execute(f"PRAGMA wal_autocheckpoint = {_WAL_PAGES}")
        with self._index() as con, _transaction(con):
            for statement in _SCHEMA:
                con.execute(statement)
            columns = {row[1] for row in con.execute("PRAGMA table_info(fragments)")}
            if "blob" not in columns:  # an index made before references
                con.execute("ALTER TABLE fragments ADD COLUMN blob TEXT")
                con.execute("ALTER TABLE fragments ADD COLUMN offset INTEGER")

    @contextlib.contextmanager
    def _translated(self, doing: str) -> Iterator[None]:
        """The index's and the disk's errors as :class:`StorageUnavailable`, chained."""
        try:
            yield
        except (OSError, sqlite3.Error) as exc:
            raise StorageUnavailable(
                f"cannot {doing} the fragment cache in {self.directory}: {exc}",
                str(self.directory),
            ) from exc

    @property
    def _data(self) -> Path:
        return self.directory / _DATA

    @contextlib.contextmanager
    def _index(self) -> Iterator[sqlite3.Connection]:
        """The index connection, for this thread alone until the block ends."""
        with self._con_lock:
            if self._con is None:
                raise sqlite3.ProgrammingError("the fragment cache is closed")
            yield self._con

    def _close_index(self) -> None:
        with self._con_lock:
            con, self._con = self._con, None
        if con is not None:
            with contextlib.suppress(sqlite3.Error):
                con.close()

    def close(self) -> None:
        """Write the fragments still queued, then close the index."""
        with self._written:
            self._closing = True
            self._written.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._record_touches()
        self._close_index()
        self._release_owner()

    def flush(self) -> None:
        """Wait until every fragment committed so far is written (or given up)."""
        with self._written:
            self._urgent += 1
            self._written.notify_all()
            try:
                while self._pending:
                    self._written.wait()
            finally:
                self._urgent -= 1

    def _settle(self, key: str) -> None:
        """Wait until a fragment committed under ``key`` is written (or given up)."""
        with self._written:
            if key not in self._pending:
                return
            self._urgent += 1
            self._written.notify_all()
            try:
                while key in self._pending:
                    self._written.wait()
            finally:
                self._urgent -= 1

    def _submit(self, key: str, item: _Pending) -> None:
        """Queue a committed fragment for the writing thread (waits while too much is queued)."""
        self._submit_all([(key, item)])

    def _submit_all(self, items: Sequence[tuple[str, _Pending]], *, now: bool = False) -> None:
        """Queue committed fragments for the writing thread, in order; with ``now``, written
        without the batching delay (a stored layer's rows: found by other processes at once,
        and no later than when the build ends)."""
        with self._count_lock:
            self._absent.difference_update(key for key, _ in items)
        with self._written:
            for key, item in items:
                self._queue(key, item)
            if now and self._queued:
                self._now = True
                self._written.notify_all()

    def _queue(self, key: str, item: _Pending) -> None:
        """Queue one committed fragment (called with ``_written`` held; waits while too much
        is queued)."""
        while self._pending_bytes > _MAX_PENDING and self._pending:
            self._written.wait()
        if self._closing:  # closed meanwhile: not kept
            self._discard(item)
            return
        self._start_writer()  # first: when it cannot start, nothing is queued (the caller's)
        replaced = self._pending.get(key) if key in self._queued else None
        if replaced is not None:  # the same path committed twice before either was written
            self._pending_bytes -= replaced.memory
            self._discard(replaced)
        self._pending[key] = item
        self._queued[key] = None
        self._pending_bytes += item.memory
        self._queued_bytes += item.size
        if (
            len(self._queued) == 1  # the first of a batch starts its delay
            or self._queued_bytes >= _BATCH_BYTES
            or self._pending_bytes > _MAX_PENDING // 2
        ):
            self._written.notify_all()

    def _encode_ahead(self, layout: bytes | EncodesLayout | None) -> bytes | EncodesLayout | None:
        """A range's layout, encoded by the writing thread while the pack goes on.

        A range's row is queued only once its layer's blob is committed
        (:meth:`LayerRanges.stored`), at the end of the pack: encoding every
        layout then (deflating its header blocks: about 10 ms for the
        300 MB benchmark closure's) was a serial tail before the rows could
        be written, which closing the cache waited for.  Encoded now, with
        the queue's next batch; whatever is not yet when its row is written
        is encoded then, as before.  A layer never stored encoded its
        layouts for nothing, and records nothing.
        """
        if layout is None or isinstance(layout, bytes):
            return layout
        ahead = _EncodedAhead(layout)
        with self._written:
            if self._closing:
                return layout
            self._start_writer()  # first: when it cannot start, nothing is queued
            self._encoding.append(ahead)
            if len(self._encoding) == 1 and not self._queued:  # starts a batch's delay
                self._written.notify_all()
        return ahead

    def _start_writer(self) -> None:
        """Start the writing thread unless it runs (called with ``_written`` held).

        Raises what :meth:`threading.Thread.start` raises (no thread can be started), the
        cache then as before: the next call tries again.
        """
        if self._thread is None:
            thread = threading.Thread(
                target=self._write_queued, name="nixery-fragment-writer", daemon=True
            )
            thread.start()
            self._thread = thread  # only once started (it ends under _written, held here)

    def _write_queued(self) -> None:
        """The writing thread: stores what is queued, several fragments per transaction."""
        while self._write_batch():
            pass

    def _write_batch(self) -> bool:
        """Wait for a batch and store it; ``False``: closed, the thread ends.  One batch per
        call, so that what it wrote (bytes, layouts) is let go before waiting for the next."""
        with self._written:
            while not (self._queued or self._encoding or self._closing):
                self._written.wait()
            # A batch: _BATCH_BYTES, or what came within _BATCH_DELAY, or what someone
            # waits for (fewer wake-ups and transactions while a pack runs).
            deadline = time.monotonic() + (_BATCH_DELAY if self._queued else _ENCODE_DELAY)
            while (
                not (self._closing or self._urgent or self._now)
                and self._queued_bytes < _BATCH_BYTES
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._written.wait(left)
            self._queued_bytes = 0
            self._now = False
            encoding, self._encoding = self._encoding, []
            if not self._queued and self._closing:
                self._thread = None
                return False
            batch = [(key, self._pending[key]) for key in self._queued]
            self._queued.clear()
        if not self._closing:  # closing: only the rows queued count
            for ahead in encoding:
                # A failure costs only its row: met again, and reported, by _row.
                with contextlib.suppress(Exception):
                    ahead.encode()
        if not batch:
            return True
        try:
            self._store(batch)
        finally:
            with self._written:
                for key, item in batch:
                    if self._pending.get(key) is item:
                        del self._pending[key]
                    self._pending_bytes -= item.memory
                self._written.notify_all()
        return True

    def _store(self, batch: list[tuple[str, _Pending]]) -> None:
        """Write a batch's files, then its rows in one transaction (evicting past the limit)."""
        rows: list[tuple[object, ...]] = []
        for key, item in batch:
            try:
                rows.append(self._row(key, item))
            except Exception as exc:  # noqa: BLE001 - the cache only saves work: never stop writing
                log.warning("fragment cache write of %s failed (%s); not kept", key, exc)
                self._discard(item)
        self._record_touches()  # storing may evict: by use up to now
        if not rows:
            return
        now = time.time()
        try:
            with self._index() as con, _transaction(con):
                # The same paths kept again (by another process, a repair): their old rows
                # go, found in one query per _KEYS_PER_QUERY rows, not one per row (a
                # cold pack's batch finds none; one query each cost its writing thread
                # about 10 microseconds a row).
                old = _rows_of(con, [str(row[0]) for row in rows])
                if old:
                    con.executemany(
                        "DELETE FROM fragments WHERE key = ?", [(key,) for key, _ in old]
                    )
                gone = [file for _, file in old if file is not None]
                con.executemany(
                    "INSERT INTO fragments (key, file, data, size, uncompressed, crc, layout,"
                    " charge, blob, offset, used) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(*row, now) for row in rows],
                )
                gone += self._evict(con)
        except (OSError, sqlite3.Error) as exc:
            log.warning("fragment cache write of %d fragments failed (%s); not kept",
                        len(rows), exc)
            gone = [str(row[1]) for row in rows if row[1] is not None]
        for file in gone:
            self._unlink(file)

    def _row(self, key: str, item: _Pending) -> tuple[object, ...]:
        """The index row of a committed fragment, its bytes written to their file first."""
        file, data, crc = item.file, None, item.crc
        if item.pieces is not None:
            crc = 0
            for piece in item.pieces:
                crc = _crc32(piece, crc)
            if item.size < _INLINE_SIZE:
                data = b"".join(item.pieces)
            else:
                file = self._new_file(item.pieces)
        layout = item.layout
        if layout is not None and not isinstance(layout, bytes):
            layout = layout.encode()
        # A range's bytes are the store's: only its row counts against the limit.
        kept = item.size if item.blob is None else 0
        charge = kept + (len(layout) if layout else 0) + _ROW_CHARGE
        return (key, file, data, item.size, item.uncompressed_size, crc, layout, charge,
                item.blob, item.offset)

    def _new_file(self, pieces: Sequence[bytes] = ()) -> str:
        """A new data file holding ``pieces``; its name under the data directory.

        Written through the page cache: ``O_DIRECT`` writes (through one
        aligned buffer) cost the writing thread more here, 0.10-0.115
        against 0.087-0.092 CPU-seconds for the 300 MB benchmark closure's
        115 MB of fragments.
        """
        # Any key (not only a hex digest) gets a safe, unique name; the owner token tells a
        # sweep whether the process that wrote it is alive (see _sweep).
        token = os.urandom(16).hex()
        name = f"{token[0]}/{token}.{self._owner[0]}"
        fd = os.open(self._data / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, pieces)
        except BaseException:
            os.close(fd)
            self._unlink(name)
            raise
        os.close(fd)
        return name

    def _unlink(self, file: str) -> None:
        try:
            (self._data / file).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove fragment file %s (%s)", file, exc)

    def _discard(self, item: _Pending) -> None:
        """Drop a committed fragment that will not be kept (its file, if written already)."""
        if item.file is not None and item.pieces is None:
            self._unlink(item.file)

    def _withdraw(self, key: str, item: _Pending | None) -> None:
        """Take back the copy committed under ``key`` as ``item`` (``None``: let go by the
        writing thread, written): unqueued while it waits, else its row deleted once
        written (any copy's row under ``key``: at worst a later miss).  Never raises.

        A chunked store path's frames are committed before its TOC part: a part that
        then fails withdraws them, so the pair leaves neither row nor file.
        """
        if item is not None:
            with self._written:
                queued = key in self._queued and self._pending.get(key) is item
                if queued:
                    del self._queued[key], self._pending[key]
                    self._pending_bytes -= item.memory
                    self._queued_bytes -= item.size
                    self._written.notify_all()  # a packer may wait for room
            if queued:
                self._discard(item)
                return
            self._settle(key)  # being written now: its row first
        self._delete_key(key, copies_only=True)

    def _delete_key(self, key: str, *, copies_only: bool = False) -> None:
        """Delete the rows under ``key`` (only copies', with ``copies_only``) and their data
        files.  Never raises."""
        query = "DELETE FROM fragments WHERE key = ?"
        if copies_only:
            query += " AND blob IS NULL"
        gone: list[tuple[str | None]] = []
        with contextlib.suppress(OSError, sqlite3.Error), self._index() as con, \
                _transaction(con):
            gone = con.execute(query + " RETURNING file", (key,)).fetchall()
        for (file,) in gone:
            if file is not None:
                self._unlink(file)

    def _evict(self, con: sqlite3.Connection) -> list[str]:
        """Delete the least recently used rows until the volume is within the limit; their files."""
        (volume,) = con.execute("SELECT bytes FROM volume").fetchone()
        over = volume - self.size_limit
        files: list[str] = []
        while over > 0:
            victims = con.execute(
                "SELECT rowid, file, charge FROM fragments ORDER BY used, rowid LIMIT 64"
            ).fetchall()
            if not victims:
                break
            taken = []
            for rowid, file, charge in victims:
                if over <= 0:
                    break
                taken.append((rowid,))
                if file is not None:
                    files.append(file)
                over -= charge
            con.executemany("DELETE FROM fragments WHERE rowid = ?", taken)
        return files

    def _record_touches(self) -> None:
        """Record the access times of the hits so far, in one transaction."""
        with self._count_lock:
            keys, self._touched = self._touched, []
        if not keys:
            return
        now = time.time()
        try:
            with self._index() as con, _transaction(con):
                con.executemany(
                    "UPDATE fragments SET used = ? WHERE key = ?", [(now, key) for key in keys]
                )
        except (OSError, sqlite3.Error) as exc:
            log.warning("fragment cache access times not recorded (%s)", exc)

    def __enter__(self) -> FragmentCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prefetch(self, keys: Sequence[str], *, sides: Collection[str] = ()) -> None:
        """Find which of ``keys`` are absent, in one query: their :meth:`get` is then a miss
        at once (a cold pack asks for every store path of its layer; one query each cost
        it more than the rest of its lookups).  ``sides`` do not matter here: nothing is
        fetched (each kept part was checked as it was kept).

        A key stored by this process afterwards is looked up as usual; one another process
        stores meanwhile is missed (and packed again: the same bytes), never wrong.
        """
        self.prefetch_ranges(keys)

    def prefetch_ranges(self, keys: Sequence[str]) -> list[KeptRange]:
        """:meth:`prefetch`, returning from the same query the fragments of ``keys`` kept
        as ranges of layer blobs, in the order of ``keys`` (one query per
        :data:`_KEYS_PER_QUERY` keys; ``[]`` when the index fails)."""
        wanted = list(dict.fromkeys(keys))
        found: set[str] = set()
        ranges: dict[str, KeptRange] = {}
        try:
            with self._index() as con:
                for start in range(0, len(wanted), _KEYS_PER_QUERY):
                    chunk = wanted[start : start + _KEYS_PER_QUERY]
                    marks = ",".join("?" * len(chunk))
                    for key, blob, offset, size in con.execute(
                        "SELECT key, blob, offset, size FROM fragments"  # noqa: S608 - only placeholders are interpolated
                        f" WHERE key IN ({marks})", chunk
                    ):
                        found.add(key)
                        if blob is not None and isinstance(offset, int) and isinstance(size, int):
                            ranges[key] = KeptRange(key, blob, offset, size)
        except (OSError, sqlite3.Error) as exc:
            log.warning("fragment cache read failed (%s); looking keys up one by one", exc)
            return []
        with self._written:  # committed here, still being written: present
            found.update(key for key in wanted if key in self._pending)
        with self._count_lock:
            if len(self._absent) > _MAX_ABSENT:  # packs that failed before asking: forget
                self._absent.clear()
            self._absent.update(key for key in wanted if key not in found)
        return [ranges[key] for key in wanted if key in ranges]

    def __contains__(self, key: object) -> bool:
        """Whether a fragment is kept under ``key`` (not checked, not counted as a use)."""
        with self._written:
            if key in self._pending:
                return True
        try:
            with self._index() as con:
                row = con.execute("SELECT 1 FROM fragments WHERE key = ?", (key,)).fetchone()
        except (OSError, sqlite3.Error):
            return False
        return row is not None

    def keys(self) -> list[str]:
        """The keys of the fragments kept (written so far), sorted."""
        with self._translated("list"), self._index() as con:
            rows = con.execute("SELECT key FROM fragments ORDER BY key").fetchall()
        return [key for (key,) in rows]

    def volume(self) -> int:
        """Bytes the fragments kept count against ``size_limit`` (their bytes and layouts)."""
        with self._translated("measure"), self._index() as con:
            (volume,) = con.execute("SELECT bytes FROM volume").fetchone()
        return int(volume)

    def check(self, store: SupportsBlobInfo | None = None, *, repair: bool = False) -> list[str]:
        """What is wrong with the directory: the index's own check, rows whose file is gone,
        and files no row names whose writer is not alive (a sweep removes those).

        A file of a live process's cache that no row names yet is in flight, not wrong.
        With ``store``, also ranges of layer blobs ``store`` no longer holds (collected:
        each such range is a miss); ``repair`` drops those rows (the problem then says
        so).
        """
        with self._translated("check"):
            problems = self._problems()
            if store is not None:
                gone = self.range_blobs_not_stored(store)
                dropped = self.drop_ranges_of(gone) if repair else 0
                problems += [
                    f"ranges of a blob not stored{' (dropped)' if dropped else ''}: {blob}"
                    for blob in gone
                ]
            return problems

    def range_blobs(self) -> set[str]:
        """The layer blobs the fragments kept as ranges name."""
        with self._translated("list"), self._index() as con:
            return {blob for (blob,) in con.execute(
                "SELECT DISTINCT blob FROM fragments WHERE blob IS NOT NULL")}

    def range_blobs_not_stored(
        self, store: SupportsBlobInfo, listed: Collection[str] = ()
    ) -> list[str]:
        """The layer blobs ranges name that ``store`` does not hold, sorted: asked of the
        store, but for those in ``listed`` (a listing of it just made, as gc's)."""
        return sorted(
            blob for blob in self.range_blobs()
            if blob not in listed and store.blob_info(blob) is None
        )

    def drop_ranges_of(self, blobs: Iterable[str]) -> int:
        """Drop the fragments kept as ranges of ``blobs`` (collected); how many went.

        Garbage collection calls it for the blobs it deleted
        (:func:`~nixery_core.gc.collect_garbage` with ``fragments``), so
        those ranges do not linger as misses.
        """
        gone = [(blob,) for blob in blobs]
        if not gone:
            return 0
        with self._translated("prune"), self._index() as con, _transaction(con):
            # The rows deleted, summed over the blobs (not the trigger's updates of the volume).
            return con.executemany("DELETE FROM fragments WHERE blob = ?", gone).rowcount

    def _problems(self) -> list[str]:
        live, dead = self._scan_owners()
        _release(dead)
        with self._index() as con:
            problems = [
                f"index: {message}" for (message,) in con.execute("PRAGMA integrity_check")
                if message != "ok"
            ]
        named = self._named_files()
        present = {
            f"{sub.name}/{entry.name}"
            for sub in self._data.iterdir() if sub.is_dir()
            for entry in sub.iterdir()
        } if self._data.is_dir() else set()
        problems += [f"missing file: {self._data / file}" for file in sorted(named - present)]
        problems += [
            f"unknown file: {self._data / file}" for file in sorted(present - named)
            if _owner_of(file) not in live
        ]
        return problems

    @contextlib.contextmanager
    def peek(
        self, key: str, blobs: SupportsReading | None = None
    ) -> Iterator[CachedFragment | None]:
        """The fragment under ``key``, checked, but not counted as a hit or a use.

        A fragment kept as a range of a layer blob is read from ``blobs``
        (``None``: such a fragment is a miss, and stays).
        """
        found = self._lookup(key, blobs)
        try:
            yield found
        finally:
            if found is not None:
                found.stream.close()

    def get(
        self, key: str, *, side: bool = False
    ) -> contextlib.AbstractContextManager[CachedFragment | None]:
        """The fragment under ``key``, checked against its CRC-32 (``None``: a miss).

        A fragment kept as a byte range of a layer blob is a miss here (and
        stays): it is read through :meth:`on_store`'s view of a store.  A
        ``side`` part is not held in memory from its check to its copy.
        """
        return self._get(key, None, hold=not side)

    def on_store(self, store: SupportsReading) -> StoreFragments:
        """This cache seen from ``store``: new fragments kept as ranges of its layer blobs."""
        return StoreFragments(self, store)

    @contextlib.contextmanager
    def _get(
        self, key: str, blobs: SupportsReading | None, *, copy: bool = False,
        reads: RangeReads | None = None, hold: bool = True,
    ) -> Iterator[CachedFragment | None]:
        with self._count_lock:
            absent = key in self._absent
            if absent:
                self._absent.discard(key)
                self.misses += 1
        if absent:
            yield None
            return
        found = self._lookup(key, blobs, copy=copy, reads=reads, hold=hold)
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

    def _lookup(
        self, key: str, blobs: SupportsReading | None, *, copy: bool = False,
        reads: RangeReads | None = None, hold: bool = True,
    ) -> CachedFragment | None:
        """The fragment under ``key``, its bytes checked (``None``: a miss).

        With ``copy``, a range is copied into the cache as it is checked (the
        copy kept once its bytes match) and the fragment returned reads the
        copy: the range is read from its store once.  ``reads``: the ranges
        read ahead for the layer being packed.  Without ``hold``, its pieces
        are not kept in memory from the check to the copy (a side part).
        """
        self._settle(key)
        try:
            with self._index() as con:
                row = con.execute(
                    "SELECT file, data, size, uncompressed, crc, layout, blob, offset"
                    " FROM fragments WHERE key = ?",
                    (key,),
                ).fetchone()
        except (OSError, sqlite3.Error) as exc:
            log.warning("fragment cache read of %s failed (%s); packing it", key, exc)
            return None
        if row is None or (row[6] is not None and blobs is None):
            return None  # absent, or a range of a blob in a store this caller did not name
        file, data, expected, uncompressed, crc, layout, blob, offset = row
        try:
            # Closed by the caller (through peek/get).
            stream = self._open(key, file, data, (blob, offset, expected), blobs=blobs,
                                reads=reads)
        except (OSError, NixeryError) as exc:
            self._unreadable(key, file, blob, exc)
            return None
        copier = self.writer(key) if copy and blob is not None else None
        copied_from = None
        try:
            held = _read_checking(stream, (expected, crc), copier, hold=hold)
        except (OSError, NixeryError, _Changed) as exc:
            stream.close()
            if copier is not None:
                copier.discard()
            if isinstance(exc, _Changed):
                self._drop(key, file, "its bytes changed", blob)
            else:
                self._unreadable(key, file, blob, exc)
            return None
        if copier is not None:
            copier.layout = layout or None
            again = copier._commit_readable(uncompressed)
            if isinstance(again, tuple):
                held, blob, copied_from = again, None, blob
            elif again is not None:  # read from the copy's file (re-checked as it is)
                stream.close()
                stream, blob, copied_from = again, None, blob
        return CachedFragment(
            stream, expected, uncompressed, crc, held, layout or None, blob, key, copied_from,
            drop=functools.partial(self._refuse, key),
        )

    def _open(
        self,
        key: str,
        file: str | None,
        data: bytes | None,
        blob_range: tuple[str | None, int, int],
        *,
        blobs: SupportsReading | None,
        reads: RangeReads | None = None,
    ) -> BinaryIO:
        """A stream of a kept fragment: a range of a stored blob (read ahead by ``reads``
        when planned there), its row's bytes or its file."""
        blob, offset, size = blob_range
        if blob is not None and blobs is not None:
            # Only a row damaged outside this module has another range: dropped as a miss.
            if not (isinstance(offset, int) and offset >= 0 and isinstance(size, int)):
                raise LayerError(f"its index row is damaged (offset {offset!r}, size {size!r})")
            if reads is not None and key in reads:
                return io.BytesIO(reads.take(key, blob, offset, size))
            return open_range(blobs, blob, offset, size)
        if file is None:
            return io.BytesIO(data or b"")
        return (self._data / file).open("rb")

    def _unreadable(
        self, key: str, file: str | None, blob: str | None, exc: OSError | NixeryError
    ) -> None:
        """A fragment that could not be read is a miss; dropped unless its store was unavailable.

        A range whose store did not answer (:class:`StorageUnavailable`, a
        transient failure) may well be fine: it stays for the next lookup.
        Anything else (the blob gone, the file unreadable) drops it.
        """
        if blob is not None and isinstance(exc, StorageUnavailable):
            log.warning("fragment %s: its blob's store is unavailable (%s); packing it", key, exc)
            return
        self._drop(key, file, f"unreadable ({exc})", blob)

    def _drop(self, key: str, file: str | None, why: str, blob: str | None = None) -> None:
        log.warning("dropping cached fragment %s: %s", key, why)
        with contextlib.suppress(OSError, sqlite3.Error), self._index() as con, _transaction(con):
            con.execute(
                "DELETE FROM fragments WHERE key = ? AND file IS ? AND blob IS ?",
                (key, file, blob),
            )
        if file is not None:
            self._unlink(file)

    def _refuse(self, key: str, why: str) -> None:
        """Drop the fragment under ``key`` (its row, a copy's file): it passed its check but
        failed as a pack copied it.  Counted in :attr:`refused`; never raises."""
        log.warning("dropping cached fragment %s: %s", key, why)
        with self._count_lock:
            self.refused += 1
            if len(self._refused_keys) >= _MAX_ABSENT:
                self._refused_keys.clear()
            self._refused_keys.add(key)
        self._settle(key)
        self._delete_key(key)

    def was_refused(self, key: str) -> bool:
        """Whether a fragment under ``key`` failed a pack in this process (dropped then):
        a remote tier does not fetch it again (the pack compresses the store path, and
        shares that fragment in its stead)."""
        with self._count_lock:
            return key in self._refused_keys

    def keep_range(
        self, key: str, blob: str, *, offset: int, size: int, uncompressed_size: int,
        crc: int, layout: bytes | EncodesLayout | None = None,
    ) -> None:
        """Keep a fragment as ``size`` bytes of the stored blob ``blob`` from ``offset``
        (queued like a copy; its bytes are read and checked when it is reused)."""
        self._keep_ranges(blob, [(key, offset, size, uncompressed_size, crc, layout)])

    def _keep_ranges(
        self, blob: str, records: Iterable[RangeRecord], *, now: bool = False
    ) -> None:
        """:meth:`keep_range` for each of ``records``, queued at once; with ``now``, written
        without the batching delay (see :meth:`_submit_all`)."""
        self._submit_all([
            (key, _Pending(None, None, size, uncompressed, crc, layout, memory=0,
                           blob=blob, offset=offset))
            for key, offset, size, uncompressed, crc, layout in records
        ], now=now)

    def put(self, key: str, pieces: Sequence[bytes], uncompressed_size: int) -> None:
        """Keep a fragment of ``pieces`` (its compressed bytes, in order); written on return."""
        writer = self.writer(key)
        for piece in pieces:
            writer.add(piece)
        writer.commit(uncompressed_size)
        self._settle(key)

    def writer(self, key: str, *, side: bool = False) -> FragmentWriter:
        """Record a fragment piece by piece while it is compressed; kept at ``commit``.

        A ``side`` part goes to its data file past 1 MiB instead of 16 MiB.
        """
        return FragmentWriter(self, key, side=side)


#: The index (SQLite) and the directory of the fragments' files, in the cache directory.
_INDEX = "index.sqlite"
_DATA = "data"
#: The data directory's subdirectories, by a file name's first hex digit (made when opened).
_SUBDIRECTORIES = "0123456789abcdef"
#: One owner file per open cache (``flock``ed while open), and a file being made one.
_OWNERS = "owners"
_CLAIM = ".claim"
#: Held while a damaged index is replaced.
_RESET_LOCK = "reset.lock"
#: Unnamed files whose name carries no owner token are removed once this old (nanoseconds).
_UNOWNED_GRACE = 3600 * 10**9
#: Fragments smaller than this are kept in the index, larger ones in files of their own.
_INLINE_SIZE = 32 << 10
#: Bytes each fragment counts against the limit beyond its bytes and layout (its row, its inode).
_ROW_CHARGE = 256
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS fragments (
        key TEXT PRIMARY KEY,
        file TEXT,
        data BLOB,
        size INTEGER NOT NULL,
        uncompressed INTEGER NOT NULL,
        crc INTEGER NOT NULL,
        layout BLOB,
        charge INTEGER NOT NULL,
        used REAL NOT NULL,
        blob TEXT,
        offset INTEGER
    )""",
    "CREATE INDEX IF NOT EXISTS fragments_by_use ON fragments (used)",
    "CREATE TABLE IF NOT EXISTS volume (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER)",
    "INSERT OR IGNORE INTO volume VALUES (0, 0)",
    """CREATE TRIGGER IF NOT EXISTS fragment_added AFTER INSERT ON fragments
        BEGIN UPDATE volume SET bytes = bytes + new.charge WHERE id = 0; END""",
    """CREATE TRIGGER IF NOT EXISTS fragment_removed AFTER DELETE ON fragments
        BEGIN UPDATE volume SET bytes = bytes - old.charge WHERE id = 0; END""",
)


@contextlib.contextmanager
def _transaction(con: sqlite3.Connection) -> Iterator[None]:
    """One write transaction (taken at once, so concurrent writers queue instead of failing).

    Rolled back when the block or the commit fails, unless SQLite already
    did: the shared connection is never left inside a transaction.
    """
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise


def _rows_of(con: sqlite3.Connection, keys: Sequence[str]) -> list[tuple[str, str | None]]:
    """The key and file of each row kept under one of ``keys`` (distinct), one query per
    :data:`_KEYS_PER_QUERY` keys."""
    found: list[tuple[str, str | None]] = []
    for start in range(0, len(keys), _KEYS_PER_QUERY):
        chunk = keys[start : start + _KEYS_PER_QUERY]
        marks = ",".join("?" * len(chunk))
        found += con.execute(
            f"SELECT key, file FROM fragments WHERE key IN ({marks})",  # noqa: S608 - only placeholders are interpolated
            chunk,
        ).fetchall()
    return found


def _write_all(fd: int, pieces: Sequence[bytes]) -> None:
    """Write ``pieces`` to ``fd`` in order.

    One ``write`` per piece: one ``writev`` of all of a fragment's pieces
    cost the kernel about twice the CPU time here (the 300 MB benchmark
    closure's fragments: 0.15-0.27 against 0.07-0.12 system seconds).
    """
    for piece in pieces:
        view = memoryview(piece)
        while view:
            view = view[os.write(fd, view) :]


def _claim_owner(owners: Path) -> tuple[str, int]:
    """A new owner token and the descriptor of its owner file, ``flock``ed.

    Made as ``<token>.claim``, locked, then renamed: an owner file is
    locked from the moment its name appears, so a scan never takes a live
    cache for dead.  (A scan may remove a ``.claim`` file before it is
    locked: the rename then fails and another token is tried.)
    """
    owners.mkdir(exist_ok=True)
    while True:
        token = os.urandom(8).hex()
        claim = owners / f"{token}{_CLAIM}"
        fd = os.open(claim, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            claim.rename(owners / token)
        except BlockingIOError:
            os.close(fd)  # a scan holds it for a moment, to remove it
            continue
        except FileNotFoundError:
            os.close(fd)  # removed by a scan before locked
            continue
        except BaseException:
            os.close(fd)
            claim.unlink(missing_ok=True)
            raise
        return token, fd


def _owner_of(name: str) -> str | None:
    """The owner token in a data file's name (``None``: a name of the earlier kind)."""
    owner = name.rpartition(".")[2] if "." in name else ""
    return owner or None


def _release(locked: Mapping[str, int]) -> None:
    """Close descriptors of owner files locked by a scan (dropping their locks)."""
    for fd in locked.values():
        os.close(fd)


def _remove_diskcache_layout(directory: Path) -> None:
    """Remove a fragment cache left by an earlier version (a :mod:`diskcache` directory).

    Its fragments are not carried over (they are packed again when next
    needed); its database and its two-hex-digit subdirectories go.
    """
    old = directory / "cache.db"
    if not old.exists():
        return
    log.info("removing the earlier fragment cache format in %s", directory)
    for sub in directory.iterdir():
        if sub.is_dir() and len(sub.name) == 2 and all(c in "0123456789abcdef" for c in sub.name):
            shutil.rmtree(sub, ignore_errors=True)
    for name in ("cache.db", "cache.db-wal", "cache.db-shm"):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()


class EncodesLayout(Protocol):
    """A fragment layout still to encode (a :class:`~.fragment_layout.LayoutRecorder`)."""

    def encode(self) -> bytes | None: ...


@attrs.frozen
class _Pending:
    """A committed fragment waiting for the writing thread."""

    #: Its bytes, in order (the writing thread writes them); ``None``: already in ``file``.
    pieces: list[bytes] | None
    #: Its data file, when written while recorded (a large fragment).
    file: str | None
    size: int
    uncompressed_size: int
    #: CRC-32 of its bytes, when computed while recorded (else by the writing thread).
    crc: int
    layout: bytes | EncodesLayout | None
    #: Bytes of memory it holds until written (a fragment already in its file holds none).
    memory: int
    #: A range of this layer blob (digest), from ``offset``: no bytes to write
    #: (both ``None``: a copy).
    blob: str | None = None
    offset: int | None = None


@attrs.define
class FragmentWriter:
    """A fragment being recorded: in memory up to 16 MiB, then straight into its data file.

    A fragment in memory is written by the cache's writing thread (which
    also computes its CRC-32); the packing thread only keeps references to
    the pieces it was going to write anyway.
    """

    _cache: FragmentCache
    key: str
    #: A side part (see :class:`FragmentSource`): written to its file past 1 MiB, not 16 MiB.
    side: bool = attrs.field(default=False, kw_only=True)
    _pieces: list[bytes] = attrs.field(init=False, factory=list)
    _size: int = attrs.field(init=False, default=0)
    _crc: int = attrs.field(init=False, default=0)
    #: Its data file (name, descriptor) once past :data:`_SPILL_SIZE`; ``_DISCARDED``: could
    #: not be made or written, or :meth:`discard` was called: the fragment is not kept.
    _file: tuple[str, int] | None = attrs.field(init=False, default=None)
    #: Kept with the fragment: how its uncompressed bytes are rebuilt from the store
    #: (:mod:`nixery_core.fragment_layout`), set by the packer before :meth:`commit`;
    #: encoded by the writing thread when given unencoded.
    layout: bytes | EncodesLayout | None = attrs.field(init=False, default=None)
    #: Where its first byte is in the layer blob, set by the packer when that byte is written.
    offset: int | None = attrs.field(init=False, default=None)
    #: What :meth:`commit` queued, weakly (the writing thread lets it go once written),
    #: for :meth:`discard` to withdraw; ``None``: not committed.
    _queued: weakref.ref[_Pending] | None = attrs.field(init=False, default=None)

    def add(self, piece: bytes) -> None:
        self._size += len(piece)
        if self._file is None:
            self._pieces.append(piece)
            if self._size > (_SIDE_SPILL_SIZE if self.side else _SPILL_SIZE):
                self._spill()
            return
        if self._file is _DISCARDED:
            return
        self._crc = _crc32(piece, self._crc)
        try:
            _write_all(self._file[1], (piece,))
        except OSError as exc:
            log.warning("cannot write fragment %s (%s); not kept", self.key, exc)
            self._close_file(remove=True)
            self._file = _DISCARDED

    def _spill(self) -> None:
        """Too large to hold: write what is held to its data file, and the rest as it comes."""
        pieces, self._pieces = self._pieces, []
        for piece in pieces:
            self._crc = _crc32(piece, self._crc)
        try:
            name = self._cache._new_file(pieces)
            fd = os.open(self._cache._data / name, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("cannot write fragment %s (%s); not kept", self.key, exc)
            self._file = _DISCARDED
            return
        self._file = (name, fd)

    def _close_file(self, *, remove: bool) -> str | None:
        file, self._file = self._file, None
        if file is None or file is _DISCARDED:
            return None
        os.close(file[1])
        if remove:
            self._cache._unlink(file[0])
            return None
        return file[0]

    def commit(self, uncompressed_size: int) -> None:
        """Keep the fragment: queued, written by the cache's writing thread.

        Looking the key up waits until it is written; a failure to write is
        a warning (the cache only saves work).  A failure to queue it (the
        writing thread cannot be started) is raised, nothing of it kept (its
        file removed): the packer's recording logs it and packs on.

        After :meth:`discard` (or a failure to write it) it keeps nothing and
        raises nothing: a no-op, as a fragment dropped on one thread (the
        packer's hashing queue) may still be committed by its packer.
        """
        if self._file is _DISCARDED:
            return
        pieces, self._pieces = self._pieces, []
        fields = (self._size, uncompressed_size, self._crc, self.layout)
        if self._file is not None:
            item = _Pending(None, self._close_file(remove=False), *fields, memory=0)
        else:
            item = _Pending(pieces, None, *fields, memory=self._size)
        try:
            self._cache._submit(self.key, item)
        except BaseException:
            self._cache._discard(item)
            raise
        self._queued = weakref.ref(item)

    def _commit_readable(self, uncompressed_size: int) -> tuple[bytes, ...] | BinaryIO | None:
        """:meth:`commit`, and the bytes committed to read them again: the pieces held, or
        their file opened before it is queued (readable whatever becomes of its name);
        ``None`` when they are not kept (a failure to write them)."""
        if self._file is None:
            pieces = tuple(self._pieces)
            return pieces if self.keep(uncompressed_size) else None
        again: BinaryIO | None = None
        if self._file is not _DISCARDED:
            try:
                again = (self._cache._data / self._file[0]).open("rb")
            except OSError as exc:
                log.warning("cannot read fragment %s back (%s)", self.key, exc)
        if not self.keep(uncompressed_size) and again is not None:
            again.close()
            again = None
        return again

    def keep(self, uncompressed_size: int) -> bool:
        """:meth:`commit`, a failure to (the cache's writing thread cannot be started, a
        bug) logged: nothing of the fragment is kept (:meth:`commit` dropped it) and the
        caller goes on (the cache only saves work: a pack, or whoever read the bytes
        being copied, goes on with them).  Whether it was kept."""
        try:
            self.commit(uncompressed_size)
        except Exception as exc:  # noqa: BLE001 - a recording's failure is a miss, never the pack's
            log.warning("fragment %s not kept: recording it failed (%s)", self.key, exc)
            return False
        return True

    @property
    def discarded(self) -> bool:
        """Whether nothing of it will be kept: :meth:`discard` was called, or writing it
        failed (then :meth:`commit` is a no-op)."""
        return self._file is _DISCARDED

    def discard(self) -> None:
        """Drop the fragment: its pieces, its data file (removed).  For good: bytes added
        after it are not kept (no data file is made for them) and :meth:`commit` after it
        keeps no row (a no-op: see there).  After :meth:`commit` (its pair's other part
        failed) the copy is withdrawn: unqueued, or its row deleted once written."""
        self._pieces = []
        if self._file is not _DISCARDED:
            self._close_file(remove=True)
            self._file = _DISCARDED
        queued, self._queued = self._queued, None
        if queued is not None:
            self._cache._withdraw(self.key, queued())


class _EncodedAhead:
    """A range's layout, encoded once by whichever thread asks first; the recorder is then
    let go.

    The cache's writing thread asks (ahead, while the pack goes on:
    :meth:`FragmentCache._encode_ahead`; then for its row), and so does a
    bucket tier sharing the range as a reference, on its own thread
    (:mod:`nixery_core.fragment_bucket`), maybe at the same time: one
    encodes, the other waits for its bytes.
    """

    __slots__ = ("_encoded", "_layout", "_lock")

    def __init__(self, layout: EncodesLayout) -> None:
        self._layout: EncodesLayout | None = layout
        self._encoded: bytes | None = None
        self._lock = threading.Lock()

    def encode(self) -> bytes | None:
        if self._layout is None:  # encoded already: the bytes were set before this
            return self._encoded
        with self._lock:
            layout = self._layout
            if layout is not None:  # raising: asked again, encoded again
                self._encoded = layout.encode()
                self._layout = None  # after the bytes are set: whoever sees None finds them
        return self._encoded


#: Stands in for a data file that could not be made: the pieces are dropped.
_DISCARDED: tuple[str, int] = ("", -1)


class _BlobRange(io.RawIOBase):
    """``size`` bytes of an open blob from ``offset``, read as a stream of their own."""

    def __init__(self, blob: BinaryIO, offset: int, size: int) -> None:
        super().__init__()
        self._blob, self._offset, self._size, self._pos = blob, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes (all that is left: ``None`` or negative), in one read of the
        blob (not through :meth:`readinto`, which would copy them twice more)."""
        left = self._size - self._pos
        wanted = left if size is None or size < 0 else min(size, left)
        if wanted <= 0:
            return b""
        self._blob.seek(self._offset + self._pos)
        data = self._blob.read(wanted)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read()

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]  # bytes-like in, count out
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._blob.close()
        super().close()


class _Changed(Exception):
    """Raised within a lookup when a fragment's length or CRC-32 differs from its row's."""


def _read_checking(
    stream: BinaryIO, expected: tuple[int, int], copier: FragmentWriter | None, *, hold: bool
) -> tuple[bytes, ...] | None:
    """Read a kept fragment whole and check its length and CRC-32 (``expected``), or raise
    :class:`_Changed`; its pieces if it is small (up to :data:`_HOLD_SIZE`) and ``hold``.
    Every piece also goes to ``copier``, if given."""
    size, crc = 0, 0
    held: list[bytes] | None = [] if hold else None
    while piece := stream.read(_READ_SIZE):
        size += len(piece)
        crc = _crc32(piece, crc)
        if copier is not None:
            copier.add(piece)
        if held is not None and size <= _HOLD_SIZE:
            held.append(piece)
        else:
            held = None
    if (size, crc) != expected:
        raise _Changed
    return None if held is None else tuple(held)


def open_range(blobs: SupportsReading, digest: str, offset: int, size: int) -> BinaryIO:
    """The range of a stored blob a fragment was kept as (a short blob reads short).

    On a remote store (:class:`~nixery_core.protocols.SupportsRangeReads`)
    one ranged request, or for a range over
    :data:`~nixery_core.fragment_reads.MAX_REQUEST` one request per that
    many bytes as the stream is read: memory stays bounded however large
    the fragment.
    """
    if reads_ranges_remotely(blobs):
        if size <= MAX_REQUEST:
            return io.BytesIO(blobs.read_range(digest, offset, size))
        ranged = _RangedBlob(blobs, digest, offset + size)
        return cast("BinaryIO", _BlobRange(cast("BinaryIO", ranged), offset, size))
    blob = blobs.open_blob(digest)
    return cast("BinaryIO", _BlobRange(blob, offset, size))


class _RangedBlob:
    """A blob on a remote store read (up to ``end``) as a seekable stream, by ranged requests
    of :data:`~nixery_core.fragment_reads.MAX_REQUEST` bytes, one piece held at a time."""

    def __init__(self, store: SupportsRangeReads, digest: str, end: int) -> None:
        self._store, self._digest, self._end = store, digest, end
        self._pos, self._start, self._piece = 0, 0, b""

    def seek(self, pos: int) -> int:
        self._pos = pos
        return pos

    def read(self, size: int) -> bytes:
        at = self._pos - self._start
        if not 0 <= at < len(self._piece):
            wanted = min(max(size, MAX_REQUEST), self._end - self._pos)
            self._start, at = self._pos, 0
            self._piece = self._store.read_range(self._digest, self._pos, wanted) \
                if wanted > 0 else b""
        data = self._piece[at : at + size]
        self._pos += len(data)
        return data

    def close(self) -> None:
        self._piece = b""


@attrs.frozen
class StoreFragments:
    """A :class:`FragmentCache` seen from one store that can read its blobs back.

    Lookups also find fragments kept as byte ranges of the store's layer
    blobs (read back and checked against their length and CRC-32; a blob
    gone, short or changed is a miss and the entry is dropped; an unavailable
    store is a miss that keeps it).  A layer
    packed through :meth:`layer` keeps its new fragments as ranges of its
    own blob instead of copies, recorded once :meth:`LayerRanges.stored`
    names the committed blob.  Any store holding a blob holds the same
    bytes (its name is their digest), so a range recorded on one store is
    correct on another that has the blob, and a miss on one that has not.
    """

    cache: FragmentCache
    store: SupportsReading
    #: Whether a range's first reuse keeps a copy in the cache (later reuses then read
    #: locally, and outlive the blob): by default where the store keeps no local blob files.
    copy_on_reuse: bool = attrs.field(
        default=attrs.Factory(lambda self: not isinstance(self.store, SupportsBlobFiles),
                              takes_self=True)
    )

    def prefetch(self, keys: Sequence[str], *, sides: Collection[str] = ()) -> None:
        self.cache.prefetch(keys)

    def get(
        self, key: str, *, side: bool = False
    ) -> contextlib.AbstractContextManager[CachedFragment | None]:
        return self._get(key, None, side=side)

    @contextlib.contextmanager
    def _get(
        self, key: str, reads: RangeReads | None, *, side: bool = False
    ) -> Iterator[CachedFragment | None]:
        """The fragment under ``key``; a range, with :attr:`copy_on_reuse`, copied into the
        cache as it is checked (read from the store once, later reuses read the copy).  A
        ``side`` part is a copy already, and not held in memory."""
        with self.cache._get(
            key, self.store, copy=self.copy_on_reuse and not side, reads=reads, hold=not side
        ) as found:
            yield found

    def plan(self, keys: Sequence[str]) -> RangeReads | None:
        """:meth:`prefetch` ``keys``, and the ranges of them kept here, read ahead from a
        remote store (:mod:`nixery_core.fragment_reads`), found by the same query;
        ``None`` on a store with local blob files or without ranged reads, or when none
        of ``keys`` is a range."""
        store = self.store
        if not reads_ranges_remotely(store):
            self.cache.prefetch(keys)
            return None
        ranges = self.cache.prefetch_ranges(keys)
        positions = {key: index for index, key in enumerate(keys)}  # as SharedLayer's
        return RangeReads(store, ranges, positions=positions) if ranges else None

    def writer(self, key: str, *, side: bool = False) -> FragmentWriter:
        """A copy, as :meth:`FragmentCache.writer` (no layer blob to refer to)."""
        return self.cache.writer(key, side=side)

    def layer(self) -> LayerRanges:
        """A :class:`FragmentSource` for packing one layer into this store."""
        return LayerRanges(self)


@attrs.define
class LayerRanges:
    """One layer being packed: its new fragments kept as ranges of its blob, once stored.

    Nothing is recorded until :meth:`stored` names the committed blob: a
    layer whose pack or commit failed leaves no entry pointing at a blob
    that is not stored.
    """

    _source: StoreFragments
    _recorded: list[RangeRecord] = attrs.field(init=False, factory=list)
    #: The ranges this layer reuses, read ahead (a remote store), once prefetched.
    _reads: RangeReads | None = attrs.field(init=False, default=None)

    def prefetch(self, keys: Sequence[str], *, sides: Collection[str] = ()) -> None:
        if self._reads is not None:
            self._reads.close()
        self._reads = self._source.plan(keys)  # prefetches too, in the same query

    def get(
        self, key: str, *, side: bool = False
    ) -> contextlib.AbstractContextManager[CachedFragment | None]:
        return self._source._get(key, self._reads, side=side)

    def writer(self, key: str, *, side: bool = False) -> FragmentWriter:
        """A range of this layer's blob; a side part (no bytes of the blob) is a copy."""
        if side:
            return self._source.cache.writer(key, side=True)
        return RangeWriter(self._source.cache, key, layer=self)

    @property
    def source(self) -> StoreFragments:
        """The cache and store this layer's ranges are kept in and read from."""
        return self._source

    @property
    def reads(self) -> RangeReads | None:
        """The ranges this layer reuses, read ahead (``None``: each read when needed)."""
        return self._reads

    @reads.setter
    def reads(self, reads: RangeReads | None) -> None:
        self._reads = reads

    def close(self) -> None:
        """The pack ended, however it ended: stop reading ahead (its threads end, its bytes
        are let go) even while a caller keeps a failed pack's exception."""
        if self._reads is not None:
            self._reads.close()

    def stored(self, digest: str) -> list[RangeRecord]:
        """The layer's blob is committed as ``digest``: keep its fragments as ranges of it.

        Returns what was kept (``[]`` when the cache failed: a warning, never
        a failed layer).
        """
        recorded, self._recorded = self._recorded, []
        self.close()
        try:
            self._source.cache._keep_ranges(digest, recorded, now=True)
        except Exception as exc:  # noqa: BLE001 - the cache only saves work: never fail the layer
            log.warning("fragments of %s not kept (%s)", digest, exc)
            return []
        return recorded


#: A fragment recorded as a range: key, offset, size, uncompressed size, CRC-32, layout.
RangeRecord = tuple[str, int, int, int, int, "bytes | EncodesLayout | None"]


@attrs.define
class RangeWriter(FragmentWriter):
    """A fragment recorded as a range of the layer blob: its size and CRC-32, no bytes kept."""

    _layer: LayerRanges = attrs.field(kw_only=True)
    #: It only checksums what it is given, and its commit only notes it (no IO, no wait): a
    #: chunked packer may give it both from its hashing queue, off the packing thread.
    checksums_only: ClassVar[bool] = True

    def add(self, piece: bytes) -> None:
        self._size += len(piece)
        self._crc = _crc32(piece, self._crc)

    def add_checksummed(self, size: int, crc: int) -> None:
        """The next ``size`` bytes, given by their CRC-32 (taken where they were compressed)."""
        self._size += size
        self._crc = _crc32_combine(self._crc, crc, size)

    #: What :meth:`commit` recorded, until the layer is stored (dropped by :meth:`discard`).
    _record: RangeRecord | None = attrs.field(init=False, default=None)

    def commit(self, uncompressed_size: int) -> None:
        if self.offset is None or not self._size or self._file is _DISCARDED:
            return
        layout = self._cache._encode_ahead(self.layout)  # raising: nothing recorded
        self._record = (self.key, self.offset, self._size, uncompressed_size, self._crc, layout)
        self._layer._recorded.append(self._record)

    def discard(self) -> None:
        """Drop the range, even once committed (its pair's other part failed), until the
        layer is stored; a :meth:`commit` after it records nothing."""
        self._file = _DISCARDED
        record, self._record = self._record, None
        if record is not None:
            recorded = self._layer._recorded
            for index in range(len(recorded) - 1, -1, -1):  # the last ones, most likely
                if recorded[index] is record:
                    del recorded[index]
                    break

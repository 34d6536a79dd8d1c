"""The bucket tier of the fragment cache: a store path compressed by one instance serves all.

Instances of a fleet share only the bucket (the store); each keeps its own
local :class:`~nixery_core.fragments.FragmentCache`.  :class:`BucketFragments`
sits in front of that local cache and is what
:func:`~nixery_core.archive.pack_store_paths` is given (a
:class:`~nixery_core.fragments.FragmentSource`), so an instance that never
packed a store path reuses the compressed fragment another instance made.
It is opt-in: ``BuildCache(directory, fragment_bucket=FragmentBucketPolicy())``.

**Layout.**  A fragment in the bucket is two things:

* a blob holding its compressed bytes, of media type
  :data:`FRAGMENT_MEDIA_TYPE`, content-addressed like every blob
  (``layers/<sha256>`` in the GCS and filesystem layouts) and uploaded
  through the store's own blob writer: staged, checked against its digest,
  published atomically, so never visible half-written;
* a small pointer object ``fragments/<key>`` (``key`` is
  :func:`~nixery_core.fragments.fragment_key`: the sha256 of the store path
  as read and the archive options, the local cache's key too), JSON
  ``{"version": 1, "digest", "size", "uncompressed_size", "crc32"}``,
  written only after its blob is stored.

The same compressed bytes under two keys are one blob.

**TOC parts compressed in the bucket** (pointer version 3).  A chunked
store path's TOC part (:mod:`nixery_core.fragment_toc`) is kept plain in
the local cache (compressing it cost the cold pack CPU), which made it
about 6x larger in the bucket than layout 3's zstd frame.  The upload
thread compresses it on the way, off the packing path, into one zstd frame
at level :data:`_PART_LEVEL` (its plain size pledged in the frame's
header): ``{"version": 3, "digest", "size", "crc32"}`` of that blob and
``"uncompressed_size"``, the plain lines' size.  A reader inflates it into
its local cache as it downloads it, plain as a part packed there, 256 KiB
at a time, holding the decoder to that level's window (a frame declaring
more, up to libzstd's 128 MiB, is refused before anything is allocated for
it).  A version 3 pointer names a TOC part only: fetched for frames, or
claiming an offset, it is refused.  Plain (version 1) TOC parts written
before are still read; an instance of an earlier version refuses a
version 3 pointer (a miss: it packs the path and shares its part plain,
replacing the pointer; correct either way, until every instance is
upgraded).

**References instead of copies.**  Where the layers packed into the store
keep their fragments as byte ranges of their blobs (``ranges`` given:
:class:`~nixery_core.fragments.StoreFragments`, which ``BuildCache`` gives
on stores with local blob files or ranged reads), no fragment blob is
uploaded: once a layer blob is committed, :class:`SharedLayer` queues for
each of its fragments of at least ``min_size`` bytes a pointer version 2,
``{"version": 2, "digest": <the layer blob>, "offset", "size",
"uncompressed_size", "crc32", "layout"}``.  A reader keeps a reference it
finds as a local range (no download) and reads it with its layer's other
ranges (:mod:`nixery_core.fragment_reads`), checked by length and CRC-32
before use (not inflated: one whose zstd frame headers declare too large
a window or another size is a miss before any byte is copied; one that
otherwise does not inflate as its pointer records fails the pack copying it
with
:class:`~nixery_core.errors.BadCachedFragment`, dropped first and not
fetched again by this process, so the layer packed again compresses the
path and replaces the pointer, whatever the new fragment's size;
``build_image`` does so by itself); a reader
without ranges downloads the range as a copy, checked by size, CRC-32 and
decompression.  A reference names a layer blob, which
lives while an entry names it; gc drops references whose blob is gone like
any other pointer.  An instance of an earlier version refuses a version 2
pointer (a miss: it packs the path and shares a copy, replacing the
reference; correct either way).

**Reading: local, then bucket, then pack.**  When a layer's pack starts,
every one of its keys the local cache lacks is looked up in the bucket, up
to ``threads`` at once, in the order the pack needs them (one pointer read
each; a miss costs only that); the pack goes on meanwhile and waits only
for the fragment it needs next.  A
fragment found is downloaded into the local cache (written to its file as
it comes, never held whole; its check inflates 256 KiB at a time, however
compressible: :mod:`nixery_core.inflating`) and checked on the way:
its size, sha256 (the blob's digest) and CRC-32 against the pointer, and
that it inflates to exactly the recorded number of bytes as complete gzip
members or zstd frames, a zstd frame declaring no larger window than the
pack's level gives (the pack says so:
:class:`~nixery_core.fragments.SupportsFrameWindow`; a frame declaring more
is refused before libzstd allocates it, where it was kept and then failed
the pack copying it) (one for a gzip or zstd layer's fragment, one per
frame for an eStargz or zstd:chunked layer's; a chunked store path's TOC
part is one zstd frame inflating to plain lines beginning as a part does,
or, from earlier versions, plain lines recorded with their own size as
their uncompressed size: :mod:`nixery_core.fragment_toc`, its entries
checked as the pack reads them).  Only a fragment passing
every check is kept; the pack then copies it from the local cache like any
local hit, so a layer's bytes are the same whether its fragments came from
the local cache, the bucket or fresh packing.  A bucket hit also restarts
the blob's age (``touch_blob`` on a store with
:class:`~nixery_core.protocols.SupportsRefresh`), in the background.

**A bad fragment is a miss, then repaired.**  A pointer that does not
parse, names an absent blob, or disagrees with its blob, a TOC part's
pointer claiming an offset (TOC parts are shared only as copies) or fetched
for frames, and a
blob whose bytes do not hash to its digest, are counted in
:attr:`BucketStats.rejected` and logged; the store path is packed, and the
new fragment is uploaded like any other, which overwrites the pointer and
replaces the damaged blob (every store replaces a stored copy that does
not match the bytes committed).  Storage failures are misses (reads) or
skipped uploads, with a warning: the bucket tier only saves work.

**Uploading.**  Each fragment this instance packs (not one it fetched)
whose compressed size is at least ``min_size`` (128 KiB by default) is
uploaded once it is in the local cache, read back from there: blob first,
pointer last.  A chunked store path's TOC part goes with its frames, first and
whatever its own size (references and copies alike; compressed on the way):
the frames are of no use without it.  By default this happens on one background thread per
:class:`BucketFragments`, so a pack never waits on the bucket; the queue
holds at most :data:`_MAX_QUEUED` jobs (more are dropped: a later pack
uploads them), and :meth:`BucketFragments.close` (``BuildCache.close``)
waits for it.  ``background=False`` uploads on the packing thread instead.
Smaller fragments are not worth it: fetching one is three requests (the
pointer, the blob's metadata, its bytes), about 6 ms of client CPU on the
reference VM, which is what compressing a fragment of about 110 KiB costs
with zlib at level 6 (ISA-L's default level is five times cheaper still;
docs/performance.md has the figures); they are compressed again wherever
needed (their pointer lookup, about 2 ms, still happens: a reader cannot
know a store path's compressed size before packing it).

**Trust.**  As for the shared layer cache, a store path's name stands for
its content (Nix's own assumption for binary caches): an input-addressed
path built separately on two machines is taken to be one content, and
layers made from a fragment that another instance packed contain that
instance's bytes (byte-identical for reproducible builds).  Keys include the
path as read, so instances whose ``store_root`` differs share nothing.

**Garbage collection** (:func:`~nixery_core.gc.collect_garbage`).  No
manifest or build entry names a fragment blob, so gc deletes one once it
is older than ``fragment_grace_seconds`` (by default the same grace as
every other unnamed blob), and then drops the pointers whose blob is gone.
A bucket hit touches the blob, so a fragment fetched within the grace
period lives on; one that is only ever hit in instances' local caches ages
out of the bucket (those instances keep their copies).  A build never
depends on a bucket fragment after downloading and checking it, so a
deletion at any moment costs at most a future miss, never a broken layer.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import attrs
import zstandard

from nixery_core.compression import crc32 as _crc32
from nixery_core.compression import zstd_window
from nixery_core.digests import validate_digest
from nixery_core.errors import InvalidCacheRecord, InvalidInput, LayerError, StorageError
from nixery_core.fragment_reads import KeptRange, RangeReads, reads_ranges_remotely
from nixery_core.fragment_toc import PART_START
from nixery_core.fragments import (
    CachedFragment,
    EncodesLayout,
    FragmentCache,
    FragmentWriter,
    LayerRanges,
    RangeRecord,
    StoreFragments,
    open_range,
)
from nixery_core.inflating import INFLATE_ERRORS, MembersInflater
from nixery_core.protocols import ReadableStore, SupportsRefresh, SupportsWrittenDigest
from nixery_core.tally import Tally

__all__ = [
    "DEFAULT_MIN_SIZE",
    "FRAGMENT_MEDIA_TYPE",
    "FRAGMENT_PREFIX",
    "BucketFragments",
    "BucketStats",
    "FragmentBucketPolicy",
    "FragmentPointer",
    "SharedLayer",
    "fragment_object_key",
]

log = logging.getLogger(__name__)


#: First segment of the pointer objects (``fragments/<key>``).
FRAGMENT_PREFIX = "fragments/"
#: Media type of a fragment blob: one gzip member or zstd frame holding one store path's tar.
FRAGMENT_MEDIA_TYPE = "application/vnd.nixery.fragment.v1"
#: Fragments smaller than this (compressed bytes) are not uploaded by default.
DEFAULT_MIN_SIZE = 128 << 10
_POINTER_VERSION = 1
#: A pointer that refers to a range of a layer blob (no fragment blob of its own).
_REFERENCE_VERSION = 2
#: A pointer to a chunked store path's TOC part compressed in the bucket (one zstd frame).
_PART_VERSION = 3
#: zstd level of a TOC part in the bucket (layout 3's, in the local cache: twice as fast as
#: 3 on TOC lines, and smaller).
_PART_LEVEL = 1
_READ_SIZE = 1 << 20
#: Upload and touch jobs waiting at most; more are dropped (a later pack uploads them).
_MAX_QUEUED = 4096
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def fragment_object_key(key: str) -> str:
    """The pointer object of the fragment cached under ``key``."""
    return FRAGMENT_PREFIX + key


def _non_negative(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{attribute.name} must be an int >= 0, not {value!r}")


def _positive(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"{attribute.name} must be an int >= 1, not {value!r}")


@attrs.frozen
class FragmentBucketPolicy:
    """How the bucket tier is used.

    ``min_size``: fragments of fewer compressed bytes are not uploaded (0:
    every one).  ``threads``: bucket lookups and downloads at once.
    ``background``: upload on a background thread (``False``: on the
    packing thread, before the pack goes on).
    """

    min_size: int = attrs.field(default=DEFAULT_MIN_SIZE, validator=_non_negative)
    threads: int = attrs.field(default=8, validator=_positive)
    background: bool = True


@attrs.frozen
class FragmentPointer:
    """What ``fragments/<key>`` says about the fragment's blob.

    A *reference* (``offset`` set; version 2) names a layer blob the
    fragment is ``size`` bytes of, from ``offset``, and may carry the
    fragment's layout (:mod:`nixery_core.fragment_layout`, encoded); a copy
    (version 1) names a fragment blob of its own.  A chunked store path's
    TOC part is a copy compressed in the bucket (``part``; version 3): its
    blob (``size`` bytes, their CRC-32) is one zstd frame of the part's
    ``uncompressed_size`` bytes of plain lines, kept plain locally.
    """

    digest: str
    size: int
    uncompressed_size: int
    crc32: int
    offset: int | None = None
    layout: bytes | None = None
    part: bool = attrs.field(default=False, kw_only=True)

    def to_json(self) -> bytes:
        fields: dict[str, object] = {
            "version": _POINTER_VERSION, "digest": self.digest, "size": self.size,
            "uncompressed_size": self.uncompressed_size, "crc32": self.crc32,
        }
        if self.part:
            if self.offset is not None:
                raise ValueError("a TOC part is shared as a copy, never a reference")
            fields["version"] = _PART_VERSION
        elif self.offset is not None:
            fields.update(version=_REFERENCE_VERSION, offset=self.offset)
            if self.layout is not None:
                fields["layout"] = base64.b64encode(self.layout).decode("ascii")
        return json.dumps(fields, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> FragmentPointer:
        """Parse a pointer; one that is not one raises
        :class:`~nixery_core.errors.InvalidCacheRecord` naming what is wrong."""
        try:
            return cls._parse(raw)
        except (TypeError, ValueError, RecursionError) as exc:  # JSON, base64, digest too
            raise InvalidCacheRecord(f"fragment pointer: {exc}") from exc

    @classmethod
    def _parse(cls, raw: bytes) -> FragmentPointer:
        """:meth:`from_json`, raising a bare ValueError or TypeError."""
        data = json.loads(raw)
        version = data.get("version") if isinstance(data, dict) else None
        if version not in (_POINTER_VERSION, _REFERENCE_VERSION, _PART_VERSION):
            raise ValueError("not a version 1, 2 or 3 fragment pointer")
        digest = data.get("digest")
        if not isinstance(digest, str):
            raise TypeError("digest must be a string")
        offset = layout = None
        if version == _REFERENCE_VERSION:
            offset = _count_field(data, "offset")
            encoded = data.get("layout")
            if encoded is not None:
                if not isinstance(encoded, str):
                    raise TypeError("layout must be a base64 string")
                layout = base64.b64decode(encoded, validate=True)
        return cls(
            validate_digest(digest),
            _count_field(data, "size"),
            _count_field(data, "uncompressed_size"),
            _count_field(data, "crc32"),
            offset,
            layout,
            part=version == _PART_VERSION,
        )


@attrs.frozen
class _Reference:
    """A reference to share, its layout maybe still to encode (on the upload thread)."""

    digest: str
    size: int
    uncompressed_size: int
    crc32: int
    offset: int
    layout: bytes | EncodesLayout | None


def _count_field(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if type(value) is not int or value < 0:
        raise TypeError(f"{name} must be an int >= 0, not {value!r}")
    return value


@attrs.frozen
class BucketStats:
    """What the bucket tier did since it was opened.

    ``hits``: fragments fetched and kept locally; ``misses``: keys the bucket
    did not have; ``rejected``: fragments found but refused (bad pointer,
    absent or damaged blob); ``failed``: lookups the store failed;
    ``uploaded``/``upload_failures``: fragments and TOC parts stored, or not, in the
    bucket (a reference that could not be shared, or a job skipped because the upload
    queue was full or its thread could not start, is a failure too).
    ``referenced``: references found (ranges of layer blobs in the bucket, kept
    locally as ranges; also counted in ``hits``); ``references_shared``:
    references this instance wrote.
    """

    hits: int = 0
    misses: int = 0
    rejected: int = 0
    failed: int = 0
    uploaded: int = 0
    upload_failures: int = 0
    referenced: int = 0
    references_shared: int = 0


_Counter = Literal[
    "hits", "misses", "rejected", "failed", "uploaded", "upload_failures", "referenced",
    "references_shared",
]
#: Told of each reference a fetch found: its key and range.
OnReference = Callable[[str, KeptRange], None]


class _Refused(Exception):
    """What is wrong with a fragment fetched from the bucket."""


@attrs.define
class _Check:
    """A fetched fragment checked piece by piece against its pointer."""

    pointer: FragmentPointer
    #: Whether the bytes are a whole blob, hashing to the pointer's digest (not a range).
    whole: bool = True
    #: Whether the caller fetches a side part (a chunked store path's TOC part: plain lines,
    #: nothing to inflate) rather than frames (inflated to their recorded size), whatever
    #: the bytes begin with.
    side: bool = attrs.field(default=False, kw_only=True)
    #: The largest window a zstd frame of frames may declare (the pack's level's); 0:
    #: libzstd's default limit, 128 MiB (a caller that did not say).
    window: int = attrs.field(default=0, kw_only=True)
    _digest: Any = attrs.field(init=False, factory=hashlib.sha256)
    _crc: int = attrs.field(init=False, default=0)
    _size: int = attrs.field(init=False, default=0)
    #: Where the bytes to keep locally go: the pieces as they come, or, for a TOC part
    #: compressed in the bucket, its plain lines as they are inflated.
    keep: Callable[[bytes], None] = attrs.field(kw_only=True)
    #: Set by the first piece, whose first bytes say the format of every member.
    _inflate: MembersInflater | None = attrs.field(init=False, default=None)
    #: What the pieces so far inflate to, counted.
    _produced: int = attrs.field(init=False, default=0)
    #: A compressed TOC part's first inflated bytes, until they are :data:`PART_START`'s.
    _head: bytes | None = attrs.field(init=False, default=None)

    def add(self, piece: bytes) -> None:
        pointer = self.pointer
        first = not self._size
        self._size += len(piece)
        if self._size > pointer.size:
            raise _Refused(f"is longer than the {pointer.size} bytes recorded")
        if first:
            self._start(piece)
        inflate = self._inflate
        if inflate is not None:
            try:
                # Counted a bounded step at a time: what a piece inflates to is never held
                # at once (a hostile object's 1000:1 zeros).
                for out in inflate.inflate(piece):
                    self._produced += len(out)
                    if self._produced > pointer.uncompressed_size:
                        raise _Refused("decompresses to more than recorded")
                    if self._head is not None:
                        self._plain(out)
            except INFLATE_ERRORS as exc:
                raise _Refused(f"does not decompress ({exc})") from exc
        if self._head is None:
            self.keep(piece)
        if self.whole:
            self._digest.update(piece)
        self._crc = _crc32(piece, self._crc)

    def _start(self, piece: bytes) -> None:
        """The first piece: what the bytes must be, and how they are inflated."""
        if self.side and self.pointer.part:  # compressed in the bucket: one zstd frame
            # No larger window than our level's: a hostile frame declaring more is
            # refused before libzstd allocates it.
            self._inflate = MembersInflater(zstd=True, max_window=zstd_window(_PART_LEVEL))
            self._head = b""
        elif self.side:  # a chunked store path's TOC part (fragment_toc.py)
            if not piece.startswith(PART_START):
                raise _Refused("is not a TOC part")
        elif piece.startswith((_GZIP_MAGIC, _ZSTD_MAGIC)):
            # As many members as there are: a chunked layer's fragment holds
            # one per frame (nixery_core.chunked).  A zstd frame may declare no larger
            # window than the pack's level gives, as the pack that copies it holds it to.
            self._inflate = MembersInflater(
                zstd=piece.startswith(_ZSTD_MAGIC), max_window=self.window
            )
        else:
            raise _Refused("is not a gzip member or a zstd frame")

    def finish(self) -> None:
        pointer = self.pointer
        if self.whole and f"sha256:{self._digest.hexdigest()}" != pointer.digest:
            raise _Refused("does not hash to its digest")
        if (self._size, self._crc) != (pointer.size, pointer.crc32):
            raise _Refused("has another size or CRC-32 than its pointer records")
        if self.side and not pointer.part:  # a TOC part: lines checked as read (chunked.py)
            if pointer.uncompressed_size != pointer.size:
                raise _Refused("is a TOC part recorded with another size")
            return
        if self._head is not None and len(self._head) < len(PART_START):
            raise _Refused("is not a TOC part")
        inflate, produced = self._inflate, self._produced
        if inflate is None or not inflate.eof or produced != pointer.uncompressed_size:
            raise _Refused(
                f"decompresses to {produced} bytes, not the "
                f"{pointer.uncompressed_size} recorded"
            )

    def _plain(self, out: bytes) -> None:
        """A compressed TOC part's next plain bytes: kept once its start is a part's."""
        head = self._head
        if head is not None and len(head) < len(PART_START):
            head = (head + out[: len(PART_START)])[: len(PART_START)]
            if not PART_START.startswith(head):
                raise _Refused("is not a TOC part")
            self._head = head
        self.keep(out)


@attrs.define
class _SharedWriter(FragmentWriter):
    """A fragment being packed: kept locally, then offered to the bucket tier.

    A chunked store path's frames and TOC part are a pair (``_pair``): offered
    together once both are kept, by the frames' size (see :meth:`BucketFragments.writer`).
    """

    _tier: BucketFragments = attrs.field(kw_only=True)
    #: A chunked store path's two parts, this one of them (held by both, holding neither).
    _pair: _Pair | None = attrs.field(init=False, default=None)

    def commit(self, uncompressed_size: int) -> None:
        if self.discarded:  # nothing kept locally: nothing to offer
            return
        size = self._size
        super().commit(uncompressed_size)
        pair = self._pair
        if pair is None:
            self._tier._packed(self.key, size)
            return
        pair.kept[self.side] = size
        if len(pair.kept) == 2:  # both parts kept: the frames say whether to share
            self._tier._packed(pair.frames, pair.kept[False], pair.part)


@attrs.define
class _Pair:
    """A chunked store path's frames and TOC part (their keys), and the size of each kept so
    far (by ``side``: true for the TOC part)."""

    frames: str
    part: str
    kept: dict[bool, int] = attrs.field(factory=dict)


@attrs.define
class BucketFragments:
    """A local :class:`~nixery_core.fragments.FragmentCache` in front of the bucket.

    Implements :class:`~nixery_core.fragments.FragmentSource`; see the
    module docstring for the layout and the rules.  Close it (or the
    :class:`~nixery_core.cache.BuildCache` that made it) to finish the
    uploads still queued; the local cache stays open (it is not ours).
    """

    local: FragmentCache
    store: ReadableStore
    policy: FragmentBucketPolicy = attrs.field(factory=FragmentBucketPolicy)
    #: The local cache seen from ``store`` when layers packed into it keep their fragments
    #: as ranges of their blobs: references are then shared instead of copies.
    ranges: StoreFragments | None = None
    _counts: Tally[BucketStats] = attrs.field(init=False, factory=lambda: Tally(BucketStats))
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    _pool: ThreadPoolExecutor | None = attrs.field(init=False, default=None)
    #: Fetches in flight, by key (removed when done).
    _pending: dict[str, Future[None]] = attrs.field(init=False, factory=dict)
    _jobs: queue.Queue[tuple[str, str, _Reference | None] | None] = attrs.field(
        init=False, factory=lambda: queue.Queue(_MAX_QUEUED)
    )
    _worker: threading.Thread | None = attrs.field(init=False, default=None)
    _closed: bool = attrs.field(init=False, default=False)
    #: Per packing thread, ``.writer``: the last fragment writer asked for (not a side part),
    #: a weak reference.
    _last: threading.local = attrs.field(init=False, factory=threading.local)

    # --- FragmentSource ------------------------------------------------------

    def prefetch(
        self, keys: Sequence[str], on_reference: OnReference | None = None, *,
        sides: Collection[str] = (), window: int = 0,
    ) -> None:
        """Start fetching every fragment of ``keys`` the local cache lacks; returns at once.

        Fetches run ``threads`` at a time, in the order given (the order the
        pack needs them); :meth:`get` waits only for its own key.
        ``on_reference`` is told of each reference found by the fetches started
        here, once it is kept locally as a range.  Those of ``keys`` in
        ``sides`` are side parts (TOC parts), checked as plain lines; any
        other is checked as compressed frames, whatever its bytes look like,
        a zstd frame declaring no larger window than ``window`` bytes (0:
        libzstd's default limit, 128 MiB).
        """
        started = []
        sides = frozenset(sides) if sides else frozenset()
        with self._lock:
            if self._closed:
                return
            for key in dict.fromkeys(keys):
                # In flight, or else (a fetch is forgotten only after it stored) local?  Or
                # refused by a pack here (fetched again, its pointer would fail it again):
                # packed, and shared in its stead.
                if key in self._pending or key in self.local or self.local.was_refused(key):
                    continue
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        self.policy.threads, thread_name_prefix="nixery-fragment-fetch"
                    )
                self._pending[key] = future = self._pool.submit(
                    self._fetch, key, on_reference, side=key in sides, window=window
                )
                started.append((key, future))
        for key, future in started:
            future.add_done_callback(functools.partial(self._forget, key))

    def prefetch_window(
        self, keys: Sequence[str], *, sides: Collection[str] = (), window: int
    ) -> None:
        """:meth:`prefetch` for a pack of zstd frames at a level whose window is ``window``
        (:class:`~nixery_core.fragments.SupportsFrameWindow`)."""
        self.prefetch(keys, sides=sides, window=window)

    def _forget(self, key: str, future: Future[None]) -> None:
        """Drop a finished fetch from the ones in flight."""
        with self._lock:
            if self._pending.get(key) is future:
                del self._pending[key]

    def get(
        self, key: str, *, side: bool = False
    ) -> contextlib.AbstractContextManager[CachedFragment | None]:
        """The fragment in the local cache, once a fetch of it in flight (any pack's) is done."""
        self.wait(key)
        if self.ranges is not None:  # a reference is kept as a range: read from the store
            return self.ranges.get(key, side=side)
        return self.local.get(key, side=side)

    def wait(self, key: str) -> None:
        """Return once a fetch of ``key`` in flight (any pack's) is done."""
        with self._lock:
            future = self._pending.get(key)
        if future is not None:
            future.result()

    def layer(self) -> SharedLayer:
        """A source for packing one layer into the bucket, sharing references (needs
        :attr:`ranges`): see :class:`SharedLayer`."""
        if self.ranges is None:
            raise RuntimeError("a bucket tier without ranges shares copies, not layers")
        return SharedLayer(self, self.ranges.layer())

    def writer(self, key: str, *, side: bool = False) -> FragmentWriter:
        """Record a fragment being packed; once kept locally it is uploaded (from
        ``min_size`` bytes).  A side part (a chunked store path's TOC part) belongs to the
        fragment whose writer this thread asked for just before it (the packer asks for
        both of a store path in turn): it is uploaded, first, whenever that fragment is,
        whatever its own size (the frames are of no use without it)."""
        writer = _SharedWriter(self.local, key, side=side, tier=self)
        last: weakref.ref[_SharedWriter] | None = getattr(self._last, "writer", None)
        frames = None if last is None else last()
        # Weakly: the packer holds the writer while it records; the tier never keeps one.
        self._last.writer = None if side else weakref.ref(writer)
        if side and frames is not None:
            writer._pair = frames._pair = _Pair(frames.key, key)
        return writer

    # --- lifecycle -------------------------------------------------------------

    @property
    def stats(self) -> BucketStats:
        return self._counts.snapshot()

    def flush(self) -> None:
        """Wait until every fetch started, then every queued upload and touch, is done."""
        with self._lock:
            pending = list(self._pending.values())
        for future in pending:
            future.result()
        if self._worker is not None:
            self._jobs.join()

    def close(self) -> None:
        """Finish the queued uploads, then stop the background thread and lookups."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            worker, pool = self._worker, self._pool
        if worker is not None:
            self._jobs.put(None)
            worker.join()
        if pool is not None:
            pool.shutdown(wait=True)
        self._pending.clear()

    def __enter__(self) -> BucketFragments:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading ---------------------------------------------------------------

    def _count(self, name: _Counter) -> None:
        self._counts.add(name)

    def _fetch(
        self, key: str, on_reference: OnReference | None = None, *, side: bool = False,
        window: int = 0,
    ) -> None:
        """Look ``key`` up in the bucket; keep the fragment locally if it checks out (as a
        ``side`` part's plain lines, or else as compressed frames within ``window``)."""
        name = fragment_object_key(key)
        try:
            raw = self.store.get_object(name)
        except StorageError as exc:
            log.warning("fragment lookup %s failed (%s); packing it", name, exc)
            self._count("failed")
            return
        if raw is None:
            self._count("misses")
            return
        try:
            pointer = FragmentPointer.from_json(raw)
        except InvalidCacheRecord as exc:
            self._reject(name, f"its pointer is unreadable ({exc})")
            return
        if pointer.offset is not None and side:
            # TOC parts are shared only as copies (whole blobs, hashed on fetch): a reference
            # would skip the plain check as a range, or the digest as a copy of one.
            self._reject(name, "it is a TOC part's pointer claiming an offset")
        elif pointer.part and not side:
            self._reject(name, "it is a TOC part's pointer, not frames'")
        elif pointer.offset is not None and self.ranges is not None:
            self._keep_reference(key, name, pointer, pointer.offset, on_reference)
        else:
            self._keep_copy(key, name, pointer, side=side, window=window)

    def _keep_reference(
        self, key: str, name: str, pointer: FragmentPointer, offset: int,
        on_reference: OnReference | None,
    ) -> None:
        """A range of a layer blob in this bucket (from ``offset``, the pointer's): kept as
        a range, read (and checked against its size and CRC-32) when the pack needs it."""
        try:
            self.local.keep_range(
                key, pointer.digest, offset=offset, size=pointer.size,
                uncompressed_size=pointer.uncompressed_size, crc=pointer.crc32,
                layout=pointer.layout,
            )
        except Exception as exc:  # noqa: BLE001 - the cache only saves work: a miss
            self._not_kept(name, exc)
            return
        self._count("hits")
        self._count("referenced")
        if on_reference is not None:
            on_reference(key, KeptRange(key, pointer.digest, offset, pointer.size))

    def _keep_copy(
        self, key: str, name: str, pointer: FragmentPointer, *, side: bool, window: int
    ) -> None:
        """Download the fragment (a blob, or a range of one) into a checked local copy."""
        # Written to its data file as it comes (past 1 MiB, as a side part is): nothing
        # reads it before it is kept, and up to ``threads`` fetches run at once.
        writer = self.local.writer(key, side=True)
        writer.layout = pointer.layout
        try:
            problem = self._download(pointer, writer, side=side, window=window)
        except StorageError as exc:  # BlobNotFound included: collected meanwhile
            writer.discard()
            self._reject(name, f"its blob {pointer.digest} cannot be read ({exc})")
            return
        except BaseException:
            writer.discard()
            raise
        if problem is not None:
            writer.discard()
            self._reject(name, f"its blob {pointer.digest} {problem}")
            return
        try:
            writer.commit(pointer.uncompressed_size)
        except Exception as exc:  # noqa: BLE001 - the cache only saves work: a miss
            self._not_kept(name, exc)
            return
        self._count("hits")
        if pointer.offset is None and isinstance(self.store, SupportsRefresh):
            self._enqueue("touch", pointer.digest)

    def _not_kept(self, name: str, exc: Exception) -> None:
        """A fragment fetched could not be kept locally (the local cache's writing thread
        cannot be started, say): a miss, counted as a failed lookup, never the pack's failure
        (which :meth:`wait` would raise)."""
        log.warning("bucket fragment %s not kept locally (%s); packing it", name, exc)
        self._count("failed")

    def _reject(self, name: str, why: str) -> None:
        log.warning("bucket fragment %s refused: %s; packing it again", name, why)
        self._count("rejected")

    def _download(
        self, pointer: FragmentPointer, writer: FragmentWriter, *, side: bool, window: int
    ) -> str | None:
        """Stream the blob into ``writer``; what is wrong with it (checked as a ``side``
        part, or as frames within ``window``), or ``None``."""
        check = _Check(pointer, whole=pointer.offset is None, side=side, window=window,
                       keep=writer.add)
        try:
            with (
                self.store.open_blob(pointer.digest) if pointer.offset is None
                # a range of a layer blob, copied here
                else open_range(self.store, pointer.digest, pointer.offset, pointer.size)
            ) as stream:
                while piece := stream.read(_READ_SIZE):
                    check.add(piece)  # kept (plain) as it is checked
            check.finish()
        except _Refused as refused:
            return str(refused)
        return None

    # --- uploading ---------------------------------------------------------------

    def _packed(self, key: str, size: int, side: str | None = None) -> None:
        """A fragment this instance packed is in the local cache: upload it if worth it
        (or if it replaces one refused here, whose pointer would fail other instances' packs
        too), after its ``side`` part whatever that part's size (so its pointer is found
        first)."""
        if size >= self.policy.min_size or self.local.was_refused(key):
            if side is not None:
                self._offer("part", side)
            self._offer("upload", key)

    def _offer(self, job: str, argument: str, pointer: _Reference | None = None) -> None:
        """Run an upload or reference job on the upload thread, or at once when the policy
        is not ``background``."""
        if self.policy.background:
            self._enqueue(job, argument, pointer)
        else:
            self._attempt(job, argument, pointer)

    def _enqueue(self, job: str, argument: str, pointer: _Reference | None = None) -> None:
        """Queue a job for the upload thread, started by the first; a thread that cannot
        be started skips the job (logged; tried again by the next), never the pack."""
        with self._lock:
            if self._closed:
                return
            failed = None
            if self._worker is None:
                worker = threading.Thread(
                    target=self._work, name="nixery-fragment-upload", daemon=True
                )
                try:
                    worker.start()
                except RuntimeError as exc:
                    failed = exc
                else:
                    self._worker = worker  # only once started: flush and close wait for it
        if failed is not None:
            log.warning("fragment upload thread cannot be started (%s); %s of %s skipped",
                        failed, job, argument)
            self._skipped(job)
            return
        try:
            self._jobs.put_nowait((job, argument, pointer))
        except queue.Full:
            log.info("fragment upload queue full; %s of %s skipped", job, argument)
            self._skipped(job)

    def _skipped(self, job: str) -> None:
        """A job never run (no upload thread, a full queue): counted as ``_attempt`` counts
        one that fails, so that every upload, TOC part and reference offered ends as one
        ``uploaded``, ``references_shared`` or ``upload_failures`` (a touch counts none)."""
        if job != "touch":
            self._count("upload_failures")

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                self._attempt(*job)
            finally:
                self._jobs.task_done()

    def _attempt(self, job: str, argument: str, pointer: _Reference | None) -> None:
        """:meth:`_run`, a job raising unexpectedly (a bug, a compressor's error) logged
        and counted as a failed upload, never more: the thread goes on with the next (it
        ended, and no later job ran), and an upload on the packing thread never fails a
        fragment already kept locally."""
        try:
            self._run(job, argument, pointer)
        except Exception as exc:  # noqa: BLE001 - the bucket tier only saves work
            log.warning("fragment %s of %s failed (%s); skipped", job, argument, exc)
            if job != "touch":
                self._count("upload_failures")

    def _run(self, job: str, argument: str, pointer: _Reference | None) -> None:
        """Upload a kept fragment or TOC part, share a reference, or touch a fetched blob."""
        if job in ("upload", "part"):
            self._upload(argument, part=job == "part")
        elif pointer is not None:
            self._share(argument, pointer)
        else:
            self._touch(argument)

    def _touch(self, digest: str) -> None:
        """Restart a fetched blob's age, so gc keeps a fragment that is being reused."""
        if isinstance(self.store, SupportsRefresh):
            try:
                self.store.touch_blob(digest)
            except StorageError as exc:
                log.warning("could not refresh fragment blob %s (%s)", digest, exc)

    def _shared(self, digest: str, record: RangeRecord, side: str | None) -> None:
        """A fragment packed here is a range of the layer blob ``digest``, now in the bucket:
        share a reference to it (worth it from ``min_size`` bytes, as a copy), after
        uploading its ``side`` part whatever its size (the reference is of no use without
        it, so it is never found first).  One replacing a fragment refused here is shared
        whatever its size (its pointer would fail other instances' packs too)."""
        key, offset, size, uncompressed, crc, layout = record
        if size < self.policy.min_size and not self.local.was_refused(key):
            return
        if side is not None:
            self._offer("part", side)
        self._offer("reference", key, _Reference(digest, size, uncompressed, crc, offset, layout))

    def _share(self, key: str, reference: _Reference) -> None:
        layout = reference.layout
        encoded = layout.encode() if layout is not None and not isinstance(layout, bytes) \
            else layout
        pointer = FragmentPointer(reference.digest, reference.size, reference.uncompressed_size,
                                  reference.crc32, reference.offset, encoded)
        try:
            self.store.put_object(fragment_object_key(key), pointer.to_json())
        except StorageError as exc:
            log.warning("fragment reference %s not shared (%s)", key, exc)
            self._count("upload_failures")
            return
        self._count("references_shared")

    def _upload(self, key: str, *, part: bool = False) -> None:
        """Store the locally kept fragment ``key`` in the bucket: blob, then pointer.  A TOC
        ``part`` is compressed on the way (kept plain locally)."""
        try:
            with self.local.peek(key) as found:
                if found is None:  # evicted or dropped meanwhile
                    return
                pointer = self._store_blob(found, part=part)
            self.store.put_object(fragment_object_key(key), pointer.to_json())
        except (StorageError, LayerError) as exc:  # LayerError: its file changed since its check
            log.warning("fragment %s not uploaded (%s)", key, exc)
            self._count("upload_failures")
            return
        self._count("uploaded")

    def _store_blob(self, found: CachedFragment, *, part: bool = False) -> FragmentPointer:
        """Its bytes as a blob (a TOC ``part``'s lines compressed into one zstd frame, the
        plain size pledged in it); the pointer to it."""
        pieces: Iterable[bytes] = found.pieces()
        if part:
            pieces = _compressed(pieces, found.size)
        size = crc = 0
        with self.store.open_blob_writer(FRAGMENT_MEDIA_TYPE) as writer:
            # A writer that hashes what it is given saves hashing the fragment again.
            written = writer.written_digest if isinstance(writer, SupportsWrittenDigest) else None
            digest = hashlib.sha256()
            for piece in pieces:
                if written is None:
                    digest.update(piece)
                if part:
                    size += len(piece)
                    crc = _crc32(piece, crc)
                writer.write(piece)
            info = writer.commit(
                written() if written is not None else f"sha256:{digest.hexdigest()}"
            )
        if part:
            return FragmentPointer(info.digest, size, found.size, crc, part=True)
        return FragmentPointer(info.digest, found.size, found.uncompressed_size, found.crc32)


def _compressed(pieces: Iterable[bytes], size: int) -> Iterator[bytes]:
    """``pieces`` (``size`` bytes in all) as one zstd frame at :data:`_PART_LEVEL`, a piece
    at a time (never held whole)."""
    compressor = zstandard.ZstdCompressor(level=_PART_LEVEL).compressobj(size=size)
    for piece in pieces:
        if out := compressor.compress(piece):
            yield out
    yield compressor.flush()


@attrs.define
class SharedLayer:
    """One layer packed into the bucket with the bucket tier on, sharing references.

    A :class:`~nixery_core.fragments.FragmentSource` with ``stored``, as
    :class:`~nixery_core.fragments.LayerRanges`: its new fragments are kept
    locally as ranges of its blob (no copy written), and once the blob is
    stored each one of at least ``min_size`` bytes is shared as a reference
    ``fragments/<key>`` (version 2: the layer blob's digest, the offset, size,
    CRC-32 and layout; no fragment blob uploaded).  Lookups find local
    fragments first, then the bucket's pointers (fetched ahead); a reference
    found is kept as a local range and read ahead with this layer's other
    ranges (:class:`~nixery_core.fragment_reads.RangeReads`).
    """

    _tier: BucketFragments
    _layer: LayerRanges
    _positions: dict[str, int] = attrs.field(init=False, factory=dict)
    #: Held while a fetch thread adds a reference to the layer's reads.
    _adding: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    #: The side part (a chunked layer's TOC part) of each fragment that has one, by the
    #: fragment's key, and the fragment whose writer was asked for last.
    _sides: dict[str, str] = attrs.field(init=False, factory=dict)
    _last: str | None = attrs.field(init=False, default=None)
    #: The pack ended (:meth:`close`): a reference fetched after is not read ahead.
    _closed: bool = attrs.field(init=False, default=False)

    def prefetch(
        self, keys: Sequence[str], *, sides: Collection[str] = (), window: int = 0
    ) -> None:
        self._positions = {key: index for index, key in enumerate(keys)}
        self._layer.prefetch(keys)  # plans the ranges kept locally now
        self._tier.prefetch(keys, self._found, sides=sides, window=window)

    def prefetch_window(
        self, keys: Sequence[str], *, sides: Collection[str] = (), window: int
    ) -> None:
        """:meth:`prefetch`, fetched zstd frames held to ``window`` (see
        :class:`~nixery_core.fragments.SupportsFrameWindow`)."""
        self.prefetch(keys, sides=sides, window=window)

    def _found(self, key: str, kept: KeptRange) -> None:
        """A reference fetched for this layer: read it ahead with the others."""
        store = self._layer.source.store
        if not reads_ranges_remotely(store):
            return  # read when needed, as any range on this store
        with self._adding:  # fetches of one layer run on several threads
            if self._closed:
                return
            reads = self._layer.reads
            if reads is None:
                reads = self._layer.reads = RangeReads(store, ())
        reads.add(kept, self._positions.get(key, len(self._positions)))

    def get(
        self, key: str, *, side: bool = False
    ) -> contextlib.AbstractContextManager[CachedFragment | None]:
        self._tier.wait(key)
        return self._layer.get(key, side=side)

    def writer(self, key: str, *, side: bool = False) -> FragmentWriter:
        """A range of the layer blob; a side part (a chunked layer's TOC part, no bytes of
        the blob) a local copy, belonging to the fragment whose writer came just before it
        (the packer asks for both of a store path in turn): uploaded when that fragment is
        shared, whatever its own size (the reference is of no use without it)."""
        if side:
            if self._last is not None:
                self._sides[self._last] = key
            return self._tier.local.writer(key, side=True)
        self._last = key
        return self._layer.writer(key)

    def close(self) -> None:
        """The pack ended, however it ended: stop reading ahead (see
        :meth:`LayerRanges.close <nixery_core.fragments.LayerRanges.close>`)."""
        with self._adding:
            self._closed = True
        self._layer.close()

    def stored(self, digest: str) -> None:
        """The layer's blob is committed: keep its fragments as ranges, share references
        (each after uploading its side part, if it has one)."""
        for record in self._layer.stored(digest):
            self._tier._shared(digest, record, self._sides.get(record[0]))

"""BuildCache: never build, pack or upload the same thing twice.

Two tiers, either of which may be absent:

* **local**: a :mod:`diskcache` directory (SQLite; size-bounded, evicting the
  entries stored longest ago, so that a hit never writes), shared safely by
  threads and by processes on one machine.  A directory that cannot be
  opened (read-only, full) leaves the shared tier alone, with a logged
  warning: the local tier only saves work, it never fails a build;
* **shared**: small JSON objects inside the uploader's storage
  (``manifests/<key>``, ``builds/<key>``, as Nixery lays out its bucket), so
  several hosts that share a bucket share work.

Invariants (each pinned by tests):

* an entry is written only after every blob it names is stored;
* an entry whose blob has since vanished, or is stored with another size
  than the entry gives it (a truncated file), is a miss (and is rebuilt),
  never served;
* a corrupt entry (garbage, truncated, wrong shape, a missing field or one
  of the wrong type: see :mod:`nixery_core.record_schema`) is a miss, logged
  as a warning, and is overwritten by the rebuild;
* moving targets (channels, branches) expire after ``moving_ttl`` seconds
  (6 hours by default, as in the seed change; 0 disables caching them);
  pinned sources never expire.

Concurrency: threads asking for one key share one build (:meth:`single_flight`);
processes sharing the cache directory serialise on a lock per key in the
directory itself (``flock`` on a ``lock-<hash>`` file, which the kernel
releases when its holder dies, so a killed build never blocks the next one),
so they do no duplicate work either.  Hosts that share only the bucket
coordinate through a lease in it (:meth:`fleet_flight`, :mod:`nixery_core.lease`)
when the store supports leases (:class:`~nixery_core.protocols.SupportsLeases`:
the filesystem, GCS and memory stores do); without one they may each build
a key once at the same time, which harms nothing: blobs are content-addressed
and entries identical.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import attrs
import diskcache

from nixery_core.digests import validate_digest
from nixery_core.errors import (
    InvalidCacheRecord,
    InvalidInput,
    StorageError,
    StorageUnavailable,
)
from nixery_core.fragment_bucket import BucketFragments, FragmentBucketPolicy
from nixery_core.fragments import (
    DEFAULT_FRAGMENT_LIMIT,
    FragmentCache,
    FragmentSource,
    StoreFragments,
)
from nixery_core.lease import FleetFlight
from nixery_core.protocols import (
    SupportsBlobFiles,
    SupportsBlobSizes,
    SupportsDeletion,
    SupportsLeases,
    SupportsRangeReads,
    SupportsReading,
    Uploader,
)
from nixery_core.record_fields import int_field, json_object, malformed, str_field
from nixery_core.record_schema import record_blob_sizes
from nixery_core.tally import Tally

if TYPE_CHECKING:
    from attrs import AttrsInstance

    from nixery_core.archive import ArchiveOptions

__all__ = ["BuildCache", "CacheStats", "LayerRecord", "ManifestRecord"]

log = logging.getLogger(__name__)
T = TypeVar("T")
#: Receives the name of a :class:`CacheStats` counter each time a lookup adds to it.
Counted = Callable[[str], None]

#: Bump when the meaning of a cache entry changes; it is part of every key.
LAYOUT_VERSION = 1
SIX_HOURS = 6 * 3600.0
#: Parsed local entries kept in memory per cache (a few hundred bytes each).
_MEMO_ENTRIES = 4096


@attrs.frozen
class LayerRecord:
    """A layer already packed and stored: what the layer build cache holds."""

    digest: str
    diff_id: str
    size: int
    media_type: str
    #: For the layer's OCI descriptor (eStargz and zstd:chunked TOC position).
    annotations: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return annotated_json(self, self.annotations)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LayerRecord:
        """Parse an entry; a missing or malformed field raises
        :class:`~nixery_core.errors.InvalidCacheRecord` naming it."""
        json_object(data, "layer record")
        with malformed():
            size = int_field(data, "size")
            if size < 0:
                raise ValueError("size is negative")
            return cls(
                digest=validate_digest(str_field(data, "digest")),
                diff_id=validate_digest(str_field(data, "diff_id")),
                size=size,
                media_type=str_field(data, "media_type"),
                annotations=_annotations(data),
            )


def annotated_json(
    layer: AttrsInstance, annotations: tuple[tuple[str, str], ...]
) -> dict[str, Any]:
    """A layer's fields (:func:`attrs.asdict`; a :class:`LayerRecord` or a
    :class:`~nixery_core.results.BuiltLayer`), its ``annotations`` an object,
    left out when there are none (as in entries written before layers had any)."""
    data = attrs.asdict(layer)
    if annotations:
        data["annotations"] = dict(annotations)
    else:
        del data["annotations"]
    return data


def _annotations(data: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """A record's optional ``annotations`` object, as sorted pairs."""
    value = data.get("annotations", {})
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise TypeError("annotations must map strings to strings")
    return tuple(sorted(value.items()))


@attrs.frozen
class ManifestRecord:
    """A built image as the manifest cache holds it.

    ``body`` is the build result's own JSON description (see
    :meth:`nixery_core.build.BuildResult.to_record`); ``blobs`` lists every
    digest that must still exist for the entry to be served.
    """

    body: Mapping[str, Any]
    blobs: tuple[str, ...]
    expires_at: float | None = None
    #: Every blob's size as the body describes it (filled in when an entry is
    #: read for serving, so a hit can compare them with the stored sizes).
    sizes: Mapping[str, int] = attrs.field(factory=dict, eq=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"body": dict(self.body), "blobs": list(self.blobs), "expires_at": self.expires_at}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ManifestRecord:
        """Parse an entry's outline (its body is checked where it is served); a missing or
        malformed field raises :class:`~nixery_core.errors.InvalidCacheRecord` naming it."""
        json_object(data, "manifest record")
        body = data.get("body")
        blobs = data.get("blobs")
        expires_at = data.get("expires_at")
        if not isinstance(body, dict) or not isinstance(blobs, list):
            raise InvalidCacheRecord("manifest record lacks body or blobs")
        if not all(isinstance(b, str) for b in blobs):
            raise InvalidCacheRecord("manifest record blobs are not strings")
        if expires_at is not None and (
            isinstance(expires_at, bool) or not isinstance(expires_at, int | float)
        ):
            raise InvalidCacheRecord("manifest record expires_at is not a number")
        return cls(body, tuple(blobs), None if expires_at is None else float(expires_at))


def _served_manifest(data: Mapping[str, Any]) -> ManifestRecord:
    """A manifest entry checked for serving: a well-formed body naming exactly its blobs.

    Raises a ValueError naming what is wrong (:class:`InvalidCacheRecord`
    for the outline, :mod:`~nixery_core.record_schema`'s for the body),
    which the cache's parse step turns into a logged, counted corrupt miss.
    """
    record = ManifestRecord.from_json(data)
    sizes = record_blob_sizes(record.body)
    if set(record.blobs) != set(sizes):
        raise ValueError("the entry's blobs differ from those its body describes")
    return attrs.evolve(record, sizes=sizes)


def _store_layer_paths(body: Mapping[str, Any]) -> Iterator[tuple[str, ...]]:
    """The sorted store paths of each store layer an image or index record describes."""
    records: list[object] = [body]
    if body.get("kind") == "index" and isinstance(body.get("manifests"), list):
        records = [m.get("record") for m in body["manifests"] if isinstance(m, dict)]
    for record in records:
        layers = record.get("layers") if isinstance(record, dict) else None
        for layer in layers if isinstance(layers, list) else ():
            if not isinstance(layer, dict) or layer.get("kind") != "store":
                continue
            paths = layer.get("paths")
            if isinstance(paths, list) and paths and all(isinstance(p, str) for p in paths):
                yield tuple(sorted(paths))


def _stored_size(store: Uploader, digest: str) -> int | None:
    """The stored blob's size (a stat where the store offers ``blob_size``), None if absent."""
    sizer = getattr(store, "blob_size", None)
    if callable(sizer):
        size = sizer(digest)
        return size if isinstance(size, int) else None
    info = store.blob_info(digest)
    return None if info is None else info.size


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _json_object(raw: object) -> Mapping[str, Any]:
    if not isinstance(raw, bytes):
        raise TypeError(f"entry is {type(raw).__name__}, not bytes")
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise TypeError("entry is not a JSON object")
    return data


@attrs.frozen
class CacheStats:
    """Hits and misses per tier for manifests and layers."""

    manifest_local_hits: int = 0
    manifest_shared_hits: int = 0
    manifest_misses: int = 0
    layer_local_hits: int = 0
    layer_shared_hits: int = 0
    layer_misses: int = 0
    stale_entries: int = 0
    corrupt_entries: int = 0
    #: Entries not served because a blob they name is stored with another size.
    corrupt_blobs: int = 0

    def __add__(self, other: CacheStats) -> CacheStats:
        return CacheStats(
            *(a + b for a, b in zip(attrs.astuple(self), attrs.astuple(other), strict=True))
        )

    @property
    def manifest_hits(self) -> int:
        return self.manifest_local_hits + self.manifest_shared_hits

    @property
    def layer_hits(self) -> int:
        return self.layer_local_hits + self.layer_shared_hits


def _check_recheck(_inst: object, _attr: object, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise InvalidInput(f"recheck_after must be a number of seconds >= 0, not {value!r}")


class _Flight:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


@attrs.define
class BuildCache:
    """The two-tier cache of built manifests and packed layers.

    ``directory`` is the local tier (``None``: no local tier); ``shared``
    says whether to use the uploader's storage as the shared tier.
    ``size_limit`` bounds the local tier in bytes.  ``clock`` returns
    seconds since the epoch; tests pass a fake one.  ``fleet`` runs builds
    under leases in the store, so hosts sharing it build each key once
    (``None``: no leases; used only with the shared tier).

    ``recheck_after`` (seconds, default 0: every hit) lets a hit skip the
    blob checks of an entry whose blobs this cache found intact less than
    that long ago.  On a remote store those checks are the whole cost of a
    hit (one metadata request per blob, sent concurrently where the store
    offers :class:`~nixery_core.protocols.SupportsBlobSizes`).  The price:
    a blob removed behind the cache's back (by hand, or by ``verify
    --repair``; garbage collection never removes a blob a live entry
    names) is noticed up to ``recheck_after`` seconds late, and an image
    served in that window misses it.
    ``fragment_limit`` bounds the compressed store-path fragments kept in
    ``<directory>/fragments`` (:mod:`nixery_core.fragments`; 0: none kept),
    with which a store path packed once is never compressed again.
    ``fragment_bucket`` (default ``None``: off) also shares those fragments
    through the store, so instances that share only the bucket reuse each
    other's (:mod:`nixery_core.fragment_bucket`; needs the local fragment
    cache and a store that can read blobs back).
    ``fragment_mode`` says how a layer packed here keeps its new fragments:
    ``"copy"`` writes a copy of each into ``<directory>/fragments``;
    ``"ranges"`` records each as a byte range of the layer blob once the
    blob is committed (no second copy of the compressed bytes; read back
    from the store when reused, and on a store without local blob files
    copied into the cache at its first reuse) on any store that can read
    blobs back;
    ``"auto"`` (the default) takes ranges where the store keeps blobs as
    local files (:class:`~nixery_core.protocols.SupportsBlobFiles`, such as
    :class:`~nixery_core.storage.FilesystemStore`) or reads a blob's byte
    range in one request (:class:`~nixery_core.protocols.SupportsRangeReads`,
    such as :class:`~nixery_core.storage.gcs.GcsStore`: there a range is
    copied into the cache at its first reuse, read ahead with the layer's
    other ranges), and copies elsewhere.  With ``fragment_bucket`` set on
    such a store, the bucket tier shares references to the ranges of the
    layer blobs in the bucket instead of uploading copies.  An eStargz or
    zstd:chunked layer's fragments are ranges like any other's; their TOC
    parts (not bytes of the blob) are small copies beside them.  See
    docs/caching.md.
    """

    directory: Path | None = None
    shared: bool = True
    moving_ttl: float = SIX_HOURS
    size_limit: int = 1 << 30
    clock: Callable[[], float] = time.time
    recheck_after: float = attrs.field(default=0.0, validator=_check_recheck)
    fleet: FleetFlight | None = attrs.field(factory=FleetFlight)
    fragment_limit: int = DEFAULT_FRAGMENT_LIMIT
    fragment_bucket: FragmentBucketPolicy | None = None
    fragment_mode: Literal["auto", "copy", "ranges"] = attrs.field(
        default="auto", validator=attrs.validators.in_(("auto", "copy", "ranges"))
    )
    _fragments: FragmentCache | None = attrs.field(init=False, default=None)
    # One bucket tier per store a build used (by id; the store is kept alive by it).
    _bucket_tiers: dict[int, BucketFragments] = attrs.field(init=False, factory=dict)
    _local: diskcache.Cache | None = attrs.field(init=False, default=None)
    _totals: Tally[CacheStats] = attrs.field(init=False, factory=lambda: Tally(CacheStats))
    _flights: dict[str, _Flight] = attrs.field(init=False, factory=dict)
    _flights_lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    # Parsed local-tier entries, most recently used last: a hit skips SQLite
    # and JSON.  Entries are immutable facts about content-addressed blobs, and
    # every hit still checks expiry and that each blob exists, so a memoised
    # entry is exactly as safe as the row it came from.
    _memo: collections.OrderedDict[str, object] = attrs.field(
        init=False, factory=collections.OrderedDict
    )
    _memo_lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    # Entry name -> when its blobs were last found intact (for recheck_after).
    _verified: collections.OrderedDict[str, float] = attrs.field(
        init=False, factory=collections.OrderedDict
    )

    def __attrs_post_init__(self) -> None:
        if self.directory is not None:
            self.directory = Path(self.directory)
            try:
                self._local = diskcache.Cache(
                    str(self.directory),
                    size_limit=self.size_limit,
                    # Evict by storage time: LRU would turn every hit into a write.
                    eviction_policy="least-recently-stored",
                )
            except (OSError, sqlite3.Error) as exc:
                # The local tier only saves work: a read-only or full directory
                # leaves the shared tier, never a failed build.
                log.warning(
                    "cannot open the local cache in %s (%s); using the shared tier only",
                    self.directory, exc,
                )
                self._local = None
            if self.fragment_limit > 0 and self._local is not None:
                try:
                    self._fragments = FragmentCache(
                        self.directory / "fragments", size_limit=self.fragment_limit
                    )
                except StorageUnavailable as exc:
                    log.warning("%s; packing without fragments", exc)

    # --- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        with self._flights_lock:
            tiers, self._bucket_tiers = list(self._bucket_tiers.values()), {}
        for tier in tiers:  # their queued uploads read the local fragments: first
            tier.close()
        if self._local is not None:
            self._local.close()
        if self._fragments is not None:
            self._fragments.close()

    @property
    def fragments(self) -> FragmentCache | None:
        """The local fragment cache (``None`` without a directory or with ``fragment_limit=0``)."""
        return self._fragments

    def fragments_for(self, store: Uploader) -> FragmentSource | None:
        """Where a build on ``store`` finds and keeps fragments.

        The local fragment cache, with the bucket tier in front of it when
        ``fragment_bucket`` is set and ``store`` can read blobs back
        (:class:`~nixery_core.protocols.SupportsReading`).
        """
        local = self._fragments
        if local is None or self.fragment_bucket is None:
            return local
        if not isinstance(store, SupportsReading):
            log.warning("the store cannot read blobs back; fragments stay local")
            return local
        with self._flights_lock:
            tier = self._bucket_tiers.get(id(store))
            if tier is None or tier.store is not store:
                ranges = local.on_store(store) if self._ranges_on(store) else None
                tier = BucketFragments(local, store, self.fragment_bucket, ranges=ranges)
                self._bucket_tiers[id(store)] = tier
            return tier

    def _ranges_on(self, store: object) -> bool:
        """Whether layers packed into ``store`` may keep their fragments as ranges."""
        if self.fragment_mode == "copy" or not isinstance(store, SupportsReading):
            return False
        return self.fragment_mode == "ranges" or isinstance(
            store, (SupportsBlobFiles, SupportsRangeReads)
        )

    def fragment_ranges_for(
        self, store: Uploader, archive: ArchiveOptions
    ) -> StoreFragments | BucketFragments | None:
        """Where a layer packed into ``store`` keeps its fragments as byte ranges of its
        blob (see ``fragment_mode``): the fragment cache as seen from ``store``, or with
        ``fragment_bucket`` the bucket tier sharing references; ``None``: copies.
        """
        local = self._fragments
        if local is None or not self._ranges_on(store):
            return None
        if archive.compression == "none":
            return None
        if self.fragment_bucket is not None:
            tier = self.fragments_for(store)
            return tier if isinstance(tier, BucketFragments) and tier.ranges is not None \
                else None
        return local.on_store(cast("SupportsReading", store))

    def __enter__(self) -> BuildCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stats(self) -> CacheStats:
        """Totals since this cache was opened."""
        return self._totals.snapshot()

    # --- concurrency -------------------------------------------------------

    @contextlib.contextmanager
    def single_flight(self, key: str) -> Iterator[None]:
        """Hold the build of ``key``: one thread and one process at a time.

        Callers look the key up again after entering, so the threads that
        waited find the first one's entry instead of building again.
        """
        with self._flights_lock:
            flight = self._flights.setdefault(key, _Flight())
            flight.users += 1
        try:
            with flight.lock, self._process_lock(key):
                yield
        finally:
            with self._flights_lock:
                flight.users -= 1
                if flight.users == 0:
                    del self._flights[key]

    @contextlib.contextmanager
    def _process_lock(self, key: str) -> Iterator[None]:
        """Hold ``key`` against other processes (and other caches) on this directory.

        An exclusive ``flock`` on ``<directory>/lock-<sha256(key)>``: the
        kernel drops it when the holder exits or is killed, so a crashed
        build never blocks the next one (a lock stored as a diskcache entry
        would, until it expired).  The holder unlinks the file before
        unlocking, and a waiter that then gets the lock on the unlinked file
        tries again on the path's new file, so the directory keeps no file
        per key ever built.  Lock files of killed holders stay until the
        next holder of their key removes them; ``diskcache``'s
        ``check(fix=True)`` would delete the files of live holders too, so
        do not run it while builds run.
        """
        if self.directory is None:
            yield
            return
        path = self.directory / f"lock-{hashlib.sha256(key.encode()).hexdigest()}"
        while True:
            # read-only: flock needs no write access, so users sharing the directory can lock
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                # A read-only or full cache directory: threads still share one
                # build (single_flight); other processes may build it too.
                log.warning("cannot create cache lock %s (%s); not locking across processes",
                            path, exc)
                yield
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if _same_file(fd, path):
                    break
            except OSError as exc:
                os.close(fd)
                raise StorageUnavailable(f"cannot lock {path}: {exc}", key) from exc
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the holder before us unlinked it: lock the new file
        try:
            yield
        finally:
            try:
                if _same_file(fd, path):
                    path.unlink()
            finally:
                os.close(fd)

    def fleet_flight(
        self, store: Uploader, name: str, ready: Callable[[], T | None], build: Callable[[], T]
    ) -> T:
        """``ready()``, or else ``build()`` once across every host sharing ``store``.

        Call it while holding :meth:`single_flight` for the same key.  With
        a lease-capable store and the shared tier, other hosts building the
        same ``name`` wait for this one's entry (``ready``) instead of
        building; otherwise this is ``ready() or build()``.
        """
        found = ready()
        if found is not None:
            return found
        if self.fleet is None or not self.shared or not isinstance(store, SupportsLeases):
            return build()
        return self.fleet.run(store, name, ready, build)

    # --- manifests ---------------------------------------------------------

    def get_manifest(
        self, store: Uploader, key: str, *, on_count: Counted | None = None,
        check: Callable[[Mapping[str, Any]], object] | None = None,
    ) -> ManifestRecord | None:
        """The cached build for ``key``, if every blob it names is stored with its size.

        ``on_count`` receives the name of each :class:`CacheStats` counter
        this lookup adds to, so a caller can tally its own lookups exactly
        while other threads use the same cache.  ``check`` is given the
        body of an entry that passed :mod:`~nixery_core.record_schema`; a
        ValueError, TypeError or KeyError from it makes the entry corrupt
        like any other (counted, logged, a miss): what a caller reads from
        the body beyond the schema (a multi-architecture index's entries
        matching its request).
        """
        count = self._counter(on_count)
        parse = _served_manifest
        if check is not None:
            def parse(data: Mapping[str, Any]) -> ManifestRecord:
                record = _served_manifest(data)
                check(record.body)
                return record

        record, tier = self._get(store, f"manifests/{key}", parse, count)
        if record is None:
            count("manifest_misses")
            return None
        if record.expires_at is not None and record.expires_at <= self.clock():
            count("manifest_misses")
            return None
        if not self._blobs_intact(store, f"manifests/{key}", record.sizes, count):
            count("manifest_misses")
            return None
        count("manifest_local_hits" if tier == "local" else "manifest_shared_hits")
        return record

    def put_manifest(
        self, store: Uploader, key: str, body: Mapping[str, Any], blobs: tuple[str, ...], *,
        pinned: bool,
    ) -> None:
        """Record a build; call only once every blob in ``blobs`` is stored."""
        if not pinned and self.moving_ttl <= 0:
            return
        expires_at = None if pinned else self.clock() + self.moving_ttl
        record = ManifestRecord(body, blobs, expires_at)
        self._put(store, f"manifests/{key}", record.to_json(), None if pinned else self.moving_ttl)

    # --- layers ------------------------------------------------------------

    def get_layer(
        self, store: Uploader, key: str, *, on_count: Counted | None = None
    ) -> tuple[LayerRecord, str] | None:
        """The packed layer for ``key`` and the tier it came from, if its blob exists."""
        count = self._counter(on_count)
        record, tier = self._get(store, f"builds/{key}", LayerRecord.from_json, count)
        if record is None:
            count("layer_misses")
            return None
        if not self._blobs_intact(store, f"builds/{key}", {record.digest: record.size}, count):
            count("layer_misses")
            return None
        count("layer_local_hits" if tier == "local" else "layer_shared_hits")
        return record, tier

    def _blobs_intact(
        self, store: Uploader, name: str, sizes: Mapping[str, int], count: Counted
    ) -> bool:
        """:meth:`_check_blobs`, skipped while ``recheck_after`` says a check is recent."""
        if self.recheck_after <= 0:
            return self._check_blobs(store, name, sizes, count)
        now = self.clock()
        with self._memo_lock:
            checked = self._verified.get(name)
        if checked is not None and now - checked < self.recheck_after:
            return True
        intact = self._check_blobs(store, name, sizes, count)
        with self._memo_lock:
            if intact:
                self._verified[name] = now
                self._verified.move_to_end(name)
                while len(self._verified) > _MEMO_ENTRIES:
                    self._verified.popitem(last=False)
            else:
                self._verified.pop(name, None)
        return intact

    @staticmethod
    def _check_blobs(
        store: Uploader, name: str, sizes: Mapping[str, int], count: Counted
    ) -> bool:
        """Whether every blob is stored with its size; logs and counts the first that is not.

        A size compare costs what the existence check did (a stat), and
        catches a truncated or extended blob; the rebuild that follows
        writes the blob again, which replaces a stored copy that does not
        hash to its name.
        """
        if isinstance(store, SupportsBlobSizes) and len(sizes) > 1:
            answers = store.blob_sizes(list(sizes))  # about one round trip for all of them
            found = {digest: answers.get(digest) for digest in sizes}
        else:
            found = {digest: _stored_size(store, digest) for digest in sizes}
        for digest, size in sizes.items():
            stored = found[digest]
            if stored is None:
                log.warning("cache entry %s names vanished blob %s; rebuilding", name, digest)
                count("stale_entries")
                return False
            if stored != size:
                log.warning(
                    "cache entry %s names blob %s of %d bytes, stored with %d: corrupt; "
                    "rebuilding", name, digest, size, stored,
                )
                count("corrupt_blobs")
                return False
        return True

    def _counter(self, on_count: Counted | None) -> Counted:
        if on_count is None:
            return self._totals.add

        def both(field: str) -> None:
            self._totals.add(field)
            on_count(field)

        return both

    def put_layer(self, store: Uploader, key: str, record: LayerRecord) -> None:
        """Record a packed layer; call only once its blob is stored."""
        self._put(store, f"builds/{key}", record.to_json(), None)

    # --- tiers -------------------------------------------------------------

    def _get(
        self, store: Uploader, name: str, parse: Callable[[Mapping[str, Any]], T], count: Counted
    ) -> tuple[T | None, str]:
        if self._local is not None:
            with self._memo_lock:
                memoised = self._memo.get(name)
                if memoised is not None:
                    self._memo.move_to_end(name)
                    return cast(T, memoised), "local"
            raw = self._local_get(name)
            if raw is not None:
                parsed = self._parse(raw, name, "local", parse, count)
                if parsed is not None:
                    self._remember(name, parsed)
                    return parsed, "local"
        if self.shared:
            raw_shared = store.get_object(name)
            if raw_shared is not None:
                parsed = self._parse(raw_shared, name, "shared", parse, count)
                if parsed is not None:
                    self._local_set(name, raw_shared, None)
                    return parsed, "shared"
        return None, ""

    def _remember(self, name: str, parsed: object) -> None:
        with self._memo_lock:
            self._memo[name] = parsed
            while len(self._memo) > _MEMO_ENTRIES:
                self._memo.popitem(last=False)

    def _forget_memo(self, name: str) -> None:
        with self._memo_lock:
            self._memo.pop(name, None)

    def _parse(
        self,
        raw: object,
        name: str,
        tier: str,
        parse: Callable[[Mapping[str, Any]], T],
        count: Counted,
    ) -> T | None:
        try:
            return parse(_json_object(raw))
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            log.warning("corrupt %s cache entry %s (%s); treating as a miss", tier, name, exc)
            count("corrupt_entries")
            return None

    def _put(
        self, store: Uploader, name: str, data: Mapping[str, Any], ttl: float | None
    ) -> None:
        raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        self._forget_memo(name)
        if self.shared:
            store.put_object(name, raw)
        self._local_set(name, raw, ttl)

    # The local tier only saves work: when its disk or database fails, a read
    # is a miss and a write is skipped, each with a warning; the build goes on.

    def _local_get(self, name: str) -> object:
        if self._local is None:
            return None
        try:
            return self._local.get(name)
        except (OSError, sqlite3.Error) as exc:
            log.warning("local cache read of %s failed (%s); treating as a miss", name, exc)
            return None

    def _local_set(self, name: str, raw: bytes, ttl: float | None) -> None:
        if self._local is None:
            return
        try:
            self._local.set(name, raw, expire=ttl)
        except (OSError, sqlite3.Error) as exc:
            log.warning("local cache write of %s failed (%s); not cached locally", name, exc)

    def local_entries(self) -> Iterator[tuple[str, bytes]]:
        """Every ``(name, raw entry)`` in the local tier (for maintenance: verify, inspection)."""
        if self._local is None:
            return
        try:
            names = list(self._local.iterkeys())
        except (OSError, sqlite3.Error) as exc:
            raise StorageUnavailable(
                f"cannot list the local cache in {self.directory}: {exc}", str(self.directory)
            ) from exc
        for name in names:
            raw = self._local_get(name)
            if isinstance(name, str) and isinstance(raw, bytes):
                yield name, raw

    def stored_layers(self) -> frozenset[tuple[str, ...]]:
        """The store path sets of every store layer of the images in the local tier.

        Read from the manifest entries (``manifests/<key>``: each image's
        layers with their store paths; an index entry's images too), for a
        strategy told which layers the registry already stores
        (:class:`~nixery_core.protocols.SupportsPriorLayers`).  The shared
        tier is not listed; an entry that does not parse is skipped.
        """
        layers: set[tuple[str, ...]] = set()
        for name, raw in self.local_entries():
            if not name.startswith("manifests/"):
                continue
            try:
                body = ManifestRecord.from_json(_json_object(raw)).body
            except (ValueError, TypeError, RecursionError):
                continue
            layers.update(_store_layer_paths(body))
        return frozenset(layers)

    def forget(self, store: Uploader, name: str) -> None:
        """Drop one entry (``manifests/<key>`` or ``builds/<key>``) from both tiers."""
        self._forget_memo(name)
        with self._memo_lock:
            self._verified.pop(name, None)
        if self._local is not None:
            with contextlib.suppress(OSError, sqlite3.Error):
                self._local.delete(name)
        # A store that cannot delete keeps the entry; the rebuild overwrites it.
        if self.shared and isinstance(store, SupportsDeletion):
            with contextlib.suppress(StorageError):
                store.delete_object(name)

"""Garbage collection: delete stored blobs that nothing names any more.

:func:`collect_garbage` works in two phases.

**Mark.**  Every digest is *named* (and so kept) when it appears in

* a manifest cache entry ``manifests/<key>``: its ``blobs`` list, the digest
  of the manifest text and config text in its body, and every blob that
  manifest lists (for a multi-arch entry, ``manifests/index-<key>``, the
  index text, the manifests it lists and each architecture's record);
* a layer build entry ``builds/<key>``: its ``digest``;
* the ``keep`` list passed by the caller;
* a named blob that is itself an image manifest or index (by its stored media
  type, or, for ``keep`` entries stored as ``application/octet-stream``, by
  its content): its config and layers, or its manifests, transitively.

Marking is conservative.  Besides parsing each entry, every
``sha256:<64 hex>`` string in an entry's raw bytes counts as named, so a
corrupt or truncated entry still protects every digest it visibly names; it
is reported in :attr:`GcReport.unreadable` and left in place (pass
``delete_unreadable=True`` to remove it, which a later run then honours).
An entry that cannot be *read* (a :class:`~nixery_core.errors.StorageError`)
aborts the run before anything is deleted.  The mark phase finishes before
the first deletion.

**Sweep.**  Every stored blob that is not named and was written at least
``grace_seconds`` before ``now()`` is deleted (``dry_run=True``: listed in
:attr:`GcReport.would_delete` instead).  A blob whose write time is unknown
is kept.  Write times come from ``written_at(info)`` (seconds since the
epoch, on the same clock as ``now``); by default :func:`default_written_at`
asks a store that offers :class:`~nixery_core.protocols.SupportsWriteTimes`
(the filesystem store, GcsStore and MemoryStore do), and knows no time for
other stores (so nothing is deleted from them unless the caller supplies one).

**What a store needs.**  Listing and deletion
(:class:`~nixery_core.protocols.CollectableStore`); write times and staging
clean-up are optional capabilities, found structurally (never by the
store's class), so an embedder's store gets them by offering the methods.

**Races with builds.**  A build stores every blob before it writes the
entry naming it (:mod:`nixery_core.cache`), so while a build runs its new
blobs are young and kept.  A build that *re-uses* a stored blob (a layer
cache hit, a layer packed again, the same config or manifest stored again)
restarts its age: a store offering
:class:`~nixery_core.protocols.SupportsRefresh` refreshes a blob's write
time when its bytes are stored again, and the build calls ``touch_blob`` on
each layer it takes from the cache (a blob gone by then is packed again).
Deletion from such a store is conditional: ``delete_blob_if_older``
removes a blob only if its time is still before the cutoff at that moment
(the filesystem store renames it aside, checks, and puts it back if
touched; GCS deletes on the metageneration it judged; MemoryStore under its
lock), so a refresh that returned before the deletion always wins, and one
that comes after finds the blob absent and the build stores it again.  A
caller passing ``written_at`` gets plain deletion (its clock is not the
store's): keep builds quiet during such a run.

**Expired entries.**  A moving-target manifest entry past its
``expires_at`` is never served, but it still names its blobs, so they are
kept until the entry itself is removed.  ``drop_expired=True`` deletes such
entries first (judged by ``now()``), which frees their blobs in the same run.
Removing ``manifests/`` or ``builds/`` entries is always harmless: the cache
rebuilds what is missing.  Entries in a :class:`~nixery_core.cache.BuildCache`
*local* tier are invisible here; the cache checks that an entry's blobs exist
before serving it, so deleting them costs a rebuild, never a broken image.

**Fragments.**  The bucket tier of the fragment cache
(:mod:`nixery_core.fragment_bucket`) stores fragment blobs (media type
:data:`~nixery_core.fragment_bucket.FRAGMENT_MEDIA_TYPE`) that no entry
names, each with a pointer object ``fragments/<key>``.  They are swept by
age like any unnamed blob, with their own grace period
(``fragment_grace_seconds``; by default ``grace_seconds``): a bucket hit
touches its blob, so a fragment reused within that period stays.  After the
sweep, pointers whose blob is no longer stored (or that do not parse) are
deleted (``dry_run``: those already dangling are counted).  That reads every
pointer, one request each, like the ``manifests/`` and ``builds/`` entries.
A pointer removed while a build rewrites it costs that build's next reader
one miss; a build never depends on a bucket fragment after fetching it, so
no deletion breaks a build in flight.  A *reference* (a pointer naming a
range of a layer blob, shared where layers keep their fragments as ranges)
names a layer blob, which lives as long as an entry names it (or its grace
period): once that blob is deleted, its references are dropped the same
way.  A local fragment cache passed as ``fragments`` (``nixery-core gc
--cache DIR``) also drops its ranges of the blobs gone, so they do not
linger as misses (``dropped_fragment_ranges``; not in a dry run).

**Staging.**  Uploads left behind by crashed processes are removed too, by
a store that offers :class:`~nixery_core.protocols.SupportsStagingCleanup`,
when older than the grace period and never younger than
:data:`STAGING_MIN_AGE` (six hours), so ``grace_seconds=0`` cannot cut off
an upload in flight.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from nixery_core.cache import LayerRecord, ManifestRecord
from nixery_core.digests import DIGEST_BYTES_PATTERN, sha256_digest, validate_digest
from nixery_core.display import human_size
from nixery_core.errors import BlobNotFound, InvalidCacheRecord, InvalidInput, InvalidManifest
from nixery_core.fragment_bucket import FRAGMENT_MEDIA_TYPE, FRAGMENT_PREFIX, FragmentPointer
from nixery_core.fragments import FragmentCache
from nixery_core.manifest import (
    MAX_MANIFEST_SIZE,
    Descriptor,
    parse_index,
    parse_manifest,
    sniff_media_type,
)
from nixery_core.media_types import IMAGE_MANIFEST_TYPES, INDEX_TYPES, OCTET_STREAM
from nixery_core.protocols import (
    BlobInfo,
    CollectableStore,
    SupportsRefresh,
    SupportsStagingCleanup,
    SupportsWriteTimes,
    Uploader,
)

__all__ = [
    "BUILD_PREFIX",
    "DEFAULT_GRACE_SECONDS",
    "MANIFEST_PREFIX",
    "STAGING_MIN_AGE",
    "GcReport",
    "UnreadableEntry",
    "WrittenAt",
    "collect_garbage",
    "default_written_at",
]

#: One day: longer than any build, so a build running during gc keeps its blobs.
DEFAULT_GRACE_SECONDS = 86400.0
#: Staged uploads younger than this are never removed, whatever the grace period
#: (``--grace 0`` must not cut off a layer being packed).
STAGING_MIN_AGE = 6 * 3600.0
MANIFEST_PREFIX = "manifests/"
BUILD_PREFIX = "builds/"

#: When a blob was last written, in seconds since the epoch; ``None``: unknown.
WrittenAt = Callable[[BlobInfo], float | None]

_FOLLOWED_TYPES = IMAGE_MANIFEST_TYPES | INDEX_TYPES
#: What parsing a malformed entry raises: bad JSON or UTF-8 and InvalidInput are
#: ValueErrors, a wrong shape TypeError or KeyError, absurd nesting RecursionError.
_MALFORMED = (ValueError, TypeError, KeyError, RecursionError)


@attrs.frozen
class UnreadableEntry:
    """A cache entry or manifest blob that could not be parsed (``key`` names it).

    Nothing was deleted because of it: every digest visible in its bytes was kept.
    """

    key: str
    reason: str


@attrs.frozen
class GcReport:
    """What one :func:`collect_garbage` run did (or, with ``dry_run``, would do).

    ``deleted`` lists the blobs removed (empty in a dry run); ``would_delete``
    the blobs a real run would remove (only filled in a dry run).
    ``bytes_freed``, ``dropped_entries``, ``staging_removed`` and
    ``dropped_fragment_pointers`` count what was removed, or in a dry run
    what a real run would remove; ``dropped_fragment_ranges`` the ranges a
    local fragment cache dropped.  Kept blobs
    are counted by reason; ``missing`` lists digests that are named but not
    stored (stale entries, which the cache rebuilds).
    """

    dry_run: bool
    grace_seconds: float
    deleted: tuple[str, ...] = ()
    would_delete: tuple[str, ...] = ()
    bytes_freed: int = 0
    kept_named: int = 0
    kept_young: int = 0
    kept_unknown_age: int = 0
    missing: tuple[str, ...] = ()
    unreadable: tuple[UnreadableEntry, ...] = ()
    dropped_entries: tuple[str, ...] = ()
    staging_removed: int = 0
    dropped_fragment_pointers: int = 0
    dropped_fragment_ranges: int = 0

    @property
    def kept(self) -> int:
        """Blobs kept, for any reason."""
        return self.kept_named + self.kept_young + self.kept_unknown_age

    def __str__(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        removed = self.would_delete if self.dry_run else self.deleted
        lines = [
            f"gc{' (dry run)' if self.dry_run else ''}: {verb} {len(removed)} blobs "
            f"({human_size(self.bytes_freed)}); kept {self.kept} "
            f"({self.kept_named} named, {self.kept_young} younger than "
            f"{_duration(self.grace_seconds)}, {self.kept_unknown_age} of unknown age)",
        ]
        lines += [f"  {verb} {digest}" for digest in removed]
        if self.dropped_entries:
            dropped = "would drop" if self.dry_run else "dropped"
            lines.append(f"{dropped} {len(self.dropped_entries)} cache entries:")
            lines += [f"  {key}" for key in self.dropped_entries]
        if self.staging_removed:
            staged = "would remove" if self.dry_run else "removed"
            lines.append(f"{staged} {self.staging_removed} leftover staging uploads")
        if self.dropped_fragment_pointers:
            dropped = "would drop" if self.dry_run else "dropped"
            lines.append(
                f"{dropped} {self.dropped_fragment_pointers} fragment pointers whose blob is gone"
            )
        if self.dropped_fragment_ranges:
            lines.append(
                f"dropped {self.dropped_fragment_ranges} local fragment ranges whose blob is gone"
            )
        if self.missing:
            lines.append(f"{len(self.missing)} named blobs are not stored (stale entries)")
        if self.unreadable:
            lines.append(f"{len(self.unreadable)} unreadable entries (kept what they name):")
            lines += [f"  {entry.key}: {entry.reason}" for entry in self.unreadable]
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    for unit, length in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= length:
            return f"{seconds / length:g}{unit}"
    return f"{seconds:g}s"


# --- write times -------------------------------------------------------------


def default_written_at(store: Uploader) -> WrittenAt:
    """Blob write times from the store, when it offers them; unknown (``None``) otherwise.

    A store with :class:`~nixery_core.protocols.SupportsWriteTimes` (the
    filesystem store: the blob file's mtime; GcsStore: the later of the
    object's ``timeCreated`` and ``updated``; MemoryStore: its clock) answers
    through ``blob_written_at``.  Any other store: always ``None``, so gc
    keeps every unnamed blob; pass ``written_at=`` to :func:`collect_garbage`
    for such stores.
    """
    if isinstance(store, SupportsWriteTimes):
        times = store
        return lambda info: times.blob_written_at(info.digest)
    return lambda info: None


# --- mark --------------------------------------------------------------------


@attrs.define
class _Marker:
    """The set of named digests, grown entry by entry and blob by blob."""

    store: CollectableStore
    blobs: Mapping[str, BlobInfo]
    named: set[str] = attrs.Factory(set)
    #: Digests named by a parsed field (not merely seen in raw bytes): blobs
    #: that should exist.  Raw bytes also hold diff_ids, which are no blobs.
    expected: set[str] = attrs.Factory(set)
    unreadable: list[UnreadableEntry] = attrs.Factory(list)
    _followed: set[str] = attrs.Factory(set)
    _pending: list[str] = attrs.Factory(list)

    def name(self, digest: str, *, expected: bool = True) -> None:
        if expected:
            self.expected.add(digest)
        if digest not in self.named:
            self.named.add(digest)
            self._pending.append(digest)

    def salvage(self, raw: bytes) -> None:
        """Name every digest that appears anywhere in ``raw``."""
        for match in DIGEST_BYTES_PATTERN.finditer(raw):
            self.name(match.group().decode("ascii"), expected=False)

    def manifest_entry(self, key: str, raw: bytes) -> ManifestRecord | None:
        self.salvage(raw)
        try:
            record = ManifestRecord.from_json(_json_object(raw))
            for digest in record.blobs:
                self.name(validate_digest(digest))
            self._body(record.body)
        except _MALFORMED as exc:
            self.unreadable.append(UnreadableEntry(key, _reason(exc)))
            return None
        return record

    def _body(self, body: Mapping[str, Any]) -> None:
        """Name what a build record (or a multi-arch index record) describes."""
        index = body.get("index")
        if isinstance(index, str):
            self._document(index, body.get("media_type"),
                           lambda data, kind: parse_index(data, kind).manifests)
            for entry in body.get("manifests") or ():
                if not isinstance(entry, dict) or not isinstance(entry.get("record"), dict):
                    raise TypeError("index record manifests are not {arch, record} objects")
                self._body(entry["record"])
        manifest, config = body.get("manifest"), body.get("config")
        if isinstance(config, str):
            self.name(sha256_digest(config.encode()))
        if isinstance(manifest, str):
            self._document(manifest, body.get("manifest_media_type"),
                           lambda data, kind: parse_manifest(data, kind).blobs)

    def _document(
        self,
        text: str,
        media_type: object,
        listed: Callable[[bytes, str | None], Sequence[Descriptor]],
    ) -> None:
        """Name a manifest or index a record holds as text, and every blob ``listed`` in it."""
        data = text.encode()
        self.name(sha256_digest(data))
        for descriptor in listed(data, media_type if isinstance(media_type, str) else None):
            self.name(descriptor.digest)

    def build_entry(self, key: str, raw: bytes) -> None:
        self.salvage(raw)
        try:
            self.name(validate_digest(LayerRecord.from_json(_json_object(raw)).digest))
        except _MALFORMED as exc:
            self.unreadable.append(UnreadableEntry(key, _reason(exc)))

    def follow(self, sniff: set[str]) -> None:
        """Name what every named manifest or index blob refers to, transitively."""
        while self._pending:
            digest = self._pending.pop()
            info = self.blobs.get(digest)
            if info is None or digest in self._followed or info.size > MAX_MANIFEST_SIZE:
                continue
            self._followed.add(digest)
            if info.media_type in _FOLLOWED_TYPES:
                self._follow_blob(info, info.media_type, report=True)
            elif info.media_type == OCTET_STREAM and digest in sniff:
                self._follow_blob(info, None, report=False)

    def _follow_blob(self, info: BlobInfo, media_type: str | None, *, report: bool) -> None:
        try:
            data = self.store.read_blob(info.digest)
        except BlobNotFound:  # deleted by someone else meanwhile
            return
        if report:
            self.salvage(data)
        try:
            kind = media_type or sniff_media_type(data)
            if kind in INDEX_TYPES:
                children = [d.digest for d in parse_index(data, media_type).manifests]
            elif kind in IMAGE_MANIFEST_TYPES:
                children = [d.digest for d in parse_manifest(data, media_type).blobs]
            else:
                return
        except InvalidManifest as exc:
            if report:
                self.unreadable.append(UnreadableEntry(info.digest, exc.detail))
            return
        for child in children:
            self.name(child)


def _json_object(raw: bytes) -> dict[str, Any]:
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise TypeError("entry is not a JSON object")
    return data


def _expired(record: ManifestRecord | None, now: float) -> bool:
    return record is not None and record.expires_at is not None and record.expires_at <= now


# --- staging -----------------------------------------------------------------


def _clean_staging(store: Uploader, grace_seconds: float, now: float, *, dry_run: bool) -> int:
    """Staged uploads older than the grace period, through the store's own capability."""
    if isinstance(store, SupportsStagingCleanup):
        older_than = max(grace_seconds, STAGING_MIN_AGE)  # never an upload in flight
        return store.clean_staging(older_than=older_than, now=now, dry_run=dry_run)
    return 0


# --- the collector -----------------------------------------------------------


def _mark(
    store: CollectableStore,
    blobs: Mapping[str, BlobInfo],
    keep: list[str],
    *,
    drop_expired: bool,
    now: float,
) -> tuple[_Marker, list[str]]:
    """Name everything that is kept; return the marker and the expired entries to drop."""
    marker = _Marker(store, blobs)
    for digest in keep:
        marker.name(digest)
    expired: list[str] = []
    for key in list(store.list_objects(MANIFEST_PREFIX)):
        raw = store.get_object(key)
        if raw is None:  # removed meanwhile
            continue
        if drop_expired and _expired(_peek_manifest(raw), now):
            expired.append(key)
            continue
        marker.manifest_entry(key, raw)
    for key in list(store.list_objects(BUILD_PREFIX)):
        raw = store.get_object(key)
        if raw is not None:
            marker.build_entry(key, raw)
    marker.follow(set(keep))
    return marker, expired


@attrs.frozen
class _Sweep:
    doomed: tuple[BlobInfo, ...]
    kept_named: int
    kept_young: int
    kept_unknown_age: int


def _choose(
    blobs: Mapping[str, BlobInfo],
    named: set[str],
    written_at: WrittenAt,
    *,
    grace: Callable[[BlobInfo], float],
    now: float,
) -> _Sweep:
    doomed: list[BlobInfo] = []
    named_count = young = unknown = 0
    for digest in sorted(blobs):
        info = blobs[digest]
        if digest in named:
            named_count += 1
            continue
        written = written_at(info)
        if written is None:
            unknown += 1
        elif now - written < grace(info):
            young += 1
        else:
            doomed.append(info)
    return _Sweep(tuple(doomed), named_count, young, unknown)


def _delete(
    store: CollectableStore, sweep: _Sweep, cutoff: Callable[[BlobInfo], float], *, own_ages: bool
) -> _Sweep:
    """Delete the doomed blobs; judged by the store's own ages, only those still older
    than their ``cutoff`` when deleted (a build that reused one meanwhile refreshed it)."""
    if not (own_ages and isinstance(store, SupportsRefresh)):
        for info in sweep.doomed:
            store.delete_blob(info.digest)
        return sweep
    deleted = tuple(
        info for info in sweep.doomed if store.delete_blob_if_older(info.digest, cutoff(info))
    )
    return attrs.evolve(
        sweep, doomed=deleted, kept_young=sweep.kept_young + len(sweep.doomed) - len(deleted)
    )


def collect_garbage(
    store: CollectableStore,
    *,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    keep: Iterable[str] = (),
    dry_run: bool = False,
    drop_expired: bool = False,
    delete_unreadable: bool = False,
    now: Callable[[], float] = time.time,
    written_at: WrittenAt | None = None,
    fragment_grace_seconds: float | None = None,
    fragments: FragmentCache | None = None,
) -> GcReport:
    """Delete every blob nothing names that is older than ``grace_seconds``.

    See the module documentation for what counts as named, how races with
    builds are handled and what happens to expired and unreadable entries.
    ``keep`` holds extra digests to keep (a manifest or index digest keeps
    what it refers to as well); a malformed one raises
    :class:`~nixery_core.errors.InvalidDigest` before anything is touched.
    ``drop_expired`` removes expired manifest entries first;
    ``delete_unreadable`` removes unparseable cache entries (after keeping
    what they name in this run).  ``written_at`` gives a blob's write time
    (default: :func:`default_written_at`).  ``fragment_grace_seconds``
    is the grace of fragment blobs (default: ``grace_seconds``).  ``fragments``: a
    local fragment cache whose ranges of blobs no longer stored are dropped
    after the sweep (not in a dry run).  Storage failures raise
    :class:`~nixery_core.errors.StorageError`; a failure while marking
    deletes nothing, and a re-run after a failure while sweeping is safe.
    """
    if not grace_seconds >= 0:  # also refuses NaN
        raise InvalidInput(f"grace_seconds must be a number >= 0, not {grace_seconds!r}")
    fragment_grace = grace_seconds if fragment_grace_seconds is None else fragment_grace_seconds
    if not fragment_grace >= 0:
        raise InvalidInput(
            f"fragment_grace_seconds must be a number >= 0, not {fragment_grace_seconds!r}"
        )

    def grace(info: BlobInfo) -> float:
        return fragment_grace if info.media_type == FRAGMENT_MEDIA_TYPE else grace_seconds

    keep_list = [validate_digest(digest) for digest in keep]
    when = now()
    blobs = {info.digest: info for info in store.list_blobs()}
    marker, dropped = _mark(store, blobs, keep_list, drop_expired=drop_expired, now=when)

    # Everything is marked: only from here on is anything removed.
    if delete_unreadable:
        dropped += [
            entry.key
            for entry in marker.unreadable
            if entry.key.startswith((MANIFEST_PREFIX, BUILD_PREFIX))
        ]
    sweep = _choose(
        blobs,
        marker.named,
        written_at if written_at is not None else default_written_at(store),
        grace=grace,
        now=when,
    )
    if not dry_run:
        for key in dropped:
            store.delete_object(key)
        sweep = _delete(
            store, sweep, lambda info: when - grace(info), own_ages=written_at is None
        )
    staging = _clean_staging(store, grace_seconds, when, dry_run=dry_run)
    gone = {info.digest for info in sweep.doomed}
    still = {d for d in blobs if d not in gone}
    pointers = _drop_dangling_pointers(store, still, dry_run=dry_run)
    ranges = 0 if fragments is None or dry_run else _drop_dangling_ranges(
        store, fragments, still
    )

    removed = tuple(info.digest for info in sweep.doomed)
    return GcReport(
        dry_run=dry_run,
        grace_seconds=grace_seconds,
        deleted=() if dry_run else removed,
        would_delete=removed if dry_run else (),
        bytes_freed=sum(info.size for info in sweep.doomed),
        kept_named=sweep.kept_named,
        kept_young=sweep.kept_young,
        kept_unknown_age=sweep.kept_unknown_age,
        missing=tuple(sorted(d for d in marker.expected if d not in blobs)),
        unreadable=tuple(marker.unreadable),
        dropped_entries=tuple(dropped),
        staging_removed=staging,
        dropped_fragment_pointers=pointers,
        dropped_fragment_ranges=ranges,
    )


def _drop_dangling_ranges(
    store: CollectableStore, fragments: FragmentCache, stored: set[str]
) -> int:
    """Drop the local fragment ranges of blobs not stored (asked again, as for pointers)."""
    return fragments.drop_ranges_of(fragments.range_blobs_not_stored(store, stored))


def _drop_dangling_pointers(store: CollectableStore, stored: set[str], *, dry_run: bool) -> int:
    """Delete the ``fragments/`` pointers whose blob is not stored (or that do not parse).

    A digest missing from ``stored`` (the listing, less what this run
    deleted) is asked about again before its pointer goes: a build may have
    uploaded it since the listing.
    """
    dropped = 0
    for key in list(store.list_objects(FRAGMENT_PREFIX)):
        raw = store.get_object(key)
        if raw is None:
            continue
        try:
            digest: str | None = FragmentPointer.from_json(raw).digest
        except InvalidCacheRecord:
            digest = None
        if digest is not None and (digest in stored or store.blob_info(digest) is not None):
            continue
        dropped += 1
        if not dry_run:
            store.delete_object(key)
    return dropped


def _reason(exc: BaseException) -> str:
    """What is wrong with an unreadable entry, as its report says it."""
    if isinstance(exc, InvalidCacheRecord):
        return exc.detail
    return str(exc) or type(exc).__name__


def _peek_manifest(raw: bytes) -> ManifestRecord | None:
    """The entry as a record, or ``None`` when it does not parse (never judged expired)."""
    try:
        return ManifestRecord.from_json(_json_object(raw))
    except _MALFORMED:
        return None

"""collect_garbage: mark what cache entries and the keep list name, sweep old unnamed blobs."""

from __future__ import annotations

import json
import math
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from partial_stores import CollectableOnly
from servers import FakeGcsServer, fake_gcs

from nixery_core.cache import BuildCache, LayerRecord
from nixery_core.digests import sha256_digest
from nixery_core.errors import InvalidDigest, InvalidInput, StorageUnavailable
from nixery_core.gc import GcReport, UnreadableEntry, collect_garbage, default_written_at
from nixery_core.manifest import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    LayerDescriptor,
    ManifestRef,
    render_index,
    render_manifest,
)
from nixery_core.names import AMD64, ARM64, Image
from nixery_core.protocols import (
    BlobInfo,
    CollectableStore,
    SupportsStagingCleanup,
    SupportsWriteTimes,
)
from nixery_core.storage.filesystem import FilesystemStore
from nixery_core.testing.storage import MemoryStore

__all__ = ["fake_gcs"]

NOW = 2_000_000_000.0
DAY = 86400.0
OLD = NOW - 10 * DAY


class Times:
    """Injected blob write times: every blob is OLD unless set otherwise (None: unknown)."""

    def __init__(self) -> None:
        self.times: dict[str, float | None] = {}

    def __setitem__(self, digest: str, when: float | None) -> None:
        self.times[digest] = when

    def __call__(self, info: BlobInfo) -> float | None:
        return self.times.get(info.digest, OLD)


@attrs.frozen
class StoredImage:
    """An image's blobs in a store: manifest, config, layers."""

    manifest: bytes
    manifest_digest: str
    media_type: str
    config: bytes
    config_digest: str
    layers: tuple[BlobInfo, ...]

    @property
    def blobs(self) -> tuple[str, ...]:
        return (self.manifest_digest, self.config_digest, *(layer.digest for layer in self.layers))

    def record_body(self) -> dict[str, Any]:
        """The body BuildResult.to_record() writes for this image."""
        return {
            "manifest": self.manifest.decode(),
            "manifest_media_type": self.media_type,
            "config": self.config.decode(),
            "layers": [{"digest": layer.digest, "size": layer.size} for layer in self.layers],
        }


def store_image(store: CollectableStore, name: str, n_layers: int = 2) -> StoredImage:
    """Store layers, a config and an OCI manifest for a made-up image."""
    layers = tuple(
        store.put_blob(f"{name} layer {i}".encode(), OCI_LAYER_GZIP) for i in range(n_layers)
    )
    config = json.dumps({"image": name}).encode()
    config_info = store.put_blob(config, OCI_CONFIG)
    manifest, media_type = render_manifest(
        config=config_info,
        layers=[LayerDescriptor(lr.digest, lr.size, lr.media_type, lr.digest) for lr in layers],
        format="oci",
    )
    info = store.put_blob(manifest, media_type)
    return StoredImage(manifest, info.digest, media_type, config, config_info.digest, layers)


def cache_image(
    store: CollectableStore, image: StoredImage, key: str, *, pinned: bool = True,
    clock: Any = lambda: NOW,
) -> None:
    """Record the image in the manifest cache, exactly as BuildCache writes it."""
    BuildCache(shared=True, clock=clock).put_manifest(
        store, key, image.record_body(), image.blobs, pinned=pinned
    )


def cache_layer(store: CollectableStore, key: str, payload: bytes) -> str:
    """Store a layer blob and record it in the layer build cache; return its digest."""
    info = store.put_blob(payload, OCI_LAYER_GZIP)
    diff_id = sha256_digest(b"tar" + payload)
    record = LayerRecord(info.digest, diff_id, info.size, info.media_type)
    BuildCache(shared=True).put_layer(store, key, record)
    return info.digest


def stored(store: CollectableStore) -> set[str]:
    return {info.digest for info in store.list_blobs()}


def gc(store: CollectableStore, times: Times, **kwargs: Any) -> GcReport:
    return collect_garbage(store, now=lambda: NOW, written_at=times, **kwargs)


# --- mark and sweep ------------------------------------------------------------


def test_deletes_old_unnamed_blobs_only() -> None:
    """Old unnamed blobs go; named, young and unknown-age blobs stay, each counted."""
    store, times = MemoryStore(), Times()
    image = store_image(store, "a")
    cache_image(store, image, "k-a")
    layer = cache_layer(store, "l-1", b"cached layer")
    orphan = store.put_blob(b"orphan" * 100, OCI_LAYER_GZIP)
    young = store.put_blob(b"young orphan", OCI_LAYER_GZIP).digest
    unknown = store.put_blob(b"orphan of unknown age", OCI_LAYER_GZIP).digest
    times[young] = NOW - 3600
    times[unknown] = None

    report = gc(store, times)

    assert report.deleted == (orphan.digest,)
    assert report.bytes_freed == orphan.size
    assert report.would_delete == ()
    assert (report.kept_named, report.kept_young, report.kept_unknown_age) == (
        len(image.blobs) + 1, 1, 1,
    )
    assert stored(store) == {*image.blobs, layer, young, unknown}
    assert report.unreadable == ()
    assert report.missing == ()


def test_dry_run_deletes_nothing_and_predicts_the_real_run() -> None:
    """A dry run removes nothing; its would_delete is exactly what the real run then deletes."""
    store, times = MemoryStore(), Times()
    cache_image(store, store_image(store, "kept"), "k")
    for i in range(3):
        store.put_blob(f"garbage {i}".encode(), OCI_LAYER_GZIP)
    before = stored(store)

    dry = gc(store, times, dry_run=True)
    assert stored(store) == before
    assert dry.deleted == ()
    assert len(dry.would_delete) == 3

    real = gc(store, times)
    assert real.deleted == dry.would_delete
    assert real.bytes_freed == dry.bytes_freed
    assert stored(store) == before - set(real.deleted)
    assert "would delete 3 blobs" in str(dry)
    assert "deleted 3 blobs" in str(real)


def test_grace_boundary() -> None:
    """A blob exactly grace_seconds old is deleted; one a second younger is kept."""
    store, times = MemoryStore(), Times()
    at_limit = store.put_blob(b"at the limit", OCI_LAYER_GZIP).digest
    inside = store.put_blob(b"inside", OCI_LAYER_GZIP).digest
    future = store.put_blob(b"clock skew", OCI_LAYER_GZIP).digest
    times[at_limit], times[inside], times[future] = NOW - 100, NOW - 99, NOW + 1000
    report = gc(store, times, grace_seconds=100)
    assert report.deleted == (at_limit,)
    assert report.kept_young == 2


def test_manifest_text_in_the_body_protects_its_blobs() -> None:
    """An entry whose blobs list is empty still protects its manifest, config and layers."""
    store, times = MemoryStore(), Times()
    image = store_image(store, "body-only")
    entry: dict[str, Any] = {"body": image.record_body(), "blobs": [], "expires_at": None}
    store.put_object("manifests/handmade", json.dumps(entry).encode())
    report = gc(store, times)
    assert report.deleted == ()
    assert stored(store) == set(image.blobs)


def test_named_but_missing_blobs_are_reported() -> None:
    """Digests named by entries but not stored are listed as missing (stale entries)."""
    store, times = MemoryStore(), Times()
    image = store_image(store, "stale")
    cache_image(store, image, "k")
    store.delete_blob(image.layers[0].digest)
    assert gc(store, times).missing == (image.layers[0].digest,)


def test_a_store_without_write_times_keeps_everything_by_default() -> None:
    """With no way to know blob ages (no SupportsWriteTimes), the default deletes nothing."""
    store = CollectableOnly(MemoryStore())
    assert isinstance(store, CollectableStore)
    assert not isinstance(store, SupportsWriteTimes | SupportsStagingCleanup)
    store.put_blob(b"orphan", OCI_LAYER_GZIP)
    report = collect_garbage(store, now=lambda: NOW)
    assert report.deleted == ()
    assert report.kept_unknown_age == 1
    assert report.staging_removed == 0
    assert default_written_at(store)(next(store.list_blobs())) is None


def test_write_times_and_staging_come_from_the_store_capabilities() -> None:
    """A store's blob_written_at and clean_staging drive gc, whatever its class."""
    store = MemoryStore(clock=lambda: NOW - 2 * DAY)
    old = store.put_blob(b"old orphan", OCI_LAYER_GZIP)
    crashed = store.open_blob_writer(OCI_LAYER_GZIP)
    crashed.write(b"left behind")
    # The same content behind a store without the capabilities: nothing to judge by.
    assert collect_garbage(CollectableOnly(store), now=lambda: NOW).deleted == ()
    report = collect_garbage(store, now=lambda: NOW)
    assert report.deleted == (old.digest,)
    assert report.staging_removed == 1
    assert store.staged_blobs() == ()


# --- keep list -----------------------------------------------------------------


def test_keep_list_keeps_digests_and_follows_manifests_and_indexes() -> None:
    """keep= keeps plain digests, a manifest's config and layers, an index's manifests' blobs."""
    store, times = MemoryStore(), Times()
    plain = store.put_blob(b"kept by hand", OCI_LAYER_GZIP).digest
    by_manifest = store_image(store, "by-manifest")
    amd, arm = store_image(store, "amd"), store_image(store, "arm")
    index, index_type = render_index(
        [
            ManifestRef(amd.manifest_digest, len(amd.manifest), OCI_MANIFEST, AMD64),
            ManifestRef(arm.manifest_digest, len(arm.manifest), OCI_MANIFEST, ARM64),
        ],
        format="oci",
    )
    index_digest = store.put_blob(index, index_type).digest
    doomed = store_image(store, "doomed")

    report = gc(store, times, keep=[plain, by_manifest.manifest_digest, index_digest])

    assert set(report.deleted) == set(doomed.blobs)
    assert stored(store) == {plain, index_digest, *by_manifest.blobs, *amd.blobs, *arm.blobs}


def test_keep_list_follows_a_manifest_stored_without_media_type() -> None:
    """A kept manifest stored as application/octet-stream is recognised by its content."""
    store, times = MemoryStore(), Times()
    image = store_image(store, "foreign")
    store.delete_blob(image.manifest_digest)
    store.put_blob(image.manifest, "application/octet-stream")
    gc(store, times, keep=[image.manifest_digest])
    assert stored(store) == set(image.blobs)


@pytest.mark.parametrize(
    "bad", ["sha256:" + "A" * 64, "sha256:../../etc/passwd", "", "md5:abc", "sha256:" + "0" * 63]
)
def test_bad_keep_digest_is_refused_before_anything_is_deleted(bad: str) -> None:
    """A malformed keep digest raises InvalidDigest and the store is untouched."""
    store, times = MemoryStore(), Times()
    store.put_blob(b"orphan", OCI_LAYER_GZIP)
    before = stored(store)
    with pytest.raises(InvalidDigest):
        gc(store, times, keep=[bad])
    assert stored(store) == before


@pytest.mark.parametrize("grace", [-1.0, math.nan])
def test_bad_grace_is_invalid_input(grace: float) -> None:
    """A negative or NaN grace period is refused with InvalidInput."""
    with pytest.raises(InvalidInput):
        gc(MemoryStore(), Times(), grace_seconds=grace)


# --- unreadable entries --------------------------------------------------------


def _entry_bytes(image: StoredImage) -> bytes:
    entry = {"body": image.record_body(), "blobs": list(image.blobs), "expires_at": None}
    return json.dumps(entry).encode()


CORRUPTIONS = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "not-json": lambda raw: b"\x00\xff garbage " + raw[40:200],
    "json-array": lambda raw: b"[" + raw + b"]",
    "blobs-not-a-list": lambda raw: raw.replace(b'"blobs": [', b'"blobs": "x", "y": ['),
    "bad-digest-in-blobs": lambda raw: raw.replace(b'"blobs": [', b'"blobs": ["sha256:..", '),
    "unparseable-manifest-text": lambda raw: raw.replace(b'"manifest": "{', b'"manifest": "{{'),
    "deeply-nested": lambda raw: b"[" * 100_000 + raw,
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_manifest_entry_keeps_what_it_names(corruption: str) -> None:
    """A corrupt entry is reported and left alone; every digest visible in it is kept."""
    store, times = MemoryStore(), Times()
    image = store_image(store, "corrupt")
    raw = CORRUPTIONS[corruption](_entry_bytes(image))
    store.put_object("manifests/bad", raw)

    report = gc(store, times)

    assert [entry.key for entry in report.unreadable] == ["manifests/bad"]
    assert store.get_object("manifests/bad") == raw
    visible = {d for d in image.blobs if d.encode() in raw}
    assert visible <= stored(store)
    assert set(report.deleted) == set(image.blobs) - visible
    assert "unreadable" in str(report)


def test_corrupt_build_entry_keeps_what_it_names() -> None:
    """A build entry with a wrong shape is reported; the digest in it is kept."""
    store, times = MemoryStore(), Times()
    digest = store.put_blob(b"layer", OCI_LAYER_GZIP).digest
    entry = {"digest": digest, "diff_id": digest, "size": "big", "media_type": OCI_LAYER_GZIP}
    store.put_object("builds/bad", json.dumps(entry).encode())
    report = gc(store, times)
    assert report.unreadable == (UnreadableEntry("builds/bad", "size is not an integer"),)
    assert report.deleted == ()


def test_delete_unreadable_removes_corrupt_entries_only_for_real() -> None:
    """delete_unreadable drops corrupt entries (listed in a dry run, removed in a real one)."""
    store, times = MemoryStore(), Times()
    store.put_object("manifests/bad", b"{not json")
    store.put_object("builds/bad", b"[]")
    cache_image(store, store_image(store, "good"), "good")
    dry = gc(store, times, delete_unreadable=True, dry_run=True)
    assert dry.dropped_entries == ("manifests/bad", "builds/bad")
    assert store.get_object("manifests/bad") is not None
    real = gc(store, times, delete_unreadable=True)
    assert real.dropped_entries == dry.dropped_entries
    assert list(store.list_objects("")) == ["manifests/good"]


def test_unparseable_manifest_blob_is_reported_and_its_digests_kept() -> None:
    """A kept blob typed as a manifest that does not parse is reported; digests in it stay."""
    store, times = MemoryStore(), Times()
    victim = store.put_blob(b"referenced layer", OCI_LAYER_GZIP).digest
    broken = store.put_blob(f'{{"layers": ["{victim}"'.encode(), OCI_MANIFEST).digest
    report = gc(store, times, keep=[broken])
    assert [entry.key for entry in report.unreadable] == [broken]
    assert stored(store) == {broken, victim}


class FlakyReads(MemoryStore):
    """A MemoryStore whose get_object fails for one key."""

    def get_object(self, key: str) -> bytes | None:
        if key == "manifests/flaky":
            raise StorageUnavailable("injected read failure", key)
        return super().get_object(key)


def test_read_failure_while_marking_deletes_nothing() -> None:
    """When an entry cannot be read, gc raises StorageUnavailable before deleting anything."""
    store, times = FlakyReads(), Times()
    cache_image(store, store_image(store, "flaky"), "flaky")
    store.put_blob(b"orphan", OCI_LAYER_GZIP)
    before = stored(store)
    with pytest.raises(StorageUnavailable):
        gc(store, times)
    assert stored(store) == before


# --- expiry --------------------------------------------------------------------


def test_expired_entries_protect_until_dropped() -> None:
    """An expired moving-target entry keeps its blobs unless drop_expired removes it first."""
    store, times = MemoryStore(), Times()
    image = store_image(store, "moving")
    cache_image(store, image, "moving", pinned=False, clock=lambda: NOW - 7 * 3600)
    pinned = store_image(store, "pinned")
    cache_image(store, pinned, "pinned")

    assert gc(store, times).deleted == ()

    dry = gc(store, times, drop_expired=True, dry_run=True)
    assert dry.dropped_entries == ("manifests/moving",)
    assert set(dry.would_delete) == set(image.blobs)
    assert store.get_object("manifests/moving") is not None

    real = gc(store, times, drop_expired=True)
    assert set(real.deleted) == set(image.blobs)
    assert list(store.list_objects("manifests/")) == ["manifests/pinned"]
    assert stored(store) == set(pinned.blobs)


def test_unexpired_moving_entry_is_kept_with_drop_expired() -> None:
    """drop_expired leaves a moving-target entry alone until it expires."""
    store, times = MemoryStore(), Times()
    image = store_image(store, "fresh")
    cache_image(store, image, "fresh", pinned=False, clock=lambda: NOW - 60)
    report = gc(store, times, drop_expired=True)
    assert report.dropped_entries == ()
    assert stored(store) == set(image.blobs)


# --- properties ----------------------------------------------------------------


@st.composite
def store_states(draw: st.DrawFn) -> tuple[MemoryStore, Times, list[str], float]:
    """A store with random blobs, ages, manifest/build entries naming subsets, a keep list."""
    store, times = MemoryStore(), Times()
    count = draw(st.integers(0, 12))
    digests = [store.put_blob(f"blob {i}".encode(), OCI_LAYER_GZIP).digest for i in range(count)]
    for digest in digests:
        times[digest] = draw(st.one_of(st.none(), st.floats(NOW - 5 * DAY, NOW + DAY)))
    ghosts = [sha256_digest(f"never stored {i}".encode()) for i in range(2)]
    pool = digests + ghosts
    for i in range(draw(st.integers(0, 4))):
        named = draw(st.lists(st.sampled_from(pool), max_size=5)) if pool else []
        expires = draw(st.one_of(st.none(), st.floats(NOW - DAY, NOW + DAY)))
        entry: dict[str, Any] = {"body": {}, "blobs": named, "expires_at": expires}
        store.put_object(f"manifests/m{i}", json.dumps(entry).encode())
    for i in range(draw(st.integers(0, 4))):
        if pool:
            digest = draw(st.sampled_from(pool))
            record = LayerRecord(digest, digest, 1, OCI_LAYER_GZIP)
            store.put_object(f"builds/b{i}", json.dumps(record.to_json()).encode())
    keep = draw(st.lists(st.sampled_from(pool), max_size=3)) if pool else []
    grace = draw(st.floats(0, 3 * DAY))
    return store, times, keep, grace


def _named_by_entries(store: MemoryStore, *, skip_expired: bool) -> set[str]:
    named: set[str] = set()
    for key in store.list_objects("manifests/"):
        entry = json.loads(store.get_object(key) or b"{}")
        expires = entry["expires_at"]
        if not (skip_expired and expires is not None and expires <= NOW):
            named.update(entry["blobs"])
    for key in store.list_objects("builds/"):
        named.add(json.loads(store.get_object(key) or b"{}")["digest"])
    return named


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=store_states(), drop_expired=st.booleans())
def test_gc_is_safe_and_complete(
    state: tuple[MemoryStore, Times, list[str], float], drop_expired: bool
) -> None:
    """Never deletes a named or young blob; deletes every old unnamed one; dry run predicts it."""
    store, times, keep, grace = state
    named = _named_by_entries(store, skip_expired=drop_expired) | set(keep)
    blobs = {info.digest: info for info in store.list_blobs()}
    expected = {
        d for d, info in blobs.items()
        if d not in named and (t := times(info)) is not None and NOW - t >= grace
    }
    dry = gc(store, times, keep=keep, grace_seconds=grace, drop_expired=drop_expired, dry_run=True)
    assert set(blobs) == stored(store)
    report = gc(store, times, keep=keep, grace_seconds=grace, drop_expired=drop_expired)
    assert set(report.deleted) == expected == set(dry.would_delete)
    assert stored(store) == set(blobs) - expected
    assert report.kept == len(blobs) - len(expected)


# --- the filesystem store, for real --------------------------------------------


def _age(store: FilesystemStore, digest: str, when: float) -> None:
    os.utime(store.blob_path(digest), (when, when))


def test_filesystem_store_uses_file_mtimes(tmp_path: Path) -> None:
    """On a FilesystemStore, blob file mtimes decide age, with the real BuildCache's entries."""
    store = FilesystemStore(tmp_path / "store", durable=False)
    image = store_image(store, "fs")
    cache_image(store, image, "fs", clock=time.time)
    layer = cache_layer(store, "fs-layer", b"fs layer")
    old = store.put_blob(b"old orphan", OCI_LAYER_GZIP).digest
    young = store.put_blob(b"young orphan", OCI_LAYER_GZIP).digest
    for digest in (*image.blobs, layer, old):
        _age(store, digest, time.time() - 3 * DAY)

    report = collect_garbage(store)

    assert report.deleted == (old,)
    assert stored(store) == {*image.blobs, layer, young}
    assert not (tmp_path / "store" / "layers" / (old.removeprefix("sha256:") + ".meta")).exists()


def test_filesystem_staging_leftovers_are_cleaned(tmp_path: Path) -> None:
    """Old staging leftovers are removed (counted in a dry run); young ones are left."""
    clock = [time.time()]
    store = FilesystemStore(tmp_path / "store", durable=False, clock=lambda: clock[0])
    writer = store.open_blob_writer(OCI_LAYER_GZIP)  # an upload "in progress"
    writer.write(b"half an upload")
    crashed = tmp_path / "store" / "staging" / "blob-crashed"
    crashed.write_bytes(b"left by a crash")
    os.utime(crashed, (clock[0] - 2 * DAY, clock[0] - 2 * DAY))

    dry = collect_garbage(store, dry_run=True, now=lambda: clock[0])
    assert dry.staging_removed == 1
    assert crashed.exists()
    real = collect_garbage(store, now=lambda: clock[0])
    assert real.staging_removed == 1
    assert not crashed.exists()
    assert len(store.staging_leftovers()) == 1  # the live upload
    writer.abort()


def test_concurrent_builds_never_lose_blobs(tmp_path: Path) -> None:
    """While builders store blobs then entries, repeated gc runs never break an entry."""
    store = FilesystemStore(tmp_path / "store", durable=False)
    garbage = [store.put_blob(f"garbage {i}".encode(), OCI_LAYER_GZIP).digest for i in range(20)]
    for digest in garbage:
        _age(store, digest, time.time() - 3 * DAY)
    stop = threading.Event()
    built: list[StoredImage] = []

    def builder(n: int) -> None:
        i = 0
        while not stop.is_set() or i < 5:
            image = store_image(store, f"builder {n} image {i}")
            cache_image(store, image, f"b{n}-{i}", clock=time.time)
            built.append(image)
            i += 1

    threads = [threading.Thread(target=builder, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    try:
        reports = [collect_garbage(store, grace_seconds=3600) for _ in range(5)]
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert built
    for image in built:
        assert all(store.has_blob(digest) for digest in image.blobs), image
    assert not any(store.has_blob(digest) for digest in garbage)
    assert sorted(d for r in reports for d in r.deleted) == sorted(garbage)


# --- GCS, against fake-gcs-server ----------------------------------------------


@pytest.fixture
def gcs_store(fake_gcs: FakeGcsServer) -> Any:
    """A GcsStore on a fresh bucket of the module's fake-gcs-server."""
    from nixery_core.storage.gcs import GcsStore  # optional dependency: imported here only

    return GcsStore(fake_gcs.make_bucket(f"gc-{uuid.uuid4().hex[:12]}"), timeout=5.0)


@pytest.mark.tools
def test_gcs_store_by_object_times(gcs_store: Any) -> None:
    """On GCS, object times decide age: fresh blobs stay, a day later orphans and staging go."""
    image = store_image(gcs_store, "gcs")
    cache_image(gcs_store, image, "gcs", clock=time.time)
    orphan = gcs_store.put_blob(b"gcs orphan", OCI_LAYER_GZIP).digest
    staging_name = gcs_store.prefix + "staging/crashed-upload"
    gcs_store.bucket.blob(staging_name).upload_from_string(b"left by a crash")

    fresh = collect_garbage(gcs_store, grace_seconds=3600)
    assert fresh.deleted == ()
    assert fresh.kept_young == 1
    assert fresh.staging_removed == 0

    later = time.time() + 2 * DAY
    dry = collect_garbage(gcs_store, now=lambda: later, dry_run=True)
    assert dry.would_delete == (orphan,)
    assert dry.staging_removed == 1
    report = collect_garbage(gcs_store, now=lambda: later)
    assert report.deleted == (orphan,)
    assert report.staging_removed == 1
    assert stored(gcs_store) == set(image.blobs)
    assert gcs_store.staging_leftovers() == []


# --- after real builds, and from the command line ------------------------------


def _age_all(store: FilesystemStore, when: float) -> None:
    for info in store.list_blobs():
        _age(store, info.digest, when)


@pytest.mark.nix
@pytest.mark.usefixtures("nix")
def test_gc_after_real_builds_keeps_what_the_cache_needs(tmp_path: Path) -> None:
    """After real builds, gc keeps every blob the entries name; dropping an entry frees its own."""
    from conftest import OFFLINE_SET

    from nixery_core.build import build_image
    from nixery_core.sources import LocalPathSource

    store = FilesystemStore(tmp_path / "store", durable=False)
    source = LocalPathSource(OFFLINE_SET)

    def build(name: str) -> Any:
        with BuildCache(None) as cache:
            return build_image(
                Image.from_name(name), source, uploader=store, cache=cache,
                nix_options={"substituters": ""},
            )

    hello, shell = build("hello"), build("shell/hello")
    orphan = store.put_blob(b"no entry names me", OCI_LAYER_GZIP).digest
    _age_all(store, time.time() - 3 * DAY)

    report = collect_garbage(store)
    assert report.deleted == (orphan,)
    assert report.unreadable == ()
    assert report.missing == ()
    again = build("hello")
    assert again.from_cache
    assert all(store.has_blob(digest) for digest in (*hello.blobs, *shell.blobs))

    # Forget hello's manifest entry: its manifest, config and SBOMs go, its layers
    # are still named by layer build entries, and a rebuild gives the same image.
    store.delete_object(f"manifests/{hello.cache_key}")
    report = collect_garbage(store)
    sboms = {d for artifact in hello.sboms for d in artifact.blobs}
    assert set(report.deleted) == (
        {hello.manifest_digest, hello.config_digest} | sboms
    ) - set(shell.blobs)
    rebuilt = build("hello")
    assert not rebuilt.from_cache
    assert rebuilt.manifest_digest == hello.manifest_digest
    assert all(store.has_blob(digest) for digest in rebuilt.blobs)


@pytest.mark.nix
@pytest.mark.usefixtures("nix")
def test_multiarch_index_entry_protects_the_index_and_every_architecture(tmp_path: Path) -> None:
    """A multi-arch index entry keeps its index and every architecture's blobs from its body."""
    from conftest import OFFLINE_SET

    from nixery_core.multiarch import build_multiarch
    from nixery_core.sources import LocalPathSource

    store = FilesystemStore(tmp_path / "store", durable=False)
    with BuildCache(None) as cache:
        result = build_multiarch(
            Image.from_name("hello"), LocalPathSource(OFFLINE_SET), uploader=store, cache=cache,
            nix_options={"substituters": ""},
        )
    # Only the index entry is left, and its blobs list is emptied: the body must suffice.
    (index_key,) = store.list_objects("manifests/index-")
    for key in [*store.list_objects("manifests/"), *store.list_objects("builds/")]:
        if key != index_key:
            store.delete_object(key)
    entry = json.loads(store.get_object(index_key) or b"")
    store.put_object(index_key, json.dumps({**entry, "blobs": []}).encode())
    orphan = store.put_blob(b"not in the index", OCI_LAYER_GZIP).digest
    _age_all(store, time.time() - 3 * DAY)

    report = collect_garbage(store)

    assert report.deleted == (orphan,)
    assert report.unreadable == ()
    assert result.index_digest in result.blobs
    assert stored(store) == set(result.blobs)


def test_command_line_gc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`nixery-core gc --dry-run` lists what would go; without it, it goes."""
    from nixery_core.cli import main

    store = FilesystemStore(tmp_path / "store")
    cache_image(store, store_image(store, "cli"), "cli", clock=time.time)
    orphan = store.put_blob(b"cli orphan", OCI_LAYER_GZIP).digest
    _age_all(store, time.time() - 3 * DAY)

    assert main(["gc", "--store", str(tmp_path / "store"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would delete {orphan}" in out
    assert store.has_blob(orphan)
    assert main(["gc", "--store", str(tmp_path / "store")]) == 0
    assert f"deleted {orphan}" in capsys.readouterr().out
    assert not store.has_blob(orphan)

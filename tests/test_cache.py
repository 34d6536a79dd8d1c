"""BuildCache on its own: tiers, invariants, expiry, corruption, single flight."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import diskcache
import pytest
from cache_records import stored_image_record

from nixery_core.build import build_image
from nixery_core.cache import BuildCache, LayerRecord
from nixery_core.errors import InvalidInput
from nixery_core.names import Image
from nixery_core.testing.runners import FakeNix, default_fake_packages
from nixery_core.testing.sources import FixedSource
from nixery_core.testing.storage import MemoryStore

MEDIA = "application/vnd.oci.image.layer.v1.tar+gzip"


def _stored_layer(store: MemoryStore, payload: bytes = b"layer bytes") -> LayerRecord:
    info = store.put_blob(payload, MEDIA)
    return LayerRecord(info.digest, "sha256:" + "d" * 64, info.size, MEDIA)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_layer_entry_is_served_from_local_then_shared_tier(tmp_path: Path) -> None:
    """A layer recorded by one cache is a local hit there and a shared hit for a second host."""
    store = MemoryStore()
    record = _stored_layer(store)
    with BuildCache(tmp_path / "a") as first:
        first.put_layer(store, "k1", record)
        assert first.get_layer(store, "k1") == (record, "local")
        assert first.stats.layer_local_hits == 1
    with BuildCache(tmp_path / "b") as second:
        assert second.get_layer(store, "k1") == (record, "shared")
        # The shared hit was copied into the local tier.
        assert second.get_layer(store, "k1") == (record, "local")
        assert second.stats.layer_shared_hits == 1
        assert second.stats.layer_local_hits == 1


def test_local_only_cache_does_not_touch_storage_objects(tmp_path: Path) -> None:
    """With shared=False no cache object is written to the bucket."""
    store = MemoryStore()
    record = _stored_layer(store)
    with BuildCache(tmp_path / "c", shared=False) as cache:
        cache.put_layer(store, "k", record)
        assert cache.get_layer(store, "k") is not None
    assert list(store.list_objects("")) == []


def test_shared_only_cache_works_without_a_directory() -> None:
    """A cache with no local tier still shares work through the storage."""
    store = MemoryStore()
    record = _stored_layer(store)
    cache = BuildCache(None)
    cache.put_layer(store, "k", record)
    assert cache.get_layer(store, "k") == (record, "shared")


def test_entry_naming_a_vanished_blob_is_a_miss(tmp_path: Path) -> None:
    """A cache entry whose blob was deleted from storage is never served."""
    store = MemoryStore()
    record = _stored_layer(store)
    with BuildCache(tmp_path / "c") as cache:
        cache.put_layer(store, "k", record)
        store.delete_blob(record.digest)
        assert cache.get_layer(store, "k") is None
        assert cache.stats.stale_entries == 1
        assert cache.stats.layer_misses == 1


def test_manifest_entry_with_one_missing_blob_is_a_miss(tmp_path: Path) -> None:
    """A manifest entry is served only while every blob it names exists."""
    store = MemoryStore()
    body, blobs = stored_image_record(store)
    with BuildCache(tmp_path / "c") as cache:
        cache.put_manifest(store, "m", body, blobs, pinned=True)
        hit = cache.get_manifest(store, "m")
        assert hit is not None
        assert hit.body == body
        store.delete_blob(blobs[-1])
        assert cache.get_manifest(store, "m") is None


@pytest.mark.parametrize("garbage", [b"\x00\xffnot json", b'{"digest": "sha256:ab', b"[1, 2]",
                                     b'{"digest": 5}', "a str, not bytes"])
def test_corrupt_local_entry_is_a_logged_miss_and_is_repaired(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, garbage: object
) -> None:
    """Garbage or truncated local entries are misses with a warning; the next put repairs them."""
    store = MemoryStore()
    record = _stored_layer(store)
    with BuildCache(tmp_path / "c", shared=False) as cache:
        raw = diskcache.Cache(str(tmp_path / "c"))
        raw.set("builds/k", garbage)
        raw.close()
        with caplog.at_level(logging.WARNING, logger="nixery_core.cache"):
            assert cache.get_layer(store, "k") is None
        assert "corrupt" in caplog.text
        assert cache.stats.corrupt_entries == 1
        cache.put_layer(store, "k", record)
        assert cache.get_layer(store, "k") == (record, "local")


def test_corrupt_shared_entry_is_a_miss(tmp_path: Path) -> None:
    """A torn object in the bucket is a miss, not an exception."""
    store = MemoryStore()
    store.put_object("builds/k", b'{"digest": "sha2')
    with BuildCache(tmp_path / "c") as cache:
        assert cache.get_layer(store, "k") is None
        assert cache.stats.corrupt_entries == 1


def test_moving_targets_expire_after_the_ttl(tmp_path: Path) -> None:
    """A moving target's manifest entry is served until its time-to-live passes."""
    store = MemoryStore()
    body, blobs = stored_image_record(store)
    clock = FakeClock()
    with BuildCache(tmp_path / "c", moving_ttl=60, clock=clock) as cache:
        cache.put_manifest(store, "m", body, blobs, pinned=False)
        clock.now += 59
        assert cache.get_manifest(store, "m") is not None
        clock.now += 2
        assert cache.get_manifest(store, "m") is None


def test_pinned_sources_never_expire(tmp_path: Path) -> None:
    """A pinned source's entry is served however much time passes."""
    store = MemoryStore()
    body, blobs = stored_image_record(store)
    clock = FakeClock()
    with BuildCache(tmp_path / "c", moving_ttl=60, clock=clock) as cache:
        cache.put_manifest(store, "m", body, blobs, pinned=True)
        clock.now += 10 * 365 * 86400
        assert cache.get_manifest(store, "m") is not None


def test_ttl_zero_never_caches_moving_targets(tmp_path: Path) -> None:
    """moving_ttl=0 means moving targets are never cached at all."""
    store = MemoryStore()
    body, blobs = stored_image_record(store)
    with BuildCache(tmp_path / "c", moving_ttl=0) as cache:
        cache.put_manifest(store, "m", body, blobs, pinned=False)
        assert cache.get_manifest(store, "m") is None
    assert list(store.list_objects("manifests/")) == []


def test_single_flight_admits_one_thread_at_a_time(tmp_path: Path) -> None:
    """Threads holding the same key never overlap; different keys do not wait on each other."""
    inside = 0
    peak = 0
    guard = threading.Lock()
    with BuildCache(tmp_path / "c") as cache:

        def work(key: str) -> None:
            nonlocal inside, peak
            with cache.single_flight(key):
                with guard:
                    inside += 1
                    peak = max(peak, inside)
                time.sleep(0.01)
                with guard:
                    inside -= 1

        threads = [threading.Thread(target=work, args=("same",)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert peak == 1
        assert cache._flights == {}  # no per-key state is leaked


def test_stats_add_up() -> None:
    """CacheStats sum field by field, and hits add the tiers."""
    from nixery_core.cache import CacheStats

    total = CacheStats(manifest_local_hits=1, layer_shared_hits=2) + CacheStats(
        manifest_shared_hits=3, layer_local_hits=4
    )
    assert total.manifest_hits == 4
    assert total.layer_hits == 6


def test_unusable_cache_directory_leaves_the_shared_tier_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A cache directory that cannot be opened is a warning naming it, not an error."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with caplog.at_level(logging.WARNING, "nixery_core.cache"):
        cache = BuildCache(not_a_dir)
    assert str(not_a_dir) in caplog.text
    assert "using the shared tier only" in caplog.text
    assert list(cache.local_entries()) == []


def test_failing_local_tier_degrades_to_the_shared_tier(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local tier whose database fails is a logged miss; the shared tier still serves."""
    import sqlite3

    store = MemoryStore()
    record = _stored_layer(store)
    with BuildCache(tmp_path / "c") as cache:
        cache.put_layer(store, "k", record)
        local = cache._local
        assert local is not None

        def broken(*args: object, **kwargs: object) -> object:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(local, "get", broken)
        monkeypatch.setattr(local, "set", broken)
        with caplog.at_level(logging.WARNING, logger="nixery_core.cache"):
            assert cache.get_layer(store, "k") == (record, "shared")
            cache.put_layer(store, "k2", record)  # the write is skipped, not fatal
        assert "local cache read" in caplog.text
        assert "local cache write" in caplog.text
        assert cache.get_layer(store, "k2") == (record, "shared")


def test_lock_that_cannot_be_created_still_holds_the_key_in_this_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """When the lock file cannot be created (directory gone, read-only, full), single_flight
    warns and still admits one thread of this process at a time."""
    import shutil
    import threading

    cache = BuildCache(tmp_path / "c")
    try:
        shutil.rmtree(tmp_path / "c")
        inside = threading.Event()
        release = threading.Event()
        entered: list[str] = []

        def holder() -> None:
            with cache.single_flight("key"):
                inside.set()
                release.wait(10)

        thread = threading.Thread(target=holder)
        with caplog.at_level(logging.WARNING, "nixery_core.cache"):
            thread.start()
            assert inside.wait(10)
            waiter = threading.Thread(target=lambda: _enter(cache, entered))
            waiter.start()
            waiter.join(0.3)
            assert entered == []  # the first holder still has the key
            release.set()
            thread.join(10)
            waiter.join(10)
        assert entered == ["in"]
        assert "not locking across processes" in caplog.text
    finally:
        cache.close()


def _enter(cache: BuildCache, entered: list[str]) -> None:
    with cache.single_flight("key"):
        entered.append("in")


class _CountsBlobSizes(MemoryStore):
    """A memory store noting how many digests each blob_sizes call asks about."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[int] = []

    def blob_sizes(self, digests: Sequence[str]) -> dict[str, int | None]:
        self.asked.append(len(digests))
        return super().blob_sizes(digests)


def test_a_hit_checks_every_blob_with_one_batch_question(tmp_path: Path) -> None:
    """A store offering blob_sizes is asked once per hit for all the image's blobs."""
    store = _CountsBlobSizes()
    asked = store.asked
    fake = FakeNix(tmp_path / "root", default_fake_packages())
    with BuildCache(tmp_path / "cache") as cache:
        built = build_image(
            Image.from_name("shell/hello"), FixedSource(), runner=fake, uploader=store,
            cache=cache, store_root=fake.store_root,
        )
        asked.clear()
        hit = build_image(
            Image.from_name("shell/hello"), FixedSource(), runner=fake, uploader=store,
            cache=cache, store_root=fake.store_root,
        )
    assert hit.from_cache
    assert asked == [len(set(built.blobs))]


def test_recheck_after_skips_recent_blob_checks_and_only_those(tmp_path: Path) -> None:
    """Within recheck_after a hit asks the store nothing; after it, a vanished blob is a miss."""
    now = [1_000_000.0]
    store = _CountsBlobSizes()
    asked = store.asked
    fake = FakeNix(tmp_path / "root", default_fake_packages())
    image = Image.from_name("shell/hello")
    with BuildCache(None, clock=lambda: now[0], recheck_after=60.0) as cache:

        def build() -> bool:
            return build_image(
                image, FixedSource(), runner=fake, uploader=store, cache=cache,
                store_root=fake.store_root,
            ).from_cache

        assert not build()
        assert build()  # checked: the blobs are found intact now
        asked.clear()
        layer = next(info for info in store.list_blobs() if "tar" in info.media_type)
        store.delete_blob(layer.digest)
        now[0] += 30
        assert build()  # within the window: served without asking (the documented price)
        assert asked == []
        now[0] += 31
        assert not build()  # past it: checked again, the blob is missing, rebuilt
        assert store.has_blob(layer.digest)


def test_recheck_after_refuses_nonsense() -> None:
    """A negative or non-numeric recheck_after is an InvalidInput."""
    for bad in (-1, "60", True, float("nan")):
        with pytest.raises(InvalidInput, match="recheck_after"):
            BuildCache(None, recheck_after=bad)  # type: ignore[arg-type]


def test_stored_layers_lists_store_layers_of_image_and_index_entries(tmp_path: Path) -> None:
    """``stored_layers`` gives the sorted store paths of every store layer in the local tier's
    image and index entries, leaving out customisation layers and entries that do not parse."""
    store = MemoryStore()

    def layer(kind: str, *paths: str) -> dict[str, object]:
        return {"kind": kind, "paths": list(paths)}

    image = {"layers": [layer("store", "/nix/store/b-y", "/nix/store/a-x"), layer("customisation")]}
    record = {"layers": [layer("store", "/nix/store/c-z")]}
    index = {"kind": "index", "manifests": [{"record": record}]}
    with BuildCache(tmp_path / "cache", shared=False) as cache:
        cache.put_manifest(store, "one", image, (), pinned=True)
        cache.put_manifest(store, "two", index, (), pinned=True)
        cache.put_layer(store, "three", _stored_layer(store))
        cache._local_set("manifests/broken", b"{not json", None)  # a corrupt entry
        assert cache.stored_layers() == {("/nix/store/a-x", "/nix/store/b-y"), ("/nix/store/c-z",)}

"""The bucket tier of the fragment cache: instances sharing a store reuse each other's fragments."""

from __future__ import annotations

import contextlib
import gc
import gzip
import hashlib
import io
import json
import os
import sqlite3
import tracemalloc
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import pytest
import zstandard
from conftest import OFFLINE_SET
from partial_stores import UploaderOnly
from servers import FakeGcsServer, fake_gcs
from test_chunked_formats import FORMATS
from test_fragment_toc import _into_bucket, _keys
from test_fragments import PATHS, make_store

from nixery_core import fragments as fragments_module
from nixery_core.archive import ArchiveOptions, PackedLayer, pack_store_paths
from nixery_core.build import BuildResult, build_image
from nixery_core.cache import BuildCache
from nixery_core.cli import main
from nixery_core.errors import (
    BadCachedFragment,
    InvalidCacheRecord,
    InvalidInput,
    StorageUnavailable,
)
from nixery_core.fragment_bucket import (
    DEFAULT_MIN_SIZE,
    FRAGMENT_MEDIA_TYPE,
    FRAGMENT_PREFIX,
    BucketFragments,
    FragmentBucketPolicy,
    FragmentPointer,
    fragment_object_key,
)
from nixery_core.fragment_toc import TocPartWriter
from nixery_core.fragments import FragmentCache, fragment_key
from nixery_core.gc import collect_garbage
from nixery_core.names import Image
from nixery_core.protocols import ReadableStore
from nixery_core.storage.filesystem import FilesystemStore
from nixery_core.storage.gcs import GcsStore
from nixery_core.testing.runners import FakeNix, default_fake_packages
from nixery_core.testing.sources import FixedSource
from nixery_core.testing.storage import MemoryBlobWriter, MemoryStore

__all__ = ["fake_gcs"]

#: Upload every fragment, however small (the default keeps small ones local).
EVERY = FragmentBucketPolicy(min_size=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("store"))


def pack(
    root: Path, paths: list[str], options: ArchiveOptions, source: Any = None
) -> tuple[PackedLayer, bytes]:
    out = io.BytesIO()
    packed = pack_store_paths(paths, out.write, options, store_root=root, fragments=source)
    return packed, out.getvalue()


def instance(
    directory: Path, bucket: ReadableStore, policy: FragmentBucketPolicy = EVERY
) -> tuple[FragmentCache, BucketFragments]:
    """One instance: its own local fragment cache, the shared bucket behind it."""
    local = FragmentCache(directory)
    return local, BucketFragments(local, bucket, policy)


def pointers(bucket: MemoryStore | FilesystemStore) -> list[str]:
    return list(bucket.list_objects(FRAGMENT_PREFIX))


@pytest.mark.parametrize(
    "options",
    [pytest.param(ArchiveOptions(), id="gzip"), pytest.param(ArchiveOptions(compression="zstd"),
                                                              id="zstd")],
)
def test_second_instance_regroups_from_the_bucket_and_compresses_nothing(
    store: Path, tmp_path: Path, options: ArchiveOptions
) -> None:
    """Fragments one instance packed let another, with an empty local cache, assemble other
    groupings of the same paths without compressing any, byte-identical to fresh packing."""
    bucket = MemoryStore()
    local_a, tier_a = instance(tmp_path / "a", bucket)
    with local_a, tier_a:
        pack(store, PATHS, options, tier_a)
    assert tier_a.stats.uploaded == len(PATHS)
    assert len(pointers(bucket)) == len(PATHS)
    groups = [PATHS[:1], PATHS[1:3], PATHS[3:]]
    local_b, tier_b = instance(tmp_path / "b", bucket)
    with local_b, tier_b:
        layers = [pack(store, group, options, tier_b) for group in groups]
        assert local_b.misses == 0  # nothing compressed
        assert tier_b.stats.hits == len(PATHS)
        assert tier_b.stats.uploaded == 0  # fetched fragments are not sent back
    assert layers == [pack(store, group, options) for group in groups]
    assert bucket.staged_blobs() == ()


def test_concurrent_packs_of_the_same_paths_fetch_each_fragment_once(
    store: Path, tmp_path: Path
) -> None:
    """Packs running at once that need the same fragments share one fetch of each, and
    neither compresses anything."""
    bucket = MemoryStore()
    local_a, tier_a = instance(tmp_path / "a", bucket)
    with local_a, tier_a:
        pack(store, PATHS, ArchiveOptions(), tier_a)
    local_b, tier_b = instance(tmp_path / "b", bucket)
    with local_b, tier_b, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: pack(store, PATHS, ArchiveOptions(), tier_b), range(4)))
        assert (tier_b.stats.hits, local_b.misses) == (len(PATHS), 0)
    assert len(set(results)) == 1


def test_small_fragments_stay_local_by_default(store: Path, tmp_path: Path) -> None:
    """Below min_size (128 KiB compressed) a fragment is not uploaded; above it, it is."""
    bucket = MemoryStore()
    local, tier = instance(tmp_path / "a", bucket, FragmentBucketPolicy())
    with local, tier:
        pack(store, PATHS, ArchiveOptions(), tier)
    assert tier.stats.uploaded == 1  # only the path with 1.6 MB of hashes is that big
    (key,) = pointers(bucket)
    pointer = FragmentPointer.from_json(bucket.get_object(key) or b"")
    assert pointer.size >= 128 << 10
    info = bucket.blob_info(pointer.digest)
    assert info is not None
    assert info.media_type == FRAGMENT_MEDIA_TYPE


def test_inline_uploads_are_done_when_the_pack_returns(store: Path, tmp_path: Path) -> None:
    """With background=False every fragment is in the bucket as soon as the pack returns."""
    bucket = MemoryStore()
    local, tier = instance(tmp_path / "a", bucket, FragmentBucketPolicy(min_size=0,
                                                                        background=False))
    with local, tier:
        pack(store, PATHS, ArchiveOptions(), tier)
        assert len(pointers(bucket)) == len(PATHS)


def test_a_fragment_discarded_then_committed_is_neither_kept_nor_offered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fragment being packed that was dropped (its recording failed) and committed after
    that by its packer keeps no row locally and is never offered to the bucket."""
    bucket = MemoryStore()
    local, tier = instance(tmp_path / "a", bucket, FragmentBucketPolicy(min_size=0,
                                                                        background=False))
    offered: list[str] = []
    monkeypatch.setattr(
        BucketFragments, "_offer",
        lambda _self, _job, argument, _pointer=None: offered.append(argument),
    )
    with local, tier:
        writer = tier.writer("dropped")
        writer.add(b"frames")
        writer.discard()
        writer.commit(100)
        local.flush()
        assert "dropped" not in local
        assert offered == []
        assert pointers(bucket) == []


def _damage(bucket: FilesystemStore) -> dict[str, str]:
    """Break three of the four fragments in three ways; name what was done to which pointer."""
    keys = sorted(pointers(bucket))
    found = {key: FragmentPointer.from_json(bucket.get_object(key) or b"") for key in keys}
    corrupt, wrong_crc, absent, _intact = keys
    blob = bucket.blob_path(found[corrupt].digest)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    lying = json.loads(bucket.get_object(wrong_crc) or b"")
    lying["crc32"] ^= 1
    bucket.put_object(wrong_crc, json.dumps(lying).encode())
    bucket.delete_blob(found[absent].digest)
    return {corrupt: "corrupt blob", wrong_crc: "pointer lies", absent: "blob gone"}


def test_damaged_bucket_fragments_are_misses_then_repaired(store: Path, tmp_path: Path) -> None:
    """A bucket fragment whose blob changed, whose pointer lies or whose blob is gone never
    reaches a layer: it is packed instead, and the upload repairs the bucket."""
    options = ArchiveOptions()
    expected = pack(store, PATHS, options)
    bucket = FilesystemStore(tmp_path / "bucket", durable=False)
    local_a, tier_a = instance(tmp_path / "a", bucket)
    with local_a, tier_a:
        pack(store, PATHS, options, tier_a)
    damaged = _damage(bucket)
    local_b, tier_b = instance(tmp_path / "b", bucket)
    with local_b, tier_b:
        assert pack(store, PATHS, options, tier_b) == expected
        assert (tier_b.stats.hits, tier_b.stats.rejected) == (1, len(damaged))
        assert local_b.misses == len(damaged)  # those were compressed again
    assert tier_b.stats.uploaded == len(damaged)
    local_c, tier_c = instance(tmp_path / "c", bucket)
    with local_c, tier_c:
        assert pack(store, PATHS, options, tier_c) == expected
        assert (tier_c.stats.hits, tier_c.stats.rejected, local_c.misses) == (len(PATHS), 0, 0)
    assert not list((tmp_path / "bucket" / "staging").iterdir())


def test_a_pointer_naming_another_blob_is_refused_and_that_blob_kept(
    store: Path, tmp_path: Path
) -> None:
    """A pointer naming a blob that is not its fragment (here a layer) is a miss; the blob,
    which other things may name, is left alone."""
    options = ArchiveOptions()
    bucket = MemoryStore()
    layer = bucket.put_blob(pack(store, PATHS[:1], options)[1], "application/octet-stream")
    local_a, tier_a = instance(tmp_path / "a", bucket)
    with local_a, tier_a:
        pack(store, PATHS[:1], options, tier_a)
    (key,) = pointers(bucket)
    pointer = FragmentPointer.from_json(bucket.get_object(key) or b"")
    fake = FragmentPointer(layer.digest, layer.size, pointer.uncompressed_size, pointer.crc32)
    bucket.put_object(key, fake.to_json())
    local_b, tier_b = instance(tmp_path / "b", bucket)
    with local_b, tier_b:
        assert pack(store, PATHS[:1], options, tier_b) == pack(store, PATHS[:1], options)
        assert tier_b.stats.rejected == 1
    assert bucket.read_blob(layer.digest)  # still there
    assert FragmentPointer.from_json(bucket.get_object(key) or b"") == pointer  # repaired


class _Unreachable(MemoryStore):
    """A bucket whose object reads and blob writes all fail."""

    def get_object(self, key: str) -> bytes | None:
        raise StorageUnavailable("bucket unreachable", key)

    def put_object(self, key: str, data: bytes) -> None:
        raise StorageUnavailable("bucket unreachable", key)


def test_a_failing_bucket_only_costs_the_packing(store: Path, tmp_path: Path) -> None:
    """Lookups and uploads that fail are warnings: the layer is packed, the same bytes."""
    options = ArchiveOptions()
    local, tier = instance(tmp_path / "a", _Unreachable())
    with local, tier:
        assert pack(store, PATHS, options, tier) == pack(store, PATHS, options)
    assert (tier.stats.failed, tier.stats.upload_failures) == (len(PATHS), len(PATHS))


class _DamagesLocalFiles(MemoryStore):
    """A bucket that, as the first blob upload opens, changes every local fragment file in place."""

    def __init__(self, data: Path) -> None:
        super().__init__()
        self.data = data
        self.damaged = 0

    def open_blob_writer(self, media_type: str) -> MemoryBlobWriter:
        if not self.damaged:
            for file in (p for p in self.data.rglob("*") if p.is_file()):
                with file.open("r+b") as damaged:
                    damaged.seek(file.stat().st_size // 2)
                    byte = damaged.read(1)
                    damaged.seek(-1, os.SEEK_CUR)
                    damaged.write(bytes([byte[0] ^ 0xFF]))
                self.damaged += 1
        return super().open_blob_writer(media_type)


def test_a_fragment_changed_during_its_upload_is_not_uploaded(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local fragment file changed after its check is an upload failure (no blob, no
    pointer), and the uploader goes on with the next fragment."""
    monkeypatch.setattr(fragments_module, "_HOLD_SIZE", 1000)  # read again to upload
    bucket = _DamagesLocalFiles(tmp_path / "a" / "data")
    local, tier = instance(tmp_path / "a", bucket)
    with local, tier:
        pack(store, PATHS[3:], ArchiveOptions(), tier)  # its 1.6 MB file: a fragment file
        tier.flush()
        assert bucket.damaged == 1
        assert (tier.stats.uploaded, tier.stats.upload_failures) == (0, 1)
        pack(store, PATHS[:1], ArchiveOptions(), tier)
        tier.flush()
        assert (tier.stats.uploaded, tier.stats.upload_failures) == (1, 1)
    assert bucket.staged_blobs() == ()
    assert len(pointers(bucket)) == 1


def test_a_failed_upload_leaves_no_staged_bytes_and_no_pointer(
    store: Path, tmp_path: Path
) -> None:
    """A blob upload that fails is aborted: nothing staged, no pointer to a missing blob."""
    bucket = MemoryStore()
    bucket.fail_on_write(1)  # the first fragment's blob commit fails
    local, tier = instance(tmp_path / "a", bucket)
    with local, tier:
        pack(store, PATHS, ArchiveOptions(), tier)
    assert (tier.stats.uploaded, tier.stats.upload_failures) == (len(PATHS) - 1, 1)
    assert bucket.staged_blobs() == ()
    assert len(pointers(bucket)) == len(PATHS) - 1
    for key in pointers(bucket):
        digest = FragmentPointer.from_json(bucket.get_object(key) or b"").digest
        assert bucket.blob_info(digest) is not None


def test_the_bucket_tier_is_opt_in_and_needs_a_readable_store(tmp_path: Path) -> None:
    """Without fragment_bucket, or on a store that cannot read blobs back, builds use the
    local fragment cache alone; with it, one bucket tier per store."""
    store = MemoryStore()
    with BuildCache(tmp_path / "off") as off:
        assert off.fragments_for(store) is off.fragments
    with BuildCache(tmp_path / "on", fragment_bucket=EVERY) as on:
        assert on.fragments_for(UploaderOnly(MemoryStore())) is on.fragments
        tier = on.fragments_for(store)
        assert isinstance(tier, BucketFragments)
        assert on.fragments_for(store) is tier
        assert tier.policy == EVERY
    with BuildCache(None, fragment_bucket=EVERY) as nowhere:
        assert nowhere.fragments_for(store) is None  # no local cache, no tier


def test_policy_refuses_nonsense() -> None:
    """A negative min_size or a thread count below one is a typed error."""
    with pytest.raises(InvalidInput, match="min_size"):
        FragmentBucketPolicy(min_size=-1)
    with pytest.raises(InvalidInput, match="threads"):
        FragmentBucketPolicy(threads=0)


def test_malformed_pointers_do_not_parse() -> None:
    """Pointer parsing refuses what a writer of version 1 or 2 never writes with
    InvalidCacheRecord (chained); a copy's pointer stays version 1 (readable by earlier
    versions), a reference round-trips as version 2."""
    good = FragmentPointer("sha256:" + "a" * 64, 10, 20, 30)
    assert FragmentPointer.from_json(good.to_json()) == good
    assert json.loads(good.to_json())["version"] == 1
    reference = FragmentPointer("sha256:" + "b" * 64, 10, 20, 30, offset=5, layout=b"\0\1")
    assert FragmentPointer.from_json(reference.to_json()) == reference
    assert json.loads(reference.to_json())["version"] == 2
    for bad in (b"[]", b'{"version": 2}', b'{"version": 3}',
                good.to_json().replace(b'"size": 10', b'"size": -1'),
                good.to_json().replace(b"sha256:", b"md5:"),
                reference.to_json().replace(b'"offset": 5', b'"offset": -5'),
                reference.to_json().replace(b'"offset": 5, ', b""),
                reference.to_json().replace(b'"AAE="', b'"%%"'),
                reference.to_json().replace(b'"AAE="', b"7"),
                b"\xff", b"[" * 100_000, b"{"):
        with pytest.raises(InvalidCacheRecord, match="fragment pointer") as raised:
            FragmentPointer.from_json(bad)
        assert raised.value.__cause__ is not None


def _shared_layer(store: Path, bucket: MemoryStore, directory: Path,
                  paths: list[str]) -> tuple[FragmentCache, BucketFragments]:
    """An instance keeping ranges of its layers in ``bucket`` packs ``paths`` as one layer
    there and shares references to its fragments."""
    local = FragmentCache(directory)
    tier = BucketFragments(local, bucket, EVERY, ranges=local.on_store(bucket))
    layer = tier.layer()
    with bucket.open_blob_writer(OPTIONS.media_type) as writer:
        packed = pack_store_paths(paths, writer.write, OPTIONS, store_root=store,
                                  fragments=layer)
        writer.commit(packed.digest)
    layer.stored(packed.digest)
    tier.flush()
    return local, tier


OPTIONS = ArchiveOptions()


def test_references_are_shared_instead_of_copies_and_read_ahead_by_another_instance(
    store: Path, tmp_path: Path
) -> None:
    """A layer packed with ranges shares a reference per fragment (no fragment blob); another
    instance regroups from those references, reading neighbours of one layer blob in one
    ranged read, compressing nothing, byte-identical to fresh packing."""
    bucket = MemoryStore()
    local_a, tier_a = _shared_layer(store, bucket, tmp_path / "a", PATHS)
    with local_a, tier_a:
        assert (tier_a.stats.references_shared, tier_a.stats.uploaded) == (len(PATHS), 0)
    assert len(pointers(bucket)) == len(PATHS)
    assert not [i for i in bucket.list_blobs() if i.media_type == FRAGMENT_MEDIA_TYPE]
    local_b = FragmentCache(tmp_path / "b")
    tier_b = BucketFragments(local_b, bucket, EVERY, ranges=local_b.on_store(bucket))
    with local_b, tier_b:
        bucket.reset_counters()
        layer = tier_b.layer()
        assert pack(store, PATHS[1:], OPTIONS, layer) == pack(store, PATHS[1:], OPTIONS)
        assert local_b.misses == 0
        assert tier_b.stats.referenced == len(PATHS) - 1
        assert bucket.range_reads == 1  # three neighbours in the layer blob, one read
        local_b.flush()
        # Read from a store without local blob files: copied at this first reuse.
        assert all(blob is None for _, _, blob in _index_rows(local_b.directory))


def _index_rows(directory: Path) -> list[tuple[str, str | None, str | None]]:
    with contextlib.closing(sqlite3.connect(directory / "index.sqlite")) as con:
        return con.execute("SELECT key, file, blob FROM fragments").fetchall()


def test_an_instance_keeping_copies_downloads_a_reference_as_a_checked_copy(
    store: Path, tmp_path: Path
) -> None:
    """An instance without ranges (copy mode) fetches a reference's range into a local copy,
    checked by size, CRC-32 and decompression; a damaged range is refused and packed."""
    bucket = MemoryStore()
    local_a, tier_a = _shared_layer(store, bucket, tmp_path / "a", PATHS)
    with local_a, tier_a:
        pass
    local_b, tier_b = instance(tmp_path / "b", bucket)
    with local_b, tier_b:
        assert pack(store, PATHS[:2], OPTIONS, tier_b) == pack(store, PATHS[:2], OPTIONS)
        assert (local_b.misses, tier_b.stats.hits, tier_b.stats.referenced) == (0, 2, 0)
        assert all(blob is None for _, _, blob in _index_rows(local_b.directory))
    (digest,) = {FragmentPointer.from_json(bucket.get_object(key) or b"").digest
                 for key in pointers(bucket)}
    data = bytearray(bucket.read_blob(digest))
    data[len(data) // 2] ^= 0xFF
    damaged = MemoryStore()
    damaged._blobs[digest] = (bytes(data), OPTIONS.media_type)  # the same name, other bytes
    for key in pointers(bucket):
        damaged.put_object(key, bucket.get_object(key) or b"")
    local_c, tier_c = instance(tmp_path / "c", damaged)
    with local_c, tier_c:
        assert pack(store, PATHS, OPTIONS, tier_c) == pack(store, PATHS, OPTIONS)
        assert tier_c.stats.rejected >= 1
        assert local_c.misses == tier_c.stats.rejected


# --- garbage collection ----------------------------------------------------------


def test_gc_ages_fragments_by_their_own_grace_and_drops_their_pointers(
    store: Path, tmp_path: Path
) -> None:
    """Fragment blobs unused for fragment_grace_seconds go, with their pointers; one fetched
    (touched) meanwhile stays."""
    now = [1000.0]
    bucket = MemoryStore(clock=lambda: now[0])
    local_a, tier_a = instance(tmp_path / "a", bucket)
    with local_a, tier_a:
        pack(store, PATHS, ArchiveOptions(), tier_a)
    now[0] += 3600
    local_b, tier_b = instance(tmp_path / "b", bucket)
    with local_b, tier_b:  # fetches (and touches) the first path's fragment only
        pack(store, PATHS[:1], ArchiveOptions(), tier_b)
    now[0] += 1800
    kept = collect_garbage(bucket, grace_seconds=86400, fragment_grace_seconds=3000,
                           now=lambda: now[0])
    assert len(kept.deleted) == len(PATHS) - 1
    assert kept.dropped_fragment_pointers == len(PATHS) - 1
    (left,) = pointers(bucket)
    assert bucket.blob_info(FragmentPointer.from_json(bucket.get_object(left) or b"").digest)
    local_c, tier_c = instance(tmp_path / "c", bucket)
    with local_c, tier_c:
        pack(store, PATHS, ArchiveOptions(), tier_c)
        assert (tier_c.stats.hits, tier_c.stats.misses, tier_c.stats.rejected) == (1, 3, 0)


def test_gc_keeps_fragments_for_the_ordinary_grace_by_default(
    store: Path, tmp_path: Path
) -> None:
    """Without fragment_grace_seconds, fragment blobs get the same grace as any other."""
    now = [1000.0]
    bucket = MemoryStore(clock=lambda: now[0])
    local, tier = instance(tmp_path / "a", bucket)
    with local, tier:
        pack(store, PATHS, ArchiveOptions(), tier)
    now[0] += 3600
    report = collect_garbage(bucket, grace_seconds=7200, now=lambda: now[0])
    assert (report.deleted, report.dropped_fragment_pointers) == ((), 0)
    assert len(pointers(bucket)) == len(PATHS)


# --- the real thing: two instances on fake-gcs-server -----------------------------


def _build(cache: BuildCache, runner: FakeNix, bucket: GcsStore, budget: int) -> BuildResult:
    return build_image(Image.from_name("shell/hello/coreutils"), FixedSource(), runner=runner,
                       uploader=bucket, cache=cache, store_root=runner.store_root,
                       layer_budget=budget)


@pytest.mark.parametrize("mode", ["copy", "auto"])
def test_two_instances_on_fake_gcs_share_fragments(
    fake_gcs: FakeGcsServer, tmp_path: Path, mode: str
) -> None:
    """On a real GCS API, a second instance asked for another grouping of the same paths
    compresses nothing, gets layers byte-identical to fresh packing, refuses and repairs a
    damaged fragment, and leaves no staging object: sharing copies ("copy") or references
    to ranges of the layer blobs in the bucket ("auto": no fragment blob uploaded)."""
    runner = FakeNix(tmp_path / "root", default_fake_packages())
    bucket_name = f"t-{uuid.uuid4().hex[:16]}"
    raw_bucket = fake_gcs.make_bucket(bucket_name)
    bucket = GcsStore(raw_bucket)  # for looking at and damaging the bucket
    references = mode == "auto"

    def host(name: str) -> BuildCache:
        # No shared layer or manifest entries: every layer is assembled, from fragments.
        return BuildCache(tmp_path / name, shared=False, fragment_bucket=EVERY,
                          fragment_mode=mode)  # type: ignore[arg-type]  # a str from the parameters

    def client() -> GcsStore:
        """A host's own connection to the bucket."""
        return GcsStore(fake_gcs.make_bucket(bucket_name))

    with host("a") as first:
        _build(first, runner, client(), budget=8)
        assert first.fragments is not None
        packed = first.fragments.misses
    assert packed > 0
    fragment_blobs = [info for info in bucket.list_blobs()
                      if info.media_type == FRAGMENT_MEDIA_TYPE]
    assert len(fragment_blobs) == (0 if references else packed)
    assert len(list(bucket.list_objects(FRAGMENT_PREFIX))) == packed
    with host("b") as second:
        store_b = client()
        regrouped = _build(second, runner, store_b, budget=3)
        assert second.fragments is not None
        assert second.fragments.misses == 0  # not one store path compressed
        tier = second.fragments_for(store_b)
        assert isinstance(tier, BucketFragments)
        assert (tier.stats.hits, tier.stats.uploaded) == (packed, 0)
        assert tier.stats.referenced == (packed if references else 0)
    with BuildCache(tmp_path / "fresh", fragment_limit=0) as fresh:
        reference = _build(fresh, runner, GcsStore(fake_gcs.make_bucket(bucket_name + "-x")), 3)
    assert regrouped.manifest_digest == reference.manifest_digest
    assert [layer.digest for layer in regrouped.layers] == [
        layer.digest for layer in reference.layers
    ]

    # Damage one fragment blob (a copy, or the layer blob a reference names) behind the
    # store's back, keeping its length: every fragment in it fails its check.
    key = sorted(bucket.list_objects(FRAGMENT_PREFIX))[0]
    digest = FragmentPointer.from_json(bucket.get_object(key) or b"").digest
    damaged_blob = raw_bucket.blob(bucket.blob_object_name(digest))
    size = len(damaged_blob.download_as_bytes())
    damaged_blob.upload_from_string(b"\x1f\x8b" + b"\0" * (size - 2))
    in_damaged = sum(
        FragmentPointer.from_json(bucket.get_object(name) or b"").digest == digest
        for name in bucket.list_objects(FRAGMENT_PREFIX)
    )
    with host("c") as third:
        store_c = client()
        again = _build(third, runner, store_c, budget=5)
        tier = third.fragments_for(store_c)
        assert isinstance(tier, BucketFragments)
        assert third.fragments is not None
        # A copy is refused when fetched; a reference when its range is read (its CRC-32).
        assert tier.stats.rejected == (0 if references else 1)
        assert third.fragments.misses == in_damaged  # packed again, and shared again
        assert tier.stats.uploaded + tier.stats.references_shared == in_damaged
    with host("d") as fourth:
        store_d = client()
        assert _build(fourth, runner, store_d, budget=5).manifest_digest == again.manifest_digest
        tier = fourth.fragments_for(store_d)
        assert isinstance(tier, BucketFragments)
        assert tier.stats.rejected == 0  # repaired by the third host's upload
        assert fourth.fragments is not None
        assert fourth.fragments.misses == 0
    with BuildCache(tmp_path / "fresh-5", fragment_limit=0) as fresh:
        reference = _build(fresh, runner, GcsStore(fake_gcs.make_bucket(bucket_name + "-y")), 5)
    assert again.manifest_digest == reference.manifest_digest
    assert not [blob.name for blob in raw_bucket.list_blobs(prefix="staging/")]


# --- the command line ----------------------------------------------------------------


@pytest.mark.nix
def test_command_line_shares_fragments_and_gc_ages_them(
    tmp_path: Path, nix: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """`build --share-fragments` leaves references to ranges of its layer blobs in the store
    (no fragment blob); `gc --fragment-grace 0` keeps them while their layer is stored and
    drops those whose layer blob is gone."""
    store = tmp_path / "store"
    build = ["build", "shell/hello", "--pkgs-path", str(OFFLINE_SET), "--offline",
             "--store", str(store), "--cache", str(tmp_path / "cache")]
    assert main([*build, "--share-fragments"]) == 0
    bucket = FilesystemStore(store)
    shared = pointers(bucket)
    assert shared  # glibc and friends are over the 128 KiB threshold
    assert not [info for info in bucket.list_blobs() if info.media_type == FRAGMENT_MEDIA_TYPE]
    named = {FragmentPointer.from_json(bucket.get_object(key) or b"").digest for key in shared}
    layers = {info.digest for info in bucket.list_blobs()}
    assert named <= layers
    capsys.readouterr()
    assert main(["gc", "--store", str(store), "--fragment-grace", "0"]) == 0
    assert "fragment pointers" not in capsys.readouterr().out
    assert pointers(bucket) == shared
    gone = sorted(named)[0]
    bucket.delete_blob(gone)
    dangling = sum(
        FragmentPointer.from_json(bucket.get_object(key) or b"").digest == gone for key in shared
    )
    assert main(["gc", "--store", str(store), "--fragment-grace", "0"]) == 0
    assert f"dropped {dangling} fragment pointers" in capsys.readouterr().out
    assert len(pointers(bucket)) == len(shared) - dangling


class _PutOrder(MemoryStore):
    """A store recording the keys of the objects put, in the order they come."""

    def __init__(self) -> None:
        super().__init__()
        self.put: list[str] = []

    def put_object(self, key: str, data: bytes) -> None:
        super().put_object(key, data)
        self.put.append(key)


@pytest.mark.parametrize("compression", FORMATS)
def test_a_chunked_store_paths_toc_part_is_in_the_bucket_before_its_frames_reference(
    store: Path, tmp_path: Path, compression: str
) -> None:
    """A chunked layer's TOC part is uploaded (its pointer put) before the reference to its
    frames: another instance that finds the reference finds the TOC part too, never the
    reference alone (a store path compressed again)."""
    root, paths = store, list(PATHS)
    bucket = _PutOrder()
    policy = FragmentBucketPolicy(min_size=0, background=False)
    with BuildCache(tmp_path / "a", fragment_bucket=policy) as cache:
        _into_bucket(cache, bucket, root, paths, compression)
    for path in paths:
        frames, toc = (fragment_object_key(key) for key in _keys(root, path, compression))
        assert bucket.put.index(toc) < bucket.put.index(frames), path


@pytest.mark.parametrize("compression", FORMATS)
def test_a_chunked_store_paths_toc_part_is_shared_as_a_copy_with_its_frames(
    store: Path, fake_gcs: FakeGcsServer, tmp_path: Path, compression: str
) -> None:
    """Sharing copies on a real GCS API, a chunked store path whose frames reach ``min_size``
    has its TOC part uploaded too (however small), its pointer put first, so another instance
    assembles that path without compressing it; smaller paths stay local."""
    bucket_name = f"t-{uuid.uuid4().hex[:16]}"
    raw_bucket = fake_gcs.make_bucket(bucket_name)
    bucket = GcsStore(raw_bucket)
    options = ArchiveOptions(compression=compression)  # type: ignore[arg-type]  # a parameter
    local_a, tier_a = instance(tmp_path / "a", bucket, FragmentBucketPolicy(background=False))
    with local_a, tier_a:
        pack(store, PATHS, options, tier_a)
    shared = {}
    for path in PATHS:
        frames, toc = (fragment_object_key(key) for key in _keys(store, path, compression))
        found = [bucket.get_object(name) for name in (frames, toc)]
        if found[0] is None:
            assert found[1] is None, path  # a TOC part is shared only with its frames
            continue
        assert found[1] is not None, path
        shared[path] = [FragmentPointer.from_json(raw).size for raw in found if raw is not None]
        generations = [raw_bucket.get_blob(name).generation for name in (frames, toc)]
        assert generations[1] < generations[0], path  # the TOC part's pointer is put first
    assert list(shared) == [PATHS[3]]  # the path with 1.6 MB of hashes
    assert shared[PATHS[3]][1] < DEFAULT_MIN_SIZE <= shared[PATHS[3]][0]
    local_b, tier_b = instance(tmp_path / "b", GcsStore(fake_gcs.make_bucket(bucket_name)))
    with local_b, tier_b:
        alone = pack(store, [PATHS[3]], options, tier_b)
        assert local_b.misses == 0  # not compressed again
        assert tier_b.stats.hits == 2
    assert alone == pack(store, [PATHS[3]], options)


@pytest.mark.parametrize("compression", ["gzip", *FORMATS])
def test_no_fragment_writer_outlives_its_pack(
    store: Path, tmp_path: Path, compression: str
) -> None:
    """Once a pack into the bucket tier returns, none of its fragment writers (nor the
    layouts they hold) is still alive, cyclic garbage collection off: the tier neither keeps
    its thread's last one nor ties a chunked path's frames and TOC part in a cycle."""
    from nixery_core import fragment_bucket

    options = ArchiveOptions(compression=compression)  # type: ignore[arg-type]  # a parameter
    policy = FragmentBucketPolicy(min_size=0, background=False)
    local, tier = instance(tmp_path / "a", MemoryStore(), policy)
    with local, tier:
        gc.collect()
        gc.disable()
        try:
            pack(store, PATHS, options, tier)
            alive = [
                obj for obj in gc.get_objects() if isinstance(obj, fragment_bucket._SharedWriter)
            ]
        finally:
            gc.enable()
        assert alive == []
        # Every path's fragment shared, a chunked one's TOC part with it (the pairs held).
        assert tier.stats.uploaded == (2 if compression in FORMATS else 1) * len(PATHS)


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "compressed"])
def test_a_toc_part_fetched_from_the_bucket_streams_into_the_local_cache(
    tmp_path: Path, compressed: bool
) -> None:
    """A large TOC part fetched from the bucket (a copy, about 20 MiB of lines, plain or
    compressed into one zstd frame) is checked and kept plain while holding far less than
    its size in memory at once (it was held whole)."""
    pieces: list[bytes] = []

    class Recorder:
        def add(self, piece: bytes) -> None:
            pieces.append(piece)

        def commit(self, uncompressed_size: int) -> None:
            recorded.append(uncompressed_size)

        def discard(self) -> None:  # pragma: no cover - never discarded here
            raise AssertionError

    recorded: list[int] = []
    part = TocPartWriter(Recorder())
    part.start(0)
    for index in range(200_000):  # about 20 MiB of entries, 13 MiB of them hex digests
        digest = hashlib.sha256(b"%d" % index).hexdigest().encode()
        part.add(b'{"name":"f%d","digest":"sha256:%s"}' % (index, digest))
    part.commit()
    data = b"".join(pieces)
    assert len(data) > 6 << 20
    bucket = MemoryStore()
    blob = zstandard.ZstdCompressor(level=1).compress(data) if compressed else data
    info = bucket.put_blob(blob, FRAGMENT_MEDIA_TYPE)
    pointer = FragmentPointer(info.digest, len(blob), recorded[0], zlib.crc32(blob),
                              part=compressed)
    bucket.put_object(fragment_object_key("toc"), pointer.to_json())
    del blob
    local, tier = instance(tmp_path / "a", bucket)
    with local, tier:
        tracemalloc.start()
        try:
            tier.prefetch(["toc"], sides=["toc"])
            tier.wait("toc")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert tier.stats.hits == 1
        with tier.get("toc", side=True) as found:
            assert found is not None
            assert b"".join(found.pieces()) == data
    assert peak < len(data) // 2, peak  # two 1 MiB reads at most (was the whole part and more)


@pytest.mark.parametrize("damage", ["size", "crc", "kind"])
def test_a_toc_part_in_the_bucket_is_kept_only_as_recorded(tmp_path: Path, damage: str) -> None:
    """A TOC part in the bucket (plain lines, layout 4) is kept locally when its pointer
    records its size, digest and CRC-32, and is refused (a miss, nothing kept) when its
    pointer records another uncompressed size, or the CRC-32 of other bytes, or when bytes
    that are neither a TOC part nor compressed stand in its place."""
    recorded: list[bytes] = []

    class Recorder:
        def add(self, piece: bytes) -> None:
            recorded.append(piece)

        def commit(self, uncompressed_size: int) -> None:
            assert uncompressed_size == sum(map(len, recorded))

        def discard(self) -> None:  # pragma: no cover - never discarded here
            raise AssertionError

    part = TocPartWriter(Recorder())
    part.start(0)
    part.add(b'{"name":"f","type":"reg","size":0}')
    part.commit()
    data = b"".join(recorded)
    bucket = MemoryStore()
    good = bucket.put_blob(data, FRAGMENT_MEDIA_TYPE)
    pointer = FragmentPointer(good.digest, len(data), len(data), zlib.crc32(data))
    bucket.put_object(fragment_object_key("good"), pointer.to_json())
    bad = {
        "size": (data, len(data) + 1),
        "crc": (data.replace(b"f", b"g"), len(data)),
        "kind": (b"[" + data[1:], len(data)),
    }[damage]
    info = bucket.put_blob(bad[0], FRAGMENT_MEDIA_TYPE)
    damaged = FragmentPointer(
        info.digest if damage != "crc" else good.digest, len(bad[0]), bad[1],
        zlib.crc32(bad[0]),
    )
    bucket.put_object(fragment_object_key("bad"), damaged.to_json())
    local, tier = instance(tmp_path / "a", bucket)
    with local, tier:
        tier.prefetch(["good", "bad"], sides=["good", "bad"])
        tier.wait("good")
        tier.wait("bad")
        assert (tier.stats.hits, tier.stats.rejected) == (1, 1)
        with tier.get("good", side=True) as found:
            assert found is not None
            assert b"".join(found.pieces()) == data
        with tier.get("bad", side=True) as found:
            assert found is None


@pytest.mark.parametrize("posing", ["frames-as-toc-part", "toc-part-as-frames"])
def test_a_fetched_fragment_is_checked_as_what_its_key_is_not_by_its_first_bytes(
    tmp_path: Path, posing: str
) -> None:
    """A frames fragment in the bucket whose bytes are a TOC part's lines (``{"start":``),
    its pointer matching their size, digest and CRC-32 but not inflating to its recorded
    size, is refused (a miss) and not kept; so is a TOC part fetched as one (a side part)
    whose bytes are a gzip member inflating to its recorded size."""
    lines = b'{"start":0}\n{"name":"f","type":"reg","size":0}\n'
    member = gzip.compress(lines, mtime=0)
    data, uncompressed, sides = {
        "frames-as-toc-part": (lines, len(lines), []),
        "toc-part-as-frames": (member, len(lines), ["k"]),
    }[posing]
    bucket = MemoryStore()
    info = bucket.put_blob(data, FRAGMENT_MEDIA_TYPE)
    pointer = FragmentPointer(info.digest, len(data), uncompressed, zlib.crc32(data))
    bucket.put_object(fragment_object_key("k"), pointer.to_json())
    local, tier = instance(tmp_path / "a", bucket)
    with local, tier:
        tier.prefetch(["k"], sides=sides)
        tier.wait("k")
        assert (tier.stats.hits, tier.stats.rejected) == (0, 1)
        assert "k" not in local
        with tier.get("k", side=bool(sides)) as found:
            assert found is None


@pytest.mark.parametrize("mode", ["copy", "range"])
def test_a_toc_part_pointer_claiming_an_offset_is_refused(tmp_path: Path, mode: str) -> None:
    """A TOC part's pointer that claims to be a reference (an offset into a layer blob whose
    bytes there are plain TOC lines of the recorded size and CRC-32) is refused (a miss,
    counted as rejected, nothing kept), whether the instance keeps ranges or copies: TOC
    parts are shared only as copies, whole and hashed."""
    lines = b'{"start":0}\n{"name":"f","type":"reg","size":0}\n'
    blob = b"frames before it" + lines
    bucket = MemoryStore()
    info = bucket.put_blob(blob, OPTIONS.media_type)
    offset = len(blob) - len(lines)
    pointer = FragmentPointer(info.digest, len(lines), len(lines), zlib.crc32(lines), offset)
    bucket.put_object(fragment_object_key("toc"), pointer.to_json())
    local = FragmentCache(tmp_path / "a")
    ranges = local.on_store(bucket) if mode == "range" else None
    tier = BucketFragments(local, bucket, EVERY, ranges=ranges)
    with local, tier:
        tier.prefetch(["toc"], sides=["toc"])
        tier.wait("toc")
        assert (tier.stats.hits, tier.stats.rejected) == (0, 1)
        local.flush()
        assert "toc" not in local
        with tier.get("toc", side=True) as found:
            assert found is None


@pytest.mark.parametrize("compression", FORMATS)
def test_a_toc_part_is_compressed_in_the_bucket_and_kept_plain_by_its_reader(
    store: Path, tmp_path: Path, compression: str
) -> None:
    """A chunked store path's TOC part is uploaded as one zstd frame of its plain lines (a
    version 3 pointer recording the blob's size and CRC-32 and the lines' size), smaller
    than the lines; another instance keeps the lines plain, byte for byte the packer's, and
    assembles every path without compressing it."""
    options = ArchiveOptions(compression=compression)  # type: ignore[arg-type]  # a parameter
    bucket = MemoryStore()
    parts: dict[str, bytes] = {}
    local_a, tier_a = instance(tmp_path / "a", bucket)
    with local_a, tier_a:
        pack(store, PATHS, options, tier_a)
        tier_a.flush()
        for path in PATHS:
            toc = _keys(store, path, compression)[1]
            with local_a.get(toc, side=True) as found:
                assert found is not None
                parts[toc] = b"".join(found.pieces())
    blobs = 0
    for toc, lines in parts.items():
        raw = bucket.get_object(fragment_object_key(toc))
        assert raw is not None
        assert json.loads(raw)["version"] == 3
        pointer = FragmentPointer.from_json(raw)
        blob = bucket.read_blob(pointer.digest)
        assert pointer.part
        assert (pointer.size, pointer.crc32, pointer.uncompressed_size) == (
            len(blob), zlib.crc32(blob), len(lines)
        )
        assert zstandard.ZstdDecompressor().decompress(blob) == lines
        blobs += len(blob)
    assert blobs < sum(map(len, parts.values())) // 2
    local_b, tier_b = instance(tmp_path / "b", bucket)
    with local_b, tier_b:
        assert pack(store, PATHS, options, tier_b) == pack(store, PATHS, options)
        assert local_b.misses == 0
        assert tier_b.stats.hits == 2 * len(PATHS)
        for toc, lines in parts.items():
            with local_b.get(toc, side=True) as found:
                assert found is not None
                assert (b"".join(found.pieces()), found.uncompressed_size) == (lines, len(lines))


@pytest.mark.parametrize(
    "damage", ["window", "not-a-part", "fewer", "more", "as-frames", "short"]
)
def test_a_compressed_toc_part_is_kept_only_as_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    """A TOC part compressed in the bucket is refused (a miss, nothing kept) when its frame
    declares a larger window than the level it is written at (a hostile one: 128 MiB,
    refused before libzstd allocates it), inflates to no TOC part's lines, to fewer or more
    bytes than recorded, or ends mid-frame, or when its pointer is fetched for frames; the
    right one beside it is kept plain."""
    from hostile_frames import zstd_frame_declaring_window

    lines = b'{"start":0}\n{"name":"f","type":"reg","size":0}\n'
    frame = zstandard.ZstdCompressor(level=1).compress(lines)
    data, uncompressed, sides, why = {
        "window": (zstd_frame_declaring_window(27, 1024), 1024, ["bad"], "does not decompress"),
        "not-a-part": (
            zstandard.ZstdCompressor(level=1).compress(b"[" + lines[1:]), len(lines), ["bad"],
            "is not a TOC part",
        ),
        "fewer": (frame, len(lines) + 1, ["bad"], "decompresses to"),
        "more": (frame, len(lines) - 1, ["bad"], "decompresses to more than recorded"),
        "as-frames": (frame, len(lines), [], "not frames'"),
        "short": (frame[:-3], len(lines), ["bad"], "decompresses to"),
    }[damage]
    bucket = MemoryStore()
    for name, blob, size in (("good", frame, len(lines)), ("bad", data, uncompressed)):
        digest = bucket.put_blob(blob, FRAGMENT_MEDIA_TYPE).digest
        pointer = FragmentPointer(digest, len(blob), size, zlib.crc32(blob), part=True)
        bucket.put_object(fragment_object_key(name), pointer.to_json())
    local, tier = instance(tmp_path / "a", bucket)
    with local, tier:
        tier.prefetch(["good", "bad"], sides=["good", *sides])
        tier.flush()
        assert (tier.stats.hits, tier.stats.rejected) == (1, 1)
        assert why in caplog.text
        with tier.get("good", side=True) as found:
            assert found is not None
            assert b"".join(found.pieces()) == lines
        assert "bad" not in local


@pytest.mark.parametrize("shared", ["copies", "layer"])
def test_a_fetched_zstd_fragment_declaring_a_larger_window_than_the_packs_level_is_a_miss(
    store: Path, tmp_path: Path, shared: str
) -> None:
    """A zstd fragment in the bucket whose frame declares a larger window than the pack's
    level gives (a hostile one: 128 MiB, which libzstd would allocate outside Python), its
    pointer matching its size, digest, CRC-32 and what it inflates to, is refused at fetch
    (a miss: the path is compressed, the bytes those of a pack without a cache), never kept
    to fail the pack that copies it; one declaring the level's own window is kept."""
    from hostile_frames import zstd_frame_declaring_window

    from nixery_core.compression import zstd_window

    options = ArchiveOptions(compression="zstd", level=3)
    own = zstd_window(3).bit_length() - 1
    bucket = MemoryStore()
    for path, window_log in ((PATHS[0], 27), (PATHS[1], own)):
        frame = zstd_frame_declaring_window(window_log, 1024)
        digest = bucket.put_blob(frame, FRAGMENT_MEDIA_TYPE).digest
        key = fragment_key(os.fsencode(store / path.lstrip("/")), options.parameters())
        pointer = FragmentPointer(digest, len(frame), 1024, zlib.crc32(frame))
        bucket.put_object(fragment_object_key(key), pointer.to_json())
    local = FragmentCache(tmp_path / "b")
    ranges = local.on_store(bucket) if shared == "layer" else None
    tier = BucketFragments(local, bucket, EVERY, ranges=ranges)
    with local, tier:
        source = tier.layer() if ranges is not None else tier
        assert pack(store, [PATHS[0]], options, source) == pack(store, [PATHS[0]], options)
        assert (tier.stats.hits, tier.stats.rejected) == (0, 1)
        tier.prefetch([fragment_key(os.fsencode(store / PATHS[1].lstrip("/")),
                                    options.parameters())],
                      window=zstd_window(3))
        tier.flush()
        assert (tier.stats.hits, tier.stats.rejected) == (1, 1)


def _zeros_fragment(zstd: bool, size: int) -> bytes:
    """One gzip member (or zstd frame) of ``size`` zeros, compressed a MiB at a time."""
    block = bytes(1 << 20)
    writer: Any = (
        zstandard.ZstdCompressor(level=3).compressobj() if zstd
        else zlib.compressobj(9, zlib.DEFLATED, 31)
    )
    out = [writer.compress(block[: size - done]) for done in range(0, size, len(block))]
    end: bytes = writer.flush()
    return b"".join(out) + end


@pytest.mark.parametrize("zstd", [False, True], ids=["gzip", "zstd"])
def test_checking_a_fetched_fragment_holds_little_however_much_it_inflates(
    tmp_path: Path, zstd: bool
) -> None:
    """A fetched fragment of 200 MB of zeros (about 1000:1) is checked holding under 8 MiB at
    once, kept when its pointer is right and refused as a miss when its sizes or CRC are not."""
    size = 200_000_000
    data = _zeros_fragment(zstd, size)
    bucket = MemoryStore()
    digest = bucket.put_blob(data, FRAGMENT_MEDIA_TYPE).digest
    crc = zlib.crc32(data)
    cases = {
        "right": FragmentPointer(digest, len(data), size, crc),
        "fewer": FragmentPointer(digest, len(data), size - 1, crc),
        "more": FragmentPointer(digest, len(data), size + 1, crc),
        "crc": FragmentPointer(digest, len(data), size, crc ^ 1),
    }
    for name, pointer in cases.items():
        bucket.put_object(fragment_object_key(name), pointer.to_json())
    local, tier = instance(tmp_path / "a", bucket)
    with local, tier:
        tracemalloc.start()
        try:
            for name in cases:
                tier.prefetch([name])
                tier.wait(name)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert (tier.stats.hits, tier.stats.rejected) == (1, 3)
        with tier.get("right") as found:
            assert found is not None
            assert b"".join(found.pieces()) == data
        for name in ("fewer", "more", "crc"):
            with tier.get(name) as missing:
                assert missing is None
    assert peak < 8 << 20, peak  # was 134 MB (gzip: 64 MiB and its join) and 200 MB (zstd)


@pytest.mark.parametrize("mode", ["copy", "range"])
def test_a_fetched_fragment_the_local_cache_cannot_keep_is_a_miss(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A fragment fetched from the bucket that the local cache fails to keep (its writing
    thread cannot be started) is a miss, counted as a failed lookup: the pack compresses
    that path and gives the bytes of a pack without a cache, never fails."""
    bucket = MemoryStore()
    if mode == "range":
        local_a, tier_a = _shared_layer(store, bucket, tmp_path / "a", PATHS)
        with local_a, tier_a:
            pass
    else:
        local_a, tier_a = instance(tmp_path / "a", bucket)
        with local_a, tier_a:
            pack(store, PATHS, OPTIONS, tier_a)
    submit_all = FragmentCache._submit_all
    calls: list[None] = []

    def first_fails(self: FragmentCache, items: Any, *, now: bool = False) -> None:
        calls.append(None)
        if len(calls) == 1:
            raise RuntimeError("can't start new thread")
        submit_all(self, items, now=now)

    monkeypatch.setattr(FragmentCache, "_submit_all", first_fails)
    local_b = FragmentCache(tmp_path / "b")
    blobs = local_b.on_store(bucket) if mode == "range" else None
    tier_b = BucketFragments(local_b, bucket, EVERY, ranges=blobs)
    with local_b, tier_b:
        assert pack(store, PATHS, OPTIONS, tier_b) == pack(store, PATHS, OPTIONS)
        assert (tier_b.stats.failed, tier_b.stats.hits) == (1, len(PATHS) - 1)


def _assert_flush_returns(tier: BucketFragments) -> None:
    """``tier.flush()`` returns within 10 s (run on a thread, so a hang fails the test)."""
    import threading

    flushing = threading.Thread(target=tier.flush, daemon=True)
    flushing.start()
    flushing.join(10)
    assert not flushing.is_alive()


def test_an_upload_thread_that_cannot_start_skips_its_uploads_never_the_pack(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bucket tier whose upload thread cannot be started skips the uploads (counted as
    failures) while the pack gives the bytes of a pack without a cache, and flush and close
    return."""
    import threading

    class NoUploadThread(threading.Thread):
        def start(self) -> None:
            if self.name == "nixery-fragment-upload":
                raise RuntimeError("can't start new thread")
            super().start()

    monkeypatch.setattr(threading, "Thread", NoUploadThread)
    bucket = MemoryStore()
    local, tier = instance(tmp_path / "a", bucket)
    with local, tier:
        assert pack(store, PATHS, OPTIONS, tier) == pack(store, PATHS, OPTIONS)
        _assert_flush_returns(tier)
        assert tier.stats.upload_failures == len(PATHS)
    assert pointers(bucket) == []


def test_uploads_skipped_by_a_full_queue_are_counted_as_failures(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uploads skipped because the upload queue is full (here one job long, its thread held
    on the first) are counted as failed uploads: every fragment offered ends as uploaded
    or as a failure, and the bucket holds a pointer for each one uploaded."""
    import threading

    from nixery_core import fragment_bucket

    monkeypatch.setattr(fragment_bucket, "_MAX_QUEUED", 1)
    release = threading.Event()
    peek = fragments_module.FragmentCache.peek

    def held(self: FragmentCache, *args: Any, **kwargs: Any) -> Any:
        release.wait(10)
        return peek(self, *args, **kwargs)

    monkeypatch.setattr(fragments_module.FragmentCache, "peek", held)
    bucket = MemoryStore()
    local, tier = instance(tmp_path / "a", bucket)
    with local, tier:
        assert pack(store, PATHS, OPTIONS, tier) == pack(store, PATHS, OPTIONS)
        release.set()
        _assert_flush_returns(tier)
        stats = tier.stats
        # One job taken by the held thread, at most one queued behind it: the rest skipped.
        assert stats.upload_failures >= len(PATHS) - 2
        assert stats.uploaded + stats.upload_failures == len(PATHS)
    assert len(pointers(bucket)) == tier.stats.uploaded


@pytest.mark.parametrize("background", [True, False], ids=["background", "inline"])
def test_an_upload_job_that_raises_is_skipped_and_the_uploads_go_on(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, background: bool
) -> None:
    """An upload job raising unexpectedly (here compressing a TOC part: a zstd error) is
    logged and counted as a failed upload, never the pack's failure: the other fragments
    are still uploaded and flush returns."""

    from nixery_core import fragment_bucket

    compressed = fragment_bucket._compressed
    calls: list[None] = []

    def first_fails(pieces: Any, size: int) -> Any:
        calls.append(None)
        if len(calls) == 1:
            raise zstandard.ZstdError("compressing failed (test)")
        return compressed(pieces, size)

    monkeypatch.setattr(fragment_bucket, "_compressed", first_fails)
    options = ArchiveOptions(compression="zstd-chunked")
    bucket = MemoryStore()
    local, tier = instance(tmp_path / "a", bucket,
                           FragmentBucketPolicy(min_size=0, background=background))
    with local, tier:
        assert pack(store, PATHS, options, tier) == pack(store, PATHS, options)
        _assert_flush_returns(tier)
        assert (tier.stats.upload_failures, tier.stats.uploaded) == (1, 2 * len(PATHS) - 1)
    assert len(pointers(bucket)) == 2 * len(PATHS) - 1


# --- a reference that passes its CRC-32 but not its inflation ------------------------


def _not_inflating_as_recorded(case: str, zstd: bool) -> tuple[bytes, int]:
    """A fragment's bytes and the uncompressed size a hostile pointer records for them:
    a zstd frame declaring a 128 MiB window ("window"), another size ("size"), or a
    damaged member whose own checksum fails ("damaged")."""
    from hostile_frames import zstd_frame_declaring_window

    if case == "window":
        return zstd_frame_declaring_window(27, 1024), 1024
    data = (
        zstandard.ZstdCompressor(level=3, write_checksum=True).compress(bytes(1024)) if zstd
        else gzip.compress(bytes(1024), mtime=0)
    )
    if case == "size":
        return data, 1025
    return data[:-6] + bytes([data[-6] ^ 0xFF]) + data[-5:], 1024  # a checksum byte


@pytest.mark.parametrize(
    ("compression", "case"),
    [("zstd", "window"), ("zstd", "size"), ("zstd", "damaged"), ("gzip", "size"),
     ("gzip", "damaged")],
)
def test_a_reference_not_inflating_as_recorded_is_dropped_and_the_path_compressed(
    store: Path, tmp_path: Path, compression: str, case: str
) -> None:
    """A bucket reference whose range matches its CRC-32 but does not inflate as recorded
    is dropped and its path compressed, byte-identical to a pack without a cache, with no
    row or file left of it: a miss when its zstd frame headers say so (a window or a
    size), before any byte is copied; otherwise after failing the one pack copying it
    with BadCachedFragment naming its key and layer blob (not "remove the fragment
    cache")."""
    options = ArchiveOptions(compression=compression)  # type: ignore[arg-type]  # a str from the parameters
    data, uncompressed = _not_inflating_as_recorded(case, compression == "zstd")
    bucket = MemoryStore()
    digest = bucket.put_blob(b"x" * 100 + data, "application/octet-stream").digest
    key = fragment_key(os.fsencode(store / PATHS[0].lstrip("/")), options.parameters())
    pointer = FragmentPointer(digest, len(data), uncompressed, zlib.crc32(data), 100)
    bucket.put_object(fragment_object_key(key), pointer.to_json())
    local = FragmentCache(tmp_path / "c")
    tier = BucketFragments(local, bucket, EVERY, ranges=local.on_store(bucket))
    plain = pack(store, [PATHS[0]], options)
    with local, tier:
        if compression == "zstd" and case in ("window", "size"):  # a miss
            assert pack(store, [PATHS[0]], options, tier.layer()) == plain
            assert local.refused == 1
        else:
            with pytest.raises(BadCachedFragment) as raised:
                pack(store, [PATHS[0]], options, tier.layer())
            assert (raised.value.key, raised.value.blob) == (key, digest)
            assert raised.value.path.endswith(PATHS[0])
            assert "remove the fragment cache" not in str(raised.value)
            assert (key not in local, local.refused) == (True, 1)
        assert pack(store, [PATHS[0]], options, tier.layer()) == plain
        assert local.refused == 1
        assert tier.stats.referenced == 1  # the bad pointer was not fetched again
        assert local.check(bucket) == []
    assert not list((tmp_path / "c" / "data").rglob("*.*"))


@pytest.mark.parametrize("compression", ["gzip", "zstd", "estargz", "zstd-chunked"])
def test_a_build_given_a_reference_of_another_size_repacks_and_replaces_it(
    tmp_path: Path, compression: str
) -> None:
    """A build whose layer copies a bucket reference recording another uncompressed size
    than its range inflates to (a hostile pointer, its CRC-32 right) drops it and
    compresses that path (a miss where zstd frame headers tell, else packing the layer
    again): the image is byte-identical to one built without any cache, and the pointer
    is replaced by this instance's own."""
    runner = FakeNix(tmp_path / "root", default_fake_packages())
    options = ArchiveOptions(compression=compression)  # type: ignore[arg-type]  # a str from the parameters
    bucket = MemoryStore()

    def build(cache: BuildCache, budget: int) -> BuildResult:
        return build_image(Image.from_name("shell/hello/coreutils"), FixedSource(),
                           runner=runner, uploader=bucket, cache=cache, archive=options,
                           store_root=runner.store_root, layer_budget=budget)

    def host(name: str) -> BuildCache:
        return BuildCache(tmp_path / name, shared=False, fragment_bucket=EVERY)

    with host("a") as first:
        build(first, budget=8)
    references = {}
    for name in bucket.list_objects(FRAGMENT_PREFIX):
        raw = bucket.get_object(name) or b""
        if json.loads(raw)["version"] == 2:
            references[name] = FragmentPointer.from_json(raw)
    name, good = sorted(references.items())[0]
    bad = attrs.evolve(good, uncompressed_size=good.uncompressed_size + 1)
    bucket.put_object(name, bad.to_json())
    with host("b") as second:
        again = build(second, budget=3)
        assert second.fragments is not None
        assert second.fragments.refused == 1
        assert second.fragments.check(bucket) == []
    with BuildCache(tmp_path / "fresh", fragment_limit=0) as fresh:
        reference = build_image(Image.from_name("shell/hello/coreutils"), FixedSource(),
                                runner=runner, uploader=MemoryStore(), cache=fresh,
                                archive=options, store_root=runner.store_root, layer_budget=3)
    assert again.manifest_digest == reference.manifest_digest
    assert FragmentPointer.from_json(bucket.get_object(name) or b"") not in (bad, None)
    assert bucket.staged_blobs() == ()


@pytest.mark.parametrize("shared", ["copies", "layer"])
def test_a_refused_reference_is_replaced_in_the_bucket_whatever_the_new_fragments_size(
    store: Path, tmp_path: Path, shared: str
) -> None:
    """A store path whose bucket reference failed a pack here is packed again and its new
    fragment shared (a copy, or a reference once the layer is stored) even below
    min_size, so the bad pointer stops failing other instances' packs."""
    options = ArchiveOptions()
    data, uncompressed = _not_inflating_as_recorded("damaged", zstd=False)
    bucket = MemoryStore()
    digest = bucket.put_blob(b"x" * 100 + data, "application/octet-stream").digest
    key = fragment_key(os.fsencode(store / PATHS[0].lstrip("/")), options.parameters())
    name = fragment_object_key(key)
    bad = FragmentPointer(digest, len(data), uncompressed, zlib.crc32(data), 100)
    bucket.put_object(name, bad.to_json())
    local = FragmentCache(tmp_path / "c")
    huge = FragmentBucketPolicy(min_size=1 << 40, background=False)
    tier = BucketFragments(local, bucket, huge, ranges=local.on_store(bucket))
    with local, tier:
        with pytest.raises(BadCachedFragment):
            pack(store, [PATHS[0]], options, tier.layer())
        if shared == "layer":
            layer = tier.layer()
            out = io.BytesIO()
            packed = pack_store_paths([PATHS[0]], out.write, options, store_root=store,
                                      fragments=layer)
            layer.stored(bucket.put_blob(out.getvalue(), options.media_type).digest)
            assert packed.digest == pack(store, [PATHS[0]], options)[0].digest
        else:
            assert pack(store, [PATHS[0]], options, tier) == pack(store, [PATHS[0]], options)
        tier.flush()
        assert tier.stats.upload_failures == 0
    now = FragmentPointer.from_json(bucket.get_object(name) or b"")
    assert now != bad
    assert (now.offset is not None) == (shared == "layer")
    local_b, tier_b = instance(tmp_path / "b", bucket)
    with local_b, tier_b:
        assert pack(store, [PATHS[0]], options, tier_b) == pack(store, [PATHS[0]], options)
        assert tier_b.stats.hits == 1

"""Fragments kept as ranges of layer blobs in a GCS bucket: fake-gcs-server, the real client."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import attrs
import pytest
from servers import FakeGcsServer, fake_gcs
from test_faults import assert_no_partial_state
from test_fragments import PATHS, make_store

from nixery_core.archive import ArchiveOptions, PackedLayer, pack_store_paths
from nixery_core.build import build_image
from nixery_core.cache import BuildCache
from nixery_core.fragment_bucket import FRAGMENT_MEDIA_TYPE, FRAGMENT_PREFIX
from nixery_core.fragments import (
    FragmentCache,
    FragmentSource,
    LayerRanges,
    StoreFragments,
    fragment_key,
)
from nixery_core.names import Image
from nixery_core.storage.gcs import GcsStore
from nixery_core.testing.runners import FakeNix, default_fake_packages
from nixery_core.testing.sources import FixedSource

__all__ = ["fake_gcs"]

OPTIONS = ArchiveOptions()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("store"))


def _bucket(server: FakeGcsServer, **options: object) -> GcsStore:
    return GcsStore(server.make_bucket(f"r-{uuid.uuid4().hex[:16]}"), **options)  # type: ignore[arg-type]  # timeout, retry


def _plain(store: Path, paths: list[str]) -> tuple[PackedLayer, bytes]:
    out = io.BytesIO()
    return pack_store_paths(paths, out.write, OPTIONS, store_root=store), out.getvalue()


def _pack_into(blobs: GcsStore, store: Path, paths: list[str], layer: LayerRanges) -> PackedLayer:
    """Pack ``paths`` into the bucket as a build does; ranges recorded once committed."""
    with blobs.open_blob_writer(OPTIONS.media_type) as writer:
        packed = pack_store_paths(paths, writer.write, OPTIONS, store_root=store,
                                  fragments=layer, blob_digest=writer.written_digest)
        writer.commit(packed.digest)
    layer.stored(packed.digest)
    return packed


def _regroup(store: Path, paths: list[str], source: FragmentSource) -> tuple[PackedLayer, bytes]:
    out = io.BytesIO()
    return pack_store_paths(paths, out.write, OPTIONS, store_root=store,
                            fragments=source), out.getvalue()


def _rows(directory: Path) -> dict[str, tuple[str | None, str | None]]:
    """key -> (file, blob) of every row of a fragment index, read with sqlite3 directly."""
    with sqlite3.connect(directory / "index.sqlite") as con:
        return {key: (file, blob)
                for key, file, blob in con.execute("SELECT key, file, blob FROM fragments")}


def _cold(blobs: GcsStore, store: Path, directory: Path) -> tuple[FragmentCache, StoreFragments]:
    """A cache holding PATHS as ranges of two layer blobs in the bucket ({a,b} and {c,d})."""
    cache = FragmentCache(directory)
    view = attrs.evolve(cache.on_store(blobs), copy_on_reuse=False)
    _pack_into(blobs, store, PATHS[:2], view.layer())
    _pack_into(blobs, store, PATHS[2:], view.layer())
    cache.flush()
    return cache, view


def test_a_regroup_from_bucket_ranges_is_byte_identical_in_one_request_per_blob(
    fake_gcs: FakeGcsServer, store: Path, tmp_path: Path
) -> None:
    """A cold pack into the bucket writes no fragment bytes; a regroup of every path reads the
    ranges back (one ranged GET per layer blob), compresses nothing and equals a fresh pack;
    with copy_on_reuse the ranges become local copies."""
    blobs = _bucket(fake_gcs)
    cache, view = _cold(blobs, store, tmp_path / "fragments")
    with cache:
        rows = _rows(cache.directory)
        assert len(rows) == len(PATHS)
        assert all(file is None and blob is not None for file, blob in rows.values())
        assert not [p for p in (cache.directory / "data").rglob("*") if p.is_file()]
        misses = cache.misses
        layer = view.layer()
        assert _regroup(store, PATHS, layer) == _plain(store, PATHS)
        assert layer.reads is not None
        assert layer.reads.requests == 2  # {a,b} in one GET, {c,d} in another
        assert (cache.misses, cache.hits) == (misses, len(PATHS))
        cache.flush()
        assert all(file is None and blob is not None for file, blob in _rows(cache.directory)
                   .values())
        copying = attrs.evolve(view, copy_on_reuse=True)
        assert _regroup(store, PATHS, copying.layer()) == _plain(store, PATHS)
        cache.flush()
        assert all(blob is None for _, blob in _rows(cache.directory).values())


@pytest.mark.parametrize("damage", ["bytes", "deleted"])
def test_a_bucket_range_whose_blob_changed_or_went_is_a_miss_packed_again(
    fake_gcs: FakeGcsServer, store: Path, tmp_path: Path, damage: str
) -> None:
    """A layer blob whose bytes changed (same length: only the CRC-32 tells) or that was
    deleted makes its ranges misses: dropped, packed again, the output unchanged."""
    blobs = _bucket(fake_gcs)
    cache, view = _cold(blobs, store, tmp_path / "fragments")
    first = _plain(store, PATHS[:2])[0]
    name = blobs.blob_object_name(first.digest)
    if damage == "bytes":
        data = bytearray(blobs.read_blob(first.digest))
        data[len(data) // 3] ^= 0xFF
        blobs.bucket.blob(name).upload_from_string(bytes(data))
    else:
        blobs.delete_blob(first.digest)
    with cache:
        misses = cache.misses
        paths = [PATHS[0], PATHS[2]]
        layer = view.layer()
        packed = _pack_into(blobs, store, paths, layer)
        assert packed == _plain(store, paths)[0]
        assert blobs.read_blob(packed.digest) == _plain(store, paths)[1]
        assert cache.misses == misses + 1
        cache.flush()
        rows = _rows(cache.directory)
        key = fragment_key(os.fsencode(store / PATHS[0].lstrip("/")), OPTIONS.parameters())
        assert rows[key][1] == packed.digest  # kept anew, as a range of the new layer


def test_a_bucket_outage_is_a_miss_that_keeps_the_ranges(store: Path, tmp_path: Path) -> None:
    """With the bucket's server stopped, a regroup compresses every path (misses) but keeps
    the ranges; once the server is back the same ranges are hits again."""
    with FakeGcsServer(persistent=True) as server:
        name = f"o-{uuid.uuid4().hex[:16]}"
        blobs = GcsStore(server.make_bucket(name), timeout=5.0, retry=None)
        cache, view = _cold(blobs, store, tmp_path / "fragments")
        with cache:
            before = _rows(cache.directory)
            server.stop()
            misses = cache.misses
            assert _regroup(store, PATHS, view.layer()) == _plain(store, PATHS)
            assert cache.misses == misses + len(PATHS)
            cache.flush()
            assert _rows(cache.directory) == before
            server.start()
            back = attrs.evolve(view, store=GcsStore(server.make_bucket(name), timeout=5.0,
                                                     retry=None))
            hits = cache.hits
            assert _regroup(store, PATHS, back.layer()) == _plain(store, PATHS)
            assert cache.hits == hits + len(PATHS)


_INSTANCE = """
import json, sys
from pathlib import Path
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from nixery_core.build import build_image
from nixery_core.cache import BuildCache
from nixery_core.fragment_bucket import BucketFragments, FragmentBucketPolicy
from nixery_core.names import Image
from nixery_core.storage.gcs import GcsStore, disable_bucket_metadata_cache
from nixery_core.testing.runners import FakeNix, default_fake_packages
from nixery_core.testing.sources import FixedSource

root, directory, url, bucket, budget = sys.argv[1:]
client = storage.Client(project="test", credentials=AnonymousCredentials(),
                        client_options=ClientOptions(api_endpoint=url))
disable_bucket_metadata_cache(client)
store = GcsStore(client.bucket(bucket))
runner = FakeNix(Path(root), default_fake_packages())
with BuildCache(Path(directory), shared=False,
                fragment_bucket=FragmentBucketPolicy(min_size=0)) as cache:
    result = build_image(Image.from_name("shell/hello/coreutils"), FixedSource(),
                         runner=runner, uploader=store, cache=cache,
                         store_root=runner.store_root, layer_budget=int(budget))
    tier = cache.fragments_for(store)
    assert isinstance(tier, BucketFragments)
    fragments = cache.fragments
    counts = {"misses": fragments.misses, "hits": fragments.hits}
tier_stats = tier.stats
print(json.dumps({
    "manifest": result.manifest_digest, "layers": [l.digest for l in result.layers],
    "referenced": tier_stats.referenced, "shared": tier_stats.references_shared,
    "uploaded": tier_stats.uploaded, **counts,
}))
"""


def _instance(server: FakeGcsServer, root: Path, directory: Path, bucket: str,
              budget: int) -> dict[str, object]:
    """One registry instance (its own process and local cache) building an image."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", _INSTANCE, str(root), str(directory), server.url, bucket,
         str(budget)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_two_processes_sharing_a_bucket_regroup_from_each_others_ranges(
    fake_gcs: FakeGcsServer, tmp_path: Path
) -> None:
    """Two processes with their own local caches share one bucket: the first shares
    references (no fragment blob), the second regroups from them compressing nothing, its
    layers equal fresh packing, and the bucket holds no staging object and no pointer to a
    blob that is not stored."""
    root = tmp_path / "root"
    FakeNix(root, default_fake_packages())
    bucket = f"p-{uuid.uuid4().hex[:16]}"
    fake_gcs.make_bucket(bucket)
    first = _instance(fake_gcs, root, tmp_path / "a", bucket, 8)
    assert first["shared"] == first["misses"]
    assert first["uploaded"] == 0
    second = _instance(fake_gcs, root, tmp_path / "b", bucket, 3)
    assert second["misses"] == 0
    assert second["referenced"] == first["shared"]
    assert (second["shared"], second["uploaded"]) == (0, 0)
    runner = FakeNix(root, default_fake_packages())
    with BuildCache(tmp_path / "fresh", fragment_limit=0) as fresh:
        reference = build_image(Image.from_name("shell/hello/coreutils"), FixedSource(),
                                runner=runner, uploader=_bucket(fake_gcs), cache=fresh,
                                store_root=runner.store_root, layer_budget=3)
    assert second["manifest"] == reference.manifest_digest
    assert second["layers"] == [layer.digest for layer in reference.layers]
    shared = GcsStore(fake_gcs.make_bucket(bucket))
    assert not [i for i in shared.list_blobs() if i.media_type == FRAGMENT_MEDIA_TYPE]
    assert_no_partial_state(shared, tmp_path / "b", built=True)  # pointers name stored blobs
    assert len(list(shared.list_objects(FRAGMENT_PREFIX))) == first["shared"]

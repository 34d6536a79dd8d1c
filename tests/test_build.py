"""build_image with fakes: pipeline shape, cache invariants, failures, concurrency.

FakeNix answers the Nix calls and writes a small store under tmp_path, so
these tests run the real packer, layering, metadata and cache code without
Nix; tests/test_end_to_end.py proves the same on real Nix and real tools.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs
import pytest
from conftest import fake_nix

from nixery_core.build import BuildResult, build_image
from nixery_core.cache import BuildCache
from nixery_core.errors import StorageUnavailable, StorePathMissing, UnknownPackages
from nixery_core.manifest import parse_manifest
from nixery_core.names import Image
from nixery_core.protocols import LogCallback, RunResult
from nixery_core.storage.filesystem import FilesystemStore
from nixery_core.testing.runners import FakeFile, FakeNix, FakePackage
from nixery_core.testing.sources import FixedSource
from nixery_core.testing.storage import MemoryStore


def build(
    tmp_path: Path,
    name: str = "shell/hello",
    *,
    runner: FakeNix | _NoRewrite | None = None,
    store: MemoryStore | FilesystemStore | None = None,
    cache: BuildCache | None = None,
    source: FixedSource | None = None,
    **kwargs: object,
) -> BuildResult:
    runner = runner or fake_nix(tmp_path / "root")
    return build_image(
        Image.from_name(name),
        source or FixedSource(),
        runner=runner,
        uploader=store if store is not None else MemoryStore(),
        cache=cache,
        store_root=runner.store_root,
        **kwargs,  # type: ignore[arg-type]
    )


def layer_members(store: MemoryStore | FilesystemStore, digest: str) -> list[str]:
    data = gzip.decompress(store.read_blob(digest))
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return archive.getnames()


# --- the pipeline ------------------------------------------------------------------


def test_every_store_path_lands_in_exactly_one_layer(tmp_path: Path) -> None:
    """The closure is split across store layers with no path lost or doubled."""
    runner = fake_nix(tmp_path / "root")
    store = MemoryStore()
    result = build(tmp_path, runner=runner, store=store)
    seen: list[str] = [p for layer in result.layers for p in layer.paths]
    closure = {p for name in Image.from_name("shell/hello").packages for p in runner.closure(name)}
    assert sorted(seen) == sorted(closure)
    for layer in result.layers:
        members = layer_members(store, layer.digest)
        for path in layer.paths:
            assert path.lstrip("/") in members


def test_manifest_names_stored_blobs_in_layer_order(tmp_path: Path) -> None:
    """The manifest's config and layers are stored, with the customisation layer on top."""
    store = MemoryStore()
    result = build(tmp_path, store=store)
    parsed = parse_manifest(result.manifest)
    assert result.manifest_digest == "sha256:" + hashlib.sha256(result.manifest).hexdigest()
    assert [d.digest for d in parsed.layers] == [layer.digest for layer in result.layers]
    assert parsed.config.digest == result.config_digest
    assert result.layers[-1].kind == "customisation"
    for digest in result.blobs:
        assert store.has_blob(digest)
    config = json.loads(result.config)
    assert config["rootfs"]["diff_ids"] == [layer.diff_id for layer in result.layers]
    assert config["config"]["Cmd"] == ["bash"]
    assert "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt" in config["config"]["Env"]


def test_image_without_shell_has_no_default_command(tmp_path: Path) -> None:
    """Cmd ["bash"] is set only when the image has bashInteractive."""
    result = build(tmp_path, "hello")
    assert "Cmd" not in json.loads(result.config)["config"]


def test_docker_format_uses_schema2_media_types(tmp_path: Path) -> None:
    """manifest_format="docker" gives a Docker schema 2 manifest over the same blobs."""
    oci = build(tmp_path)
    docker = build(tmp_path, manifest_format="docker")
    assert docker.manifest_media_type == "application/vnd.docker.distribution.manifest.v2+json"
    assert docker.config_digest == oci.config_digest
    assert [x.digest for x in docker.layers] == [x.digest for x in oci.layers]
    assert all(
        d.media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip"
        for d in parse_manifest(docker.manifest).layers
    )


def test_reproducible_across_separate_stores_and_caches(tmp_path: Path) -> None:
    """Two builds with separate Nix stores, blob stores and caches give identical bytes."""
    results = []
    stores = []
    for side in ("a", "b"):
        store = FilesystemStore(tmp_path / side / "blobs")
        with BuildCache(tmp_path / side / "cache") as cache:
            results.append(
                build(tmp_path, runner=fake_nix(tmp_path / side / "root"), store=store, cache=cache)
            )
        stores.append(store)
    first, second = results
    assert first.manifest_digest == second.manifest_digest
    assert first.manifest == second.manifest
    for digest in first.blobs:
        assert stores[0].read_blob(digest) == stores[1].read_blob(digest)


def test_unknown_packages_raise_naming_them_and_store_nothing(tmp_path: Path) -> None:
    """Unknown names raise UnknownPackages listing exactly those names; nothing is written."""
    store = MemoryStore()
    with BuildCache(tmp_path / "cache") as cache, pytest.raises(UnknownPackages) as info:
        build(tmp_path, "hello/nosuch/alsonot", store=store, cache=cache)
    assert info.value.packages == ("alsonot", "nosuch")
    assert list(store.list_blobs()) == []
    assert list(store.list_objects("")) == []


def test_progress_reports_each_stage_and_timings(tmp_path: Path) -> None:
    """Progress events name every stage, and the result times them."""
    stages: list[str] = []
    result = build(tmp_path, progress=lambda e: stages.append(e.stage))
    assert {"resolve", "nix", "layering", "layers", "metadata", "done"} <= set(stages)
    assert set(result.timings) == {"resolve", "nix", "layering", "layers", "metadata"}


# --- failures leave nothing behind ------------------------------------------------------


def test_store_path_missing_on_disk_uploads_nothing(tmp_path: Path) -> None:
    """A closure path missing on disk raises StorePathMissing before any blob is stored."""
    runner = fake_nix(tmp_path / "root")
    store = MemoryStore()
    with BuildCache(tmp_path / "cache") as cache, pytest.raises(StorePathMissing) as info:
        build(tmp_path, "hello", runner=_NoRewrite(runner), store=store, cache=cache)
    assert info.value.path == runner.store_path("hello")
    assert list(store.list_blobs()) == []
    assert store.staged_blobs() == ()
    assert list(store.list_objects("")) == []


@attrs.define
class _NoRewrite:
    """Runs FakeNix; after its closure query, deletes the hello output (a store going bad)."""

    inner: FakeNix

    @property
    def store_root(self) -> Path:
        return self.inner.store_root

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        on_log_line: LogCallback | None = None,
    ) -> RunResult:
        result = self.inner.run(argv, timeout=timeout, env=env, on_log_line=on_log_line)
        hello = self.inner.store_root / self.inner.store_path("hello").lstrip("/")
        if "path-info" in argv and hello.exists():
            shutil.rmtree(hello)
        return result


def test_uploader_failing_mid_build_leaves_no_partial_state(tmp_path: Path) -> None:
    """A storage failure raises typed, leaves no staged blob or manifest entry; a retry works."""
    store = MemoryStore()
    store.fail_on_write(3)
    with BuildCache(tmp_path / "cache") as cache:
        with pytest.raises(StorageUnavailable):
            build(tmp_path, store=store, cache=cache, max_workers=1)
        assert store.staged_blobs() == ()
        assert list(store.list_objects("manifests/")) == []
        # Every layer entry that was written names a complete, stored blob.
        for key in store.list_objects("builds/"):
            entry = json.loads(store.get_object(key) or b"{}")
            blob = store.read_blob(entry["digest"])
            assert "sha256:" + hashlib.sha256(blob).hexdigest() == entry["digest"]
        retry = build(tmp_path, store=store, cache=cache, max_workers=1)
    assert sum(layer.reused for layer in retry.layers) == 2  # the two committed before the fault
    assert all(store.has_blob(d) for d in retry.blobs)


# --- the cache --------------------------------------------------------------------------


def test_pinned_hit_runs_no_nix_and_uploads_nothing(tmp_path: Path) -> None:
    """A second build of a pinned image is a manifest hit: no Nix call, no blob written."""
    runner = fake_nix(tmp_path / "root")
    store = MemoryStore()
    with BuildCache(tmp_path / "cache") as cache:
        first = build(tmp_path, runner=runner, store=store, cache=cache)
        calls, writes = len(runner.calls), store.blob_writes
        second = build(tmp_path, runner=runner, store=store, cache=cache)
    assert second.from_cache
    assert second.manifest == first.manifest
    assert len(runner.calls) == calls
    assert store.blob_writes == writes
    assert second.cache_stats.manifest_local_hits == 1
    assert all(layer.reused for layer in second.layers)


def test_second_host_sharing_storage_builds_nothing(tmp_path: Path) -> None:
    """Another host with its own local cache, sharing the store, gets a shared-tier hit."""
    store = MemoryStore()
    with BuildCache(tmp_path / "host-a") as cache_a:
        first = build(tmp_path, runner=fake_nix(tmp_path / "a"), store=store, cache=cache_a)
    runner_b = fake_nix(tmp_path / "b")
    with BuildCache(tmp_path / "host-b") as cache_b:
        second = build(tmp_path, runner=runner_b, store=store, cache=cache_b)
    assert runner_b.calls == []
    assert second.manifest_digest == first.manifest_digest
    assert second.cache_stats.manifest_shared_hits == 1


def test_moving_target_rebuilds_after_ttl(tmp_path: Path) -> None:
    """A moving source is served from cache within its TTL and rebuilt after it."""
    now = [1000.0]
    runner = fake_nix(tmp_path / "root")
    store = MemoryStore()
    with BuildCache(tmp_path / "cache", moving_ttl=60, clock=lambda: now[0]) as cache:
        build(tmp_path, runner=runner, store=store, cache=cache, source=FixedSource(pinned=False))
        resolves = runner.count("resolve")
        build(tmp_path, runner=runner, store=store, cache=cache, source=FixedSource(pinned=False))
        assert runner.count("resolve") == resolves
        now[0] += 61
        rebuilt = build(
            tmp_path, runner=runner, store=store, cache=cache, source=FixedSource(pinned=False)
        )
    assert runner.count("resolve") == resolves + 1
    assert not rebuilt.from_cache
    assert all(layer.reused for layer in rebuilt.layers)  # layers are still cached


def test_vanished_blob_is_rebuilt_not_served(tmp_path: Path) -> None:
    """Deleting a layer blob behind the cache's back makes the next build repack it."""
    runner = fake_nix(tmp_path / "root")
    store = MemoryStore()
    with BuildCache(tmp_path / "cache") as cache:
        first = build(tmp_path, runner=runner, store=store, cache=cache)
        victim = first.layers[0].digest
        store.delete_blob(victim)
        second = build(tmp_path, runner=runner, store=store, cache=cache)
    assert not second.from_cache
    assert store.has_blob(victim)
    repacked = [layer for layer in second.layers if layer.digest == victim]
    assert repacked
    assert not repacked[0].reused


def test_adding_a_package_packs_only_its_new_paths(tmp_path: Path) -> None:
    """Building A then A plus a leaf package packs only the layer holding the new path."""
    extra = {"leafpkg": FakePackage({"bin/leaf": FakeFile(b"leaf" * 100, executable=True)})}
    runner = fake_nix(tmp_path / "root", extra)
    store = MemoryStore()
    with BuildCache(tmp_path / "cache") as cache:
        build(tmp_path, "shell/hello", runner=runner, store=store, cache=cache)
        second = build(tmp_path, "shell/hello/leafpkg", runner=runner, store=store, cache=cache)
    new_store_layers = [x for x in second.layers if not x.reused and x.kind == "store"]
    assert [x.paths for x in new_store_layers] == [(runner.store_path("leafpkg"),)]


def test_concurrent_identical_requests_share_one_build(tmp_path: Path) -> None:
    """16 threads asking for one image cause one Nix resolve and one pack per layer."""
    runner = fake_nix(tmp_path / "root")
    store = MemoryStore()
    results: list[BuildResult] = []
    errors: list[BaseException] = []
    with BuildCache(tmp_path / "cache") as cache:
        barrier = threading.Barrier(16)

        def worker() -> None:
            barrier.wait()
            try:
                results.append(build(tmp_path, runner=runner, store=store, cache=cache))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert runner.count("resolve") == 1
    assert len({r.manifest_digest for r in results}) == 1
    assert store.blob_writes == len(results[0].blobs)


def test_cache_key_covers_format_strategy_and_config(tmp_path: Path) -> None:
    """Changing the manifest format or the layer budget is a different cache entry."""
    runner = fake_nix(tmp_path / "root")
    store = MemoryStore()
    with BuildCache(tmp_path / "cache") as cache:
        a = build(tmp_path, runner=runner, store=store, cache=cache)
        b = build(tmp_path, runner=runner, store=store, cache=cache, manifest_format="docker")
        c = build(tmp_path, runner=runner, store=store, cache=cache, layer_budget=3)
    assert len({a.cache_key, b.cache_key, c.cache_key}) == 3
    assert not b.from_cache
    assert not c.from_cache
    assert len(c.layers) <= 3


_WORKER = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from test_build import fake_nix
from nixery_core.testing.sources import FixedSource
from nixery_core.build import build_image
from nixery_core.cache import BuildCache
from nixery_core.names import Image
from nixery_core.protocols import LogCallback, RunResult
from nixery_core.storage.filesystem import FilesystemStore

root, cache_dir, store_dir = map(Path, sys.argv[1:4])
runner = fake_nix(root)
with BuildCache(cache_dir) as cache:
    result = build_image(Image.from_name("shell/hello"), FixedSource(), runner=runner,
                         uploader=FilesystemStore(store_dir), cache=cache, store_root=root)
print(json.dumps({"digest": result.manifest_digest, "resolves": runner.count("resolve")}))
"""


def test_processes_sharing_cache_and_store_agree_and_build_once(tmp_path: Path) -> None:
    """Four processes sharing one cache directory and store: one Nix build, one digest."""
    tests_dir = str(Path(__file__).parent)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(tmp_path / f"root{i}"), str(tmp_path / "cache"),
             str(tmp_path / "store"), tests_dir],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    answers = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        answers.append(json.loads(out))
    assert len({a["digest"] for a in answers}) == 1
    assert sum(a["resolves"] for a in answers) == 1
    store = FilesystemStore(tmp_path / "store")
    assert store.staging_leftovers() == []


def test_build_stats_count_only_this_builds_lookups(tmp_path: Path) -> None:
    """Concurrent builds of other images on one cache do not leak into a build's stats."""
    runner = fake_nix(tmp_path / "root")
    store = MemoryStore()
    with BuildCache(tmp_path / "cache") as cache:
        build(tmp_path, "hello", runner=runner, store=store, cache=cache)
        stop = threading.Event()

        def noise() -> None:
            while not stop.is_set():
                build(tmp_path, "hello", runner=runner, store=store, cache=cache)

        threads = [threading.Thread(target=noise) for _ in range(2)]
        for thread in threads:
            thread.start()
        try:
            results = [build(tmp_path, "shell/hello", runner=runner, store=store, cache=cache)
                       for _ in range(3)]
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    first, *hits = results
    assert first.cache_stats.manifest_misses == 1
    assert first.cache_stats.manifest_hits == 0
    for hit in hits:
        assert hit.cache_stats.manifest_local_hits == 1
        assert hit.cache_stats.manifest_misses == 0
        assert hit.cache_stats.layer_misses == 0

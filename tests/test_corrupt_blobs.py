"""A corrupt blob is found and never served as good.

A layer file with a flipped byte or a truncated tail: cache hits compare
stored sizes, a rebuild replaces a stored copy that does not hash to its
name, OCI layouts never share an inode with the store and hash every blob,
``verify_store`` / ``nixery-core verify --repair`` find every corrupt blob
and remove it with the entries naming it, and a serving registry logs a
blob whose bytes do not match.  Real umoci reads the layouts; real Nix
drives the command line.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import OFFLINE_SET, REPO, require_tools

from examples.registry import RegistryConfig, create_app, serving
from nixery_core.build import BuildResult, build_image
from nixery_core.cache import BuildCache
from nixery_core.errors import DigestMismatch
from nixery_core.names import Image
from nixery_core.oci_layout import write_oci_layout
from nixery_core.storage.filesystem import FilesystemStore
from nixery_core.storage.serving import open_blob_for_serving
from nixery_core.testing.runners import FakeNix, default_fake_packages
from nixery_core.testing.sources import FixedSource
from nixery_core.verify import VerifyingReader, verify_store


def _build(
    store: FilesystemStore, fake: FakeNix, cache: BuildCache | None
) -> BuildResult:
    return build_image(
        Image.from_name("shell/hello"), FixedSource(), runner=fake, uploader=store,
        cache=cache, store_root=fake.store_root, max_workers=1,
    )


def _hashes_to_name(store: FilesystemStore, digest: str) -> bool:
    return "sha256:" + hashlib.sha256(store.blob_path(digest).read_bytes()).hexdigest() == digest


def _flip(path: Path, offset: int = 100) -> None:
    """Flip one byte in place (same size, same inode), as a bad disk would."""
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


def _truncate(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.truncate(os.fstat(handle.fileno()).st_size // 2)


@pytest.fixture
def fake(tmp_path: Path) -> FakeNix:
    """FakeNix writing its store under tmp_path."""
    return FakeNix(tmp_path / "nix", default_fake_packages())


def _biggest_layer(result: BuildResult) -> str:
    return max(result.layers, key=lambda layer: layer.size).digest


def test_truncated_layer_is_not_a_hit_and_is_rebuilt(tmp_path: Path, fake: FakeNix) -> None:
    """A hit whose layer is stored with another size is a logged miss; the rebuild repairs it."""
    store = FilesystemStore(tmp_path / "store", durable=False)
    with BuildCache(tmp_path / "cache") as cache:
        first = _build(store, fake, cache)
        layer = _biggest_layer(first)
        _truncate(store.blob_path(layer))
        second = _build(store, fake, cache)
    assert not second.from_cache
    assert second.manifest_digest == first.manifest_digest
    assert second.cache_stats.corrupt_blobs >= 1
    assert _hashes_to_name(store, layer)


def test_rebuild_replaces_a_flipped_blob(tmp_path: Path, fake: FakeNix) -> None:
    """A --no-cache rebuild writes the blob again and replaces a stored copy of the wrong bytes."""
    store = FilesystemStore(tmp_path / "store", durable=False)
    first = _build(store, fake, None)
    layer = _biggest_layer(first)
    _flip(store.blob_path(layer))
    assert not _hashes_to_name(store, layer)
    _build(store, fake, None)
    assert _hashes_to_name(store, layer)
    # Configs and manifests go through put_blob: a flipped one is replaced too.
    _flip(store.blob_path(first.config_digest), offset=5)
    _build(store, fake, None)
    assert _hashes_to_name(store, first.config_digest)


def test_verify_store_reports_then_repairs(tmp_path: Path, fake: FakeNix) -> None:
    """verify_store finds a flipped and a truncated blob; repair removes them and their entries."""
    store = FilesystemStore(tmp_path / "store", durable=False)
    with BuildCache(tmp_path / "cache") as cache:
        first = _build(store, fake, cache)
        flipped, truncated = _biggest_layer(first), first.config_digest
        _flip(store.blob_path(flipped))
        _truncate(store.blob_path(truncated))
        report = verify_store(store, cache=cache)
        assert {blob.digest for blob in report.corrupt} == {flipped, truncated}
        assert f"manifests/{first.cache_key}" in report.entries
        assert any(name.startswith("builds/") for name in report.entries)
        assert report.checked == len(list(store.list_blobs()))
        assert store.has_blob(flipped)  # reporting deletes nothing
        repaired = verify_store(store, cache=cache, repair=True)
        assert set(repaired.removed_blobs) == {flipped, truncated}
        assert set(repaired.removed_entries) == set(report.entries)
        assert not store.has_blob(flipped)
        assert store.get_object(f"manifests/{first.cache_key}") is None
        assert all(name not in report.entries for name, _ in cache.local_entries())
        again = _build(store, fake, cache)
    assert not again.from_cache
    assert again.manifest_digest == first.manifest_digest
    assert verify_store(store).ok


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "nixery_core", *args], capture_output=True, text=True,
        timeout=600, check=False, env=env, cwd=REPO,
    )


@pytest.mark.nix
@pytest.mark.tools
def test_cli_build_oci_refuses_a_corrupt_store_and_verify_repairs_it(
    tmp_path: Path, nix: None
) -> None:
    """`build --oci` fails on a flipped layer; verify --repair and a rebuild give a good layout."""
    require_tools("umoci")
    store, cache, layout = tmp_path / "store", tmp_path / "cache", tmp_path / "oci"
    common = ["--store", str(store), "--cache", str(cache)]
    build = ["build", "shell/hello", "--pkgs-path", str(OFFLINE_SET), "--offline", *common]
    done = _cli(*build, "--oci", str(tmp_path / "first"))
    assert done.returncode == 0, done.stderr
    blobs = FilesystemStore(store)
    layer = max(blobs.list_blobs(), key=lambda info: info.size).digest
    _flip(blobs.blob_path(layer))
    # The layout exported before the corruption does not share the store's inode.
    _umoci_unpack(tmp_path / "first", tmp_path / "bundle-first")

    refused = _cli(*build, "--oci", str(layout))
    assert refused.returncode != 0
    assert layer in refused.stderr
    assert not (layout / "index.json").exists()

    found = _cli("verify", *common)
    assert found.returncode == 1
    assert f"corrupt {layer}" in found.stdout
    repaired = _cli("verify", "--repair", *common)
    assert repaired.returncode == 1
    assert "removed 1 blobs" in repaired.stdout
    assert _cli("verify", *common).returncode == 0

    rebuilt = _cli(*build, "--oci", str(layout))
    assert rebuilt.returncode == 0, rebuilt.stderr
    _umoci_unpack(layout, tmp_path / "bundle")
    assert _cli("verify", *common).returncode == 0


def _umoci_unpack(layout: Path, bundle: Path) -> None:
    """Unpack the layout's ``latest`` with real umoci (rootless), which checks every digest."""
    done = subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{layout}:latest", str(bundle)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (bundle / "rootfs" / "bin").exists()


def test_export_from_a_corrupt_store_raises(tmp_path: Path, fake: FakeNix) -> None:
    """write_oci_layout hashes every blob: a flipped layer is DigestMismatch, not a layout."""
    store = FilesystemStore(tmp_path / "store", durable=False)
    result = _build(store, fake, None)
    _flip(store.blob_path(_biggest_layer(result)))
    with pytest.raises(DigestMismatch):
        write_oci_layout(tmp_path / "oci", store=store, manifest=result.manifest, ref_name="x")
    assert not (tmp_path / "oci" / "index.json").exists()


def test_verifying_reader_logs_a_mismatch(caplog: pytest.LogCaptureFixture) -> None:
    """A whole read of wrong bytes is logged and reported; a seek (a range) stops the check."""
    good = b"blob bytes" * 1000
    digest = "sha256:" + hashlib.sha256(good).hexdigest()
    seen: list[tuple[str, str]] = []
    with caplog.at_level(logging.WARNING, logger="nixery_core.verify"):
        reader = VerifyingReader(io.BytesIO(good), digest, lambda d, a: seen.append((d, a)))
        assert b"".join(iter(reader)) == good
        assert reader.mismatch is None
        bad = good[:-1] + b"X"
        reader = VerifyingReader(io.BytesIO(bad), digest, lambda d, a: seen.append((d, a)))
        assert b"".join(iter(reader)) == bad
        ranged = VerifyingReader(io.BytesIO(bad), digest, lambda d, a: seen.append((d, a)))
        ranged.seek(10)
        ranged.read()
        ranged.read()
    assert seen == [(digest, "sha256:" + hashlib.sha256(bad).hexdigest())]
    assert "does not match its digest" in caplog.text


def test_registry_logs_a_corrupt_blob_it_serves(
    tmp_path: Path, fake: FakeNix, caplog: pytest.LogCaptureFixture
) -> None:
    """With verify_blobs, the example registry logs a served blob whose bytes do not match."""
    store = FilesystemStore(tmp_path / "store", durable=False)
    result = _build(store, fake, None)
    layer = _biggest_layer(result)
    _flip(store.blob_path(layer))
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    config = RegistryConfig(
        source=FixedSource(), store=store, runner=fake, store_root=fake.store_root,
        verify_blobs=True,
    )
    with (
        caplog.at_level(logging.WARNING, logger="nixery_core.verify"),
        serving(create_app(config)) as base,
    ):
        response = httpx.get(f"{base}/v2/shell/hello/blobs/{layer}")
        assert response.status_code == 200
        good = httpx.get(f"{base}/v2/shell/hello/blobs/{result.config_digest}")
        assert good.status_code == 200
    assert f"served blob {layer} does not match its digest" in caplog.text
    assert result.config_digest not in caplog.text


def test_open_blob_for_serving_can_verify(
    tmp_path: Path, fake: FakeNix, caplog: pytest.LogCaptureFixture
) -> None:
    """open_blob_for_serving(verify=True) logs a corrupt blob once it has been read whole."""
    store = FilesystemStore(tmp_path / "store", durable=False)
    result = _build(store, fake, None)
    layer = _biggest_layer(result)
    _flip(store.blob_path(layer))
    with caplog.at_level(logging.WARNING, logger="nixery_core.verify"):
        served = open_blob_for_serving(store, layer, verify=True)
        with served.stream as stream:
            while stream.read(4096):
                pass
        plain = open_blob_for_serving(store, layer)
        with plain.stream as stream:
            stream.read()
    assert caplog.text.count(f"served blob {layer} does not match") == 1

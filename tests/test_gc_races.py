"""gc against builds in the real windows: a blob a build re-uses and is about to
name is never deleted, and an upload in flight survives any grace period."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import OFFLINE_SET

from nixery_core import BuildCache, build_image
from nixery_core.gc import collect_garbage
from nixery_core.media_types import IMAGE_MANIFEST_TYPES
from nixery_core.names import Image
from nixery_core.protocols import BlobInfo
from nixery_core.sources import LocalPathSource
from nixery_core.storage.filesystem import FilesystemStore

DAY = 86400.0


class _GcAfterManifest(FilesystemStore):
    """A filesystem store that runs gc (default grace) right after a manifest blob is
    stored: after the build re-used its blobs, before any entry names them."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reports: list[Any] = []
        self.armed = False

    def put_blob(self, data: bytes, media_type: str) -> BlobInfo:
        info = super().put_blob(data, media_type)
        if self.armed and media_type in IMAGE_MANIFEST_TYPES:
            self.armed = False
            self.reports.append(collect_garbage(self))
        return info


def _age_every_blob(store: FilesystemStore, seconds: float) -> None:
    then = time.time() - seconds
    for info in store.list_blobs():
        os.utime(store.blob_path(info.digest), (then, then))


@pytest.mark.usefixtures("nix")
@pytest.mark.parametrize("reuse", ["layer cache hits", "layers packed again"])
def test_gc_between_reuse_and_naming_keeps_what_the_build_names(
    tmp_path: Path, reuse: str
) -> None:
    """Blobs two days old and named by no entry gc can see (a local-only cache) are
    re-used by a build; gc with the default grace runs before the build names them;
    every blob of the image is still there afterwards."""
    store = _GcAfterManifest(tmp_path / "store")
    image = Image.from_packages(["hello", "coreutils"])
    source = LocalPathSource(OFFLINE_SET)
    with BuildCache(tmp_path / "cache", shared=False) as cache:
        first = build_image(image, source, uploader=store, cache=cache)
        _age_every_blob(store, 2 * DAY)
        cache.forget(store, f"manifests/{first.cache_key}")
        store.armed = True
        again = build_image(
            image, source, uploader=store, cache=cache if reuse == "layer cache hits" else None
        )
    assert store.reports, "gc did not run in the window"
    assert again.manifest_digest == first.manifest_digest
    if reuse == "layer cache hits":
        assert all(layer.reused for layer in again.layers)
    missing = [d for d in again.blobs if store.blob_info(d) is None]
    assert missing == [], f"gc deleted {len(missing)} blobs the image names"


class _TouchedWhileJudged(FilesystemStore):
    """A store where a build re-uses each blob right after gc judged it old."""

    def delete_blob_if_older(self, digest: str, cutoff: float) -> bool:
        self.touch_blob(digest)
        return super().delete_blob_if_older(digest, cutoff)

    def delete_blob(self, digest: str) -> None:
        self.touch_blob(digest)
        super().delete_blob(digest)


def test_a_blob_refreshed_after_gc_judged_it_is_kept(tmp_path: Path) -> None:
    """gc deletes a blob only if it is still old when deleted: a reuse that lands
    between judging and deleting wins."""
    store = _TouchedWhileJudged(tmp_path / "store")
    info = store.put_blob(b"an old layer", "application/octet-stream")
    _age_every_blob(store, 2 * DAY)
    report = collect_garbage(store)
    assert report.deleted == ()
    assert store.blob_info(info.digest) is not None


def test_storing_a_blob_again_restarts_its_age(tmp_path: Path) -> None:
    """put_blob of bytes already stored refreshes the blob's write time."""
    store = FilesystemStore(tmp_path / "store")
    info = store.put_blob(b"config", "application/octet-stream")
    _age_every_blob(store, 2 * DAY)
    store.put_blob(b"config", "application/octet-stream")
    written = store.blob_written_at(info.digest)
    assert written is not None
    assert time.time() - written < 60


def test_grace_zero_never_removes_an_upload_in_flight(tmp_path: Path) -> None:
    """gc with grace 0 leaves a staged upload alone; it then commits."""
    store = FilesystemStore(tmp_path / "store")
    data = b"x" * 4096
    with store.open_blob_writer("application/octet-stream") as writer:
        writer.write(data)
        time.sleep(0.01)
        report = collect_garbage(store, grace_seconds=0)
        info = writer.commit("sha256:" + hashlib.sha256(data).hexdigest())
    assert report.staging_removed == 0
    assert store.read_blob(info.digest) == data

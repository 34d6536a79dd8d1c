"""The local cache tier only saves work: a read-only or full cache directory
leaves the shared tier, with a warning, and hits still work (real Nix)."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IN_CI, OFFLINE_SET

from nixery_core import BuildCache, build_image
from nixery_core.names import Image
from nixery_core.sources import LocalPathSource
from nixery_core.storage.filesystem import FilesystemStore

pytestmark = pytest.mark.usefixtures("nix")


def _mount(mountpoint: Path, options: str) -> None:
    mountpoint.mkdir(parents=True, exist_ok=True)
    _run_mount(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)])


def _run_mount(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        message = f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[list[Path]]:
    """Mount points the test mounts tmpfs on; unmounted afterwards."""
    points: list[Path] = []
    yield points
    for point in reversed(points):
        subprocess.run(["umount", "--lazy", str(point)], check=False)


def _build(store: FilesystemStore, cache: BuildCache) -> tuple[str, bool]:
    result = build_image(
        Image.from_packages(["hello"]), LocalPathSource(OFFLINE_SET), uploader=store, cache=cache
    )
    return result.manifest_digest, result.from_cache


def test_a_read_only_cache_directory_degrades_to_the_shared_tier(
    tmp_path: Path, mounts: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A read-only cache directory (a read-only bind mount of a filled one): the hit is
    served from the shared tier, with a warning."""
    store = FilesystemStore(tmp_path / "store")
    directory = tmp_path / "cache"
    with BuildCache(directory) as cache:
        built = _build(store, cache)
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    mounts.append(read_only)
    _run_mount(["mount", "--bind", str(directory), str(read_only)])
    _run_mount(["mount", "-o", "remount,bind,ro", str(read_only)])
    with caplog.at_level(logging.WARNING, "nixery_core.cache"), BuildCache(read_only) as cache:
        assert _build(store, cache) == (built[0], True)
    assert "using the shared tier only" in caplog.text


def test_a_full_cache_directory_degrades_to_the_shared_tier(
    tmp_path: Path, mounts: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A cache directory on a full disk: the first build and later hits succeed, with a warning."""
    store = FilesystemStore(tmp_path / "store")
    directory = tmp_path / "full"
    mounts.append(directory)
    _mount(directory, "size=64k,nr_inodes=4,mode=0755")
    filler = directory / "filler"
    with filler.open("wb") as handle, pytest.raises(OSError):  # noqa: PT011 - ENOSPC
        handle.write(b"\0" * (1 << 20))
    for i in range(8):  # use up the inodes too
        try:
            (directory / f"f{i}").touch()
        except OSError:
            break
    with caplog.at_level(logging.WARNING, "nixery_core.cache"):
        with BuildCache(directory) as cache:
            first = _build(store, cache)
        with BuildCache(directory) as cache:
            second = _build(store, cache)
    assert first[1] is False
    assert second == (first[0], True)
    assert "using the shared tier only" in caplog.text

"""A local package set that reads files outside its directory is a moving target
(its entries expire); a self-contained one stays pinned (real Nix)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from conftest import OFFLINE_SET

from nixery_core import BuildCache, build_image
from nixery_core.cache import ManifestRecord
from nixery_core.names import Image
from nixery_core.sources import LocalPathSource
from nixery_core.testing import MemoryStore

pytestmark = pytest.mark.usefixtures("nix")


def _set(directory: Path, *, ca_bundle: str, busybox_dir: str) -> LocalPathSource:
    """A copy of the offline set taking busybox and the CA bundle from the Nix paths given."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("default.nix", "lib.nix"):
        shutil.copy(OFFLINE_SET / name, directory / f"offline-{name}")
    (directory / "offline-default.nix").write_text(
        (directory / "offline-default.nix").read_text().replace("./lib.nix", "./offline-lib.nix")
    )
    (directory / "default.nix").write_text(
        "{ system ? builtins.currentSystem, ... }:\n"
        f"import ./offline-default.nix {{ inherit system; busyboxDir = {busybox_dir}; "
        f"caBundle = {ca_bundle}; }}\n"
    )
    return LocalPathSource(directory)


def _entry(store: MemoryStore, key: str) -> ManifestRecord:
    raw = store.get_object(f"manifests/{key}")
    assert raw is not None
    return ManifestRecord.from_json(json.loads(raw))


def test_a_set_reading_a_file_outside_its_directory_picks_up_its_change(
    tmp_path: Path,
) -> None:
    """The CA bundle lives outside the set: the entry expires, and once it has, a changed
    bundle gives a new image instead of the old digest forever."""
    outside = tmp_path / "outside"
    outside.mkdir()
    bundle = outside / "ca.crt"
    bundle.write_text("# first bundle\n")
    busybox = tmp_path / "set" / "bb"
    busybox.mkdir(parents=True)
    shutil.copy("/usr/bin/busybox", busybox / "busybox")
    source = _set(tmp_path / "set" / "pkgs", ca_bundle=str(bundle), busybox_dir=str(busybox))
    image = Image.from_packages(["cacert"])
    store = MemoryStore()
    clock = [time.time()]
    with BuildCache(tmp_path / "cache", clock=lambda: clock[0]) as cache:
        first = build_image(image, source, uploader=store, cache=cache)
        assert _entry(store, first.cache_key).expires_at is not None
        bundle.write_text("# second bundle\n")
        clock[0] += 7 * 3600  # past the moving-target TTL
        second = build_image(image, source, uploader=store, cache=cache)
    assert not second.from_cache
    assert second.manifest_digest != first.manifest_digest


def test_a_self_contained_set_stays_pinned(tmp_path: Path) -> None:
    """A set whose every input lies in its directory keeps a never-expiring entry."""
    root = tmp_path / "pkgs"
    (root / "bb").mkdir(parents=True)
    shutil.copy("/usr/bin/busybox", root / "bb" / "busybox")
    (root / "ca.crt").write_text("# bundle\n")
    source = _set(root, ca_bundle="./ca.crt", busybox_dir="./bb")
    store = MemoryStore()
    with BuildCache(tmp_path / "cache") as cache:
        result = build_image(Image.from_packages(["cacert", "hello"]), source,
                             uploader=store, cache=cache)
    assert _entry(store, result.cache_key).expires_at is None

"""A store written from the docs alone (examples/sqlite_store.py): the kit, GC, a build."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from examples.sqlite_store import SqliteStore
from nixery_core.builder import Builder
from nixery_core.cache import BuildCache
from nixery_core.errors import BlobNotFound, DigestMismatch, InvalidDigest, InvalidInput
from nixery_core.gc import collect_garbage
from nixery_core.names import Image
from nixery_core.protocols import (
    BlobInfo,
    CollectableStore,
    SupportsStagingCleanup,
    SupportsWriteTimes,
)
from nixery_core.storage.base import BaseBlobWriter, BaseStore
from nixery_core.storage.conformance import CHECKS, Check, ConformanceFailure, run_conformance
from nixery_core.testing.runners import FakeNix, default_fake_packages
from nixery_core.testing.sources import FixedSource

DAY = 86400.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "store.sqlite")
    yield opened
    opened.close()


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.name)
def test_conformance(check: Check, store: SqliteStore) -> None:
    """Every check of the kit applies to the SQLite store (all capabilities) and passes."""
    assert check.applies(store)
    check.run(store)


def test_it_offers_every_capability_structurally(store: SqliteStore) -> None:
    """GC and serving see the capabilities by the methods alone."""
    assert isinstance(store, CollectableStore)
    assert isinstance(store, SupportsWriteTimes)
    assert isinstance(store, SupportsStagingCleanup)


def test_gc_prunes_old_unnamed_blobs_and_staging_and_keeps_a_built_image(tmp_path: Path) -> None:
    """A cached build survives gc; an old orphan and a crashed upload go; a young orphan stays."""
    clock = [time.time() - 3 * DAY]
    store = SqliteStore(tmp_path / "gc.sqlite", clock=lambda: clock[0])
    fake = FakeNix(tmp_path / "root", default_fake_packages())
    with Builder(
        runner=fake, uploader=store, cache=BuildCache(None), store_root=fake.store_root
    ) as builder:
        built = builder.build(Image.from_name("shell/hello"), FixedSource())
    orphan = store.put_blob(b"nothing names me", "application/octet-stream")
    crashed = store.open_blob_writer("application/octet-stream")
    crashed.write(b"a writer that died")
    clock[0] = time.time()
    young = store.put_blob(b"written just now", "application/octet-stream")

    report = collect_garbage(store)
    assert report.deleted == (orphan.digest,)
    assert report.staging_removed == 1
    assert young.digest in {info.digest for info in store.list_blobs()}
    assert all(store.has_blob(digest) for digest in built.blobs)

    with Builder(
        runner=fake, uploader=store, cache=BuildCache(None), store_root=fake.store_root
    ) as builder:
        again = builder.build(Image.from_name("shell/hello"), FixedSource())
    assert again.from_cache
    assert store.read_blob(again.manifest_digest) == built.manifest
    store.close()


# --- the base class keeps the rules ---------------------------------------------------


class _Careless(BaseStore):
    """A store whose hooks check nothing: only the base class guards them."""

    def __init__(self) -> None:
        self.blobs: dict[str, tuple[bytes, str]] = {}
        self.objects: dict[str, bytes] = {}
        self.hook_calls: list[str] = []

    def _blob_info(self, digest: str) -> BlobInfo | None:
        self.hook_calls.append(digest)
        entry = self.blobs.get(digest)
        return None if entry is None else BlobInfo(digest, len(entry[0]), entry[1])

    def _open_writer(self, media_type: str) -> _CarelessWriter:
        return _CarelessWriter(self, media_type)

    def _open_blob(self, digest: str) -> BinaryIO | None:
        entry = self.blobs.get(digest)
        return None if entry is None else io.BytesIO(entry[0])

    def _get_object(self, key: str) -> bytes | None:
        self.hook_calls.append(key)
        return self.objects.get(key)

    def _put_object(self, key: str, data: bytes) -> None:
        self.hook_calls.append(key)
        self.objects[key] = data


class _CarelessWriter(BaseBlobWriter):
    def __init__(self, store: _Careless, media_type: str) -> None:
        super().__init__(media_type)
        self.store = store
        self.staged = bytearray()
        self.discards = 0

    def _write(self, data: bytes | memoryview) -> None:
        self.staged += data

    def _publish(self, digest: str, size: int) -> None:
        self.store.blobs.setdefault(digest, (bytes(self.staged), self.media_type))

    def _discard(self) -> None:
        self.discards += 1
        self.staged.clear()


def test_the_base_class_alone_makes_a_conforming_core() -> None:
    """Hooks that check nothing still pass every core and reading check of the kit."""
    ran = run_conformance(_Careless)
    assert "hostile_digests" in ran
    assert "hostile_keys" in ran
    assert "read_back" in ran
    assert "list_blobs" not in ran  # no listing offered: those checks do not apply


def test_the_base_class_refuses_bad_input_before_any_hook() -> None:
    """Malformed digests, keys and media types never reach the store's own code."""
    careless = _Careless()
    with pytest.raises(InvalidDigest):
        careless.blob_info("sha256:../../etc/passwd")
    with pytest.raises(InvalidInput):
        careless.put_object("../escape", b"x")
    with pytest.raises(InvalidInput):
        careless.open_blob_writer("not a media type")
    assert careless.hook_calls == []
    with pytest.raises(BlobNotFound):
        careless.read_blob("sha256:" + "0" * 64)


def test_the_base_writer_checks_digests_and_single_use() -> None:
    """A wrong digest discards once and stores nothing; a used writer refuses more."""
    careless = _Careless()
    writer = careless.open_blob_writer("application/octet-stream")
    assert isinstance(writer, _CarelessWriter)
    writer.write(b"bytes")
    with pytest.raises(DigestMismatch):
        writer.commit("sha256:" + "0" * 64)
    assert careless.blobs == {}
    assert writer.discards == 1
    with pytest.raises(InvalidInput):
        writer.write(b"more")
    writer.abort()
    assert writer.discards == 1


def test_a_store_breaking_a_rule_fails_the_kit() -> None:
    """The kit can fail: a store whose listing is unsorted is reported by name."""

    class Unsorted(_Careless):
        def list_blobs(self) -> Iterator[BlobInfo]:
            return iter(sorted(
                (BlobInfo(d, len(b), m) for d, (b, m) in self.blobs.items()),
                key=lambda info: info.digest, reverse=True,
            ))

        def list_objects(self, prefix: str) -> Iterator[str]:
            prefix = self.checked_prefix(prefix)
            return iter(sorted(k for k in self.objects if k.startswith(prefix)))

    with pytest.raises(ConformanceFailure, match="list_blobs"):
        run_conformance(Unsorted)

"""MemoryStore: a conforming Uploader with counters and faults; the suite catches cheats."""

from __future__ import annotations

import re

import pytest

from nixery_core.digests import sha256_digest
from nixery_core.errors import DigestMismatch, InvalidInput, StorageUnavailable
from nixery_core.protocols import BlobInfo, Uploader
from nixery_core.storage.conformance import (
    CHECKS,
    Check,
    ConformanceFailure,
    run_conformance,
)
from nixery_core.testing.storage import MemoryBlobWriter, MemoryStore, StagedBlob

GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.name)
def test_conformance(check: Check) -> None:
    """MemoryStore keeps every promise of the Uploader conformance suite."""
    check.run(MemoryStore())


def test_is_an_uploader() -> None:
    """MemoryStore satisfies the runtime-checkable Uploader protocol."""
    assert isinstance(MemoryStore(), Uploader)


def test_counters() -> None:
    """Counters tell new blobs from re-commits, and count objects and has_blob calls."""
    store = MemoryStore()
    store.put_blob(b"a", GZ)
    store.put_blob(b"a", GZ)
    store.put_blob(b"b", GZ)
    store.put_object("manifests/x", b"1")
    store.has_blob(sha256_digest(b"a"))
    store.has_blob(sha256_digest(b"zzz"))
    assert (store.blob_writes, store.blob_commits) == (2, 3)
    assert (store.object_writes, store.has_blob_calls) == (1, 2)
    store.reset_counters()
    assert (store.blob_writes, store.blob_commits, store.object_writes, store.has_blob_calls) == (
        0,
        0,
        0,
        0,
    )
    assert store.read_blob(sha256_digest(b"a")) == b"a"


def test_fail_on_write_fails_exactly_the_nth_commit() -> None:
    """fail_on_write(2) fails only the second commit, which stores and stages nothing."""
    store = MemoryStore()
    store.fail_on_write(2)
    store.put_blob(b"first", GZ)
    with pytest.raises(StorageUnavailable) as info:
        store.put_blob(b"second", GZ)
    assert info.value.key == sha256_digest(b"second")
    assert not store.has_blob(sha256_digest(b"second"))
    assert store.staged_blobs() == ()
    store.put_blob(b"second", GZ)
    assert store.has_blob(sha256_digest(b"second"))
    assert store.blob_writes == 2


def test_fail_on_object_write() -> None:
    """fail_on_object_write(1) fails the next put_object and keeps the previous value."""
    store = MemoryStore()
    store.put_object("manifests/k", b"old")
    store.fail_on_object_write(1)
    with pytest.raises(StorageUnavailable):
        store.put_object("manifests/k", b"new")
    assert store.get_object("manifests/k") == b"old"
    store.put_object("manifests/k", b"new")
    assert store.get_object("manifests/k") == b"new"


def test_fault_counts_must_be_positive() -> None:
    """A zero or negative position is a caller error."""
    with pytest.raises(InvalidInput):
        MemoryStore().fail_on_write(0)
    with pytest.raises(InvalidInput):
        MemoryStore().fail_on_object_write(-1)


def test_staged_blobs_lists_open_uploads() -> None:
    """Open writers are listed with their media type and size until committed or aborted."""
    store = MemoryStore()
    first = store.open_blob_writer(GZ)
    first.write(b"12345")
    second = store.open_blob_writer("application/octet-stream")
    staged = store.staged_blobs()
    assert [(s.media_type, s.size) for s in staged] == [(GZ, 5), ("application/octet-stream", 0)]
    assert all(isinstance(s, StagedBlob) for s in staged)
    first.commit(sha256_digest(b"12345"))
    second.abort()
    assert store.staged_blobs() == ()


# --- the suite catches broken stores ------------------------------------------------


class _LeakyWriter(MemoryBlobWriter):
    def commit(self, digest: str) -> BlobInfo:
        try:
            return super().commit(digest)
        except DigestMismatch:
            self._store._blobs[digest] = (b"", self.media_type)  # the bug: keep what was sent
            raise


class _KeepsMismatchedBlobs(MemoryStore):
    """Stores bytes even when the digest does not match (a classic upload bug)."""

    def open_blob_writer(self, media_type: str) -> MemoryBlobWriter:
        return _LeakyWriter(self, media_type)


class _AcceptsAnyKey(MemoryStore):
    """Skips key validation on put_object."""

    def put_object(self, key: str, data: bytes) -> None:
        self._objects[key] = data


def test_suite_catches_broken_stores() -> None:
    """A store that keeps mismatched blobs or accepts '../' keys fails the named checks."""
    failures = {}
    for factory in (_KeepsMismatchedBlobs, _AcceptsAnyKey):
        with pytest.raises(ConformanceFailure) as info:
            run_conformance(factory)
        failures[factory.__name__] = set(re.findall(r"^(\w+):", str(info.value), re.MULTILINE))
    assert "digest_mismatch" in failures["_KeepsMismatchedBlobs"]
    assert "hostile_keys" in failures["_AcceptsAnyKey"]
    assert "hostile_keys" not in failures["_KeepsMismatchedBlobs"]


def test_run_conformance_passes_a_good_store() -> None:
    """run_conformance returns quietly for a conforming store."""
    run_conformance(MemoryStore)


def test_checks_are_documented_and_unique() -> None:
    """Every check has a unique name and a description of what it pins."""
    names = [check.name for check in CHECKS]
    assert len(names) == len(set(names))
    assert all(check.description for check in CHECKS)

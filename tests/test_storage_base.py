"""BaseBlobWriter: the writer rules every store built on it gets (filesystem, GCS, memory)."""

from __future__ import annotations

import array
from collections.abc import Callable
from pathlib import Path

import pytest

from nixery_core.digests import sha256_digest
from nixery_core.errors import DigestMismatch, InvalidInput, StorageUnavailable
from nixery_core.protocols import BlobInfo, Uploader
from nixery_core.storage.base import BaseBlobWriter
from nixery_core.storage.filesystem import FilesystemStore
from nixery_core.testing.storage import MemoryStore

OCTETS = "application/octet-stream"


class _ScriptedWriter(BaseBlobWriter):
    """Stages in memory, fails where a test says, and records each hook it runs."""

    def __init__(
        self, *, fail_write: bool = False, fail_publish: bool = False, failing_discards: int = 0
    ) -> None:
        super().__init__(OCTETS)
        self.fail_write = fail_write
        self.fail_publish = fail_publish
        self.failing_discards = failing_discards
        self.staged = bytearray()
        #: What _publish answers: the stored blob's info when not the one written.
        self.stored: BlobInfo | None = None
        self.published: dict[str, bytes] = {}
        self.hooks: list[str] = []

    def _write(self, data: bytes | memoryview) -> None:
        self.hooks.append("write")
        if self.fail_write:
            self.staged += bytes(data)[:1]  # part of it went out before the failure
            raise StorageUnavailable("injected write failure")
        self.staged += data

    def _publish(self, digest: str, size: int) -> BlobInfo | None:
        self.hooks.append("publish")
        if self.fail_publish:
            raise StorageUnavailable("injected publish failure")
        self.published[digest] = bytes(self.staged)
        return self.stored

    def _discard(self) -> None:
        self.hooks.append("discard")
        if self.failing_discards:
            self.failing_discards -= 1
            raise StorageUnavailable("injected discard failure")
        self.staged.clear()


def test_a_failed_write_leaves_the_writer_failed() -> None:
    """After a write that raised, the writer refuses more writes and any commit; abort discards."""
    writer = _ScriptedWriter()
    writer.write(b"first")
    writer.fail_write = True
    with pytest.raises(StorageUnavailable):
        writer.write(b"second")
    writer.fail_write = False
    with pytest.raises(InvalidInput, match="failed"):
        writer.write(b"third")
    with pytest.raises(InvalidInput, match="failed"):
        writer.commit(writer.written_digest())
    assert writer.published == {}
    writer.abort()
    writer.abort()
    assert writer.hooks == ["write", "write", "discard"]
    assert writer.staged == b""


def test_a_failed_discard_is_a_note_on_the_error_in_flight_and_is_retried() -> None:
    """A publish failure stays the error raised, noting a failed discard; abort retries it once."""
    writer = _ScriptedWriter(fail_publish=True, failing_discards=1)
    writer.write(b"bytes")
    with pytest.raises(StorageUnavailable, match="injected publish failure") as caught:
        writer.commit(sha256_digest(b"bytes"))
    assert caught.value.__notes__ == [
        "the staged bytes may remain: injected discard failure"
    ]
    with pytest.raises(InvalidInput, match="failed"):
        writer.commit(sha256_digest(b"bytes"))
    writer.abort()
    writer.abort()
    assert writer.hooks == ["write", "publish", "discard", "discard"]
    assert writer.staged == b""


def test_a_wrong_digest_is_the_error_raised_even_when_the_discard_fails() -> None:
    """DigestMismatch is what commit raises, with a note when the discard after it failed."""
    writer = _ScriptedWriter(failing_discards=1)
    writer.write(b"bytes")
    with pytest.raises(DigestMismatch) as caught:
        writer.commit(sha256_digest(b"other bytes"))
    assert caught.value.__notes__ == [
        "the staged bytes may remain: injected discard failure"
    ]
    assert writer.hooks == ["write", "discard"]


def test_leaving_with_by_an_exception_keeps_it_and_notes_a_failed_discard() -> None:
    """An exception leaving the with block is not replaced by a discard that fails after it."""
    writer = _ScriptedWriter(failing_discards=1)

    def fail_inside() -> None:
        with writer:
            writer.write(b"bytes")
            raise RuntimeError("the packer failed")

    with pytest.raises(RuntimeError, match="the packer failed") as caught:
        fail_inside()
    assert caught.value.__notes__ == [
        "the staged bytes may remain: injected discard failure"
    ]
    with pytest.raises(InvalidInput, match="aborted"):
        writer.write(b"more")
    writer.abort()
    assert writer.hooks == ["write", "discard", "discard"]


def test_a_discard_failing_on_a_quiet_exit_raises() -> None:
    """Leaving the with block uncommitted without an exception raises a discard's failure."""
    writer = _ScriptedWriter(failing_discards=1)
    with pytest.raises(StorageUnavailable, match="injected discard failure"), writer:
        writer.write(b"bytes")
    writer.abort()
    assert writer.hooks == ["write", "discard", "discard"]


def test_a_commit_after_a_failed_commit_publishes_nothing() -> None:
    """A publish that raised leaves the writer failed: a second commit cannot publish."""
    writer = _ScriptedWriter(fail_publish=True)
    writer.write(b"bytes")
    with pytest.raises(StorageUnavailable):
        writer.commit(sha256_digest(b"bytes"))
    writer.fail_publish = False
    with pytest.raises(InvalidInput, match="failed"):
        writer.commit(sha256_digest(b"bytes"))
    assert writer.published == {}
    assert writer.hooks == ["write", "publish", "discard"]


def test_publish_may_answer_with_the_stored_blob() -> None:
    """What _publish returns (a blob stored before, its own media type) is what commit gives."""
    writer = _ScriptedWriter()
    digest = sha256_digest(b"bytes")
    writer.stored = BlobInfo(digest, 5, "application/stored-before")
    writer.write(b"bytes")
    assert writer.commit(digest) == writer.stored


STORES: dict[str, Callable[[Path], Uploader]] = {
    "filesystem": lambda root: FilesystemStore(root, durable=False),
    "memory": lambda root: MemoryStore(),
}


@pytest.mark.parametrize("make", STORES.values(), ids=list(STORES))
def test_a_wide_memoryview_is_counted_in_bytes(
    make: Callable[[Path], Uploader], tmp_path: Path
) -> None:
    """A memoryview of 2-byte items is written, counted and committed as its bytes, not items."""
    store = make(tmp_path)
    items = array.array("H", [1, 2, 3, 4])
    data = items.tobytes()
    with store.open_blob_writer(OCTETS) as writer:
        assert writer.write(memoryview(items)) == len(data)
        info = writer.commit(sha256_digest(data))
    assert info == BlobInfo(sha256_digest(data), len(data), OCTETS)
    assert store.blob_info(info.digest) == info

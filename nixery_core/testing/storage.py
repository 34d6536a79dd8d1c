"""An in-memory :class:`~nixery_core.protocols.Uploader` for tests: counts, fails on cue.

:class:`MemoryStore` keeps the same promises as the filesystem store (it
passes :mod:`nixery_core.storage.conformance`) and adds what a test wants to
see: how many blobs and objects were written, how often ``has_blob`` was
asked, which uploads are still staged, and injected failures::

    store = MemoryStore()
    store.fail_on_write(2)          # the second blob commit from now fails
    ...build...
    assert store.staged_blobs() == ()  # nothing left half-written
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO

import attrs

from nixery_core.digests import digest_hex, sha256_digest
from nixery_core.errors import (
    BlobNotFound,
    InvalidInput,
    StorageUnavailable,
)
from nixery_core.protocols import BlobInfo
from nixery_core.storage.base import BaseBlobWriter
from nixery_core.storage.keys import (
    validate_lease_name,
    validate_object_key,
    validate_prefix,
    validate_range,
)

__all__ = ["MemoryBlobWriter", "MemoryStore", "StagedBlob"]


@attrs.frozen
class StagedBlob:
    """An upload that was opened and neither committed nor aborted yet."""

    writer_id: int
    media_type: str
    size: int


@attrs.define
class MemoryStore:
    """Blobs and objects in dictionaries; safe to share between threads.

    Counters (read them as attributes, zero them with :meth:`reset_counters`):

    - ``blob_writes``: commits that stored a new blob;
    - ``blob_commits``: successful commits, including no-op re-commits;
    - ``object_writes``: successful :meth:`put_object` calls;
    - ``has_blob_calls``: :meth:`has_blob` calls;
    - ``range_reads``: :meth:`read_range` calls (ranged GETs on a remote store).

    ``clock`` (wall-clock seconds) stamps each blob's write time and each
    upload's start, for :meth:`blob_written_at` and :meth:`clean_staging`:
    garbage collection judges ages on it as on a real store.
    """

    clock: Callable[[], float] = attrs.field(default=time.time, kw_only=True)

    blob_writes: int = attrs.field(default=0, init=False)
    blob_commits: int = attrs.field(default=0, init=False)
    object_writes: int = attrs.field(default=0, init=False)
    has_blob_calls: int = attrs.field(default=0, init=False)
    range_reads: int = attrs.field(default=0, init=False)
    _blobs: dict[str, tuple[bytes, str]] = attrs.field(factory=dict, init=False)
    _objects: dict[str, bytes] = attrs.field(factory=dict, init=False)
    _leases: dict[str, tuple[bytes, str]] = attrs.field(factory=dict, init=False)
    _generation: int = attrs.field(default=0, init=False)
    _staged: dict[int, MemoryBlobWriter] = attrs.field(factory=dict, init=False)
    _written: dict[str, float] = attrs.field(factory=dict, init=False)
    _opened: dict[int, float] = attrs.field(factory=dict, init=False)
    _lock: threading.RLock = attrs.field(factory=threading.RLock, init=False)
    _next_writer: int = attrs.field(default=0, init=False)
    _blob_attempts: int = attrs.field(default=0, init=False)
    _object_attempts: int = attrs.field(default=0, init=False)
    _fail_blob_at: set[int] = attrs.field(factory=set, init=False)
    _fail_object_at: set[int] = attrs.field(factory=set, init=False)

    # --- test controls -------------------------------------------------------

    def fail_on_write(self, n: int = 1) -> None:
        """Make the ``n``-th blob commit from now (1-based) raise StorageUnavailable.

        The failing commit stores nothing and discards its staged bytes.
        Call it several times to fail several commits.
        """
        if n < 1:
            raise InvalidInput(f"fail_on_write counts from 1, not {n}")
        with self._lock:
            self._fail_blob_at.add(self._blob_attempts + n)

    def fail_on_object_write(self, n: int = 1) -> None:
        """Make the ``n``-th :meth:`put_object` from now raise StorageUnavailable."""
        if n < 1:
            raise InvalidInput(f"fail_on_object_write counts from 1, not {n}")
        with self._lock:
            self._fail_object_at.add(self._object_attempts + n)

    def staged_blobs(self) -> tuple[StagedBlob, ...]:
        """Uploads opened but neither committed nor aborted, oldest first."""
        with self._lock:
            return tuple(
                StagedBlob(wid, w.media_type, w.size) for wid, w in sorted(self._staged.items())
            )

    def reset_counters(self) -> None:
        """Zero every counter (stored content is kept)."""
        with self._lock:
            self.blob_writes = self.blob_commits = self.object_writes = self.has_blob_calls = 0
            self.range_reads = 0

    # --- writer support ------------------------------------------------------

    def _register(self, writer: MemoryBlobWriter) -> int:
        with self._lock:
            self._next_writer += 1
            self._staged[self._next_writer] = writer
            self._opened[self._next_writer] = self.clock()
            return self._next_writer

    def _unregister(self, writer_id: int) -> None:
        with self._lock:
            self._staged.pop(writer_id, None)
            self._opened.pop(writer_id, None)

    def _store_blob(self, digest: str, data: bytes, media_type: str) -> None:
        with self._lock:
            self._blob_attempts += 1
            if self._blob_attempts in self._fail_blob_at:
                self._fail_blob_at.discard(self._blob_attempts)
                raise StorageUnavailable(f"injected failure committing {digest}", digest)
            if digest not in self._blobs:
                self._blobs[digest] = (data, media_type)
                self.blob_writes += 1
            self._written[digest] = self.clock()  # stored again: its age starts again
            self.blob_commits += 1

    # --- blobs ---------------------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        digest_hex(digest)
        with self._lock:
            self.has_blob_calls += 1
            return digest in self._blobs

    def blob_sizes(self, digests: Sequence[str]) -> dict[str, int | None]:
        """Each blob's size, ``None`` when absent."""
        for digest in digests:
            digest_hex(digest)
        with self._lock:
            return {d: len(self._blobs[d][0]) if d in self._blobs else None for d in digests}

    def blob_info(self, digest: str) -> BlobInfo | None:
        digest_hex(digest)
        with self._lock:
            entry = self._blobs.get(digest)
        return None if entry is None else BlobInfo(digest, len(entry[0]), entry[1])

    def open_blob_writer(self, media_type: str) -> MemoryBlobWriter:
        return MemoryBlobWriter(self, media_type)

    def put_blob(self, data: bytes, media_type: str) -> BlobInfo:
        with self.open_blob_writer(media_type) as writer:
            writer.write(data)
            return writer.commit(sha256_digest(data))

    def open_blob(self, digest: str) -> BinaryIO:
        return io.BytesIO(self.read_blob(digest))

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer at its end), counted in ``range_reads``."""
        validate_range(offset, length)
        data = self.read_blob(digest)
        with self._lock:
            self.range_reads += 1
        return data[offset : offset + length]

    def read_blob(self, digest: str) -> bytes:
        digest_hex(digest)
        with self._lock:
            entry = self._blobs.get(digest)
        if entry is None:
            raise BlobNotFound(digest)
        return entry[0]

    def delete_blob(self, digest: str) -> None:
        digest_hex(digest)
        with self._lock:
            self._blobs.pop(digest, None)
            self._written.pop(digest, None)

    def list_blobs(self) -> Iterator[BlobInfo]:
        with self._lock:
            items = sorted(self._blobs.items())
        return iter([BlobInfo(d, len(data), mt) for d, (data, mt) in items])

    def blob_written_at(self, digest: str) -> float | None:
        """When the blob was stored, on ``clock``; ``None`` when absent."""
        digest_hex(digest)
        with self._lock:
            return self._written.get(digest)

    def touch_blob(self, digest: str) -> bool:
        """Restart the blob's age (on ``clock``); ``False`` when absent."""
        digest_hex(digest)
        with self._lock:
            if digest not in self._blobs:
                return False
            self._written[digest] = self.clock()
            return True

    def delete_blob_if_older(self, digest: str, cutoff: float) -> bool:
        """Delete the blob if stored (or touched) before ``cutoff``; whether it was."""
        digest_hex(digest)
        with self._lock:
            written = self._written.get(digest)
            if digest not in self._blobs or written is None or written >= cutoff:
                return False
            self._blobs.pop(digest, None)
            self._written.pop(digest, None)
            return True

    def clean_staging(self, *, older_than: float, now: float, dry_run: bool = False) -> int:
        """Abort (``dry_run``: count) uploads opened before ``now - older_than``."""
        with self._lock:
            stale = [
                self._staged[wid] for wid, opened in self._opened.items()
                if opened < now - older_than
            ]
        if not dry_run:
            for writer in stale:
                writer.abort()
        return len(stale)

    # --- objects -------------------------------------------------------------

    def put_object(self, key: str, data: bytes) -> None:
        validate_object_key(key)
        with self._lock:
            self._object_attempts += 1
            if self._object_attempts in self._fail_object_at:
                self._fail_object_at.discard(self._object_attempts)
                raise StorageUnavailable(f"injected failure writing {key}", key)
            self._objects[key] = bytes(data)
            self.object_writes += 1

    def get_object(self, key: str) -> bytes | None:
        validate_object_key(key)
        with self._lock:
            return self._objects.get(key)

    def delete_object(self, key: str) -> None:
        validate_object_key(key)
        with self._lock:
            self._objects.pop(key, None)

    def list_objects(self, prefix: str) -> Iterator[str]:
        validate_prefix(prefix)
        with self._lock:
            return iter(sorted(k for k in self._objects if k.startswith(prefix)))

    # --- leases (SupportsLeases) ---------------------------------------------

    def _next_generation(self) -> str:
        self._generation += 1
        return str(self._generation)

    def create_lease(self, name: str, data: bytes) -> str | None:
        validate_lease_name(name)
        with self._lock:
            if name in self._leases:
                return None
            generation = self._next_generation()
            self._leases[name] = (bytes(data), generation)
            return generation

    def read_lease(self, name: str) -> tuple[bytes, str] | None:
        validate_lease_name(name)
        with self._lock:
            return self._leases.get(name)

    def replace_lease(self, name: str, data: bytes, generation: str) -> str | None:
        validate_lease_name(name)
        with self._lock:
            current = self._leases.get(name)
            if current is None or current[1] != generation:
                return None
            new = self._next_generation()
            self._leases[name] = (bytes(data), new)
            return new

    def delete_lease(self, name: str, generation: str) -> bool:
        validate_lease_name(name)
        with self._lock:
            current = self._leases.get(name)
            if current is None or current[1] != generation:
                return False
            del self._leases[name]
            return True

    def lease_names(self) -> tuple[str, ...]:
        """Leases currently held (a finished build leaves none)."""
        with self._lock:
            return tuple(sorted(self._leases))


class MemoryBlobWriter(BaseBlobWriter):
    """A staged in-memory upload; listed by :meth:`MemoryStore.staged_blobs` until done."""

    def __init__(self, store: MemoryStore, media_type: str) -> None:
        super().__init__(media_type)
        self._store = store
        self._chunks: list[bytes] = []
        self._id = store._register(self)

    def _write(self, data: bytes | memoryview) -> None:
        self._chunks.append(bytes(data))

    def _publish(self, digest: str, size: int) -> None:
        self._store._store_blob(digest, b"".join(self._chunks), self.media_type)
        self._discard()

    def _discard(self) -> None:
        self._chunks.clear()
        self._store._unregister(self._id)

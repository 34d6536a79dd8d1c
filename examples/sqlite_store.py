"""A blob store in one SQLite file, written from the documentation alone.

Everything here follows the docstrings of :mod:`nixery_core.protocols` and
:mod:`nixery_core.storage.base`: the base classes check digests, keys,
media types and writer use; this module only stores bytes.  It offers every
optional capability (reading, ranged reads, listing, deletion, write times, staging
clean-up, refresh), so the conformance kit checks all of them and garbage collection
can judge and prune it (``tests/test_sqlite_store.py`` shows both, and a
build served from it).

Layout: ``blobs`` (digest, media type, size, bytes, write time),
``objects`` (key, bytes), and staged uploads as ``uploads`` (id, start
time) with their ``chunks``.  One connection, serialised by a lock;
publishing a blob is one transaction, so it is atomic.
"""

from __future__ import annotations

import io
import itertools
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from nixery_core.errors import BlobNotFound, StorageUnavailable
from nixery_core.protocols import BlobInfo
from nixery_core.storage.base import BaseBlobWriter, BaseStore
from nixery_core.storage.keys import validate_range

__all__ = ["SqliteStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY, media_type TEXT NOT NULL, size INTEGER NOT NULL,
    data BLOB NOT NULL, written_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS objects (key TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS uploads (id INTEGER PRIMARY KEY, started REAL NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    upload INTEGER NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (upload, seq));
"""


class SqliteStore(BaseStore):
    """Blobs and objects in the SQLite database at ``path`` (created if missing).

    ``clock`` (wall-clock seconds) stamps write times and upload starts.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.executescript(_SCHEMA)
            self._ids = itertools.count(self._db.execute(
                "SELECT COALESCE(MAX(id), 0) + 1 FROM uploads").fetchone()[0])
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"cannot open {path}: {exc}", str(path)) from exc

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def _run(self, key: str, sql: str, *args: object) -> list[tuple[Any, ...]]:
        """One statement under the lock; a SQLite error becomes StorageUnavailable."""
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StorageUnavailable(f"SQLite failed on {key!r}: {exc}", key) from exc

    # --- the hooks BaseStore asks for -------------------------------------

    def _blob_info(self, digest: str) -> BlobInfo | None:
        rows = self._run(digest, "SELECT size, media_type FROM blobs WHERE digest = ?", digest)
        return BlobInfo(digest, rows[0][0], rows[0][1]) if rows else None

    def _open_writer(self, media_type: str) -> SqliteBlobWriter:
        upload = next(self._ids)
        self._run("staging", "INSERT INTO uploads VALUES (?, ?)", upload, self._clock())
        return SqliteBlobWriter(self, media_type, upload)

    def _open_blob(self, digest: str) -> BinaryIO | None:
        rows = self._run(digest, "SELECT data FROM blobs WHERE digest = ?", digest)
        return io.BytesIO(bytes(rows[0][0])) if rows else None

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        """``length`` bytes of a blob from ``offset`` (fewer at its end), one query
        (``SupportsRangeReads``)."""
        validate_range(offset, length)
        digest = self.checked_digest(digest)
        rows = self._run(digest, "SELECT substr(data, ?, ?) FROM blobs WHERE digest = ?",
                         offset + 1, length, digest)
        if not rows:
            raise BlobNotFound(digest)
        return bytes(rows[0][0]) if length else b""

    def _get_object(self, key: str) -> bytes | None:
        rows = self._run(key, "SELECT data FROM objects WHERE key = ?", key)
        return bytes(rows[0][0]) if rows else None

    def _put_object(self, key: str, data: bytes) -> None:
        self._run(key, "INSERT OR REPLACE INTO objects VALUES (?, ?)", key, data)

    # --- optional capabilities ----------------------------------------------

    def list_blobs(self) -> Iterator[BlobInfo]:
        """Every committed blob once, sorted by digest."""
        rows = self._run("blobs", "SELECT digest, size, media_type FROM blobs ORDER BY digest")
        return iter([BlobInfo(d, s, m) for d, s, m in rows])

    def list_objects(self, prefix: str) -> Iterator[str]:
        """The object keys starting with ``prefix``, sorted."""
        prefix = self.checked_prefix(prefix)
        rows = self._run(prefix or "/", "SELECT key FROM objects ORDER BY key")
        return iter([str(k) for (k,) in rows if str(k).startswith(prefix)])

    def delete_blob(self, digest: str) -> None:
        """Remove the blob; a no-op when absent."""
        digest = self.checked_digest(digest)
        self._run(digest, "DELETE FROM blobs WHERE digest = ?", digest)

    def delete_object(self, key: str) -> None:
        """Remove the object; a no-op when absent."""
        key = self.checked_key(key)
        self._run(key, "DELETE FROM objects WHERE key = ?", key)

    def blob_written_at(self, digest: str) -> float | None:
        """When the blob was stored, on ``clock``; ``None`` when absent."""
        digest = self.checked_digest(digest)
        rows = self._run(digest, "SELECT written_at FROM blobs WHERE digest = ?", digest)
        return float(rows[0][0]) if rows else None

    def touch_blob(self, digest: str) -> bool:
        """Set the blob's write time to now (``clock``); ``False`` when absent."""
        digest = self.checked_digest(digest)
        return self._changed(digest, "UPDATE blobs SET written_at = ? WHERE digest = ?",
                             self._clock(), digest)

    def delete_blob_if_older(self, digest: str, cutoff: float) -> bool:
        """Delete the blob if written before ``cutoff`` (one statement: atomic with touches)."""
        digest = self.checked_digest(digest)
        return self._changed(digest, "DELETE FROM blobs WHERE digest = ? AND written_at < ?",
                             digest, cutoff)

    def _changed(self, key: str, sql: str, *args: object) -> bool:
        """Run one statement; whether it changed a row."""
        with self._lock:
            try:
                return self._db.execute(sql, args).rowcount > 0
            except sqlite3.Error as exc:
                raise StorageUnavailable(f"SQLite failed on {key!r}: {exc}", key) from exc

    def clean_staging(self, *, older_than: float, now: float, dry_run: bool = False) -> int:
        """Remove (``dry_run``: count) uploads started before ``now - older_than``."""
        cutoff = now - older_than
        rows = self._run("staging", "SELECT id FROM uploads WHERE started < ?", cutoff)
        stale = [upload for (upload,) in rows]
        if not dry_run:
            for upload in stale:
                self._drop_upload(upload)
        return len(stale)

    # --- for the writer ------------------------------------------------------

    def _stage(self, upload: int, seq: int, data: bytes) -> None:
        self._run("staging", "INSERT INTO chunks VALUES (?, ?, ?)", upload, seq, data)

    def _publish(self, upload: int, digest: str, size: int, media_type: str) -> None:
        """Move an upload's chunks into ``blobs`` in one transaction (kept if already there)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    chunks = self._db.execute(
                        "SELECT data FROM chunks WHERE upload = ? ORDER BY seq", (upload,)
                    ).fetchall()
                    data = b"".join(bytes(chunk) for (chunk,) in chunks)
                    self._db.execute(
                        "INSERT OR IGNORE INTO blobs VALUES (?, ?, ?, ?, ?)",
                        (digest, media_type, size, data, self._clock()),
                    )
                    # Stored again: its age starts again (SupportsRefresh).
                    self._db.execute(
                        "UPDATE blobs SET written_at = ? WHERE digest = ?", (self._clock(), digest)
                    )
                    self._db.execute("DELETE FROM chunks WHERE upload = ?", (upload,))
                    self._db.execute("DELETE FROM uploads WHERE id = ?", (upload,))
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StorageUnavailable(f"SQLite failed storing {digest}: {exc}", digest) from exc

    def _drop_upload(self, upload: int) -> None:
        self._run("staging", "DELETE FROM chunks WHERE upload = ?", upload)
        self._run("staging", "DELETE FROM uploads WHERE id = ?", upload)


class SqliteBlobWriter(BaseBlobWriter):
    """One staged upload: chunks in the ``chunks`` table until published or discarded."""

    def __init__(self, store: SqliteStore, media_type: str, upload: int) -> None:
        super().__init__(media_type)
        self._store = store
        self._upload = upload
        self._seq = 0

    def _write(self, data: bytes | memoryview) -> None:
        self._seq += 1
        self._store._stage(self._upload, self._seq, bytes(data))

    def _publish(self, digest: str, size: int) -> None:
        self._store._publish(self._upload, digest, size, self.media_type)

    def _discard(self) -> None:
        self._store._drop_upload(self._upload)

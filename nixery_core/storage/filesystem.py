"""The default :class:`~nixery_core.protocols.Uploader`: a directory on a local filesystem.

The layout follows Nixery's storage bucket::

    root/
      layers/<hex>          blob content, named by the sha256 of its bytes
      layers/<hex>.meta     {"mediaType": ..., "size": ...} (JSON)
      manifests/<key>       objects, at their key ...
      builds/<key>          ... (any key that validate_object_key accepts)
      staging/              uploads in progress (unique names)
      leases/<name>         fleet leases (SupportsLeases), leases/.lock serialises them

Everything becomes visible by ``os.replace`` from ``staging/``, after the
content has been fsynced; the directory is fsynced after each rename.  A
reader therefore sees a blob or object complete or not at all, in this and
any other process, and a blob is only ever visible under the digest of its
bytes.  A blob's ``.meta`` sidecar is renamed into place before the blob
itself, so a visible blob always has its media type (a blob placed by other
tools, without a sidecar, reads as ``application/octet-stream``).

Keys and digests are validated before they become paths, so nothing is ever
written outside ``root``.  A crashed process may leave files in
``staging/``; :meth:`FilesystemStore.cleanup_staging` removes old ones.

A blob written again under a digest already stored is checked against the
stored copy (size, then a streaming re-hash): a stored copy that does not
hash to its name (a flipped bit, a truncated file) is replaced by the new,
verified bytes and a warning is logged; a good one is kept.
Every ``OSError`` (``ENOSPC`` included) is raised as
:class:`~nixery_core.errors.StorageUnavailable`, chained.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import attrs

from nixery_core.digests import Sha256Counter, digest_hex, is_digest, sha256_digest
from nixery_core.durable import fsync_dir
from nixery_core.errors import BlobNotFound, InvalidInput, StorageUnavailable
from nixery_core.media_types import OCTET_STREAM, validate_media_type
from nixery_core.protocols import BlobInfo
from nixery_core.storage.base import BaseBlobWriter
from nixery_core.storage.keys import (
    RESERVED_PREFIXES,
    validate_lease_name,
    validate_object_key,
    validate_prefix,
    validate_range,
)

__all__ = ["FilesystemBlobWriter", "FilesystemStore"]

log = logging.getLogger(__name__)
_HASH_CHUNK = 1 << 20

_META_SUFFIX = ".meta"
_FILE_MODE = 0o644


@contextlib.contextmanager
def _translated(key: str) -> Iterator[None]:
    """Raise every OSError inside as StorageUnavailable naming ``key``."""
    try:
        yield
    except OSError as exc:
        kind = "out of space" if exc.errno == errno.ENOSPC else "I/O error"
        raise StorageUnavailable(f"filesystem store {kind} on {key}: {exc}", key) from exc


def _is_object_key(key: str) -> bool:
    try:
        validate_object_key(key)
    except InvalidInput:
        return False
    return True


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@attrs.define
class FilesystemStore:
    """Blobs and objects under ``root`` (created if missing).

    ``durable=False`` skips the fsyncs (atomicity is kept, durability across
    a power loss is not): for tests and throw-away caches.  ``clock`` gives
    the current time for :meth:`cleanup_staging`.
    """

    root: Path = attrs.field(converter=Path)
    durable: bool = True
    clock: Callable[[], float] = time.time
    _lease_lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)

    def __attrs_post_init__(self) -> None:
        with _translated(str(self.root)):
            self._layers.mkdir(parents=True, exist_ok=True)
            self._staging.mkdir(parents=True, exist_ok=True)

    # --- paths ---------------------------------------------------------------

    @property
    def _layers(self) -> Path:
        return self.root / "layers"

    @property
    def _staging(self) -> Path:
        return self.root / "staging"

    def _blob_file(self, digest: str) -> Path:
        return self._layers / digest_hex(digest)

    def _meta_file(self, digest: str) -> Path:
        return self._layers / (digest_hex(digest) + _META_SUFFIX)

    def blob_path(self, digest: str) -> Path:
        """The file holding a blob, for zero-copy readers (hard links, sendfile).

        Blob files are never modified in place: treat them as read-only.
        Raises :class:`~nixery_core.errors.BlobNotFound` when absent.
        """
        path = self._blob_file(digest)
        if not self.has_blob(digest):
            raise BlobNotFound(digest)
        return path

    # --- low-level writes ----------------------------------------------------

    def _sync(self, fd: int) -> None:
        if self.durable:
            os.fsync(fd)

    def _sync_dir(self, path: Path) -> None:
        if self.durable:
            fsync_dir(path)

    def _stage(self, prefix: str) -> tuple[BinaryIO, Path]:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=self._staging)
        return os.fdopen(fd, "wb"), Path(name)

    def _stage_bytes(self, prefix: str, data: bytes) -> Path:
        """Write ``data`` to a new staging file and fsync it; its path."""
        handle, staged = self._stage(prefix)
        try:
            with handle:
                handle.write(data)
                handle.flush()
                os.fchmod(handle.fileno(), _FILE_MODE)
                self._sync(handle.fileno())
        except BaseException:
            _unlink_quietly(staged)
            raise
        return staged

    def _write_file_atomically(self, target: Path, data: bytes, prefix: str = "obj-") -> None:
        """Write ``data`` to a staging file, fsync it, rename it to ``target``."""
        staged = self._stage_bytes(prefix, data)
        try:
            staged.replace(target)
        except BaseException:
            _unlink_quietly(staged)
            raise
        self._sync_dir(target.parent)

    def _write_meta(self, digest: str, media_type: str, size: int) -> None:
        meta = json.dumps({"mediaType": media_type, "size": size}, sort_keys=True)
        self._write_file_atomically(self._meta_file(digest), meta.encode())

    def _publish_blob(self, staged: Path, digest: str, media_type: str, size: int) -> None:
        """Move a complete, fsynced staging file into place (sidecar first)."""
        with _translated(digest):
            self._write_meta(digest, media_type, size)
            staged.replace(self._blob_file(digest))
            self._sync_dir(self._layers)

    def _stored_copy_intact(self, digest: str, size: int) -> bool:
        """Whether the stored blob has ``size`` bytes hashing to ``digest`` (False if absent)."""
        counter = Sha256Counter()
        with _translated(digest):
            try:
                with self._blob_file(digest).open("rb") as stream:
                    if os.fstat(stream.fileno()).st_size != size:
                        return False
                    while chunk := stream.read(_HASH_CHUNK):
                        counter.update(chunk)
            except FileNotFoundError:
                return False
        return counter.size == size and counter.digest() == digest

    def _ensure_meta(self, digest: str, media_type: str, size: int) -> None:
        with _translated(digest):
            if not self._meta_file(digest).exists():
                self._write_meta(digest, media_type, size)

    # --- blobs ---------------------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        """Whether a blob with this digest is stored (InvalidDigest for bad digests).

        The cache calls this for every blob of every hit, so it stats a plain
        string path rather than building :class:`~pathlib.Path` objects.
        """
        path = os.path.join(self.root, "layers", digest_hex(digest))  # noqa: PTH118 - hot path
        with _translated(digest):
            try:
                os.stat(path)  # noqa: PTH116 - hot path, see above
            except (FileNotFoundError, NotADirectoryError):
                return False
        return True

    def blob_size(self, digest: str) -> int | None:
        """The stored blob's size in bytes (one stat), ``None`` when absent.

        The cache compares it with the size an entry gives on every hit.
        """
        path = os.path.join(self.root, "layers", digest_hex(digest))  # noqa: PTH118 - hot path
        with _translated(digest):
            try:
                return os.stat(path).st_size  # noqa: PTH116 - hot path, see has_blob
            except (FileNotFoundError, NotADirectoryError):
                return None

    def blob_sizes(self, digests: Sequence[str]) -> dict[str, int | None]:
        """Each blob's size, ``None`` when absent: one stat each (they are local)."""
        return {digest: self.blob_size(digest) for digest in digests}

    def blob_info(self, digest: str) -> BlobInfo | None:
        """Size and media type of a stored blob, ``None`` when absent."""
        path = self._blob_file(digest)
        with _translated(digest):
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                return None
            media_type = OCTET_STREAM
            try:
                meta = json.loads(self._meta_file(digest).read_bytes())
                if isinstance(meta, dict) and isinstance(meta.get("mediaType"), str):
                    media_type = meta["mediaType"]
            except (FileNotFoundError, ValueError):  # no or torn sidecar: a foreign blob
                pass
        return BlobInfo(digest, size, media_type)

    def open_blob_writer(self, media_type: str) -> FilesystemBlobWriter:
        """Start streaming a blob; see :class:`FilesystemBlobWriter`."""
        validate_media_type(media_type)
        with _translated("staging"):
            handle, staged = self._stage("blob-")
        return FilesystemBlobWriter(self, media_type, handle, staged)

    def put_blob(self, data: bytes, media_type: str) -> BlobInfo:
        """Store ``data`` (a no-op when an intact blob with its digest exists)."""
        validate_media_type(media_type)
        digest = sha256_digest(data)
        if self._stored_copy_intact(digest, len(data)) and self.touch_blob(digest):
            self._ensure_meta(digest, media_type, len(data))
            return BlobInfo(digest, len(data), media_type)
        with self.open_blob_writer(media_type) as writer:
            writer.write(data)
            return writer.commit(digest)

    def open_blob(self, digest: str) -> BinaryIO:
        """A binary stream of the blob; BlobNotFound when absent.

        Blobs are replaced only by identical bytes, so an open stream always
        reads one complete blob even while it is re-committed or deleted.
        """
        path = self._blob_file(digest)
        with _translated(digest):
            try:
                return path.open("rb")
            except FileNotFoundError:
                raise BlobNotFound(digest) from None

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the blob from ``offset`` (fewer at its end):
        :class:`~nixery_core.protocols.SupportsRangeReads`.  ``pread`` until they are read
        or the blob ends (one call may return fewer: Linux reads at most about 2 GiB)."""
        validate_range(offset, length)
        pieces: list[bytes] = []
        with self.open_blob(digest) as stream, _translated(digest):
            fd, end = stream.fileno(), offset + length
            while offset < end:
                piece = os.pread(fd, end - offset, offset)
                if not piece:
                    break
                pieces.append(piece)
                offset += len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def read_blob(self, digest: str) -> bytes:
        """The whole blob in memory (for configs and manifests, not big layers)."""
        with self.open_blob(digest) as stream, _translated(digest):
            return stream.read()

    def delete_blob(self, digest: str) -> None:
        """Remove a blob and its sidecar; a no-op when absent."""
        blob, meta = self._blob_file(digest), self._meta_file(digest)
        with _translated(digest):
            _unlink_quietly(blob)
            _unlink_quietly(meta)

    def list_blobs(self) -> Iterator[BlobInfo]:
        """Every stored blob, sorted by digest (staged uploads are not listed)."""
        with _translated("layers"):
            names = sorted(entry.name for entry in os.scandir(self._layers))
        for name in names:
            digest = "sha256:" + name
            if is_digest(digest):
                info = self.blob_info(digest)
                if info is not None:  # deleted meanwhile
                    yield info

    # --- objects -------------------------------------------------------------

    def put_object(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key``, replacing any previous value atomically."""
        target = self.root / validate_object_key(key)
        with _translated(key):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                self._write_file_atomically(target, bytes(data))
            except (NotADirectoryError, FileExistsError, IsADirectoryError) as exc:
                raise InvalidInput(
                    f"object key {key!r} conflicts with an object or prefix already stored"
                ) from exc

    def get_object(self, key: str) -> bytes | None:
        """The object at ``key``, ``None`` when absent."""
        target = self.root / validate_object_key(key)
        with _translated(key):
            try:
                return target.read_bytes()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return None

    def delete_object(self, key: str) -> None:
        """Remove the object at ``key``; a no-op when absent."""
        target = self.root / validate_object_key(key)
        with (
            _translated(key),
            contextlib.suppress(FileNotFoundError, NotADirectoryError, IsADirectoryError),
        ):
            target.unlink()

    def list_objects(self, prefix: str) -> Iterator[str]:
        """Keys starting with ``prefix`` (a plain string prefix), sorted."""
        validate_prefix(prefix)
        directory = prefix.rpartition("/")[0]
        start = self.root / directory if directory else self.root
        keys: list[str] = []

        def fail(exc: OSError) -> None:
            if not isinstance(exc, FileNotFoundError | NotADirectoryError):
                raise exc

        with _translated(prefix or "/"):
            for dirpath, dirnames, filenames in os.walk(start, onerror=fail):
                here = Path(dirpath)
                if here == self.root:
                    dirnames[:] = [d for d in dirnames if d not in RESERVED_PREFIXES]
                rel = here.relative_to(self.root).as_posix()
                for name in filenames:
                    key = name if rel == "." else f"{rel}/{name}"
                    if key.startswith(prefix) and _is_object_key(key):
                        keys.append(key)
        return iter(sorted(keys))

    # --- leases (SupportsLeases) ---------------------------------------------
    #
    # Every lease operation holds ``leases/.lock`` (flock: a whole-file lock
    # that NFS clients map to a server lock; the kernel drops it when the
    # holder dies), so a read-compare-write is one step for every process on
    # every host that mounts the directory.  Creation is create-only on its
    # own as well: the staged file is hard-linked to the name, which fails
    # with EEXIST like O_EXCL.  A generation is the file's inode and mtime:
    # every write makes a new file, renamed into place.

    @property
    def _leases(self) -> Path:
        return self.root / "leases"

    @contextlib.contextmanager
    def _leases_locked(self, name: str) -> Iterator[Path]:
        validate_lease_name(name)
        with _translated(f"leases/{name}"), self._lease_lock:
            self._leases.mkdir(exist_ok=True)
            fd = os.open(self._leases / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield self._leases / name
            finally:
                os.close(fd)  # closing drops the flock

    @staticmethod
    def _generation(path: Path) -> str | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return f"{st.st_ino:x}-{st.st_mtime_ns:x}"

    def create_lease(self, name: str, data: bytes) -> str | None:
        """Create ``leases/<name>`` (hard link: fails like ``O_EXCL`` when it exists)."""
        with self._leases_locked(name) as path:
            staged = self._stage_bytes("lease-", bytes(data))
            try:
                os.link(staged, path)
            except FileExistsError:
                return None
            finally:
                _unlink_quietly(staged)
            self._sync_dir(self._leases)
            return self._generation(path)

    def read_lease(self, name: str) -> tuple[bytes, str] | None:
        """The lease's bytes and generation, ``None`` when absent."""
        with self._leases_locked(name) as path:
            generation = self._generation(path)
            if generation is None:
                return None
            return path.read_bytes(), generation

    def replace_lease(self, name: str, data: bytes, generation: str) -> str | None:
        """Replace the lease if it is still at ``generation``."""
        with self._leases_locked(name) as path:
            if self._generation(path) != generation:
                return None
            self._write_file_atomically(path, bytes(data), "lease-")
            self._sync_dir(self._leases)
            return self._generation(path)

    def delete_lease(self, name: str, generation: str) -> bool:
        """Delete the lease if it is still at ``generation``."""
        with self._leases_locked(name) as path:
            if self._generation(path) != generation:
                return False
            path.unlink()
            return True

    # --- crash recovery ------------------------------------------------------

    def staging_leftovers(self) -> list[Path]:
        """Files in ``staging/``: uploads in progress, or left by crashed processes."""
        with _translated("staging"):
            return sorted(self._staging.iterdir())

    def blob_written_at(self, digest: str) -> float | None:
        """The blob file's mtime (:class:`~nixery_core.protocols.SupportsWriteTimes`)."""
        path = self._blob_file(digest)
        try:
            return path.stat().st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StorageUnavailable(f"cannot stat blob {digest}: {exc}", digest) from exc

    def touch_blob(self, digest: str) -> bool:
        """Set the blob's mtime to now (``clock``); ``False`` when it is not stored
        (:class:`~nixery_core.protocols.SupportsRefresh`)."""
        now = self.clock()
        with _translated(digest):
            try:
                os.utime(self._blob_file(digest), (now, now))
            except FileNotFoundError:
                return False
        return True

    def delete_blob_if_older(self, digest: str, cutoff: float) -> bool:
        """Delete the blob if its mtime is before ``cutoff``, atomically against touch_blob.

        The blob is first renamed into ``staging/`` (readers and touches then
        see it absent), its mtime read there, and it is put back if a touch
        came first.  Its sidecar goes with it unless the blob was stored again.
        """
        blob = self._blob_file(digest)
        trash = self._staging / f"gc-{digest_hex(digest)}-{os.urandom(6).hex()}"
        with _translated(digest):
            try:
                blob.rename(trash)
            except FileNotFoundError:
                return False
            if trash.stat().st_mtime >= cutoff:  # reused meanwhile: it stays
                trash.replace(blob)
                return False
            trash.unlink()
            if not blob.exists():
                _unlink_quietly(self._meta_file(digest))
        return True

    def clean_staging(self, *, older_than: float, now: float, dry_run: bool = False) -> int:
        """Staging files (and sidecars without a blob) older than ``older_than`` at ``now``.

        Removes them (``dry_run``: only counts) and returns how many
        (:class:`~nixery_core.protocols.SupportsStagingCleanup`).
        """
        return self._clean_staging(now - older_than, dry_run=dry_run)

    def cleanup_staging(self, older_than: float) -> int:
        """Remove staging files (and sidecars without a blob) older than ``older_than`` seconds.

        Returns how many files were removed.  Pick ``older_than`` well above
        the longest upload, or live uploads are cut off.
        """
        return self._clean_staging(self.clock() - older_than, dry_run=False)

    def _clean_staging(self, cutoff: float, *, dry_run: bool) -> int:
        removed = 0
        with _translated("staging"):
            candidates = list(self._staging.iterdir())
            candidates += [
                meta
                for meta in self._layers.glob("*" + _META_SUFFIX)
                if not (self._layers / meta.name.removesuffix(_META_SUFFIX)).exists()
            ]
            for path in candidates:
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_mtime < cutoff:
                        if not dry_run:
                            path.unlink()
                        removed += 1
        return removed


class FilesystemBlobWriter(BaseBlobWriter):
    """A blob streamed to ``staging/``, hashed as it is written.

    :meth:`commit` checks the digest, fsyncs, writes the sidecar and renames
    the file into ``layers/``; committing a digest already stored is a no-op
    when the stored copy hashes to it, and replaces the stored copy otherwise.
    Any failure in :meth:`commit`, :meth:`abort`, or leaving the ``with``
    block uncommitted removes the staging file; after a failed write the
    writer only accepts :meth:`abort` (the file may hold part of the
    bytes).  The rules are :class:`~nixery_core.storage.base.BaseBlobWriter`'s.
    One writer is used by one thread.
    """

    def __init__(
        self, store: FilesystemStore, media_type: str, handle: BinaryIO, staged: Path
    ) -> None:
        super().__init__(media_type)
        self._store = store
        self._handle = handle
        self._staged = staged

    def _staging_label(self) -> str:
        return f"staging file {str(self._staged)!r}"

    def _write(self, data: bytes | memoryview) -> None:
        with _translated(self._staged.name):
            self._handle.write(data)

    def _publish(self, digest: str, size: int) -> None:
        store = self._store
        if store._stored_copy_intact(digest, size) and store.touch_blob(digest):
            store._ensure_meta(digest, self.media_type, size)
            self._discard()
            return
        if store.has_blob(digest):
            log.warning("stored blob %s does not hash to its name; replacing it", digest)
        with _translated(digest):
            self._handle.flush()
            os.fchmod(self._handle.fileno(), _FILE_MODE)
            store._sync(self._handle.fileno())
            self._handle.close()
        store._publish_blob(self._staged, digest, self.media_type, size)

    def _discard(self) -> None:
        with contextlib.suppress(OSError):  # a failed flush of discarded bytes is moot
            self._handle.close()
        with _translated(self._staged.name):
            _unlink_quietly(self._staged)

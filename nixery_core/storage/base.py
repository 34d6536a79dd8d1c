"""Base classes for a new store: the protocol's rules kept once, the storage left to you.

Subclass :class:`BaseStore` and implement five small hooks (``_blob_info``,
``_open_writer``, ``_open_blob``, ``_get_object``, ``_put_object``), and
:class:`BaseBlobWriter` with three (``_write``, ``_publish``, ``_discard``).
The public methods check everything the protocols in
:mod:`nixery_core.protocols` promise before a hook runs:

* digests (``sha256:`` + 64 lower-case hex) on every method taking one,
  object keys and key prefixes (:mod:`nixery_core.storage.keys`) and media
  types (``type/subtype``), each refused before any IO with
  :class:`~nixery_core.errors.InvalidDigest` or
  :class:`~nixery_core.errors.InvalidInput`;
* a writer hashes and counts what is written, so ``commit`` refuses a
  malformed digest and a digest the bytes do not have
  (:class:`~nixery_core.errors.DigestMismatch`) before ``_publish`` runs;
  a writer is single-use (``write``/``commit`` after a commit or an abort
  raise InvalidInput); a failed commit, an ``abort`` or leaving ``with``
  without a commit calls ``_discard`` exactly once;
* ``put_blob`` goes through a writer; ``read_blob`` and ``has_blob`` are
  derived from ``_open_blob`` and ``_blob_info``.

What remains yours: ``_publish`` must make the blob visible atomically under
``digest`` and succeed when it is already stored; ``_put_object`` must
replace atomically; every backend failure must become a
:class:`~nixery_core.errors.StorageError` (chain it with ``raise ... from``).

Optional capabilities are plain methods you add (``list_blobs``,
``list_objects``, ``delete_blob``, ``delete_object``, ``blob_written_at``,
``clean_staging``); check their arguments with :meth:`BaseStore.checked_digest`,
:meth:`BaseStore.checked_key` and :meth:`BaseStore.checked_prefix`.  A
store offers a capability by having its methods, and the conformance kit
(:mod:`nixery_core.storage.conformance`) then checks it too.
"""

from __future__ import annotations

import abc
from types import TracebackType
from typing import BinaryIO, Literal

from nixery_core.digests import Sha256Counter, sha256_digest, validate_digest
from nixery_core.errors import BlobNotFound, InvalidInput
from nixery_core.media_types import validate_media_type
from nixery_core.protocols import BlobInfo
from nixery_core.storage.keys import validate_object_key, validate_prefix

__all__ = ["BaseBlobWriter", "BaseStore"]


class BaseBlobWriter(abc.ABC):
    """A :class:`~nixery_core.protocols.BlobWriter` whose rules are kept for you.

    Implement :meth:`_write` (stage bytes), :meth:`_publish` (make the staged
    bytes visible under a digest, atomically; already stored is success) and
    :meth:`_discard` (remove every staged byte; called once, after a failed
    publish too).
    """

    def __init__(self, media_type: str) -> None:
        self.media_type = validate_media_type(media_type)
        self._counter = Sha256Counter()
        self._state: Literal["open", "committed", "aborted"] = "open"

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._counter.size

    def written_digest(self) -> str:
        """sha256 of the bytes written so far (``SupportsWrittenDigest``)."""
        return self._counter.digest()

    def _require_open(self) -> None:
        if self._state != "open":
            raise InvalidInput(f"blob writer is already {self._state}")

    def write(self, data: bytes | memoryview) -> int:
        """Stage ``data``; returns its length."""
        self._require_open()
        self._counter.update(data)
        self._write(data)
        return len(data)

    def commit(self, digest: str) -> BlobInfo:
        """Check ``digest`` against the bytes written, then publish them under it."""
        self._require_open()
        try:
            self._counter.check(digest)
            self._publish(digest, self._counter.size)
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        return BlobInfo(digest, self._counter.size, self.media_type)

    def abort(self) -> None:
        """Discard the staged bytes; harmless after a commit or a first abort."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._discard()

    def __enter__(self) -> BaseBlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()

    @abc.abstractmethod
    def _write(self, data: bytes | memoryview) -> None:
        """Stage ``data`` after what was staged before."""

    @abc.abstractmethod
    def _publish(self, digest: str, size: int) -> None:
        """Make the staged bytes the blob ``digest`` (checked), atomically, then drop staging."""

    @abc.abstractmethod
    def _discard(self) -> None:
        """Remove every staged byte."""


class BaseStore(abc.ABC):
    """An :class:`~nixery_core.protocols.Uploader` that can read back, rules kept for you.

    See the module docstring for the hooks to implement and what they may
    assume (every argument they get is already checked).
    """

    # --- the Uploader protocol ---------------------------------------------

    def blob_info(self, digest: str) -> BlobInfo | None:
        """Digest, size and media type of a stored blob, ``None`` when absent."""
        return self._blob_info(validate_digest(digest))

    def open_blob_writer(self, media_type: str) -> BaseBlobWriter:
        """A writer streaming a blob whose digest is known only at the end."""
        return self._open_writer(validate_media_type(media_type))

    def put_blob(self, data: bytes, media_type: str) -> BlobInfo:
        """Store ``data`` under its sha256 (storing it again is harmless)."""
        with self.open_blob_writer(media_type) as writer:
            writer.write(data)
            return writer.commit(sha256_digest(data))

    def get_object(self, key: str) -> bytes | None:
        """The object at ``key``, ``None`` when absent."""
        return self._get_object(validate_object_key(key))

    def put_object(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key``, replacing what was there atomically."""
        self._put_object(validate_object_key(key), bytes(data))

    # --- SupportsReading -----------------------------------------------------

    def open_blob(self, digest: str) -> BinaryIO:
        """A stream of the blob's bytes; BlobNotFound when absent."""
        stream = self._open_blob(validate_digest(digest))
        if stream is None:
            raise BlobNotFound(digest)
        return stream

    def read_blob(self, digest: str) -> bytes:
        """The blob's bytes; BlobNotFound when absent."""
        with self.open_blob(digest) as stream:
            return stream.read()

    def has_blob(self, digest: str) -> bool:
        """Whether the blob is stored (its :meth:`blob_info` is not None)."""
        return self.blob_info(digest) is not None

    # --- checks for the optional capabilities you add ------------------------

    @staticmethod
    def checked_digest(digest: str) -> str:
        """``digest`` if well formed, else InvalidDigest (for delete_blob, blob_written_at)."""
        return validate_digest(digest)

    @staticmethod
    def checked_key(key: str) -> str:
        """``key`` if it is a valid object key, else InvalidInput (for delete_object)."""
        return validate_object_key(key)

    @staticmethod
    def checked_prefix(prefix: str) -> str:
        """``prefix`` if some key could start with it, else InvalidInput (for list_objects)."""
        return validate_prefix(prefix)

    # --- hooks ---------------------------------------------------------------

    @abc.abstractmethod
    def _blob_info(self, digest: str) -> BlobInfo | None:
        """The stored blob's info (``digest`` is checked), ``None`` when absent."""

    @abc.abstractmethod
    def _open_writer(self, media_type: str) -> BaseBlobWriter:
        """A new writer for a blob of ``media_type`` (checked)."""

    @abc.abstractmethod
    def _open_blob(self, digest: str) -> BinaryIO | None:
        """A stream of the blob (``digest`` is checked), ``None`` when absent."""

    @abc.abstractmethod
    def _get_object(self, key: str) -> bytes | None:
        """The object at ``key`` (checked), ``None`` when absent."""

    @abc.abstractmethod
    def _put_object(self, key: str, data: bytes) -> None:
        """Replace the object at ``key`` (checked) with ``data``, atomically."""

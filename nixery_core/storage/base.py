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
  raise InvalidInput), and a ``_write`` or ``_publish`` that raised leaves
  it *failed*: it then only accepts ``abort``, so bytes staged in part
  are never published;
* a failed commit, an ``abort`` or leaving ``with`` without a commit calls
  ``_discard``; once it has returned it is not called again, while a
  ``_discard`` that raised is tried again by the next ``abort`` or exit.
  When it raises a :class:`~nixery_core.errors.StorageError` while another
  exception is on its way out (a failed commit, an exception in the
  ``with`` block), that exception goes on unchanged, with a note saying
  what may remain;
* ``put_blob`` goes through a writer; ``read_blob`` and ``has_blob`` are
  derived from ``_open_blob`` and ``_blob_info``.

What remains yours: ``_publish`` must make the blob visible atomically under
``digest`` and succeed when it is already stored (returning the stored
blob's :class:`~nixery_core.protocols.BlobInfo` when that differs from the
one written, say in media type); ``_put_object`` must replace atomically;
every backend failure must become a
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
from typing import BinaryIO, Literal, Self

from nixery_core.digests import Sha256Counter, sha256_digest, validate_digest
from nixery_core.errors import BlobNotFound, InvalidInput, StorageError
from nixery_core.media_types import validate_media_type
from nixery_core.protocols import BlobInfo
from nixery_core.storage.keys import validate_object_key, validate_prefix

__all__ = ["BaseBlobWriter", "BaseStore"]


#: A writer's life: ``failed`` after a ``_write`` or ``_publish`` that raised.
_State = Literal["open", "committed", "aborted", "failed"]


class BaseBlobWriter(abc.ABC):
    """A :class:`~nixery_core.protocols.BlobWriter` whose rules are kept for you.

    Implement :meth:`_write` (stage bytes), :meth:`_publish` (make the staged
    bytes visible under a digest, atomically; already stored is success) and
    :meth:`_discard` (remove every staged byte; called after a failed
    publish too, and again after it raised).  Override :meth:`_staging_label` to
    name what you stage in messages.
    """

    def __init__(self, media_type: str) -> None:
        self.media_type = validate_media_type(media_type)
        self._counter = Sha256Counter()
        self._state: _State = "open"
        self._discarded = False

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._counter.size

    def written_digest(self) -> str:
        """sha256 of the bytes written so far (``SupportsWrittenDigest``)."""
        return self._counter.digest()

    def _require_open(self) -> None:
        if self._state != "open":
            raise InvalidInput(
                f"blob writer is {self._state}: writers are single-use ({self._staging_label()})"
            )

    def write(self, data: bytes | memoryview) -> int:
        """Stage ``data``; returns its length in bytes.

        When staging fails the writer is failed: it accepts only
        :meth:`abort` (or the end of the ``with`` block).
        """
        self._require_open()
        view = memoryview(data).cast("B")  # count bytes, whatever the view's item size
        try:
            self._write(data)
        except BaseException:
            self._state = "failed"
            raise
        self._counter.update(view)
        return len(view)

    def commit(self, digest: str) -> BlobInfo:
        """Check ``digest`` against the bytes written, then publish them under it."""
        self._require_open()
        try:
            self._counter.check(digest)
        except BaseException as exc:
            self._state = "aborted"
            self._discard_noting(exc)
            raise
        try:
            stored = self._publish(digest, self._counter.size)
        except BaseException as exc:
            self._state = "failed"
            self._discard_noting(exc)
            raise
        self._state = "committed"
        if stored is None:
            return BlobInfo(digest, self._counter.size, self.media_type)
        return stored

    def abort(self) -> None:
        """Discard the staged bytes; harmless after a commit or a first abort.

        A discard that failed (raising StorageError) is tried again.
        """
        if self._state == "committed":
            return
        if self._state == "open":
            self._state = "aborted"
        if not self._discarded:
            self._discard()
            self._discarded = True

    def _discard_noting(self, exc: BaseException) -> None:
        """:meth:`abort` while ``exc`` is on its way out: a failed discard becomes a note on it."""
        try:
            self.abort()
        except StorageError as cleanup:
            exc.add_note(f"{self._staging_label()} may remain: {cleanup}")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.abort()
        else:
            self._discard_noting(exc)

    def _staging_label(self) -> str:
        """What this writer stages, for messages (``staging object 'staging/x'``)."""
        return "the staged bytes"

    @abc.abstractmethod
    def _write(self, data: bytes | memoryview) -> None:
        """Stage ``data`` after what was staged before."""

    @abc.abstractmethod
    def _publish(self, digest: str, size: int) -> BlobInfo | None:
        """Make the staged bytes the blob ``digest`` (checked), atomically, then drop staging.

        Returns the stored blob's info when it is not the one written (a blob
        already stored keeps its media type), else ``None``.
        """

    @abc.abstractmethod
    def _discard(self) -> None:
        """Remove every staged byte (it may have been called before and raised)."""


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

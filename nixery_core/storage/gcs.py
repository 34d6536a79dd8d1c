"""A Google Cloud Storage bucket as an :class:`~nixery_core.protocols.Uploader`.

The layout is Nixery's, under an optional ``prefix``:

- ``layers/<hex>``: blobs, content-addressed by the sha256 of their bytes,
  with the media type kept as the object's ``Content-Type``;
- ``<key>`` (``manifests/...``, ``builds/...``): small keyed objects;
- ``staging/<name>``: blobs being written, before their digest is known;
- ``leases/<name>``: fleet leases (:class:`~nixery_core.protocols.SupportsLeases`),
  created with ``ifGenerationMatch=0``, replaced and deleted with
  ``ifGenerationMatch=<generation>``.

A blob writer streams to a staging object: blobs up to ``chunk_size`` are
buffered and sent in one request at commit, larger ones go out as a
resumable upload in ``chunk_size`` pieces while they are written.  sha256
and CRC32C are computed while writing.  :meth:`GcsBlobWriter.commit` checks
the sha256 (a mismatch deletes the staging object), then copies the staging
object server-side to ``layers/<hex>`` with ``ifGenerationMatch=0``
(create-only: when two writers race, the loser's copy fails its
precondition, which means the blob is there, so it is a success), checks the
CRC32C the server reports for the copy against its own, and deletes the
staging object.  Nothing is therefore ever visible under a digest but the
complete bytes of that digest.  A blob name already holding other bytes
(another size or CRC32C: written by something else, or damaged) is
replaced by the new, verified bytes, conditionally on the bad object's
generation, with a warning logged.  ``fake-gcs-server`` does not enforce
preconditions on copies; there the second copy replaces the first with the
same bytes, which is equally harmless.

Transient failures are retried by the client's own machinery
(``google.api_core.retry.Retry``, :data:`google.cloud.storage.retry.DEFAULT_RETRY`
unless another is passed).  Every retry is safe: staging names are unique,
the copy and :meth:`GcsStore.put_blob` are create-only, objects are replaced
with the same bytes, and deleting an absent name counts as done.  Every
backend error (``google.api_core`` exceptions, auth, transport and
checksum errors) is translated into
:class:`~nixery_core.errors.BlobNotFound`,
:class:`~nixery_core.errors.DigestMismatch` or
:class:`~nixery_core.errors.StorageUnavailable`, chained with ``from``.

Downloads pin the object generation seen at open, read ranges of
``chunk_size`` (a reader holds the last one, once: reads are copied out of
it) and check the CRC32C of the whole object when it was read from start
to end; :meth:`GcsStore.read_blob` also checks the sha256.

An abandoned resumable upload leaves no object (GCS expires the session);
:meth:`GcsBlobWriter.abort` cancels it and deletes any staging object.

The client is the caller's.  On google-cloud-storage 3.x, pass it through
:func:`disable_bucket_metadata_cache` first unless its OpenTelemetry spans
are wanted: otherwise a miss (a 404) starts a thread and sends one more
request.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, BinaryIO, Final

import google_crc32c
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.auth import exceptions as auth_exc
from google.cloud.storage import Bucket, Client
from google.cloud.storage import exceptions as storage_exc
from google.cloud.storage.retry import DEFAULT_RETRY

from nixery_core.digests import digest_hex, sha256_digest
from nixery_core.errors import (
    BlobNotFound,
    DigestMismatch,
    InvalidInput,
    StorageUnavailable,
)
from nixery_core.media_types import validate_media_type
from nixery_core.protocols import BlobInfo
from nixery_core.storage.base import BaseBlobWriter
from nixery_core.storage.keys import (
    validate_lease_name,
    validate_object_key,
    validate_prefix,
    validate_range,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "RANGE_RETRY_SECONDS",
    "GcsBlobWriter",
    "GcsStore",
    "disable_bucket_metadata_cache",
]

#: Metadata requests a cache hit sends at once (requests keeps 10 connections per host).
DEFAULT_CONCURRENT_CHECKS: Final = 10
#: Resumable-upload and download piece size; GCS wants a multiple of 256 KiB.
DEFAULT_CHUNK_SIZE: Final = 16 * 1024 * 1024
_CHUNK_MULTIPLE: Final = 256 * 1024
#: The buffer in front of a blob reader (which holds its last ``chunk_size`` range itself).
_SMALL_BUFFER: Final = 64 * 1024
#: A ranged read (a fragment cache's) is retried for at most this long: compressing the
#: store path again costs less than waiting out an outage of up to the default 120 s.
RANGE_RETRY_SECONDS: Final = 10.0
#: ``put_blob`` data up to this size is sent with a create-only precondition
#: straight away; larger data is first looked up so it is never sent twice.
_SMALL_PUT: Final = 256 * 1024

_BLOBS = "layers/"
_STAGING = "staging/"
_LEASES = "leases/"
_RESERVED = (_BLOBS, _STAGING, _LEASES)
_HEX = re.compile(r"[0-9a-f]{64}")
_OBJECT_TYPE = "application/octet-stream"

#: Everything the client raises for a failed backend call.  requests'
#: exceptions are OSErrors; resumable-media raises InvalidResponse and
#: DataCorruption; credentials raise GoogleAuthError.
_BACKEND_ERRORS: Final = (
    gexc.GoogleAPIError,
    auth_exc.GoogleAuthError,
    storage_exc.InvalidResponse,
    storage_exc.DataCorruption,
    OSError,
)

Timeout = float | tuple[float, float]
#: google_crc32c is untyped; one typed alias keeps mypy strict elsewhere.
_Crc32c: Callable[..., Any] = google_crc32c.Checksum


def _crc32c_b64(checksum: Any) -> str:
    """The base64 big-endian form GCS reports (``crc32c`` object field)."""
    return base64.b64encode(checksum.digest()).decode("ascii")


def disable_bucket_metadata_cache(client: Client) -> None:
    """Stop ``client`` keeping bucket metadata, and with it the threads and requests that cost.

    google-cloud-storage 3.x keeps, in each client, every bucket's project
    and location for two attributes of its OpenTelemetry spans.  It fills
    that cache from a new thread on the first request to a bucket it does
    not know (one more request, a bucket GET).  After a 404 for a bucket it
    knows, it starts another thread that asks whether the bucket still
    exists (one more request, retried with the default policy for up to two
    minutes when the server does not answer).  A store's misses are such
    404s: reading a cache entry or blob that is absent, deleting one that
    is gone (a lookup through ``Bucket.get_blob`` is the exception).  The
    spans exist only with ``opentelemetry`` installed and
    ``ENABLE_GCS_PYTHON_CLIENT_OTEL_TRACES`` set; without them the cache is
    never read.

    The client has no public switch: the environment variable
    ``DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA`` stops only the fill,
    not the checks after a 404 for buckets the client learnt from
    ``create_bucket``, ``get_bucket`` or ``Bucket.reload``.  This clears the
    attribute the client itself tests (``_bucket_metadata_cache``); on a
    client without one (2.x) it does nothing.
    """
    if getattr(client, "_bucket_metadata_cache", None) is not None:
        client._bucket_metadata_cache = None


def _unavailable(exc: BaseException, key: str, action: str) -> StorageUnavailable:
    return StorageUnavailable(f"GCS {action} {key!r} failed: {type(exc).__name__}: {exc}", key)


class GcsStore:
    """Content-addressed blobs and keyed objects in one GCS bucket (see the module docs).

    ``bucket`` is a :class:`google.cloud.storage.Bucket`, or a bucket name
    together with ``client``.  ``prefix`` places the whole layout under a
    folder (``"nixery/"``) so stores can share a bucket.  ``retry`` is the
    client's retry policy (``None`` turns retries off); ``timeout`` is each
    request's (connect, read) timeout in seconds; ``staging_name`` makes the
    unique part of staging object names (random by default).
    ``concurrent_checks`` bounds the metadata requests :meth:`blob_sizes`
    sends at once (a cache hit checks every blob of an image with it), on
    threads the store starts on first use; :meth:`close` stops them.
    The client stays the caller's: see :func:`disable_bucket_metadata_cache`.
    """

    def __init__(
        self,
        bucket: Bucket | str,
        *,
        client: Client | None = None,
        prefix: str = "",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        retry: Retry | None = DEFAULT_RETRY,
        timeout: Timeout = 60.0,
        staging_name: Callable[[], str] = lambda: uuid.uuid4().hex,
        concurrent_checks: int = DEFAULT_CONCURRENT_CHECKS,
    ) -> None:
        if (
            isinstance(concurrent_checks, bool) or not isinstance(concurrent_checks, int)
            or concurrent_checks < 1
        ):
            raise InvalidInput(
                f"concurrent_checks must be a positive int, not {concurrent_checks!r}"
            )
        self._concurrent_checks = concurrent_checks
        self._checks: ThreadPoolExecutor | None = None
        self._checks_lock = threading.Lock()
        if isinstance(bucket, str):
            if client is None:
                raise InvalidInput("GcsStore needs a client when the bucket is given by name")
            bucket = client.bucket(bucket)
        if isinstance(chunk_size, bool) or chunk_size <= 0 or chunk_size % _CHUNK_MULTIPLE:
            raise InvalidInput(f"chunk_size {chunk_size!r} is not a positive multiple of 256 KiB")
        if prefix:
            prefix = validate_object_key(prefix.rstrip("/")) + "/"
        self._bucket: Any = bucket
        self._prefix = prefix
        self._chunk_size = chunk_size
        self._retry = retry
        #: A ranged read's policy: the store's, retrying for at most RANGE_RETRY_SECONDS.
        self._range_retry = None if retry is None else retry.with_timeout(
            min(retry.timeout or RANGE_RETRY_SECONDS, RANGE_RETRY_SECONDS)
        )
        self._timeout = timeout
        self._staging_name = staging_name

    def __repr__(self) -> str:
        return f"GcsStore(bucket={self._bucket.name!r}, prefix={self._prefix!r})"

    # -- configuration (read by the writer and serving helpers) ----------------

    @property
    def bucket(self) -> Any:
        """The :class:`google.cloud.storage.Bucket` in use."""
        return self._bucket

    @property
    def prefix(self) -> str:
        """The folder the layout lives under (``""`` or ending in ``/``)."""
        return self._prefix

    @property
    def chunk_size(self) -> int:
        """Upload and download piece size in bytes."""
        return self._chunk_size

    def blob_object_name(self, digest: str) -> str:
        """The object name of a blob: ``<prefix>layers/<hex>`` (the digest is validated)."""
        return f"{self._prefix}{_BLOBS}{digest_hex(digest)}"

    def object_name(self, key: str) -> str:
        """The object name of a keyed object (``layers/`` and ``staging/`` are reserved)."""
        return self._prefix + validate_object_key(key)

    def _call(self, **kwargs: Any) -> dict[str, Any]:
        return {"retry": self._retry, "timeout": self._timeout, **kwargs}

    def _stat(self, name: str, key: str) -> Any:
        """The object's metadata (one GET), ``None`` when absent."""
        try:
            return self._bucket.get_blob(name, **self._call())
        except _BACKEND_ERRORS as exc:
            raise _unavailable(exc, key, "stat") from exc

    # -- blobs -------------------------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        """Whether ``layers/<hex>`` exists (a metadata GET)."""
        return self._stat(self.blob_object_name(digest), digest) is not None

    def blob_sizes(self, digests: Sequence[str]) -> dict[str, int | None]:
        """Each blob's size, ``None`` when absent: the metadata GETs run concurrently.

        :class:`~nixery_core.protocols.SupportsBlobSizes`; at most
        ``concurrent_checks`` requests are in flight, so a 94-layer image
        costs about ``96 / concurrent_checks`` round trips instead of 96.
        """
        names = [(digest, self.blob_object_name(digest)) for digest in digests]
        if len(names) <= 1:
            return {d: _size(self._stat(name, d)) for d, name in names}
        pool = self._check_pool()
        futures = [(d, pool.submit(self._stat, name, d)) for d, name in names]
        return {d: _size(future.result()) for d, future in futures}

    def _check_pool(self) -> ThreadPoolExecutor:
        with self._checks_lock:
            if self._checks is None:
                self._checks = ThreadPoolExecutor(
                    self._concurrent_checks, thread_name_prefix="nixery-gcs-check"
                )
            return self._checks

    def close(self) -> None:
        """Stop the threads :meth:`blob_sizes` started (the client stays the caller's)."""
        with self._checks_lock:
            pool, self._checks = self._checks, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> GcsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def blob_info(self, digest: str) -> BlobInfo | None:
        """Digest, size and media type of a stored blob, ``None`` when absent."""
        meta = self._stat(self.blob_object_name(digest), digest)
        return None if meta is None else _info(digest, meta)

    def open_blob_writer(self, media_type: str) -> GcsBlobWriter:
        """Start streaming a blob of ``media_type`` to a new staging object."""
        validate_media_type(media_type)
        return GcsBlobWriter(self, media_type, self._prefix + _STAGING + self._staging_name())

    def put_blob(self, data: bytes, media_type: str) -> BlobInfo:
        """Store ``data`` as a blob, create-only; a blob already there is not sent again."""
        validate_media_type(media_type)
        data = bytes(data)
        digest = sha256_digest(data)
        name = self.blob_object_name(digest)
        crc = _Crc32c(data)

        def upload(generation: int) -> None:
            blob = self._bucket.blob(name)
            blob.upload_from_string(
                data,
                content_type=media_type,
                if_generation_match=generation,
                checksum="crc32c",
                **self._call(),
            )
            _check_crc(blob, _crc32c_b64(crc), digest)

        if len(data) > _SMALL_PUT:
            existing = self._stat(name, digest)
            if existing is not None:
                return self._existing(digest, name, len(data), _crc32c_b64(crc), upload)
        blob = self._bucket.blob(name)
        try:
            blob.upload_from_string(
                data,
                content_type=media_type,
                if_generation_match=0,
                checksum="crc32c",
                **self._call(),
            )
        except gexc.PreconditionFailed:
            return self._existing(digest, name, len(data), _crc32c_b64(crc), upload)
        except _BACKEND_ERRORS as exc:
            raise _unavailable(exc, digest, "upload of blob") from exc
        _check_crc(blob, _crc32c_b64(crc), digest)
        return BlobInfo(digest, len(data), media_type)

    def _existing(
        self, digest: str, name: str, size: int, crc: str, replace: Callable[[int], None]
    ) -> BlobInfo:
        """The blob already under ``name``: kept when it matches ours, else replaced by ours.

        ``replace(generation)`` writes our (verified) bytes conditionally on
        the stored object's generation.
        """
        meta = self._stat(name, digest)
        if meta is None:
            raise StorageUnavailable(
                f"GCS refused to create {name!r} as it exists, yet it cannot be read", digest
            )
        if _matches(meta, size, crc):
            if not self.touch_blob(digest):  # stored again: its age starts again (gc)
                replace(0)  # collected in between: ours goes in
            return _info(digest, meta)
        log.warning(
            "GCS object %s exists with other content (size %s, crc32c %s; expected %d, %s); "
            "replacing it with the verified bytes", name, meta.size, meta.crc32c, size, crc,
        )
        try:
            replace(int(meta.generation))
        except gexc.PreconditionFailed:
            again = self._stat(name, digest)
            if again is not None and _matches(again, size, crc):
                return _info(digest, again)
            raise StorageUnavailable(
                f"GCS object {name!r} exists with other content "
                f"(size {meta.size}, crc32c {meta.crc32c}; expected {size}, {crc}) "
                "and could not be replaced",
                digest,
            ) from None
        except _BACKEND_ERRORS as exc:
            raise _unavailable(exc, digest, "replacement of") from exc
        replaced = self._stat(name, digest)
        if replaced is None or not _matches(replaced, size, crc):
            raise StorageUnavailable(f"GCS object {name!r} did not take the replacement", digest)
        return _info(digest, replaced)

    def open_blob(self, digest: str) -> BinaryIO:
        """A buffered stream over the blob's bytes (BlobNotFound when absent).

        The generation is pinned at open: a blob deleted while it is read
        raises :class:`~nixery_core.errors.BlobNotFound` on the next read.
        """
        name = self.blob_object_name(digest)
        meta = self._stat(name, digest)
        if meta is None:
            raise BlobNotFound(digest)
        pinned = self._bucket.blob(name, generation=meta.generation)
        raw = _GcsRawReader(self, pinned, digest, int(meta.size), meta.crc32c)
        # The raw reader holds the range it fetched last (``chunk_size`` bytes, one request)
        # and copies reads out of it: a buffer of that size in front would hold it twice.
        return io.BufferedReader(raw, buffer_size=_SMALL_BUFFER)

    def read_blob(self, digest: str) -> bytes:
        """All of a blob's bytes, CRC32C- and sha256-checked."""
        name = self.blob_object_name(digest)
        data = self._download(name, digest)
        if data is None:
            raise BlobNotFound(digest)
        actual = sha256_digest(data)
        if actual != digest:
            raise DigestMismatch(digest, actual)
        return data

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the blob from ``offset``, in one ranged GET (no metadata
        request first): :class:`~nixery_core.protocols.SupportsRangeReads`.

        Fewer bytes when the blob ends first, none when it ends before
        ``offset``; the caller checks what it reads (a fragment's CRC-32),
        as GCS reports no checksum for a part of an object.  Transient
        failures are retried for at most :data:`RANGE_RETRY_SECONDS`.
        """
        name = self.blob_object_name(digest)
        validate_range(offset, length)
        if length == 0:
            return b""
        try:
            data: bytes = self._bucket.blob(name).download_as_bytes(
                start=offset, end=offset + length - 1, checksum=None, raw_download=True,
                **self._call(retry=self._range_retry),
            )
        except gexc.NotFound as exc:
            raise BlobNotFound(digest) from exc
        except gexc.RequestRangeNotSatisfiable:
            return b""  # the blob ends before offset
        except _BACKEND_ERRORS as exc:
            raise _unavailable(exc, digest, "ranged download of") from exc
        return data[:length]

    def delete_blob(self, digest: str) -> None:
        """Remove a blob; an absent blob is already removed."""
        self._delete(self.blob_object_name(digest), digest)

    def list_blobs(self) -> Iterator[BlobInfo]:
        """Every blob under ``layers/``, in name (digest) order."""
        base = self._prefix + _BLOBS
        for meta in self._list(base, "layers/"):
            hex_part = meta.name[len(base) :]
            if _HEX.fullmatch(hex_part):
                yield _info(f"sha256:{hex_part}", meta)

    def staging_leftovers(self) -> list[str]:
        """Names of staging objects: uploads being committed, or left by crashed processes."""
        return [meta.name for meta in self._list(self._prefix + _STAGING, "staging/")]

    def touch_blob(self, digest: str) -> bool:
        """Patch the object's metadata (which sets ``updated``); ``False`` when absent
        (:class:`~nixery_core.protocols.SupportsRefresh`)."""
        blob = self._bucket.blob(self.blob_object_name(digest))
        blob.metadata = {"nixery-reused": str(int(time.time()))}
        try:
            blob.patch(**self._call())
        except gexc.NotFound:
            return False
        except _BACKEND_ERRORS as exc:
            raise _unavailable(exc, digest, "refresh of") from exc
        return True

    def delete_blob_if_older(self, digest: str, cutoff: float) -> bool:
        """Delete the blob if last written before ``cutoff``: a delete conditional on the
        metageneration judged, so a touch in between (a new metageneration) keeps it."""
        name = self.blob_object_name(digest)
        meta = self._stat(name, digest)
        written = _written_at(meta)
        if meta is None or written is None or written >= cutoff:
            return False
        try:
            self._bucket.blob(name).delete(
                if_metageneration_match=meta.metageneration, **self._call()
            )
        except (gexc.NotFound, gexc.PreconditionFailed):
            return False
        except _BACKEND_ERRORS as exc:
            raise _unavailable(exc, digest, "delete of") from exc
        return True

    def blob_written_at(self, digest: str) -> float | None:
        """The later of the blob object's creation and update times (one metadata GET).

        :class:`~nixery_core.protocols.SupportsWriteTimes`; ``None`` when absent.
        """
        return _written_at(self._stat(self.blob_object_name(digest), digest))

    def clean_staging(self, *, older_than: float, now: float, dry_run: bool = False) -> int:
        """Staging objects written before ``now - older_than``: deleted (or counted).

        :class:`~nixery_core.protocols.SupportsStagingCleanup`; the listing
        carries each object's times, so this makes no request per object
        besides the deletion.
        """
        count = 0
        for meta in self._list(self._prefix + _STAGING, "staging/"):
            written = _written_at(meta)
            if written is None or now - written < older_than:
                continue
            count += 1
            if not dry_run:
                self._delete(meta.name, meta.name)
        return count

    # -- objects -----------------------------------------------------------------

    def put_object(self, key: str, data: bytes) -> None:
        """Create or replace object ``key`` (one request; GCS replaces atomically)."""
        name = self.object_name(key)
        try:
            self._bucket.blob(name).upload_from_string(
                bytes(data), content_type=_OBJECT_TYPE, checksum="crc32c", **self._call()
            )
        except _BACKEND_ERRORS as exc:
            raise _unavailable(exc, key, "upload of object") from exc

    def get_object(self, key: str) -> bytes | None:
        """Object ``key``'s bytes, ``None`` when absent."""
        return self._download(self.object_name(key), key)

    def delete_object(self, key: str) -> None:
        """Remove object ``key``; an absent object is already removed."""
        self._delete(self.object_name(key), key)

    def list_objects(self, prefix: str) -> Iterator[str]:
        """Keys starting with ``prefix``, in order (blobs and staging objects are not listed)."""
        validate_prefix(prefix)
        for meta in self._list(self._prefix + prefix, prefix):
            key = meta.name[len(self._prefix) :]
            if not key.startswith(_RESERVED):
                yield key

    # -- leases (SupportsLeases) -------------------------------------------------
    #
    # A retried conditional request may have succeeded the first time: its
    # retry then fails the precondition.  Lease bodies are unique per write
    # (the lease module puts a holder id and a sequence number in each), so
    # reading the object back and finding our own bytes tells that case apart.

    def _lease_name(self, name: str) -> str:
        return f"{self._prefix}{_LEASES}{validate_lease_name(name)}"

    def _write_lease(self, name: str, data: bytes, match: int) -> str | None:
        key = f"leases/{name}"
        blob = self._bucket.blob(self._lease_name(name))
        try:
            blob.upload_from_string(
                bytes(data), content_type=_OBJECT_TYPE, if_generation_match=match,
                checksum="crc32c", **self._call(),
            )
        except gexc.PreconditionFailed:
            current = self.read_lease(name)
            return current[1] if current is not None and current[0] == data else None
        except _BACKEND_ERRORS as exc:
            raise _unavailable(exc, key, "conditional upload of") from exc
        return str(blob.generation)

    def create_lease(self, name: str, data: bytes) -> str | None:
        """Create ``leases/<name>`` with ``ifGenerationMatch=0`` (create-only)."""
        return self._write_lease(name, data, 0)

    def read_lease(self, name: str) -> tuple[bytes, str] | None:
        """The lease's bytes and the generation they belong to (one request)."""
        blob = self._bucket.blob(self._lease_name(name))
        try:
            data: bytes = blob.download_as_bytes(checksum="crc32c", **self._call())
        except gexc.NotFound:
            return None
        except _BACKEND_ERRORS as exc:
            raise _unavailable(exc, f"leases/{name}", "download of") from exc
        return data, str(blob.generation)

    def replace_lease(self, name: str, data: bytes, generation: str) -> str | None:
        """Replace the lease with ``ifGenerationMatch=<generation>``."""
        return self._write_lease(name, data, int(generation))

    def delete_lease(self, name: str, generation: str) -> bool:
        """Delete the lease with ``ifGenerationMatch=<generation>``.

        fake-gcs-server ignores the precondition on deletes; GCS honours it.
        """
        blob = self._bucket.blob(self._lease_name(name))
        try:
            blob.delete(if_generation_match=int(generation), **self._call())
        except (gexc.PreconditionFailed, gexc.NotFound):
            return False
        except _BACKEND_ERRORS as exc:
            raise _unavailable(exc, f"leases/{name}", "delete of") from exc
        return True

    # -- shared plumbing ---------------------------------------------------------

    def _download(self, name: str, key: str) -> bytes | None:
        try:
            data: bytes = self._bucket.blob(name).download_as_bytes(
                checksum="crc32c", raw_download=True, **self._call()
            )
        except gexc.NotFound:
            return None
        except _BACKEND_ERRORS as exc:
            raise _unavailable(exc, key, "download of") from exc
        return data

    def _delete(self, name: str, key: str) -> None:
        try:
            self._bucket.blob(name).delete(**self._call())
        except gexc.NotFound:
            return
        except _BACKEND_ERRORS as exc:
            raise _unavailable(exc, key, "delete of") from exc

    def _list(self, name_prefix: str, key: str) -> Iterator[Any]:
        try:
            yield from self._bucket.client.list_blobs(
                self._bucket, prefix=name_prefix, **self._call()
            )
        except _BACKEND_ERRORS as exc:
            raise _unavailable(exc, key, "listing of") from exc


def _size(meta: Any) -> int | None:
    return None if meta is None else int(meta.size)


def _written_at(meta: Any) -> float | None:
    """The later of an object's ``timeCreated`` and ``updated``; ``None`` when unknown."""
    if meta is None:
        return None
    times = [
        moment.timestamp()
        for moment in (meta.time_created, meta.updated)
        if isinstance(moment, datetime)
    ]
    return max(times) if times else None


def _info(digest: str, meta: Any) -> BlobInfo:
    return BlobInfo(digest, int(meta.size), meta.content_type or _OBJECT_TYPE)


def _matches(meta: Any, size: int, crc: str) -> bool:
    """Whether stored metadata has our size and (when reported) our CRC32C."""
    return bool(int(meta.size) == size and (not meta.crc32c or meta.crc32c == crc))


def _check_crc(blob: Any, expected: str, key: str) -> None:
    """The server's CRC32C for what it stored must be ours (when it reports one)."""
    reported = blob.crc32c
    if reported is not None and reported != expected:
        raise StorageUnavailable(
            f"GCS stored {blob.name!r} with crc32c {reported}, expected {expected}", key
        )


class GcsBlobWriter(BaseBlobWriter):
    """A blob streamed to ``staging/<name>``; see :class:`~nixery_core.protocols.BlobWriter`.

    Made by :meth:`GcsStore.open_blob_writer`.  The rules are
    :class:`~nixery_core.storage.base.BaseBlobWriter`'s: after a failed
    write or commit the writer only accepts :meth:`abort`, which cancels the
    upload and deletes the staging object (again after a delete that failed:
    when it fails while an error is on its way out, a note on that error
    says the staging object may remain).  A staging delete failing after the
    copy: see :meth:`_publish`.
    """

    def __init__(self, store: GcsStore, media_type: str, staging_name: str) -> None:
        super().__init__(media_type)
        self._store = store
        self._bucket: Any = store.bucket
        self._staging: Any = self._bucket.blob(staging_name)
        self._buffer = bytearray()
        self._upload: Any = None  # google.cloud.storage.fileio.BlobWriter once resumable
        self._maybe_stored = False  # an object may exist under the staging name
        self._crc: Any = _Crc32c()

    @property
    def staging_name(self) -> str:
        """The staging object's name (for tests and diagnostics)."""
        return str(self._staging.name)

    def _staging_label(self) -> str:
        return f"staging object {self.staging_name!r}"

    def _write(self, data: bytes | memoryview) -> None:
        """Append bytes; sent in ``chunk_size`` pieces once past one chunk."""
        view = memoryview(data).cast("B")
        # google_crc32c's C extension takes only read-only buffers such as bytes.
        self._crc.update(data if isinstance(data, bytes) else view.tobytes())
        try:
            if self._upload is None:
                self._buffer += view
                if len(self._buffer) > self._store.chunk_size:
                    self._start_resumable()
            else:
                self._upload.write(view)
        except _BACKEND_ERRORS as exc:
            raise _unavailable(exc, self.staging_name, "upload of staging object") from exc

    def _start_resumable(self) -> None:
        self._upload = self._staging.open(
            "wb",
            chunk_size=self._store.chunk_size,
            ignore_flush=True,
            content_type=self.media_type,
            checksum="crc32c",
            retry=self._store._retry,
            timeout=self._store._timeout,
        )
        pending, self._buffer = bytes(self._buffer), bytearray()
        self._upload.write(pending)

    def _finish_upload(self) -> None:
        """Make the staging object: one request for small blobs, the last chunk otherwise."""
        self._maybe_stored = True
        if self._upload is not None:
            upload, self._upload = self._upload, None
            upload.close()
        else:
            self._staging.upload_from_string(
                bytes(self._buffer),
                content_type=self.media_type,
                checksum="crc32c",
                **self._store._call(),
            )
            self._buffer = bytearray()

    def _publish(self, digest: str, size: int) -> BlobInfo:
        """Copy create-only to ``layers/<hex>``, then delete the staging object.

        The blob is stored once the copy is done; a staging delete that
        fails (its request's own retries spent) is tried again at once, and
        the commit succeeds when that one works.  When it fails too, the
        commit raises :class:`~nixery_core.errors.StorageUnavailable` saying
        the blob is stored: a commit that returns leaves no staging object,
        so one left is never silent.  The writer is then failed, and (by
        :class:`~nixery_core.storage.base.BaseBlobWriter`'s rule) its abort
        or the end of its ``with`` block tries the delete again, noting on
        the error that the staging object may remain when that fails too;
        ``clean_staging`` (garbage collection) removes it once old.
        """
        name = self._store.blob_object_name(digest)
        info = self._copy(digest, name, size, _crc32c_b64(self._crc))
        try:
            self._delete_staging()
        except StorageUnavailable:
            try:
                self._delete_staging()
            except StorageUnavailable as exc:
                raise StorageUnavailable(
                    f"blob {digest} is stored, but {self._staging_label()} could not be "
                    f"deleted: {exc}",
                    self.staging_name,
                ) from exc
        return info

    def _copy(self, digest: str, name: str, size: int, crc: str) -> BlobInfo:
        try:
            self._finish_upload()
        except _BACKEND_ERRORS as exc:
            raise _unavailable(exc, digest, "upload of staging object for") from exc
        def copy(generation: int) -> None:
            target = self._bucket.blob(name)
            token = None
            while True:
                token, _, _ = target.rewrite(
                    self._staging,
                    token=token,
                    if_generation_match=generation,
                    **self._store._call(),
                )
                if token is None:
                    break
            _check_crc(target, crc, digest)

        try:
            copy(0)
        except gexc.PreconditionFailed:
            return self._store._existing(digest, name, size, crc, copy)
        except _BACKEND_ERRORS as exc:
            raise _unavailable(exc, digest, "copy of staging object to") from exc
        return BlobInfo(digest, size, self.media_type)

    def _delete_staging(self) -> None:
        try:
            self._staging.delete(**self._store._call())
        except gexc.NotFound:
            pass
        except _BACKEND_ERRORS as exc:
            raise _unavailable(exc, self.staging_name, "delete of staging object") from exc
        self._maybe_stored = False

    def _discard(self) -> None:
        """Cancel the upload and delete the staging object."""
        self._buffer = bytearray()
        upload, self._upload = self._upload, None
        if upload is not None:
            try:
                upload.terminate()
            except _BACKEND_ERRORS as exc:
                raise _unavailable(exc, self.staging_name, "cancel of resumable upload") from exc
        if self._maybe_stored:
            self._delete_staging()


class _GcsRawReader(io.RawIOBase):
    """Ranged reads of one object generation; CRC32C checked when read start to end.

    Each request asks for ``chunk_size`` bytes (few requests for a whole
    blob); the range fetched last is held and reads are copied out of it,
    so a reader holds one range however small its reads are.
    """

    def __init__(self, store: GcsStore, blob: Any, key: str, size: int, crc32c: str | None) -> None:
        super().__init__()
        self._store = store
        self._blob = blob
        self._key = key
        self._size = size
        self._expected_crc = crc32c
        self._pos = 0
        self._crc: Any = _Crc32c()
        self._sequential = True
        #: The range fetched last, and where it starts in the blob.
        self._held: bytes = b""
        self._held_at = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        position = base + offset
        if position < 0:
            raise InvalidInput(f"negative seek position {position}")
        if position != self._pos:
            self._sequential = False
        self._pos = position
        return position

    def _fetch(self, start: int, length: int) -> bytes:
        try:
            data: bytes = self._blob.download_as_bytes(
                start=start,
                end=start + length - 1,
                checksum=None,
                raw_download=True,
                **self._store._call(),
            )
        except gexc.NotFound as exc:
            raise BlobNotFound(self._key) from exc
        except _BACKEND_ERRORS as exc:
            raise _unavailable(exc, self._key, "download of") from exc
        if not data:
            raise StorageUnavailable(
                f"GCS object for {self._key!r} ended at {start} of {self._size} bytes", self._key
            )
        if self._sequential:
            self._crc.update(data)
            if start + len(data) >= self._size:
                self._verify()
        return data

    def _take(self, limit: int) -> memoryview:
        """Up to ``limit`` bytes at the position (at least one before the end), from the
        range held, fetching the next one first when the position is outside it."""
        offset = self._pos - self._held_at
        if not 0 <= offset < len(self._held):
            self._held = b""  # dropped before the next range arrives
            self._held = self._fetch(self._pos, min(self._store.chunk_size, self._size - self._pos))
            self._held_at, offset = self._pos, 0
        piece = memoryview(self._held)[offset : offset + limit]
        self._pos += len(piece)
        return piece

    def _verify(self) -> None:
        actual = _crc32c_b64(self._crc)
        if self._expected_crc and actual != self._expected_crc:
            raise StorageUnavailable(
                f"GCS object for {self._key!r} read with crc32c {actual}, "
                f"expected {self._expected_crc}",
                self._key,
            )

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._pos)
        if want <= 0:
            return 0
        done = 0
        while done < want:
            piece = self._take(want - done)
            view[done : done + len(piece)] = piece
            done += len(piece)
        return done

    def readall(self) -> bytes:
        parts = []
        while self._pos < self._size:
            parts.append(self._take(self._size - self._pos))  # views, joined once
        self._held = b""
        return b"".join(parts)

"""What a registry needs to serve blobs: a stream, or a URL to redirect to.

- :func:`open_blob_for_serving` works for any
  :class:`~nixery_core.protocols.Uploader`: the open stream with the size
  and media type a ``GET /v2/<name>/blobs/<digest>`` answer needs
  (``Content-Length``, ``Content-Type``).
- :func:`signed_url` is for :class:`~nixery_core.storage.gcs.GcsStore`: a
  V4 signed URL (``X-Goog-Algorithm=GOOG4-RSA-SHA256``) when the credentials
  can sign (a service-account key), else the object's public URL, as
  Nixery does.  It makes no request; check :meth:`Uploader.blob_info` first
  to answer 404 for an absent blob.  The URL points at the client's API
  endpoint, so with an emulator it points at the emulator.  The signing
  time is the client library's clock (it does not take one).

The Google libraries (the ``gcs`` extra) are imported only when
:func:`signed_url` is called, so serving from a filesystem or in-memory
store does not need them.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any, BinaryIO, Final, NamedTuple, cast

from nixery_core.digests import validate_digest
from nixery_core.errors import BlobNotFound, InvalidInput, StorageUnavailable
from nixery_core.protocols import ReadableStore

if TYPE_CHECKING:
    from google.auth import credentials as auth_credentials

    from nixery_core.storage.gcs import GcsStore

__all__ = ["MAX_SIGNED_URL_EXPIRY", "ServedBlob", "open_blob_for_serving", "signed_url"]

#: GCS refuses V4 signed URLs valid for longer than seven days.
MAX_SIGNED_URL_EXPIRY: Final = timedelta(days=7)


class ServedBlob(NamedTuple):
    """An open blob ready to send: close ``stream`` when done."""

    stream: BinaryIO
    size: int
    media_type: str


def open_blob_for_serving(
    store: ReadableStore, digest: str, *, verify: bool = False
) -> ServedBlob:
    """Open blob ``digest`` of any store with its size and media type.

    ``verify=True`` hashes the bytes as they are read and logs a warning
    when a whole blob read from the start does not match its digest
    (:class:`~nixery_core.verify.VerifyingReader`).  Raises
    :class:`~nixery_core.errors.InvalidDigest` for a malformed digest and
    :class:`~nixery_core.errors.BlobNotFound` when the blob is absent (also
    when it is deleted between the lookup and the open).
    """
    validate_digest(digest)
    info = store.blob_info(digest)
    if info is None:
        raise BlobNotFound(digest)
    stream = store.open_blob(digest)
    if verify:
        from nixery_core.verify import VerifyingReader  # noqa: PLC0415 - avoids an import cycle

        stream = cast(BinaryIO, VerifyingReader(stream, digest))
    return ServedBlob(stream, info.size, info.media_type)


def signed_url(
    store: GcsStore,
    digest: str,
    expiry: timedelta,
    *,
    credentials: auth_credentials.Credentials | None = None,
) -> str:
    """A URL a client can GET blob ``digest`` from, directly from the bucket.

    ``credentials`` default to the store's client's.  Credentials that can
    sign (:class:`google.auth.credentials.Signing`, e.g. a service-account
    key) give a V4 signed URL valid for ``expiry`` (at most seven days);
    others give the public URL, which works only for a publicly readable
    bucket.
    """
    # Imported here: only GCS stores load the Google libraries (import time).
    from google.auth import credentials as auth_credentials  # noqa: PLC0415
    from google.auth import exceptions as auth_exc  # noqa: PLC0415

    name = store.blob_object_name(digest)
    if not isinstance(expiry, timedelta) or not timedelta(0) < expiry <= MAX_SIGNED_URL_EXPIRY:
        raise InvalidInput(f"signed URL expiry {expiry!r} must be within (0, 7 days]")
    bucket: Any = store.bucket
    # google-cloud-storage keeps a client's credentials only as _credentials.
    signer: object = credentials or getattr(bucket.client, "_credentials", None)
    blob = bucket.blob(name)
    if not isinstance(signer, auth_credentials.Signing):
        return str(blob.public_url)
    try:
        url: str = blob.generate_signed_url(
            version="v4", expiration=expiry, method="GET", credentials=signer
        )
    except auth_exc.GoogleAuthError as exc:
        raise StorageUnavailable(f"signing a URL for {digest} failed: {exc}", digest) from exc
    return url

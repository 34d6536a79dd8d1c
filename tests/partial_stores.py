"""Stores with only some abilities: a real store seen through a few protocols.

Code that checks a store's optional abilities structurally (``isinstance``
against a runtime-checkable protocol) is tested with these, so that the
store lacks exactly what the test says it lacks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import attrs

from nixery_core.protocols import BlobInfo, BlobWriter, CollectableStore, Uploader


@attrs.define
class UploaderOnly:
    """Only :class:`~nixery_core.protocols.Uploader` of ``inner``: it cannot read blobs back."""

    inner: Uploader

    def blob_info(self, digest: str) -> BlobInfo | None:
        return self.inner.blob_info(digest)

    def open_blob_writer(self, media_type: str) -> BlobWriter:
        return self.inner.open_blob_writer(media_type)

    def put_blob(self, data: bytes, media_type: str) -> BlobInfo:
        return self.inner.put_blob(data, media_type)

    def get_object(self, key: str) -> bytes | None:
        return self.inner.get_object(key)

    def put_object(self, key: str, data: bytes) -> None:
        self.inner.put_object(key, data)


@attrs.define
class CollectableOnly(UploaderOnly):
    """Only :class:`~nixery_core.protocols.CollectableStore` of ``inner``.

    Reading, listing and deletion, but no write times, staging clean-up,
    touching or leases.
    """

    inner: CollectableStore

    def open_blob(self, digest: str) -> BinaryIO:
        return self.inner.open_blob(digest)

    def read_blob(self, digest: str) -> bytes:
        return self.inner.read_blob(digest)

    def list_blobs(self) -> Iterator[BlobInfo]:
        return self.inner.list_blobs()

    def list_objects(self, prefix: str) -> Iterator[str]:
        return self.inner.list_objects(prefix)

    def delete_blob(self, digest: str) -> None:
        self.inner.delete_blob(digest)

    def delete_object(self, key: str) -> None:
        self.inner.delete_object(key)

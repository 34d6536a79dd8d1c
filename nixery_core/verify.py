"""Find blobs whose bytes no longer hash to their name, and get them rebuilt.

A blob is named by the sha256 of its bytes, and everything downstream (the
manifest cache, registries, clients) trusts the name.  A flipped bit or a
truncated file on disk breaks that silently: cache hits keep serving the
blob and every image naming it fails to pull.  Cheap checks catch some of
it on the way (a hit compares stored sizes, a blob written again replaces
a stored copy that does not hash to its name, an OCI layout export hashes
every blob); this module is the full check.

* :func:`verify_store` re-hashes every blob of a store, streaming (memory
  stays at one chunk whatever the blob size), and reports the corrupt
  ones.  With ``repair=True`` it deletes them and every cache entry
  (``manifests/``, ``builds/``) whose text names one, in the store and in
  the local tier of the ``cache`` given, so the next request for those
  images rebuilds and writes the blobs again.  (A local-tier entry of
  another cache directory naming a deleted blob is a miss anyway: an entry
  naming a vanished blob is never served.)  ``nixery-core verify
  [--repair]`` runs it.
* :class:`VerifyingReader` wraps a blob stream being served: it hashes what
  is read and, when a whole blob was read from the start, logs a warning
  (and calls ``on_mismatch``) if the bytes do not match the digest.  The
  client has the bytes by then and will reject them; the log is how an
  operator learns to run ``verify --repair``.

Deleting races with writers as :func:`~nixery_core.gc.collect_garbage`
does: a corrupt blob is hashed a second time just before it is deleted, so
one a concurrent build has just replaced with good bytes is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import BinaryIO, Final

import attrs

from nixery_core.cache import BuildCache
from nixery_core.digests import DIGEST_BYTES_PATTERN, Sha256Counter
from nixery_core.errors import BlobNotFound
from nixery_core.protocols import CollectableStore

__all__ = ["CorruptBlob", "VerifyReport", "VerifyingReader", "verify_store"]

log = logging.getLogger(__name__)

#: Bytes read per call while hashing.
CHUNK: Final = 1 << 20
_ENTRY_PREFIXES: Final = ("manifests/", "builds/")


@attrs.frozen
class CorruptBlob:
    """A stored blob whose bytes hash to ``actual`` (``size`` bytes), not to ``digest``."""

    digest: str
    actual: str
    size: int


@attrs.frozen
class VerifyReport:
    """What :func:`verify_store` found and did.

    ``checked`` blobs were hashed (``bytes_hashed`` bytes); ``corrupt`` did
    not match their name; ``entries`` are the cache entries naming a
    corrupt blob.  With ``repair``, ``removed_blobs`` and
    ``removed_entries`` say what was deleted (a blob found good on the
    second hash is kept and not listed).
    """

    checked: int
    bytes_hashed: int
    corrupt: tuple[CorruptBlob, ...] = ()
    entries: tuple[str, ...] = ()
    removed_blobs: tuple[str, ...] = ()
    removed_entries: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether every blob matched its name."""
        return not self.corrupt

    def __str__(self) -> str:
        lines = [
            f"checked {self.checked} blobs ({self.bytes_hashed} bytes): "
            f"{len(self.corrupt)} corrupt"
        ]
        lines += [
            f"  corrupt {blob.digest}: {blob.size} bytes hashing to {blob.actual}"
            for blob in self.corrupt
        ]
        lines += [f"  entry naming a corrupt blob: {name}" for name in self.entries]
        if self.removed_blobs or self.removed_entries:
            lines.append(
                f"removed {len(self.removed_blobs)} blobs and {len(self.removed_entries)} "
                "cache entries; the next request for those images rebuilds them"
            )
        elif self.corrupt:
            lines.append("run with repair (nixery-core verify --repair) to remove them")
        return "\n".join(lines)


def _hash_blob(store: CollectableStore, digest: str) -> Sha256Counter | None:
    """The streamed hash of a stored blob, ``None`` when it vanished meanwhile."""
    counter = Sha256Counter()
    try:
        with store.open_blob(digest) as stream:
            while chunk := stream.read(CHUNK):
                counter.update(chunk)
    except BlobNotFound:
        return None
    return counter


def _entries_naming(store: CollectableStore, digests: set[str]) -> list[str]:
    names = []
    for prefix in _ENTRY_PREFIXES:
        for name in store.list_objects(prefix):
            raw = store.get_object(name)
            if raw is not None and _names_any(raw, digests):
                names.append(name)
    return names


def _local_entries_naming(cache: BuildCache, digests: set[str]) -> list[str]:
    return [
        name
        for name, raw in cache.local_entries()
        if name.startswith(_ENTRY_PREFIXES)
        and _names_any(raw, digests)
    ]


def _names_any(raw: bytes, digests: set[str]) -> bool:
    """Whether the entry body ``raw`` names any of ``digests``."""
    return bool({m.decode() for m in DIGEST_BYTES_PATTERN.findall(raw)} & digests)


def verify_store(
    store: CollectableStore,
    *,
    repair: bool = False,
    cache: BuildCache | None = None,
    on_corrupt: Callable[[CorruptBlob], None] | None = None,
) -> VerifyReport:
    """Re-hash every blob in ``store``; report (and with ``repair``, remove) the corrupt ones.

    ``cache`` is the :class:`~nixery_core.cache.BuildCache` whose local tier
    should lose its entries naming a corrupt blob too (its shared tier is
    ``store`` itself).  ``on_corrupt`` is called for each corrupt blob as
    it is found.  Storage errors propagate as
    :class:`~nixery_core.errors.StorageError`.
    """
    checked = hashed = 0
    corrupt: list[CorruptBlob] = []
    for info in store.list_blobs():
        counter = _hash_blob(store, info.digest)
        if counter is None:
            continue
        checked += 1
        hashed += counter.size
        if counter.digest() != info.digest:
            found = CorruptBlob(info.digest, counter.digest(), counter.size)
            log.warning(
                "blob %s is corrupt: %d bytes hashing to %s", found.digest, found.size,
                found.actual,
            )
            corrupt.append(found)
            if on_corrupt is not None:
                on_corrupt(found)
    bad = {blob.digest for blob in corrupt}
    entries = _entries_naming(store, bad) if bad else []
    local = _local_entries_naming(cache, bad) if bad and cache is not None else []
    named = sorted(set(entries) | set(local))
    if not repair or not bad:
        return VerifyReport(checked, hashed, tuple(corrupt), tuple(named))
    removed_blobs = []
    for blob in corrupt:
        again = _hash_blob(store, blob.digest)
        if again is not None and again.digest() == blob.digest:
            continue  # replaced with good bytes since the first pass
        store.delete_blob(blob.digest)
        removed_blobs.append(blob.digest)
    for name in named:
        if cache is not None:
            cache.forget(store, name)
        else:
            store.delete_object(name)
    return VerifyReport(
        checked, hashed, tuple(corrupt), tuple(named), tuple(removed_blobs), tuple(named)
    )


class VerifyingReader:
    """A blob stream that checks, as it is read, that the bytes hash to ``digest``.

    Reads pass through unchanged.  When the whole blob has been read in
    order from the start (``read`` returned ``b""``), a mismatch is logged
    as a warning and passed to ``on_mismatch(digest, actual)``; a ``seek``
    (a range request) stops the check, as a part cannot be verified.
    """

    def __init__(
        self,
        stream: BinaryIO,
        digest: str,
        on_mismatch: Callable[[str, str], None] | None = None,
    ) -> None:
        self._stream = stream
        self._digest = digest
        self._on_mismatch = on_mismatch
        self._counter: Sha256Counter | None = Sha256Counter()
        self.mismatch: str | None = None

    def read(self, size: int = -1) -> bytes:
        """Read like the wrapped stream, hashing what comes back."""
        data = self._stream.read(size)
        if self._counter is not None:
            if data:
                self._counter.update(data)
            elif size != 0:
                self._finish(self._counter)
        return data

    def _finish(self, counter: Sha256Counter) -> None:
        self._counter = None
        actual = counter.digest()
        if actual != self._digest:
            self.mismatch = actual
            log.warning(
                "served blob %s does not match its digest: %d bytes hashing to %s; "
                "run nixery-core verify --repair",
                self._digest, counter.size, actual,
            )
            if self._on_mismatch is not None:
                self._on_mismatch(self._digest, actual)

    def seek(self, offset: int, whence: int = 0) -> int:
        """Seek the wrapped stream; the whole-blob check no longer applies."""
        self._counter = None
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        """The wrapped stream's position."""
        return self._stream.tell()

    def close(self) -> None:
        """Close the wrapped stream."""
        self._stream.close()

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(CHUNK):
            yield chunk

    def __enter__(self) -> VerifyingReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

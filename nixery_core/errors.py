"""Every exception nixery_core raises.

The tree is small on purpose; catch the branch you can act on::

    NixeryError
    ├── InvalidInput                 the caller's input is wrong (never retry)
    │   ├── InvalidImageName         .name, .part
    │   ├── InvalidDigest            .digest
    │   ├── InvalidImageConfig       .field, .value, .reason (image config, user)
    │   ├── InvalidManifest          .detail (manifest, index, config or layout JSON)
    │   ├── InvalidCacheRecord       .detail (a cache entry given to ``from_json``)
    │   └── InvalidSource            .detail
    ├── NixError                     calling Nix failed
    │   ├── UnknownPackages          .packages (every unknown name at once)
    │   ├── NixBuildFailed           .argv, .returncode, .stderr_tail
    │   ├── NixTimeout               .argv, .timeout, .stderr_tail
    │   ├── NixOutputError           .argv, .output (unparseable answer)
    │   └── CommandNotFound          .argv (nix itself is missing)
    ├── LayerError                   packing a layer failed
    │   ├── MissingEncoder           .package (a compressor that defines layer bytes)
    │   ├── StorePathMissing         .path
    │   ├── UnsafeStoreContent       .path, .detail (escapes, device files)
    │   ├── FileChangedDuringPacking .path
    │   └── BadCachedFragment        .path, .key, .blob, .detail (dropped: pack again)
    ├── StorageError                 the uploader failed; .key names the object
    │   ├── BlobNotFound             .key
    │   ├── DigestMismatch           .expected, .actual
    │   └── StorageUnavailable       a backend error, transient or not
    └── RegistryError                an OCI registry refused a push; .status, .body

Messages stay readable whatever the input: a value quoted from the caller
shows at most :data:`QUOTE_LIMIT` characters and its length
(:func:`bounded_repr`), and no message exceeds :data:`MESSAGE_LIMIT`
characters (a 10 MB image name gives a message of a few hundred bytes).
The attributes keep the values whole.

Backend errors (OSError, google.api_core exceptions, HTTP errors) are
translated at the seam into one of these and chained with ``raise ... from``.
A failure in another process (a frame worker compressing a chunked layer,
:mod:`nixery_core.frame_processes`) is a ``LayerError`` chained to that
process's traceback: the cause's text, not a class to catch.
A malformed cache entry read by :class:`~nixery_core.cache.BuildCache`
reaches no caller: the cache counts it (``CacheStats.corrupt_entries``),
logs what is wrong and rebuilds (:mod:`nixery_core.record_schema`); garbage
collection reports it (``GcReport.unreadable``); a malformed bucket fragment
pointer is a refused lookup (``BucketStats.rejected``) that gc deletes.  A cached
fragment that passed its check but fails as a pack copies it is dropped, then
raised as ``BadCachedFragment`` by ``pack_store_paths``; ``build_image`` packs
that layer again, compressing the path, and succeeds.  Only a
caller parsing an entry itself (``LayerRecord.from_json``,
``ManifestRecord.from_json``, ``BuildResult.from_record``, ``BuiltLayer.from_json``,
``SbomArtifact.from_json``, ``FragmentPointer.from_json``) gets ``InvalidCacheRecord``.
Errors carry their context as attributes, so a registry can turn
``UnknownPackages.packages`` into a ``MANIFEST_UNKNOWN`` answer.
"""

from __future__ import annotations

import reprlib
from collections.abc import Sequence
from typing import Final

__all__ = [
    "BadCachedFragment",
    "BlobNotFound",
    "CommandNotFound",
    "DigestMismatch",
    "FileChangedDuringPacking",
    "InvalidCacheRecord",
    "InvalidDigest",
    "InvalidImageConfig",
    "InvalidImageName",
    "InvalidInput",
    "InvalidManifest",
    "InvalidSource",
    "LayerError",
    "MissingEncoder",
    "NixBuildFailed",
    "NixError",
    "NixOutputError",
    "NixTimeout",
    "NixeryError",
    "RegistryError",
    "StorageError",
    "StorageUnavailable",
    "StorePathMissing",
    "UnknownPackages",
    "UnsafeStoreContent",
    "bounded_repr",
]

#: Characters of one caller-supplied value an error message quotes.
QUOTE_LIMIT: Final = 120
#: Characters of any error message (a longer one is cut, saying how much).
MESSAGE_LIMIT: Final = 2000
#: Package names an UnknownPackages message lists (all are in ``.packages``).
_NAMES_LISTED: Final = 20

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = QUOTE_LIMIT
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 3


def bounded_repr(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` showing at most a ``limit``-character prefix of a long string.

    A cut string reads ``'abc...'... (10000000 characters)``; containers
    show their first few items (:mod:`reprlib`).
    """
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return _REPR.repr(value)


def _cut(message: str) -> str:
    if len(message) <= MESSAGE_LIMIT:
        return message
    return f"{message[:MESSAGE_LIMIT]}... ({len(message) - MESSAGE_LIMIT} more characters)"


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.splitlines()[-lines:])


class NixeryError(Exception):
    """The root of every error this library raises (its message at most MESSAGE_LIMIT long)."""

    def __init__(self, *args: object) -> None:
        if args and isinstance(args[0], str):
            args = (_cut(args[0]), *args[1:])
        super().__init__(*args)


# --- input -------------------------------------------------------------------


class InvalidInput(NixeryError, ValueError):
    """The caller's input is malformed; retrying will not help."""


class InvalidImageName(InvalidInput):
    """An image name or tag does not follow the registry grammar."""

    def __init__(self, name: str, part: str, reason: str) -> None:
        self.name = name
        self.part = part
        self.reason = reason
        quoted = bounded_repr(name)
        if part != name:
            quoted += f": {bounded_repr(part)}"
        super().__init__(f"invalid image name {quoted} {reason}")


class InvalidDigest(InvalidInput):
    """A digest is not of the form ``sha256:<64 lower-case hex>``."""

    def __init__(self, digest: str) -> None:
        self.digest = digest
        super().__init__(
            f"invalid digest {bounded_repr(digest)}: expected 'sha256:' and 64 lower-case hex"
        )


class InvalidImageConfig(InvalidInput):
    """An image configuration or user value is malformed; ``field`` names it (``user.home``)."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(
            f"invalid image config {bounded_repr(field)} = {bounded_repr(value)}: {reason}"
        )


class InvalidManifest(InvalidInput):
    """A manifest, image index, image config or OCI layout file is malformed."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"invalid manifest: {detail}")


class InvalidCacheRecord(InvalidInput):
    """A cache entry (``LayerRecord``, ``ManifestRecord``, a build's record with its
    ``BuiltLayer`` and ``SbomArtifact`` entries, a bucket's ``FragmentPointer``) lacks a
    field or has a bad one.

    Raised by their ``from_json`` to a caller parsing an entry itself; the
    cache's own reads turn it into a counted miss.
    """

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"invalid cache record: {detail}")


class InvalidSource(InvalidInput):
    """A package source is misconfigured (missing path, bad URL, bad revision)."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"invalid package source: {detail}")


# --- nix ---------------------------------------------------------------------


class NixError(NixeryError):
    """Calling Nix failed."""


class UnknownPackages(NixError):
    """The package set has no attribute for these names (all of them, sorted)."""

    def __init__(self, packages: Sequence[str]) -> None:
        self.packages: tuple[str, ...] = tuple(sorted(set(packages)))
        listed = ", ".join(bounded_repr(p)[1:-1] if len(p) <= QUOTE_LIMIT else bounded_repr(p)
                           for p in self.packages[:_NAMES_LISTED])
        more = len(self.packages) - _NAMES_LISTED
        super().__init__(f"unknown packages: {listed}" + (f" and {more} more" if more > 0 else ""))


class NixBuildFailed(NixError):
    """Nix exited non-zero; ``stderr_tail`` holds the last lines it printed."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv: tuple[str, ...] = tuple(argv)
        self.returncode = returncode
        self.stderr_tail = _tail(stderr)
        super().__init__(
            f"{self.argv[0] if self.argv else 'nix'} exited with {returncode}:\n{self.stderr_tail}"
        )


class NixTimeout(NixError):
    """Nix ran longer than the allowed time and was killed with its process group."""

    def __init__(self, argv: Sequence[str], timeout: float, stderr: str = "") -> None:
        self.argv: tuple[str, ...] = tuple(argv)
        self.timeout = timeout
        self.stderr_tail = _tail(stderr)
        super().__init__(f"{self.argv[0] if self.argv else 'command'} timed out after {timeout}s")


class NixOutputError(NixError):
    """Nix answered, but not in the form expected."""

    def __init__(self, argv: Sequence[str], output: str, detail: str) -> None:
        self.argv: tuple[str, ...] = tuple(argv)
        self.output = output[:2000]
        self.detail = detail
        super().__init__(f"unparseable output from {' '.join(self.argv[:2])}: {detail}")


class CommandNotFound(NixError):
    """The program to run (``nix-build``, ``nix``) is not installed."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv: tuple[str, ...] = tuple(argv)
        super().__init__(f"command not found: {self.argv[0] if self.argv else '?'}")


# --- layers ------------------------------------------------------------------


class LayerError(NixeryError):
    """Packing a layer failed; nothing was committed."""


class MissingEncoder(LayerError, ImportError):
    """The compressor library that defines a layer's bytes is not installed.

    ``isal`` (gzip) and ``zstandard`` (zstd) are required dependencies, because
    another encoder would write other bytes and so other digests for the same
    input.  Nothing falls back silently; reinstall the package.  Also an
    :class:`ImportError`, for callers that caught that before.
    """

    def __init__(self, package: str, what: str) -> None:
        self.package = package
        super().__init__(
            f"{what} needs the {package!r} package, a required dependency of nixery-core that "
            f"is not importable here: pip install {package!r} (or reinstall nixery-core)"
        )


class StorePathMissing(LayerError):
    """A store path named by the closure is not on disk."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"store path missing on disk: {path}")


class UnsafeStoreContent(LayerError):
    """A store path holds something a layer must not carry (device file, escape)."""

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"refusing to pack {path}: {detail}")


class FileChangedDuringPacking(LayerError):
    """A file changed while it was packed: its size, mtime or inode moved, or its
    bytes hashed differently on two reads (content-based hard links read twice)."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"file changed while it was being packed: {path}")


class BadCachedFragment(LayerError):
    """A cached fragment passed its CRC-32 check but failed as the pack copied it (it does
    not inflate, or to another size than recorded, or its file changed meanwhile).

    Its bytes may already be in the layer being packed, so that pack fails; the fragment
    was dropped from the cache before this was raised, so packing the layer again
    compresses the store path itself (``build_image`` does so once by itself).
    ``path``: the store path as read; ``key``: the fragment's cache key; ``blob``: the
    layer blob it was a range of (a bucket reference's digest, or a layer packed here),
    ``None`` for a copy kept by the cache; ``detail``: what is wrong.
    """

    def __init__(self, path: str, key: str, blob: str | None, detail: str) -> None:
        self.path = path
        self.key = key
        self.blob = blob
        self.detail = detail
        origin = f"a range of blob {blob}" if blob is not None else "a copy in the cache"
        super().__init__(
            f"the cached fragment of {path} (key {key}, {origin}) {detail}; it was dropped "
            "from the fragment cache, so packing again compresses the store path"
        )


# --- storage -----------------------------------------------------------------


class StorageError(NixeryError):
    """The uploader failed; ``key`` names the blob or object concerned."""

    def __init__(self, message: str, key: str = "") -> None:
        self.key = key
        super().__init__(message)


class BlobNotFound(StorageError):
    """No blob or object is stored under this key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"not found in storage: {bounded_repr(key)[1:-1]}", key)


class DigestMismatch(StorageError):
    """The bytes written do not hash to the digest they were committed under."""

    def __init__(self, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"digest mismatch: expected {expected}, wrote {actual}", expected)


class StorageUnavailable(StorageError):
    """The storage backend failed (I/O error, server gone, permission denied)."""


class RegistryError(NixeryError):
    """An OCI distribution registry refused a request."""

    def __init__(self, message: str, status: int = 0, body: str = "") -> None:
        self.status = status
        self.body = body[:2000]
        super().__init__(f"{message} (HTTP {status}): {self.body[:300]}" if status else message)

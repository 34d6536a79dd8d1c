"""Content digests: ``sha256:<64 lower-case hex>``, computed and checked.

Only sha256 is supported.  :func:`validate_digest` is the one gate every
digest from outside passes before it names a file, an object key or a URL:
anything but ``sha256:`` followed by exactly 64 lower-case hex digits
(``sha256:../../etc``, upper case, ``md5:...``, short or padded strings) is
rejected with :class:`~nixery_core.errors.InvalidDigest`.
"""

from __future__ import annotations

import hashlib
import re
from typing import TypeGuard

import attrs

from nixery_core.errors import DigestMismatch, InvalidDigest

__all__ = [
    "DIGEST_BYTES_PATTERN",
    "SHA256_EMPTY",
    "Sha256Counter",
    "digest_hex",
    "is_digest",
    "sha256_digest",
    "validate_digest",
]

_PREFIX = "sha256:"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
#: The same rule for scanning raw bytes (cache entries) for every digest they mention.
DIGEST_BYTES_PATTERN = re.compile(rb"sha256:[0-9a-f]{64}")

#: The digest of zero bytes.
SHA256_EMPTY = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def sha256_digest(data: bytes | bytearray | memoryview) -> str:
    """``sha256:<hex>`` of ``data``."""
    return _PREFIX + hashlib.sha256(data).hexdigest()


def is_digest(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a well-formed sha256 digest string."""
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def validate_digest(value: object) -> str:
    """Return ``value`` unchanged if it is ``sha256:`` + 64 lower-case hex.

    Raises :class:`~nixery_core.errors.InvalidDigest` otherwise (also for
    non-strings, so JSON input can be passed straight in).
    """
    if not is_digest(value):
        raise InvalidDigest(value if isinstance(value, str) else repr(value))
    return value


def digest_hex(digest: str) -> str:
    """The 64 hex digits of a valid digest (validated: safe as a file name)."""
    return validate_digest(digest)[len(_PREFIX) :]


@attrs.define
class Sha256Counter:
    """A streaming hash that also counts bytes: feed it chunks, read both at the end."""

    _hash: hashlib._Hash = attrs.field(factory=hashlib.sha256, init=False)
    _size: int = attrs.field(default=0, init=False)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Add a chunk."""
        self._hash.update(data)
        self._size += len(data)

    @property
    def size(self) -> int:
        """Bytes fed so far."""
        return self._size

    def digest(self) -> str:
        """``sha256:<hex>`` of everything fed so far (the counter stays usable)."""
        return _PREFIX + self._hash.hexdigest()

    def check(self, expected: str) -> None:
        """What every blob writer's commit does first: the bytes fed hash to ``expected``.

        Raises :class:`~nixery_core.errors.InvalidDigest` for a malformed
        ``expected``, :class:`~nixery_core.errors.DigestMismatch` when it differs.
        """
        validate_digest(expected)
        actual = self.digest()
        if actual != expected:
            raise DigestMismatch(expected, actual)

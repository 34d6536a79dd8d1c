"""Object keys every store accepts: ``manifests/<k>``, ``builds/<k>`` and the like.

A key is one or more segments of ``[A-Za-z0-9._-]`` joined by single ``/``;
``.`` and ``..`` segments, empty segments, leading or trailing ``/`` are
refused.  The first segments ``layers`` and ``staging`` are reserved for
blobs and uploads in progress (the bucket layout Nixery uses), so an object
can never shadow a blob; ``leases`` is reserved for the conditional lease
objects of :class:`~nixery_core.protocols.SupportsLeases`, which only the
lease methods write.  Keys are therefore safe as relative file paths and
as bucket object names.
"""

from __future__ import annotations

import re

from nixery_core.errors import InvalidInput

__all__ = [
    "MAX_KEY_LENGTH",
    "RESERVED_PREFIXES",
    "validate_lease_name",
    "validate_object_key",
    "validate_prefix",
    "validate_range",
]

MAX_KEY_LENGTH = 512
#: First key segments that belong to the store itself.
RESERVED_PREFIXES = frozenset({"layers", "staging", "leases"})
#: A lease name: one segment, no dots (so it never collides with a store's own files).
_LEASE_NAME = re.compile(r"[A-Za-z0-9_-]{1,200}")

#: One key segment becomes one file name in the filesystem store, so it stays
#: well under the 255-byte NAME_MAX (room for suffixes a store may add).
_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,200}")


def _segments_ok(segments: list[str]) -> bool:
    return all(_SEGMENT.fullmatch(s) and s not in {".", ".."} for s in segments)


def validate_object_key(key: object) -> str:
    """Return ``key`` if it is a safe object key, else raise InvalidInput naming it."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidInput(f"invalid object key {key!r}: empty, too long or not a string")
    segments = key.split("/")
    if not _segments_ok(segments):
        raise InvalidInput(
            f"invalid object key {key!r}: use [A-Za-z0-9._-] segments of at most 200 "
            "characters joined by '/', without '.' or '..'"
        )
    if segments[0] in RESERVED_PREFIXES:
        raise InvalidInput(f"invalid object key {key!r}: {segments[0]!r}/ is reserved by the store")
    return key


def validate_prefix(prefix: object) -> str:
    """Return ``prefix`` if it can start a valid key (``""``, ``manifests/``, ``buil``)."""
    if not isinstance(prefix, str) or len(prefix) > MAX_KEY_LENGTH:
        raise InvalidInput(f"invalid key prefix {prefix!r}")
    segments = prefix.split("/")
    # The last segment may be empty ("manifests/") or partial ("manif").
    if not _segments_ok(segments[:-1]) or (segments[-1] and not _SEGMENT.fullmatch(segments[-1])):
        raise InvalidInput(f"invalid key prefix {prefix!r}")
    if prefix.startswith("/") or (len(segments) > 1 and segments[0] in RESERVED_PREFIXES):
        raise InvalidInput(f"invalid key prefix {prefix!r}: reserved or absolute")
    return prefix


def validate_lease_name(name: object) -> str:
    """Return ``name`` if it can name a lease (``[A-Za-z0-9_-]``, one segment), else raise."""
    if not isinstance(name, str) or not _LEASE_NAME.fullmatch(name):
        raise InvalidInput(f"invalid lease name {name!r}: use 1 to 200 of [A-Za-z0-9_-]")
    return name


def validate_range(offset: int, length: int) -> None:
    """A byte range of a blob (:class:`~nixery_core.protocols.SupportsRangeReads`): an
    ``offset`` and a ``length`` that are ints >= 0, else InvalidInput naming which."""
    for name, value in (("offset", offset), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInput(f"a range's {name} must be an int >= 0, not {value!r}")

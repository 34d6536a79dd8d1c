"""A cache record's fields read as typed values: a missing or malformed one raises
:class:`~nixery_core.errors.InvalidCacheRecord` naming it.

Shared by the records of :mod:`nixery_core.cache` and the build results of
:mod:`nixery_core.results` rebuilt from them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from nixery_core.errors import InvalidCacheRecord

__all__ = ["int_field", "json_object", "malformed", "str_field"]


def json_object(data: object, what: str) -> None:
    """Raise :class:`InvalidCacheRecord` unless ``data`` (a ``what``) is a JSON object."""
    if not isinstance(data, Mapping):
        raise InvalidCacheRecord(f"a {what} is an object, not {type(data).__name__}")


@contextlib.contextmanager
def malformed() -> Iterator[None]:
    """A record's parsing errors (a field's) as :class:`InvalidCacheRecord`, chained."""
    try:
        yield
    except (TypeError, ValueError) as exc:
        raise InvalidCacheRecord(str(exc)) from exc


def str_field(data: Mapping[str, Any], key: str) -> str:
    """The field ``key``, a string (else a TypeError, for :func:`malformed`)."""
    value = data.get(key)
    if not isinstance(value, str):
        raise TypeError(f"{key} is not a string")
    return value


def int_field(data: Mapping[str, Any], key: str) -> int:
    """The field ``key``, an integer, not a bool (else a TypeError, for :func:`malformed`)."""
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{key} is not an integer")
    return value

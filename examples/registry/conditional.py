"""Conditional requests (RFC 9110 section 13): ``If-None-Match`` and ``If-Range``.

Everything this registry serves is content-addressed, so the entity tag of
a manifest or blob is its digest in quotes (``"sha256:..."``), the same for
every representation of those bytes.  A client holding a copy sends it back:

- ``If-None-Match: "sha256:..."`` (a comma list, weak tags ``W/"..."``
  compared weakly, or ``*``): when one matches, the answer is ``304 Not
  Modified`` with the ``ETag`` and ``Docker-Content-Digest`` and no body;
- ``If-Range: "sha256:..."``: the ``Range`` is honoured only when the tag
  matches strongly (a weak tag or an HTTP date never matches, so the client
  gets the whole blob with ``200``, which is always correct).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["etag", "if_range_holds", "none_match"]


def etag(digest: str) -> str:
    """The strong entity tag for content with this digest."""
    return f'"{digest}"'


def _tags(values: Iterable[str]) -> list[str]:
    """Entity tags of one or more header values; quoted strings may not hold commas here."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def none_match(values: Iterable[str], tag: str) -> bool:
    """Whether ``If-None-Match`` (every value of the header) matches ``tag``: answer 304.

    Weak comparison: ``W/"x"`` matches ``"x"``; ``*`` matches anything that exists.
    """
    return any(item == "*" or item.removeprefix("W/") == tag for item in _tags(values))


def if_range_holds(value: str | None, tag: str) -> bool:
    """Whether the ``Range`` may be honoured under ``If-Range: value`` (absent: yes)."""
    if value is None:
        return True
    return value.strip() == tag

"""``GET /v2/<name>/tags/list`` with the spec's pagination (``n`` and ``last``).

Every image this registry builds is served under one tag, ``latest`` (any
other tag is accepted by the manifest endpoint, and what it means depends
on the package source, so it cannot be listed).  Pagination follows the
distribution spec:

- tags come in lexical order;
- ``last=T`` lists only tags after ``T``;
- ``n=N`` lists at most ``N`` tags (``n=0``: none), and when more remain
  the answer has ``Link: </v2/<name>/tags/list?n=N&last=T>; rel="next"``;
- ``n`` that is not a non-negative integer is ``400
  PAGINATION_NUMBER_INVALID``.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence

import attrs

__all__ = ["TagPage", "page", "parse_n"]


@attrs.frozen
class TagPage:
    """One page of tags and the ``Link`` header value for the next, if any."""

    tags: tuple[str, ...]
    next_link: str | None


def parse_n(raw: str | None) -> int | None:
    """``n`` as a count; ``None`` when absent; :class:`ValueError` when malformed."""
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit():
        raise ValueError(f"n={raw[:32]!r} is not a non-negative integer")
    return int(raw)


def page(name: str, tags: Sequence[str], *, n: int | None, last: str | None) -> TagPage:
    """The page of ``tags`` after ``last``, at most ``n`` long, with the next page's link."""
    ordered = sorted(tags)
    if last is not None:
        ordered = [tag for tag in ordered if tag > last]
    if n is None or n >= len(ordered):
        return TagPage(tuple(ordered), None)
    shown = tuple(ordered[:n])
    if not shown:
        return TagPage((), None)
    query = urllib.parse.urlencode({"n": n, "last": shown[-1]})
    return TagPage(shown, f'</v2/{name}/tags/list?{query}>; rel="next"')

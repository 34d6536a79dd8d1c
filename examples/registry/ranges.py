"""HTTP ``Range`` requests on blobs (RFC 9110 section 14): parse, decide, stream.

Registries answer ``GET /v2/<name>/blobs/<digest>`` with ``Range: bytes=...``
like any HTTP server: clients resume an interrupted pull from where it
stopped (``bytes=1048576-``), and podman's partial pulls fetch a layer's
table of contents (``bytes=-48``) and then many file chunks in one request
(``bytes=0-99,4096-8191,...``).  The rules, in order:

1. a ``Range`` header that is not ``bytes=`` followed by well-formed
   ``first-last``, ``first-`` or ``-suffix`` specs is ignored: the whole
   blob is sent with ``200`` (RFC 9110 says a server MAY ignore a Range it
   does not understand, and clients cope with ``200``);
2. specs entirely past the end are dropped; ``last`` past the end is
   clamped; a suffix longer than the blob means the whole blob;
3. nothing left: ``416 Range Not Satisfiable`` with ``Content-Range: bytes
   */SIZE``;
4. one range: ``206`` with ``Content-Range: bytes FIRST-LAST/SIZE``;
5. several: ``206`` with ``Content-Type: multipart/byteranges;
   boundary=...``, one part per range **in the order requested** (clients
   such as containers/image match parts to their requests by position), each
   part with the blob's ``Content-Type`` and its own ``Content-Range``;
6. a request with more than :data:`MAX_RANGES` ranges, or whose ranges add
   up to more than twice the blob (overlap abuse, RFC 9110 section 14.2),
   gets the whole blob with ``200``.

The multipart boundary is derived from the blob digest and the ranges, so
the same request gives byte-identical answers; it is 40 hex digits, which a
blob cannot collide with except by a sha256 collision in the attacker's
favour.  ``Accept-Ranges: bytes`` goes on every blob answer.

This module is pure: :func:`parse_range` and :func:`plan` decide, and
:func:`multipart_parts` / :func:`read_ranges` produce the bytes from any
seekable binary stream (or a re-opener for streams that are not seekable).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO, Final

import attrs

__all__ = [
    "MAX_RANGES",
    "ByteRange",
    "RangePlan",
    "multipart_length",
    "multipart_parts",
    "parse_range",
    "plan",
    "read_ranges",
]

#: Most ranges one request may ask for before it gets the whole blob instead.
MAX_RANGES: Final = 4096
_CHUNK: Final = 1 << 20


@attrs.frozen
class ByteRange:
    """Bytes ``first`` to ``last`` inclusive, both within the blob."""

    first: int
    last: int

    @property
    def length(self) -> int:
        """How many bytes the range holds."""
        return self.last - self.first + 1

    def content_range(self, size: int) -> str:
        """The ``Content-Range`` value for this range of a ``size``-byte blob."""
        return f"bytes {self.first}-{self.last}/{size}"


@attrs.frozen
class _Spec:
    """One ``first-last`` / ``first-`` / ``-suffix`` element before it meets a size."""

    first: int | None
    last: int | None

    def resolve(self, size: int) -> ByteRange | None:
        """The satisfiable part of this spec for a ``size``-byte blob, or ``None``."""
        if self.first is None:  # -suffix: the last N bytes (parse_range never gives "-")
            suffix = self.last or 0
            if suffix == 0 or size == 0:
                return None
            return ByteRange(max(size - suffix, 0), size - 1)
        if self.first >= size:
            return None
        last = size - 1 if self.last is None else min(self.last, size - 1)
        return ByteRange(self.first, last)


_SPEC = re.compile(r"[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*")


def _spec(item: str) -> _Spec | None:
    """One range spec, or ``None`` when it is malformed."""
    match = _SPEC.fullmatch(item)
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first = int(match.group(1)) if match.group(1) else None
    last = int(match.group(2)) if match.group(2) else None
    if first is not None and last is not None and last < first:
        return None
    return _Spec(first, last)


def parse_range(header: str | None) -> tuple[_Spec, ...] | None:
    """The specs of a ``Range`` header, or ``None`` when it is absent or malformed.

    Only the ``bytes`` unit is understood; ``first`` greater than ``last``
    makes the whole header malformed (RFC 9110: the header is then ignored).
    Empty list elements (``bytes=0-1, ,2-3``) are skipped, as lists allow.
    """
    if header is None:
        return None
    unit, sep, rest = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    specs = [_spec(item) for item in rest.split(",") if item.strip()]
    if not specs or None in specs:
        return None
    return tuple(spec for spec in specs if spec is not None)


@attrs.frozen
class RangePlan:
    """What to answer a blob request with.

    ``status`` is 200 (whole blob, ``ranges`` empty), 206 (``ranges`` holds
    one or more) or 416 (none satisfiable).
    """

    status: int
    ranges: tuple[ByteRange, ...] = ()

    @property
    def multipart(self) -> bool:
        """Whether the answer is ``multipart/byteranges``."""
        return self.status == 206 and len(self.ranges) > 1


def plan(header: str | None, size: int, *, max_ranges: int = MAX_RANGES) -> RangePlan:
    """The answer to ``Range: header`` on a ``size``-byte blob (see the module docs)."""
    specs = parse_range(header)
    if specs is None or len(specs) > max_ranges:
        return RangePlan(200)
    ranges = tuple(r for r in (spec.resolve(size) for spec in specs) if r is not None)
    if not ranges:
        return RangePlan(416)
    if sum(r.length for r in ranges) > 2 * size:
        return RangePlan(200)
    return RangePlan(206, ranges)


def boundary(digest: str, ranges: Sequence[ByteRange]) -> str:
    """A multipart boundary fixed by the blob and the ranges (same request, same bytes)."""
    text = digest + ";" + ",".join(f"{r.first}-{r.last}" for r in ranges)
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def _part_header(separator: str, media_type: str, byte_range: ByteRange, size: int) -> bytes:
    return (
        f"--{separator}\r\nContent-Type: {media_type}\r\n"
        f"Content-Range: {byte_range.content_range(size)}\r\n\r\n"
    ).encode()


def multipart_length(
    separator: str, media_type: str, ranges: Sequence[ByteRange], size: int
) -> int:
    """The exact ``Content-Length`` of :func:`multipart_parts`' output."""
    total = 0
    for index, byte_range in enumerate(ranges):
        total += (2 if index else 0) + len(_part_header(separator, media_type, byte_range, size))
        total += byte_range.length
    return total + len(f"\r\n--{separator}--\r\n")


def read_ranges(
    stream: BinaryIO, ranges: Sequence[ByteRange], reopen: Callable[[], BinaryIO] | None = None
) -> Iterator[tuple[ByteRange, Iterator[bytes]]]:
    """Each range with an iterator over its bytes, read from ``stream`` in order.

    A seekable stream is seeked; otherwise it is read forwards, and a range
    that starts before the current position needs ``reopen`` (a fresh
    stream from the start).  The caller closes ``stream``; streams made by
    ``reopen`` are closed here.  A blob shorter than a range raises
    :class:`EOFError` (the store changed under the answer).
    """
    current = stream
    position = 0
    # Wrappers (a verifying reader) may offer seek() without seekable().
    seekable = stream.seekable() if hasattr(stream, "seekable") else hasattr(stream, "seek")
    opened: list[BinaryIO] = []
    try:
        for byte_range in ranges:
            if seekable:
                current.seek(byte_range.first)
            else:
                if byte_range.first < position:
                    if reopen is None:
                        raise ValueError("ranges out of order need a seekable stream or reopen")
                    current = reopen()
                    opened.append(current)
                    position = 0
                _skip(current, byte_range.first - position)
            position = byte_range.last + 1
            yield byte_range, _read_exactly(current, byte_range.length)
    finally:
        for extra in opened:
            extra.close()


def _skip(stream: BinaryIO, count: int) -> None:
    for _ in _read_exactly(stream, count):
        pass


def _read_exactly(stream: BinaryIO, count: int) -> Iterator[bytes]:
    remaining = count
    while remaining > 0:
        chunk = stream.read(min(remaining, _CHUNK))
        if not chunk:
            raise EOFError(f"blob ended {remaining} bytes before the requested range did")
        remaining -= len(chunk)
        yield chunk


def multipart_parts(
    parts: Iterator[tuple[ByteRange, Iterator[bytes]]],
    separator: str,
    media_type: str,
    size: int,
) -> Iterator[bytes]:
    """The ``multipart/byteranges`` body over ``parts`` (from :func:`read_ranges`)."""
    first = True
    for byte_range, chunks in parts:
        yield (b"" if first else b"\r\n") + _part_header(separator, media_type, byte_range, size)
        first = False
        yield from chunks
    yield f"\r\n--{separator}--\r\n".encode()

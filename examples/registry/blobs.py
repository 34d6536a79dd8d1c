"""Blob answers: whole, one range, several ranges, not modified, or a redirect to storage.

``GET /v2/<name>/blobs/<digest>`` is decided here, from the request's
``Range``, ``If-Range`` and ``If-None-Match`` headers and the blob's size
(rules in :mod:`examples.registry.ranges` and
:mod:`examples.registry.conditional`):

- ``If-None-Match`` matching the digest: ``304``;
- ``HEAD``: ``200`` with the blob's ``Content-Length`` and ``Content-Type``
  (a ``Range`` on ``HEAD`` is ignored, as RFC 9110 says);
- no usable ``Range``: the whole blob (``200``);
- one range: ``206`` and ``Content-Range``;
- several: ``206`` ``multipart/byteranges``;
- none satisfiable: ``416 RANGE_INVALID`` with ``Content-Range: bytes */SIZE``.

With a storage redirect configured (``RegistryConfig.blob_url``: a GCS
signed URL), whole-blob and single-range requests get ``307`` to storage
(clients send their ``Range`` again to the new location, and GCS answers
a single range itself).  Object stores answer a multi-range request with
the whole object or just the first range, so those requests are served
here, from the store, rather than redirected.  Every answer carries
``Docker-Content-Digest``, ``ETag`` and ``Accept-Ranges: bytes``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import BinaryIO

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from examples.registry.conditional import etag, if_range_holds, none_match
from examples.registry.error_bodies import error_body
from examples.registry.ranges import (
    RangePlan,
    boundary,
    multipart_length,
    multipart_parts,
    plan,
    read_ranges,
)

__all__ = ["answer_blob"]

_CHUNK = 1 << 20


def _whole(stream: BinaryIO) -> Iterator[bytes]:
    with stream:
        while chunk := stream.read(_CHUNK):
            yield chunk


def _ranged(stream: BinaryIO, body: Callable[[BinaryIO], Iterator[bytes]]) -> Iterator[bytes]:
    with stream:
        yield from body(stream)


async def answer_blob(
    request: Request,
    *,
    digest: str,
    size: int,
    media_type: str,
    open_stream: Callable[[], BinaryIO],
    run_io: Callable[[Callable[[], BinaryIO]], Awaitable[BinaryIO]],
    redirect: Callable[[], Awaitable[str]] | None = None,
) -> Response:
    """The answer to ``request`` for the blob ``digest`` of ``size`` bytes.

    ``open_stream`` opens the blob (called through ``run_io``, off the event
    loop, only when bytes are sent here); ``redirect`` gives the storage URL
    when blobs are redirected.  Streams are closed when the body is done.
    """
    tag = etag(digest)
    headers = {"Docker-Content-Digest": digest, "ETag": tag, "Accept-Ranges": "bytes"}
    if none_match(request.headers.getlist("if-none-match"), tag):
        return Response(b"", status_code=304, headers=headers)
    if request.method == "HEAD":
        headers |= {"Content-Length": str(size), "Content-Type": media_type}
        return Response(b"", headers=headers)
    range_header = request.headers.get("range")
    if not if_range_holds(request.headers.get("if-range"), tag):
        range_header = None
    decision = plan(range_header, size)
    if decision.status == 416:
        body = error_body(
            "RANGE_INVALID",
            f"no requested range lies within the blob's {size} bytes",
            {"range": range_header, "size": size},
        )
        headers |= {"Content-Range": f"bytes */{size}", "Content-Type": "application/json"}
        return Response(body, status_code=416, headers=headers)
    if redirect is not None and not decision.multipart:
        headers["Location"] = await redirect()
        return Response(b"", status_code=307, headers=headers)
    stream = await run_io(open_stream)
    return _streamed(
        stream,
        decision,
        digest=digest,
        size=size,
        media_type=media_type,
        reopen=open_stream,
        headers=headers,
    )


def _streamed(
    stream: BinaryIO,
    decision: RangePlan,
    *,
    digest: str,
    size: int,
    media_type: str,
    reopen: Callable[[], BinaryIO],
    headers: dict[str, str],
) -> Response:
    """The 200 or 206 answer streaming ``stream`` (closed when the body ends)."""
    if decision.status == 200:
        headers |= {"Content-Length": str(size), "Content-Type": media_type}
        return StreamingResponse(_whole(stream), headers=headers)
    ranges = decision.ranges
    if not decision.multipart:
        (only,) = ranges
        headers |= {
            "Content-Length": str(only.length),
            "Content-Type": media_type,
            "Content-Range": only.content_range(size),
        }

        def single(s: BinaryIO) -> Iterator[bytes]:
            for _, chunks in read_ranges(s, ranges, reopen):
                yield from chunks

        return StreamingResponse(_ranged(stream, single), status_code=206, headers=headers)
    separator = boundary(digest, ranges)
    headers |= {
        "Content-Length": str(multipart_length(separator, media_type, ranges, size)),
        "Content-Type": f"multipart/byteranges; boundary={separator}",
    }

    def multipart(s: BinaryIO) -> Iterator[bytes]:
        return multipart_parts(read_ranges(s, ranges, reopen), separator, media_type, size)

    return StreamingResponse(_ranged(stream, multipart), status_code=206, headers=headers)

"""Range requests and conditional requests on the example registry (examples/registry/ranges.py).

The pure rules are tested directly, with properties; the wire format is
tested through a real uvicorn server, and multipart answers are read back by
an independent reader (the standard library's MIME parser).
"""

from __future__ import annotations

import email.parser
import email.policy
import functools
import http.client
import io
import json
import urllib.parse
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from servers import FakeGcsServer, fake_gcs

from examples.registry import RegistryConfig, create_app, serving
from examples.registry.conditional import etag, if_range_holds, none_match
from examples.registry.error_bodies import MAX_BODY, MAX_ITEMS, MAX_TEXT, error_body
from examples.registry.ranges import (
    MAX_RANGES,
    ByteRange,
    RangePlan,
    boundary,
    multipart_length,
    multipart_parts,
    parse_range,
    plan,
    read_ranges,
)
from nixery_core.cache import BuildCache
from nixery_core.digests import sha256_digest
from nixery_core.sources import LocalPathSource
from nixery_core.storage.gcs import GcsStore
from nixery_core.storage.serving import signed_url
from nixery_core.testing.runners import FakeNix, default_fake_packages
from nixery_core.testing.storage import MemoryStore

__all__ = ["fake_gcs"]  # the fixture, imported for pytest

BLOB = bytes(range(256)) * 40  # 10240 bytes, every offset distinguishable
MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


def parse_multipart(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(Content-Range, payload) of each part, read by the standard library's MIME parser."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    assert message.get_content_type() == "multipart/byteranges"
    parts = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        parts.append((str(part["Content-Range"]), payload))
    return parts


# --- the pure rules -------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-99", RangePlan(206, (ByteRange(0, 99),))),
        ("bytes=10240-", RangePlan(416)),
        ("bytes=10000-", RangePlan(206, (ByteRange(10000, 10239),))),
        ("bytes=-48", RangePlan(206, (ByteRange(10192, 10239),))),
        ("bytes=-99999", RangePlan(206, (ByteRange(0, 10239),))),
        ("bytes=-0", RangePlan(416)),
        ("bytes=9000-99999", RangePlan(206, (ByteRange(9000, 10239),))),
        ("BYTES = 1-2 , ,5-5", RangePlan(206, (ByteRange(1, 2), ByteRange(5, 5)))),
        ("bytes=5-9,0-1", RangePlan(206, (ByteRange(5, 9), ByteRange(0, 1)))),
        ("bytes=20000-30000,0-0", RangePlan(206, (ByteRange(0, 0),))),
        ("bytes=20000-30000,40000-", RangePlan(416)),
        # malformed: ignored, the whole blob
        ("bytes=5-1", RangePlan(200)),
        ("bytes=a-b", RangePlan(200)),
        ("bytes=-", RangePlan(200)),
        ("bytes=", RangePlan(200)),
        ("items=0-1", RangePlan(200)),
        ("0-1", RangePlan(200)),
        ("bytes=0-1;2-3", RangePlan(200)),
        ("bytes=\u0661-\u0662", RangePlan(200)),  # Arabic-Indic digits are not digits here
        (None, RangePlan(200)),
        # overlap abuse: more than twice the blob
        ("bytes=" + ",".join(["0-"] * 3), RangePlan(200)),
    ],
)
def test_range_plan(header: str | None, expected: RangePlan) -> None:
    """Each Range form gets the answer RFC 9110 prescribes for a 10240-byte blob."""
    assert plan(header, len(BLOB)) == expected


def test_too_many_ranges_get_the_whole_blob() -> None:
    """More than MAX_RANGES ranges in one request is answered with the whole blob."""
    many = "bytes=" + ",".join(f"{i}-{i}" for i in range(MAX_RANGES + 1))
    assert plan(many, MAX_RANGES + 10) == RangePlan(200)
    assert plan(many, MAX_RANGES + 10, max_ranges=MAX_RANGES + 1).status == 206


def test_empty_blob_has_no_satisfiable_range() -> None:
    """Every range of an empty blob is unsatisfiable (416), as RFC 9110 says."""
    assert plan("bytes=0-", 0) == RangePlan(416)
    assert plan("bytes=-5", 0) == RangePlan(416)


range_specs = st.lists(
    st.one_of(
        st.tuples(st.integers(0, 12000), st.integers(0, 500)).map(
            lambda t: f"{t[0]}-{t[0] + t[1]}"
        ),
        st.integers(0, 12000).map(lambda n: f"{n}-"),
        st.integers(1, 12000).map(lambda n: f"-{n}"),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(range_specs)
def test_multipart_body_reads_back_the_requested_bytes(specs: list[str]) -> None:
    """Any satisfiable multi-range request gives parts, in request order, holding exactly the
    requested bytes, with a Content-Length that matches the body."""
    header = "bytes=" + ",".join(specs)
    decision = plan(header, len(BLOB))
    if decision.status != 206:
        return
    digest = sha256_digest(BLOB)
    separator = boundary(digest, decision.ranges)
    body = b"".join(
        multipart_parts(read_ranges(io.BytesIO(BLOB), decision.ranges), separator, MEDIA_TYPE,
                        len(BLOB))
    )
    assert len(body) == multipart_length(separator, MEDIA_TYPE, decision.ranges, len(BLOB))
    parts = parse_multipart(f"multipart/byteranges; boundary={separator}", body)
    expected = [
        (f"bytes {r.first}-{r.last}/{len(BLOB)}", BLOB[r.first : r.last + 1])
        for r in decision.ranges
    ]
    assert parts == expected


def drain(parts: Iterator[tuple[ByteRange, Iterator[bytes]]]) -> None:
    """Read every part to its end."""
    for _, chunks in parts:
        b"".join(chunks)


class ForwardOnly(io.BytesIO):
    """A stream that cannot seek, as some object-store readers are."""

    def seekable(self) -> bool:
        return False


def test_ranges_from_a_stream_that_cannot_seek() -> None:
    """Out-of-order ranges on a forward-only stream reopen it; without a reopener they fail."""
    ranges = [ByteRange(100, 199), ByteRange(0, 9), ByteRange(150, 160)]
    opened: list[ForwardOnly] = []

    def reopen() -> ForwardOnly:
        opened.append(ForwardOnly(BLOB))
        return opened[-1]

    got = [b"".join(chunks) for _, chunks in read_ranges(ForwardOnly(BLOB), ranges, reopen)]
    assert got == [BLOB[100:200], BLOB[0:10], BLOB[150:161]]
    assert len(opened) == 1
    assert all(stream.closed for stream in opened)
    with pytest.raises(ValueError, match="seekable"):
        drain(read_ranges(ForwardOnly(BLOB), ranges))


def test_short_blob_raises_eof() -> None:
    """A blob shorter than its recorded size ends the body with an error, not silent padding."""
    with pytest.raises(EOFError):
        drain(read_ranges(io.BytesIO(BLOB[:50]), [ByteRange(0, 99)]))


def test_conditional_header_rules() -> None:
    """If-None-Match compares weakly and accepts lists and '*'; If-Range needs the strong tag."""
    tag = etag("sha256:" + "a" * 64)
    assert tag == '"sha256:' + "a" * 64 + '"'
    assert none_match([tag], tag)
    assert none_match(['"other", W/' + tag], tag)
    assert none_match(["*"], tag)
    assert not none_match(['"other"'], tag)
    assert not none_match([], tag)
    assert if_range_holds(None, tag)
    assert if_range_holds(tag, tag)
    assert not if_range_holds("W/" + tag, tag)
    assert not if_range_holds("Tue, 15 Nov 1994 08:12:31 GMT", tag)


def test_parse_range_rejects_what_it_cannot_read() -> None:
    """parse_range returns None for anything but well-formed byte ranges."""
    assert parse_range(None) is None
    assert parse_range("bytes=1-2,x") is None
    parsed = parse_range("bytes=1-2,-3,4-")
    assert parsed is not None
    assert len(parsed) == 3


# --- through a real server --------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["plain", "verifying"])
def blob_registry(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """A registry over an in-memory store holding BLOB, with and without verify_blobs."""
    store = MemoryStore()
    info = store.put_blob(BLOB, MEDIA_TYPE)
    root = tmp_path / "root"
    pkgs = tmp_path / "pkgs"  # apart from the fake store, whose writes would change its hash
    pkgs.mkdir()
    config = RegistryConfig(
        source=LocalPathSource(pkgs), store=store,
        runner=FakeNix(root, default_fake_packages()), store_root=root,
        verify_blobs=request.param,
    )
    with serving(create_app(config)) as base:
        yield f"{base}/v2/hello/blobs/{info.digest}", info.digest


def test_whole_blob_advertises_ranges(blob_registry: tuple[str, str]) -> None:
    """A plain GET and HEAD say Accept-Ranges: bytes and carry the ETag."""
    url, digest = blob_registry
    for response in (httpx.get(url), httpx.head(url)):
        assert response.status_code == 200
        assert response.headers["accept-ranges"] == "bytes"
        assert response.headers["etag"] == etag(digest)
        assert int(response.headers["content-length"]) == len(BLOB)
    assert httpx.get(url).content == BLOB


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [("bytes=0-99", 0, 99), ("bytes=10000-", 10000, 10239), ("bytes=-48", 10192, 10239)],
)
def test_single_range_is_206(
    blob_registry: tuple[str, str], header: str, first: int, last: int
) -> None:
    """One range is answered 206 with Content-Range and exactly those bytes (resume, footer)."""
    url, _ = blob_registry
    response = httpx.get(url, headers={"Range": header})
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes {first}-{last}/{len(BLOB)}"
    assert response.headers["content-type"] == MEDIA_TYPE
    assert response.content == BLOB[first : last + 1]
    assert int(response.headers["content-length"]) == last - first + 1


def test_multiple_ranges_are_multipart(blob_registry: tuple[str, str]) -> None:
    """Several ranges come back as multipart/byteranges, in request order, byte-identical twice."""
    url, _ = blob_registry
    header = {"Range": "bytes=5000-5099, 0-9, -16"}
    response = httpx.get(url, headers=header)
    assert response.status_code == 206
    content_type = response.headers["content-type"]
    assert content_type.startswith("multipart/byteranges; boundary=")
    assert int(response.headers["content-length"]) == len(response.content)
    assert parse_multipart(content_type, response.content) == [
        (f"bytes 5000-5099/{len(BLOB)}", BLOB[5000:5100]),
        (f"bytes 0-9/{len(BLOB)}", BLOB[0:10]),
        (f"bytes 10224-10239/{len(BLOB)}", BLOB[10224:]),
    ]
    assert httpx.get(url, headers=header).content == response.content


def test_unsatisfiable_range_is_416(blob_registry: tuple[str, str]) -> None:
    """A range past the end gets 416 with Content-Range: bytes */SIZE and a JSON error."""
    url, _ = blob_registry
    response = httpx.get(url, headers={"Range": f"bytes={len(BLOB)}-"})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{len(BLOB)}"
    assert response.json()["errors"][0]["code"] == "RANGE_INVALID"


def test_malformed_range_and_head_get_the_whole_blob(blob_registry: tuple[str, str]) -> None:
    """A Range that is not understood, or on HEAD, is ignored: 200 and the whole blob."""
    url, _ = blob_registry
    assert httpx.get(url, headers={"Range": "bytes=9-1"}).content == BLOB
    head = httpx.head(url, headers={"Range": "bytes=0-1"})
    assert (head.status_code, int(head.headers["content-length"])) == (200, len(BLOB))


def test_if_range_with_another_tag_gets_the_whole_blob(blob_registry: tuple[str, str]) -> None:
    """If-Range honours the Range only for the blob's own strong ETag."""
    url, digest = blob_registry
    same = httpx.get(url, headers={"Range": "bytes=0-9", "If-Range": etag(digest)})
    other = httpx.get(url, headers={"Range": "bytes=0-9", "If-Range": '"sha256:other"'})
    assert (same.status_code, same.content) == (206, BLOB[:10])
    assert (other.status_code, other.content) == (200, BLOB)


def test_if_none_match_on_blobs_and_manifests_is_304(blob_registry: tuple[str, str]) -> None:
    """A client holding the current ETag gets 304 with no body, for blobs and manifests."""
    url, digest = blob_registry
    cached = httpx.get(url, headers={"If-None-Match": etag(digest)})
    assert (cached.status_code, cached.content) == (304, b"")
    assert cached.headers["etag"] == etag(digest)
    assert httpx.get(url, headers={"If-None-Match": '"sha256:old"'}).status_code == 200
    manifest_url = url.split("/blobs/")[0] + "/manifests/latest"
    first = httpx.get(manifest_url)
    assert first.status_code == 200
    again = httpx.get(manifest_url, headers={"If-None-Match": first.headers["etag"]})
    assert (again.status_code, again.content) == (304, b"")
    assert again.headers["docker-content-digest"] == first.headers["docker-content-digest"]


# --- redirected blobs ---------------------------------------------------------------


def test_redirected_blobs_single_range_at_storage_multi_range_here(
    tmp_path: Path, fake_gcs: FakeGcsServer
) -> None:
    """With GCS redirects, one range is redirected (storage answers it), several are served here."""
    bucket = fake_gcs.make_bucket("registry-ranges")
    store = GcsStore(bucket)
    info = store.put_blob(BLOB, MEDIA_TYPE)
    root = tmp_path / "root"
    pkgs = tmp_path / "pkgs"  # apart from the fake store, whose writes would change its hash
    pkgs.mkdir()
    config = RegistryConfig(
        source=LocalPathSource(pkgs), store=store, cache=BuildCache(None),
        runner=FakeNix(root, default_fake_packages()), store_root=root,
        blob_url=functools.partial(signed_url, store, expiry=timedelta(minutes=5)),
    )
    with serving(create_app(config)) as base:
        url = f"{base}/v2/hello/blobs/{info.digest}"
        single: dict[str, Any] = {"Range": "bytes=100-199"}
        redirect = httpx.get(url, headers=single)
        assert redirect.status_code == 307
        assert redirect.headers["accept-ranges"] == "bytes"
        followed = httpx.get(url, headers=single, follow_redirects=True)
        assert (followed.status_code, followed.content) == (206, BLOB[100:200])
        multi = httpx.get(url, headers={"Range": "bytes=0-9,-10"})
        assert multi.status_code == 206
        assert parse_multipart(multi.headers["content-type"], multi.content) == [
            (f"bytes 0-9/{len(BLOB)}", BLOB[:10]),
            (f"bytes 10230-10239/{len(BLOB)}", BLOB[-10:]),
        ]
        assert httpx.get(url, headers={"Range": "bytes=99999-"}).status_code == 416


def test_a_thousand_ranges_in_one_request(blob_registry: tuple[str, str]) -> None:
    """A partial pull's request with 1000 ranges (a 20 KB header) gets every part, in order."""
    url, _ = blob_registry
    ranges = [(i * 10, i * 10 + 4) for i in range(1000)]
    header = "bytes=" + ",".join(f"{first:08d}-{last:08d}" for first, last in ranges)
    response = httpx.get(url, headers={"Range": header})
    assert response.status_code == 206
    parts = parse_multipart(response.headers["content-type"], response.content)
    assert [payload for _, payload in parts] == [BLOB[a : b + 1] for a, b in ranges]


def test_error_bodies_are_bounded(blob_registry: tuple[str, str]) -> None:
    """A 100 KB name comes back cut, in an error body of at most MAX_BODY bytes."""
    url, _ = blob_registry
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname or "", address.port, timeout=30)
    try:  # httpx refuses URLs over 64 KiB; a hostile client does not
        connection.request("GET", f"/v2/{'a' * 100_000}/manifests/{'B' * 1000}")
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    assert response.status == 400
    assert len(body) <= MAX_BODY
    error = json.loads(body)["errors"][0]
    assert error["code"] == "NAME_INVALID"
    assert len(error["message"]) < 2 * MAX_TEXT


def test_error_body_rules() -> None:
    """Strings and lists are cut with a count of what was left out; detail goes if still big."""
    body = json.loads(error_body("X", "m" * 5000, {"packages": ["p"] * 100}))
    error = body["errors"][0]
    assert error["message"] == "m" * MAX_TEXT + f"...[{5000 - MAX_TEXT} more]"
    assert error["detail"]["packages"][-1] == f"...[{100 - MAX_ITEMS} more]"
    assert len(error["detail"]["packages"]) == MAX_ITEMS + 1
    huge = {f"k{i}": "v" * MAX_TEXT for i in range(MAX_ITEMS)}
    assert "detail" not in json.loads(error_body("X", "m", huge))["errors"][0]

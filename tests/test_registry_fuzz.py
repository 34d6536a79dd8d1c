"""Fuzzing the example registry's routing: any path and method gets a registry answer.

Hypothesis makes request targets (arbitrary text, percent-encodings of any
byte, ``..``, ``//``, NUL, Unicode, huge names, the shared hostile corpus,
real names and stored digests) and methods, and sends them straight to the
ASGI app, the way uvicorn would: the raw target is ASCII, ``path`` is its
percent-decoding.  Calling the app directly (not through an HTTP client)
keeps every target byte for byte, where clients normalise ``..`` and
``//`` away.  Nix is :class:`~nixery_core.testing.runners.FakeNix` behind a
:class:`~nixery_core.testing.runners.RecordingRunner`, so nothing real is
built and every Nix call is seen; there is no build cache, so a request
calls Nix (or not) the same way whenever Hypothesis replays it.  The
registry is configured for amd64 and arm64, so index answers are fuzzed
too.

Every answer must be a success or a well-formed registry JSON error (never
a 5xx, never an exception out of the app), every answer carries the API
version header, and Nix is called only for a ``GET``/``HEAD`` of
``/v2/<name>/manifests/<tag>`` or ``/v2/<name>/tags/list`` whose name and
tag the library's parser accepts.  Once over a :class:`~nixery_core.testing.storage.MemoryStore`
(no filesystem at all) and once over a
:class:`~nixery_core.storage.filesystem.FilesystemStore` in a temporary
directory, whose surroundings are snapshotted: nothing is written outside
the store.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
from hostile_corpus import DIGESTS, PAYLOADS, TAGS, URL_PATHS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.types import Message

from examples.registry import RegistryConfig, create_app
from nixery_core.errors import InvalidImageName
from nixery_core.names import AMD64, ARM64, Image
from nixery_core.protocols import CollectableStore
from nixery_core.sources import LocalPathSource
from nixery_core.storage.filesystem import FilesystemStore
from nixery_core.testing.runners import FakeNix, RecordingRunner, default_fake_packages
from nixery_core.testing.storage import MemoryStore

#: Status codes each registry error code may come with (see examples/registry/app.py).
ERROR_STATUSES: dict[str, set[int]] = {
    "NAME_INVALID": {400},
    "DIGEST_INVALID": {400},
    "MANIFEST_UNKNOWN": {404},
    "NAME_UNKNOWN": {404},  # tags/list of a name whose packages do not exist
    "BLOB_UNKNOWN": {404},
    "UNSUPPORTED": {400, 404, 405},
}
#: The one route that may build: Starlette's pattern for it, on the decoded path.
BUILD_ROUTE = re.compile(r"/v2/(?P<name>.*)/manifests/(?P<reference>[^/]+)", re.DOTALL)
#: tags/list builds too: a name is listed only when its image builds.
TAGS_ROUTE = re.compile(r"/v2/(?P<name>.*)/tags/list", re.DOTALL)

# --- strategies ----------------------------------------------------------------------

HEX = "0123456789abcdef"
#: Any character a URL can carry: everything UTF-8 encodes (no lone surrogates).
UNICODE = st.characters(codec="utf-8")
KNOWN_NAMES = ["hello", "shell", "shell/hello", "arm64/hello", "busybox", "coreutils"]
WORDS = ["..", ".", "", "...", "v2", "manifests", "blobs", "tags", "list", "latest", *KNOWN_NAMES]

components = st.from_regex(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*", fullmatch=True)
tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", fullmatch=True)
huge = st.integers(min_value=200, max_value=20_000).map(lambda n: "a" * n)
escapes = st.binary(min_size=1, max_size=6).map(
    lambda data: "".join(f"%{byte:02x}" for byte in data)
)
pieces = st.one_of(
    components,
    st.tuples(components, tags).map(":".join),  # name:tag where only a name belongs
    st.sampled_from(WORDS),
    st.sampled_from([sample.value for sample in PAYLOADS]),
    st.text(UNICODE, max_size=12),  # any Unicode, NUL and controls included
    st.text(alphabet="a./%\x00:@\\ ", max_size=12),
    escapes,
    huge,
)
digests = st.one_of(
    st.text(alphabet=HEX, min_size=64, max_size=64).map("sha256:".__add__),
    st.sampled_from([sample.value for sample in DIGESTS]),
    st.text(UNICODE, max_size=80),
)
references = st.one_of(
    st.just("latest"),
    tags,
    st.sampled_from([sample.value for sample in TAGS]),
    digests,
    pieces,
)


@st.composite
def structured_paths(draw: st.DrawFn) -> list[str]:
    """``/v2/<name>/<kind>/<reference>`` out of hostile pieces; a list of path pieces."""
    name = draw(st.lists(pieces, max_size=6))
    kind = draw(st.sampled_from(["manifests", "blobs", "tags", "MANIFESTS", "", "x"]))
    reference = draw(st.sampled_from(["list"]) if kind == "tags" else references)
    tail = draw(st.sampled_from(["", "/", "//", "/.."]))
    return ["", "v2", *name, kind, reference + tail]


paths = st.one_of(
    structured_paths(),
    st.tuples(
        st.one_of(
            st.sampled_from(KNOWN_NAMES),
            st.tuples(st.sampled_from(KNOWN_NAMES), tags).map(":".join),
        ),
        st.sampled_from(["latest", "1.0", "Latest"]),
    ).map(lambda pair: ["", "v2", *pair[0].split("/"), "manifests", pair[1]]),
    st.text(UNICODE, max_size=80).map(lambda text: ["", *text.split("/")]),
    st.sampled_from([sample.value for sample in URL_PATHS]).map(lambda p: p.split("/")),
    st.sampled_from(["/", "/v2", "/v2/", "//v2/", "/v2//", "/v2/hello/tags/list"]).map(
        lambda p: p.split("/")
    ),
)


def _quote(piece: str, safe: str = "") -> str:
    # surrogatepass: a lone surrogate (in the corpus) goes out as its invalid UTF-8 bytes.
    return urllib.parse.quote(piece, safe=safe, errors="surrogatepass")


def encoders() -> st.SearchStrategy[Any]:
    """Ways to put one path piece into an ASCII request target."""
    return st.sampled_from([
        _quote,
        lambda piece: _quote(piece, safe="/:@.%"),
        lambda piece: _quote(_quote(piece)),
        lambda piece: "".join(f"%{b:02X}" for b in piece.encode("utf-8", "surrogatepass")),
        # as is, where HTTP allows it (printable ASCII; '%' stays literal)
        lambda piece: piece if piece.isascii() and piece.isprintable() and " " not in piece
        else _quote(piece),
    ])


#: Mostly reads (the routes that do work), then other methods and arbitrary tokens.
METHODS = st.one_of(
    st.just("GET"),
    st.just("HEAD"),
    st.sampled_from(["PUT", "POST", "DELETE", "PATCH", "OPTIONS", "TRACE", "get"]),
    st.from_regex(r"[A-Za-z][A-Za-z!#$&'*+.^_`|~-]{0,11}", fullmatch=True),
)
ACCEPTS = st.sampled_from([
    None,
    "*/*",
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "text/html;q=abc, ;;, */*;q=2",
])


@attrs.frozen
class Request:
    """One request as a server would hand it to the app."""

    method: str
    target: str  # ASCII: path, then ``?query`` when any
    accept: str | None
    body: bytes

    @property
    def raw_path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def path(self) -> str:
        """What uvicorn puts in ``scope["path"]``: the percent-decoded raw path."""
        return urllib.parse.unquote(self.raw_path)


@st.composite
def requests(draw: st.DrawFn, stored: list[str]) -> Request:
    """A request whose target is a fuzzed path, sometimes naming a stored digest.

    Every value is drawn whatever ``stored`` holds (which changes between
    examples), so Hypothesis sees the same draws when it replays one.
    """
    pick_stored = draw(st.booleans())
    kind = draw(st.sampled_from(["blobs", "manifests"]))
    name = draw(st.sampled_from(["hello", "shell/hello", "Hello", "..", "a//b"]))
    which = draw(st.integers(min_value=0, max_value=1 << 16))
    parts = draw(paths)
    if stored and pick_stored:
        parts = ["", "v2", *name.split("/"), kind, stored[which % len(stored)]]
    encode = draw(encoders())
    target = "/".join(encode(part) for part in parts) or "/"
    if not target.startswith("/"):
        target = "/" + target
    query = draw(st.one_of(st.just(""), st.text(UNICODE, max_size=20).map(urllib.parse.quote)))
    return Request(
        method=draw(METHODS),
        target=f"{target}?{query}" if query else target,
        accept=draw(ACCEPTS),
        body=draw(st.binary(max_size=32)),
    )


# --- the harness ---------------------------------------------------------------------


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@attrs.define
class Harness:
    """The app over fake Nix, one event loop for every request, the calls Nix saw."""

    app: Starlette
    store: CollectableStore
    nix: RecordingRunner
    loop: asyncio.Runner
    statuses: Counter[int] = attrs.Factory(Counter)

    @classmethod
    def create(cls, tmp_path: Path, store: CollectableStore) -> Harness:
        (tmp_path / "pkgs").mkdir()
        nix_root = tmp_path / "nix"
        nix = RecordingRunner(FakeNix(nix_root, default_fake_packages()))
        config = RegistryConfig(
            source=LocalPathSource(tmp_path / "pkgs"), store=store, cache=None,
            runner=nix, store_root=nix_root, archs=(AMD64, ARM64), build_workers=2,
        )
        return cls(create_app(config), store, nix, asyncio.Runner())

    def close(self) -> None:
        self.app.state.builder.shutdown()
        self.loop.close()

    def stored_digests(self) -> list[str]:
        return sorted(info.digest for info in self.store.list_blobs())

    def send(self, request: Request) -> Answer:
        return self.loop.run(self._send(request))

    async def _send(self, request: Request) -> Answer:
        raw_path, _, query = request.target.partition("?")
        headers = [(b"host", b"registry.test")]
        if request.accept is not None:
            headers.append((b"accept", request.accept.encode()))
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": request.method, "scheme": "http", "path": request.path,
            "raw_path": raw_path.encode("ascii"), "query_string": query.encode("ascii"),
            "root_path": "", "headers": headers, "server": ("registry.test", 80),
            "client": ("127.0.0.1", 40000),
        }
        bodies: list[Message] = [
            {"type": "http.request", "body": request.body, "more_body": False}
        ]
        sent: list[Message] = []

        async def receive() -> Message:
            if bodies:
                return bodies.pop()
            await asyncio.Event().wait()  # the client stays connected until the answer
            raise AssertionError("unreachable")  # pragma: no cover

        async def send(message: Message) -> None:
            sent.append(message)

        await self.app(scope, receive, send)  # an exception here fails the test
        start = next(m for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        decoded = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in start["headers"]}
        return Answer(start["status"], decoded, body)

    def check(self, request: Request) -> None:
        """Send ``request`` and hold its answer to the rules in the module docs."""
        calls = len(self.nix.calls)
        answer = self.send(request)
        self.statuses[answer.status] += 1
        assert answer.status < 500, (request, answer)
        assert answer.headers.get("docker-distribution-api-version") == "registry/2.0"
        if answer.status >= 400:
            check_error(request, answer)
        else:
            check_success(request, answer)
        if len(self.nix.calls) > calls:
            assert may_build(request), (request, self.nix.calls[calls:])


def check_error(request: Request, answer: Answer) -> None:
    """A registry JSON error: one entry, a known code, the status that code comes with."""
    assert answer.headers["content-type"] == "application/json", (request, answer)
    document = json.loads(answer.body)
    assert list(document) == ["errors"]
    (error,) = document["errors"]
    assert set(error) <= {"code", "message", "detail"}
    assert isinstance(error["message"], str)
    assert answer.status in ERROR_STATUSES[error["code"]], (request, answer)


def check_success(request: Request, answer: Answer) -> None:
    """A 200 to a read; after a GET its digest header, when any, is the body's digest.

    (A HEAD body is the server's to drop: uvicorn sends none whatever the app gives.)
    """
    assert answer.status == 200, (request, answer)
    assert request.method in ("GET", "HEAD"), (request, answer)
    digest = answer.headers.get("docker-content-digest")
    if request.method == "GET" and digest is not None:
        assert digest == "sha256:" + hashlib.sha256(answer.body).hexdigest()
        assert int(answer.headers["content-length"]) == len(answer.body)


def may_build(request: Request) -> bool:
    """Whether the request names an image by tag (or lists its tags) that the parser accepts."""
    route = BUILD_ROUTE.fullmatch(request.path)
    tags_route = TAGS_ROUTE.fullmatch(request.path)
    if request.method not in ("GET", "HEAD"):
        return False
    if route is not None:
        name, reference = route["name"], route["reference"]
    elif tags_route is not None:
        name, reference = tags_route["name"], "latest"
    else:
        return False
    if ":" in name or ":" in reference:
        return False
    try:
        Image.from_name(name, reference)
    except InvalidImageName:
        return False
    return True


def fuzz(harness: Harness, max_examples: int) -> None:
    """Run the property over ``max_examples`` requests against ``harness``."""

    @settings(
        max_examples=max_examples, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def property_(data: st.DataObject) -> None:
        harness.check(data.draw(requests(harness.stored_digests()), label="request"))

    property_()


def snapshot(root: Path, *, skip: tuple[Path, ...]) -> dict[str, bytes]:
    """Every file and directory under ``root`` outside ``skip``, with file contents."""
    out: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        if any(path == s or s in path.parents for s in skip):
            continue
        out[str(path.relative_to(root))] = path.read_bytes() if path.is_file() else b"<dir>"
    return out


def test_fuzz_routing_over_a_memory_store(tmp_path: Path) -> None:
    """200 fuzzed requests (no filesystem store): registry answers only, Nix only for valid tags."""
    harness = Harness.create(tmp_path, MemoryStore())
    try:
        fuzz(harness, max_examples=200)
        statuses = harness.statuses
    finally:
        harness.close()
    # The property held over both kinds of answer, and over builds.
    assert statuses[200] > 0
    assert sum(count for status, count in statuses.items() if status >= 400) > 0
    assert len(harness.nix.calls) > 0


def test_fuzz_routing_writes_only_inside_a_filesystem_store(tmp_path: Path) -> None:
    """100 fuzzed requests over a FilesystemStore: nothing appears or changes outside it."""
    store_root = tmp_path / "jail" / "store"
    harness = Harness.create(tmp_path, FilesystemStore(store_root, durable=False))
    skip = (store_root, tmp_path / "nix")  # the store, and what fake Nix realises
    before = snapshot(tmp_path, skip=skip)
    try:
        # One build for certain, so the store is written whatever the fuzzer draws.
        harness.check(Request("GET", "/v2/hello/manifests/latest", None, b""))
        assert harness.stored_digests()  # the store was written to, inside its root
        fuzz(harness, max_examples=100)
    finally:
        harness.close()
    assert snapshot(tmp_path, skip=skip) == before

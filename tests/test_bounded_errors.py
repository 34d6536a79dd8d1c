"""Errors stay readable and bounded whatever the input.

A 10 MB image name gives a message of a few hundred characters and a small
registry error body; a package-set attribute that aborts or recurses when
forced (which ``builtins.tryEval`` cannot catch) is an unknown package, as a
throwing alias is, not a ``NixBuildFailed`` quoting the set's source lines.
Real Nix evaluates the offline set's hostile attributes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from typing import Any

import pytest
from conftest import OFFLINE_SET

from examples.registry import RegistryConfig, create_app
from nixery_core.errors import (
    MESSAGE_LIMIT,
    BlobNotFound,
    InvalidDigest,
    InvalidImageConfig,
    InvalidImageName,
    InvalidInput,
    NixBuildFailed,
    UnknownPackages,
)
from nixery_core.names import Image
from nixery_core.nix import realise
from nixery_core.runner import SubprocessRunner
from nixery_core.sources import LocalPathSource
from nixery_core.testing.runners import RecordingRunner
from nixery_core.testing.storage import MemoryStore

HUGE = 10_000_000


@pytest.mark.parametrize(
    "name",
    [
        "a" * HUGE,
        "shell/" + "x" * HUGE,
        "shell/hello:" + "t" * HUGE,
        "/" * HUGE,
        "Shell/" + "é" * HUGE,
    ],
    ids=["one-part", "long-package", "long-tag", "slashes", "unicode"],
)
def test_huge_image_name_gives_a_small_message(name: str) -> None:
    """A 10 MB name is an InvalidImageName whose message quotes a bounded prefix and the length."""
    with pytest.raises(InvalidImageName) as caught:
        Image.from_name(name)
    message = str(caught.value)
    assert len(message) < 600
    assert "characters" in message or len(name) < 1000
    assert caught.value.name in name  # the attribute keeps what it names whole


def test_every_message_is_capped() -> None:
    """Each error that quotes input quotes a prefix, and no message exceeds MESSAGE_LIMIT."""
    huge = "z" * HUGE
    errors = [
        InvalidDigest(huge),
        InvalidImageConfig("env", huge, "is too long"),
        InvalidImageConfig("env", [huge] * 1000, "is too long"),
        UnknownPackages([f"p{i}-{huge[:1000]}" for i in range(500)]),
        BlobNotFound(huge),
        InvalidInput(f"anything quoting {huge}"),
    ]
    for error in errors:
        assert len(str(error)) <= MESSAGE_LIMIT + 100, type(error).__name__
    assert str(UnknownPackages([f"p{i:03}" for i in range(500)])).endswith("p019 and 480 more")


def test_registry_error_body_for_a_huge_name_is_small() -> None:
    """The example registry answers a 10 MB name with a small NAME_INVALID body."""
    config = RegistryConfig(source=LocalPathSource(OFFLINE_SET), store=MemoryStore())
    app = create_app(config)
    path = f"/v2/{'a' * HUGE}/manifests/latest"
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"host", b"registry")], "server": ("registry", 80),
        "client": ("127.0.0.1", 40000),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert status == 400
    assert len(body) < 10_000
    assert json.loads(body)["errors"][0]["code"] == "NAME_INVALID"


@pytest.mark.usefixtures("nix")
@pytest.mark.parametrize("hostile", ["aborting-alias", "recursive-alias", "overflowing-alias"])
def test_attribute_that_aborts_or_recurses_is_unknown(hostile: str) -> None:
    """An attribute failing uncatchably when forced is UnknownPackages with the other misses."""
    spec = LocalPathSource(OFFLINE_SET).resolve("latest")
    recorder = RecordingRunner(SubprocessRunner())
    image = Image.from_packages(["hello", hostile, "nosuchpkg", "removed-alias"], always_added=())
    with pytest.raises(UnknownPackages) as caught:
        realise(image, spec, runner=recorder)
    assert caught.value.packages == tuple(sorted([hostile, "nosuchpkg", "removed-alias"]))
    assert "default.nix" not in str(caught.value)
    assert isinstance(caught.value.__cause__, NixBuildFailed)
    # One resolve, then one probe of the set and one per name; nothing realised.
    assert len(recorder.calls) == 1 + 1 + 4
    assert not any(call.argv[0] == "nix-store" for call in recorder.calls)


@pytest.mark.usefixtures("nix")
def test_a_broken_derivation_is_still_a_build_failure() -> None:
    """A found package whose derivation throws stays NixBuildFailed (it is not a name problem)."""
    spec = LocalPathSource(OFFLINE_SET).resolve("latest")
    with pytest.raises(NixBuildFailed):
        realise(Image.from_packages(["broken-eval"], always_added=()), spec,
                runner=SubprocessRunner())

"""tags/list pagination, NAME_UNKNOWN, and build failures of the example registry.

(examples/registry/tags.py and examples/registry/failures.py, through a real
uvicorn server over fake Nix.)
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from examples.registry import RegistryConfig, create_app, serving
from examples.registry.failures import FailureLog, failure_id
from examples.registry.tags import TagPage, page, parse_n
from nixery_core.cache import BuildCache
from nixery_core.errors import NixBuildFailed
from nixery_core.names import Image
from nixery_core.protocols import LogCallback, RunResult
from nixery_core.recent_errors import RecentErrors
from nixery_core.sources import LocalPathSource
from nixery_core.testing.runners import FakeFault, FakeNix, default_fake_packages
from nixery_core.testing.storage import MemoryStore

#: A build log line that must never reach a client.
BUILD_LOG = "building '/nix/store/private-path.drv': internal detail"


def registry_config(tmp_path: Path, runner: Any = None, **fake_args: Any) -> RegistryConfig:
    """A registry config over fake Nix (or ``runner``) and an in-memory store."""
    root = tmp_path / "root"
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir(exist_ok=True)
    fake = FakeNix(root, default_fake_packages(), **fake_args)
    return RegistryConfig(
        source=LocalPathSource(pkgs), store=MemoryStore(), cache=BuildCache(None),
        runner=runner if runner is not None else fake, store_root=root,
    )


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """A registry over fake Nix; yields its base URL."""
    with serving(create_app(registry_config(tmp_path))) as base:
        yield base


# --- tags/list --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "tags", "link"),
    [
        ("", ["latest"], None),
        ("?n=1", ["latest"], None),
        ("?n=0", [], None),
        ("?last=latest", [], None),
        ("?last=a", ["latest"], None),
        ("?n=5&last=zzz", [], None),
    ],
)
def test_tags_list_pagination(
    registry: str, query: str, tags: list[str], link: str | None
) -> None:
    """n and last page the (one-tag) list as the spec says; a pager using last stops."""
    response = httpx.get(f"{registry}/v2/shell/hello/tags/list{query}")
    assert response.status_code == 200
    assert response.json() == {"name": "shell/hello", "tags": tags}
    assert response.headers.get("link") == link


def test_tags_list_bad_n(registry: str) -> None:
    """An n that is not a non-negative integer is 400 PAGINATION_NUMBER_INVALID."""
    for bad in ("-1", "x", "1.5", "\u0661"):
        response = httpx.get(f"{registry}/v2/hello/tags/list", params={"n": bad})
        assert response.status_code == 400
        assert response.json()["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID"


def test_tag_pages_link_to_the_next() -> None:
    """Over several tags, n pages them in lexical order with a Link to the next page."""
    tags = ["v2", "latest", "v1", "a"]
    assert page("x/y", tags, n=2, last=None) == TagPage(
        ("a", "latest"), '</v2/x/y/tags/list?n=2&last=latest>; rel="next"'
    )
    assert page("x/y", tags, n=2, last="latest") == TagPage(("v1", "v2"), None)
    assert page("x/y", tags, n=0, last=None) == TagPage((), None)
    assert parse_n(None) is None
    assert parse_n("10") == 10


def test_tags_list_of_unknown_packages_is_name_unknown(registry: str) -> None:
    """A name whose packages do not exist is NAME_UNKNOWN naming them, not a list with latest."""
    response = httpx.get(f"{registry}/v2/shell/nosuchpkg/hello/tags/list")
    assert response.status_code == 404
    error = response.json()["errors"][0]
    assert error["code"] == "NAME_UNKNOWN"
    assert error["detail"]["packages"] == ["nosuchpkg"]


# --- failures ----------------------------------------------------------------------


class HeldFailure:
    """A runner whose realise waits until released, then fails with a log on stderr."""

    def __init__(self, inner: FakeNix) -> None:
        self.inner = inner
        self.release = threading.Event()
        self.realises = 0

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        on_log_line: LogCallback | None = None,
    ) -> RunResult:
        if argv and argv[0] == "nix-store" and "--realise" in argv:
            self.realises += 1
            self.release.wait(30)
            return RunResult(tuple(argv), 1, b"", f"error: {BUILD_LOG}\n".encode())
        return self.inner.run(argv, timeout=timeout, env=env, on_log_line=on_log_line)


def test_one_failure_record_per_build_and_no_log_to_clients(tmp_path: Path) -> None:
    """21 clients waiting on one failing build: one record, one id for all, no log in answers."""
    held = HeldFailure(FakeNix(tmp_path / "root", default_fake_packages()))
    config = registry_config(tmp_path, runner=held)
    app = create_app(config)

    async def pull_all(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            pending = [
                asyncio.ensure_future(client.get("/v2/shell/hello/manifests/latest"))
                for _ in range(21)
            ]
            await asyncio.sleep(0.5)  # every request is waiting on the one build
            held.release.set()
            return list(await asyncio.gather(*pending))

    with serving(app) as base:
        responses = asyncio.run(pull_all(base))
        start_page = httpx.get(f"{base}/").text
    assert held.realises == 1
    assert [r.status_code for r in responses] == [500] * 21
    ids = {r.json()["errors"][0]["detail"]["failure"] for r in responses}
    assert len(ids) == 1
    assert len(app.state.recent_errors) == 1
    for response in responses:
        assert BUILD_LOG not in response.text
        assert "private-path" not in response.text
    (the_id,) = ids
    assert f"failure {the_id}:" in start_page
    assert BUILD_LOG in start_page  # the operator sees the log


def test_failure_log_records_each_exception_once() -> None:
    """The same exception object is one record; another exception is another record."""
    clock = iter(range(100))
    recent = RecentErrors(capacity=3, clock=lambda: float(next(clock)))
    failures = FailureLog(recent)
    image = Image.from_name("hello")
    first = NixBuildFailed(["nix-store"], 1, "log")
    assert failures.record(image, first) == failures.record(image, first)
    second = NixBuildFailed(["nix-store"], 1, "log")
    assert failures.record(image, second).failure_id != failures.record(image, first).failure_id
    assert len(recent) == 2
    assert failures.record(image, first).failure_id == failure_id(recent.snapshot()[1])


def test_unknown_packages_failure_keeps_the_names(tmp_path: Path) -> None:
    """Unknown packages still reach the client by name (and are recorded once)."""
    config = registry_config(tmp_path)
    app = create_app(config)
    with serving(app) as base:
        response = httpx.get(f"{base}/v2/hello/zzmissing/manifests/latest")
    assert response.json()["errors"][0]["detail"] == {"packages": ["zzmissing"]}
    assert len(app.state.recent_errors) == 1


def test_timeout_answer_names_the_failure(tmp_path: Path) -> None:
    """A Nix timeout answers 504 with the failure id and without Nix's output."""
    config = registry_config(tmp_path, fail_with={"realise": FakeFault("hang")})
    started = time.monotonic()
    with serving(create_app(config)) as base:
        response = httpx.get(f"{base}/v2/hello/manifests/latest")
    assert time.monotonic() - started < 30
    assert response.status_code == 504
    error = response.json()["errors"][0]
    assert error["detail"]["error"] == "NixTimeout"
    assert error["detail"]["failure"] in error["message"]

"""The example registry (examples/registry): HTTP behaviour, real clients, load.

Three groups:

* fake Nix and an in-memory store behind a real uvicorn server (fast):
  headers, ``Accept`` negotiation, errors, path tricks, shared builds;
* the registry started with its one command (``python -m examples.registry``)
  over the offline Nix package set, driven by real ``skopeo``, ``umoci`` and
  a chroot, and by HTTP requests shaped like Docker's and containerd's;
* load: 50 concurrent manifest requests over 5 images against real Nix,
  counting Nix calls with a recording runner;
* blob redirects to a fake-gcs-server bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
from conftest import OFFLINE_SET, REPO, require_tools, threads_started
from hostile_corpus import URL_PATHS, Sample, ids
from servers import FakeGcsServer, fake_gcs

from examples.registry import RegistryConfig, create_app, serving
from examples.registry.builds import docker_manifest
from examples.registry.config import parse_archs
from examples.registry.negotiation import (
    choose_format,
    index_preferences,
    parse_accept,
    preferences,
)
from examples.registry.server import main
from nixery_core.archive import ArchiveOptions
from nixery_core.build import build_image
from nixery_core.cache import BuildCache
from nixery_core.digests import sha256_digest
from nixery_core.errors import InvalidInput, InvalidSource
from nixery_core.fragment_bucket import FragmentBucketPolicy
from nixery_core.gc import collect_garbage
from nixery_core.media_types import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
)
from nixery_core.names import AMD64, ARM64, Image
from nixery_core.nix import ResolveCall, parse_argv
from nixery_core.protocols import LogCallback, RunResult
from nixery_core.runner import SubprocessRunner
from nixery_core.sources import LocalPathSource
from nixery_core.storage.filesystem import FilesystemStore
from nixery_core.storage.gcs import GcsStore
from nixery_core.storage.serving import signed_url
from nixery_core.testing.runners import FakeFault, FakeNix, RecordingRunner, default_fake_packages
from nixery_core.testing.storage import MemoryStore

__all__ = ["fake_gcs"]  # the fixture, imported for pytest

#: What ``docker pull`` sends (several Accept headers, Docker schema 2 first).
DOCKER_ACCEPT = [
    ("Accept", DOCKER_MANIFEST),
    ("Accept", "application/vnd.docker.distribution.manifest.list.v2+json"),
    ("Accept", "application/vnd.oci.image.index.v1+json"),
    ("Accept", OCI_MANIFEST),
    ("Accept", "application/vnd.docker.distribution.manifest.v1+prettyjws"),
]
#: What containerd sends (one header, a wildcard last).
CONTAINERD_ACCEPT = [
    (
        "Accept",
        f"{DOCKER_MANIFEST}, application/vnd.docker.distribution.manifest.list.v2+json, "
        f"{OCI_MANIFEST}, application/vnd.oci.image.index.v1+json, */*",
    )
]
#: What skopeo and podman send: OCI first.
SKOPEO_ACCEPT = [("Accept", f"{OCI_MANIFEST}, {DOCKER_MANIFEST}")]
#: What skopeo 1.9 really sends (captured): one header each, both index types last.
SKOPEO_INDEX_ACCEPT = [
    ("Accept", OCI_MANIFEST),
    ("Accept", DOCKER_MANIFEST),
    ("Accept", "application/vnd.docker.distribution.manifest.v1+prettyjws"),
    ("Accept", "application/vnd.docker.distribution.manifest.v1+json"),
    ("Accept", DOCKER_MANIFEST_LIST),
    ("Accept", OCI_INDEX),
]


def check_manifest_headers(response: httpx.Response) -> dict[str, Any]:
    """Assert the wire headers agree with the body; return the parsed manifest."""
    body = response.content
    document: dict[str, Any] = json.loads(body)
    assert response.headers["content-type"] == document["mediaType"]
    assert int(response.headers["content-length"]) == len(body)
    assert response.headers["docker-content-digest"] == sha256_digest(body)
    assert response.headers["docker-distribution-api-version"] == "registry/2.0"
    return document


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The single error of a registry error answer."""
    assert response.headers["content-type"] == "application/json"
    errors = response.json()["errors"]
    assert len(errors) == 1
    error: dict[str, Any] = errors[0]
    return error


def raw_get(base: str, path: str, method: str = "GET") -> tuple[int, dict[str, Any]]:
    """Send ``path`` byte for byte (no client-side normalisation of ``..`` or ``%2F``)."""
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    return response.status, json.loads(body) if body else {}


# --- a registry over fake Nix and an in-memory store ---------------------------


class SlowFirstCall:
    """A runner that holds its first call for a moment, so concurrent requests overlap."""

    def __init__(self, inner: FakeNix, hold: float) -> None:
        self.inner = inner
        self.hold = hold
        self._first = threading.Lock()

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        on_log_line: LogCallback | None = None,
    ) -> RunResult:
        if self._first.acquire(blocking=False):
            time.sleep(self.hold)
        return self.inner.run(argv, timeout=timeout, env=env, on_log_line=on_log_line)


def package_set(tmp_path: Path) -> LocalPathSource:
    """A package-set directory apart from the fake store (whose writes would change its hash)."""
    path = tmp_path / "pkgs"
    path.mkdir(exist_ok=True)
    return LocalPathSource(path)


def fake_config(
    tmp_path: Path, *, cache: BuildCache | None = None, runner: Any = None,
    faults: Mapping[Any, FakeFault] | None = None,
) -> tuple[RegistryConfig, FakeNix]:
    root = tmp_path / "root"
    fake = FakeNix(root, default_fake_packages(), fail_with=dict(faults or {}))
    config = RegistryConfig(
        source=package_set(tmp_path),
        store=MemoryStore(),
        cache=cache,
        runner=runner if runner is not None else fake,
        store_root=root,
    )
    return config, fake


@pytest.fixture
def fake_registry(tmp_path: Path) -> Iterator[tuple[str, RegistryConfig, FakeNix]]:
    config, fake = fake_config(tmp_path, cache=BuildCache(None))
    with serving(create_app(config)) as base:
        yield base, config, fake


def test_api_root_answers_200(fake_registry: tuple[str, RegistryConfig, FakeNix]) -> None:
    """GET and HEAD /v2/ answer 200 with the API version header."""
    base, _, _ = fake_registry
    for method in ("GET", "HEAD"):
        response = httpx.request(method, f"{base}/v2/")
        assert response.status_code == 200
        assert response.headers["docker-distribution-api-version"] == "registry/2.0"
    assert httpx.get(f"{base}/v2/").json() == {}


@pytest.mark.parametrize(
    ("accept", "media_type"),
    [
        (DOCKER_ACCEPT, OCI_MANIFEST),
        (CONTAINERD_ACCEPT, OCI_MANIFEST),
        (SKOPEO_ACCEPT, OCI_MANIFEST),
        ([("Accept", f"{OCI_MANIFEST};q=0.5, {DOCKER_MANIFEST};q=0.9")], DOCKER_MANIFEST),
        ([("Accept", DOCKER_MANIFEST)], DOCKER_MANIFEST),
        ([("Accept", "*/*")], OCI_MANIFEST),
        ([], OCI_MANIFEST),
    ],
    ids=["docker", "containerd", "skopeo", "quality", "docker-only", "wildcard", "no-accept"],
)
def test_manifest_form_follows_accept(
    fake_registry: tuple[str, RegistryConfig, FakeNix],
    accept: list[tuple[str, str]],
    media_type: str,
) -> None:
    """The manifest form is the best the client accepts, ties going to the server (OCI)."""
    base, _, _ = fake_registry
    response = httpx.get(f"{base}/v2/shell/hello/manifests/latest", headers=accept)
    assert response.status_code == 200, response.text
    assert check_manifest_headers(response)["mediaType"] == media_type


def test_both_forms_share_config_and_layers(
    fake_registry: tuple[str, RegistryConfig, FakeNix],
) -> None:
    """The OCI and Docker manifests of one image name the same blobs, from one Nix build."""
    base, _, fake = fake_registry
    url = f"{base}/v2/shell/hello/manifests/latest"
    oci = check_manifest_headers(httpx.get(url, headers=SKOPEO_ACCEPT))
    docker = check_manifest_headers(httpx.get(url, headers=DOCKER_ACCEPT))
    assert oci["config"]["digest"] == docker["config"]["digest"]
    assert [d["digest"] for d in oci["layers"]] == [d["digest"] for d in docker["layers"]]
    assert fake.count("realise") == 1


def test_gc_keeps_both_manifest_forms(
    fake_registry: tuple[str, RegistryConfig, FakeNix],
) -> None:
    """After gc deletes every old blob nothing names, the Docker manifest a client got is
    still served by digest: an entry names it, as the OCI one is named."""
    base, config, _ = fake_registry
    url = f"{base}/v2/shell/hello/manifests/latest"
    docker = httpx.get(url, headers=[("Accept", DOCKER_MANIFEST)])
    oci = httpx.get(url, headers=[("Accept", OCI_MANIFEST)])
    assert docker.headers["content-type"] == DOCKER_MANIFEST
    assert oci.headers["content-type"] == OCI_MANIFEST
    later = time.time() + 3 * 86400
    report = collect_garbage(config.store, now=lambda: later)  # type: ignore[arg-type]
    assert report.kept_named >= 4  # both manifests, the config, the layers
    for response in (docker, oci):
        digest = response.headers["docker-content-digest"]
        assert config.store.blob_info(digest) is not None, digest
        again = httpx.get(f"{base}/v2/shell/hello/manifests/{digest}",
                          headers=DOCKER_ACCEPT + SKOPEO_ACCEPT)
        assert again.status_code == 200, (digest, again.text)
        assert again.content == response.content


def test_only_unservable_forms_accepted_is_manifest_unknown(
    fake_registry: tuple[str, RegistryConfig, FakeNix],
) -> None:
    """A client accepting only schema 1 gets MANIFEST_UNKNOWN naming the forms served."""
    base, _, fake = fake_registry
    response = httpx.get(
        f"{base}/v2/hello/manifests/latest",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v1+prettyjws"},
    )
    assert response.status_code == 404
    error = error_of(response)
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert OCI_MANIFEST in error["message"]
    assert fake.count("resolve") == 0


def test_head_by_tag_then_get_by_digest(
    fake_registry: tuple[str, RegistryConfig, FakeNix],
) -> None:
    """HEAD by tag gives the digest and no body; GET by that digest gives the same manifest."""
    base, _, _ = fake_registry
    for accept in (DOCKER_ACCEPT, SKOPEO_ACCEPT):
        head = httpx.head(f"{base}/v2/shell/hello/manifests/latest", headers=accept)
        assert head.status_code == 200
        assert head.content == b""
        digest = head.headers["docker-content-digest"]
        by_digest = httpx.get(f"{base}/v2/shell/hello/manifests/{digest}", headers=accept)
        assert by_digest.status_code == 200
        check_manifest_headers(by_digest)
        assert by_digest.headers["docker-content-digest"] == digest
        assert by_digest.headers["content-type"] == head.headers["content-type"]
        assert by_digest.headers["content-length"] == head.headers["content-length"]


def test_blobs_stream_with_headers(fake_registry: tuple[str, RegistryConfig, FakeNix]) -> None:
    """Every blob a manifest names is served whole, with its digest, size and type."""
    base, _, _ = fake_registry
    manifest = httpx.get(f"{base}/v2/shell/hello/manifests/latest", headers=SKOPEO_ACCEPT).json()
    for descriptor in [manifest["config"], *manifest["layers"]]:
        url = f"{base}/v2/shell/hello/blobs/{descriptor['digest']}"
        response = httpx.get(url)
        assert response.status_code == 200
        assert sha256_digest(response.content) == descriptor["digest"]
        assert int(response.headers["content-length"]) == descriptor["size"]
        assert response.headers["docker-content-digest"] == descriptor["digest"]
        assert response.headers["content-type"] == descriptor["mediaType"]
        head = httpx.head(url)
        assert head.status_code == 200
        assert head.content == b""
        assert int(head.headers["content-length"]) == descriptor["size"]


def test_missing_blob_and_bad_digests(
    fake_registry: tuple[str, RegistryConfig, FakeNix],
) -> None:
    """An absent blob is BLOB_UNKNOWN; malformed digests are DIGEST_INVALID."""
    base, _, _ = fake_registry
    absent = sha256_digest(b"never stored")
    response = httpx.get(f"{base}/v2/hello/blobs/{absent}")
    assert response.status_code == 404
    assert error_of(response)["code"] == "BLOB_UNKNOWN"
    for digest in ("sha256:" + "A" * 64, "md5:" + "0" * 32, "sha256:abc", "latest:1"):
        for kind in ("blobs", "manifests"):
            response = httpx.get(f"{base}/v2/hello/{kind}/{digest}")
            assert response.status_code == 400, (kind, digest)
            assert error_of(response)["code"] == "DIGEST_INVALID"


def test_layer_digest_is_not_a_manifest(
    fake_registry: tuple[str, RegistryConfig, FakeNix],
) -> None:
    """A layer's digest fetched as a manifest is MANIFEST_UNKNOWN, not the layer bytes."""
    base, _, _ = fake_registry
    manifest = httpx.get(f"{base}/v2/hello/manifests/latest").json()
    layer = manifest["layers"][0]["digest"]
    response = httpx.get(f"{base}/v2/hello/manifests/{layer}")
    assert response.status_code == 404
    assert error_of(response)["code"] == "MANIFEST_UNKNOWN"


def test_unknown_packages_are_named(fake_registry: tuple[str, RegistryConfig, FakeNix]) -> None:
    """Unknown packages give MANIFEST_UNKNOWN naming every one, and show on the index page."""
    base, _, _ = fake_registry
    response = httpx.get(f"{base}/v2/shell/nosuchpkg/hello/zzmissing/manifests/latest")
    assert response.status_code == 404
    error = error_of(response)
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert error["detail"] == {"packages": ["nosuchpkg", "zzmissing"]}
    assert "nosuchpkg" in error["message"]
    assert "zzmissing" in error["message"]
    assert "nosuchpkg" in httpx.get(f"{base}/").text


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/..%2F..%2Fetc/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/../../etc/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/%2E%2E/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/shell//hello/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/Shell/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/hello/manifests/..", 400, "NAME_INVALID"),
        ("/v2/hello%00/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/hello:1.0/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/hello:1.0/blobs/sha256:" + "0" * 64, 400, "NAME_INVALID"),
        ("/v2/hello/blobs/sha256:%2E%2E", 400, "DIGEST_INVALID"),
        ("/v2/hello/blobs/sha256:" + "0" * 64 + "%00", 400, "DIGEST_INVALID"),
        # a slash inside a digest or tag: the path no longer fits the API
        ("/v2/hello/blobs/sha256:..%2F..%2F..%2Fetc%2Fpasswd", 404, "UNSUPPORTED"),
        ("/v2/hello/manifests/sha256:" + "0" * 63 + "%2F", 404, "UNSUPPORTED"),
    ],
)
def test_path_tricks_are_rejected(
    fake_registry: tuple[str, RegistryConfig, FakeNix], path: str, status: int, code: str
) -> None:
    """Encoded dots, slashes and NULs in names, tags or digests never reach the store."""
    base, config, fake = fake_registry
    answer, body = raw_get(base, path)
    assert (answer, body["errors"][0]["code"]) == (status, code)
    assert fake.count("resolve") == 0
    assert isinstance(config.store, MemoryStore)
    assert list(config.store.list_blobs()) == []


@pytest.mark.parametrize("sample", URL_PATHS, ids=ids(URL_PATHS))
def test_hostile_url_paths_get_registry_errors(
    fake_registry: tuple[str, RegistryConfig, FakeNix], sample: Sample
) -> None:
    """Every hostile URL of the shared corpus gets a 4xx JSON error; nothing is built or stored."""
    base, config, fake = fake_registry
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
    try:
        connection.request("GET", sample.value)
        response = connection.getresponse()
        body = response.read()
        headers = {name.lower() for name, _ in response.getheaders()}
    finally:
        connection.close()
    assert 400 <= response.status < 500, (sample.why, response.status)
    codes = {"NAME_INVALID", "DIGEST_INVALID", "UNSUPPORTED"}
    assert json.loads(body)["errors"][0]["code"] in codes
    assert "x-injected" not in headers
    assert fake.count("resolve") == 0
    assert isinstance(config.store, MemoryStore)
    assert list(config.store.list_blobs()) == []


def test_read_only_and_unknown_routes(fake_registry: tuple[str, RegistryConfig, FakeNix]) -> None:
    """Pushes are refused with 405 UNSUPPORTED; other paths are 404 UNSUPPORTED."""
    base, _, _ = fake_registry
    put = httpx.put(f"{base}/v2/hello/manifests/latest", content=b"{}")
    assert put.status_code == 405
    assert error_of(put)["code"] == "UNSUPPORTED"
    missing = httpx.get(f"{base}/v2/hello")
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "UNSUPPORTED"


def test_tags_list(fake_registry: tuple[str, RegistryConfig, FakeNix]) -> None:
    """tags/list answers latest for a name that builds and NAME_INVALID for a malformed one."""
    base, _, _ = fake_registry
    assert httpx.get(f"{base}/v2/shell/hello/tags/list").json() == {
        "name": "shell/hello", "tags": ["latest"],
    }
    assert error_of(httpx.get(f"{base}/v2/UPPER/tags/list"))["code"] == "NAME_INVALID"


def test_identical_concurrent_requests_share_one_build(tmp_path: Path) -> None:
    """Without any cache, 12 concurrent requests for one image run Nix once."""
    fake = FakeNix(tmp_path / "root", default_fake_packages())
    config, _ = fake_config(tmp_path, cache=None, runner=SlowFirstCall(fake, hold=0.5))
    app = create_app(config)

    async def fetch_all(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            return list(await asyncio.gather(*(
                client.get("/v2/shell/hello/manifests/latest") for _ in range(12)
            )))

    with serving(app) as base:
        responses = asyncio.run(fetch_all(base))
    assert [r.status_code for r in responses] == [200] * 12
    assert len({r.headers["docker-content-digest"] for r in responses}) == 1
    assert fake.count("resolve") == 1
    assert fake.count("realise") == 1
    assert app.state.builder.builds_started == 1


def test_failed_build_is_retried_next_time(tmp_path: Path) -> None:
    """A Nix failure answers 500 UNKNOWN naming the error; the next request builds again."""
    config, fake = fake_config(
        tmp_path, cache=BuildCache(None), faults={"realise": FakeFault("fail", times=1)}
    )
    with serving(create_app(config)) as base:
        first = httpx.get(f"{base}/v2/hello/manifests/latest")
        second = httpx.get(f"{base}/v2/hello/manifests/latest")
    assert first.status_code == 500
    error = error_of(first)
    assert error["code"] == "UNKNOWN"
    assert error["detail"]["error"] == "NixBuildFailed"
    assert error["detail"]["failure"] in error["message"]
    assert second.status_code == 200
    assert fake.count("realise") == 2


def test_zstd_layers_are_served_to_oci_clients_only(tmp_path: Path) -> None:
    """With zstd layers, Docker-first clients that also accept OCI get OCI; Docker-only get 404."""
    config, _ = fake_config(tmp_path, cache=BuildCache(None))
    config = attrs.evolve(config, archive=ArchiveOptions(compression="zstd"))
    with serving(create_app(config)) as base:
        url = f"{base}/v2/shell/hello/manifests/latest"
        docker_first = httpx.get(url, headers=DOCKER_ACCEPT)
        docker_only = httpx.get(url, headers={"Accept": DOCKER_MANIFEST})
    manifest = check_manifest_headers(docker_first)
    assert manifest["mediaType"] == OCI_MANIFEST
    assert {layer["mediaType"] for layer in manifest["layers"]} == {OCI_LAYER_ZSTD}
    assert docker_only.status_code == 404
    error = error_of(docker_only)
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert "zstd" in error["message"]


def test_docker_rendering_equals_a_docker_build(tmp_path: Path) -> None:
    """The Docker manifest rendered from an OCI build is byte-identical to a Docker build."""
    fake = FakeNix(tmp_path / "root", default_fake_packages())
    store = MemoryStore()
    image = Image.from_name("shell/hello")
    source = package_set(tmp_path)
    common: dict[str, Any] = {"runner": fake, "uploader": store, "store_root": tmp_path / "root"}
    oci = build_image(image, source, manifest_format="oci", **common)
    docker = build_image(image, source, manifest_format="docker", **common)
    assert oci.manifest != docker.manifest
    assert docker_manifest(oci) == docker.manifest


# --- multi-architecture indexes over fake Nix ----------------------------------


@pytest.fixture
def multiarch_registry(tmp_path: Path) -> Iterator[tuple[str, RegistryConfig, FakeNix]]:
    """A registry configured for amd64 and arm64 over fake Nix and an in-memory store."""
    config, fake = fake_config(tmp_path, cache=BuildCache(None))
    config = attrs.evolve(config, archs=(AMD64, ARM64))
    with serving(create_app(config)) as base:
        yield base, config, fake


def check_index(response: httpx.Response, media_type: str) -> dict[str, Any]:
    """Assert an index answer's headers agree with its body; return the parsed index."""
    assert response.status_code == 200, response.text
    document: dict[str, Any] = json.loads(response.content)
    assert document["mediaType"] == response.headers["content-type"] == media_type
    assert response.headers["docker-content-digest"] == sha256_digest(response.content)
    assert int(response.headers["content-length"]) == len(response.content)
    return document


@pytest.mark.parametrize(
    ("accept", "media_type"),
    [
        (SKOPEO_INDEX_ACCEPT, OCI_INDEX),
        (DOCKER_ACCEPT, OCI_INDEX),
        (CONTAINERD_ACCEPT, OCI_INDEX),
        ([("Accept", f"{OCI_MANIFEST}, {OCI_INDEX}")], OCI_INDEX),
        ([("Accept", f"{DOCKER_MANIFEST}, {DOCKER_MANIFEST_LIST}, */*")], DOCKER_MANIFEST_LIST),
    ],
    ids=["skopeo", "docker", "containerd", "oci-only", "docker-and-wildcard"],
)
def test_index_when_accept_names_it(
    multiarch_registry: tuple[str, RegistryConfig, FakeNix],
    accept: list[tuple[str, str]],
    media_type: str,
) -> None:
    """A client naming an index type gets that index over amd64 and arm64, children by digest."""
    base, _, _ = multiarch_registry
    url = f"{base}/v2/shell/hello/manifests/latest"
    got = httpx.get(url, headers=accept)
    index = check_index(got, media_type)
    child_type = OCI_MANIFEST if media_type == OCI_INDEX else DOCKER_MANIFEST
    assert [(m["platform"]["architecture"], m["platform"]["os"]) for m in index["manifests"]] == [
        ("amd64", "linux"), ("arm64", "linux"),
    ]
    for entry in index["manifests"]:
        assert entry["mediaType"] == child_type
        child = httpx.get(f"{base}/v2/shell/hello/manifests/{entry['digest']}")
        manifest = check_manifest_headers(child)
        assert (manifest["mediaType"], len(child.content)) == (child_type, entry["size"])
        config = httpx.get(f"{base}/v2/shell/hello/blobs/{manifest['config']['digest']}").json()
        assert config["architecture"] == entry["platform"]["architecture"]
    wire = ("content-type", "content-length", "docker-content-digest")
    head = httpx.head(url, headers=accept)
    assert (head.status_code, head.content) == (200, b"")
    assert [head.headers[h] for h in wire] == [got.headers[h] for h in wire]
    digest = got.headers["docker-content-digest"]
    for method in ("GET", "HEAD"):
        by_digest = httpx.request(method, f"{base}/v2/shell/hello/manifests/{digest}")
        assert by_digest.status_code == 200
        assert [by_digest.headers[h] for h in wire] == [got.headers[h] for h in wire]


@pytest.mark.parametrize(
    "accept",
    [
        [],
        [("Accept", "*/*")],
        [("Accept", "application/*")],
        SKOPEO_ACCEPT,
        [("Accept", f"{OCI_MANIFEST}, {OCI_INDEX};q=0")],
        # an index whose children the client cannot read
        [("Accept", f"{OCI_MANIFEST}, {DOCKER_MANIFEST_LIST}")],
    ],
    ids=["none", "wildcard", "type-wildcard", "manifests-only", "index-q0", "list-no-children"],
)
def test_no_index_unless_named(
    multiarch_registry: tuple[str, RegistryConfig, FakeNix], accept: list[tuple[str, str]]
) -> None:
    """Clients that do not name an index type (wildcards do not count) get the amd64 manifest."""
    base, _, fake = multiarch_registry
    response = httpx.get(f"{base}/v2/shell/hello/manifests/latest", headers=accept)
    manifest = check_manifest_headers(response)
    assert manifest["mediaType"] in (OCI_MANIFEST, DOCKER_MANIFEST)
    config = httpx.get(f"{base}/v2/shell/hello/blobs/{manifest['config']['digest']}").json()
    assert config["architecture"] == "amd64"
    assert fake.count("realise") == 1


def test_single_manifest_is_the_index_amd64_child(
    multiarch_registry: tuple[str, RegistryConfig, FakeNix],
) -> None:
    """The OCI manifest a non-index client gets is the amd64 entry of the OCI index, one build."""
    base, _, fake = multiarch_registry
    url = f"{base}/v2/shell/hello/manifests/latest"
    index = check_index(httpx.get(url, headers=SKOPEO_INDEX_ACCEPT), OCI_INDEX)
    single = httpx.get(url, headers=SKOPEO_ACCEPT)
    assert single.headers["docker-content-digest"] == index["manifests"][0]["digest"]
    assert fake.count("realise") == 2  # one per architecture; the single manifest was cached


def test_arm64_names_stay_single_architecture(
    multiarch_registry: tuple[str, RegistryConfig, FakeNix],
) -> None:
    """``arm64/...`` names get the arm64 manifest even from a client that accepts indexes."""
    base, _, _ = multiarch_registry
    response = httpx.get(f"{base}/v2/arm64/hello/manifests/latest", headers=SKOPEO_INDEX_ACCEPT)
    manifest = check_manifest_headers(response)
    assert manifest["mediaType"] == OCI_MANIFEST
    config = httpx.get(f"{base}/v2/arm64/hello/blobs/{manifest['config']['digest']}").json()
    assert config["architecture"] == "arm64"


def test_index_unknown_packages_are_named(
    multiarch_registry: tuple[str, RegistryConfig, FakeNix],
) -> None:
    """An index of unknown packages is MANIFEST_UNKNOWN naming each, recorded on the index page."""
    base, _, _ = multiarch_registry
    response = httpx.get(
        f"{base}/v2/hello/nosuchpkg/zzmissing/manifests/latest", headers=SKOPEO_INDEX_ACCEPT
    )
    assert response.status_code == 404
    error = error_of(response)
    assert (error["code"], error["detail"]) == (
        "MANIFEST_UNKNOWN", {"packages": ["nosuchpkg", "zzmissing"]},
    )
    assert "zzmissing" in httpx.get(f"{base}/").text


def test_index_build_failure_is_retried(tmp_path: Path) -> None:
    """A failing architecture fails the index with 500 UNKNOWN; the next request builds it."""
    config, _ = fake_config(
        tmp_path, cache=BuildCache(None), faults={"realise": FakeFault("fail", times=1)}
    )
    config = attrs.evolve(config, archs=(AMD64, ARM64))
    with serving(create_app(config)) as base:
        url = f"{base}/v2/hello/manifests/latest"
        first = httpx.get(url, headers=SKOPEO_INDEX_ACCEPT)
        second = httpx.get(url, headers=SKOPEO_INDEX_ACCEPT)
    assert (first.status_code, error_of(first)["code"]) == (500, "UNKNOWN")
    check_index(second, OCI_INDEX)


def test_concurrent_index_requests_share_one_build(tmp_path: Path) -> None:
    """Without a cache, 8 concurrent index requests build once: one realise per architecture."""
    fake = FakeNix(tmp_path / "root", default_fake_packages())
    config, _ = fake_config(tmp_path, cache=None, runner=SlowFirstCall(fake, hold=0.5))
    app = create_app(attrs.evolve(config, archs=(AMD64, ARM64)))

    async def fetch_all(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            return list(await asyncio.gather(*(
                client.get("/v2/shell/hello/manifests/latest", headers=SKOPEO_INDEX_ACCEPT)
                for _ in range(8)
            )))

    with serving(app) as base:
        responses = asyncio.run(fetch_all(base))
    assert {check_index(r, OCI_INDEX)["mediaType"] for r in responses} == {OCI_INDEX}
    assert len({r.headers["docker-content-digest"] for r in responses}) == 1
    assert (fake.count("realise"), app.state.builder.builds_started) == (2, 1)


def test_zstd_index_is_always_oci(tmp_path: Path) -> None:
    """With zstd layers a Docker-first client that names both index types gets an OCI index."""
    config, _ = fake_config(tmp_path, cache=BuildCache(None))
    config = attrs.evolve(
        config, archs=(AMD64, ARM64), archive=ArchiveOptions(compression="zstd")
    )
    with serving(create_app(config)) as base:
        response = httpx.get(f"{base}/v2/hello/manifests/latest", headers=DOCKER_ACCEPT)
    index = check_index(response, OCI_INDEX)
    assert {m["mediaType"] for m in index["manifests"]} == {OCI_MANIFEST}


# --- Accept parsing, configuration -------------------------------------------


def test_index_preferences() -> None:
    """Index forms count only when named exactly with q > 0 and their manifests are accepted."""
    skopeo = [value for _, value in SKOPEO_INDEX_ACCEPT]
    assert index_preferences(skopeo, "docker") == ("docker", "oci")
    assert index_preferences(skopeo, "oci") == ("oci", "docker")
    assert index_preferences([value for _, value in DOCKER_ACCEPT], "oci") == ("oci", "docker")
    assert index_preferences([f"{OCI_MANIFEST}, {OCI_INDEX}, */*"], "docker") == ("oci",)
    assert index_preferences([f"{OCI_INDEX};q=0.5, {DOCKER_MANIFEST_LIST}, */*"], "oci") == (
        "docker", "oci",
    )
    assert index_preferences(["*/*", "application/*"], "oci") == ()
    assert index_preferences([f"{OCI_INDEX};q=0, {OCI_MANIFEST}"], "oci") == ()
    assert index_preferences([OCI_INDEX, f"{OCI_MANIFEST};q=0"], "oci") == ()
    assert index_preferences([OCI_INDEX], "docker") == ("oci",)


def test_archs_configuration(tmp_path: Path) -> None:
    """NIXERY_ARCHS parses to architectures in order; unknown or repeated ones are refused."""
    assert parse_archs("") == ()
    assert parse_archs("arm64, amd64") == (ARM64, AMD64)
    for bad in ("amd64,riscv64", "amd64,amd64", "x86_64-linux"):
        with pytest.raises(InvalidInput, match="NIXERY_ARCHS"):
            parse_archs(bad)
    env = {"NIXERY_PKGS_PATH": str(OFFLINE_SET), "STORAGE_PATH": str(tmp_path)}
    assert RegistryConfig.from_env(env).archs == ()
    assert RegistryConfig.from_env({**env, "NIXERY_ARCHS": "amd64,arm64"}).archs == (AMD64, ARM64)
    with pytest.raises(InvalidInput, match="twice"):
        attrs.evolve(RegistryConfig.from_env(env), archs=(ARM64, ARM64))


def test_accept_parsing_and_ties() -> None:
    """q-values rank forms; ties go to the server's preference; malformed entries are dropped."""
    assert parse_accept(["a/b;q=0.5, c/d;q=x, e/f;q=2, */*"]) == [
        *parse_accept(["a/b;q=0.5"]), *parse_accept(["x/y, */*"])[1:],
    ]
    assert preferences([f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"], "docker") == ("docker", "oci")
    assert preferences([f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"], "oci") == ("oci", "docker")
    assert preferences([f"{DOCKER_MANIFEST};q=0, {OCI_MANIFEST}"], "docker") == ("oci",)
    assert preferences(["application/*"], "oci") == ("oci", "docker")
    assert preferences([f"{DOCKER_MANIFEST}, */*;q=0.1"], "oci") == ("docker", "oci")
    assert choose_format(["text/html"], "docker") is None


def test_config_from_env_errors_name_the_variable(tmp_path: Path) -> None:
    """Missing or malformed variables raise typed errors naming them."""
    with pytest.raises(InvalidSource, match="NIXERY_PKGS_PATH"):
        RegistryConfig.from_env({})
    base = {"NIXERY_PKGS_PATH": str(OFFLINE_SET)}
    with pytest.raises(InvalidInput, match="STORAGE_PATH"):
        RegistryConfig.from_env(base)
    with pytest.raises(InvalidInput, match="NIXERY_STORAGE_BACKEND"):
        RegistryConfig.from_env({**base, "NIXERY_STORAGE_BACKEND": "s3"})
    with pytest.raises(InvalidInput, match="NIX_TIMEOUT"):
        RegistryConfig.from_env({**base, "STORAGE_PATH": str(tmp_path), "NIX_TIMEOUT": "soon"})
    with pytest.raises(InvalidInput, match="NIXERY_LAYER_COMPRESSION"):
        RegistryConfig.from_env(
            {**base, "STORAGE_PATH": str(tmp_path), "NIXERY_LAYER_COMPRESSION": "lz4"}
        )
    with pytest.raises(InvalidInput, match="GCS_BUCKET"):
        RegistryConfig.from_env({**base, "NIXERY_STORAGE_BACKEND": "gcs"})
    config = RegistryConfig.from_env(
        {**base, "STORAGE_PATH": str(tmp_path), "NIX_TIMEOUT": "5", "NIXERY_DEFAULT_FORMAT": "oci"}
    )
    assert isinstance(config.store, FilesystemStore)
    assert (config.timeout, config.default_format, config.blob_url) == (5.0, "oci", None)
    assert main([], env={"PORT": "http"}) == 2


def test_sharing_fragments_is_configured_by_the_environment(tmp_path: Path) -> None:
    """NIXERY_SHARE_FRAGMENTS turns the bucket tier on (with a local cache only), with
    NIXERY_FRAGMENT_MIN_SIZE as its threshold; nonsense names the variable."""
    env = {"NIXERY_PKGS_PATH": str(OFFLINE_SET), "STORAGE_PATH": str(tmp_path / "store")}
    with_cache = {**env, "NIXERY_CACHE_DIR": str(tmp_path / "cache")}
    config = RegistryConfig.from_env(with_cache)
    assert config.cache is not None
    assert config.cache.fragment_bucket is None  # off unless asked for
    config.cache.close()
    config = RegistryConfig.from_env(
        {**with_cache, "NIXERY_SHARE_FRAGMENTS": "1", "NIXERY_FRAGMENT_MIN_SIZE": "0"}
    )
    assert config.cache is not None
    assert config.cache.fragment_bucket == FragmentBucketPolicy(min_size=0)
    config.cache.close()
    with pytest.raises(InvalidInput, match="NIXERY_CACHE_DIR"):
        RegistryConfig.from_env({**env, "NIXERY_SHARE_FRAGMENTS": "1"})
    with pytest.raises(InvalidInput, match="NIXERY_SHARE_FRAGMENTS"):
        RegistryConfig.from_env({**with_cache, "NIXERY_SHARE_FRAGMENTS": "maybe"})
    with pytest.raises(InvalidInput, match="NIXERY_FRAGMENT_MIN_SIZE"):
        RegistryConfig.from_env(
            {**with_cache, "NIXERY_SHARE_FRAGMENTS": "1", "NIXERY_FRAGMENT_MIN_SIZE": "big"}
        )


def test_lease_ttl_and_fragment_cache_size_are_configured_by_the_environment(
    tmp_path: Path,
) -> None:
    """NIXERY_LEASE_TTL sets the fleet lease ttl (0: no leases) and NIXERY_FRAGMENT_CACHE_SIZE
    the local fragment cache's bytes (with a local cache only); nonsense names the variable."""
    env = {"NIXERY_PKGS_PATH": str(OFFLINE_SET), "STORAGE_PATH": str(tmp_path / "store")}
    with_cache = {**env, "NIXERY_CACHE_DIR": str(tmp_path / "cache")}
    defaults = RegistryConfig.from_env(with_cache).cache
    assert defaults is not None
    assert defaults.fleet is not None
    assert defaults.fleet.policy.ttl == 30
    assert defaults.fragment_limit == 4 << 30
    config = RegistryConfig.from_env(
        {**with_cache, "NIXERY_LEASE_TTL": "7.5", "NIXERY_FRAGMENT_CACHE_SIZE": "1048576"}
    )
    assert config.cache is not None
    assert config.cache.fleet is not None
    assert config.cache.fleet.policy.ttl == 7.5
    assert config.cache.fragment_limit == 1 << 20
    config = RegistryConfig.from_env(
        {**with_cache, "NIXERY_LEASE_TTL": "0", "NIXERY_FRAGMENT_CACHE_SIZE": "0"}
    )
    assert config.cache is not None
    assert config.cache.fleet is None
    assert config.cache.fragment_limit == 0
    for name, bad in (("NIXERY_LEASE_TTL", "-1"), ("NIXERY_LEASE_TTL", "soon"),
                      ("NIXERY_LEASE_TTL", "nan"), ("NIXERY_FRAGMENT_CACHE_SIZE", "1.5"),
                      ("NIXERY_FRAGMENT_CACHE_SIZE", "inf")):
        with pytest.raises(InvalidInput, match=name):
            RegistryConfig.from_env({**with_cache, name: bad})
    with pytest.raises(InvalidInput, match="NIXERY_CACHE_DIR"):
        RegistryConfig.from_env({**env, "NIXERY_FRAGMENT_CACHE_SIZE": "1048576"})


# --- blob redirects to a GCS bucket --------------------------------------------


def test_gcs_blobs_redirect_to_the_bucket(tmp_path: Path, fake_gcs: FakeGcsServer) -> None:
    """With blob_url set, GET redirects (307) to the bucket, which serves the bytes."""
    bucket = fake_gcs.make_bucket("registry-redirects")
    store = GcsStore(bucket)
    fake = FakeNix(tmp_path / "root", default_fake_packages())
    config = RegistryConfig(
        source=package_set(tmp_path), store=store, cache=BuildCache(None), runner=fake,
        store_root=tmp_path / "root",
        blob_url=functools.partial(signed_url, store, expiry=timedelta(minutes=5)),
    )
    with serving(create_app(config)) as base:
        manifest = httpx.get(f"{base}/v2/hello/manifests/latest").json()
        for descriptor in [manifest["config"], *manifest["layers"]]:
            url = f"{base}/v2/hello/blobs/{descriptor['digest']}"
            redirect = httpx.get(url)
            assert redirect.status_code == 307
            assert redirect.headers["docker-content-digest"] == descriptor["digest"]
            location = redirect.headers["location"]
            assert location.startswith(fake_gcs.url)
            assert sha256_digest(httpx.get(location).content) == descriptor["digest"]
            head = httpx.head(url)
            assert (head.status_code, int(head.headers["content-length"])) == (
                200, descriptor["size"],
            )
        absent = httpx.get(f"{base}/v2/hello/blobs/{sha256_digest(b'absent')}")
    assert absent.status_code == 404
    assert error_of(absent)["code"] == "BLOB_UNKNOWN"


def test_the_gcs_backend_starts_no_thread_on_a_miss(fake_gcs: FakeGcsServer) -> None:
    """The gcs backend's client starts no thread of its own when a read misses (a 404)."""
    bucket = fake_gcs.make_bucket("registry-misses")
    config = RegistryConfig.from_env({
        "NIXERY_PKGS_PATH": str(OFFLINE_SET), "NIXERY_STORAGE_BACKEND": "gcs",
        "GCS_BUCKET": bucket.name, "STORAGE_EMULATOR_HOST": fake_gcs.url,
    })
    assert isinstance(config.store, GcsStore)
    with threads_started() as started:
        assert config.store.get_object("manifests/absent") is None
    assert started == []


# --- the one-command registry over real Nix, with real clients ------------------


@contextlib.contextmanager
def one_command_registry(work: Path, extra_env: Mapping[str, str] | None = None) -> Iterator[str]:
    """``python -m examples.registry`` over the offline package set; yields host:port."""
    require_tools("nix-build", "nix-instantiate", "nix-store", "nix")
    env = {
        **os.environ,
        "NIXERY_PKGS_PATH": str(OFFLINE_SET),
        "STORAGE_PATH": str(work / "store"),
        "NIXERY_CACHE_DIR": str(work / "cache"),
        "HOST": "127.0.0.1",
        "PORT": "0",
        **(extra_env or {}),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "examples.registry"], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            log.append(line)
            lines.put(line)

    pumping = threading.Thread(target=pump, daemon=True)
    pumping.start()
    address = ""
    deadline = time.monotonic() + 30
    while not address and time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(queue.Empty):
            line = lines.get(timeout=0.2)
            if line.startswith("listening on http://"):
                address = line.strip().removeprefix("listening on http://")
    try:
        if not address:
            pytest.fail("the registry did not start:\n" + "".join(log))
        yield address
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hung server
            process.kill()
            process.wait()
        pumping.join(timeout=10)
        assert process.stdout is not None
        process.stdout.close()


@pytest.fixture(scope="module")
def real_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The one-command registry, single-architecture (the default); yields host:port."""
    with one_command_registry(tmp_path_factory.mktemp("registry")) as address:
        yield address


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["skopeo", *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.nix
@pytest.mark.tools
def test_skopeo_inspect(real_registry: str) -> None:
    """skopeo inspect reads the image the registry builds on demand."""
    require_tools("skopeo")
    result = skopeo("inspect", "--tls-verify=false", f"docker://{real_registry}/shell/hello:latest")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    raw = skopeo(
        "inspect", "--raw", "--tls-verify=false", f"docker://{real_registry}/shell/hello:latest"
    )
    manifest = json.loads(raw.stdout)
    assert info["Architecture"] == "amd64"
    assert info["RepoTags"] == ["latest"]
    assert info["Layers"] == [layer["digest"] for layer in manifest["layers"]]
    assert info["Digest"] == sha256_digest(raw.stdout.encode())


@pytest.mark.nix
@pytest.mark.tools
def test_skopeo_copy_unpack_and_run_hello(real_registry: str, tmp_path: Path) -> None:
    """skopeo copies the image to an OCI layout; unpacked, its /bin/hello runs."""
    require_tools("skopeo", "umoci")
    layout = tmp_path / "oci"
    copy = skopeo(
        "copy", "--src-tls-verify=false",
        f"docker://{real_registry}/shell/hello:latest", f"oci:{layout}:latest",
    )
    assert copy.returncode == 0, copy.stderr
    bundle = tmp_path / "bundle"
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    subprocess.run(
        ["umoci", "unpack", *rootless, "--image", f"{layout}:latest", str(bundle)],
        check=True, capture_output=True,
    )
    rootfs = bundle / "rootfs"
    if os.geteuid() == 0:
        argv = ["chroot", str(rootfs), "/bin/hello"]
    else:  # pragma: no cover - CI runs as root
        require_tools("bwrap")
        argv = ["bwrap", "--bind", str(rootfs), "/", "--dev", "/dev", "/bin/hello"]
    ran = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30)
    assert ran.stdout.strip() == "Hello, world!"


@pytest.mark.nix
@pytest.mark.tools
def test_skopeo_shows_unknown_packages(real_registry: str) -> None:
    """An unknown package fails the pull with a message naming it, in skopeo's output."""
    require_tools("skopeo")
    result = skopeo(
        "inspect", "--tls-verify=false",
        f"docker://{real_registry}/shell/nosuchpkg/hello/alsomissing:latest",
    )
    assert result.returncode != 0
    assert "manifest unknown" in result.stderr
    assert "unknown packages: alsomissing, nosuchpkg" in result.stderr


@pytest.mark.nix
def test_docker_style_head_then_get_by_digest(real_registry: str) -> None:
    """Docker's sequence: HEAD by tag, then GET the manifest and config by digest."""
    base = f"http://{real_registry}"
    head = httpx.head(f"{base}/v2/shell/hello/manifests/latest", headers=DOCKER_ACCEPT)
    assert head.status_code == 200
    assert head.headers["content-type"] == OCI_MANIFEST  # the server's preference on a tie
    digest = head.headers["docker-content-digest"]
    manifest = httpx.get(f"{base}/v2/shell/hello/manifests/{digest}", headers=DOCKER_ACCEPT)
    document = check_manifest_headers(manifest)
    assert manifest.headers["docker-content-digest"] == digest
    config = httpx.get(f"{base}/v2/shell/hello/blobs/{document['config']['digest']}")
    assert sha256_digest(config.content) == document["config"]["digest"]
    assert json.loads(config.content)["architecture"] == "amd64"


# --- the one-command registry serving indexes, with real skopeo -----------------


@pytest.fixture(scope="module")
def real_multiarch_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The one-command registry with NIXERY_ARCHS=amd64,arm64 (Nix may build aarch64-linux)."""
    nix_config = os.environ.get("NIX_CONFIG", "") + "\nextra-platforms = aarch64-linux\n"
    extra = {"NIXERY_ARCHS": "amd64,arm64", "NIX_CONFIG": nix_config}
    with one_command_registry(tmp_path_factory.mktemp("multiarch"), extra) as address:
        yield address


def raw_index(address: str) -> dict[str, Any]:
    """``skopeo inspect --raw`` of shell/hello, parsed."""
    result = skopeo(
        "inspect", "--raw", "--tls-verify=false", f"docker://{address}/shell/hello:latest"
    )
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def layout_manifest_digest(layout: Path) -> str:
    """The digest of the one manifest an OCI layout's index.json names."""
    entries = json.loads((layout / "index.json").read_text())["manifests"]
    assert len(entries) == 1
    digest: str = entries[0]["digest"]
    return digest


@pytest.mark.nix
@pytest.mark.tools
def test_skopeo_sees_an_index_of_both_architectures(real_multiarch_registry: str) -> None:
    """skopeo (which names both index types) gets an OCI index listing amd64 and arm64."""
    require_tools("skopeo")
    index = raw_index(real_multiarch_registry)
    assert index["mediaType"] == OCI_INDEX
    platforms = [(m["platform"]["os"], m["platform"]["architecture"]) for m in index["manifests"]]
    assert platforms == [("linux", "amd64"), ("linux", "arm64")]


@pytest.mark.nix
@pytest.mark.tools
@pytest.mark.parametrize("arch", [None, "arm64"], ids=["default", "arm64"])
def test_skopeo_copy_picks_the_architecture(
    real_multiarch_registry: str, tmp_path: Path, arch: str | None
) -> None:
    """skopeo copy takes the index entry of its platform: amd64 here, arm64 when overridden."""
    require_tools("skopeo")
    index = raw_index(real_multiarch_registry)
    entries = {m["platform"]["architecture"]: m for m in index["manifests"]}
    layout = tmp_path / "oci"
    override = ["--override-arch", arch] if arch else []
    copy = skopeo(
        "copy", *override, "--src-tls-verify=false",
        f"docker://{real_multiarch_registry}/shell/hello:latest", f"oci:{layout}:latest",
    )
    assert copy.returncode == 0, copy.stderr
    digest = layout_manifest_digest(layout)
    assert digest == entries[arch or "amd64"]["digest"]
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / digest.removeprefix("sha256:")).read_bytes())
    config = json.loads((blobs / manifest["config"]["digest"].removeprefix("sha256:")).read_bytes())
    assert config["architecture"] == (arch or "amd64")


@pytest.mark.nix
def test_clients_without_index_support_get_one_manifest(real_multiarch_registry: str) -> None:
    """A client that names no index type gets the amd64 manifest, the index's amd64 entry."""
    base = f"http://{real_multiarch_registry}"
    index = httpx.get(f"{base}/v2/shell/hello/manifests/latest", headers=SKOPEO_INDEX_ACCEPT)
    amd64 = check_index(index, OCI_INDEX)["manifests"][0]
    single = httpx.get(f"{base}/v2/shell/hello/manifests/latest", headers=SKOPEO_ACCEPT)
    assert check_manifest_headers(single)["mediaType"] == OCI_MANIFEST
    assert single.headers["docker-content-digest"] == amd64["digest"]
    docker = httpx.get(
        f"{base}/v2/shell/hello/manifests/latest", headers={"Accept": DOCKER_MANIFEST}
    )
    assert check_manifest_headers(docker)["mediaType"] == DOCKER_MANIFEST


# --- load ------------------------------------------------------------------------

LOAD_IMAGES = ("hello", "shell", "shell/hello", "busybox", "coreutils")


@pytest.mark.nix
def test_fifty_concurrent_requests_one_nix_build_per_image(tmp_path: Path) -> None:
    """50 concurrent requests over 5 images all succeed, digests agree, Nix runs once each."""
    require_tools("nix-build", "nix-instantiate", "nix-store", "nix")
    runner = RecordingRunner(SubprocessRunner())
    store = FilesystemStore(tmp_path / "store")
    with BuildCache(tmp_path / "cache") as cache:
        config = RegistryConfig(
            source=LocalPathSource(OFFLINE_SET), store=store, cache=cache, runner=runner,
            nix_options={"substituters": ""},
        )
        app = create_app(config)

        async def load(base: str) -> list[tuple[str, httpx.Response]]:
            limits = httpx.Limits(max_connections=50)
            async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
                names = [LOAD_IMAGES[i % len(LOAD_IMAGES)] for i in range(50)]
                responses = await asyncio.gather(*(
                    client.get(f"/v2/{name}/manifests/latest", headers=SKOPEO_ACCEPT)
                    for name in names
                ))
                return list(zip(names, responses, strict=True))

        with serving(app) as base:
            results = asyncio.run(load(base))
    assert [r.status_code for _, r in results] == [200] * 50, [r.text for _, r in results][:3]
    digests: dict[str, set[str]] = {}
    for name, response in results:
        check_manifest_headers(response)
        digests.setdefault(name, set()).add(response.headers["docker-content-digest"])
    assert {name: len(found) for name, found in digests.items()} == dict.fromkeys(LOAD_IMAGES, 1)
    assert len(set().union(*digests.values())) == 5
    resolves = Counter(
        tuple(call.packages)
        for recorded in runner.calls
        if isinstance(call := parse_argv(recorded.argv), ResolveCall)
    )
    expected = {Image.from_name(name).packages for name in LOAD_IMAGES}
    assert set(resolves) == expected
    assert set(resolves.values()) == {1}
    realises = [c for c in runner.calls if (p := parse_argv(c.argv)) and p.step == "realise"]
    assert len(realises) == 5
    assert app.state.builder.builds_started == 5


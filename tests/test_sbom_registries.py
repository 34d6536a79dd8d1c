"""SBOMs found through registries by independent clients: oras-py, skopeo, raw HTTP.

* the example registry (real Nix, offline set) serves ``GET /v2/<name>/referrers/<digest>``;
  oras-py finds and downloads both SBOMs and the validators accept them;
* after ``push_image`` to Debian's docker-registry 2.8 (no referrers API),
  skopeo reads the ``sha256-<hex>`` fallback tag and the artifact manifests,
  and oras-py downloads the documents;
* a registry that acknowledges ``OCI-Subject`` gets no fallback tag (httpx mock);
* an OCI layout holds them as untagged entries (oras-py validates it, skopeo reads the tag).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import oras.provider
import pytest
from conftest import OFFLINE_SET, require_tools
from oras.layout.layout import NewLayout
from sbom_validators import cyclonedx_problem, spdx_problems
from servers import DockerRegistry, registry

from examples.registry import RegistryConfig, create_app, serving
from nixery_core.build import BuildResult, build_image
from nixery_core.cache import BuildCache
from nixery_core.digests import sha256_digest
from nixery_core.manifest import REF_NAME_ANNOTATION
from nixery_core.media_types import OCI_INDEX, OCI_MANIFEST
from nixery_core.names import Image
from nixery_core.oci_layout import read_layout_blob, read_oci_layout, write_oci_layout
from nixery_core.registry_push import push_image
from nixery_core.sbom import fallback_tag
from nixery_core.sources import LocalPathSource
from nixery_core.storage.filesystem import FilesystemStore
from nixery_core.testing.storage import MemoryStore

__all__ = ["registry"]  # the fixture, imported for pytest

OPTIONS = {"substituters": ""}
ARTIFACT_TYPES = {"application/spdx+json", "application/vnd.cyclonedx+json"}


def _check_documents(client: oras.provider.Registry, container: str, index: dict[str, Any]) -> None:
    """Each referrer's document downloads through oras-py and validates."""
    assert {m["artifactType"] for m in index["manifests"]} == ARTIFACT_TYPES
    for entry in index["manifests"]:
        manifest = client.get_manifest(f"{container}@{entry['digest']}")
        layer = manifest["layers"][0]
        document = client.get_blob(container, layer["digest"]).content
        assert sha256_digest(document) == layer["digest"]
        if entry["artifactType"] == "application/spdx+json":
            assert spdx_problems(document) == []
        else:
            assert cyclonedx_problem(document) is None


@pytest.fixture(scope="module")
def example_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The example registry over real Nix and the offline set, serving on a free port."""
    require_tools("nix-build", "nix-instantiate", "nix-store", "nix")
    work = tmp_path_factory.mktemp("example-registry")
    config = RegistryConfig(
        source=LocalPathSource(OFFLINE_SET), store=FilesystemStore(work / "store"),
        cache=BuildCache(work / "cache"), nix_options=OPTIONS,
    )
    with serving(create_app(config)) as base:
        yield base


def test_oras_finds_sboms_through_the_example_registrys_referrers_api(
    example_registry: str,
) -> None:
    """oras-py pulls shell/hello, lists its referrers and downloads two valid SBOMs."""
    host = example_registry.removeprefix("http://")
    client = oras.provider.Registry(hostname=host, insecure=True)
    container = f"{host}/shell/hello"
    image = client.get_manifest(f"{container}:latest", allowed_media_type=[OCI_MANIFEST])
    assert image["annotations"]["org.opencontainers.image.created"] == "1970-01-01T00:00:00Z"
    response = httpx.get(
        f"{example_registry}/v2/shell/hello/manifests/latest", headers={"Accept": OCI_MANIFEST}
    )
    digest = response.headers["docker-content-digest"]
    answer = client.do_request(f"{example_registry}/v2/shell/hello/referrers/{digest}")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == OCI_INDEX
    index = answer.json()
    _check_documents(client, container, index)
    for entry in index["manifests"]:
        manifest = client.get_manifest(f"{container}@{entry['digest']}")
        assert manifest["subject"]["digest"] == digest


def test_example_registry_filters_referrers_and_answers_empty_for_unknown(
    example_registry: str,
) -> None:
    """artifactType filters (and says so); a digest with no referrers gets an empty index."""
    response = httpx.get(
        f"{example_registry}/v2/hello/manifests/latest", headers={"Accept": OCI_MANIFEST}
    )
    digest = response.headers["docker-content-digest"]
    filtered = httpx.get(
        f"{example_registry}/v2/hello/referrers/{digest}",
        params={"artifactType": "application/spdx+json"},
    )
    assert filtered.headers["oci-filters-applied"] == "artifactType"
    assert [m["artifactType"] for m in filtered.json()["manifests"]] == ["application/spdx+json"]
    empty = httpx.get(f"{example_registry}/v2/hello/referrers/sha256:{'0' * 64}")
    assert (empty.status_code, empty.json()["manifests"]) == (200, [])
    bad = httpx.get(f"{example_registry}/v2/hello/referrers/sha256:nothex")
    assert bad.status_code == 400


def _skopeo_raw(reference: str) -> dict[str, Any]:
    require_tools("skopeo")
    out = subprocess.run(
        ["skopeo", "--insecure-policy", "inspect", "--raw", "--tls-verify=false", reference],
        check=True, capture_output=True, timeout=60,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def built_hello() -> tuple[MemoryStore, BuildResult]:
    """shell/hello built with real Nix into a memory store."""
    require_tools("nix-build", "nix-instantiate", "nix-store", "nix")
    store = MemoryStore()
    result = build_image(
        Image.from_name("shell/hello"), LocalPathSource(OFFLINE_SET), uploader=store,
        nix_options=OPTIONS,
    )
    return store, result


def test_push_to_docker_registry_writes_the_fallback_tag_skopeo_and_oras_read(
    registry: DockerRegistry, built_hello: tuple[MemoryStore, BuildResult],
) -> None:
    """docker-registry 2.8 has no referrers API: the sha256-<hex> tag lists both SBOMs."""
    store, result = built_hello
    target = f"{registry.host}/hello:v1"
    pushed = push_image(
        store=store, manifest=result.manifest, manifest_media_type=result.manifest_media_type,
        target=target, insecure=True,
    )
    tag = fallback_tag(result.manifest_digest)
    assert pushed.fallback_tags == (tag,)
    assert set(pushed.referrers) == {a.manifest_digest for a in result.sboms}
    assert pushed.manifests_pushed == 1
    no_api = httpx.get(f"{registry.url}/v2/hello/referrers/{result.manifest_digest}")
    assert no_api.status_code == 404
    index = _skopeo_raw(f"docker://{registry.host}/hello:{tag}")
    assert index["mediaType"] == OCI_INDEX
    for entry in index["manifests"]:
        artifact = _skopeo_raw(f"docker://{registry.host}/hello@{entry['digest']}")
        assert artifact["subject"]["digest"] == result.manifest_digest
        assert artifact["artifactType"] == entry["artifactType"]
    client = oras.provider.Registry(hostname=registry.host, insecure=True)
    _check_documents(client, f"{registry.host}/hello", index)

    again = push_image(
        store=store, manifest=result.manifest, manifest_media_type=result.manifest_media_type,
        target=target, insecure=True,
    )
    assert again.blobs_uploaded == 0
    assert _skopeo_raw(f"docker://{registry.host}/hello:{tag}") == index


def test_push_without_referrers_sends_only_the_image(
    registry: DockerRegistry, built_hello: tuple[MemoryStore, BuildResult],
) -> None:
    """referrers=False pushes the image alone: no fallback tag appears."""
    store, result = built_hello
    pushed = push_image(
        store=store, manifest=result.manifest, manifest_media_type=result.manifest_media_type,
        target=f"{registry.host}/plain:v1", insecure=True, referrers=False,
    )
    assert (pushed.referrers, pushed.fallback_tags) == ((), ())
    tag = fallback_tag(result.manifest_digest)
    missing = httpx.get(f"{registry.url}/v2/plain/manifests/{tag}", headers={"Accept": OCI_INDEX})
    assert missing.status_code == 404


def test_registry_acknowledging_the_subject_gets_no_fallback_tag(
    built_hello: tuple[MemoryStore, BuildResult],
) -> None:
    """A registry answering OCI-Subject (it has the referrers API) gets no fallback index."""
    store, result = built_hello
    puts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "HEAD" and "/blobs/" in path:
            return httpx.Response(200)
        if request.method == "PUT" and "/manifests/" in path:
            puts.append(path.rsplit("/", 1)[-1])
            data = request.content
            headers = {"Docker-Content-Digest": sha256_digest(data)}
            subject = json.loads(data).get("subject")
            if subject is not None:
                headers["OCI-Subject"] = subject["digest"]
            return httpx.Response(201, headers=headers)
        return httpx.Response(404)

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        pushed = push_image(
            store=store, manifest=result.manifest, manifest_media_type=result.manifest_media_type,
            target="127.0.0.1:1/hello:v1", insecure=True, client=client,
        )
    assert pushed.fallback_tags == ()
    assert puts == ["v1", *(d for d in pushed.referrers)]
    assert not any(p.startswith("sha256-") for p in puts)



def test_oci_layout_holds_the_sboms_beside_the_tagged_image(
    tmp_path: Path, built_hello: tuple[MemoryStore, BuildResult],
) -> None:
    """write_oci_layout adds untagged artifact entries; oras-py validates, skopeo reads the tag."""
    store, result = built_hello
    layout = tmp_path / "oci"
    write_oci_layout(layout, store=store, manifest=result.manifest, ref_name="latest")
    NewLayout(str(layout), validate=True)  # oras-py's own checks of oci-layout, index, blobs
    entries = read_oci_layout(layout).manifests
    untagged = {e.digest for e in entries if e.annotation(REF_NAME_ANNOTATION) is None}
    assert untagged == {a.manifest_digest for a in result.sboms}
    for artifact in result.sboms:
        manifest = json.loads(read_layout_blob(layout, artifact.manifest_digest))
        assert manifest["subject"]["digest"] == result.manifest_digest
        document = read_layout_blob(layout, manifest["layers"][0]["digest"])
        assert document == result.sbom(store, artifact.format)
    require_tools("skopeo")
    inspected = subprocess.run(
        ["skopeo", "inspect", f"oci:{layout}:latest"], check=True, capture_output=True, timeout=60,
    )
    assert json.loads(inspected.stdout)["Digest"] == result.manifest_digest

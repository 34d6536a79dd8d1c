"""Multi-architecture images: build_multiarch with real Nix, skopeo, umoci, runc and a registry.

``shell/hello`` is built from the offline package set for amd64 and arm64
(the arm64 set is realised with ``extra-platforms``; its packages carry the
host's busybox, so even the arm64 image runs here) and combined into an OCI
image index or a Docker manifest list.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import attrs
import pytest
from conftest import OFFLINE_SET, require_tools
from containers import run_in_bundle, unpack
from servers import DockerRegistry, registry

from nixery_core.build import build_image
from nixery_core.cache import BuildCache, ManifestRecord
from nixery_core.errors import InvalidInput
from nixery_core.manifest import REF_NAME_ANNOTATION, parse_index, parse_manifest
from nixery_core.media_types import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from nixery_core.multiarch import (
    INDEX_KEY_PREFIX,
    MultiArchResult,
    build_multiarch,
    write_multiarch_layout,
)
from nixery_core.names import AMD64, ARM64, Architecture, Image
from nixery_core.oci_layout import read_oci_layout
from nixery_core.registry_push import push_image
from nixery_core.runner import SubprocessRunner
from nixery_core.sources import LocalPathSource
from nixery_core.storage.filesystem import FilesystemStore
from nixery_core.testing.runners import RecordingRunner

__all__ = ["registry"]

pytestmark = [pytest.mark.nix, pytest.mark.tools, pytest.mark.usefixtures("nix")]

NIX_OPTIONS = {"substituters": "", "extra-platforms": "aarch64-linux"}
SOURCE = LocalPathSource(OFFLINE_SET)
IMAGE = Image.from_name("shell/hello")


@attrs.frozen
class Built:
    """A multi-arch build in a store and cache, written to an OCI layout as ``latest``."""

    work: Path
    store: FilesystemStore
    cache_dir: Path
    result: MultiArchResult
    layout: Path


def _multiarch(store: FilesystemStore, cache: BuildCache | None, **kwargs: Any) -> MultiArchResult:
    return build_multiarch(
        IMAGE, SOURCE, uploader=store, cache=cache, nix_options=NIX_OPTIONS, **kwargs
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """shell/hello for amd64 and arm64 under one OCI index."""
    work = tmp_path_factory.mktemp("multiarch")
    store = FilesystemStore(work / "store")
    with BuildCache(work / "cache") as cache:
        result = _multiarch(store, cache)
    layout = work / "oci"
    write_multiarch_layout(layout, result, store=store, ref_name="latest")
    return Built(work, store, work / "cache", result, layout)


def _skopeo(*args: str) -> str:
    require_tools("skopeo")
    done = subprocess.run(
        ["skopeo", *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _platforms(raw: str) -> list[tuple[str, str, str]]:
    """(architecture, os, digest) for every entry of an index as skopeo printed it."""
    document = json.loads(raw)
    return [
        (m["platform"]["architecture"], m["platform"]["os"], m["digest"])
        for m in document["manifests"]
    ]


def _layers(result: MultiArchResult, arch: str) -> list[str]:
    return [layer.digest for layer in result.manifests[arch].layers]


def _expected_platforms(result: MultiArchResult) -> list[tuple[str, str, str]]:
    return [(arch, "linux", r.manifest_digest) for arch, r in result.manifests.items()]


# --- the index as real tools see it --------------------------------------------------


def test_result_names_both_architectures_in_order(built: Built) -> None:
    """The result holds an amd64 and an arm64 build whose configs say so, and an OCI index."""
    result = built.result
    assert result.architectures == ("amd64", "arm64")
    assert result.media_type == OCI_INDEX
    assert result.index_digest == "sha256:" + hashlib.sha256(result.index).hexdigest()
    assert built.store.read_blob(result.index_digest) == result.index
    for arch, build in result.manifests.items():
        assert json.loads(build.config)["architecture"] == arch
        assert build.manifest_media_type == OCI_MANIFEST
    assert result.manifests["amd64"].manifest_digest != result.manifests["arm64"].manifest_digest


def test_layout_tags_the_very_index_bytes(built: Built) -> None:
    """The layout's ``latest`` entry is the result's index; the others are each arch's SBOMs."""
    entries = read_oci_layout(built.layout).manifests
    (entry,) = [e for e in entries if e.annotation(REF_NAME_ANNOTATION) == "latest"]
    assert (entry.digest, entry.media_type) == (built.result.index_digest, OCI_INDEX)
    sboms = {a.manifest_digest for r in built.result.manifests.values() for a in r.sboms}
    assert {e.digest for e in entries if e is not entry} == sboms


def test_skopeo_raw_lists_both_architectures(built: Built) -> None:
    """``skopeo inspect --raw`` of the layout prints our index: linux/amd64 and linux/arm64."""
    raw = _skopeo("inspect", "--raw", f"oci:{built.layout}:latest")
    assert raw.encode() == built.result.index
    assert _platforms(raw) == _expected_platforms(built.result)


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_skopeo_picks_each_architecture(built: Built, arch: str) -> None:
    """``skopeo inspect --override-arch`` resolves the index to that architecture's manifest."""
    info = json.loads(
        _skopeo("inspect", "--override-arch", arch, f"oci:{built.layout}:latest")
    )
    assert info["Architecture"] == arch
    assert info["Os"] == "linux"
    # skopeo reports the digest of what the reference names (the index) and
    # the layers of the manifest it chose.
    assert info["Digest"] == built.result.index_digest
    assert info["Layers"] == _layers(built.result, arch)


def test_skopeo_copy_override_arch_takes_the_arm64_image(built: Built, tmp_path: Path) -> None:
    """``skopeo copy --override-arch arm64`` copies the arm64 manifest, which runc then runs."""
    out = tmp_path / "arm64"
    _skopeo("copy", "--override-arch", "arm64", f"oci:{built.layout}:latest", f"oci:{out}:latest")
    raw = _skopeo("inspect", "--raw", f"oci:{out}:latest").encode()
    arm64 = built.result.manifests["arm64"]
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == arm64.manifest_digest
    (entry,) = read_oci_layout(out).manifests
    assert entry.digest == arm64.manifest_digest
    bundle = unpack(out, "latest", tmp_path / "bundle")
    ran = run_in_bundle(
        bundle, ["sh", "-c", "hello; cat /nix/store/*-busybox/share/nixery-offline/system"],
        state=tmp_path / "state",
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == [
        "Hello, world!", "host busybox packaged for aarch64-linux",
    ]


# --- through a real registry ------------------------------------------------------------


def test_registry_serves_the_pushed_index(built: Built, registry: DockerRegistry) -> None:
    """An index pushed to docker-registry comes back byte for byte and resolves per arch."""
    result = built.result
    pushed = push_image(
        store=built.store, manifest=result.index, manifest_media_type=result.media_type,
        target=f"{registry.host}/multi/hello:latest", insecure=True,
    )
    assert (pushed.manifest_digest, pushed.manifests_pushed) == (result.index_digest, 3)
    ref = f"docker://{registry.host}/multi/hello:latest"
    raw = _skopeo("inspect", "--raw", "--tls-verify=false", ref)
    assert raw.encode() == result.index
    assert _platforms(raw) == _expected_platforms(result)
    info = json.loads(_skopeo("inspect", "--tls-verify=false", "--override-arch", "arm64", ref))
    assert (info["Architecture"], info["Digest"]) == ("arm64", result.index_digest)
    assert info["Layers"] == _layers(result, "arm64")


def test_docker_manifest_list_uses_docker_media_types(
    built: Built, registry: DockerRegistry
) -> None:
    """format="docker" gives a manifest list of schema 2 manifests that the registry serves."""
    result = _multiarch(built.store, None, format="docker")
    assert result.media_type == DOCKER_MANIFEST_LIST
    index = parse_index(result.index, DOCKER_MANIFEST_LIST)
    assert [m.media_type for m in index.manifests] == [DOCKER_MANIFEST, DOCKER_MANIFEST]
    for build in result.manifests.values():
        manifest = parse_manifest(build.manifest, build.manifest_media_type)
        assert manifest.media_type == DOCKER_MANIFEST
        assert manifest.config.media_type == DOCKER_CONFIG
    assert result.cache_key != built.result.cache_key
    push_image(
        store=built.store, manifest=result.index, manifest_media_type=result.media_type,
        target=f"{registry.host}/multi/docker:latest", insecure=True,
    )
    raw = _skopeo(
        "inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/multi/docker:latest"
    )
    assert json.loads(raw)["mediaType"] == DOCKER_MANIFEST_LIST
    assert _platforms(raw) == _expected_platforms(result)


# --- caching -----------------------------------------------------------------------------


def test_second_build_is_a_hit_without_nix(built: Built) -> None:
    """With the same cache, the index comes from its entry: no Nix call, the same bytes."""
    runner = RecordingRunner(SubprocessRunner())
    with BuildCache(built.cache_dir) as cache:
        again = _multiarch(built.store, cache, runner=runner)
    assert runner.calls == []
    assert again.from_cache
    assert (again.index, again.cache_key) == (built.result.index, built.result.cache_key)
    for arch, build in built.result.manifests.items():
        hit = again.manifests[arch]
        assert hit.from_cache
        assert (hit.manifest, hit.cache_key, hit.layers) == (
            build.manifest, build.cache_key, tuple(attrs.evolve(x, reused=True)
                                                   for x in build.layers),
        )
        assert hit.image.arch.oci_arch == arch


def test_index_entry_names_every_blob(built: Built) -> None:
    """The shared index entry lists the index and every blob of every architecture."""
    key = built.result.cache_key
    assert key.startswith(INDEX_KEY_PREFIX)
    raw = built.store.get_object(f"manifests/{key}")
    assert raw is not None
    record = ManifestRecord.from_json(json.loads(raw))
    # The offline set reads /usr/bin/busybox and the CA bundle outside its
    # directory: a moving target (nixery_core.outside_reads), so the entry expires.
    assert record.expires_at is not None
    expected = {built.result.index_digest}
    for build in built.result.manifests.values():
        expected.update(build.blobs)
    assert set(record.blobs) == expected
    assert all(built.store.has_blob(digest) for digest in record.blobs)


def test_per_arch_builds_share_the_manifest_cache(built: Built) -> None:
    """build_image of one architecture alone is a cache hit on the index's manifest."""
    with BuildCache(built.cache_dir) as cache:
        single = build_image(
            IMAGE.with_arch(ARM64), SOURCE, uploader=built.store, cache=cache,
            runner=RecordingRunner(SubprocessRunner()), nix_options=NIX_OPTIONS,
        )
    assert single.from_cache
    assert single.cache_key == built.result.manifests["arm64"].cache_key


def test_a_vanished_index_blob_is_rebuilt(built: Built, tmp_path: Path) -> None:
    """An entry whose index blob is gone is a miss; the rebuild stores the index again."""
    store = FilesystemStore(tmp_path / "store")
    with BuildCache(tmp_path / "cache") as cache:
        first = _multiarch(store, cache)
        store.delete_blob(first.index_digest)
        second = _multiarch(store, cache)
        third = _multiarch(store, cache)
    assert not second.from_cache
    assert all(r.from_cache for r in second.manifests.values())
    assert second.index == first.index
    assert store.read_blob(first.index_digest) == first.index
    assert third.from_cache


@pytest.mark.parametrize(
    ("archs", "format"),
    [((ARM64, AMD64), "oci"), ((AMD64,), "oci"), ((AMD64, ARM64), "docker")],
)
def test_order_archs_and_format_change_the_key(
    built: Built, archs: tuple[Architecture, ...], format: str  # noqa: A002 - mirrors the API
) -> None:
    """Another architecture list, order or format is another index (and cache key)."""
    result = _multiarch(built.store, None, archs=archs, format=format)
    assert result.cache_key != built.result.cache_key
    assert result.architectures == tuple(a.oci_arch for a in archs)
    assert _platforms(result.index.decode()) == _expected_platforms(result)


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"archs": ()}, "at least one architecture"),
        ({"archs": (AMD64, ARM64, AMD64)}, "amd64 is listed twice"),
        ({"archs": (AMD64, Architecture("x86_64-linux", "amd64"))}, "amd64 is listed twice"),
        ({"archs": ("amd64",)}, "is not an Architecture"),
        ({"format": "v1"}, "unknown index format"),
    ],
)
def test_bad_requests_are_typed_errors(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    """Empty or duplicated architectures and unknown formats are InvalidInput, before Nix runs."""
    runner = RecordingRunner(SubprocessRunner())
    with pytest.raises(InvalidInput, match=message):
        build_multiarch(
            IMAGE, SOURCE, uploader=FilesystemStore(tmp_path / "s"), runner=runner, **kwargs
        )
    assert runner.calls == []

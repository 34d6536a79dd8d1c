"""Partial pulls for real: podman fetches only what changed from eStargz and zstd:chunked layers.

The path of ``benchmarks/bench_partial.py --quick`` (its harness,
``benchmarks/partial_harness.py``), asserted: images built with real Nix
from a synthetic package set of host binaries (/usr/sbin) at three
revisions, pushed by nixery-core to Debian's docker-registry, pulled by
podman with partial pulls through a byte-counting proxy, the update's root
filesystem compared file by file with the store.  One pull also goes
through the example registry (issue 16's Range support).  Then clients
without partial pulls (skopeo, Docker, containerd's ``ctr``, podman with
its defaults) pull and run an eStargz image as the ordinary gzip image it
also is.

The package set's seed here (5) is not the benchmark's (11): nothing was
tuned on it.  Module-scoped: one set of builds, one registry.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from client_daemons import Containerd, Dockerd, Podman, started
from conftest import OFFLINE_SET, require_root, require_tools
from containers import run_in_bundle, unpack

from benchmarks.bench_partial import CaseResult, Images, run_docker_registry, run_example_registry
from benchmarks.partial_harness import DockerRegistry, package_sets
from nixery_core.archive import ArchiveOptions
from nixery_core.build import build_image
from nixery_core.names import Image
from nixery_core.registry_push import push_image
from nixery_core.sources import LocalPathSource
from nixery_core.storage.filesystem import FilesystemStore

pytestmark = [pytest.mark.nix, pytest.mark.tools, pytest.mark.usefixtures("nix")]

FORMATS = ("estargz", "zstd-chunked")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    """Three revisions of an 8-package set (seed 5), built on demand per format."""
    require_tools("nix-build", "nix-store", "docker-registry", "podman")
    require_root("partial pulls (podman overlay mounts)")
    work = tmp_path_factory.mktemp("partial")
    revisions = package_sets(
        work / "sets",
        count=8,
        min_size=200_000,
        max_size=800_000,
        seed=5,
        host_paths=("/usr/sbin",),
    )
    return Images(work, revisions)


@pytest.fixture(scope="module")
def results(images: Images) -> dict[tuple[str, str], CaseResult]:
    """Every case and format pulled from docker-registry; (case, format) -> result."""
    return {
        (r.case, r.compression): r for r in run_docker_registry(images, FORMATS, ("leaf", "low"))
    }


@pytest.mark.parametrize("compression", FORMATS)
@pytest.mark.parametrize("case", ["leaf", "low"])
def test_update_is_pulled_by_ranges_and_the_rootfs_is_exact(
    results: dict[tuple[str, str], CaseResult], case: str, compression: str
) -> None:
    """podman fetches every changed layer by ranges (no whole-layer fallback); files are exact."""
    result = results[(case, compression)]
    assert result.pulls.partial_layers >= 1
    assert result.pulls.whole_layers == 0
    assert result.pulls.rootfs_problems == ()
    assert result.gzip.rootfs_problems == ()


@pytest.mark.parametrize("compression", FORMATS)
def test_low_level_change_costs_less_than_the_per_path_floor(
    results: dict[tuple[str, str], CaseResult], compression: str
) -> None:
    """A new low-level package renames every path; podman fetches less than per-path layers."""
    result = results[("low", compression)]
    assert result.pulls.update < result.floor
    assert result.pulls.update < result.gzip.update


@pytest.mark.parametrize("compression", FORMATS)
def test_first_pull_costs_about_the_gzip_image(
    results: dict[tuple[str, str], CaseResult], compression: str
) -> None:
    """The first pull of a file-granular image costs at most 1.15x the same image as gzip."""
    result = results[("leaf", compression)]
    assert result.pulls.first <= 1.15 * result.gzip.first


def test_example_registry_serves_partial_pulls(
    images: Images, results: dict[tuple[str, str], CaseResult], tmp_path: Path
) -> None:
    """The example registry (Range, multi-range) serves podman's partial pull of an update."""
    served = run_example_registry(
        tmp_path, images, ("zstd-chunked",), ("low",), list(results.values())
    )
    (result,) = served
    assert result.pulls.partial_layers >= 1
    assert result.pulls.whole_layers == 0
    assert result.pulls.rootfs_problems == ()
    assert result.pulls.update < result.floor


# --- an eStargz image is an ordinary gzip image to every other client ----------------


@pytest.fixture(scope="module")
def estargz_hello(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """shell/hello with eStargz layers, pushed to docker-registry; its reference."""
    require_tools("nix-build", "docker-registry")
    work = tmp_path_factory.mktemp("estargz-hello")
    store = FilesystemStore(work / "store")
    result = build_image(
        Image.from_name("shell/hello"),
        LocalPathSource(OFFLINE_SET),
        uploader=store,
        archive=ArchiveOptions(compression="estargz"),
        nix_options={"substituters": ""},
    )
    with DockerRegistry() as registry:
        reference = f"{registry.host}/estargz/hello:v1"
        push_image(
            store=store,
            manifest=result.manifest,
            manifest_media_type=result.manifest_media_type,
            target=reference,
            insecure=True,
            referrers=False,
        )
        yield reference


def test_skopeo_copies_and_runc_runs_the_estargz_image(estargz_hello: str, tmp_path: Path) -> None:
    """skopeo copies the eStargz image (digests verified) and runc runs hello from it."""
    require_tools("skopeo")
    layout = tmp_path / "layout"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--src-tls-verify=false",
            f"docker://{estargz_hello}",
            f"oci:{layout}:v1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    bundle = unpack(layout, "v1", tmp_path / "bundle")
    ran = run_in_bundle(bundle, ["hello"], state=tmp_path / "state")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "Hello, world!"
    assert (bundle / "rootfs" / "stargz.index.json").is_file()


def test_docker_ctr_and_podman_run_the_estargz_image(estargz_hello: str) -> None:
    """Docker, containerd's ctr and default podman pull the eStargz image whole and run hello."""
    require_tools("dockerd", "docker", "containerd", "ctr", "podman", "runc")
    require_root("client daemons (private daemons, runc)")
    host = estargz_hello.split("/", 1)[0]
    podman, containerd, dockerd = Podman(), Containerd(), Dockerd()
    with started(podman), started(containerd), started(dockerd):
        containerd.start()
        dockerd.start(insecure_registries=[host])
        for client in (podman, containerd, dockerd):
            assert client.pull(estargz_hello).startswith("sha256:")
            assert client.run_hello(estargz_hello).strip() == "Hello, world!"


if __name__ == "__main__":  # pragma: no cover - run the module alone
    sys.exit(pytest.main([__file__, "-q"]))


# --- against the reference writer: ctr-remote (stargz-snapshotter) ----------------------


def _layers_of_export(archive: Path, name: str) -> list[tuple[bytes, dict[str, str]]]:
    """(blob, annotations) of each layer of ``name`` in a ``ctr images export`` tarball."""
    import json
    import tarfile

    with tarfile.open(archive) as tar:

        def blob(digest: str) -> bytes:
            member = tar.extractfile("blobs/sha256/" + digest.removeprefix("sha256:"))
            assert member is not None
            return member.read()

        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        (entry,) = [m for m in index["manifests"]
                    if m.get("annotations", {}).get("io.containerd.image.name") == name]
        manifest = json.loads(blob(entry["digest"]))
        return [(blob(layer["digest"]), layer.get("annotations", {}))
                for layer in manifest["layers"]]


@pytest.mark.parametrize(("flag", "compression"), [("--estargz", "estargz"),
                                                    ("--zstdchunked", "zstd-chunked")])
def test_ctr_remote_reference_layers_list_the_same_files_and_digests(
    tmp_path: Path, flag: str, compression: str
) -> None:
    """ctr-remote (the stargz-snapshotter's writer) converts our gzip image; its TOCs, read by
    the same code as ours, name the same files with the same digests as our layers' TOCs."""
    require_tools("ctr-remote", "containerd", "nix-build", "docker-registry")
    require_root("containerd (a private daemon, runc)")
    from test_chunked_formats import _toc

    store = FilesystemStore(tmp_path / "store")
    built = {
        kind: build_image(
            Image.from_name("shell/hello"), LocalPathSource(OFFLINE_SET), uploader=store,
            archive=ArchiveOptions(compression=kind),  # type: ignore[arg-type]
            nix_options={"substituters": ""},
        )
        for kind in ("gzip", compression)
    }
    containerd = Containerd()
    with DockerRegistry() as registry, started(containerd):
        containerd.start()
        source = f"{registry.host}/hello:gzip"
        push_image(store=store, manifest=built["gzip"].manifest,
                   manifest_media_type=built["gzip"].manifest_media_type, target=source,
                   insecure=True, referrers=False)
        ctr = ["ctr-remote", "--address", str(containerd.socket), "--namespace", "nixery-test"]
        converted = f"{registry.host}/hello:converted"
        for argv in (
            ["images", "pull", "--plain-http", source],
            ["images", "convert", flag, "--oci", source, converted],
            ["images", "export", str(tmp_path / "export.tar"), converted],
        ):
            run = subprocess.run([*ctr, *argv], capture_output=True, text=True, timeout=300,
                                 check=False)
            assert run.returncode == 0, run.stderr[-2000:]
        theirs = _layers_of_export(tmp_path / "export.tar", converted)
    ours = [(store.read_blob(layer.digest), dict(layer.annotations))
            for layer in built[compression].layers]
    assert len(theirs) == len(ours)

    def files(blob: bytes) -> dict[str, str]:
        entries = _toc(compression, blob)[0]["entries"]
        return {e["name"]: e["digest"] for e in entries
                if e["type"] == "reg" and e["size"] and not e["name"].startswith(".")}

    for (their_blob, their_notes), (our_blob, our_notes) in zip(theirs, ours, strict=True):
        assert set(their_notes) <= set(our_notes)
        assert files(their_blob) == files(our_blob)

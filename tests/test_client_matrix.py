"""Real clients pull ``shell/hello`` and run ``hello``: podman, containerd's ``ctr``, Docker.

Each client runs with private state (tests/client_daemons.py) and pulls the
same image from two registries: the example registry building it on demand
(over the offline package set with real Nix), and Debian's
``docker-registry`` after ``nixery-core push``.  skopeo, the fourth client,
is covered in tests/test_example_registry.py and tests/test_push_e2e.py.

Module-scoped: the registries (one of them serving amd64 and arm64 for Docker's index
pull), one image, one daemon per client.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import attrs
import httpx
import pytest
from client_daemons import Containerd, Dockerd, Podman, started
from conftest import OFFLINE_SET, REPO, require_root, require_tools
from servers import DockerRegistry

from examples.registry import RegistryConfig, create_app, serving
from nixery_core.cache import BuildCache
from nixery_core.media_types import OCI_INDEX
from nixery_core.names import AMD64, ARM64
from nixery_core.sources import LocalPathSource
from nixery_core.storage.filesystem import FilesystemStore

pytestmark = [pytest.mark.nix, pytest.mark.tools, pytest.mark.usefixtures("nix")]

IMAGE = "shell/hello"
PUSHED_REPO = "nixery/hello"


@pytest.fixture(scope="module")
def registries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The example registry and a docker-registry holding the pushed image; name -> reference."""
    require_tools("nix-build", "nix-store", "docker-registry")
    work = tmp_path_factory.mktemp("client-matrix")
    with BuildCache(work / "cache") as cache:
        config = RegistryConfig(
            source=LocalPathSource(OFFLINE_SET), store=FilesystemStore(work / "store"),
            cache=cache, nix_options={"substituters": ""},
        )
        multiarch = attrs.evolve(
            config, archs=(AMD64, ARM64),
            nix_options={"substituters": "", "extra-platforms": "aarch64-linux"},
        )
        with (
            serving(create_app(config)) as base,
            serving(create_app(multiarch)) as multiarch_base,
            DockerRegistry() as registry,
        ):
            pushed = f"{registry.host}/{PUSHED_REPO}:v1"
            push = subprocess.run(
                [sys.executable, "-m", "nixery_core", "push", IMAGE, f"docker://{pushed}",
                 "--insecure", "--pkgs-path", str(OFFLINE_SET), "--offline",
                 "--store", str(work / "push-store"), "--cache", str(work / "push-cache")],
                capture_output=True, text=True, timeout=300, check=False,
            )
            assert push.returncode == 0, push.stderr
            example = base.removeprefix("http://")
            indexed = multiarch_base.removeprefix("http://")
            yield {
                "example": f"{example}/{IMAGE}:latest",
                "pushed": pushed,
                "multiarch": f"{indexed}/{IMAGE}:latest",
            }


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    """podman with private storage and configuration."""
    require_tools("podman", "runc")
    require_root("podman (private storage, runc)")
    client = Podman()
    with started(client):
        yield client


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    """containerd on a private root and socket."""
    require_tools("containerd", "ctr", "runc")
    require_root("containerd (a private daemon, runc)")
    daemon = Containerd()
    with started(daemon):
        daemon.start()
        yield daemon


@pytest.fixture(scope="module")
def dockerd(registries: dict[str, str]) -> Iterator[Dockerd]:
    """dockerd on a private data root and socket, trusting both registries over plain HTTP."""
    require_tools("dockerd", "docker", "runc")
    require_root("dockerd (a private daemon, runc)")
    daemon = Dockerd()
    hosts = sorted({reference.split("/", 1)[0] for reference in registries.values()})
    with started(daemon):
        daemon.start(insecure_registries=hosts)
        yield daemon


SOURCES = ["example", "pushed"]


@pytest.mark.parametrize("source", SOURCES)
def test_podman_pulls_and_runs_hello(
    podman: Podman, registries: dict[str, str], source: str
) -> None:
    """podman (private root, --tls-verify=false) pulls the image and runs hello."""
    reference = registries[source]
    assert podman.pull(reference).startswith("sha256:")
    assert podman.run_hello(reference).strip() == "Hello, world!"


@pytest.mark.parametrize("source", SOURCES)
def test_containerd_pulls_and_runs_hello(
    containerd: Containerd, registries: dict[str, str], source: str
) -> None:
    """ctr (private containerd, --plain-http) pulls the image and runs hello."""
    reference = registries[source]
    assert containerd.pull(reference).startswith("sha256:")
    assert containerd.run_hello(reference).strip() == "Hello, world!"


@pytest.mark.parametrize("source", SOURCES)
def test_docker_pulls_and_runs_hello(
    dockerd: Dockerd, registries: dict[str, str], source: str
) -> None:
    """docker (private dockerd, insecure registry) pulls the image and runs hello."""
    reference = registries[source]
    assert dockerd.pull(reference).startswith("sha256:")
    assert dockerd.run_hello(reference).strip() == "Hello, world!"


def test_repeated_docker_pulls_give_one_digest(
    dockerd: Dockerd, registries: dict[str, str]
) -> None:
    """Docker shuffles its Accept list on every pull; six pulls of one tag resolve one digest."""
    digests = {dockerd.pull(registries["example"]) for _ in range(6)}
    assert len(digests) == 1


def test_docker_pulls_an_index_with_one_digest(
    dockerd: Dockerd, registries: dict[str, str]
) -> None:
    """From a registry serving amd64 and arm64, Docker's shuffled pulls resolve one index
    digest (never alternating between an index and a manifest list) and run hello."""
    reference = registries["multiarch"]
    digests = {dockerd.pull(reference) for _ in range(4)}
    assert len(digests) == 1
    host, _ = reference.split("/", 1)
    index = httpx.get(
        f"http://{host}/v2/{IMAGE}/manifests/{digests.pop()}",
    )
    assert index.headers["content-type"] == OCI_INDEX
    assert dockerd.run_hello(reference).strip() == "Hello, world!"


def test_clients_agree_on_the_digest(
    podman: Podman, containerd: Containerd, dockerd: Dockerd, registries: dict[str, str]
) -> None:
    """podman, containerd and Docker resolve the example registry's tag to the same manifest."""
    reference = registries["example"]
    assert podman.pull(reference) == containerd.pull(reference) == dockerd.pull(reference)


def test_compatibility_table_names_the_tested_versions(
    podman: Podman, containerd: Containerd, dockerd: Dockerd
) -> None:
    """docs/clients.md's compatibility table names the client versions these tests ran."""
    rows = {}
    for line in (REPO / "docs" / "clients.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 2:
            rows[cells[0]] = cells[1]
    skopeo = subprocess.run(
        ["skopeo", "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()[-1]
    assert rows["skopeo"] == skopeo
    assert rows["podman"] == podman.version
    assert rows["containerd `ctr`"] == containerd.version
    assert rows["Docker"] == dockerd.version

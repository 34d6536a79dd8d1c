"""Content negotiation of the example registry (examples/registry/negotiation.py).

The answer depends on the media ranges a client sends and their q-values,
never on their order: Docker 20.10 shuffles its ``Accept`` list, and the
same tag must keep one digest.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from examples.registry import RegistryConfig, create_app, serving
from examples.registry.config import ManifestFormat
from examples.registry.negotiation import index_preferences, preferences
from nixery_core.cache import BuildCache
from nixery_core.media_types import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from nixery_core.names import AMD64, ARM64
from nixery_core.sources import LocalPathSource
from nixery_core.testing.runners import FakeNix, default_fake_packages
from nixery_core.testing.storage import MemoryStore

SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
#: What docker 20.10 sends, one header per type; it shuffles the order on every pull.
DOCKER_TYPES = [DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST, SCHEMA1]

media_types = st.sampled_from(
    [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_LIST, SCHEMA1,
     "application/json", "application/*", "*/*", "text/plain"]
)
qualities = st.sampled_from(["", ";q=1", ";q=0.9", ";q=0.5", ";q=0", ";q=0.001"])
accept_lists = st.lists(st.tuples(media_types, qualities).map("".join), max_size=8)


@given(accept_lists, st.randoms(use_true_random=False), st.sampled_from(["oci", "docker"]))
def test_order_never_matters(
    entries: list[str], rng: random.Random, preference: ManifestFormat
) -> None:
    """Any permutation of an Accept list, in one header or several, ranks forms the same way."""
    shuffled = list(entries)
    rng.shuffle(shuffled)
    as_one_header = [", ".join(shuffled)] if shuffled else []
    for variant in (shuffled, as_one_header):
        assert preferences(variant, preference) == preferences(entries, preference)
        assert index_preferences(variant, preference) == index_preferences(entries, preference)


@pytest.mark.parametrize(
    ("accept", "preference", "expected"),
    [
        ([OCI_MANIFEST, DOCKER_MANIFEST], "oci", ("oci", "docker")),
        ([OCI_MANIFEST, DOCKER_MANIFEST], "docker", ("docker", "oci")),
        ([f"{OCI_MANIFEST};q=0.8", DOCKER_MANIFEST], "oci", ("docker", "oci")),
        ([f"{DOCKER_MANIFEST};q=0", "*/*"], "docker", ("oci",)),
        (["application/json"], "docker", ("docker", "oci")),
        ([OCI_INDEX], "docker", ("oci", "docker")),
        ([DOCKER_MANIFEST_LIST], "oci", ("docker", "oci")),
        ([SCHEMA1], "oci", ()),
        ([f"{OCI_MANIFEST};q=0", f"{DOCKER_MANIFEST};q=0", "application/json"], "oci", ()),
        (["text/html"], "oci", ()),
        ([], "docker", ("docker", "oci")),
    ],
    ids=[
        "tie-oci", "tie-docker", "quality", "refused-by-q0", "json-only", "oci-index-only",
        "docker-list-only", "schema1-only", "all-refused", "html", "no-accept",
    ],
)
def test_preference_rules(
    accept: list[str], preference: ManifestFormat, expected: tuple[str, ...]
) -> None:
    """q-values first, then the server's preference; lenient for json-only and index-only."""
    assert preferences(accept, preference) == expected


# --- through a real server --------------------------------------------------------


def registry_config(tmp_path: Path, **changes: Any) -> RegistryConfig:
    """A registry config over fake Nix and an in-memory store."""
    root = tmp_path / "root"
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir(exist_ok=True)
    config = RegistryConfig(
        source=LocalPathSource(pkgs), store=MemoryStore(), cache=BuildCache(None),
        runner=FakeNix(root, default_fake_packages()), store_root=root,
    )
    return attrs.evolve(config, **changes)


@pytest.fixture(params=["oci", "docker"])
def preferred(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A registry with each server preference; yields (base URL, preference)."""
    config = registry_config(tmp_path, default_format=request.param)
    with serving(create_app(config)) as base:
        yield base, request.param


def shuffled_docker_headers(rng: random.Random) -> list[tuple[str, str]]:
    """Docker 20.10's Accept headers in a random order."""
    types = list(DOCKER_TYPES)
    rng.shuffle(types)
    return [("Accept", media_type) for media_type in types]


def test_shuffled_docker_accept_gives_one_digest(preferred: tuple[str, str]) -> None:
    """Twenty pulls with Docker's Accept list shuffled all get the server-preferred manifest."""
    base, preference = preferred
    rng = random.Random(16)  # noqa: S311 - a seeded shuffle, not a secret
    answers = {
        (r.headers["content-type"], r.headers["docker-content-digest"])
        for r in (
            httpx.head(f"{base}/v2/shell/hello/manifests/latest",
                       headers=shuffled_docker_headers(rng))
            for _ in range(20)
        )
    }
    assert len(answers) == 1
    ((media_type, _),) = answers
    assert media_type == (OCI_MANIFEST if preference == "oci" else DOCKER_MANIFEST)


def test_shuffled_docker_accept_gives_one_index(tmp_path: Path) -> None:
    """With several architectures, Docker's shuffled list always gets the same index digest."""
    config = registry_config(tmp_path, archs=(AMD64, ARM64))
    rng = random.Random(17)  # noqa: S311 - a seeded shuffle, not a secret
    with serving(create_app(config)) as base:
        answers = {
            (r.headers["content-type"], r.headers["docker-content-digest"])
            for r in (
                httpx.get(f"{base}/v2/hello/manifests/latest",
                          headers=shuffled_docker_headers(rng))
                for _ in range(12)
            )
        }
    assert len(answers) == 1
    assert next(iter(answers))[0] == OCI_INDEX


@pytest.mark.parametrize(
    ("accept", "media_type"),
    [
        ("application/json", OCI_MANIFEST),
        (OCI_INDEX, OCI_MANIFEST),
        (DOCKER_MANIFEST_LIST, DOCKER_MANIFEST),
    ],
    ids=["json-only", "oci-index-only", "docker-list-only"],
)
def test_lenient_accept_gets_a_manifest(
    tmp_path: Path, accept: str, media_type: str
) -> None:
    """Like distribution, a client asking only for JSON or only for an index gets a manifest."""
    with serving(create_app(registry_config(tmp_path))) as base:
        response = httpx.get(f"{base}/v2/hello/manifests/latest", headers={"Accept": accept})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media_type


def test_index_only_accept_gets_the_index(tmp_path: Path) -> None:
    """With several architectures, a client naming only an index type gets that index."""
    config = registry_config(tmp_path, archs=(AMD64, ARM64))
    with serving(create_app(config)) as base:
        response = httpx.get(
            f"{base}/v2/hello/manifests/latest", headers={"Accept": DOCKER_MANIFEST_LIST}
        )
    assert response.headers["content-type"] == DOCKER_MANIFEST_LIST

"""Queries across SBOMs: Nix's version order, checked against real Nix, and find_components."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import OFFLINE_SET, require_tools
from hypothesis import given, settings
from hypothesis import strategies as st

from nixery_core.build import build_image
from nixery_core.errors import InvalidInput
from nixery_core.names import Image
from nixery_core.sbom.query import compare_versions, find_components
from nixery_core.sources import LocalPathSource
from nixery_core.testing.storage import MemoryStore

PAIRS = [
    ("1.0", "1.0"), ("1.0", "1.0.1"), ("1.2pre1", "1.2"), ("1.2", "1.2a"), ("2.3a", "2.3.1"),
    ("1.1.1w", "3"), ("3.0.13", "3"), ("3.0.13", "3.0.2"), ("1.0-rc1", "1.0"), ("pre", "0"),
    ("10", "9"), ("1.0.0", "1"), ("a", "b"), ("", "1"), ("2024-01-02", "2024.1.2"),
    ("1_2", "1.2"), ("007", "7"), ("1.2.3pre", "1.2.3"), ("unstable-2023-01-01", "0.1"),
]

version_text = st.text(alphabet="0123456789.-abpre_", max_size=10)


def _nix_compare(pairs: list[tuple[str, str]]) -> list[int]:
    """builtins.compareVersions on each pair, in one Nix evaluation (versions passed as JSON)."""
    require_tools("nix-instantiate")
    out = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--argstr", "pairs", json.dumps(pairs),
         "-E", "{ pairs }: map (p: builtins.compareVersions (builtins.elemAt p 0) "
               "(builtins.elemAt p 1)) (builtins.fromJSON pairs)"],
        check=True, capture_output=True, timeout=60,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_compare_versions_agrees_with_nix_on_known_cases() -> None:
    """Hand-picked orderings (pre, letters, dates, leading zeros) match builtins.compareVersions."""
    assert [compare_versions(a, b) for a, b in PAIRS] == _nix_compare(PAIRS)


@settings(max_examples=1, deadline=None)
@given(st.lists(st.tuples(version_text, version_text), min_size=300, max_size=300))
def test_compare_versions_agrees_with_nix_on_random_versions(pairs: list[tuple[str, str]]) -> None:
    """300 random version pairs compare as Nix compares them (one Nix call)."""
    assert [compare_versions(a, b) for a, b in pairs] == _nix_compare(pairs)


@pytest.mark.usefixtures("nix")
def test_find_components_answers_which_images_have_old_openssl() -> None:
    """Of four built images, only those with socat contain openssl below 3 (1.1.1w)."""
    store = MemoryStore()
    documents = {}
    for name in ("shell/hello", "shell/curl", "shell/socat", "curl/socat"):
        result = build_image(
            Image.from_name(name), LocalPathSource(OFFLINE_SET), uploader=store,
            nix_options={"substituters": ""},
        )
        documents[name] = result.sbom(store, "cyclonedx")
    old = find_components(documents, "openssl", below="3")
    assert [(m.image, m.version, m.requested) for m in old] == [
        ("curl/socat", "1.1.1w", False), ("shell/socat", "1.1.1w", False),
    ]
    every = find_components(documents, "openssl")
    assert sorted(str(m.version) for m in every) == ["1.1.1w", "1.1.1w", "3.0.13", "3.0.13"]
    assert {m.image for m in every} == {"curl/socat", "shell/curl", "shell/socat"}


def test_find_components_rejects_a_document_that_is_not_cyclonedx() -> None:
    """An SPDX or garbage document is a typed error naming the image."""
    with pytest.raises(InvalidInput, match="img"):
        find_components({"img": b'{"spdxVersion": "SPDX-2.3"}'}, "openssl")

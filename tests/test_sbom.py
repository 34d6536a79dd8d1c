"""SBOMs from real Nix builds of the offline set, checked by spdx-tools and cyclonedx-python-lib."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
from conftest import OFFLINE_SET, require_tools
from graph_strategies import closures
from hypothesis import given, settings
from packageurl import PackageURL
from sbom_validators import cyclonedx_problem, spdx_problems

from nixery_core import nix
from nixery_core.build import BuildResult, build_image
from nixery_core.cache import BuildCache
from nixery_core.errors import InvalidInput
from nixery_core.graph import RuntimeGraph
from nixery_core.image_config import ImageConfig
from nixery_core.manifest import parse_manifest
from nixery_core.names import Image
from nixery_core.package_meta import License, PackageMeta
from nixery_core.runner import SubprocessRunner
from nixery_core.sbom import fallback_tag, parse_store_path_name, referrers_index
from nixery_core.sbom.cyclonedx import render_cyclonedx
from nixery_core.sbom.inventory import Component, Inventory
from nixery_core.sbom.provenance import CREATED, REVISION
from nixery_core.sbom.spdx import render_spdx
from nixery_core.sources import LocalPathSource
from nixery_core.testing.runners import RecordingRunner
from nixery_core.testing.storage import MemoryStore

OPTIONS = {"substituters": ""}


@attrs.frozen
class Built:
    store: MemoryStore
    cache: BuildCache
    runner: RecordingRunner
    result: BuildResult


@pytest.fixture(scope="module")
def socat() -> Built:
    """``shell/socat`` (socat -> openssl 1.1.1w -> busybox) built once with real Nix."""
    require_tools("nix-build", "nix-instantiate", "nix-store", "nix")
    store, cache = MemoryStore(), BuildCache()
    runner = RecordingRunner(SubprocessRunner())
    result = build_image(
        Image.from_name("shell/socat"), LocalPathSource(OFFLINE_SET), runner=runner,
        uploader=store, cache=cache, nix_options=OPTIONS,
    )
    return Built(store, cache, runner, result)


def _cdx(built: Built) -> dict[str, object]:
    return json.loads(built.result.sbom(built.store, "cyclonedx"))  # type: ignore[no-any-return]


def _closure(roots: list[str]) -> set[str]:
    out = subprocess.run(["nix-store", "-qR", *roots], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def _references(path: str) -> set[str]:
    out = subprocess.run(
        ["nix-store", "-q", "--references", path], check=True, capture_output=True, text=True
    )
    return set(out.stdout.split()) - {path}


def test_spdx_document_validates_with_spdx_tools(socat: Built) -> None:
    """The SPDX 2.3 document passes spdx-tools' full validation."""
    assert spdx_problems(socat.result.sbom(socat.store, "spdx")) == []


def test_cyclonedx_document_validates_with_cyclonedx_python_lib(socat: Built) -> None:
    """The CycloneDX 1.5 document passes cyclonedx-python-lib's strict JSON validator."""
    assert cyclonedx_problem(socat.result.sbom(socat.store, "cyclonedx")) is None


def test_every_store_path_is_a_component_with_its_nix_references(socat: Built) -> None:
    """Components are exactly `nix-store -qR` of the roots, and dependencies its references."""
    document = _cdx(socat)
    components = {c["bom-ref"]: c for c in document["components"]}  # type: ignore[attr-defined]
    dependencies = {d["ref"]: set(d["dependsOn"]) for d in document["dependencies"]}  # type: ignore[attr-defined]
    roots = sorted(dependencies["image"])
    assert set(components) == _closure(roots)
    for path in components:
        assert dependencies[path] == _references(path), path


def test_components_carry_name_version_purl_with_store_hash_and_size(socat: Built) -> None:
    """Each purl parses as pkg:nix with the store hash; size and hash are Nix's NAR's."""
    document = _cdx(socat)
    by_name = {c["name"]: c for c in document["components"]}  # type: ignore[attr-defined]
    openssl = by_name["openssl"]
    assert openssl["version"] == "1.1.1w"
    assert openssl["type"] == "library"
    purl = PackageURL.from_string(openssl["purl"])
    assert (purl.type, purl.name, purl.version) == ("nix", "openssl", "1.1.1w")
    assert openssl["bom-ref"].split("/")[-1].startswith(purl.qualifiers["store_hash"] + "-")
    props = {p["name"]: p["value"] for p in openssl["properties"]}
    info = json.loads(subprocess.run(
        ["nix", "--extra-experimental-features", "nix-command", "path-info", "--json",
         openssl["bom-ref"]], check=True, capture_output=True).stdout)
    assert int(props["nix:nar_size"]) == info[0]["narSize"]
    base16 = subprocess.run(
        ["nix", "--extra-experimental-features", "nix-command", "hash", "to-base16",
         "--type", "sha256", info[0]["narHash"]], check=True, capture_output=True, text=True,
    ).stdout.strip()
    assert openssl["hashes"] == [{"alg": "SHA-256", "content": base16}]


def test_requested_packages_are_marked_with_the_package_sets_meta(socat: Built) -> None:
    """socat is requested and carries meta's licence and homepage; busybox, a dependency, none."""
    document = _cdx(socat)
    by_name = {c["name"]: c for c in document["components"]}  # type: ignore[attr-defined]
    socat_c = by_name["socat"]
    assert socat_c["type"] == "application"
    assert {"name": "nixery-core:requested_as", "value": "socat"} in socat_c["properties"]
    assert socat_c["licenses"][0]["license"]["id"] == "GPL-2.0-only"
    assert socat_c["externalReferences"] == [
        {"type": "website", "url": "http://www.dest-unreach.org/socat/"}
    ]
    assert "licenses" not in by_name["busybox"]
    spdx = json.loads(socat.result.sbom(socat.store, "spdx"))
    declared = {p["name"]: p["licenseDeclared"] for p in spdx["packages"]}
    assert declared["socat"] == "GPL-2.0-only"
    assert declared["busybox"] == "NOASSERTION"


def test_same_inputs_give_the_same_bytes_and_a_hit_runs_no_nix(socat: Built) -> None:
    """A fresh store rebuilds byte-identical SBOMs; a cache hit serves them with no Nix call."""
    calls = len(socat.runner.calls)
    hit = build_image(
        Image.from_name("shell/socat"), LocalPathSource(OFFLINE_SET), runner=socat.runner,
        uploader=socat.store, cache=socat.cache, nix_options=OPTIONS,
    )
    assert hit.from_cache
    assert len(socat.runner.calls) == calls
    assert hit.sboms == socat.result.sboms
    store = MemoryStore()
    again = build_image(
        Image.from_name("shell/socat"), LocalPathSource(OFFLINE_SET), uploader=store,
        nix_options=OPTIONS,
    )
    for fmt in ("spdx", "cyclonedx"):
        assert again.sbom(store, fmt) == socat.result.sbom(socat.store, fmt)


def test_sbom_of_an_unknown_format_is_a_typed_error(socat: Built) -> None:
    """Asking for a format the build has not raises InvalidInput naming the formats."""
    with pytest.raises(InvalidInput, match="spdx"):
        socat.result.sbom(socat.store, "swid")  # type: ignore[arg-type]


def test_artifact_manifests_have_the_image_as_subject(socat: Built) -> None:
    """Each SBOM's artifact manifest points at the image; the referrers index lists them."""
    result, store = socat.result, socat.store
    for artifact in result.sboms:
        manifest = json.loads(store.read_blob(artifact.manifest_digest))
        assert manifest["subject"]["digest"] == result.manifest_digest
        assert manifest["artifactType"] == artifact.artifact_type
        assert manifest["layers"][0]["digest"] == artifact.document_digest
        assert parse_manifest(store.read_blob(artifact.manifest_digest)).config.size == 2
    index = json.loads(referrers_index(store, result.manifest_digest))
    assert {m["digest"] for m in index["manifests"]} == {a.manifest_digest for a in result.sboms}
    only = json.loads(referrers_index(store, result.manifest_digest, "application/spdx+json"))
    assert [m["artifactType"] for m in only["manifests"]] == ["application/spdx+json"]
    assert fallback_tag(result.manifest_digest) == "sha256-" + result.manifest_digest[7:]
    assert set(result.blobs) >= {d for a in result.sboms for d in a.blobs}


def test_config_labels_and_manifest_annotations_name_created_and_revision(socat: Built) -> None:
    """The config's labels and the OCI manifest's annotations carry the standard keys."""
    config = json.loads(socat.result.config)["config"]["Labels"]
    manifest = json.loads(socat.result.manifest)["annotations"]
    assert config[CREATED] == manifest[CREATED] == "1970-01-01T00:00:00Z"
    revision = LocalPathSource(OFFLINE_SET).resolve("latest").revision
    assert config[REVISION] == manifest[REVISION] == revision


@pytest.mark.usefixtures("nix")
def test_caller_labels_win_and_docker_manifests_carry_no_annotations() -> None:
    """A caller's label overrides the standard one; Docker schema 2 still builds."""
    store = MemoryStore()
    result = build_image(
        Image.from_name("hello"), LocalPathSource(OFFLINE_SET), uploader=store,
        config=ImageConfig(labels={CREATED: "mine"}), manifest_format="docker",
        nix_options=OPTIONS,
    )
    assert json.loads(result.config)["config"]["Labels"][CREATED] == "mine"
    assert "annotations" not in json.loads(result.manifest)
    assert spdx_problems(result.sbom(store, "spdx")) == []


@pytest.mark.usefixtures("nix")
def test_throwing_or_odd_meta_is_left_out_never_fatal(tmp_path: Path) -> None:
    """meta fields that throw or have other types are just absent; good ones are kept."""
    (tmp_path / "default.nix").write_text(
        '{ system ? builtins.currentSystem, ... }:\n'
        'let d = n: derivation { name = n; inherit system; builder = "/bin/sh"; }; in {\n'
        '  a = d "a-1.0" // { pname = "a"; version = "1.0"; meta = {\n'
        '    description = throw "x"; homepage = [ "https://a" (throw "y") 3 ];\n'
        '    license = [ { spdxId = "MIT"; fullName = throw "z"; shortName = "mit"; }\n'
        '                "custom" (throw "w") 5 ]; }; };\n'
        '  b = d "b" // { meta = throw "m"; version = 5; };\n'
        '  c = d "c" // { meta = 7; };\n'
        '}\n'
    )
    resolved = nix.resolve(
        ["a", "b", "c"], LocalPathSource(tmp_path).resolve("latest"), "x86_64-linux",
        runner=SubprocessRunner(), nix_options=OPTIONS,
    )
    a, b, c = (r.meta for r in resolved)
    assert a is not None
    assert (a.pname, a.version, a.description) == ("a", "1.0", None)
    assert a.homepage == ("https://a",)
    assert [(lic.spdx_id, lic.name) for lic in a.licenses] == [("MIT", "mit"), (None, "custom")]
    assert b is not None
    assert (b.version, b.licenses) == (None, ())
    assert c is not None
    assert c.homepage == ()


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("openssl-3.0.13", ("openssl", "3.0.13", None)),
        ("openssl-3.0.13-bin", ("openssl", "3.0.13", "bin")),
        ("python3.11-requests-2.31.0", ("python3.11-requests", "2.31.0", None)),
        ("bash-interactive", ("bash-interactive", None, None)),
        ("multiout-man", ("multiout", None, "man")),
        ("glibc-2.38-27", ("glibc", "2.38-27", None)),
    ],
)
def test_store_path_names_split_as_nix_parsedrvname(
    name: str, parsed: tuple[str, str | None, str | None]
) -> None:
    """Name, version and output come apart as builtins.parseDrvName splits them."""
    assert parse_store_path_name(name) == parsed


def test_purls_of_odd_names_round_trip_through_packageurl() -> None:
    """Names with spaces, '+', '@' or UTF-8 survive as purls packageurl-python reads back."""
    for name, version in [("gtk+", "3.24"), ("ünï côdé", None), ("a@b", "1?2")]:
        component = Component(
            path=f"/nix/store/{'a' * 32}-x", name=name, version=version, output=None,
            size=1, references=(),
        )
        purl = PackageURL.from_string(component.purl)
        assert (purl.name, purl.version) == (name, version)
        assert purl.qualifiers == {"store_hash": "a" * 32}


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "nixery_core", *args], capture_output=True, timeout=300,
        check=False, env={**os.environ, **(env or {})},
    )


@pytest.mark.usefixtures("nix")
def test_cli_prints_the_sbom_then_writes_it_from_the_cache_without_nix(tmp_path: Path) -> None:
    """`nixery-core sbom` prints valid SPDX; a second run, with no Nix on PATH, writes CycloneDX."""
    common = ["--pkgs-path", str(OFFLINE_SET), "--offline", "--store", str(tmp_path / "store"),
              "--cache", str(tmp_path / "cache")]
    first = _cli("sbom", "shell/hello", *common)
    assert first.returncode == 0, first.stderr
    assert spdx_problems(first.stdout) == []
    out = tmp_path / "hello.cdx.json"
    no_nix = tmp_path / "bin"  # nothing on PATH: a Nix call would fail the run
    no_nix.mkdir()
    second = _cli("sbom", "shell/hello", *common, "--sbom-format", "cyclonedx", "-o", str(out),
                  env={"PATH": str(no_nix)})
    assert second.returncode == 0, second.stderr
    assert cyclonedx_problem(out.read_bytes()) is None
    names = {c["name"] for c in json.loads(out.read_bytes())["components"]}
    assert {"hello", "busybox", "bash-interactive"} <= names


def test_licences_without_spdx_ids_and_odd_names_still_validate() -> None:
    """A licence known only by name becomes a LicenseRef (SPDX) or a named licence (CycloneDX)."""
    meta = PackageMeta(
        pname="odd pkg+", version="1.0 beta", description="ünïcödé",
        homepage=("https://a.example/", "https://b.example/"),
        licenses=(License(None, "Custom: Some Licence (v2)", None), License("MIT", "MIT", None)),
    )
    path = f"/nix/store/{'b' * 32}-odd-pkg-1.0"
    dep = f"/nix/store/{'c' * 32}-dep-2.0-lib"
    inventory = Inventory(
        name="odd/image", tag="v1", architecture="arm64", created="2024-05-01T12:00:00Z",
        source={}, components=(
            Component(path, "odd pkg+", "1.0 beta", None, 10, (dep,), ("odd",), meta,
                      "sha256-" + "A" * 43 + "="),
            Component(dep, "dep", "2.0", "lib", 5, ()),
        ),
    )
    digest = "sha256:" + "d" * 64
    spdx = render_spdx(inventory, digest)
    assert spdx_problems(spdx) == []
    declared = {p["name"]: p["licenseDeclared"] for p in json.loads(spdx)["packages"]}
    assert declared["odd pkg+"] == "LicenseRef-Custom-Some-Licence-v2 AND MIT"
    cdx = render_cyclonedx(inventory, digest)
    assert cyclonedx_problem(cdx) is None
    assert render_spdx(inventory, digest) == spdx


@settings(max_examples=12, deadline=None)
@given(closures(max_paths=25))
def test_any_closure_gives_valid_documents_listing_every_path_and_edge(graph: RuntimeGraph) -> None:
    """For random closures both documents validate, list every path once and every edge."""
    inventory = Inventory.from_graph(
        graph, Image.from_name("random"), created="1970-01-01T00:00:00Z", source={}
    )
    digest = "sha256:" + "e" * 64
    spdx = render_spdx(inventory, digest)
    cdx = render_cyclonedx(inventory, digest)
    assert spdx_problems(spdx) == []
    assert cyclonedx_problem(cdx) is None
    document = json.loads(cdx)
    assert [c["bom-ref"] for c in document["components"]] == list(graph.paths)
    edges = {(d["ref"], target) for d in document["dependencies"] for target in d["dependsOn"]}
    expected = {(p.path, r) for p in graph for r in p.references}
    expected |= {("image", root) for root in graph.roots}
    assert edges == expected
    relationships = json.loads(spdx)["relationships"]
    depends = [r for r in relationships if r["relationshipType"] == "DEPENDS_ON"]
    assert len(depends) == len(expected)

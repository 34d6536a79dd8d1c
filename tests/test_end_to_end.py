"""The real path: real Nix, the command line, skopeo, umoci and runc.

``shell/hello`` is built from the offline package set in nix/offline into an
OCI layout that real container tools inspect, unpack and run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import OFFLINE_SET, require_tools
from containers import run_in_bundle, unpack

from nixery_core.build import build_image
from nixery_core.cache import BuildCache
from nixery_core.names import Image
from nixery_core.runner import SubprocessRunner
from nixery_core.sources import LocalPathSource
from nixery_core.storage.filesystem import FilesystemStore

pytestmark = pytest.mark.usefixtures("nix")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nixery_core", *args],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def hello_layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """shell/hello built by the command line into an OCI layout; (layout, stdout)."""
    work = tmp_path_factory.mktemp("e2e")
    layout = work / "oci"
    done = cli(
        "build", "shell/hello", "--pkgs-path", str(OFFLINE_SET), "--offline",
        "--store", str(work / "store"), "--cache", str(work / "cache"), "--oci", str(layout),
    )
    assert done.returncode == 0, done.stderr
    assert "[nix]" in done.stderr  # progress by stage on stderr
    return layout, done.stdout


def test_cli_prints_a_layer_table(hello_layout: tuple[Path, str]) -> None:
    """The build command prints one row per layer with packages, and the manifest digest."""
    _layout, out = hello_layout
    assert "hello" in out
    assert "busybox" in out
    assert "manifest sha256:" in out


def test_skopeo_accepts_the_layout(hello_layout: tuple[Path, str]) -> None:
    """skopeo inspects the OCI layout: amd64/linux and the layers of our manifest."""
    require_tools("skopeo")
    layout, out = hello_layout
    inspected = subprocess.run(
        ["skopeo", "inspect", f"oci:{layout}:latest"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    info = json.loads(inspected.stdout)
    assert info["Architecture"] == "amd64"
    assert info["Os"] == "linux"
    assert info["Digest"] in out
    raw = json.loads(
        subprocess.run(
            ["skopeo", "inspect", "--raw", f"oci:{layout}:latest"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
    )
    assert [layer["digest"] for layer in raw["layers"]] == info["Layers"]


def test_runc_runs_hello_and_bash_from_the_image(
    hello_layout: tuple[Path, str], tmp_path: Path
) -> None:
    """umoci unpacks the image; runc runs hello and bash from it, with /tmp and the CA bundle."""
    layout, _ = hello_layout
    bundle = unpack(layout, "latest", tmp_path / "bundle")
    hello = run_in_bundle(bundle, ["hello"], state=tmp_path / "state")
    assert hello.returncode == 0, hello.stderr
    assert hello.stdout.strip() == "Hello, world!"
    shell = run_in_bundle(
        bundle,
        ["bash", "-c", 'echo ok; stat -c %a /tmp; test -s "$SSL_CERT_FILE" && echo cert'],
        state=tmp_path / "state",
    )
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.split() == ["ok", "1777", "cert"]


def test_rootfs_tmp_mode_and_cert_on_disk(hello_layout: tuple[Path, str], tmp_path: Path) -> None:
    """In the unpacked rootfs, /tmp is mode 1777 and the CA bundle path resolves to a file."""
    layout, _ = hello_layout
    rootfs = unpack(layout, "latest", tmp_path / "bundle") / "rootfs"
    assert (rootfs / "tmp").stat().st_mode & 0o7777 == 0o1777
    target = rootfs / "etc/ssl/certs/ca-bundle.crt"
    while target.is_symlink():
        link = str(target.readlink())
        target = rootfs / link.lstrip("/") if link.startswith("/") else target.parent / link
    assert target.is_file()
    assert b"BEGIN CERTIFICATE" in target.read_bytes() or target.stat().st_size > 0


def test_real_builds_are_reproducible(tmp_path: Path) -> None:
    """Two real builds with separate stores and caches give the same manifest and blobs."""
    stores = [FilesystemStore(tmp_path / side / "store") for side in ("a", "b")]
    digests = []
    for side, store in zip(("a", "b"), stores, strict=True):
        with BuildCache(tmp_path / side / "cache") as cache:
            result = build_image(
                Image.from_name("shell/hello"), LocalPathSource(OFFLINE_SET),
                runner=SubprocessRunner(), uploader=store, cache=cache,
                nix_options={"substituters": ""},
            )
        digests.append(result)
    first, second = digests
    assert first.manifest_digest == second.manifest_digest
    for digest in first.blobs:
        assert stores[0].read_blob(digest) == stores[1].read_blob(digest)


def test_cli_unknown_packages_exit_2_naming_them(tmp_path: Path) -> None:
    """An unknown package is a clear error naming it, with exit code 2."""
    done = cli("build", "hello/nosuchpkg", "--pkgs-path", str(OFFLINE_SET), "--offline",
               "--store", str(tmp_path / "s"), "--cache", str(tmp_path / "c"))
    assert done.returncode == 2
    assert "unknown packages: nosuchpkg" in done.stderr


def test_cli_invalid_name_and_missing_source_exit_2(tmp_path: Path) -> None:
    """An invalid name and a missing package source are clear errors with exit code 2."""
    bad = cli("build", "Hello/../x", "--pkgs-path", str(OFFLINE_SET),
              "--store", str(tmp_path / "s"))
    assert bad.returncode == 2
    assert "invalid image name" in bad.stderr
    env = dict.fromkeys(("NIXERY_PKGS_PATH", "NIXERY_PKGS_REPO", "NIXERY_CHANNEL"), "")
    nosrc = cli("build", "hello", "--store", str(tmp_path / "s"), env=env)
    assert nosrc.returncode == 2
    assert "no package source" in nosrc.stderr
    missing = cli("build", "hello", "--pkgs-path", str(tmp_path / "nowhere"),
                  "--store", str(tmp_path / "s"))
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr


def test_demo_command_runs_hello(tmp_path: Path) -> None:
    """The README's main job: the demo builds shell/hello and runs hello from the image."""
    require_tools("skopeo", "umoci")
    done = cli("demo", "--workdir", str(tmp_path / "demo"))
    assert done.returncode == 0, done.stderr
    assert "Hello, world!" in done.stdout
    assert "ok from bash in the image" in done.stdout


def test_cli_builds_a_multiarch_index(tmp_path: Path) -> None:
    """--arch amd64,arm64 writes an index listing both architectures, which skopeo reads."""
    require_tools("skopeo")
    layout = tmp_path / "oci"
    done = cli("build", "shell/hello", "--arch", "amd64,arm64", "--pkgs-path", str(OFFLINE_SET),
               "--offline", "--nix-option", "extra-platforms=aarch64-linux",
               "--store", str(tmp_path / "s"), "--cache", str(tmp_path / "c"),
               "--oci", str(layout))
    assert done.returncode == 0, done.stderr
    assert "[arm64]" in done.stdout
    raw = json.loads(subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci:{layout}:latest"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout)
    assert raw["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert sorted(m["platform"]["architecture"] for m in raw["manifests"]) == ["amd64", "arm64"]


def test_cli_expression_file_joins_the_image(tmp_path: Path) -> None:
    """--expr-file/--expr-attr add a trusted file's derivations to the image."""
    tools = tmp_path / "tools.nix"
    tools.write_text("pkgs: { extra = [ pkgs.nano ]; }\n")
    done = cli("build", "hello", "--expr-file", str(tools), "--expr-attr", "extra",
               "--pkgs-path", str(OFFLINE_SET), "--offline",
               "--store", str(tmp_path / "s"), "--cache", str(tmp_path / "c"))
    assert done.returncode == 0, done.stderr
    assert "nano" in done.stdout
    assert "hello" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--env", "NOEQUALS"], "--env takes KEY=VALUE"),
        (["--nix-option", "=x"], "--nix-option takes KEY=VALUE"),
        (["--arch", "amd64,sparc"], "--arch takes amd64"),
        (["--expr-attr", "x"], "--expr-attr needs --expr-file"),
        (["--user", "root:0:0"], "user"),
    ],
)
def test_cli_bad_options_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    """Malformed options are clear errors with exit code 2, never a traceback."""
    done = cli("build", "hello", "--pkgs-path", str(OFFLINE_SET), "--offline",
               "--store", str(tmp_path / "s"), *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr

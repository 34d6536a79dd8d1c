"""``nixery-core push`` into a real docker-registry; skopeo pulls it back and runc runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import OFFLINE_SET, require_tools
from containers import run_in_bundle, unpack
from servers import DockerRegistry

from nixery_core.build import build_image
from nixery_core.cache import BuildCache
from nixery_core.names import Image
from nixery_core.registry_push import push_image
from nixery_core.sources import LocalPathSource
from nixery_core.storage.filesystem import FilesystemStore

pytestmark = pytest.mark.usefixtures("nix")


@pytest.fixture(scope="module")
def registry() -> Iterator[DockerRegistry]:
    require_tools("docker-registry", "skopeo")
    with DockerRegistry() as server:
        yield server


def test_cli_push_then_pull_and_run_hello(registry: DockerRegistry, tmp_path: Path) -> None:
    """The pushed image is accepted by skopeo, pulled back intact, and runs hello."""
    target = f"{registry.host}/nixery/hello:v1"
    pushed = subprocess.run(
        [sys.executable, "-m", "nixery_core", "push", "shell/hello", f"docker://{target}",
         "--insecure", "--pkgs-path", str(OFFLINE_SET), "--offline",
         "--store", str(tmp_path / "store"), "--cache", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=300, check=False, env=dict(os.environ),
    )
    assert pushed.returncode == 0, pushed.stderr
    assert "pushed sha256:" in pushed.stdout
    inspect = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{target}"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert '"Architecture": "amd64"' in inspect.stdout
    layout = tmp_path / "pulled"
    subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", f"docker://{target}", f"oci:{layout}:v1"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    bundle = unpack(layout, "v1", tmp_path / "bundle")
    ran = run_in_bundle(bundle, ["hello"], state=tmp_path / "state")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "Hello, world!"


def test_second_push_uploads_no_blob(registry: DockerRegistry, tmp_path: Path) -> None:
    """Pushing the same image again sends no blob: every one is already there (HEAD)."""
    store = FilesystemStore(tmp_path / "store")
    with BuildCache(tmp_path / "cache") as cache:
        result = build_image(Image.from_name("shell/hello"), LocalPathSource(OFFLINE_SET),
                             uploader=store, cache=cache, nix_options={"substituters": ""})
    target = f"{registry.host}/nixery/again:latest"
    first = push_image(store=store, manifest=result.manifest,
                       manifest_media_type=result.manifest_media_type, target=target,
                       insecure=True)
    second = push_image(store=store, manifest=result.manifest,
                        manifest_media_type=result.manifest_media_type, target=target,
                        insecure=True)
    # layers and config, then the SBOMs' blobs: the shared empty config and two documents
    assert first.blobs_uploaded == len(result.layers) + 1 + 3
    assert first.manifest_digest == result.manifest_digest
    assert second.blobs_uploaded == 0
    assert second.bytes_sent == 0
    assert second.blobs_skipped == len(result.layers) + 1 + 3

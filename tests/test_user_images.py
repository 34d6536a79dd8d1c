"""Image configuration and non-root users, end to end: real Nix, skopeo, umoci and runc.

``shell/hello`` is built from the offline package set with ``build_image``
once as root (no user) and once with a user and every configuration field
set, written to one OCI layout under two tags, then inspected by skopeo and
run by runc from a bundle umoci unpacked (umoci turns the config's ``User``,
``Env`` and ``WorkingDir`` into the runtime spec, as any runtime would).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import attrs
import pytest
from conftest import OFFLINE_SET, require_tools
from containers import run_in_bundle, unpack

from nixery_core.build import BuildResult, build_image
from nixery_core.cache import BuildCache
from nixery_core.image_config import EPOCH, ImageConfig, User
from nixery_core.names import Image
from nixery_core.oci_layout import write_oci_layout
from nixery_core.sources import LocalPathSource
from nixery_core.storage.filesystem import FilesystemStore

pytestmark = [pytest.mark.nix, pytest.mark.tools, pytest.mark.usefixtures("nix")]

NIX_OPTIONS = {"substituters": ""}
APP = User("app", 1000, 1000)
#: Every configuration field set to something other than its default.
CONFIGURED = ImageConfig(
    env={"GREETING": "hello from the config", "PATH": "/bin:/usr/bin"},
    entrypoint=["/bin/sh", "-c"],
    cmd=["hello"],
    working_dir="/home/app",
    exposed_ports=["8080", "53/udp"],
    labels={"org.opencontainers.image.title": "hello", "team": "nixery"},
    user=APP,
)


@attrs.frozen
class Built:
    """The layout both images are in, the store, and the two builds."""

    layout: Path
    store: FilesystemStore
    user: BuildResult
    root: BuildResult


def _build(store: FilesystemStore, cache: BuildCache, config: ImageConfig | None) -> BuildResult:
    return build_image(
        Image.from_name("shell/hello"), LocalPathSource(OFFLINE_SET), uploader=store,
        cache=cache, config=config, nix_options=NIX_OPTIONS,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """shell/hello as root (tag ``root``) and configured as ``app`` (tag ``user``)."""
    work = tmp_path_factory.mktemp("user-images")
    store = FilesystemStore(work / "store")
    layout = work / "oci"
    with BuildCache(work / "cache") as cache:
        user = _build(store, cache, CONFIGURED)
        root = _build(store, cache, None)
    for ref, result in (("user", user), ("root", root)):
        write_oci_layout(
            layout, store=store, manifest=result.manifest, ref_name=ref,
            media_type=result.manifest_media_type,
        )
    return Built(layout, store, user, root)


@pytest.fixture(scope="module")
def user_bundle(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``user`` image unpacked by umoci."""
    return unpack(built.layout, "user", tmp_path_factory.mktemp("user-bundle") / "bundle")


def _skopeo_json(*args: str) -> dict[str, object]:
    require_tools("skopeo")
    done = subprocess.run(
        ["skopeo", *args], capture_output=True, text=True, timeout=60, check=True
    )
    parsed = json.loads(done.stdout)
    assert isinstance(parsed, dict)
    return parsed


# --- users under runc ----------------------------------------------------------------


def test_user_image_runs_as_uid_1000_named_app(user_bundle: Path, tmp_path: Path) -> None:
    """runc runs the user image's processes as uid/gid 1000, which /etc/passwd names ``app``."""
    ran = run_in_bundle(
        user_bundle, ["sh", "-c", "id -u; id -g; id -un; id -gn"], state=tmp_path / "state"
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["1000", "1000", "app", "app"]


def test_user_home_exists_is_owned_and_is_the_working_dir(
    user_bundle: Path, tmp_path: Path
) -> None:
    """The home directory is owned by 1000:1000, writable by the user and the WorkingDir."""
    ran = run_in_bundle(
        user_bundle,
        ["sh", "-c", 'pwd; stat -c "%u %g %a" /home/app; touch note && echo written'],
        state=tmp_path / "state",
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == ["/home/app", "1000 1000 755", "written"]
    note = user_bundle / "rootfs" / "home" / "app" / "note"
    assert (note.stat().st_uid, note.stat().st_gid) == (1000, 1000)


def test_user_sees_the_configured_environment(user_bundle: Path, tmp_path: Path) -> None:
    """Env from the config reaches the process; a configured PATH replaces the default."""
    ran = run_in_bundle(
        user_bundle, ["sh", "-c", 'echo "$GREETING"; echo "$PATH"; echo "$SSL_CERT_FILE"'],
        state=tmp_path / "state",
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == [
        "hello from the config", "/bin:/usr/bin", "/etc/ssl/certs/ca-bundle.crt",
    ]


def test_passwd_and_group_name_root_and_the_user(user_bundle: Path) -> None:
    """The user image's /etc/passwd and /etc/group hold root and app with the given ids."""
    etc = user_bundle / "rootfs" / "etc"
    passwd = [line.split(":") for line in (etc / "passwd").read_text().splitlines()]
    group = [line.split(":") for line in (etc / "group").read_text().splitlines()]
    assert [(p[0], p[2], p[3], p[5]) for p in passwd] == [
        ("root", "0", "0", "/root"), ("app", "1000", "1000", "/home/app"),
    ]
    assert [(g[0], g[2]) for g in group] == [("root", "0"), ("app", "1000")]


def test_root_image_resolves_root(built: Built, tmp_path: Path) -> None:
    """An image without a user runs as uid 0, which its minimal /etc/passwd names ``root``."""
    bundle = unpack(built.layout, "root", tmp_path / "bundle")
    ran = run_in_bundle(bundle, ["sh", "-c", "id -u; id -un; id -gn"], state=tmp_path / "state")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["0", "root", "root"]
    assert not (bundle / "rootfs" / "home").exists()


# --- configuration as skopeo sees it --------------------------------------------------


def test_skopeo_sees_every_configured_field(built: Built) -> None:
    """skopeo reads Env, Entrypoint, Cmd, WorkingDir, ports, labels and User from the image."""
    config = _skopeo_json("inspect", "--config", f"oci:{built.layout}:user")
    runtime = config["config"]
    assert isinstance(runtime, dict)
    assert "GREETING=hello from the config" in runtime["Env"]
    assert "PATH=/bin:/usr/bin" in runtime["Env"]
    assert runtime["Entrypoint"] == ["/bin/sh", "-c"]
    assert runtime["Cmd"] == ["hello"]
    assert runtime["WorkingDir"] == "/home/app"
    assert runtime["ExposedPorts"] == {"53/udp": {}, "8080/tcp": {}}
    labels = {"org.opencontainers.image.title": "hello", "team": "nixery"}
    assert runtime["Labels"].items() >= labels.items()  # the standard keys join them
    assert runtime["Labels"]["org.opencontainers.image.created"] == "1970-01-01T00:00:00Z"
    assert runtime["User"] == "1000:1000"
    summary = _skopeo_json("inspect", f"oci:{built.layout}:user")
    assert summary["Labels"] == runtime["Labels"]
    assert summary["Digest"] == built.user.manifest_digest


def test_created_defaults_to_the_epoch(built: Built) -> None:
    """Both images say they were created at the epoch, in the config and in its history."""
    for ref in ("user", "root"):
        config = _skopeo_json("inspect", "--config", f"oci:{built.layout}:{ref}")
        assert config["created"] == EPOCH == "1970-01-01T00:00:00Z"
        history = config["history"]
        assert isinstance(history, list)
        assert {entry["created"] for entry in history} == {EPOCH}


def test_root_image_has_no_user_and_the_default_cmd(built: Built) -> None:
    """Without configuration: no User, Cmd ``bash`` (shell), default Env, standard Labels."""
    runtime = _skopeo_json("inspect", "--config", f"oci:{built.layout}:root")["config"]
    assert isinstance(runtime, dict)
    assert "User" not in runtime
    assert runtime["Cmd"] == ["bash"]
    assert sorted(runtime) == ["Cmd", "Env", "Labels"]
    assert sorted(runtime["Labels"]) == [
        "org.opencontainers.image.created", "org.opencontainers.image.revision"
    ]


# --- every field is part of the cache key --------------------------------------------

VARIANTS: dict[str, ImageConfig] = {
    "default": ImageConfig(),
    "env": ImageConfig(env={"A": "1"}),
    "entrypoint": ImageConfig(entrypoint=["hello"]),
    "cmd": ImageConfig(cmd=["hello"]),
    "working_dir": ImageConfig(working_dir="/tmp"),
    "exposed_ports": ImageConfig(exposed_ports=["80"]),
    "labels": ImageConfig(labels={"a": "b"}),
    "created": ImageConfig(created="2024-01-01T00:00:00Z"),
    "user": ImageConfig(user=APP),
    "user_home": ImageConfig(user=User("app", 1000, 1000, "/srv/app")),
}


def test_each_config_change_gives_another_key_and_manifest(tmp_path: Path) -> None:
    """Every config field changes the cache key and the manifest; the same config is a hit."""
    store = FilesystemStore(tmp_path / "store")
    with BuildCache(tmp_path / "cache") as cache:
        results = {name: _build(store, cache, config) for name, config in VARIANTS.items()}
        again = _build(store, cache, VARIANTS["user"])
    assert len({r.cache_key for r in results.values()}) == len(VARIANTS)
    assert len({r.manifest_digest for r in results.values()}) == len(VARIANTS)
    assert len({r.config_digest for r in results.values()}) == len(VARIANTS)
    assert not any(r.from_cache for r in results.values())
    assert again.from_cache
    assert (again.cache_key, again.manifest) == (results["user"].cache_key,
                                                 results["user"].manifest)
    created = json.loads(results["created"].config)
    assert created["created"] == "2024-01-01T00:00:00Z"

"""Image configs, manifests and indexes: spec field names, deterministic bytes, strict parsing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nixery_core.digests import sha256_digest
from nixery_core.errors import InvalidDigest, InvalidInput, InvalidManifest
from nixery_core.image_config import DEFAULT_PATH, ImageConfig, User
from nixery_core.manifest import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_LAYER_TAR,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MAX_MANIFEST_SIZE,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    LayerDescriptor,
    ManifestRef,
    Platform,
    canonical_json,
    parse_index,
    parse_manifest,
    render_config,
    render_index,
    render_manifest,
    sniff_media_type,
)
from nixery_core.names import AMD64, ARM64
from nixery_core.protocols import BlobInfo, JSONValue


def _digest(seed: str) -> str:
    return sha256_digest(seed.encode())


DIFF_IDS = [_digest("tar-1"), _digest("tar-2")]
LAYERS = [
    LayerDescriptor(_digest("gz-1"), 1234, OCI_LAYER_GZIP, DIFF_IDS[0]),
    LayerDescriptor(_digest("gz-2"), 99, OCI_LAYER_GZIP, DIFF_IDS[1]),
]
CONFIG_BLOB = BlobInfo(_digest("config"), 512, OCI_CONFIG)
FULL = ImageConfig(
    env={"PATH": "/custom/bin", "LANG": "C.UTF-8"},
    entrypoint=["/bin/tini", "--"],
    cmd=["serve", "--port", "80"],
    working_dir="/srv",
    exposed_ports=["80", "53/udp"],
    labels={"org.opencontainers.image.title": "caf\u00e9"},
    user=User("app", 1000, 100),
)


def _config(config: ImageConfig = FULL, **kwargs: object) -> dict[str, JSONValue]:
    args: dict[str, object] = {"arch": AMD64, "diff_ids": DIFF_IDS, "config": config}
    args.update(kwargs)
    document = json.loads(render_config(**args))  # type: ignore[arg-type]  # test builds kwargs
    assert isinstance(document, dict)
    return document


def _nulls(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, dict):
        return any(_nulls(v) for v in value.values())
    if isinstance(value, list):
        return any(_nulls(v) for v in value)
    return False


# --- config ------------------------------------------------------------------


def test_config_uses_spec_key_names() -> None:
    """The config has the OCI top-level keys and the capitalised runtime keys, exactly."""
    document = _config()
    assert set(document) == {"architecture", "os", "created", "config", "rootfs", "history"}
    run = document["config"]
    assert isinstance(run, dict)
    assert set(run) == {
        "Env",
        "Cmd",
        "Entrypoint",
        "WorkingDir",
        "ExposedPorts",
        "Labels",
        "User",
    }
    assert document["rootfs"] == {"type": "layers", "diff_ids": DIFF_IDS}
    assert (document["architecture"], document["os"]) == ("amd64", "linux")
    assert run["ExposedPorts"] == {"53/udp": {}, "80/tcp": {}}
    assert run["User"] == "1000:100"
    assert run["WorkingDir"] == "/srv"


def test_config_env_merges_defaults_under_user_env() -> None:
    """Defaults (PATH, SSL_CERT_FILE) are present unless the user's env overrides them."""
    run = _config()["config"]
    assert isinstance(run, dict)
    assert run["Env"] == [
        "LANG=C.UTF-8",
        "PATH=/custom/bin",
        "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt",
    ]
    plain = _config(ImageConfig())["config"]
    assert isinstance(plain, dict)
    assert plain["Env"] == [f"PATH={DEFAULT_PATH}", "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"]
    custom = _config(ImageConfig(env={"A": "1"}), default_env={"PATH": "/bin"})["config"]
    assert isinstance(custom, dict)
    assert custom["Env"] == ["A=1", "PATH=/bin"]


def test_config_omits_empty_fields_and_never_writes_null() -> None:
    """A bare config has only Env; nothing anywhere is null."""
    document = _config(ImageConfig(), default_cmd=None)
    assert document["config"] == {
        "Env": [f"PATH={DEFAULT_PATH}", "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"]
    }
    assert not _nulls(document)
    assert not _nulls(_config())
    empty_cmd = _config(ImageConfig(cmd=[]), default_cmd=["bash"])["config"]
    assert isinstance(empty_cmd, dict)
    assert "Cmd" not in empty_cmd


def test_config_default_cmd_rules() -> None:
    """default_cmd applies without cmd and entrypoint; an explicit cmd or an entrypoint wins."""

    def cmd(config: ImageConfig) -> object:
        run = _config(config, default_cmd=["bash"])["config"]
        assert isinstance(run, dict)
        return run.get("Cmd")

    assert cmd(ImageConfig()) == ["bash"]
    assert cmd(ImageConfig(cmd=["htop"])) == ["htop"]
    assert cmd(ImageConfig(entrypoint=["/bin/app"])) is None


def test_config_history_one_entry_per_layer() -> None:
    """History has one created_by per layer, given or generic; a wrong count is refused."""
    document = _config(history=["layer one", "layer two"])
    assert document["history"] == [
        {"created": "1970-01-01T00:00:00Z", "created_by": "layer one"},
        {"created": "1970-01-01T00:00:00Z", "created_by": "layer two"},
    ]
    generic = _config()["history"]
    assert isinstance(generic, list)
    assert len(generic) == 2
    with pytest.raises(InvalidInput):
        _config(history=["only one"])


def test_config_rejects_bad_diff_ids_and_env() -> None:
    """A malformed diff_id or default env name is a typed error."""
    with pytest.raises(InvalidDigest):
        _config(diff_ids=["sha256:nothex"])
    with pytest.raises(InvalidInput):
        _config(default_env={"A=B": "x"})


def test_config_arm64() -> None:
    """The architecture comes from the Architecture value."""
    assert _config(arch=ARM64)["architecture"] == "arm64"


def test_config_bytes_are_canonical_and_stable_across_processes() -> None:
    """Rendering twice, or in another interpreter, gives the same bytes: sorted compact UTF-8."""
    kwargs = {"arch": AMD64, "diff_ids": DIFF_IDS, "config": FULL, "default_cmd": ["bash"]}
    first = render_config(**kwargs)  # type: ignore[arg-type]  # test builds kwargs
    assert first == render_config(**kwargs)  # type: ignore[arg-type]  # test builds kwargs
    assert first == canonical_json(json.loads(first))
    assert b", " not in first
    assert "caf\u00e9".encode() in first
    script = (
        "import sys; from tests.test_manifest import FULL, DIFF_IDS; "
        "from nixery_core.manifest import render_config; from nixery_core.names import AMD64; "
        "sys.stdout.buffer.write(render_config(arch=AMD64, diff_ids=DIFF_IDS, config=FULL, "
        "default_cmd=['bash']))"
    )
    other = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        check=True,
        env={"PYTHONHASHSEED": "7"},
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert other.stdout == first


# --- manifests -----------------------------------------------------------------


def test_oci_manifest_fields() -> None:
    """An OCI manifest: schemaVersion 2, its media type, OCI config and layer descriptors."""
    data, media_type = render_manifest(config=CONFIG_BLOB, layers=LAYERS, format="oci")
    assert media_type == OCI_MANIFEST
    document = json.loads(data)
    assert document["schemaVersion"] == 2
    assert document["mediaType"] == OCI_MANIFEST
    assert document["config"] == {
        "mediaType": OCI_CONFIG,
        "digest": CONFIG_BLOB.digest,
        "size": CONFIG_BLOB.size,
    }
    assert document["layers"] == [
        {"mediaType": OCI_LAYER_GZIP, "digest": layer.digest, "size": layer.size}
        for layer in LAYERS
    ]
    assert "annotations" not in document


def test_docker_manifest_differs_only_in_media_types() -> None:
    """Docker schema 2 uses Docker types for manifest, config and layers; the rest is identical."""
    oci, _ = render_manifest(config=CONFIG_BLOB, layers=LAYERS, format="oci")
    docker, media_type = render_manifest(config=CONFIG_BLOB, layers=LAYERS, format="docker")
    assert media_type == DOCKER_MANIFEST
    document = json.loads(docker)
    assert document["mediaType"] == DOCKER_MANIFEST
    assert document["config"]["mediaType"] == DOCKER_CONFIG
    assert {layer["mediaType"] for layer in document["layers"]} == {DOCKER_LAYER_GZIP}
    translated = (
        docker.decode()
        .replace(DOCKER_MANIFEST, OCI_MANIFEST)
        .replace(DOCKER_CONFIG, OCI_CONFIG)
        .replace(DOCKER_LAYER_GZIP, OCI_LAYER_GZIP)
    )
    assert json.loads(translated) == json.loads(oci)


def test_docker_manifest_maps_uncompressed_and_refuses_zstd() -> None:
    """Uncompressed layers map to the Docker tar type; zstd has no Docker type."""
    tar = LayerDescriptor(_digest("t"), 10, OCI_LAYER_TAR, _digest("t"))
    data, _ = render_manifest(config=CONFIG_BLOB, layers=[tar], format="docker")
    assert json.loads(data)["layers"][0]["mediaType"] == DOCKER_LAYER_TAR
    zstd = LayerDescriptor(_digest("z"), 10, OCI_LAYER_ZSTD, _digest("t"))
    with pytest.raises(InvalidInput, match="zstd"):
        render_manifest(config=CONFIG_BLOB, layers=[zstd], format="docker")
    data, _ = render_manifest(config=CONFIG_BLOB, layers=[zstd], format="oci")
    assert json.loads(data)["layers"][0]["mediaType"] == OCI_LAYER_ZSTD


def test_manifest_annotations_oci_only() -> None:
    """OCI manifests carry annotations; Docker schema 2 refuses them rather than drop them."""
    data, _ = render_manifest(
        config=CONFIG_BLOB, layers=LAYERS, format="oci", annotations={"a": "1"}
    )
    assert json.loads(data)["annotations"] == {"a": "1"}
    with pytest.raises(InvalidInput):
        render_manifest(config=CONFIG_BLOB, layers=LAYERS, format="docker", annotations={"a": "1"})


def test_unknown_format_refused() -> None:
    """Only 'oci' and 'docker' are formats."""
    with pytest.raises(InvalidInput):
        render_manifest(config=CONFIG_BLOB, layers=LAYERS, format="v1")  # type: ignore[arg-type]  # the bad value is the point
    with pytest.raises(InvalidInput):
        render_index([], "schema1")  # type: ignore[arg-type]  # the bad value is the point


@pytest.mark.parametrize(
    "kwargs",
    [
        {"digest": "sha256:../../etc"},
        {"diff_id": "md5:d41d8cd98f00b204e9800998ecf8427e"},
        {"size": -1},
        {"size": True},
        {"media_type": "not a media type"},
    ],
)
def test_layer_descriptor_validates(kwargs: dict[str, object]) -> None:
    """LayerDescriptor refuses bad digests, sizes and media types on construction."""
    fields: dict[str, object] = {
        "digest": _digest("a"),
        "size": 1,
        "media_type": OCI_LAYER_GZIP,
        "diff_id": _digest("b"),
    }
    fields.update(kwargs)
    with pytest.raises(InvalidInput):
        LayerDescriptor(**fields)  # type: ignore[arg-type]  # the bad value is the point


@given(
    st.lists(
        st.tuples(st.binary(max_size=8), st.integers(0, 2**40), st.sampled_from([0, 1])),
        max_size=8,
    ),
    st.sampled_from(["oci", "docker"]),
)
def test_manifest_round_trips_and_is_deterministic(
    layers: list[tuple[bytes, int, int]], fmt: str
) -> None:
    """parse_manifest(render_manifest(x)) gives back x's descriptors; rendering is repeatable."""
    descriptors = [
        LayerDescriptor(
            sha256_digest(seed), size, [OCI_LAYER_GZIP, OCI_LAYER_TAR][kind], sha256_digest(seed)
        )
        for seed, size, kind in layers
    ]
    data, media_type = render_manifest(config=CONFIG_BLOB, layers=descriptors, format=fmt)  # type: ignore[arg-type]  # sampled from the two formats
    again, _ = render_manifest(config=CONFIG_BLOB, layers=descriptors, format=fmt)  # type: ignore[arg-type]  # sampled from the two formats
    assert data == again
    parsed = parse_manifest(data, media_type)
    assert parsed.media_type == media_type
    assert (parsed.config.digest, parsed.config.size) == (CONFIG_BLOB.digest, CONFIG_BLOB.size)
    assert [(d.digest, d.size) for d in parsed.layers] == [(d.digest, d.size) for d in descriptors]
    assert parsed.blobs == (parsed.config, *parsed.layers)


# --- indexes -------------------------------------------------------------------


def test_oci_index_and_docker_list() -> None:
    """Indexes list each platform's manifest with architecture and os, in the given order."""
    amd = ManifestRef(_digest("m-amd"), 400, OCI_MANIFEST, AMD64)
    arm = (_digest("m-arm"), 401, OCI_MANIFEST, ARM64)
    data, media_type = render_index([amd, arm], "oci")
    assert media_type == OCI_INDEX
    document = json.loads(data)
    assert document["schemaVersion"] == 2
    assert document["mediaType"] == OCI_INDEX
    assert [m["platform"] for m in document["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux"},
    ]
    assert document["manifests"][1] == {
        "mediaType": OCI_MANIFEST,
        "digest": _digest("m-arm"),
        "size": 401,
        "platform": {"architecture": "arm64", "os": "linux"},
    }
    docker, docker_type = render_index(
        [ManifestRef(_digest("d"), 5, DOCKER_MANIFEST, AMD64)], "docker"
    )
    assert docker_type == DOCKER_MANIFEST_LIST
    assert json.loads(docker)["mediaType"] == DOCKER_MANIFEST_LIST
    parsed = parse_index(data)
    assert [m.platform for m in parsed.manifests] == [Platform("amd64"), Platform("arm64")]


def test_index_refuses_duplicates_and_non_manifests() -> None:
    """Two entries for one platform, or an entry that is a config, are refused."""
    amd = ManifestRef(_digest("m"), 4, OCI_MANIFEST, AMD64)
    with pytest.raises(InvalidInput, match="two index entries"):
        render_index([amd, amd], "oci")
    with pytest.raises(InvalidInput, match="not an image manifest"):
        render_index([ManifestRef(_digest("c"), 4, OCI_CONFIG, AMD64)], "oci")


# --- parsing -------------------------------------------------------------------

_OK_LAYER = {"mediaType": OCI_LAYER_GZIP, "digest": _digest("l"), "size": 3}
_OK_CONFIG = {"mediaType": OCI_CONFIG, "digest": _digest("c"), "size": 2}


def _manifest(**changes: object) -> bytes:
    document: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _OK_CONFIG,
        "layers": [_OK_LAYER],
    }
    document.update(changes)
    return json.dumps({k: v for k, v in document.items() if v != "DROP"}).encode()


@pytest.mark.parametrize(
    ("data", "hint"),
    [
        (b"not json", None),
        (b"\xff\xfe", None),
        (b"[]", None),
        (_manifest(schemaVersion=1), None),
        (_manifest(schemaVersion=True), None),
        (_manifest(layers="DROP"), None),
        (_manifest(layers={}), None),
        (_manifest(config="DROP"), None),
        (_manifest(config={**_OK_CONFIG, "digest": "sha256:../../etc/passwd"}), None),
        (_manifest(config={**_OK_CONFIG, "digest": "sha512:" + "a" * 128}), None),
        (_manifest(layers=[{**_OK_LAYER, "size": -1}]), None),
        (_manifest(layers=[{**_OK_LAYER, "size": "3"}]), None),
        (_manifest(layers=[{**_OK_LAYER, "size": False}]), None),
        (_manifest(layers=[{**_OK_LAYER, "mediaType": 7}]), None),
        (_manifest(layers=[{**_OK_LAYER, "mediaType": "nonsense"}]), None),
        (_manifest(layers=[{**_OK_LAYER, "annotations": {"a": 1}}]), None),
        (_manifest(layers=["sha256:x"]), None),
        (_manifest(mediaType=OCI_INDEX), None),
        (_manifest(), DOCKER_MANIFEST),
        (b" " * (MAX_MANIFEST_SIZE + 1), None),
    ],
)
def test_parse_manifest_refuses_malformed(data: bytes, hint: str | None) -> None:
    """Every malformed manifest is an InvalidManifest, never a KeyError or TypeError."""
    with pytest.raises(InvalidManifest):
        parse_manifest(data, hint)


def test_parse_manifest_without_media_type_field() -> None:
    """A manifest without mediaType takes the declared type, else OCI."""
    data = _manifest(mediaType="DROP")
    assert parse_manifest(data).media_type == OCI_MANIFEST
    assert parse_manifest(data, DOCKER_MANIFEST).media_type == DOCKER_MANIFEST
    assert parse_manifest(data).layers == (Descriptor(OCI_LAYER_GZIP, _digest("l"), 3),)


@pytest.mark.parametrize(
    "data",
    [
        json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX}).encode(),
        json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{}]}).encode(),
        json.dumps(
            {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST, "manifests": [_OK_LAYER]}
        ).encode(),
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [{**_OK_LAYER, "platform": {"architecture": 1, "os": "linux"}}],
            }
        ).encode(),
        _manifest(),
    ],
)
def test_parse_index_refuses_malformed(data: bytes) -> None:
    """Indexes without entries, with bad entries, or Docker lists without platforms are refused."""
    with pytest.raises(InvalidManifest):
        parse_index(data)


def test_sniff_media_type() -> None:
    """The media type comes from the field, else from the document's shape."""
    assert sniff_media_type(_manifest(mediaType=DOCKER_MANIFEST)) == DOCKER_MANIFEST
    assert sniff_media_type(_manifest(mediaType="DROP")) == OCI_MANIFEST
    assert sniff_media_type(b'{"schemaVersion":2,"manifests":[]}') == OCI_INDEX
    with pytest.raises(InvalidManifest):
        sniff_media_type(b'{"schemaVersion":2}')


def test_canonical_json_refuses_nan() -> None:
    """NaN is not JSON; canonical_json refuses it instead of writing it."""
    with pytest.raises(ValueError, match="JSON"):
        canonical_json({"x": float("nan")})

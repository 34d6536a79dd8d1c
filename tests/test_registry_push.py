"""push_image against Debian's docker-registry, checked with skopeo."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
from conftest import require_tools
from servers import DockerRegistry, TokenServer, registry

from nixery_core.digests import sha256_digest
from nixery_core.errors import BlobNotFound, InvalidImageName, InvalidInput, RegistryError
from nixery_core.media_types import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
)
from nixery_core.registry_push import BasicAuth, BearerToken, ImageTarget, push_image
from nixery_core.testing.storage import MemoryStore

__all__ = ["registry"]

pytestmark = pytest.mark.tools

BUSYBOX = Path("/usr/bin/busybox")
SMALL_CHUNK = 256 * 1024


@attrs.frozen
class Image:
    """A hand-made one-layer image whose blobs are in ``store``."""

    store: MemoryStore
    manifest: bytes
    layer_digest: str
    config_digest: str
    diff_id: str


def _layer() -> tuple[bytes, str]:
    """A gzip tar with bin/busybox (static) and bin/sh -> busybox; returns (blob, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo("bin")
        directory.type, directory.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(directory)
        data = BUSYBOX.read_bytes()
        member = tarfile.TarInfo("bin/busybox")
        member.size, member.mode = len(data), 0o755
        tar.addfile(member, io.BytesIO(data))
        link = tarfile.TarInfo("bin/sh")
        link.type, link.linkname, link.mode = tarfile.SYMTYPE, "busybox", 0o777
        tar.addfile(link)
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, compresslevel=1, mtime=0), sha256_digest(tar_bytes)


@pytest.fixture(scope="module")
def layer() -> tuple[bytes, str]:
    """The busybox layer, made once."""
    if not BUSYBOX.is_file():
        require_tools("busybox")
    return _layer()


def _image(layer: tuple[bytes, str], label: str = "one") -> Image:
    blob, diff_id = layer
    store = MemoryStore()
    layer_info = store.put_blob(blob, OCI_LAYER_GZIP)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Labels": {"test": label}},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        },
        sort_keys=True,
    ).encode()
    config_info = store.put_blob(config, OCI_CONFIG)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_info.digest, "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER_GZIP, "digest": layer_info.digest, "size": len(blob)}
            ],
        },
        sort_keys=True,
    ).encode()
    return Image(store, manifest, layer_info.digest, config_info.digest, diff_id)


@attrs.define
class Recorder:
    """An httpx client whose requests are recorded as (method, path)."""

    calls: list[tuple[str, str]] = attrs.Factory(list)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(event_hooks={"request": [self._record]}, timeout=30, **kwargs)

    def _record(self, request: httpx.Request) -> None:
        self.calls.append((request.method, request.url.path))

    def count(self, method: str, fragment: str = "") -> int:
        return sum(1 for m, path in self.calls if m == method and fragment in path)


def _skopeo(*args: str) -> str:
    require_tools("skopeo")
    result = subprocess.run(
        ["skopeo", "--insecure-policy", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _push(image: Image, target: str, **kwargs: Any) -> Any:
    return push_image(
        store=image.store,
        manifest=image.manifest,
        manifest_media_type=OCI_MANIFEST,
        target=target,
        insecure=True,
        **kwargs,
    )


def test_push_then_skopeo_pulls(
    registry: DockerRegistry, layer: tuple[bytes, str], tmp_path: Path
) -> None:
    """A pushed image (layer sent in PATCH chunks) is inspected and copied out by skopeo intact."""
    image = _image(layer)
    recorder = Recorder()
    with recorder.client() as client:
        result = _push(image, f"{registry.host}/busybox:v1", chunk_size=SMALL_CHUNK, client=client)
    assert result.manifest_digest == sha256_digest(image.manifest)
    assert (result.blobs_uploaded, result.blobs_skipped, result.blobs_mounted) == (2, 0, 0)
    assert result.bytes_sent == len(layer[0]) + len(image.store.read_blob(image.config_digest))
    assert result.manifests_pushed == 1
    assert recorder.count("PATCH") == -(-len(layer[0]) // SMALL_CHUNK)

    inspected = json.loads(
        _skopeo("inspect", "--tls-verify=false", f"docker://{registry.host}/busybox:v1")
    )
    assert inspected["Digest"] == result.manifest_digest
    assert inspected["Layers"] == [image.layer_digest]
    assert inspected["Labels"] == {"test": "one"}

    out = tmp_path / "oci"
    _skopeo(
        "copy", "--src-tls-verify=false", f"docker://{registry.host}/busybox:v1", f"oci:{out}:v1"
    )
    pulled = out / "blobs" / "sha256" / image.layer_digest.removeprefix("sha256:")
    assert pulled.read_bytes() == layer[0]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(pulled.read_bytes()))) as tar:
        member = tar.extractfile("bin/busybox")
        assert member is not None
        assert (
            hashlib.sha256(member.read()).digest() == hashlib.sha256(BUSYBOX.read_bytes()).digest()
        )


def test_second_push_uploads_nothing(registry: DockerRegistry, layer: tuple[bytes, str]) -> None:
    """Pushing an image again HEADs each blob and uploads none."""
    image = _image(layer, label="again")
    _push(image, f"{registry.host}/again:v1")
    recorder = Recorder()
    with recorder.client() as client:
        result = _push(image, f"{registry.host}/again:v2", client=client)
    assert (result.blobs_uploaded, result.blobs_skipped, result.bytes_sent) == (0, 2, 0)
    assert recorder.count("POST") == recorder.count("PATCH") == 0
    assert recorder.count("PUT", "/blobs/") == 0
    assert recorder.count("HEAD", "/blobs/") == 2


def test_cross_repository_mount(registry: DockerRegistry, layer: tuple[bytes, str]) -> None:
    """With mount_from, blobs already in another repository are mounted, not uploaded."""
    image = _image(layer, label="mount")
    _push(image, f"{registry.host}/source:v1")
    recorder = Recorder()
    with recorder.client() as client:
        result = _push(image, f"{registry.host}/mirror/copy:v1", mount_from="source", client=client)
    assert (result.blobs_mounted, result.blobs_uploaded, result.bytes_sent) == (2, 0, 0)
    assert recorder.count("POST", "/blobs/uploads/") == 2
    assert recorder.count("PATCH") == 0
    assert {image.layer_digest, image.config_digest} <= registry.repository_blobs("mirror/copy")
    _skopeo("inspect", "--tls-verify=false", f"docker://{registry.host}/mirror/copy:v1")


def test_failed_mount_falls_back_to_upload(
    registry: DockerRegistry, layer: tuple[bytes, str]
) -> None:
    """A mount the registry cannot do uploads through the session it opens instead."""
    image = _image(layer, label="fallback")
    recorder = Recorder()
    with recorder.client() as client:
        result = _push(image, f"{registry.host}/fallback:v1", mount_from="empty", client=client)
    assert (result.blobs_mounted, result.blobs_uploaded) == (0, 2)
    assert recorder.count("POST") == 2


def test_index_push(registry: DockerRegistry, layer: tuple[bytes, str]) -> None:
    """An image index pushes its child manifest by digest, then itself under the tag."""
    image = _image(layer, label="index")
    child = image.store.put_blob(image.manifest, OCI_MANIFEST)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": child.digest,
                    "size": child.size,
                    "platform": {"architecture": "amd64", "os": "linux"},
                }
            ],
        }
    ).encode()
    result = push_image(
        store=image.store,
        manifest=index,
        manifest_media_type=OCI_INDEX,
        target=f"{registry.host}/multi:v1",
        insecure=True,
    )
    assert result.manifests_pushed == 2
    assert result.manifest_digest == sha256_digest(index)
    raw = _skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/multi:v1")
    assert json.loads(raw)["manifests"][0]["digest"] == child.digest
    inspected = json.loads(
        _skopeo("inspect", "--tls-verify=false", f"docker://{registry.host}/multi:v1")
    )
    assert inspected["Layers"] == [image.layer_digest]


class _LyingTransport(httpx.BaseTransport):
    """Forwards to the real registry but misreports the digest of what PUTs under ``part``
    (``/manifests/`` or ``/blobs/uploads/``) store."""

    def __init__(self, part: str) -> None:
        self._inner = httpx.HTTPTransport()
        self._part = part

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        if request.method == "PUT" and self._part in request.url.path:
            response.headers["Docker-Content-Digest"] = _LIE
        return response

    def close(self) -> None:
        self._inner.close()


_LIE = sha256_digest(b"not what was sent")


@pytest.mark.parametrize("part", ["/manifests/", "/blobs/uploads/"])
def test_answered_digest_is_checked(
    registry: DockerRegistry, layer: tuple[bytes, str], part: str
) -> None:
    """A Docker-Content-Digest answer other than the digest of the manifest or blob sent is
    a RegistryError saying so in the same words for both."""
    image = _image(layer, label=f"lie{part.count('/blobs/')}")
    with (
        httpx.Client(transport=_LyingTransport(part)) as client,
        pytest.raises(RegistryError, match=rf"the registry answered digest {_LIE}, sent sha256:"),
    ):
        _push(image, f"{registry.host}/lie:v1", client=client)


def test_missing_blob_fails_before_sending(
    registry: DockerRegistry, layer: tuple[bytes, str]
) -> None:
    """A manifest naming a blob the store lacks raises BlobNotFound and sends nothing."""
    image = _image(layer, label="missing")
    image.store.delete_blob(image.layer_digest)
    recorder = Recorder()
    with recorder.client() as client, pytest.raises(BlobNotFound):
        _push(image, f"{registry.host}/missing:v1", client=client)
    assert recorder.calls == []


def test_unreachable_registry(layer: tuple[bytes, str]) -> None:
    """A registry that is not listening is a RegistryError with status 0, chained to httpx."""
    image = _image(layer, label="errors")
    stopped = DockerRegistry()
    try:
        with pytest.raises(RegistryError) as unreachable:
            _push(image, f"{stopped.host}/errors:v1")
    finally:
        stopped.close()
    assert unreachable.value.status == 0
    assert isinstance(unreachable.value.__cause__, httpx.TransportError)


@pytest.mark.parametrize(
    "target",
    [
        "busybox:v1",
        "127.0.0.1:5000/UPPER:v1",
        "127.0.0.1:5000/repo:bad tag",
        "127.0.0.1:5000/repo@sha256:abc",
        "bad host/repo:v1",
        "127.0.0.1:5000/a//b:v1",
    ],
)
def test_bad_targets(target: str, layer: tuple[bytes, str]) -> None:
    """References without a host or with bad grammar are InvalidInput before any IO."""
    with pytest.raises(InvalidInput):
        _push(_image(layer), target)


def test_target_parsing() -> None:
    """Targets parse into host, repository and tag or digest, and print back."""
    digest = sha256_digest(b"m")
    assert ImageTarget.parse("localhost:5000/a/b:v1") == ImageTarget("localhost:5000", "a/b", "v1")
    assert ImageTarget.parse("localhost:5000/a/b") == ImageTarget("localhost:5000", "a/b", "latest")
    assert ImageTarget.parse(f"[::1]:5000/a@{digest}") == ImageTarget(
        "[::1]:5000", "a", None, digest
    )
    assert str(ImageTarget.parse("r.example/x:latest")) == "r.example/x:latest"
    assert ImageTarget.parse("127.0.0.2:1/x:y").is_loopback
    assert ImageTarget.parse("[::1]:1/x:y").is_loopback
    assert not ImageTarget.parse("r.example/x:y").is_loopback
    with pytest.raises(InvalidImageName):
        ImageTarget.parse("r.example/x:y:z/")


def test_plain_http_only_to_loopback(layer: tuple[bytes, str]) -> None:
    """insecure=True is refused for remote hosts unless forced (checked before any IO)."""
    image = _image(layer)
    with pytest.raises(InvalidInput, match="plain HTTP"):
        _push(image, "registry.example/x:v1")
    transport = httpx.MockTransport(lambda request: httpx.Response(503))
    with httpx.Client(transport=transport) as client, pytest.raises(RegistryError) as caught:
        _push(image, "registry.example/x:v1", allow_insecure_remote=True, client=client)
    assert caught.value.status == 503


def test_https_by_default(layer: tuple[bytes, str]) -> None:
    """Without insecure=True the push speaks HTTPS."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(500)

    with (
        httpx.Client(transport=httpx.MockTransport(handler)) as client,
        pytest.raises(RegistryError),
    ):
        push_image(
            store=_image(layer).store,
            manifest=_image(layer).manifest,
            manifest_media_type=OCI_MANIFEST,
            target="registry.example/x:v1",
            client=client,
        )
    assert seen
    assert all(url.startswith("https://registry.example/v2/") for url in seen)


@pytest.fixture(scope="module")
def basic_registry() -> Iterator[DockerRegistry]:
    """A registry behind htpasswd basic auth (user ``pusher``)."""
    with DockerRegistry(users={"pusher": "s3cret"}) as server:
        yield server


def test_basic_auth(basic_registry: DockerRegistry, layer: tuple[bytes, str]) -> None:
    """Basic credentials answer the challenge; wrong or missing ones are a 401 RegistryError."""
    image = _image(layer, label="basic")
    target = f"{basic_registry.host}/private:v1"
    for auth in (None, BasicAuth("pusher", "wrong")):
        with pytest.raises(RegistryError) as caught:
            _push(image, target, auth=auth)
        assert caught.value.status == 401
        assert 'Basic realm="nixery-test"' in str(caught.value)
    result = _push(image, target, auth=BasicAuth("pusher", "s3cret"))
    assert result.blobs_uploaded == 2
    _skopeo("inspect", "--tls-verify=false", "--creds", "pusher:s3cret", f"docker://{target}")


@pytest.fixture(scope="module")
def token_registry() -> Iterator[tuple[DockerRegistry, TokenServer]]:
    """A registry behind Docker token auth, with a token server demanding ``pusher``."""
    with (
        TokenServer(users={"pusher": "s3cret"}) as tokens,
        DockerRegistry(extra_config=tokens.registry_config()) as server,
    ):
        yield server, tokens


def test_bearer_challenge_flow(
    token_registry: tuple[DockerRegistry, TokenServer], layer: tuple[bytes, str]
) -> None:
    """A Bearer challenge is answered with a token fetched from its realm, then reused."""
    server, tokens = token_registry
    image = _image(layer, label="bearer")
    target = f"{server.host}/tokened/app:v1"
    with pytest.raises(RegistryError) as anonymous:
        _push(image, target)
    assert anonymous.value.status == 401
    tokens.requests.clear()
    result = _push(image, target, auth=BasicAuth("pusher", "s3cret"))
    assert result.blobs_uploaded == 2
    assert tokens.requests[0]["service"] == [TokenServer.service]
    assert tokens.requests[0]["scopes"] == ["repository:tokened/app:pull,push"]
    assert tokens.requests[0]["user"] == "pusher"
    assert len(tokens.requests) == 1
    token = tokens.make_token(["repository:tokened/app:pull,push"])
    again = _push(image, target.replace(":v1", ":v2"), auth=BearerToken(token))
    assert again.blobs_skipped == 2
    assert len(tokens.requests) == 1
    with pytest.raises(RegistryError) as wrong_scope:
        _push(image, f"{server.host}/other:v1", auth=BearerToken(token))
    assert wrong_scope.value.status == 401


def test_bearer_token_covers_mounts(
    token_registry: tuple[DockerRegistry, TokenServer], layer: tuple[bytes, str]
) -> None:
    """With token auth, one token asks for push on the target and pull on mount_from."""
    server, tokens = token_registry
    image = _image(layer, label="bearer-mount")
    credentials = BasicAuth("pusher", "s3cret")
    _push(image, f"{server.host}/tokened/base:v1", auth=credentials)
    tokens.requests.clear()
    result = _push(
        image, f"{server.host}/tokened/copy:v1", auth=credentials, mount_from="tokened/base"
    )
    assert (result.blobs_mounted, result.blobs_uploaded) == (2, 0)
    assert [request["scopes"] for request in tokens.requests] == [
        ["repository:tokened/copy:pull,push", "repository:tokened/base:pull"]
    ]


def test_docker_schema2_push(registry: DockerRegistry, layer: tuple[bytes, str]) -> None:
    """A Docker schema 2 manifest is pushed with its own Content-Type and read back as one."""
    image = _image(layer, label="docker")
    document = json.loads(image.manifest)
    document["mediaType"] = DOCKER_MANIFEST
    document["config"]["mediaType"] = DOCKER_CONFIG
    document["layers"][0]["mediaType"] = DOCKER_LAYER_GZIP
    manifest = json.dumps(document).encode()
    result = push_image(
        store=image.store,
        manifest=manifest,
        manifest_media_type=DOCKER_MANIFEST,
        target=f"{registry.host}/docker:v1",
        insecure=True,
    )
    assert result.manifest_digest == sha256_digest(manifest)
    raw = _skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/docker:v1")
    assert raw.encode() == manifest

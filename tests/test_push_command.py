"""Pushing: parallel blobs, mounting (explicit and from the ledger), ``:latest``, TLS hints,
and the ``nixery-core push`` command line against a real docker-registry.

(nixery_core/registry_push.py, push_ledger.py, push_report.py, push_command.py.)
"""

from __future__ import annotations

import datetime
import http.server
import json
import os
import random
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import OFFLINE_SET, require_tools
from servers import DockerRegistry

from nixery_core.digests import sha256_digest
from nixery_core.errors import RegistryError
from nixery_core.manifest import OCI_CONFIG, LayerDescriptor, render_manifest
from nixery_core.media_types import OCI_LAYER_GZIP, OCI_MANIFEST
from nixery_core.protocols import BlobInfo
from nixery_core.push_ledger import PushLedger
from nixery_core.push_report import describe, human_bytes, plain_http_to_tls_hint
from nixery_core.registry_push import PushResult, push_image
from nixery_core.testing.storage import MemoryStore


def synthetic_image(layers: int, seed: int) -> tuple[MemoryStore, bytes]:
    """A store holding an OCI image of ``layers`` random small layers, and its manifest."""
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    store = MemoryStore()
    descriptors = []
    for _ in range(layers):
        info = store.put_blob(rng.randbytes(rng.randrange(1, 40_000)), OCI_LAYER_GZIP)
        descriptors.append(LayerDescriptor(info.digest, info.size, OCI_LAYER_GZIP, info.digest))
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "seed": seed,
         "rootfs": {"type": "layers", "diff_ids": [d.diff_id for d in descriptors]}}
    ).encode()
    store.put_blob(config, OCI_CONFIG)
    manifest, _ = render_manifest(
        config=BlobInfo(sha256_digest(config), len(config), OCI_CONFIG), layers=descriptors,
        format="oci",
    )
    return store, manifest


@pytest.fixture(scope="module")
def registry() -> Iterator[DockerRegistry]:
    """Debian's docker-registry on loopback."""
    require_tools("docker-registry")
    with DockerRegistry() as server:
        yield server


def push(store: MemoryStore, manifest: bytes, target: str, **options: object) -> PushResult:
    """push_image of an OCI manifest over plain HTTP to loopback."""
    return push_image(
        store=store, manifest=manifest, manifest_media_type=OCI_MANIFEST, target=target,
        insecure=True, **options,  # type: ignore[arg-type]
    )


# --- parallel blobs -------------------------------------------------------------------


def test_parallel_push_equals_serial_push(registry: DockerRegistry) -> None:
    """Twelve blobs pushed eight at a time land exactly as a serial push lands them."""
    store, manifest = synthetic_image(12, seed=1)
    serial = push(store, manifest, f"{registry.host}/par/serial", workers=1)
    parallel = push(store, manifest, f"{registry.host}/par/parallel", workers=8)
    assert serial.manifest_digest == parallel.manifest_digest == sha256_digest(manifest)
    assert (parallel.blobs_uploaded, parallel.bytes_sent) == (
        serial.blobs_uploaded, serial.bytes_sent,
    )
    assert registry.repository_blobs("par/parallel") == registry.repository_blobs("par/serial")
    pulled = httpx.get(
        f"{registry.url}/v2/par/parallel/manifests/latest", headers={"Accept": OCI_MANIFEST}
    )
    assert pulled.content == manifest


class InFlight(httpx.BaseTransport):
    """An httpx transport wrapper counting the most requests in flight at once."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.now = 0
        self.most = 0
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            time.sleep(0.02)  # long enough for concurrent requests to overlap
            return self.inner.handle_request(request)
        finally:
            with self._lock:
                self.now -= 1

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize(("workers", "most"), [(1, 1), (3, 3)])
def test_workers_bound_requests_in_flight(
    registry: DockerRegistry, workers: int, most: int
) -> None:
    """At most ``workers`` blob requests are in flight at once, and that many are reached."""
    store, manifest = synthetic_image(9, seed=2 + workers)
    transport = InFlight()
    with httpx.Client(transport=transport) as client:
        push(store, manifest, f"{registry.host}/flight/w{workers}", workers=workers,
             client=client)
    assert transport.most == most


def test_bad_worker_counts_are_refused() -> None:
    """workers must be a positive integer (InvalidInput before any IO)."""
    store, manifest = synthetic_image(1, seed=9)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="workers"):
            push(store, manifest, "127.0.0.1:1/x", workers=bad)


# --- mounting ---------------------------------------------------------------------------


def test_ledger_mounts_blobs_into_a_second_repository(registry: DockerRegistry) -> None:
    """With one ledger, a second repository gets every blob mounted, none uploaded again."""
    store, manifest = synthetic_image(5, seed=4)
    ledger = PushLedger()
    first = push(store, manifest, f"{registry.host}/ledger/one", ledger=ledger)
    second = push(store, manifest, f"{registry.host}/ledger/two", ledger=ledger)
    assert (first.blobs_uploaded, first.blobs_mounted) == (6, 0)
    assert (second.blobs_uploaded, second.blobs_mounted, second.bytes_sent) == (0, 6, 0)
    assert registry.repository_blobs("ledger/two") == registry.repository_blobs("ledger/one")
    assert ledger.repositories(registry.host) == ("ledger/one", "ledger/two")


def test_without_a_ledger_a_second_repository_uploads_again(registry: DockerRegistry) -> None:
    """The ledger is what makes the second push cheap: without it every blob goes up again."""
    store, manifest = synthetic_image(3, seed=5)
    push(store, manifest, f"{registry.host}/noledger/one")
    second = push(store, manifest, f"{registry.host}/noledger/two")
    assert (second.blobs_uploaded, second.blobs_mounted) == (4, 0)


def test_ledger_falls_back_to_upload_when_the_mount_is_declined(
    registry: DockerRegistry,
) -> None:
    """A ledger naming a repository that lacks the blob gets 202 and uploads instead."""
    store, manifest = synthetic_image(2, seed=6)
    ledger = PushLedger()
    for digest in {layer["digest"] for layer in json.loads(manifest)["layers"]}:
        ledger.record(registry.host, "nowhere/empty", digest)
    result = push(store, manifest, f"{registry.host}/declined/one", ledger=ledger)
    assert (result.blobs_uploaded, result.blobs_mounted) == (3, 0)


def test_target_without_tag_is_latest(registry: DockerRegistry) -> None:
    """A target without a tag pushes to :latest, as Docker reads it."""
    store, manifest = synthetic_image(1, seed=7)
    result = push(store, manifest, f"{registry.host}/untagged/app")
    assert result.target == f"{registry.host}/untagged/app:latest"
    tags = httpx.get(f"{registry.url}/v2/untagged/app/tags/list").json()["tags"]
    assert tags == ["latest"]


# --- TLS mix-ups ---------------------------------------------------------------------------


def test_https_to_a_plain_http_registry_hints_insecure(registry: DockerRegistry) -> None:
    """HTTPS spoken to a plain-HTTP registry fails with a hint naming --insecure."""
    store, manifest = synthetic_image(1, seed=8)
    with pytest.raises(RegistryError, match="--insecure") as failure:
        push_image(
            store=store, manifest=manifest, manifest_media_type=OCI_MANIFEST,
            target=f"{registry.host}/tls/app",
        )
    assert "plain HTTP" in str(failure.value)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An HTTPS server on loopback with a throwaway self-signed certificate; yields host:port."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    work = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (work / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (work / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(work / "cert.pem", work / "key.pem")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_plain_http_to_a_tls_server_hints_dropping_insecure(tls_server: str) -> None:
    """--insecure (plain HTTP) to a server that speaks TLS fails with a hint to drop it."""
    store, manifest = synthetic_image(1, seed=10)
    with pytest.raises(RegistryError, match="drop --insecure"):
        push(store, manifest, f"{tls_server}/tls/app")


def test_go_registry_400_for_plain_http_is_recognised() -> None:
    """Go's answer to plain HTTP on a TLS port gets the hint; other 400 bodies do not."""
    body = "Client sent an HTTP request to an HTTPS server.\n"
    assert "drop --insecure" in plain_http_to_tls_hint(body)
    assert plain_http_to_tls_hint('{"errors": []}') == ""


# --- the summary ----------------------------------------------------------------------------


def test_summary_reads_as_sentences() -> None:
    """describe() gives the target, the blob counts, bytes in units, manifests and time."""
    result = PushResult(
        target="r/app:latest", manifest_digest="sha256:" + "a" * 64, blobs_uploaded=3,
        blobs_skipped=2, blobs_mounted=4, bytes_sent=12_345_678, manifests_pushed=1,
    )
    text = describe(result, 2.345, mount_from="base/app")
    assert text == (
        f"pushed sha256:{'a' * 64} to r/app:latest\n"
        "  9 blobs: 3 sent (12.3 MB), 2 already there, 4 mounted from base/app\n"
        "  1 manifest in 2.3 s"
    )
    assert [human_bytes(n) for n in (0, 999, 1500, 2_000_000, 3_456_000_000)] == [
        "0 B", "999 B", "1.5 kB", "2 MB", "3.46 GB",
    ]


# --- the command line -----------------------------------------------------------------------


def cli(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m nixery_core push shell/hello ARGS`` over the offline set, sharing a cache."""
    return subprocess.run(
        [sys.executable, "-m", "nixery_core", "push", "shell/hello", *args,
         "--pkgs-path", str(OFFLINE_SET), "--offline",
         "--store", str(work / "store"), "--cache", str(work / "cache")],
        capture_output=True, text=True, timeout=300, check=False, env=dict(os.environ),
    )


@pytest.fixture(scope="module")
def cli_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store and cache shared by the command-line tests (the image is built once)."""
    return tmp_path_factory.mktemp("push-cli")


@pytest.mark.nix
@pytest.mark.usefixtures("nix")
def test_cli_two_targets_second_mounts(registry: DockerRegistry, cli_work: Path) -> None:
    """Two targets in one run: the first uploads, the second mounts every blob; :latest added."""
    pushed = cli(cli_work, f"docker://{registry.host}/cli/first",
                 f"{registry.host}/cli/second:v2", "--insecure", "--jobs", "3")
    assert pushed.returncode == 0, pushed.stderr
    first, second = pushed.stdout.strip().split("\npushed ")
    assert f"to {registry.host}/cli/first:latest" in first
    assert " 0 mounted" in first
    assert " 0 sent (0 B)" in second
    assert "0 already there" in second
    assert registry.repository_blobs("cli/second") == registry.repository_blobs("cli/first")


@pytest.mark.nix
@pytest.mark.usefixtures("nix")
def test_cli_mount_from(registry: DockerRegistry, cli_work: Path) -> None:
    """--mount-from REPO mounts from a repository an earlier process pushed to."""
    first = cli(cli_work, f"{registry.host}/cli/base", "--insecure")
    assert first.returncode == 0, first.stderr
    mounted = cli(cli_work, f"{registry.host}/cli/mounted", "--insecure",
                  "--mount-from", "cli/base")
    assert mounted.returncode == 0, mounted.stderr
    assert " 0 sent (0 B)" in mounted.stdout
    assert "mounted from cli/base" in mounted.stdout


@pytest.mark.nix
@pytest.mark.usefixtures("nix")
def test_cli_forgotten_insecure_gets_a_hint(registry: DockerRegistry, cli_work: Path) -> None:
    """Without --insecure, a plain-HTTP registry fails with exit 1 and a hint to add it."""
    failed = cli(cli_work, f"{registry.host}/cli/hint")
    assert failed.returncode == 1
    assert "use --insecure" in failed.stderr
    assert cli(cli_work, f"{registry.host}/cli/hint", "--jobs", "0").returncode == 2

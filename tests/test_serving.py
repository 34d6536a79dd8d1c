"""Serving helpers: streams from any store, signed URLs that work against the emulator."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import httpx
import pytest
from conftest import REPO
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.oauth2 import service_account
from servers import FakeGcsServer, fake_gcs

from nixery_core.digests import sha256_digest
from nixery_core.errors import BlobNotFound, InvalidDigest, InvalidInput
from nixery_core.protocols import CollectableStore
from nixery_core.storage.filesystem import FilesystemStore
from nixery_core.storage.gcs import GcsStore
from nixery_core.storage.serving import ServedBlob, open_blob_for_serving, signed_url
from nixery_core.testing.storage import MemoryStore

__all__ = ["fake_gcs"]

pytestmark = pytest.mark.tools

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DATA = bytes(range(256)) * 4000


@pytest.fixture
def gcs_store(fake_gcs: FakeGcsServer) -> GcsStore:
    """A GcsStore on a fresh bucket of the module's emulator."""
    return GcsStore(fake_gcs.make_bucket(f"s-{uuid.uuid4().hex[:16]}"))


STORES: dict[str, Callable[[Path, Any], CollectableStore]] = {
    "filesystem": lambda tmp, request: FilesystemStore(tmp / "store", durable=False),
    "memory": lambda tmp, request: MemoryStore(),
    "gcs": lambda tmp, request: request.getfixturevalue("gcs_store"),
}


@pytest.mark.parametrize("kind", sorted(STORES))
def test_open_blob_for_serving(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Any store gives an open stream with the blob's size and media type."""
    store = STORES[kind](tmp_path, request)
    digest = store.put_blob(DATA, LAYER).digest
    served = open_blob_for_serving(store, digest)
    assert isinstance(served, ServedBlob)
    with served.stream as stream:
        assert stream.read() == DATA
    _, size, media_type = served
    assert (size, media_type) == (len(DATA), LAYER)
    with pytest.raises(BlobNotFound):
        open_blob_for_serving(store, sha256_digest(b"absent"))
    with pytest.raises(InvalidDigest):
        open_blob_for_serving(store, "sha256:../../etc/passwd")


def _service_account() -> tuple[service_account.Credentials, rsa.RSAPublicKey]:
    """Throwaway service-account credentials with a fresh RSA key (never leaves the test)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "test",
        "private_key_id": "test-key",
        "private_key": pem,
        "client_email": "signer@test.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    from_info: Any = service_account.Credentials.from_service_account_info
    return from_info(info), key.public_key()


def _check_v4_signature(url: str, public_key: rsa.RSAPublicKey) -> None:
    """Rebuild the V4 string-to-sign of a GET URL and verify its RSA signature."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    signature = bytes.fromhex(query.pop("X-Goog-Signature"))
    canonical_query = "&".join(
        f"{quote(k, safe='~')}={quote(v, safe='~')}" for k, v in sorted(query.items())
    )
    canonical_request = "\n".join(
        ["GET", parts.path, canonical_query, f"host:{parts.netloc}", "", "host", "UNSIGNED-PAYLOAD"]
    )
    scope = query["X-Goog-Credential"].split("/", 1)[1]
    string_to_sign = "\n".join(
        [
            "GOOG4-RSA-SHA256",
            query["X-Goog-Date"],
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    public_key.verify(signature, string_to_sign.encode(), padding.PKCS1v15(), hashes.SHA256())


def test_signed_url_with_a_service_account_key(
    gcs_store: GcsStore, fake_gcs: FakeGcsServer
) -> None:
    """A signing key gives a V4 URL on the emulator host whose signature verifies and GET works."""
    credentials, public_key = _service_account()
    digest = gcs_store.put_blob(DATA, LAYER).digest
    url = signed_url(gcs_store, digest, timedelta(minutes=15), credentials=credentials)
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    assert f"{parts.scheme}://{parts.netloc}" == fake_gcs.url
    assert parts.path == f"/{gcs_store.bucket.name}/layers/{digest.removeprefix('sha256:')}"
    assert query["X-Goog-Algorithm"] == "GOOG4-RSA-SHA256"
    assert query["X-Goog-Expires"] == "900"
    assert query["X-Goog-SignedHeaders"] == "host"
    assert query["X-Goog-Credential"].startswith("signer@test.iam.gserviceaccount.com/")
    assert len(query["X-Goog-Signature"]) == 512
    _check_v4_signature(url, public_key)
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == DATA


def test_unsigned_store_gives_the_public_url(gcs_store: GcsStore, fake_gcs: FakeGcsServer) -> None:
    """Credentials that cannot sign (anonymous) give the object's public URL."""
    digest = gcs_store.put_blob(DATA, LAYER).digest
    url = signed_url(gcs_store, digest, timedelta(hours=1))
    bucket = gcs_store.bucket.name
    assert url == f"{fake_gcs.url}/{bucket}/layers/{digest.removeprefix('sha256:')}"
    assert httpx.get(url).content == DATA


@pytest.mark.parametrize("expiry", [timedelta(0), timedelta(seconds=-1), timedelta(days=8)])
def test_signed_url_expiry_bounds(gcs_store: GcsStore, expiry: timedelta) -> None:
    """Expiries outside (0, 7 days] are InvalidInput; bad digests are InvalidDigest."""
    credentials, _ = _service_account()
    with pytest.raises(InvalidInput):
        signed_url(gcs_store, sha256_digest(b"x"), expiry, credentials=credentials)
    with pytest.raises(InvalidDigest):
        signed_url(gcs_store, "sha256:nope", timedelta(minutes=1), credentials=credentials)


#: Serves one blob from a filesystem and an in-memory store with every Google
#: module unimportable (``None`` in sys.modules makes ``import google...`` fail).
_WITHOUT_GOOGLE = textwrap.dedent("""
    import json, sys, tempfile
    from pathlib import Path
    for name in ("google", "google_crc32c"):
        sys.modules[name] = None
    from nixery_core.storage.filesystem import FilesystemStore
    from nixery_core.storage.serving import open_blob_for_serving
    from nixery_core.testing.storage import MemoryStore
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, store in (("filesystem", FilesystemStore(Path(tmp))), ("memory", MemoryStore())):
            digest = store.put_blob(b"layer bytes", "application/octet-stream").digest
            served = open_blob_for_serving(store, digest)
            with served.stream as stream:
                out[kind] = [stream.read().decode(), served.size, served.media_type]
    print(json.dumps(out))
""")


def test_open_blob_for_serving_needs_no_google_libraries() -> None:
    """Without the gcs extra (``google`` unimportable) open_blob_for_serving still serves."""
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_GOOGLE], cwd=REPO, capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    expected = ["layer bytes", len(b"layer bytes"), "application/octet-stream"]
    assert json.loads(done.stdout) == {"filesystem": expected, "memory": expected}

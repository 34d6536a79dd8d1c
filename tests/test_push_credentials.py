"""Registry credentials reach the registry's own origin and nothing else.

A hostile registry on one loopback port sends the client to an attacker on
another port (an upload ``Location``, a redirect, a token ``realm``); the
attacker records every header of every request it receives, and no header may
carry the password, the basic pair or a token.
"""

from __future__ import annotations

import base64
import datetime
import http.server
import ipaddress
import json
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import attrs
import httpx
import pytest

from nixery_core.digests import sha256_digest
from nixery_core.errors import RegistryError
from nixery_core.media_types import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST
from nixery_core.registry_push import BasicAuth, BearerToken, push_image
from nixery_core.testing.storage import MemoryStore

USER, PASSWORD = "alice", "s3cret"
BASIC_PAIR = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
REGISTRY_TOKEN = "registry-token-0123456789"  # noqa: S105 - a test token, the thing watched for
SECRETS = (PASSWORD, BASIC_PAIR, REGISTRY_TOKEN)


@attrs.frozen
class Seen:
    """One request a test server received: method, path and every header."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


@attrs.frozen
class Answer:
    """What a test server answers: status, headers, body."""

    status: int
    headers: dict[str, str] = attrs.Factory(dict)
    body: bytes = b""


Handler = Callable[[Seen, bytes], Answer]


class Server:
    """A threaded HTTP(S) server on 127.0.0.1 recording every request, answering via ``handle``."""

    def __init__(self, handle: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.seen: list[Seen] = []
        self.handle = handle
        owner = self

        class RequestHandler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                seen = Seen(self.command, self.path, tuple(self.headers.items()))
                owner.seen.append(seen)
                answer = owner.handle(seen, body)
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(answer.body)

            def do_GET(self) -> None:
                self._serve()

            def do_HEAD(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self._serve()

            def do_PUT(self) -> None:
                self._serve()

            def do_PATCH(self) -> None:
                self._serve()

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
        self.scheme = "http"
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
            self.scheme = "https"
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def origin(self) -> str:
        """``scheme://127.0.0.1:port``."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def attacker_handler(seen: Seen, body: bytes) -> Answer:
    """The attacker plays along: tokens on request, uploads accepted."""
    if seen.method == "GET" and seen.path.startswith("/token"):
        return Answer(200, {"Content-Type": "application/json"}, b'{"token": "attacker-token"}')
    if seen.method == "PATCH":
        return Answer(202, {"Location": "/upload/next"})
    if seen.method == "PUT":
        digest = seen.path.split("digest=", 1)[-1].replace("%3A", ":")
        return Answer(201, {"Docker-Content-Digest": digest})
    return Answer(404)


@attrs.define
class HostileRegistry:
    """A registry that demands credentials, then points the client at ``attacker``.

    ``challenge`` is ``basic`` or ``bearer`` (realm ``realm``, by default its
    own ``/token``); ``send_to`` is ``location`` (upload Location at the
    attacker) or ``redirect`` (a 307 on HEAD blob to the attacker, uploads
    kept at the registry).
    """

    attacker: str
    challenge: str = "basic"
    realm: str | None = None
    send_to: str = "location"
    origin: str = ""

    def authorised(self, seen: Seen) -> bool:
        """Whether the request carries the credentials this registry wants."""
        wanted = f"Basic {BASIC_PAIR}" if self.challenge == "basic" else f"Bearer {REGISTRY_TOKEN}"
        return seen.header("Authorization") == wanted

    def __call__(self, seen: Seen, body: bytes) -> Answer:  # noqa: PLR0911 - one return per route
        """Answer one request."""
        if seen.path.startswith("/token"):
            if seen.header("Authorization") != f"Basic {BASIC_PAIR}":
                return Answer(401)
            payload = json.dumps({"token": REGISTRY_TOKEN}).encode()
            return Answer(200, {"Content-Type": "application/json"}, payload)
        if not self.authorised(seen):
            realm = self.realm or f"{self.origin}/token"
            header = (
                'Basic realm="hostile"'
                if self.challenge == "basic"
                else f'Bearer realm="{realm}",service="hostile",scope="repository:app:push"'
            )
            return Answer(401, {"WWW-Authenticate": header})
        if seen.method == "HEAD" and "/blobs/" in seen.path:
            if self.send_to == "redirect":
                return Answer(307, {"Location": f"{self.attacker}{seen.path}"})
            return Answer(404)
        if seen.method == "POST" and seen.path.endswith("/blobs/uploads/"):
            uploads = self.attacker if self.send_to == "location" else self.origin
            return Answer(202, {"Location": f"{uploads}/upload/1"})
        if seen.method == "PUT" and seen.path.startswith("/upload/"):
            return attacker_handler(seen, body)
        if seen.method == "PUT" and "/manifests/" in seen.path:
            return Answer(201, {"Docker-Content-Digest": sha256_digest(body)})
        return Answer(404)


@attrs.frozen
class Image:
    """A one-layer image in a MemoryStore."""

    store: MemoryStore
    manifest: bytes


@pytest.fixture
def image() -> Image:
    """A tiny image whose blobs are in a MemoryStore."""
    store = MemoryStore()
    layer = b"layer bytes"
    config = b'{"architecture":"amd64","os":"linux"}'
    layer_digest = store.put_blob(layer, OCI_LAYER_GZIP).digest
    config_digest = store.put_blob(config, OCI_CONFIG).digest
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer_digest, "size": len(layer)}],
        }
    ).encode()
    return Image(store, manifest)


def _leaks(server: Server) -> list[tuple[str, str, str]]:
    """Every (path, header, value) the server received that carries a secret."""
    return [
        (seen.path, name, value)
        for seen in server.seen
        for name, value in seen.headers
        if name.lower() == "authorization" or any(secret in value for secret in SECRETS)
    ]


def _push(image: Image, registry: Server, *, insecure: bool = True, **kwargs: Any) -> Any:
    return push_image(
        store=image.store,
        manifest=image.manifest,
        manifest_media_type=OCI_MANIFEST,
        target=f"127.0.0.1:{registry.port}/app:v1",
        insecure=insecure,
        **kwargs,
    )


@pytest.fixture
def attacker() -> Iterator[Server]:
    """The attacker: a loopback server on another port recording every header."""
    with Server(attacker_handler) as server:
        yield server


def _registry(behaviour: HostileRegistry, tls: ssl.SSLContext | None = None) -> Server:
    server = Server(behaviour, tls)
    behaviour.origin = server.origin
    return server


@pytest.mark.parametrize(
    ("challenge", "auth"),
    [("basic", BasicAuth(USER, PASSWORD)), ("bearer", BasicAuth(USER, PASSWORD))],
)
def test_upload_location_elsewhere_gets_no_credentials(
    image: Image, attacker: Server, challenge: str, auth: BasicAuth
) -> None:
    """An upload Location at another origin gets neither the basic pair nor the registry's token."""
    with _registry(HostileRegistry(attacker.origin, challenge=challenge)) as registry:
        _push(image, registry, auth=auth)
    assert any(seen.method == "PUT" for seen in attacker.seen)
    assert _leaks(attacker) == []
    assert any(HostileRegistry(attacker.origin, challenge).authorised(s) for s in registry.seen)


def test_given_bearer_token_stays_with_registry(image: Image, attacker: Server) -> None:
    """A BearerToken passed in goes to the registry only, not to an upload Location elsewhere."""
    with _registry(HostileRegistry(attacker.origin, challenge="bearer")) as registry:
        _push(image, registry, auth=BearerToken(REGISTRY_TOKEN))
    assert any(seen.method == "PUT" for seen in attacker.seen)
    assert _leaks(attacker) == []


def test_redirect_elsewhere_gets_no_credentials(image: Image, attacker: Server) -> None:
    """With a client that follows redirects, a 307 to another origin carries no credentials."""
    behaviour = HostileRegistry(attacker.origin, send_to="redirect")
    with _registry(behaviour) as registry, httpx.Client(follow_redirects=True) as client:
        _push(image, registry, auth=BasicAuth(USER, PASSWORD), client=client)
    assert any(seen.method == "HEAD" for seen in attacker.seen)
    assert _leaks(attacker) == []


def _tls_pair(workdir: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a self-signed certificate for 127.0.0.1, and a client trusting it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = workdir / "cert.pem", workdir / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return server, client


def test_plain_http_realm_gets_no_basic_credentials(image: Image, attacker: Server) -> None:
    """An HTTPS registry naming a plain-HTTP token realm: the realm is asked anonymously."""
    with tempfile.TemporaryDirectory() as workdir:
        server_tls, client_tls = _tls_pair(Path(workdir))
    behaviour = HostileRegistry(
        attacker.origin, challenge="bearer", realm=f"{attacker.origin}/token"
    )
    with (
        _registry(behaviour, server_tls) as registry,
        httpx.Client(verify=client_tls) as client,
        pytest.raises(RegistryError) as refused,
    ):
        _push(image, registry, insecure=False, auth=BasicAuth(USER, PASSWORD), client=client)
    assert [seen.path.split("?")[0] for seen in attacker.seen] == ["/token"]
    assert _leaks(attacker) == []
    assert refused.value.status == 401  # the registry refuses the attacker's token


def test_remote_plain_http_realm_gets_no_basic_credentials(image: Image) -> None:
    """Even with insecure=True, a plain-HTTP realm at a non-loopback host gets no basic pair."""
    token_requests: list[httpx.Request] = []

    def token_server(request: httpx.Request) -> httpx.Response:
        token_requests.append(request)
        return httpx.Response(401)

    behaviour = HostileRegistry(
        "http://127.0.0.1:9", challenge="bearer", realm="http://tokens.example/token"
    )
    mounts = {"http://tokens.example": httpx.MockTransport(token_server)}
    with (
        _registry(behaviour) as registry,
        httpx.Client(mounts=mounts) as client,
        pytest.raises(RegistryError, match="credentials withheld") as refused,
    ):
        _push(image, registry, auth=BasicAuth(USER, PASSWORD), client=client)
    assert refused.value.status == 401
    assert len(token_requests) == 1
    assert "Authorization" not in token_requests[0].headers


def test_https_realm_elsewhere_gets_basic_credentials(image: Image, attacker: Server) -> None:
    """A token realm at another origin over HTTPS is where basic credentials are meant to go."""
    token_requests: list[httpx.Request] = []

    def token_server(request: httpx.Request) -> httpx.Response:
        token_requests.append(request)
        return httpx.Response(200, json={"token": REGISTRY_TOKEN})

    behaviour = HostileRegistry(
        attacker.origin, challenge="bearer", realm="https://auth.example/token"
    )
    mounts = {"https://auth.example": httpx.MockTransport(token_server)}
    with _registry(behaviour) as registry, httpx.Client(mounts=mounts) as client:
        _push(image, registry, auth=BasicAuth(USER, PASSWORD), client=client)
    assert [request.headers.get("Authorization") for request in token_requests] == [
        f"Basic {BASIC_PAIR}"
    ]
    assert _leaks(attacker) == []

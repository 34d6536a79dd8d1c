"""Start the registry: one command, configured by the environment, or in a thread.

``python -m examples.registry`` (from the repository root) reads
:meth:`RegistryConfig.from_env <examples.registry.config.RegistryConfig.from_env>`
plus ``HOST`` (default ``127.0.0.1``) and ``PORT`` (default ``8080``; ``0``
picks a free port) and serves with uvicorn until interrupted.  It prints
``listening on http://HOST:PORT`` once the socket accepts connections, so
scripts can wait for that line.

:func:`serving` runs an app in a background thread for tests, benchmarks
and notebooks, and yields its base URL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence

import uvicorn
from starlette.types import ASGIApp

from examples.registry.app import create_app
from examples.registry.config import RegistryConfig
from nixery_core.errors import InvalidInput, NixeryError

__all__ = ["ServerFailed", "main", "serving"]

_START_TIMEOUT = 30.0
#: Largest request head uvicorn's h11 parser accepts (h11's default is 16 KiB):
#: podman's partial pulls send ``Range`` headers with a thousand ranges.
MAX_REQUEST_HEAD = 256 * 1024


class ServerFailed(RuntimeError):
    """The server thread ended before it accepted connections."""


def _address(env: Mapping[str, str]) -> tuple[str, int]:
    host = env.get("HOST") or "127.0.0.1"
    raw_port = env.get("PORT") or "8080"
    if not raw_port.isdigit() or int(raw_port) > 65535:
        raise InvalidInput(f"PORT={raw_port!r} is not a TCP port")
    return host, int(raw_port)


def _bound_port(server: uvicorn.Server) -> int:
    for listener in getattr(server, "servers", []):
        for sock in listener.sockets:
            port: int = sock.getsockname()[1]
            return port
    raise ServerFailed("uvicorn started without a listening socket")


@contextlib.contextmanager
def serving(app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a daemon thread; yields ``http://host:port``.

    ``port=0`` picks a free port.  Leaving the block stops the server and
    runs the app's lifespan shutdown.
    """
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="on",
        h11_max_incomplete_event_size=MAX_REQUEST_HEAD,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="registry-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + _START_TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise ServerFailed(f"the registry did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{_bound_port(server)}"
    finally:
        server.should_exit = True
        thread.join(timeout=_START_TIMEOUT)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run the registry until interrupted; 2 on a configuration error."""
    del argv  # everything is configured by the environment, like Nixery
    env = os.environ if env is None else env
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        host, port = _address(env)
        config = RegistryConfig.from_env(env)
    except NixeryError as exc:  # InvalidInput, InvalidSource: a bad variable, named
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=host, port=port, log_level="info",
            h11_max_incomplete_event_size=MAX_REQUEST_HEAD,
        )
    )

    stopped = threading.Event()

    def report() -> None:
        while not server.started and not stopped.is_set():
            time.sleep(0.01)
        if server.started:
            print(f"listening on http://{host}:{_bound_port(server)}", flush=True)

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        server.run()
    finally:
        stopped.set()
        if config.cache is not None:
            config.cache.close()
    return 0

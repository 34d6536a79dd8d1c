"""What a push tells a person: a one-paragraph summary, and hints for TLS mix-ups.

- :func:`describe` turns a :class:`~nixery_core.registry_push.PushResult`
  and the time it took into the summary ``nixery-core push`` prints (blobs
  sent, skipped, mounted, bytes, time), instead of a Python repr.
- :func:`transport_hint` and :func:`plain_http_to_tls_hint` recognise the
  two ways a scheme mismatch shows: HTTPS spoken to a plain-HTTP registry
  fails the TLS handshake with ``[SSL: WRONG_VERSION_NUMBER]`` (or
  ``record layer failure``); plain HTTP spoken to an HTTPS registry gets
  Go's ``400 Client sent an HTTP request to an HTTPS server`` or a closed
  connection.  Each returns a sentence to append to the error (empty when
  the error is something else).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import httpx

__all__ = ["PushSummary", "describe", "human_bytes", "plain_http_to_tls_hint", "transport_hint"]

_TLS_TO_PLAIN = (
    "WRONG_VERSION_NUMBER", "wrong version number", "record layer failure",
    "packet length too long",
)
_PLAIN_TO_TLS = "client sent an http request to an https server"


def transport_hint(exc: httpx.HTTPError, *, insecure: bool) -> str:
    """A hint for a transport error caused by speaking the wrong scheme, or ``""``."""
    text = str(exc)
    if not insecure and isinstance(exc, httpx.ConnectError) and any(
        marker in text for marker in _TLS_TO_PLAIN
    ):
        return (
            " (the registry does not speak TLS here: it answers plain HTTP; for a registry"
            " on this machine use --insecure, insecure=True in Python)"
        )
    if insecure and isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return (
            " (the registry closed a plain-HTTP connection: if it speaks HTTPS,"
            " drop --insecure)"
        )
    return ""


def plain_http_to_tls_hint(body: str) -> str:
    """A hint when a 400 answer says plain HTTP reached an HTTPS server, or ``""``."""
    if _PLAIN_TO_TLS in body.lower():
        return " (the registry speaks HTTPS, but --insecure sent plain HTTP: drop --insecure)"
    return ""


class PushSummary(Protocol):
    """What :func:`describe` reads of a push: the fields of
    :class:`~nixery_core.registry_push.PushResult` (a protocol, so this module
    does not import the one that imports its hints)."""

    @property
    def blobs_uploaded(self) -> int: ...
    @property
    def blobs_skipped(self) -> int: ...
    @property
    def blobs_mounted(self) -> int: ...
    @property
    def bytes_sent(self) -> int: ...
    @property
    def manifests_pushed(self) -> int: ...
    @property
    def referrers(self) -> Sequence[str]: ...
    @property
    def manifest_digest(self) -> str: ...
    @property
    def target(self) -> str: ...


def human_bytes(count: int) -> str:
    """``count`` bytes as ``512 B``, ``1.5 kB``, ``12.3 MB`` or ``1.02 GB`` (powers of 1000)."""
    if count < 1000:
        return f"{count} B"
    value = float(count)
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000
        if value < 1000 or unit == "TB":
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{count} B"  # pragma: no cover - the loop always returns


def describe(result: PushSummary, seconds: float, *, mount_from: str | None = None) -> str:
    """The summary of one push, for people (see the module docs)."""
    blobs = result.blobs_uploaded + result.blobs_skipped + result.blobs_mounted
    parts = [
        f"{result.blobs_uploaded} sent ({human_bytes(result.bytes_sent)})",
        f"{result.blobs_skipped} already there",
        f"{result.blobs_mounted} mounted" + (f" from {mount_from}" if mount_from else ""),
    ]
    plural = "s" if result.manifests_pushed != 1 else ""
    manifests = f"{result.manifests_pushed} manifest{plural}"
    extra = f", {len(result.referrers)} SBOM" if result.referrers else ""
    extra += "s" if len(result.referrers) > 1 else ""
    return (
        f"pushed {result.manifest_digest} to {result.target}\n"
        f"  {blobs} blobs: {', '.join(parts)}\n"
        f"  {manifests}{extra} in {seconds:.1f} s"
    )

"""Build failures: one record per build, the log kept on the server, an id for the client.

A failed build is waited on by every request that asked for the image
while it ran; they all receive the same exception object from the shared
build (:class:`~examples.registry.builds.Builder`).  :class:`FailureLog`
records it once (keyed by that object), logs the whole message (the Nix
log's tail included) on the server, and hands each waiter the same
:class:`Failure`, whose ``failure_id`` the client sees instead of the log.
The start page (``GET /``) lists the recent failures with their ids, so
whoever operates the registry can find the log a client reports.

Unknown packages are not a log: the client gets every unknown name (that
is what it must fix), and the failure is recorded like any other.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading

import attrs

from nixery_core.errors import InvalidInput, UnknownPackages
from nixery_core.names import Image
from nixery_core.recent_errors import BuildFailure, RecentErrors

__all__ = ["Failure", "FailureLog", "client_message", "failure_id"]

log = logging.getLogger(__name__)


def failure_id(failure: BuildFailure) -> str:
    """A short id for one recorded failure, stable for the record (12 hex digits)."""
    text = "\0".join(
        (failure.image_reference, repr(failure.at), failure.error_type, failure.message)
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@attrs.frozen
class Failure:
    """A recorded failure and its id."""

    record: BuildFailure
    failure_id: str


def client_message(image: Image, exc: BaseException, failure: Failure) -> str:
    """What the client is told: the error kind and the failure id, never the build log."""
    if isinstance(exc, UnknownPackages | InvalidInput):
        return str(exc)
    return (
        f"building {image.reference} failed ({type(exc).__name__}); the log stays on the "
        f"registry as failure {failure.failure_id}, listed on its start page"
    )


@attrs.define
class FailureLog:
    """Records each failed build once in ``recent``, however many requests waited on it."""

    recent: RecentErrors
    _seen: collections.OrderedDict[int, tuple[BaseException, Failure]] = attrs.field(
        init=False, factory=collections.OrderedDict
    )
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)

    def record(self, image: Image, exc: BaseException) -> Failure:
        """The failure for ``exc``: recorded (and logged) the first time, the same after."""
        with self._lock:
            seen = self._seen.get(id(exc))
            if seen is not None and seen[0] is exc:
                return seen[1]
            record = self.recent.record(image, exc)
            failure = Failure(record, failure_id(record))
            # The exception is kept alive with its entry, so its id() is not reused.
            self._seen[id(exc)] = (exc, failure)
            while len(self._seen) > self.recent.capacity:
                self._seen.popitem(last=False)
        log.warning(
            "build of %s failed, failure %s: %s: %s",
            image.reference, failure.failure_id, type(exc).__name__, exc,
        )
        return failure

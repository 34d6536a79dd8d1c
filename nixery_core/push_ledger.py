"""What a process has pushed where, so a second repository can mount instead of upload.

A registry can link a blob it already holds under one repository into
another (``POST /v2/<repo>/blobs/uploads/?mount=<digest>&from=<other>``)
without a byte being sent.  To ask, a pusher must know where the blob is:
:class:`PushLedger` remembers, per registry host, which repositories hold
which blobs because this process pushed them there (uploaded, mounted, or
found present).  Pass one ledger to every
:func:`~nixery_core.registry_push.push_image` call of a process (the
command line does, for all its targets); a blob missing from the target
repository is then mounted from a repository the ledger names, and uploaded
only when the registry declines.

The ledger is in memory, bounded by what the process pushed, and safe to
share between threads (parallel blob pushes record into it).
"""

from __future__ import annotations

import threading

import attrs

__all__ = ["PushLedger"]


@attrs.define
class PushLedger:
    """Blobs this process knows a registry holds, by host, digest and repository."""

    _held: dict[tuple[str, str], list[str]] = attrs.field(init=False, factory=dict)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)

    def record(self, host: str, repository: str, digest: str) -> None:
        """Remember that ``host`` holds ``digest`` under ``repository``."""
        with self._lock:
            holders = self._held.setdefault((host, digest), [])
            if repository not in holders:
                holders.append(repository)

    def source_for(self, host: str, digest: str, *, besides: str) -> str | None:
        """A repository of ``host`` holding ``digest`` other than ``besides`` (first recorded)."""
        with self._lock:
            holders = self._held.get((host, digest), [])
            return next((repo for repo in holders if repo != besides), None)

    def repositories(self, host: str) -> tuple[str, ...]:
        """Every repository of ``host`` the ledger knows a blob in, sorted."""
        with self._lock:
            return tuple(sorted({r for (h, _), repos in self._held.items() if h == host
                                 for r in repos}))

"""One realisation at a time per Nix store, across threads and processes.

Why: without a daemon (Nix 2.8 as root), concurrent ``nix-store --realise``
processes whose closures overlap but have not been built yet deadlock.
Each process's scheduler takes a derivation's output lock before it knows
it can build it now, keeps it while it polls (every 5 s) for the output
locks of *other* derivations held by the other processes, and no one gives
way: we captured four ``nix-store`` processes holding the locks of
``hello``, ``coreutils``/``bash-interactive``, ``iana-etc``/``moreutils``
and ``nss-cacert``, each printing "waiting for lock on" the next, no
builder running, until our timeout killed them (the bench of
``docs/reliability.md``: 21 of 24 cold builds in 4 trials of 8 timed out).
One realisation at a time cannot form such a cycle: a single ``nix-store``
only ever waits for builders it started itself.  Nix still builds in
parallel inside that one call (``max-jobs``), and a realisation of outputs
that are already valid takes milliseconds, so warm builds barely notice;
evaluation (``nix-instantiate``) and closure queries stay concurrent.

The lock is an exclusive ``flock`` on one file per store, which the kernel
releases when its holder dies (SIGKILL included): by default
``$NIX_STATE_DIR/nixery-core/realise.lock`` (``/nix/var/nix``) when that
directory can be written, else ``<tmp>/nixery-core-<uid>/realise.lock``;
``$NIXERY_CORE_NIX_LOCK`` overrides it.  Every process using one store must
name the same file.  Nix processes we did not start do not take it, so a
``nix-build`` run by hand next to us can still meet Nix's own deadlock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from nixery_core.errors import NixTimeout

__all__ = ["LOCK_ENV", "default_lock_path", "realise_lock", "state_dir"]

LOCK_ENV = "NIXERY_CORE_NIX_LOCK"
_POLL = 0.05
# flock conflicts between two open files of one process too, but a thread
# lock first keeps the threads of one process from spinning on it.
_THREADS = threading.Lock()


def state_dir() -> Path:
    """``$NIX_STATE_DIR/nixery-core`` when it can be written, else a private temp dir."""
    state = Path(os.environ.get("NIX_STATE_DIR") or "/nix/var/nix") / "nixery-core"
    with contextlib.suppress(OSError):  # not ours to create: fall back below
        state.mkdir(mode=0o755, exist_ok=True)
    if os.access(state, os.W_OK):
        return state
    private = Path(tempfile.gettempdir()) / f"nixery-core-{os.getuid()}"
    private.mkdir(mode=0o700, exist_ok=True)
    return private


def default_lock_path() -> Path:
    """The lock file every process using this machine's Nix store agrees on."""
    if override := os.environ.get(LOCK_ENV):
        return Path(override)
    return state_dir() / "realise.lock"


@contextlib.contextmanager
def realise_lock(
    argv: Sequence[str], timeout: float, path: Path | None = None
) -> Iterator[None]:
    """Hold the store's realise lock; :class:`~nixery_core.errors.NixTimeout` (for
    ``argv``) when it is not free within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    if not _THREADS.acquire(timeout=max(timeout, 0.0)):
        raise NixTimeout(argv, timeout, "waiting for another realisation in this process")
    try:
        lock_path = path if path is not None else default_lock_path()
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise NixTimeout(
                            argv, timeout, f"waiting for the realise lock {lock_path}"
                        ) from None
                    time.sleep(_POLL)
            yield
        finally:
            os.close(fd)  # releases the flock
    finally:
        _THREADS.release()

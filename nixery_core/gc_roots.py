"""Nix garbage-collector roots for the closure of a build in progress.

Without roots, ``nix-collect-garbage`` (or ``nix-store --delete``) run by
anyone on the machine may delete a realised closure while the build reads
it: the layer then lacks files, or the build fails.  So every uncached build
holds :class:`BuildRoots` from before it realises until its layers are
packed:

* ``nix-store --realise --add-root <dir>/out`` registers an *indirect* root
  per output (a symlink ``<dir>/out[-N]`` that Nix records in
  ``gcroots/auto``); Nix protects each output with a temporary root from
  the moment it considers it, so there is no gap between "valid" and
  "rooted".  A root keeps the output's whole closure;
* ``<dir>`` is a directory of its own per build,
  ``<base>/<pid>-<random>/``, removed (with its symlinks, which then dangle
  in ``gcroots/auto`` until Nix's next collection drops them) when the
  build is done, failed or interrupted;
* a build killed outright cannot remove its directory, so each holds an
  exclusive ``flock`` on ``<dir>/.lock`` (dropped by the kernel when the
  process dies); a new :class:`BuildRoots` removes every directory under
  the base whose lock is free.

The base is ``$NIXERY_CORE_GC_ROOTS`` when set, else ``roots`` next to the
realise lock (:func:`nixery_core.nix_lock.state_dir`).  A derivation file
written by evaluation is not rooted between evaluation and realisation; if
a collection deletes it there, the realisation fails
(:class:`~nixery_core.errors.NixBuildFailed`) and a retry evaluates again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from pathlib import Path
from types import TracebackType

from nixery_core.nix_lock import state_dir

__all__ = ["ROOTS_ENV", "BuildRoots", "default_roots_base"]

ROOTS_ENV = "NIXERY_CORE_GC_ROOTS"
_LOCK = ".lock"


def default_roots_base() -> Path:
    """Where per-build root directories live."""
    if override := os.environ.get(ROOTS_ENV):
        return Path(override)
    return state_dir() / "roots"


def _holds_nothing(directory: Path) -> bool:
    """Whether no live build holds ``directory`` (its lock is free or gone)."""
    try:
        fd = os.open(directory / _LOCK, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


class BuildRoots:
    """A per-build directory of indirect GC roots, held while the build runs.

    Use as a context manager; :attr:`prefix` is what ``--add-root`` takes.
    """

    def __init__(self, base: Path | None = None) -> None:
        self.base = base if base is not None else default_roots_base()
        self.directory = self.base / f"{os.getpid()}-{secrets.token_hex(8)}"
        self._fd: int | None = None

    @property
    def prefix(self) -> Path:
        """The root name for ``nix-store --add-root`` (Nix appends ``-N`` per output)."""
        return self.directory / "out"

    def __enter__(self) -> BuildRoots:
        self.base.mkdir(parents=True, exist_ok=True)
        self.remove_stale()
        self.directory.mkdir()
        fd = os.open(self.directory / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # new and ours: never contended
        self._fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove_stale(self) -> list[Path]:
        """Remove the root directories of builds that died; return them."""
        removed: list[Path] = []
        with contextlib.suppress(FileNotFoundError):
            for directory in sorted(self.base.iterdir()):
                if directory == self.directory or not directory.is_dir():
                    continue
                if _holds_nothing(directory):
                    shutil.rmtree(directory, ignore_errors=True)
                    removed.append(directory)
        return removed

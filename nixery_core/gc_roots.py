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
  exclusive ``flock`` on ``<dir>.lock`` (dropped by the kernel when the
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


def _fresh_name() -> str:
    """A root directory name no other build uses: ``<pid>-<random>``."""
    return f"{os.getpid()}-{secrets.token_hex(8)}"


def _try_lock(path: Path) -> int | None:
    """An open, exclusively locked fd on ``path``; ``None`` when held or gone."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


class BuildRoots:
    """A per-build directory of indirect GC roots, held while the build runs.

    Use as a context manager; :attr:`prefix` is what ``--add-root`` takes.
    The directory ``<base>/<name>/`` is held by a lock on ``<base>/<name>.lock``,
    which is locked before it gets that name (created as ``.tmp-<name>``, locked,
    renamed), so no other build ever sees it free while its owner lives.
    """

    def __init__(self, base: Path | None = None) -> None:
        self.base = base if base is not None else default_roots_base()
        self.name = _fresh_name()
        self._fd: int | None = None

    @property
    def directory(self) -> Path:
        return self.base / self.name

    @property
    def _lock_path(self) -> Path:
        return self.base / f"{self.name}{_LOCK}"

    @property
    def prefix(self) -> Path:
        """The root name for ``nix-store --add-root`` (Nix appends ``-N`` per output)."""
        return self.directory / "out"

    def __enter__(self) -> BuildRoots:
        self.base.mkdir(parents=True, exist_ok=True)
        self.remove_stale()
        while True:
            temporary = self.base / f".tmp-{self.name}"
            fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                temporary.rename(self._lock_path)
            except FileNotFoundError:  # taken for a dead build's file and removed: again
                os.close(fd)
                self.name = _fresh_name()
                continue
            except BaseException:
                os.close(fd)
                raise
            break
        self._fd = fd
        self.directory.mkdir()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self._lock_path.unlink()
            os.close(self._fd)
            self._fd = None

    def remove_stale(self) -> list[Path]:
        """Remove the root directories of builds that died; return them."""
        removed: list[Path] = []
        entries: list[Path] = []
        with contextlib.suppress(FileNotFoundError):
            entries = sorted(self.base.iterdir())
        names = {p.name for p in entries}
        for path in entries:
            if path.name.endswith(_LOCK) or path.name.startswith(".tmp-"):
                fd = _try_lock(path)
                if fd is None:
                    continue
                try:
                    owner = path.name.removeprefix(".tmp-").removesuffix(_LOCK)
                    shutil.rmtree(self.base / owner, ignore_errors=True)
                    removed.append(self.base / owner)
                    path.unlink(missing_ok=True)
                finally:
                    os.close(fd)
            elif path.is_dir() and f"{path.name}{_LOCK}" not in names and path.name != self.name:
                # A directory whose lock file is gone: its remover died half-way.
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

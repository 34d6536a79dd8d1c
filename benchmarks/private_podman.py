"""podman with private storage and configuration: nothing of the machine's is read or changed.

Shared by the benchmarks (``benchmarks/partial_harness.py``: podman with
partial pulls) and the tests (``tests/client_daemons.py``: podman as one of
the real clients); tests may import benchmarks, not the other way round.

:class:`PrivatePodman` makes a temporary directory holding podman's storage
(``--root``, ``--runroot``, the overlay driver), its temporary files and its
configuration files, passed through ``CONTAINERS_STORAGE_CONF``,
``CONTAINERS_REGISTRIES_CONF`` and ``CONTAINERS_CONF``: no unqualified
search registries, no network namespace for containers, cgroupfs, events
to a file, and ``nofile``/``nproc`` limits of :data:`ULIMIT` (this
machine's containers need limits below the host's: runc fails with "error
setting rlimits" otherwise).  With ``partial=True`` it also pulls eStargz
and zstd:chunked layers partially (``enable_partial_images``, no hard
links).  :meth:`PrivatePodman.close` removes its images, unmounts what
podman left mounted below the directory and removes it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["ULIMIT", "PodmanFailed", "PrivatePodman", "unmount_below"]

#: ``nofile`` and ``nproc`` limits for containers on this machine (below the host's).
ULIMIT = 4096

#: What enables partial pulls in containers-storage (the storage.conf options table).
_PARTIAL_PULLS = (
    '[storage.options]\npull_options = {enable_partial_images = "true", '
    'use_hard_links = "false", ostree_repos = ""}\n'
)


class PodmanFailed(RuntimeError):
    """A podman command exited with an error (the message ends with its stderr's tail)."""


def unmount_below(root: Path) -> None:
    """Lazily unmount every mount under ``root`` (deepest first); only our own directory."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:  # pragma: no cover - Linux always has it
        return
    prefix = str(root) + "/"
    targets = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for target in sorted(targets, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True, check=False)


class PrivatePodman:
    """podman with private storage (``--root``, ``--runroot``) and configuration files."""

    def __init__(self, *, partial: bool = False, prefix: str = "nx-podman-") -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=prefix))
        (self.workdir / "tmp").mkdir()
        storage = self.workdir / "storage.conf"
        storage.write_text(
            '[storage]\ndriver = "overlay"\n'
            f'runroot = "{self.workdir / "run"}"\ngraphroot = "{self.workdir / "store"}"\n'
            + (_PARTIAL_PULLS if partial else "")
        )
        registries = self.workdir / "registries.conf"
        registries.write_text("unqualified-search-registries = []\n")
        containers = self.workdir / "containers.conf"
        containers.write_text(
            '[containers]\nnetns = "none"\n'
            f'default_ulimits = ["nofile={ULIMIT}:{ULIMIT}", "nproc={ULIMIT}:{ULIMIT}"]\n'
            '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
        )
        self.env = {
            **os.environ,
            "CONTAINERS_STORAGE_CONF": str(storage),
            "CONTAINERS_REGISTRIES_CONF": str(registries),
            "CONTAINERS_CONF": str(containers),
            "TMPDIR": str(self.workdir / "tmp"),
        }

    def argv(self, *args: str) -> list[str]:
        """The command line of ``podman ARGS`` on the private storage."""
        return [
            "podman",
            "--root",
            str(self.workdir / "store"),
            "--runroot",
            str(self.workdir / "run"),
            "--tmpdir",
            str(self.workdir / "tmp"),
            *args,
        ]

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Run ``podman ARGS``; a failure raises :class:`PodmanFailed` with its stderr tail."""
        result = subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if result.returncode != 0:
            raise PodmanFailed(
                f"podman {' '.join(args[:3])} exited {result.returncode}:\n{result.stderr[-3000:]}"
            )
        return result

    def close(self) -> None:
        """Remove every image and the private directory (unmounting what podman left)."""
        subprocess.run(
            self.argv("rmi", "--all", "--force"),
            capture_output=True,
            check=False,
            env=self.env,
            timeout=300,
        )
        unmount_below(self.workdir)
        shutil.rmtree(self.workdir, ignore_errors=True)

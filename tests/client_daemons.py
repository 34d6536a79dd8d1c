"""Real container clients with private state: podman, containerd's ``ctr``, Docker.

Each client is started (or, for podman, configured) in its own temporary
directory: its own storage root, run directory, socket and configuration
files, so nothing of the machine's (``/var/lib/docker``,
``/var/lib/containers``, ``/run/containerd``, ``~/.docker``) is read or
changed and tests can run beside a system daemon.  Each offers
:meth:`pull` (returning the manifest digest the client resolved),
:meth:`run_hello` (running ``hello`` from the pulled image) and
:attr:`version`.

This machine's containers need ``nofile`` and ``nproc`` limits below the
host's (runc fails with "error setting rlimits" otherwise), so each client
is configured with 4096 for both; Docker runs with the ``vfs`` storage
driver, no iptables and no bridge (containers run with ``--network
none``), which is what works inside this VM.  Daemons run in their own
process group and are stopped with it (SIGTERM, then SIGKILL).  podman's
private set-up is :class:`benchmarks.private_podman.PrivatePodman`, which the
partial-pull benchmark uses too (its failures raise ``PodmanFailed``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from benchmarks.private_podman import ULIMIT, PodmanFailed, PrivatePodman, unmount_below
from nixery_core.runner import tied_to_caller

__all__ = ["Containerd", "DaemonFailed", "Dockerd", "Podman", "docker_binary"]

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class DaemonFailed(RuntimeError):
    """A client daemon did not come up, or a client command failed."""


def docker_binary() -> str:
    """Debian's ``docker`` CLI (``/usr/bin/docker``), else the first on PATH."""
    if Path("/usr/bin/docker").is_file():
        return "/usr/bin/docker"
    return shutil.which("docker") or "docker"


def _run(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False,
        env=dict(env) if env is not None else None, stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise DaemonFailed(
            f"{' '.join(argv[:4])}... exited {result.returncode}:\n{result.stderr[-3000:]}"
        )
    return result


class _Daemon:
    """A daemon subprocess in its own process group, logging to a file in ``workdir``."""

    name = "daemon"

    def __init__(self) -> None:
        # Short paths: unix socket paths are limited to 108 bytes.
        self.workdir = Path(tempfile.mkdtemp(prefix=f"nx-{self.name}-"))
        self.log_path = self.workdir / "daemon.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: Sequence[str], ready: Sequence[str], timeout: float = 60) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                tied_to_caller(argv), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                raise DaemonFailed(f"{self.name} exited {code}:\n{self.log_tail()}")
            probe = subprocess.run(
                list(ready), capture_output=True, timeout=30, check=False,
                stdin=subprocess.DEVNULL,
            )
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise DaemonFailed(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines the daemon logged."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the daemon's process group, SIGKILL it after 20 s."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def close(self) -> None:
        """Stop the daemon and remove its directory (mounts left behind are unmounted)."""
        self.stop()
        unmount_below(self.workdir)
        shutil.rmtree(self.workdir, ignore_errors=True)


class Containerd(_Daemon):
    """``containerd`` on a private root, state and socket; driven with ``ctr``."""

    name = "containerd"

    def start(self) -> Containerd:
        """Write the configuration, start containerd, wait for ``ctr version``."""
        self.socket = self.workdir / "containerd.sock"
        config = self.workdir / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.workdir / "root"}"\n'
            f'state = "{self.workdir / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.socket}.ttrpc"\n'
            f'[debug]\n  address = "{self.workdir / "debug.sock"}"\n'
        )
        self._spawn(["containerd", "--config", str(config)], [*self._ctr(), "version"])
        return self

    def _ctr(self) -> list[str]:
        return ["ctr", "--address", str(self.socket), "--namespace", "nixery-test"]

    @property
    def version(self) -> str:
        """containerd's version string."""
        out = _run(["containerd", "--version"]).stdout.split()
        return out[2] if len(out) > 2 else " ".join(out)

    def pull(self, reference: str) -> str:
        """``ctr images pull --plain-http``; returns the digest of what the tag resolved to."""
        _run([*self._ctr(), "images", "pull", "--plain-http", reference])
        listed = _run([*self._ctr(), "images", "ls"]).stdout
        for line in listed.splitlines():
            fields = line.split()
            if fields and fields[0] == reference:
                return next(f for f in fields if _DIGEST.fullmatch(f))
        raise DaemonFailed(f"{reference} not in ctr images ls:\n{listed}")

    def run_hello(self, reference: str) -> str:
        """``ctr run --rm`` the image's ``hello``; returns its output."""
        name = f"nixery-{uuid.uuid4().hex[:12]}"
        return _run([*self._ctr(), "run", "--rm", reference, name, "hello"]).stdout


class Dockerd(_Daemon):
    """``dockerd`` on a private data root, exec root and socket, trusting plain-HTTP registries."""

    name = "dockerd"

    def start(self, insecure_registries: Sequence[str]) -> Dockerd:
        """Write daemon.json, start dockerd, wait for ``docker version``."""
        self.socket = self.workdir / "docker.sock"
        limits = {
            kind: {"Name": kind, "Hard": ULIMIT, "Soft": ULIMIT} for kind in ("nofile", "nproc")
        }
        config = {
            "data-root": str(self.workdir / "data"),
            "exec-root": str(self.workdir / "exec"),
            "pidfile": str(self.workdir / "docker.pid"),
            "hosts": [f"unix://{self.socket}"],
            "storage-driver": "vfs",
            "iptables": False,
            "ip6tables": False,
            "bridge": "none",
            "insecure-registries": list(insecure_registries),
            "default-ulimits": limits,
        }
        path = self.workdir / "daemon.json"
        path.write_text(json.dumps(config))
        (self.workdir / "cli").mkdir()
        self._spawn(["dockerd", "--config-file", str(path)], [*self._docker(), "version"])
        return self

    def _docker(self) -> list[str]:
        return [docker_binary(), "--config", str(self.workdir / "cli"), "-H", f"unix://{self.socket}"]

    @property
    def version(self) -> str:
        """The daemon's version."""
        return _run([*self._docker(), "version", "--format", "{{.Server.Version}}"]).stdout.strip()

    def pull(self, reference: str) -> str:
        """``docker pull``; returns the ``Digest:`` it printed (what the tag resolved to)."""
        out = _run([*self._docker(), "pull", reference]).stdout
        match = re.search(r"^Digest: (sha256:[0-9a-f]{64})$", out, re.MULTILINE)
        if match is None:
            raise DaemonFailed(f"no digest in docker pull's output:\n{out}")
        return match.group(1)

    def run_hello(self, reference: str) -> str:
        """``docker run --rm --network none`` the image's ``hello``; returns its output."""
        argv = [*self._docker(), "run", "--rm", "--network", "none", reference, "hello"]
        return _run(argv).stdout


class Podman(PrivatePodman):
    """podman with private storage (``--root``, ``--runroot``) and configuration files."""

    @property
    def version(self) -> str:
        """podman's version."""
        return self.run("version", "--format", "{{.Client.Version}}", timeout=300).stdout.strip()

    def pull(self, reference: str) -> str:
        """``podman pull --tls-verify=false``; returns the manifest digest it resolved."""
        self.run("pull", "--tls-verify=false", reference, timeout=300)
        out = self.run(
            "image", "inspect", "--format", "{{.Digest}}", reference, timeout=300
        ).stdout.strip()
        if not _DIGEST.fullmatch(out):
            raise PodmanFailed(f"podman image inspect gave no digest: {out!r}")
        return out

    def run_hello(self, reference: str) -> str:
        """``podman run --rm`` the image's ``hello``; returns its output."""
        return self.run("run", "--rm", reference, "hello", timeout=300).stdout


@contextlib.contextmanager
def started(daemon: Containerd | Dockerd | Podman) -> Iterator[None]:
    """Close ``daemon`` when the block ends."""
    try:
        yield
    finally:
        daemon.close()

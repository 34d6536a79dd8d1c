"""Shared fixtures: real tools (an error in CI when missing), offline Nix, paths."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from nixery_core import outside_reads
from nixery_core.sources import LocalPathSource
from nixery_core.testing.runners import FakeNix, FakePackage, default_fake_packages

REPO = Path(__file__).resolve().parent.parent
OFFLINE_SET = REPO / "nix" / "offline"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

#: Nix settings for every test: no binary cache (it is unreachable offline and
#: every build would wait on it), no sandbox (Debian's nix-bin runs without one).
TEST_NIX_CONFIG = "substituters =\nsandbox = false\n"


def fake_nix(root: Path, extra: dict[str, FakePackage] | None = None) -> FakeNix:
    """FakeNix with its store under ``root``: the default fake packages plus ``extra``."""
    return FakeNix(root, {**default_fake_packages(), **(extra or {})})


def require_tools(*tools: str) -> None:
    """Skip when a real tool is missing on a developer machine; fail in CI.

    A CI run that skips the real-component tests is a failed run.
    """
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if not missing:
        return
    message = f"required tools not installed: {', '.join(missing)} (run scripts/setup.sh)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def require_root(what: str) -> None:
    """Skip without root on a developer machine; fail in CI, which runs as root.

    ``what`` says what needs it (private daemons, overlay mounts, runc).
    """
    if os.geteuid() == 0:
        return
    message = f"{what} needs root here"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def slow_builders_alive() -> list[int]:
    """Processes running the offline set's ``slow`` builder (found by its command line)."""
    alive = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"waiting for my Nix to go away" in cmdline:  # nix/offline/default.nix
            alive.append(int(proc.name))
    return alive


def wait_no_slow_builders(timeout: float) -> None:
    """Wait up to ``timeout`` seconds for every ``slow`` builder to end; fail if one lives on."""
    deadline = time.monotonic() + timeout
    while slow_builders_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow_builders_alive() == [], "a builder outlived its Nix"


@attrs.define
class Children:
    """Processes a test starts (text mode); :meth:`kill_running` ends those still running."""

    _procs: list[subprocess.Popen[str]] = attrs.Factory(list)

    def start(self, argv: Sequence[str], **popen: Any) -> subprocess.Popen[str]:
        """``subprocess.Popen(argv, text=True, **popen)``, remembered for teardown."""
        proc = subprocess.Popen(argv, text=True, **popen)
        self._procs.append(proc)
        return proc

    def kill_running(self, timeout: float = 30.0) -> None:
        """SIGKILL every process still running, then reap each (its pipes drained)."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=timeout)


@pytest.fixture
def children() -> Iterator[Children]:
    """Starts a test's processes; kills any still running at teardown."""
    started = Children()
    yield started
    started.kill_running()


@contextlib.contextmanager
def threads_started() -> Iterator[list[threading.Thread]]:
    """The threads any code starts inside the block, in order (``Thread.start`` recorded)."""
    started: list[threading.Thread] = []
    real_start = threading.Thread.start

    def recording_start(thread: threading.Thread) -> None:
        started.append(thread)
        real_start(thread)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(threading.Thread, "start", recording_start)
        yield started


@pytest.fixture(autouse=True, scope="session")
def _offline_nix() -> Iterator[None]:
    """Point every Nix call at no binary cache."""
    old = os.environ.get("NIX_CONFIG")
    os.environ["NIX_CONFIG"] = TEST_NIX_CONFIG + (old or "")
    yield
    if old is None:
        os.environ.pop("NIX_CONFIG", None)
    else:
        os.environ["NIX_CONFIG"] = old


@pytest.fixture(autouse=True, scope="session")
def _offline_set_reads_outside() -> None:
    """The bundled offline set reads /usr/bin/busybox and the host CA bundle, so its
    first uncached resolve in a process is evaluated twice (nixery_core.outside_reads);
    note that once here, so tests counting Nix calls do not depend on test order."""
    outside_reads.record(LocalPathSource(OFFLINE_SET).resolve("latest"), "/usr/bin")


@pytest.fixture
def nix() -> None:
    """Real Nix is needed (an error in CI, a skip elsewhere)."""
    require_tools("nix-build", "nix-instantiate", "nix-store", "nix")

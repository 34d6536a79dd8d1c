"""Faults across the whole build pipeline: each leaves no partial state, and the retry works.

Every test injects one fault, then checks the same things: the typed error
from :mod:`nixery_core.errors` where one is due; no partial blob visible;
no cache entry (in either tier) naming a missing blob; no manifest entry
for the failed build; and the next attempt succeeds with the digest a
clean build gives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    """Wait until ``path`` exists; fail early with the child's stderr if it exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"worker exited with {proc.returncode} before {path}:\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"worker did not reach {path} in {timeout}s")
        time.sleep(0.02)


def _kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL


# --- the cross-process lock ---------------------------------------------------------------

_HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from nixery_core.cache import BuildCache

    cache_dir, marker, key = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    cache = BuildCache(cache_dir)
    with cache.single_flight(key):
        marker.touch()
        print("acquired", flush=True)
        time.sleep(3600)
    """
)


def test_lock_held_by_a_killed_process_is_released(tmp_path: Path) -> None:
    """A process SIGKILLed inside single_flight blocks the next one only while it lives."""
    key = "manifest:" + "ab" * 32
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path / "cache"), str(tmp_path / "held"), key],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _wait_for(tmp_path / "held", holder)
    waiter = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path / "cache"), str(tmp_path / "next"), key],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1.0)  # long enough for an unexcluded waiter to start and acquire
        assert not (tmp_path / "next").exists(), "the lock did not exclude the second process"
        _kill(holder)
        _wait_for(tmp_path / "next", waiter, timeout=20.0)
    finally:
        for proc in (holder, waiter):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

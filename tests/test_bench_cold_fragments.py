"""bench_cold_fragments' per-thread CPU: every thread of a run counted once, by its name."""

from __future__ import annotations

import threading
import time

import pytest

from benchmarks.bench_cold_fragments import _ThreadClocks


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_threads_ending_within_a_run_are_counted_once_by_name() -> None:
    """A thread started before a run's mark and ended within it counts only its CPU since the
    mark, and threads started one after another (the next may get the last one's id) each
    count their own, summed under their name with its number cut off; leaving puts
    ``Thread.run`` back."""
    original = threading.Thread.run
    go, spun = threading.Event(), threading.Event()

    def before_and_within() -> None:
        _spin(0.05)  # before the mark: not counted
        spun.set()
        go.wait()
        _spin(0.05)

    with _ThreadClocks() as clocks:
        early = threading.Thread(target=before_and_within, name="early")
        early.start()
        spun.wait()
        clocks.mark()
        go.set()
        early.join()
        for number in range(3):
            thread = threading.Thread(target=_spin, args=(0.03,), name=f"pool-{number}")
            thread.start()
            thread.join()
        counted = clocks.read()
    assert counted["early"] == pytest.approx(0.05, abs=0.02)
    assert counted["pool"] == pytest.approx(0.09, abs=0.03)
    assert "MainThread" not in counted  # the caller times itself
    assert threading.Thread.run is original

"""Fragment files left by killed processes are swept; files other processes are writing are not.

Real processes share one fragment cache directory; one is SIGKILLed in the
window between a fragment's file being written and its index row being
committed (the writing thread held up by another connection's write
transaction, as a busy index does).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, Children

from nixery_core.cli import main
from nixery_core.fragments import FragmentCache

#: A process with the cache open.  ``spill``: a 20 MiB fragment being recorded, its file
#: written as it comes, not committed until told.  ``commit``: told to, commits a 100 kB
#: fragment (written by the writing thread, then its row) and waits.
_CHILD = r"""
import os, sys
from nixery_core.cli import main
from nixery_core.fragments import FragmentCache
cache = FragmentCache(sys.argv[1])
print("open", flush=True)
if sys.argv[2] == "spill":
    writer = cache.writer("large")
    for _ in range(20):
        writer.add(os.urandom(1 << 20))
    print("ready", flush=True)
    sys.stdin.readline()
    writer.commit(20 << 20)
    cache.close()
    print("done", flush=True)
else:
    sys.stdin.readline()
    writer = cache.writer("small")
    writer.add(os.urandom(100_000))
    writer.commit(100_000)
    print("ready", flush=True)
    sys.stdin.readline()
"""


def _start(children: Children, directory: Path, mode: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = children.start(
        [sys.executable, "-c", _CHILD, str(directory), mode],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "open\n"
    return proc


def _say(proc: subprocess.Popen[str], expect: str | None = None) -> None:
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    if expect is not None:
        assert proc.stdout.readline() == expect


def _data_files(directory: Path) -> dict[str, int]:
    return {
        f"{file.parent.name}/{file.name}": file.stat().st_size
        for file in (directory / "data").glob("*/*")
    }


def _wait_for_file(directory: Path, before: set[str]) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = set(_data_files(directory)) - before
        if new:
            (name,) = new
            return name
        time.sleep(0.01)
    raise AssertionError("no data file was written")


def _kill_between_file_and_row(children: Children, directory: Path) -> str:
    """Start a process, SIGKILL it once its fragment's file is written but its row is not."""
    proc = _start(children, directory, "commit")
    before = set(_data_files(directory))
    blocker = sqlite3.connect(directory / "index.sqlite", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # the child's writing thread waits for the index
        _say(proc, "ready\n")
        stray = _wait_for_file(directory, before)
        proc.kill()
        proc.wait()
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()
    return stray


def test_a_process_killed_between_file_and_row_leaves_nothing_after_the_next_open(
    tmp_path: Path, children: Children
) -> None:
    """A fragment file whose process was SIGKILLed before its row committed is removed when
    the cache is next opened, and the directory then checks clean."""
    directory = tmp_path / "fragments"
    with FragmentCache(directory) as cache:
        cache.put("kept", [os.urandom(50_000)], 50_000)
    stray = _kill_between_file_and_row(children, directory)
    assert stray in _data_files(directory)
    with FragmentCache(directory) as cache:
        assert stray not in _data_files(directory)
        assert cache.keys() == ["kept"]
        assert cache.check() == []
        assert len(_data_files(directory)) == 1
    assert list((directory / "owners").iterdir()) == []  # every owner file went with its owner


def test_a_live_writers_file_survives_a_sweep_and_is_committed_afterwards(
    tmp_path: Path, children: Children
) -> None:
    """A sweep (at open, or called) leaves alone the file another live process is still
    writing, though no row names it yet; that process then commits it and it is found."""
    directory = tmp_path / "fragments"
    FragmentCache(directory).close()
    live = _start(children, directory, "spill")
    assert live.stdout is not None
    assert live.stdout.readline() == "ready\n"
    (in_flight,) = _data_files(directory)
    stray = _kill_between_file_and_row(children, directory)
    with FragmentCache(directory) as cache:
        assert set(_data_files(directory)) == {in_flight}  # the dead one's went, the live one's not
        assert cache.check() == []  # in flight is not wrong
        assert cache.sweep() == 0
        assert stray not in _data_files(directory)
        _say(live, "done\n")
        assert live.wait() == 0
        with cache.get("large") as found:
            assert found is not None
            assert found.size == 20 << 20
        assert cache.check() == []


def test_the_size_limit_bounds_the_bytes_on_disk_after_a_killed_writer(
    tmp_path: Path, children: Children
) -> None:
    """After a process holding a 20 MiB fragment file is killed, the next open leaves on disk
    only files the index names: their bytes are within the cache's size limit."""
    directory = tmp_path / "fragments"
    limit = 1 << 20
    with FragmentCache(directory, size_limit=limit) as cache:
        for n in range(30):
            cache.put(f"k{n}", [os.urandom(100_000)], 100_000)
    proc = _start(children, directory, "spill")
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    proc.kill()
    proc.wait()
    assert sum(_data_files(directory).values()) > 20 << 20
    with FragmentCache(directory, size_limit=limit) as cache:
        on_disk = sum(_data_files(directory).values())
        assert 0 < on_disk <= cache.volume() <= limit
        assert cache.check() == []


def test_starting_a_damaged_index_afresh_keeps_a_live_writers_file_only(
    tmp_path: Path, children: Children
) -> None:
    """When a damaged index is started afresh, the files it named and a killed process's go,
    while a live process's file being written stays (it commits it afterwards)."""
    directory = tmp_path / "fragments"
    with FragmentCache(directory) as cache:
        cache.put("old", [os.urandom(100_000)], 100_000)
    (old,) = _data_files(directory)
    os.utime(directory / "data" / old, (time.time() - 5, time.time() - 5))  # written earlier
    stray = _kill_between_file_and_row(children, directory)
    live = _start(children, directory, "spill")
    assert live.stdout is not None
    assert live.stdout.readline() == "ready\n"
    (in_flight,) = set(_data_files(directory)) - {old, stray}
    (directory / "index.sqlite").write_bytes(b"not a database" * 1000)
    for name in ("index.sqlite-wal", "index.sqlite-shm"):
        (directory / name).unlink(missing_ok=True)
    with FragmentCache(directory) as cache:
        assert cache.keys() == []
        assert set(_data_files(directory)) == {in_flight}
        assert cache.check() == []
    live.kill()
    live.wait()
    with FragmentCache(directory) as cache:
        assert _data_files(directory) == {}
        assert cache.check() == []


def test_command_line_gc_with_cache_removes_a_killed_processes_fragment_file(
    tmp_path: Path, children: Children, capsys: pytest.CaptureFixture[str]
) -> None:
    """`nixery-core gc --cache DIR` removes fragment files a SIGKILLed process left (and
    `--dry-run` leaves them)."""
    directory = tmp_path / "cache" / "fragments"
    FragmentCache(directory).close()
    stray = _kill_between_file_and_row(children, directory)
    argv = ["gc", "--store", str(tmp_path / "store"), "--cache", str(tmp_path / "cache")]
    assert main([*argv, "--dry-run"]) == 0
    assert stray in _data_files(directory)
    assert main(argv) == 0
    assert f"removed 1 stray fragment files in {directory}" in capsys.readouterr().out
    assert _data_files(directory) == {}


def test_sweep_removes_unnamed_files_of_ended_owners_only_once_older_than_the_sweep(
    tmp_path: Path,
) -> None:
    """A file no row names whose owner is neither live nor dead (closed, or opened after the
    sweep looked) goes only if older than the sweep; one of the earlier naming only after an
    hour."""
    directory = tmp_path / "fragments"
    with FragmentCache(directory) as cache:
        data = directory / "data" / "a"
        now = time.time()
        made = {
            "a" * 32 + ".0123456789abcdef": now - 5,  # a closed owner's, written earlier
            "a" * 31 + "b.0123456789abcdef": now + 5,  # a newer owner's, written since
            "a" * 31 + "c": now - 7200,  # earlier naming, two hours old
            "a" * 31 + "d": now - 60,  # earlier naming, a minute old
        }
        for name, mtime in made.items():
            (data / name).write_bytes(b"x")
            os.utime(data / name, (mtime, mtime))
        assert cache.sweep() == 2
        assert sorted(p.name for p in data.iterdir()) == ["a" * 31 + "b.0123456789abcdef",
                                                          "a" * 31 + "d"]


_PUT = r"""
import sys
from nixery_core.fragments import FragmentCache
cache = FragmentCache(sys.argv[1])
print("open", flush=True)
sys.stdin.readline()
cache.put(sys.argv[2], [b"x" * 100_000], 100_000)
cache.close()
print("done", flush=True)
"""


def test_two_processes_opening_a_damaged_index_at_once_start_it_afresh_once(
    tmp_path: Path, children: Children
) -> None:
    """Two processes that both found the index damaged replace it once (the second sees the
    first's new index under reset.lock), so what each then stores is in the one index."""
    directory = tmp_path / "fragments"
    FragmentCache(directory).close()
    (directory / "index.sqlite").write_bytes(b"not a database" * 1000)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    lock = os.open(directory / "reset.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # both find the damage, then wait for the lock
        procs = [
            children.start([sys.executable, "-c", _PUT, str(directory), key],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            for key in ("one", "two")
        ]
        deadline = time.monotonic() + 30
        while sum(f" {p.pid} " in line for p in procs for line in _lock_waiters()) < 2:
            assert time.monotonic() < deadline, "the processes did not wait for reset.lock"
            time.sleep(0.01)
    finally:
        os.close(lock)
    for proc in procs:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "open\n"
    for proc in procs:
        _say(proc, "done\n")
    with FragmentCache(directory) as cache:
        assert cache.keys() == ["one", "two"]
        assert cache.check() == []


def _lock_waiters() -> list[str]:
    """The lines of /proc/locks for processes blocked waiting for a lock."""
    return [
        line for line in Path("/proc/locks").read_text().splitlines() if "->" in line
    ]

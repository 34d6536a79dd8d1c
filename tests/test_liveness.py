"""ProcfsProbe: naming this process, and telling a dead one on this host from a live one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nixery_core.liveness import ProcessId, ProcfsProbe
from nixery_core.protocols import ProcessProbe

BOOT = "0f0e0d0c-0b0a-0908-0706-050403020100"


def _stat_line(pid: int, comm: str, state: str, start: int) -> str:
    # Fields 3..52 as the kernel prints them; field 22 (the 20th after comm) is the start time.
    after = [state, *["0"] * 18, str(start), *["0"] * 30]
    return f"{pid} ({comm}) {' '.join(after)}\n"


class FakeProc:
    """A /proc tree with the files ProcfsProbe reads, and a process table for signal 0."""

    def __init__(self, root: Path, me: int = 100) -> None:
        self.root = root
        self.me = me
        self.alive: set[int] = set()
        self.other_users: set[int] = set()
        (root / "sys" / "kernel" / "random").mkdir(parents=True)
        (root / "sys" / "kernel" / "random" / "boot_id").write_text(BOOT + "\n")
        (root / "self" / "ns").mkdir(parents=True)
        (root / "self" / "ns" / "pid").symlink_to("pid:[4026531836]")
        (root / "self" / "ns" / "time").symlink_to("time:[4026531834]")
        self.add(me, "python3", "R", 5000)
        (root / "self" / "stat").write_text(_stat_line(me, "python3", "R", 5000))

    def add(self, pid: int, comm: str, state: str, start: int, *, hidden: bool = False) -> None:
        self.alive.add(pid)
        if not hidden:
            (self.root / str(pid)).mkdir(exist_ok=True)
            (self.root / str(pid) / "stat").write_text(_stat_line(pid, comm, state, start))

    def kill(self, pid: int, sig: int) -> None:
        assert sig == 0
        if pid not in self.alive:
            raise ProcessLookupError(pid)
        if pid in self.other_users:
            raise PermissionError(pid)

    def probe(self, hostname: str = "node-a") -> ProcfsProbe:
        return ProcfsProbe(self.root, hostname=lambda: hostname, getpid=lambda: self.me,
                           kill=self.kill)


def test_this_process_is_named_by_host_namespaces_pid_and_start_time(tmp_path: Path) -> None:
    """The name holds hostname, boot id, pid and time namespaces, the pid and its start time."""
    proc = FakeProc(tmp_path)
    probe = proc.probe()
    assert isinstance(probe, ProcessProbe)
    me = probe.this_process()
    assert me == ProcessId(
        f"node-a boot:{BOOT} pid:[4026531836] time:[4026531834]", proc.me, 5000
    )
    assert ProcessId.from_json(me.to_json()) == me


def test_a_command_name_with_spaces_and_parentheses_is_parsed(tmp_path: Path) -> None:
    """The start time is found after the last ')' whatever the command name holds."""
    proc = FakeProc(tmp_path)
    (tmp_path / "self" / "stat").write_text(_stat_line(proc.me, "a) (b c", "S", 777))
    me = proc.probe().this_process()
    assert me is not None
    assert me.start == 777


def test_no_name_where_proc_cannot_give_one(tmp_path: Path) -> None:
    """No /proc, or a /proc of another pid namespace (its self is not us): no name at all."""
    assert ProcfsProbe(tmp_path / "missing").this_process() is None
    proc = FakeProc(tmp_path)
    proc.me = 42  # /proc/self says 100: this /proc shows another pid namespace
    assert proc.probe().this_process() is None
    gone = ProcessId(f"node-a boot:{BOOT} pid:[4026531836] time:[4026531834]", 9, 1)
    assert not proc.probe().gone(gone)  # without a name of our own, never "gone"


def test_gone_only_for_an_ended_process_on_this_host(tmp_path: Path) -> None:
    """Gone: no such pid, a reused pid (other start time), a zombie; never on another host."""
    proc = FakeProc(tmp_path)
    probe = proc.probe()
    me = probe.this_process()
    assert me is not None
    proc.add(200, "builder", "S", 6000)
    proc.add(201, "builder", "Z", 6100)
    proc.add(202, "other user's", "S", 6200, hidden=True)  # hidepid: no /proc entry for us
    proc.other_users.add(202)
    here = me.host

    assert not probe.gone(ProcessId(here, 200, 6000))  # running
    assert not probe.gone(me)
    assert probe.gone(ProcessId(here, 200, 5999))  # pid 200 now names a newer process
    assert probe.gone(ProcessId(here, 201, 6100))  # a zombie renews nothing
    assert probe.gone(ProcessId(here, 300, 6000))  # no such pid
    assert not probe.gone(ProcessId(here, 202, 6200))  # exists, but cannot be read: not sure
    for elsewhere in (
        here.replace("node-a", "node-b"),
        here.replace(BOOT, "another-boot"),
        here.replace("pid:[4026531836]", "pid:[4026532176]"),  # another container
        here.replace("time:[4026531834]", "time:[4026532000]"),
    ):
        assert not probe.gone(ProcessId(elsewhere, 300, 6000)), elsewhere


def test_lease_fields_that_do_not_name_a_process_are_ignored() -> None:
    """Older lease bodies, and malformed process fields, name no process."""
    assert ProcessId.from_json(None) is None
    assert ProcessId.from_json({"host": "h", "pid": 1}) is None
    assert ProcessId.from_json({"host": "h", "pid": True, "start": 1}) is None
    assert ProcessId.from_json({"host": "", "pid": 1, "start": 1}) is None
    assert ProcessId.from_json({"host": "h", "pid": 0, "start": 1}) is None
    assert ProcessId.from_json({"host": "h", "pid": 3, "start": 4}) == ProcessId("h", 3, 4)


def _start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat, read independently of the module under test."""
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="procfs is Linux's")
def test_real_probe_sees_a_killed_child_gone_and_a_running_one_alive() -> None:
    """On the real /proc: a running child is alive; SIGKILLed it is gone, zombie or reaped."""
    probe = ProcfsProbe()
    me = probe.this_process()
    assert me is not None
    assert (me.pid, me.start) == (os.getpid(), _start_time(os.getpid()))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        named = ProcessId(me.host, child.pid, _start_time(child.pid))
        assert not probe.gone(named)
        assert probe.gone(ProcessId(me.host, child.pid, named.start + 1))  # a reused pid
        assert not probe.gone(ProcessId(me.host + "x", child.pid, named.start + 1))
        os.kill(child.pid, signal.SIGKILL)
        while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            time.sleep(0.01)  # dying; then a zombie until wait() reaps it
        assert probe.gone(named)
    finally:
        child.kill()
        child.wait()
    assert probe.gone(named)  # reaped: no such pid

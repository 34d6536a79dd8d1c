"""Whether a lease holder's process is still running, where this host can tell.

A fleet lease (:mod:`nixery_core.lease`) names the process holding it with
a :class:`ProcessId`: its *host*, its pid, and its start time.  Another
process that sees the same host can look the holder up and, when it no
longer exists, take its lease over at once instead of waiting out the
lease's ttl.  Everything else keeps the ttl rule: this module only ever
answers "gone" when it is certain.

The host is more than the machine's name, because a pid means something
only inside one kernel boot and one pid namespace:

* ``/proc/sys/kernel/random/boot_id``: a new value on every boot, so a
  lease left before a reboot never matches a process after it;
* the pid namespace (``/proc/self/ns/pid``, e.g. ``pid:[4026531836]``):
  containers sharing a kernel see different pids, so a holder in another
  container is never looked up here (its pid would name some other
  process, or none);
* the time namespace (``/proc/self/ns/time``, where the kernel has one):
  the start time ``/proc`` reports is shifted by the reader's time
  namespace;
* the hostname, so two hosts never match even in the (impossible) case of
  equal boot ids.

The start time is field 22 of ``/proc/<pid>/stat`` (clock ticks after
boot): a pid reused by a new process has a later start time, so pid reuse
is never mistaken for the holder being alive.  A zombie (state ``Z``, or
``X``) counts as gone: it runs no code and renews nothing.

Where ``/proc`` is missing (not Linux) or does not describe this process
(a ``/proc`` mounted from another pid namespace), :meth:`ProcfsProbe.this_process`
is ``None``: leases then carry no process and everybody keeps the ttl rule.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs

__all__ = ["ProcessId", "ProcfsProbe"]


@attrs.frozen
class ProcessId:
    """One process, told apart from every other on every host and over time.

    ``host``: the kernel boot, pid and time namespaces and hostname (see the
    module docs); ``pid``: its pid in that pid namespace; ``start``: its
    start time in clock ticks after boot (``/proc/<pid>/stat`` field 22).
    """

    host: str
    pid: int
    start: int

    def to_json(self) -> dict[str, str | int]:
        """The fields a lease body records."""
        return {"host": self.host, "pid": self.pid, "start": self.start}

    @classmethod
    def from_json(cls, value: object) -> ProcessId | None:
        """The process a lease body names; ``None`` for anything else (an older lease)."""
        if not isinstance(value, Mapping):
            return None
        host, pid, start = value.get("host"), value.get("pid"), value.get("start")
        if not isinstance(host, str) or not host:
            return None
        if type(pid) is not int or type(start) is not int or pid <= 0 or start < 0:
            return None
        return cls(host, pid, start)


def _stat(text: str) -> tuple[int, str, int] | None:
    """pid, state and start time from a ``/proc/<pid>/stat`` line; ``None`` if malformed.

    The command name (field 2) is in parentheses and may hold spaces and
    parentheses itself, so the fields after it are found from the last ``)``.
    """
    head, paren, tail = text.rpartition(")")
    fields = tail.split()
    if not paren or len(fields) < 20:
        return None
    try:
        pid = int(head.split("(", 1)[0])
        start = int(fields[19])  # field 22; fields[0] is field 3, the state
    except ValueError:
        return None
    return pid, fields[0], start


def _kill(pid: int, signal: int) -> None:
    os.kill(pid, signal)


@attrs.define
class ProcfsProbe:
    """Names this process and looks others up through ``/proc`` (Linux).

    ``proc`` is where procfs is mounted; ``hostname``, ``getpid`` and
    ``kill`` (``os.kill``, used with signal 0 to ask whether a pid exists
    even where ``hidepid`` hides other users' ``/proc`` entries) are
    injectable for tests.
    """

    proc: Path = Path("/proc")
    hostname: Callable[[], str] = socket.gethostname
    getpid: Callable[[], int] = os.getpid
    kill: Callable[[int, int], None] = _kill
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    # This process's identity, by the pid it was computed for (a fork gets its own).
    _mine: tuple[int, ProcessId | None] | None = attrs.field(init=False, default=None)

    def this_process(self) -> ProcessId | None:
        """This process, or ``None`` where ``/proc`` cannot name it."""
        pid = self.getpid()
        with self._lock:
            if self._mine is not None and self._mine[0] == pid:
                return self._mine[1]
        mine = self._read_this_process(pid)
        with self._lock:
            self._mine = (pid, mine)
        return mine

    def _read_this_process(self, pid: int) -> ProcessId | None:
        try:
            stat = _stat((self.proc / "self" / "stat").read_text())
            boot = (self.proc / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
            pid_ns = str((self.proc / "self" / "ns" / "pid").readlink())
            try:
                time_ns = str((self.proc / "self" / "ns" / "time").readlink())
            except FileNotFoundError:  # a kernel without time namespaces (before 5.6)
                time_ns = "time:none"
            hostname = self.hostname()
        except OSError:
            return None
        if stat is None or stat[0] != pid or not boot:
            return None  # this /proc belongs to another pid namespace
        return ProcessId(f"{hostname} boot:{boot} {pid_ns} {time_ns}", pid, stat[2])

    def gone(self, process: ProcessId) -> bool:
        """Whether ``process`` has certainly ended: on this host, and no longer running.

        ``False`` for a process on another host (or in another namespace),
        and whenever this host cannot tell.
        """
        mine = self.this_process()
        if mine is None or process.host != mine.host:
            return False
        if not self._exists(process.pid):
            return True  # no process has that pid
        return self._ended(process)

    def _ended(self, process: ProcessId) -> bool:
        """Whether the process now at ``process.pid`` is not ``process``, or a zombie."""
        try:
            stat = _stat((self.proc / str(process.pid) / "stat").read_text())
        except (FileNotFoundError, ProcessLookupError):
            return not self._exists(process.pid)  # it ended since, or hidepid hides it
        except OSError:
            return False
        if stat is None:
            return False
        _, state, start = stat
        return start != process.start or state in ("Z", "X")

    def _exists(self, pid: int) -> bool:
        """Whether a process has ``pid``: signal 0 (also answers for other users')."""
        try:
            self.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:  # EPERM: it exists, owned by another user
            return True
        return True

"""The default :class:`~nixery_core.protocols.Runner`: a real subprocess.

argv lists only, never a shell.  Each command gets its own session (process
group) so a timeout kills Nix and everything it started.

**Nix never outlives us.**  Every child is started through util-linux's
``setpriv --pdeathsig KILL`` (Linux), which sets
``prctl(PR_SET_PDEATHSIG, SIGKILL)`` and then executes the command, so the
kernel kills it when the thread that started it dies, SIGKILL of our
process included; Nix in turn starts its builders with the same setting, so
they go too.  This is deliberately *not* a ``preexec_fn``: Python code
between ``fork`` and ``exec`` in a threaded process can block for ever on a
lock another thread held at the fork, and such a child keeps every
inherited descriptor open, ``flock`` locks included (seen: a registry's
next builds waited on the realise lock held by a child stuck in
``futex_wait``).  Without ``setpriv`` (not Linux) commands run untied.

**Bounded memory.**  stderr keeps only its last ``stderr_tail_bytes`` (for
error messages; every line still reaches ``on_log_line``), so a Nix printing
gigabytes of build log keeps the memory flat.  stdout is what the parsers
read: beyond ``max_stdout_bytes`` the command is stopped and
:class:`~nixery_core.errors.NixOutputError` raised.

**A failing log callback is reported as itself.**  When ``on_log_line``
raises, the reader keeps draining stderr (so the command never blocks on a
full pipe), the command's process group is stopped, and :meth:`run` raises
the callback's own exception at once.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO

import attrs

from nixery_core.errors import CommandNotFound, NixBuildFailed, NixOutputError, NixTimeout
from nixery_core.protocols import LogCallback, RunResult

__all__ = ["SubprocessRunner", "tied_to_caller"]

#: What :class:`SubprocessRunner` keeps of stderr by default (the tail).
DEFAULT_STDERR_TAIL = 1 << 20
#: The most stdout the parsers need (a path-info answer for ~100 000 paths).
DEFAULT_MAX_STDOUT = 256 << 20
_CHUNK = 1 << 16
#: How often the waiting thread looks for a failed callback or an overflow.
_POLL = 0.05


#: util-linux's ``setpriv`` (an essential package on Debian and Ubuntu).
_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None


def tied_to_caller(argv: Sequence[str], path: str | None = None) -> tuple[str, ...]:
    """``argv`` started so that it dies with the thread that starts it.

    Test harnesses use it for the daemons they start (a registry, a storage
    emulator), so that a run killed from outside leaves none behind.

    The program is looked up here (``CommandNotFound`` when missing), since
    ``setpriv`` would report a missing one only as an exit status.
    """
    if not argv or shutil.which(argv[0], path=path) is None:
        raise CommandNotFound(argv)
    if _SETPRIV is None:  # pragma: no cover - not Linux
        return tuple(argv)
    # setpriv looks the program up on the same PATH (the env given to Popen).
    return (_SETPRIV, "--pdeathsig", "KILL", "--", *argv)


class _Failure:
    """The first exception a reader thread hit (a failing callback, an overflow)."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.event = threading.Event()

    def set(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
            self.event.set()


def _drain(stream: IO[bytes], sink: list[bytes], limit: int, failure: _Failure,
           overflow: Callable[[bytes], BaseException]) -> None:
    size = 0
    for chunk in iter(lambda: stream.read(_CHUNK), b""):
        if size + len(chunk) > limit:
            failure.set(overflow(b"".join(sink)))
            # Keep reading (and dropping) so the command is never blocked on us.
            for _ in iter(lambda: stream.read(_CHUNK), b""):
                pass
            return
        sink.append(chunk)
        size += len(chunk)


class _Tail:
    """The last ``limit`` bytes of a stream, kept as lines."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lines: collections.deque[bytes] = collections.deque()
        self.size = 0

    def add(self, line: bytes) -> None:
        if len(line) > self.limit:
            line = line[-self.limit :]
        self.lines.append(line)
        self.size += len(line)
        while self.size > self.limit:
            self.size -= len(self.lines.popleft())

    def text(self) -> bytes:
        return b"".join(self.lines)


def _drain_lines(stream: IO[bytes], tail: _Tail, on_line: LogCallback | None,
                 failure: _Failure) -> None:
    # readline(limit): a line without newline never grows beyond one chunk.
    for line in iter(lambda: stream.readline(_CHUNK), b""):
        tail.add(line)
        if on_line is not None:
            try:
                on_line(line.decode("utf-8", "replace").rstrip("\n"))
            except BaseException as exc:  # noqa: BLE001 - re-raised by run()
                failure.set(exc)
                on_line = None  # keep draining, call no more


def _kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, sig)


def _stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the group, so Nix can stop builders it moved to their own sessions;
    SIGKILL whatever is left after ``grace`` seconds."""
    _kill_group(proc, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    _kill_group(proc)
    proc.wait()


def _close(proc: subprocess.Popen[bytes], readers: list[threading.Thread]) -> None:
    """Join the pipe readers and close the pipes (a reader still blocked, on a pipe
    held open by an escaped grandchild, keeps its pipe; it is a daemon thread)."""
    for reader in readers:
        reader.join(timeout=2)
    if not any(reader.is_alive() for reader in readers):
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _wait(proc: subprocess.Popen[bytes], timeout: float | None, failure: _Failure) -> int:
    """The exit code; TimeoutExpired after ``timeout``; returns early on a reader failure."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = _POLL if deadline is None else min(_POLL, max(0.0, deadline - time.monotonic()))
        try:
            return proc.wait(timeout=step)
        except subprocess.TimeoutExpired:
            if failure.event.is_set():
                return -1
            if deadline is not None and time.monotonic() >= deadline:
                raise


@attrs.define
class SubprocessRunner:
    """Runs commands with :mod:`subprocess`.

    ``env`` given to :meth:`run` is merged over ``base_env`` (``os.environ``
    when ``None``).  On timeout the process group gets SIGTERM, then SIGKILL
    after ``term_grace`` seconds: Nix moves its builders to sessions of their
    own, and only Nix can stop those, so it must get the chance to.
    ``stderr_tail_bytes`` and ``max_stdout_bytes`` bound the memory kept
    (see the module documentation).
    """

    base_env: Mapping[str, str] | None = None
    term_grace: float = 3.0
    stderr_tail_bytes: int = DEFAULT_STDERR_TAIL
    max_stdout_bytes: int = DEFAULT_MAX_STDOUT

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        on_log_line: LogCallback | None = None,
    ) -> RunResult:
        argv = tuple(argv)
        full_env = dict(os.environ if self.base_env is None else self.base_env)
        full_env.update(env or {})
        try:
            proc = subprocess.Popen(
                tied_to_caller(argv, full_env.get("PATH")),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=full_env,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise CommandNotFound(argv) from exc
        except OSError as exc:  # E2BIG (argument list too long), EACCES, ...
            raise NixBuildFailed(argv[:1], -1, f"could not start {argv[0]}: {exc}") from exc
        assert proc.stdout is not None  # noqa: S101 - PIPE was requested
        assert proc.stderr is not None  # noqa: S101 - PIPE was requested
        out: list[bytes] = []
        tail = _Tail(self.stderr_tail_bytes)
        failure = _Failure()
        limit = self.max_stdout_bytes

        def overflow(head: bytes) -> BaseException:
            return NixOutputError(
                argv, head[:2000].decode("utf-8", "replace"),
                f"stdout exceeds {limit} bytes",
            )

        readers = [
            threading.Thread(
                target=_drain, args=(proc.stdout, out, limit, failure, overflow), daemon=True
            ),
            threading.Thread(
                target=_drain_lines, args=(proc.stderr, tail, on_log_line, failure), daemon=True
            ),
        ]
        for reader in readers:
            reader.start()
        try:
            returncode = _wait(proc, timeout, failure)
        except subprocess.TimeoutExpired as exc:
            _stop(proc, self.term_grace)
            _close(proc, readers)
            raise NixTimeout(argv, timeout or 0.0, tail.text().decode("utf-8", "replace")) from exc
        except BaseException:
            _stop(proc, self.term_grace)
            _close(proc, readers)
            raise
        if failure.error is not None:
            _stop(proc, self.term_grace)
            _close(proc, readers)
            raise failure.error
        # The command is done; children it left behind in its group would keep
        # the pipes open, so they go too.
        _kill_group(proc)
        for reader in readers:
            reader.join()
        proc.stdout.close()
        proc.stderr.close()
        if failure.error is not None:  # the last bytes overflowed, or the last line failed
            raise failure.error
        return RunResult(argv, returncode, b"".join(out), tail.text())

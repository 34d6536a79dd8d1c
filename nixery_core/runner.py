"""The default :class:`~nixery_core.protocols.Runner`: a real subprocess.

argv lists only, never a shell.  Each command gets its own session (process
group) so a timeout kills Nix and everything it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from typing import IO

import attrs

from nixery_core.errors import CommandNotFound, NixBuildFailed, NixTimeout
from nixery_core.protocols import LogCallback, RunResult

__all__ = ["SubprocessRunner"]


def _drain(stream: IO[bytes], sink: list[bytes]) -> None:
    sink.extend(iter(lambda: stream.read(1 << 16), b""))


def _drain_lines(stream: IO[bytes], sink: list[bytes], on_line: LogCallback | None) -> None:
    for line in iter(stream.readline, b""):
        sink.append(line)
        if on_line is not None:
            on_line(line.decode("utf-8", "replace").rstrip("\n"))


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


@attrs.define
class SubprocessRunner:
    """Runs commands with :mod:`subprocess`.

    ``env`` given to :meth:`run` is merged over ``base_env`` (``os.environ``
    when ``None``).  On timeout the process group gets SIGTERM, then SIGKILL
    after ``term_grace`` seconds: Nix moves its builders to sessions of their
    own, and only Nix can stop those, so it must get the chance to.
    """

    base_env: Mapping[str, str] | None = None
    term_grace: float = 3.0

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
                argv,
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
        err: list[bytes] = []
        readers = [
            threading.Thread(target=_drain, args=(proc.stdout, out), daemon=True),
            threading.Thread(
                target=_drain_lines, args=(proc.stderr, err, on_log_line), daemon=True
            ),
        ]
        for reader in readers:
            reader.start()
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            _stop(proc, self.term_grace)
            _close(proc, readers)
            stderr = b"".join(err).decode("utf-8", "replace")
            raise NixTimeout(argv, timeout or 0.0, stderr) from exc
        except BaseException:
            _stop(proc, self.term_grace)
            _close(proc, readers)
            raise
        # The command is done; children it left behind in its group would keep
        # the pipes open, so they go too.
        _kill_group(proc)
        for reader in readers:
            reader.join()
        proc.stdout.close()
        proc.stderr.close()
        return RunResult(argv, returncode, b"".join(out), b"".join(err))

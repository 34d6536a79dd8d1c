"""SubprocessRunner: output, exit codes, log lines, timeouts that kill the whole group."""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nixery_core.errors import CommandNotFound, NixOutputError, NixTimeout
from nixery_core.protocols import Runner
from nixery_core.runner import SubprocessRunner, tied_to_caller

# SubprocessRunner leaves the pipes of a timed-out command open (reported);
# tests that time out collect that garbage themselves so that the warning
# cannot land on a later test.
LEAKED_PIPES = "ignore::pytest.PytestUnraisableExceptionWarning"


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not _alive(pid)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _timeout(runner: SubprocessRunner, argv: list[str], timeout: float) -> NixTimeout:
    """Run ``argv`` expecting a timeout; return the error with the runner's frames released."""
    try:
        runner.run(argv, timeout=timeout)
    except NixTimeout as exc:
        error = NixTimeout(exc.argv, exc.timeout, exc.stderr_tail)
    else:
        pytest.fail("no timeout")
    gc.collect()
    return error


def test_is_a_runner() -> None:
    """SubprocessRunner satisfies the Runner protocol."""
    assert isinstance(SubprocessRunner(), Runner)


def test_output_and_exit_code_are_returned() -> None:
    """stdout, stderr and a non-zero exit come back as a RunResult, not an error."""
    result = SubprocessRunner().run(["sh", "-c", "printf out; printf err >&2; exit 3"])
    assert (result.returncode, result.stdout, result.stderr) == (3, b"out", b"err")
    assert result.argv == ("sh", "-c", "printf out; printf err >&2; exit 3")


def test_stderr_lines_reach_the_callback_in_order() -> None:
    """on_log_line sees every stderr line, in order, without the newline."""
    lines: list[str] = []
    SubprocessRunner().run(["sh", "-c", "echo one >&2; echo two >&2; printf three >&2"],
                           on_log_line=lines.append)
    assert lines == ["one", "two", "three"]


def test_env_is_merged_over_the_base() -> None:
    """env given to run overrides and extends base_env; nothing else leaks in."""
    runner = SubprocessRunner(base_env={"PATH": os.environ["PATH"], "A": "base", "B": "b"})
    result = runner.run(["sh", "-c", 'echo "$A $B $C ${HOME-unset}"'], env={"A": "over", "C": "c"})
    assert result.stdout == b"over b c unset\n"


def test_missing_program_is_command_not_found() -> None:
    """A program that does not exist raises CommandNotFound carrying the argv."""
    with pytest.raises(CommandNotFound) as caught:
        SubprocessRunner().run(["nixery-no-such-program-xyz", "--help"])
    assert caught.value.argv == ("nixery-no-such-program-xyz", "--help")


@pytest.mark.filterwarnings(LEAKED_PIPES)
def test_timeout_kills_the_process_and_its_children(tmp_path: Path) -> None:
    """On timeout the whole process group dies: the command and the child it spawned."""
    pidfile = tmp_path / "child"
    start = time.monotonic()
    error = _timeout(
        SubprocessRunner(),
        ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; echo started >&2; wait"],
        timeout=0.5,
    )
    elapsed = time.monotonic() - start
    child = int(pidfile.read_text())
    try:
        assert error.timeout == 0.5
        assert error.argv[0] == "sh"
        assert "started" in error.stderr_tail
        assert elapsed < 5
        assert _wait_gone(child)
    finally:
        _kill(child)


def test_children_left_behind_after_exit_are_killed(tmp_path: Path) -> None:
    """A command that exits leaving a background child neither blocks nor leaks it."""
    start = time.monotonic()
    result = SubprocessRunner().run(["sh", "-c", "sleep 60 & echo $!"], timeout=10)
    child = int(result.stdout)
    try:
        assert time.monotonic() - start < 5
        assert _wait_gone(child)
    finally:
        _kill(child)


@pytest.mark.filterwarnings(LEAKED_PIPES)
def test_timeout_lets_the_command_stop_children_in_other_sessions(tmp_path: Path) -> None:
    """On timeout the command gets a chance (SIGTERM) to stop children outside its group."""
    pidfile = tmp_path / "child"
    script = (
        f'setsid sleep 60 </dev/null >/dev/null 2>&1 & c=$!; echo $c > {pidfile}; '
        'trap "kill $c; exit 143" TERM; wait'
    )
    _timeout(SubprocessRunner(), ["sh", "-c", script], timeout=0.5)
    child = int(pidfile.read_text())
    try:
        assert _wait_gone(child, seconds=2)
    finally:
        _kill(child)


class _CallbackBroke(Exception):
    """What the failing log callback raises."""


def test_a_failing_log_callback_is_raised_as_itself_and_stops_the_command() -> None:
    """An on_log_line exception reaches the caller as itself, long before the timeout,
    while the command (printing far more than a pipe holds) is stopped, not left blocked."""
    calls: list[str] = []

    def broken(line: str) -> None:
        calls.append(line)
        raise _CallbackBroke(line)

    script = "i=0; while [ $i -lt 100000 ]; do echo line $i >&2; i=$((i+1)); done; sleep 60"
    with pytest.raises(_CallbackBroke, match="line 0"):
        SubprocessRunner().run(["sh", "-c", script], timeout=60, on_log_line=broken)
    assert calls == ["line 0"]  # called no more after it failed


def _max_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def test_stderr_keeps_a_bounded_tail_while_every_line_reaches_the_callback() -> None:
    """200 MiB of stderr keep the runner's memory flat: only the last bytes are kept,
    the callback still sees every line."""
    seen = [0]

    def count(line: str) -> None:
        seen[0] += 1

    before = _max_rss_kib()
    result = SubprocessRunner(stderr_tail_bytes=4096).run(
        ["sh", "-c", "yes 0123456789012345678901234567890123456789 | head -n 5000000 >&2; "
                     "echo last >&2"],
        timeout=300,
        on_log_line=count,
    )
    grown_mib = (_max_rss_kib() - before) / 1024
    assert result.returncode == 0
    assert result.stderr.endswith(b"last\n")
    assert len(result.stderr) <= 4096
    assert seen[0] == 5_000_001
    assert grown_mib < 64  # the old runner kept all 205 MiB


def test_stdout_beyond_the_bound_is_a_typed_error() -> None:
    """More stdout than the parsers need stops the command with NixOutputError."""
    with pytest.raises(NixOutputError, match="stdout exceeds 1048576 bytes") as caught:
        SubprocessRunner(max_stdout_bytes=1 << 20).run(
            ["sh", "-c", "head -c 5000000 /dev/zero; sleep 60"], timeout=60
        )
    assert caught.value.argv[0] == "sh"


_ORPHAN_PARENT = """
import sys
from nixery_core.runner import SubprocessRunner, tied_to_caller
print("ready", flush=True)
SubprocessRunner().run(["sh", "-c", "echo $$ > " + sys.argv[1] + "; exec sleep 300"])
"""


def test_a_sigkilled_caller_leaves_no_child_behind(tmp_path: Path) -> None:
    """When the process that runs a command is SIGKILLed, the kernel kills the command too."""
    pidfile = tmp_path / "child"
    parent = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN_PARENT, str(pidfile)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert time.monotonic() < deadline, "the command never started"
            time.sleep(0.02)
        child = int(pidfile.read_text())
        assert _alive(child)
        parent.kill()
        parent.wait()
        try:
            assert _wait_gone(child)
        finally:
            _kill(child)
    finally:
        parent.kill()
        parent.wait()
        assert parent.stdout is not None
        parent.stdout.close()


@pytest.mark.parametrize("start", [lambda: SubprocessRunner().run([]), lambda: tied_to_caller([])])
def test_an_empty_command_is_command_not_found(start: Callable[[], object]) -> None:
    """Running or tying an empty argv raises CommandNotFound, never IndexError."""
    with pytest.raises(CommandNotFound):
        start()

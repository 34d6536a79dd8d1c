"""Real Nix under concurrency: cold builds in parallel processes never deadlock,
and Nix never outlives the process that started it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from salted import delete_created, salted_set, store_entries

pytestmark = pytest.mark.usefixtures("nix")

#: Eight images whose closures overlap (all share busybox, most share more).
IMAGES = [
    ["hello", "coreutils"], ["bashInteractive", "coreutils"], ["moreutils", "hello"],
    ["nano", "cacert"], ["iana-etc", "hello", "bashInteractive"],
    ["coreutils", "moreutils", "nano"], ["cacert", "iana-etc"], ["busybox", "hello", "nano"],
]

_REALISE = """
import json, sys, time
from pathlib import Path
from nixery_core import nix
from nixery_core.errors import NixeryError
from nixery_core.names import Image
from nixery_core.runner import SubprocessRunner
from nixery_core.sources import LocalPathSource
spec = LocalPathSource(Path(sys.argv[1])).resolve("latest")
image = Image.from_packages(json.loads(sys.argv[2]))
# Evaluate first (writing the derivations), then start realising together.
nix.resolve(image.packages, spec, image.arch.nix_system, runner=SubprocessRunner())
Path(sys.argv[4] + ".ready").touch()
while not Path(sys.argv[4]).exists():
    time.sleep(0.01)
try:
    graph = nix.realise(image, spec, runner=SubprocessRunner(), timeout=float(sys.argv[3]))
except NixeryError as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)[:500]}))
else:
    print(json.dumps({"paths": sorted(graph.paths)}))
"""


def _python(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", *args], env=env, text=True, **kwargs
    )


def test_eight_concurrent_cold_builds_never_hang(tmp_path: Path) -> None:
    """Eight processes realising overlapping, never-built closures all finish, three
    times over (before the realise lock, most such trials hung on Nix's output locks)."""
    before = store_entries()
    created: list[str] = []
    try:
        for trial in range(3):
            package_set = salted_set(tmp_path / str(trial))
            go = tmp_path / f"go-{trial}"
            procs = [
                _python(_REALISE, str(package_set), json.dumps(image), "45", f"{go}-{i}",
                        stdout=subprocess.PIPE)
                for i, image in enumerate(IMAGES)
            ]
            _start_together(go, len(procs))
            answers = [json.loads(proc.communicate(timeout=300)[0]) for proc in procs]
            for answer in answers:
                created += answer.get("paths", [])
            failed = [a for a in answers if "error" in a]
            assert not failed, f"trial {trial}: {len(failed)} of 8 failed: {failed[0]}"
    finally:
        delete_created(before, created)


def _start_together(go: Path, count: int) -> None:
    """Wait until ``count`` processes have evaluated, then let them all realise."""
    deadline = time.monotonic() + 120
    while len(list(go.parent.glob(f"{go.name}-*.ready"))) < count:
        assert time.monotonic() < deadline, "the processes never got ready"
        time.sleep(0.02)
    for i in range(count):
        Path(f"{go}-{i}").touch()


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _descendants(pid: int) -> set[int]:
    todo, seen = [pid], set()
    while todo:
        for child in _children(todo.pop()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_sigkilled_builder_leaves_no_nix_process_behind(tmp_path: Path) -> None:
    """SIGKILL of a process whose Nix is building takes nix-store and its builder with it."""
    package_set = salted_set(tmp_path)
    go = tmp_path / "go"
    go.touch()
    parent = _python(_REALISE, str(package_set), json.dumps(["slow"]), "120", str(go),
                     stdout=subprocess.DEVNULL)
    tree: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until nix-store runs the slow builder
            tree = _descendants(parent.pid)
            commands = [_cmdline(pid) for pid in tree]
            if any(c.startswith("nix-store") for c in commands) and len(tree) >= 2:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"Nix never started the slow build: {commands}")
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = {pid: _cmdline(pid) for pid in tree if _alive(pid)}
        assert not left, f"left behind: {left}"
    finally:
        parent.kill()
        parent.wait()
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

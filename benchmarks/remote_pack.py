"""Packs run by another revision's code: the driver's side of :mod:`benchmarks.pack_server`.

Issue 18 asks for "a cold pack no slower than today": today being the
pack as it was before the issue's fragments.  ``bench_pack`` judges that
claim two ways.  By default it compares this code's cold pack into
fragments with this code's pack without them (what the recording costs).
With ``--today REV`` it compares the same cold pack with the pack of the
code at ``REV`` (:data:`ISSUE_18_BASE`: the parent of the first fragments
commit), every contender a :class:`RemotePack`: a server process packing
with the code it was given (this checkout's, or ``REV``'s exported by
:func:`export_revision`), so that the two codes run side by side in one
script, on the same corpus, in the same rounds.  The baseline is our own
code at that revision, not a peer's.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import attrs

__all__ = ["ISSUE_18_BASE", "RemotePack", "RemotePackError", "export_revision"]

#: The code as it was when issue 18's work began: the parent of its first fragments commit
#: (7ea46d5, "WIP fragments"), on whose packer the issue's "today" was measured.
ISSUE_18_BASE = "ef8c5b9"
#: This checkout: the directory holding ``nixery_core`` and ``benchmarks``.
HERE = Path(__file__).resolve().parent.parent
_SERVER = Path(__file__).resolve().with_name("pack_server.py")


class RemotePackError(RuntimeError):
    """A revision that cannot be exported, or a pack server that failed or went away."""


def export_revision(revision: str, into: Path, *, repository: Path = HERE) -> Path:
    """The ``nixery_core`` package of ``revision`` of ``repository``, under ``into``.

    Written once to ``into/code-<commit>/`` (a finished export is marked by
    its ``.complete`` file, so an interrupted one is done again) and reused;
    the directory is returned, to be given as ``--code`` to the server.
    Needs ``git`` and the revision in the repository's history (a shallow
    clone may lack it: ``git fetch --unshallow``).
    """
    commit = _git(repository, "rev-parse", "--verify", "--quiet",
                  f"{revision}^{{commit}}").decode().strip()
    code = into / f"code-{commit[:12]}"
    done = code / ".complete"
    if done.exists():
        return code
    archive = _git(repository, "archive", "--format=tar", commit, "nixery_core")
    code.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(code, filter="data")
    done.touch()
    return code


def _git(repository: Path, *args: str) -> bytes:
    try:
        done = subprocess.run(["git", "-C", str(repository), *args], capture_output=True,
                              check=True)
    except FileNotFoundError as exc:
        msg = "git is needed to export an earlier revision's code"
        raise RemotePackError(msg) from exc
    except subprocess.CalledProcessError as exc:
        detail = exc.stderr.decode(errors="replace").strip() or "no such revision"
        msg = (f"git {' '.join(args)} failed in {repository}: {detail} (a shallow clone "
               f"lacks older revisions: git fetch --unshallow)")
        raise RemotePackError(msg) from exc
    return done.stdout


@attrs.define
class _Where:
    """Where a prepared run writes its blob (``bench_pack``'s untimed steps remove it)."""

    root: Path


class RemotePack:
    """A contender of ``bench_pack``'s rounds whose packs run in a :mod:`pack_server` process.

    ``code``: the directory holding the ``nixery_core`` to pack with;
    ``work``: where each run's store (and, with ``fragments``, its fragment
    cache) is made, under new names; ``name`` tells runs of different
    contenders apart.  Like ``bench_pack.ours``: :meth:`prepare` (untimed)
    readies a new store and cache, calling the object packs; :attr:`store`
    and :attr:`writes` name what the run wrote; :attr:`cpu` is the server's
    CPU seconds so far (all its processes), as of its last answer.
    """

    def __init__(
        self,
        code: Path,
        root: Path,
        paths: Sequence[str],
        *,
        compression: str,
        work: Path,
        name: str,
        fragments: bool = False,
    ) -> None:
        self.work, self.name, self.fragments = work, name, fragments
        work.mkdir(parents=True, exist_ok=True)
        listing = work / f"paths-{name}.json"
        listing.write_text(json.dumps(list(paths)))
        self.store: _Where | None = None
        self.writes: list[Path] = []
        self.cpu = 0.0
        self.last: dict[str, Any] = {}
        self._runs = 0
        self._process = subprocess.Popen(
            [sys.executable, str(_SERVER), "--code", str(code), "--root", str(root),
             "--paths", str(listing), "--compression", compression],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def prepare(self) -> None:
        self._runs += 1
        store = self.work / f"blobs-{self.name}-{self._runs}"
        cache = self.work / f"fragments-{self.name}-{self._runs}" if self.fragments else None
        self._ask({"op": "prepare", "store": str(store),
                   "fragments": None if cache is None else str(cache)})
        self.store = _Where(store)
        self.writes = [store, *([cache] if cache is not None else [])]

    def __call__(self) -> int:
        return int(self._ask({"op": "pack"})["size"])

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        stdin, stdout = self._pipes()
        try:
            stdin.write(json.dumps(request) + "\n")
            stdin.flush()
        except BrokenPipeError as exc:
            msg = f"pack server {self.name} went away (exit {self._process.poll()})"
            raise RemotePackError(msg) from exc
        line = stdout.readline()
        if not line:
            msg = f"pack server {self.name} went away (exit {self._process.wait()})"
            raise RemotePackError(msg)
        answer: dict[str, Any] = json.loads(line)
        self.cpu = float(answer["cpu"])
        if not answer.get("ok"):
            msg = f"pack server {self.name}: {answer.get('error')}\n{answer.get('trace', '')}"
            raise RemotePackError(msg)
        self.last = answer
        return answer

    def _pipes(self) -> tuple[IO[str], IO[str]]:
        stdin, stdout = self._process.stdin, self._process.stdout
        if stdin is None or stdout is None:  # pragma: no cover - Popen was given both pipes
            msg = f"pack server {self.name} has no pipes"
            raise RemotePackError(msg)
        return stdin, stdout

    def close(self) -> None:
        """End the server (end of its input) and wait for it."""
        stdin = self._process.stdin
        if stdin is not None and not stdin.closed:
            stdin.close()
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()

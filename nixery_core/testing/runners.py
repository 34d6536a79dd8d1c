"""Runner fakes for tests: record and replay real runs, or fake Nix entirely.

* :class:`RecordingRunner` wraps a real runner and records every call;
  :meth:`RecordingRunner.save` writes the recording as JSON.
* :class:`ReplayRunner` answers calls from a recording, by argv.
* :class:`FakeNix` answers the three calls :mod:`nixery_core.nix` makes
  (resolve, realise, path-info) from declared :class:`FakePackage` values,
  writing their files into ``<store_root>/nix/store/<hash>-<name>/`` on
  realise, so a whole build pipeline runs without Nix.  It recognises calls
  with :func:`nixery_core.nix.parse_argv`, the inverse of the argv builders
  ``nix.py`` uses, so the two cannot drift apart.

A call none of them expects raises :class:`UnexpectedCall`.  That is a test
failure, not a library error, which is why it is an :class:`AssertionError`
outside the :mod:`nixery_core.errors` tree: library code catching
``NixError`` can never swallow it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import attrs

from nixery_core.errors import CommandNotFound, InvalidInput, NixTimeout
from nixery_core.graph import STORE_DIR
from nixery_core.nix import (
    NixStep,
    PathInfoCall,
    RealiseCall,
    ResolveCall,
    parse_argv,
)
from nixery_core.protocols import JSONValue, LogCallback, Runner, RunResult

__all__ = [
    "FakeDirectory",
    "FakeEntry",
    "FakeFault",
    "FakeFile",
    "FakeHardLink",
    "FakeNix",
    "FakePackage",
    "FakeSymlink",
    "RecordedCall",
    "RecordingRunner",
    "ReplayRunner",
    "UnexpectedCall",
    "default_fake_packages",
    "nar_size",
    "replay_key",
]


class UnexpectedCall(AssertionError):
    """A fake runner was asked to run a command it has no answer for."""

    def __init__(self, argv: Sequence[str], detail: str) -> None:
        self.argv: tuple[str, ...] = tuple(argv)
        super().__init__(f"unexpected call {list(self.argv)!r}: {detail}")


def _emit(on_log_line: LogCallback | None, stderr: bytes) -> None:
    if on_log_line is not None:
        for line in stderr.decode("utf-8", "replace").splitlines():
            on_log_line(line)


# --- record and replay -------------------------------------------------------

CallError = Literal["timeout", "command-not-found"]


def _encode(data: bytes) -> dict[str, JSONValue]:
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def _decode(value: object) -> bytes:
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return str(value["text"]).encode("utf-8")
    if isinstance(value, dict) and isinstance(value.get("base64"), str):
        return base64.b64decode(str(value["base64"]))
    raise InvalidInput(f"recorded output {value!r} is neither text nor base64")


@attrs.frozen
class RecordedCall:
    """One call and what came back: a result, or the error the runner raised."""

    argv: tuple[str, ...]
    returncode: int = 0
    stdout: bytes = b""
    stderr: bytes = b""
    error: CallError | None = None
    timeout: float | None = None

    def to_json(self) -> dict[str, JSONValue]:
        return {
            "argv": list(self.argv),
            "returncode": self.returncode,
            "stdout": _encode(self.stdout),
            "stderr": _encode(self.stderr),
            "error": self.error,
            "timeout": self.timeout,
        }

    @classmethod
    def from_json(cls, data: object) -> RecordedCall:
        """Parse :meth:`to_json`'s form; InvalidInput when it does not fit."""
        if not isinstance(data, dict):
            raise InvalidInput("a recorded call is not a JSON object")
        argv = data.get("argv")
        error = data.get("error")
        returncode = data.get("returncode", 0)
        timeout = data.get("timeout")
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise InvalidInput("a recorded call's argv is not a list of strings")
        if error not in (None, "timeout", "command-not-found"):
            raise InvalidInput(f"unknown recorded error {error!r}")
        if not isinstance(returncode, int) or not (
            timeout is None or isinstance(timeout, int | float)
        ):
            raise InvalidInput("a recorded call's returncode or timeout is malformed")
        return cls(
            argv=tuple(argv),
            returncode=returncode,
            stdout=_decode(data.get("stdout", {"text": ""})),
            stderr=_decode(data.get("stderr", {"text": ""})),
            error=error,
            timeout=None if timeout is None else float(timeout),
        )

    def replay(self, on_log_line: LogCallback | None = None) -> RunResult:
        """The recorded result (stderr lines go to ``on_log_line``), or the recorded error."""
        _emit(on_log_line, self.stderr)
        if self.error == "timeout":
            raise NixTimeout(self.argv, self.timeout or 0.0, self.stderr.decode("utf-8", "replace"))
        if self.error == "command-not-found":
            raise CommandNotFound(self.argv)
        return RunResult(self.argv, self.returncode, self.stdout, self.stderr)


@attrs.define
class RecordingRunner:
    """Runs every call with ``inner`` and records it in :attr:`calls`.

    Timeouts and missing commands are recorded too, then raised as before.
    """

    inner: Runner
    calls: list[RecordedCall] = attrs.Factory(list)

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        on_log_line: LogCallback | None = None,
    ) -> RunResult:
        argv = tuple(argv)
        try:
            result = self.inner.run(argv, timeout=timeout, env=env, on_log_line=on_log_line)
        except NixTimeout as exc:
            stderr = exc.stderr_tail.encode()
            self.calls.append(RecordedCall(argv, -9, b"", stderr, "timeout", exc.timeout))
            raise
        except CommandNotFound:
            self.calls.append(RecordedCall(argv, 127, error="command-not-found"))
            raise
        self.calls.append(RecordedCall(argv, result.returncode, result.stdout, result.stderr))
        return result

    def save(self, path: Path) -> None:
        """Write the calls as JSON (``{"version": 1, "calls": [...]}``)."""
        payload = {"version": 1, "calls": [call.to_json() for call in self.calls]}
        path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n", encoding="utf-8")


#: Flags whose value differs from run to run by design: the per-build GC
#: root directory (``--add-root``, see :mod:`nixery_core.gc_roots`).
_PER_RUN_FLAGS = frozenset({"--add-root"})


def replay_key(argv: Sequence[str]) -> tuple[str, ...]:
    """``argv`` with the values of per-run flags (``--add-root``) blanked out.

    Two calls with equal keys ask Nix the same question; :class:`ReplayRunner`
    matches recordings by this key.
    """
    key = list(argv)
    for i, arg in enumerate(key[:-1]):
        if arg in _PER_RUN_FLAGS:
            key[i + 1] = "<per-run>"
    return tuple(key)


@attrs.define
class ReplayRunner:
    """Answers calls from recordings, matched by argv (see :func:`replay_key`).

    An argv recorded several times is answered in recording order; once
    those answers are used up, the last one repeats.  Any other argv raises
    :class:`UnexpectedCall`.  :attr:`calls` lists the argvs asked for.
    """

    recordings: Sequence[RecordedCall]
    calls: list[tuple[str, ...]] = attrs.Factory(list)
    _used: dict[tuple[str, ...], int] = attrs.Factory(dict)

    @classmethod
    def load(cls, path: Path) -> ReplayRunner:
        """Read a file written by :meth:`RecordingRunner.save`."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"cannot read recording {path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("version") != 1:
            raise InvalidInput(f"{path} is not a version 1 recording")
        calls = data.get("calls")
        if not isinstance(calls, list):
            raise InvalidInput(f"{path} has no list of calls")
        return cls([RecordedCall.from_json(call) for call in calls])

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        on_log_line: LogCallback | None = None,
    ) -> RunResult:
        del timeout, env  # a replay answers as recorded
        argv = tuple(argv)
        self.calls.append(argv)
        key = replay_key(argv)
        matches = [r for r in self.recordings if replay_key(r.argv) == key]
        if not matches:
            known = sorted({" ".join(r.argv[:2]) for r in self.recordings})
            raise UnexpectedCall(argv, f"not in the recording (recorded: {known})")
        index = self._used.get(key, 0)
        self._used[key] = index + 1
        return matches[min(index, len(matches) - 1)].replay(on_log_line)


# --- NAR size ------------------------------------------------------------------


def _nar_str(length: int) -> int:
    """Bytes a NAR string of ``length`` bytes takes: a u64 length, padded data."""
    return 8 + ((length + 7) & ~7)


_NAR_TOKENS = {token: _nar_str(len(token)) for token in (
    "nix-archive-1", "(", ")", "type", "regular", "symlink", "directory",
    "executable", "", "contents", "target", "entry", "name", "node",
)}


def _nar_node(path: Path) -> int:
    t = _NAR_TOKENS
    info = path.lstat()
    size = t["("] + t["type"] + t[")"]
    if stat.S_ISLNK(info.st_mode):
        return size + t["symlink"] + t["target"] + _nar_str(len(os.fsencode(path.readlink())))
    if stat.S_ISREG(info.st_mode):
        executable = t["executable"] + t[""] if info.st_mode & stat.S_IXUSR else 0
        return size + t["regular"] + executable + t["contents"] + _nar_str(info.st_size)
    if stat.S_ISDIR(info.st_mode):
        size += t["directory"]
        # NAR orders entries by the bytes of their names.
        for name in sorted(os.fsencode(child.name) for child in path.iterdir()):
            size += t["entry"] + t["("] + t["name"] + _nar_str(len(name)) + t["node"] + t[")"]
            size += _nar_node(path / os.fsdecode(name))
        return size
    raise InvalidInput(f"{path} is neither a file, a directory nor a symlink")


def nar_size(path: Path) -> int:
    """The size of the NAR serialisation of ``path``: what Nix reports as ``narSize``."""
    return _NAR_TOKENS["nix-archive-1"] + _nar_node(path)


# --- FakeNix -------------------------------------------------------------------


@attrs.frozen
class FakeFile:
    """A regular file; only the executable bit survives, as in a NAR."""

    content: bytes = b""
    executable: bool = False


@attrs.frozen
class FakeSymlink:
    """A symbolic link; the target is stored as given (dangling is fine)."""

    target: str


@attrs.frozen
class FakeDirectory:
    """An (otherwise empty) directory."""


@attrs.frozen
class FakeHardLink:
    """A second name for a file of the same package (``target`` is its relative path)."""

    target: str


FakeEntry = FakeFile | FakeSymlink | FakeDirectory | FakeHardLink | bytes | str


def _entry(value: FakeEntry) -> FakeFile | FakeSymlink | FakeDirectory | FakeHardLink:
    if isinstance(value, bytes):
        return FakeFile(value)
    if isinstance(value, str):
        return FakeFile(value.encode("utf-8"))
    return value


def _check_relative(package: str, rel: str) -> None:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise InvalidInput(f"fake package {package!r}: {rel!r} is not a plain relative path")


@attrs.frozen
class FakePackage:
    """A package of a :class:`FakeNix`: files by relative path, and dependencies.

    ``files`` values may be :class:`FakeFile`, :class:`FakeSymlink`,
    :class:`FakeDirectory`, :class:`FakeHardLink`, or ``bytes``/``str``
    (a plain file).  Parent directories are implied.  ``dependencies`` names
    other packages of the same FakeNix; they become the store path's
    references and are realised with it.  ``store_name`` defaults to the
    package name; ``build_fails`` makes realising it fail like a builder
    that exits 1.
    """

    files: Mapping[str, FakeEntry] = attrs.Factory(dict)
    dependencies: tuple[str, ...] = ()
    store_name: str | None = None
    build_fails: bool = False


@attrs.frozen
class FakeFault:
    """How a :class:`FakeNix` step misbehaves (for fault tests).

    kinds: ``fail`` (exit ``returncode`` with ``stderr``), ``hang`` (raise
    :class:`~nixery_core.errors.NixTimeout` as a runner does when the time is
    up, without waiting), ``garbage`` (exit 0 printing ``stdout``),
    ``not-installed`` (raise :class:`~nixery_core.errors.CommandNotFound`).
    ``times`` limits how many calls misbehave (``None``: all of them).
    """

    kind: Literal["fail", "hang", "garbage", "not-installed"]
    returncode: int = 1
    stderr: str = "error: injected failure"
    stdout: bytes = b"this is not JSON"
    times: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.kind not in ("fail", "hang", "garbage", "not-installed"):
            raise InvalidInput(f"unknown fault kind {self.kind!r}")


_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"  # Nix's base-32 alphabet
_STORE_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-._?=")


def _nix_hash(*parts: str) -> str:
    """32 characters of Nix base-32 from a SHA-256 over length-prefixed parts."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big") + data)
    number = int.from_bytes(digest.digest()[:20], "big")
    return "".join(_BASE32[(number >> (5 * i)) & 31] for i in range(32))


def _fingerprint(package: FakePackage) -> str:
    entries: dict[str, list[str]] = {}
    for rel, raw in sorted(package.files.items()):
        entry = _entry(raw)
        if isinstance(entry, FakeFile):
            entries[rel] = ["f", "x" if entry.executable else "-",
                            hashlib.sha256(entry.content).hexdigest()]
        elif isinstance(entry, FakeSymlink):
            entries[rel] = ["l", entry.target]
        elif isinstance(entry, FakeHardLink):
            entries[rel] = ["h", entry.target]
        else:
            entries[rel] = ["d"]
    return json.dumps(entries, sort_keys=True)


def _snapshot(packages: Mapping[str, FakePackage]) -> dict[str, FakePackage]:
    """A copy, so that changing the caller's dict later cannot change the fake."""
    return dict(packages)


@attrs.define
class FakeNix:
    """A :class:`~nixery_core.protocols.Runner` playing Nix for a declared package set.

    Names are matched exactly (no case-insensitive or dotted lookup); unknown
    names get Nix's structured ``not_found`` answer.  Store paths are
    ``/nix/store/<hash>-<store_name>`` with a hash over the system, the
    package's files and its dependencies' paths, so arm64 and amd64 differ
    and a changed file changes the path and every path depending on it.
    On realise, each package of the closure not yet on disk is written under
    ``store_root`` (files 0444/0555, directories 0755, mtime 1 like Nix)
    and a ``building '...'`` line is logged; realisations from several
    threads take turns, as Nix's path locks make them (one FakeNix per
    ``store_root``: processes sharing a root are not coordinated).
    ``narSize`` is computed from the files written, exactly as Nix would
    (see :func:`nar_size`).

    ``fail_with`` makes a step misbehave; ``path_info_format`` picks the JSON
    form of Nix 2.8 (``"list"``) or Nix >= 2.19 (``"object"``);
    ``expressions`` maps trusted expression text to ``{answer name:
    package name}`` for :func:`~nixery_core.nix.realise_expression`.
    """

    store_root: Path
    packages: Mapping[str, FakePackage] = attrs.field(converter=_snapshot)
    fail_with: Mapping[NixStep, FakeFault] = attrs.Factory(dict)
    path_info_format: Literal["list", "object"] = "list"
    expressions: Mapping[str, Mapping[str, str]] = attrs.Factory(dict)
    calls: list[tuple[str, ...]] = attrs.Factory(list)
    steps: list[NixStep] = attrs.Factory(list)
    _fault_hits: dict[NixStep, int] = attrs.Factory(dict)
    _paths: dict[tuple[str, str], str] = attrs.Factory(dict)
    _drvs: dict[str, tuple[str, str]] = attrs.Factory(dict)
    _drv_of: dict[tuple[str, str], str] = attrs.Factory(dict)
    # Realisations write the store one at a time, as Nix's path locks make them.
    _realise_lock: threading.Lock = attrs.Factory(threading.Lock)

    def __attrs_post_init__(self) -> None:
        if self.path_info_format not in ("list", "object"):
            raise InvalidInput(
                f"path_info_format must be list or object: {self.path_info_format!r}"
            )
        for name, package in self.packages.items():
            for rel, raw in package.files.items():
                _check_relative(name, rel)
                entry = _entry(raw)
                if isinstance(entry, FakeHardLink):
                    _check_relative(name, entry.target)
                    linked = package.files.get(entry.target)
                    if linked is None or not isinstance(_entry(linked), FakeFile):
                        raise InvalidInput(
                            f"fake package {name!r}: hard link {rel!r} must name a file "
                            f"of the same package, not {entry.target!r}"
                        )
            for dep in package.dependencies:
                if dep not in self.packages:
                    raise InvalidInput(f"fake package {name!r} depends on unknown {dep!r}")
        for name in self.packages:
            self._check_acyclic(name, ())

    def _check_acyclic(self, name: str, stack: tuple[str, ...]) -> None:
        if name in stack:
            raise InvalidInput(f"fake packages depend on each other in a cycle: {[*stack, name]}")
        for dep in self.packages[name].dependencies:
            self._check_acyclic(dep, (*stack, name))

    # --- identities ---

    def store_path(self, name: str, system: str = "x86_64-linux") -> str:
        """The store path package ``name`` gets for ``system``."""
        key = (name, system)
        if key not in self._paths:
            package = self.packages[name]
            deps = [self.store_path(d, system) for d in sorted(set(package.dependencies))]
            store_name = package.store_name or "".join(
                c if c in _STORE_NAME_OK else "_" for c in name
            )
            digest = _nix_hash("out", system, store_name, _fingerprint(package), *deps)
            path = f"{STORE_DIR}/{digest}-{store_name}"
            drv = f"{STORE_DIR}/{_nix_hash('drv', path)}-{store_name}.drv"
            self._drvs[drv] = key
            self._drv_of[key] = drv
            # Last: another thread that sees the path also finds its derivation.
            self._paths[key] = path
        return self._paths[key]

    def drv_path(self, name: str, system: str = "x86_64-linux") -> str:
        """The derivation path of package ``name`` for ``system``."""
        self.store_path(name, system)
        return self._drv_of[(name, system)]

    def count(self, step: NixStep) -> int:
        """How many calls of ``step`` were made."""
        return self.steps.count(step)

    def closure(self, name: str, system: str = "x86_64-linux") -> tuple[str, ...]:
        """The store paths of ``name`` and everything it depends on, sorted."""
        seen: set[str] = set()
        stack = [name]
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(self.packages[current].dependencies)
        return tuple(sorted(self.store_path(n, system) for n in seen))

    # --- the runner ---

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        on_log_line: LogCallback | None = None,
    ) -> RunResult:
        del env  # the fake has no environment
        argv = tuple(argv)
        call = parse_argv(argv)
        if call is None:
            raise UnexpectedCall(argv, "not a call nixery_core.nix makes")
        self.calls.append(argv)
        self.steps.append(call.step)
        fault = self.fail_with.get(call.step)
        if fault is not None and self._fault_applies(call.step, fault):
            return self._misbehave(argv, fault, timeout, on_log_line)
        if isinstance(call, ResolveCall):
            result = self._resolve(argv, call)
        elif isinstance(call, RealiseCall):
            with self._realise_lock:
                result = self._realise(argv, call)
        else:
            result = self._path_info(argv, call)
        _emit(on_log_line, result.stderr)
        return result

    def _fault_applies(self, step: NixStep, fault: FakeFault) -> bool:
        hits = self._fault_hits.get(step, 0)
        if fault.times is not None and hits >= fault.times:
            return False
        self._fault_hits[step] = hits + 1
        return True

    @staticmethod
    def _misbehave(
        argv: tuple[str, ...], fault: FakeFault, timeout: float | None,
        on_log_line: LogCallback | None,
    ) -> RunResult:
        if fault.kind == "hang":
            raise NixTimeout(argv, timeout if timeout is not None else 0.0, "")
        if fault.kind == "not-installed":
            raise CommandNotFound(argv)
        if fault.kind == "garbage":
            return RunResult(argv, 0, fault.stdout, b"")
        stderr = fault.stderr.encode()
        _emit(on_log_line, stderr)
        return RunResult(argv, fault.returncode, b"", stderr)

    def _resolve(self, argv: tuple[str, ...], call: ResolveCall) -> RunResult:
        answers: list[tuple[str, str]] = [(n, n) for n in call.packages]
        if call.expr is not None:
            if call.expr not in self.expressions:
                stderr = b"error: FakeNix has no answer for this expression\n"
                return RunResult(argv, 1, b"", stderr)
            answers += sorted(self.expressions[call.expr].items())
        unknown = sorted({pkg for _, pkg in answers if pkg not in self.packages})
        if unknown:
            body: dict[str, JSONValue] = {"error": "not_found", "pkgs": list(unknown)}
            return RunResult(argv, 0, json.dumps(body).encode(), b"")
        records: list[JSONValue] = [
            {
                "name": name,
                "attrPath": [pkg],
                "drvPath": self.drv_path(pkg, call.system),
                "outputName": "out",
                "outputPath": self.store_path(pkg, call.system),
            }
            for name, pkg in answers
        ]
        return RunResult(argv, 0, json.dumps({"packages": records}).encode(), b"")

    def _realise(self, argv: tuple[str, ...], call: RealiseCall) -> RunResult:
        outputs: list[str] = []
        log: list[str] = []
        for installable in call.installables:
            drv, _, output = installable.partition("!")
            key = self._drvs.get(drv)
            if key is None or output not in ("", "out"):
                log.append(f"error: path '{drv}' is not valid")
                return RunResult(argv, 1, b"", "\n".join(log).encode() + b"\n")
            name, system = key
            for dep_name in self._topological(name):
                path = self.store_path(dep_name, system)
                if self._on_disk(path).exists():
                    continue
                dep_drv = self.drv_path(dep_name, system)
                log.append(f"building '{dep_drv}'...")
                if self.packages[dep_name].build_fails:
                    log.append(f"error: builder for '{dep_drv}' failed with exit code 1")
                    return RunResult(argv, 1, b"", "\n".join(log).encode() + b"\n")
                self._write(dep_name, path)
            outputs.append(self.store_path(name, system))
        stdout = "".join(f"{p}\n" for p in outputs).encode()
        return RunResult(argv, 0, stdout, "".join(f"{line}\n" for line in log).encode())

    def _topological(self, name: str) -> list[str]:
        order: list[str] = []

        def visit(current: str) -> None:
            if current in order:
                return
            for dep in sorted(self.packages[current].dependencies):
                visit(dep)
            order.append(current)

        visit(name)
        return order

    def _on_disk(self, store_path: str) -> Path:
        return self.store_root / store_path.lstrip("/")

    def _write(self, name: str, store_path: str) -> None:
        final = self._on_disk(store_path)
        staging = final.with_name(f".tmp-{final.name}")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        files = {rel: _entry(raw) for rel, raw in self.packages[name].files.items()}
        links: list[tuple[Path, Path]] = []
        for rel, entry in sorted(files.items()):
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(entry, FakeFile):
                target.write_bytes(entry.content)
                target.chmod(0o555 if entry.executable else 0o444)
            elif isinstance(entry, FakeSymlink):
                target.symlink_to(entry.target)
            elif isinstance(entry, FakeDirectory):
                target.mkdir(exist_ok=True)
            else:
                links.append((target, staging / entry.target))
        for link, existing in links:
            link.hardlink_to(existing)
        for path in sorted(staging.rglob("*"), reverse=True):
            os.utime(path, (1, 1), follow_symlinks=False)
        os.utime(staging, (1, 1))
        staging.rename(final)

    def _path_info(self, argv: tuple[str, ...], call: PathInfoCall) -> RunResult:
        by_path = {path: key for key, path in self._paths.items()}
        wanted: set[str] = set()
        stack = list(call.paths)
        missing: list[str] = []
        while stack:
            path = stack.pop()
            if path in wanted:
                continue
            key = by_path.get(path)
            if key is None or not self._on_disk(path).exists():
                missing.append(path)
                continue
            wanted.add(path)
            stack.extend(self.store_path(d, key[1]) for d in self.packages[key[0]].dependencies)
        infos: dict[str, JSONValue] = {}
        for path in sorted(wanted):
            name, system = by_path[path]
            deps = self.packages[name].dependencies
            refs: list[JSONValue] = []
            refs.extend(sorted(self.store_path(d, system) for d in deps))
            infos[path] = {
                "path": path,
                "narSize": nar_size(self._on_disk(path)),
                "references": refs,
                "deriver": self.drv_path(name, system),
            }
        entries: dict[str, JSONValue | None] = {**infos, **dict.fromkeys(missing)}
        if self.path_info_format == "object":
            body: JSONValue = {p: entries[p] for p in sorted(entries)}
        else:
            body = [
                entries[p] if entries[p] is not None else {"path": p, "valid": False}
                for p in sorted(entries)
            ]
        return RunResult(argv, 0, json.dumps(body).encode(), b"")


# --- a ready-made package set ------------------------------------------------------


def _script(text: str) -> FakeFile:
    return FakeFile(f"#!/bin/sh\n{text}\n".encode(), executable=True)


def default_fake_packages() -> dict[str, FakePackage]:
    """Packages for ``shell/hello``: the shell set, hello, cacert, iana-etc, on busybox.

    Shaped like the offline Nix set in ``nix/offline`` (everything depends
    on ``busybox``), small enough for unit tests.
    """
    busybox = FakePackage(
        {"bin/busybox": FakeFile(b"\x7fELF fake busybox\n", executable=True),
         **{f"bin/{a}": FakeSymlink("busybox") for a in ("sh", "ls", "cat", "env", "vi")}},
        store_name="busybox",
    )
    return {
        "busybox": busybox,
        "bashInteractive": FakePackage(
            {"bin/bash": _script('exec busybox sh "$@"'), "bin/sh": FakeSymlink("bash")},
            ("busybox",), store_name="bash-interactive",
        ),
        "coreutils": FakePackage(
            {f"bin/{a}": _script(f'exec busybox {a} "$@"') for a in ("cat", "env", "ls")},
            ("busybox",),
        ),
        "moreutils": FakePackage({"bin/sponge": _script('cat > "$1"')}, ("busybox",)),
        "nano": FakePackage({"bin/nano": _script('exec busybox vi "$@"')}, ("busybox",)),
        "hello": FakePackage({"bin/hello": _script('echo "Hello, world!"')}, ("busybox",)),
        "cacert": FakePackage(
            {"etc/ssl/certs/ca-bundle.crt": b"# fake CA bundle\n",
             "etc/ssl/certs/ca-certificates.crt": FakeSymlink("ca-bundle.crt")},
            store_name="nss-cacert",
        ),
        "iana-etc": FakePackage(
            {"etc/protocols": b"tcp\t6\tTCP\n", "etc/services": b"http\t\t80/tcp\n"},
        ),
    }

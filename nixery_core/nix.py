"""From an image to a realised closure, with real Nix, in three calls.

1. **resolve**: ``nix-instantiate --eval --strict --json --read-write-mode
   nix/resolve.nix --argstr packages <JSON> --argstr source <JSON> --argstr
   system <system>``.  Names travel as one JSON string and are only ever
   compared with attribute names (see ``nix/lookup.nix``), never evaluated.
   The answer is every unknown name at once (raised as
   :class:`~nixery_core.errors.UnknownPackages`) or, per name, the
   derivation and the path of its default output.
2. **realise**: ``nix-store --realise [--add-root <dir>/out] <drv>!<output> ...``.
3. **closure**: ``nix path-info --extra-experimental-features nix-command
   --json --recursive <output> ...``: every store path with its NAR size and
   references.  Nix 2.8 prints a list of objects, Nix >= 2.19 an object keyed
   by path; both are accepted.

``nix_options`` become ``--option K V`` pairs (sorted by key) on every call.
``timeout`` applies to each call separately; the runner kills the call's
process group and raises :class:`~nixery_core.errors.NixTimeout`.  Realise
calls take turns per Nix store (:mod:`nixery_core.nix_lock`, which says
why); waiting for the turn has its own ``timeout``.

The argv builders (:func:`resolve_argv`, :func:`realise_argv`,
:func:`path_info_argv`) and their inverse :func:`parse_argv` are public so
that tests can count and recognise calls, and so that
:class:`~nixery_core.testing.runners.FakeNix` answers exactly what this
module asks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import attrs

from nixery_core import outside_reads
from nixery_core.errors import NixBuildFailed, NixOutputError, UnknownPackages
from nixery_core.graph import RuntimeGraph, StorePath
from nixery_core.names import AMD64, Architecture, Image
from nixery_core.nix_lock import realise_lock
from nixery_core.nix_probe import is_uncatchable_eval_error, unevaluable_names
from nixery_core.nixexprs import resolve_expression
from nixery_core.package_meta import PackageMeta
from nixery_core.protocols import LogCallback, Runner, RunResult
from nixery_core.sources import SourceSpec

__all__ = [
    "NixCall",
    "NixStep",
    "PathInfoCall",
    "RealiseCall",
    "ResolveCall",
    "ResolvedPackage",
    "option_args",
    "parse_argv",
    "parse_path_info_output",
    "parse_resolve_output",
    "path_info_argv",
    "realise",
    "realise_argv",
    "realise_expression",
    "resolve",
    "resolve_argv",
]

NixStep = Literal["resolve", "realise", "path-info"]

RESOLVE_PROGRAM = "nix-instantiate"
REALISE_PROGRAM = "nix-store"
PATH_INFO_PROGRAM = "nix"
_RESOLVE_FLAGS = ("--eval", "--strict", "--json", "--read-write-mode")
_PATH_INFO_FLAGS = (
    "path-info",
    "--extra-experimental-features",
    "nix-command",
    "--json",
    "--recursive",
)


# --- argv --------------------------------------------------------------------


def option_args(nix_options: Mapping[str, str] | None) -> tuple[str, ...]:
    """``{"k": "v"}`` -> ``("--option", "k", "v")``, sorted by key for stable argv."""
    args: list[str] = []
    for key, value in sorted((nix_options or {}).items()):
        args += ["--option", key, value]
    return tuple(args)


def resolve_argv(
    packages: Iterable[str],
    spec: SourceSpec,
    system: str,
    *,
    nix_options: Mapping[str, str] | None = None,
    expr: str | None = None,
    restrict: Sequence[str] = (),
) -> tuple[str, ...]:
    """The resolve call.  ``expr`` (Nix source) is for trusted callers only;
    ``restrict`` is :func:`nixery_core.outside_reads.restricted_args`."""
    argv = [
        RESOLVE_PROGRAM,
        *_RESOLVE_FLAGS,
        *option_args(nix_options),
        *restrict,
        str(resolve_expression()),
        "--argstr",
        "packages",
        json.dumps(list(packages)),
        "--argstr",
        "source",
        spec.to_json(),
        "--argstr",
        "system",
        system,
    ]
    if expr is not None:
        argv += ["--arg", "expr", expr]
    return tuple(argv)


def realise_argv(
    installables: Iterable[str],
    *,
    nix_options: Mapping[str, str] | None = None,
    add_root: str | None = None,
) -> tuple[str, ...]:
    """The realise call for ``<drv>!<output>`` installables (sorted, de-duplicated).

    ``add_root`` registers indirect GC roots ``<add_root>[-N]`` for the outputs
    (see :mod:`nixery_core.gc_roots`).
    """
    roots = ("--add-root", add_root) if add_root is not None else ()
    return (
        REALISE_PROGRAM, "--realise", *roots, *option_args(nix_options),
        *sorted(set(installables)),
    )


def path_info_argv(
    paths: Iterable[str], *, nix_options: Mapping[str, str] | None = None
) -> tuple[str, ...]:
    """The closure query for output paths (sorted, de-duplicated)."""
    return (PATH_INFO_PROGRAM, *_PATH_INFO_FLAGS, *option_args(nix_options), *sorted(set(paths)))


@attrs.frozen
class ResolveCall:
    """A parsed resolve argv."""

    packages: tuple[str, ...]
    source: Mapping[str, str]
    system: str
    expr: str | None
    options: Mapping[str, str]
    step: NixStep = "resolve"


@attrs.frozen
class RealiseCall:
    """A parsed realise argv."""

    installables: tuple[str, ...]
    options: Mapping[str, str]
    add_root: str | None = None
    step: NixStep = "realise"


@attrs.frozen
class PathInfoCall:
    """A parsed closure-query argv."""

    paths: tuple[str, ...]
    options: Mapping[str, str]
    step: NixStep = "path-info"


NixCall = ResolveCall | RealiseCall | PathInfoCall

# Flags the builders emit that take values, and how many.
_ARITY = {
    "--option": 2, "--argstr": 2, "--arg": 2, "--extra-experimental-features": 1,
    "--add-root": 1, "-I": 1,
}


def _split(argv: Sequence[str]) -> tuple[dict[str, str], dict[str, str], list[str]] | None:
    """(options, --arg/--argstr/--add-root values, positionals), or None for an unknown shape."""
    options: dict[str, str] = {}
    args: dict[str, str] = {}
    positional: list[str] = []
    i = 1
    while i < len(argv):
        flag = argv[i]
        arity = _ARITY.get(flag, 0)
        if i + arity >= len(argv) and arity:
            return None
        if flag == "--option":
            options[argv[i + 1]] = argv[i + 2]
        elif flag in ("--argstr", "--arg"):
            args[argv[i + 1]] = argv[i + 2]
        elif flag == "--add-root":
            args[flag] = argv[i + 1]
        elif flag == "-I":
            pass  # a search path entry (restricted evaluation)
        elif not flag.startswith("--"):
            positional.append(flag)
        i += 1 + arity
    return options, args, positional


def _resolve_call(options: dict[str, str], args: dict[str, str]) -> ResolveCall | None:
    try:
        packages = json.loads(args["packages"])
        source = json.loads(args["source"])
        system = args["system"]
    except (KeyError, ValueError):
        return None
    if not (isinstance(packages, list) and all(isinstance(p, str) for p in packages)):
        return None
    if not isinstance(source, dict):
        return None
    return ResolveCall(tuple(packages), source, system, args.get("expr"), options)


def parse_argv(argv: Sequence[str]) -> NixCall | None:
    """Recognise an argv built by this module; ``None`` for anything else."""
    split = _split(argv) if argv else None
    if split is None:
        return None
    options, args, positional = split
    program = argv[0].rsplit("/", 1)[-1]
    call: NixCall | None = None
    if program == RESOLVE_PROGRAM and all(f in argv for f in _RESOLVE_FLAGS):
        call = _resolve_call(options, args)
    elif program == REALISE_PROGRAM and len(argv) > 1 and argv[1] == "--realise":
        call = RealiseCall(tuple(positional), options, args.get("--add-root"))
    elif program == PATH_INFO_PROGRAM and (
        tuple(argv[1 : 1 + len(_PATH_INFO_FLAGS)]) == _PATH_INFO_FLAGS
    ):
        call = PathInfoCall(tuple(p for p in positional if p != "path-info"), options)
    return call


# --- answers -----------------------------------------------------------------


@attrs.frozen
class ResolvedPackage:
    """One name as Nix resolved it: the attribute path, derivation and output."""

    name: str
    attr_path: tuple[str, ...]
    drv_path: str
    output_name: str
    output_path: str
    meta: PackageMeta | None = None

    @property
    def installable(self) -> str:
        """``<drv>!<output>``, what ``nix-store --realise`` builds."""
        return f"{self.drv_path}!{self.output_name}"


def _decode(output: bytes) -> str:
    return output.decode("utf-8", "replace")


def _load_json(argv: Sequence[str], stdout: bytes) -> object:
    text = _decode(stdout)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise NixOutputError(argv, text, f"not JSON ({exc})") from exc


def _str(argv: Sequence[str], text: str, value: object, what: str, *, path: bool = False) -> str:
    if not isinstance(value, str) or (path and not value.startswith("/")):
        raise NixOutputError(argv, text, f"{what} is not a {'path' if path else 'string'}")
    return value


def parse_resolve_output(
    argv: Sequence[str], stdout: bytes, expected: Iterable[str] | None = None
) -> tuple[ResolvedPackage, ...]:
    """Read resolve.nix's answer; raise UnknownPackages or NixOutputError.

    ``expected`` names must each be answered (extra answers, from a trusted
    expression, are allowed).
    """
    text = _decode(stdout)
    data = _load_json(argv, stdout)
    if not isinstance(data, dict):
        raise NixOutputError(argv, text, "expected a JSON object")
    if data.get("error") == "not_found":
        pkgs = data.get("pkgs")
        if not isinstance(pkgs, list) or not pkgs:
            raise NixOutputError(argv, text, "not_found without a list of packages")
        raise UnknownPackages([_str(argv, text, p, "an unknown package") for p in pkgs])
    records = data.get("packages")
    if not isinstance(records, list):
        raise NixOutputError(argv, text, "neither 'packages' nor a known 'error'")
    resolved: list[ResolvedPackage] = []
    for record in records:
        if not isinstance(record, dict):
            raise NixOutputError(argv, text, "a package record is not an object")
        attr_path = record.get("attrPath")
        if not isinstance(attr_path, list):
            raise NixOutputError(argv, text, "attrPath is not a list")
        try:
            meta = None if record.get("meta") is None else PackageMeta.from_json(record["meta"])
        except TypeError as exc:
            raise NixOutputError(argv, text, f"meta: {exc}") from exc
        resolved.append(
            ResolvedPackage(
                name=_str(argv, text, record.get("name"), "name"),
                attr_path=tuple(_str(argv, text, a, "attrPath entry") for a in attr_path),
                drv_path=_str(argv, text, record.get("drvPath"), "drvPath", path=True),
                output_name=_str(argv, text, record.get("outputName"), "outputName"),
                output_path=_str(argv, text, record.get("outputPath"), "outputPath", path=True),
                meta=meta,
            )
        )
    missing = set(expected or ()) - {r.name for r in resolved}
    if missing:
        raise NixOutputError(argv, text, f"no answer for {sorted(missing)}")
    return tuple(resolved)


def _store_dir(path: str) -> str:
    return path.rsplit("/", 1)[0]


def _store_path(argv: Sequence[str], text: str, path: str, info: object) -> StorePath:
    if info is None or (isinstance(info, dict) and info.get("valid") is False):
        raise NixOutputError(argv, text, f"{path} is not valid in the store")
    if not isinstance(info, dict):
        raise NixOutputError(argv, text, f"the entry for {path} is not an object")
    size = info.get("narSize")
    refs = info.get("references")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise NixOutputError(argv, text, f"narSize of {path} is not a size")
    if not isinstance(refs, list):
        raise NixOutputError(argv, text, f"references of {path} is not a list")
    references: list[str] = []
    for ref in refs:
        ref_path = _str(argv, text, ref, f"a reference of {path}")
        # Be liberal: accept base names relative to the store directory.
        if not ref_path.startswith("/"):
            ref_path = f"{_store_dir(path)}/{ref_path}"
        references.append(ref_path)
    nar_hash = info.get("narHash")
    if nar_hash is not None and not isinstance(nar_hash, str):
        raise NixOutputError(argv, text, f"narHash of {path} is not a string")
    return StorePath(path, size, tuple(references), nar_hash)


def parse_path_info_output(argv: Sequence[str], stdout: bytes) -> tuple[StorePath, ...]:
    """Read ``nix path-info --json`` in either the list (< 2.19) or object form."""
    text = _decode(stdout)
    data = _load_json(argv, stdout)
    paths: list[StorePath] = []
    if isinstance(data, list):
        for entry in data:
            if not isinstance(entry, dict):
                raise NixOutputError(argv, text, "a path-info entry is not an object")
            path = _str(argv, text, entry.get("path"), "path", path=True)
            paths.append(_store_path(argv, text, path, entry))
    elif isinstance(data, dict):
        for path, info in data.items():
            paths.append(_store_path(argv, text, _str(argv, text, path, "a key", path=True), info))
    else:
        raise NixOutputError(argv, text, "expected a JSON list or object")
    return tuple(paths)


# --- the calls ---------------------------------------------------------------


def _run(
    runner: Runner, argv: tuple[str, ...], timeout: float, on_log_line: LogCallback | None
) -> RunResult:
    result = runner.run(argv, timeout=timeout, on_log_line=on_log_line)
    if result.returncode != 0:
        raise NixBuildFailed(argv, result.returncode, _decode(result.stderr))
    return result


def resolve(
    packages: Sequence[str],
    spec: SourceSpec,
    system: str,
    *,
    runner: Runner,
    timeout: float = 60.0,
    nix_options: Mapping[str, str] | None = None,
    on_log_line: LogCallback | None = None,
) -> tuple[ResolvedPackage, ...]:
    """Step 1 alone: names to derivations (one Nix call); UnknownPackages names all misses.

    A name whose attribute aborts or recurses when forced (which
    ``builtins.tryEval`` cannot catch, so it fails the whole call) is
    unknown too, as a throwing alias is: see :mod:`nixery_core.nix_probe`.
    """
    argv = resolve_argv(packages, spec, system, nix_options=nix_options)
    restrict = outside_reads.restricted_args(spec)
    try:
        if restrict is not None:
            result = _resolve_confined(
                argv, resolve_argv(packages, spec, system, nix_options=nix_options,
                                   restrict=restrict),
                spec, runner, timeout=timeout, on_log_line=on_log_line,
            )
        else:
            result = _run(runner, argv, timeout, on_log_line)
    except NixBuildFailed as exc:
        if not is_uncatchable_eval_error(exc.stderr_tail):
            raise
        unknown = unevaluable_names(
            packages, spec, system, runner=runner, timeout=timeout,
            option_args=option_args(nix_options),
        )
        if not unknown:
            raise
        raise UnknownPackages(unknown) from exc
    return parse_resolve_output(argv, result.stdout, packages)


def _resolve_confined(
    argv: tuple[str, ...],
    confined: tuple[str, ...],
    spec: SourceSpec,
    runner: Runner,
    *,
    timeout: float,
    on_log_line: LogCallback | None,
) -> RunResult:
    """Resolve a pinned path source confined to its directory; when Nix refuses a path
    outside it, note the set as a moving target and resolve unconfined."""
    try:
        result = _run(runner, confined, timeout, on_log_line)
    except NixBuildFailed as exc:
        outside = outside_reads.outside_path(exc.stderr_tail)
        if outside is None:
            raise
        outside_reads.record(spec, outside)
        return _run(runner, argv, timeout, on_log_line)
    outside_reads.record(spec, None)
    return result


def _realise_resolved(
    resolved: Sequence[ResolvedPackage],
    *,
    runner: Runner,
    timeout: float,
    nix_options: Mapping[str, str] | None,
    on_log_line: LogCallback | None,
    gc_root: Path | None = None,
) -> RuntimeGraph:
    if not resolved:
        return RuntimeGraph.build([], {})
    argv = realise_argv(
        (r.installable for r in resolved), nix_options=nix_options,
        add_root=None if gc_root is None else str(gc_root),
    )
    # One realisation per store at a time: concurrent ones deadlock on Nix's
    # output locks (see nixery_core.nix_lock).
    with realise_lock(argv, timeout):
        _run(runner, argv, timeout, on_log_line)
    argv = path_info_argv((r.output_path for r in resolved), nix_options=nix_options)
    result = _run(runner, argv, timeout, on_log_line)
    store_paths = parse_path_info_output(argv, result.stdout)
    requested: dict[str, set[str]] = {}
    for r in resolved:
        requested.setdefault(r.name, set()).add(r.output_path)
    meta = {r.output_path: r.meta for r in resolved if r.meta is not None}
    try:
        return RuntimeGraph.build(store_paths, requested, meta)
    except ValueError as exc:
        raise NixOutputError(argv, _decode(result.stdout), str(exc)) from exc


def realise(
    image: Image,
    spec: SourceSpec,
    *,
    runner: Runner,
    timeout: float = 60.0,
    nix_options: Mapping[str, str] | None = None,
    on_log_line: LogCallback | None = None,
    gc_root: Path | None = None,
) -> RuntimeGraph:
    """Resolve, build and measure ``image.packages`` for ``image.arch``.

    ``gc_root`` (a :attr:`nixery_core.gc_roots.BuildRoots.prefix`) roots the
    outputs, and so the closure, against Nix's garbage collector.

    ``RuntimeGraph.requested`` maps each package name of the image to its
    output path.  Raises UnknownPackages (every unknown name), NixBuildFailed
    (a non-zero exit: evaluation or build error), NixTimeout (from the
    runner), NixOutputError (an answer that does not parse or does not add
    up) and CommandNotFound (Nix is not installed).
    """
    if not image.packages:
        return RuntimeGraph.build([], {})
    resolved = resolve(
        image.packages,
        spec,
        image.arch.nix_system,
        runner=runner,
        timeout=timeout,
        nix_options=nix_options,
        on_log_line=on_log_line,
    )
    return _realise_resolved(
        resolved, runner=runner, timeout=timeout, nix_options=nix_options,
        on_log_line=on_log_line, gc_root=gc_root,
    )


def realise_expression(
    expr: str,
    spec: SourceSpec,
    *,
    runner: Runner,
    arch: Architecture = AMD64,
    packages: Sequence[str] = (),
    timeout: float = 60.0,
    nix_options: Mapping[str, str] | None = None,
    on_log_line: LogCallback | None = None,
    gc_root: Path | None = None,
) -> RuntimeGraph:
    """Realise a *trusted* Nix expression (plus optional package names) as image content.

    ``expr`` is Nix source evaluated as is: a function from the package set
    to a derivation, a list of derivations or an attribute set of them
    (``"pkgs: { tools = pkgs.hello; }"``).  Never pass text that came from an
    image name or any other untrusted input; image names only ever reach
    :func:`realise`, which passes them as data.  ``requested`` is keyed by
    the attribute names (or derivation names) and by ``packages``.
    """
    argv = resolve_argv(packages, spec, arch.nix_system, nix_options=nix_options, expr=expr)
    result = _run(runner, argv, timeout, on_log_line)
    resolved = parse_resolve_output(argv, result.stdout, packages)
    return _realise_resolved(
        resolved, runner=runner, timeout=timeout, nix_options=nix_options,
        on_log_line=on_log_line, gc_root=gc_root,
    )

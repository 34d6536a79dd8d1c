"""nixery_core.nix against real Nix and the offline package set (plus its parsers)."""

from __future__ import annotations

import gc
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import attrs
import pytest
from conftest import OFFLINE_SET, REPO, wait_no_slow_builders

from nixery_core.errors import (
    CommandNotFound,
    InvalidImageName,
    InvalidInput,
    NixBuildFailed,
    NixError,
    NixOutputError,
    NixTimeout,
    UnknownPackages,
)
from nixery_core.graph import RuntimeGraph
from nixery_core.names import ARM64, Image
from nixery_core.nix import (
    PathInfoCall,
    RealiseCall,
    ResolveCall,
    parse_argv,
    parse_path_info_output,
    parse_resolve_output,
    path_info_argv,
    realise,
    realise_argv,
    realise_expression,
    resolve,
    resolve_argv,
)
from nixery_core.nixexprs import Shape, SyntheticParams, nix_dir, write_synthetic_set
from nixery_core.runner import SubprocessRunner
from nixery_core.sources import LocalPathSource, SourceSpec
from nixery_core.testing.runners import RecordingRunner

ARM_OPTIONS = {"extra-platforms": "aarch64-linux"}


@pytest.fixture(scope="module")
def spec() -> SourceSpec:
    return LocalPathSource(OFFLINE_SET).resolve("latest")


@pytest.fixture
def runner() -> SubprocessRunner:
    return SubprocessRunner()


def _nix_store(*args: str) -> list[str]:
    out = subprocess.run(["nix-store", *args], check=True, capture_output=True, text=True)
    return out.stdout.split()


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1].split("-", 1)[1]


# --- real Nix ----------------------------------------------------------------


@pytest.mark.usefixtures("nix")
def test_shell_hello_graph_is_what_nix_store_reports(
    spec: SourceSpec, runner: SubprocessRunner
) -> None:
    """Every path, reference and NAR size of shell/hello's graph agrees with nix-store queries."""
    image = Image.from_name("shell/hello")
    graph = realise(image, spec, runner=runner)

    assert set(graph.requested) == set(image.packages)
    assert all(len(outs) == 1 for outs in graph.requested.values())
    assert set(_nix_store("--query", "--requisites", *graph.roots)) == set(graph.paths)
    for sp in graph:
        refs = set(_nix_store("--query", "--references", sp.path)) - {sp.path}
        assert set(sp.references) == refs, sp.path
    sizes = _nix_store("--query", "--size", *graph.paths)
    assert [int(s) for s in sizes] == [sp.nar_size for sp in graph]
    hello = graph.requested["hello"][0]
    assert subprocess.run([f"{hello}/bin/hello"], capture_output=True, text=True,
                          check=True).stdout == "Hello, world!\n"
    assert {_name(p) for p in graph.paths} >= {"busybox", "hello", "bash-interactive"}


@pytest.mark.usefixtures("nix")
def test_three_calls_each_with_the_nix_options(spec: SourceSpec) -> None:
    """realise makes exactly resolve, realise and path-info calls, each carrying --option pairs."""
    recorder = RecordingRunner(SubprocessRunner())
    realise(Image.from_name("hello"), spec, runner=recorder,
            nix_options={"substituters": "", "max-jobs": "2"})
    steps = [parse_argv(call.argv) for call in recorder.calls]
    assert [type(s) for s in steps] == [ResolveCall, RealiseCall, PathInfoCall]
    for step in steps:
        assert step is not None
        assert step.options == {"substituters": "", "max-jobs": "2"}


@pytest.mark.usefixtures("nix")
def test_unknown_packages_are_named_exactly_without_building(spec: SourceSpec) -> None:
    """One evaluation reports every unknown name (and only those); nothing is realised."""
    recorder = RecordingRunner(SubprocessRunner())
    image = Image.from_name("hello/nosuchpkg/xorg.nope/lib/removed-alias/hello.drvpath")
    with pytest.raises(UnknownPackages) as caught:
        realise(image, spec, runner=recorder)
    assert caught.value.packages == ("hello.drvpath", "lib", "nosuchpkg", "removed-alias",
                                     "xorg.nope")
    assert len(recorder.calls) == 1


@pytest.mark.usefixtures("nix")
def test_name_rules_dots_case_and_digits(spec: SourceSpec, runner: SubprocessRunner) -> None:
    """Dotted paths, case-insensitive retries (any level) and the `_` digit prefix all resolve."""
    names = {
        "xorg.xev": ("xorg", "xev"),
        "xorg.libx11": ("xorg", "libX11"),
        "camelcase": ("camelCase",),
        "haskellpackages.shellcheck": ("haskellPackages", "ShellCheck"),
        "1password": ("_1password",),
        "multiout.man": ("multiout", "man"),
        "bashInteractive": ("bashInteractive",),
        "bashinteractive": ("bashInteractive",),
    }
    resolved = resolve(list(names), spec, "x86_64-linux", runner=runner)
    assert {r.name: r.attr_path for r in resolved} == names
    by_name = {r.name: r for r in resolved}
    assert by_name["multiout.man"].output_name == "man"
    assert by_name["bashinteractive"].output_path == by_name["bashInteractive"].output_path

    graph = realise(Image.from_name("1password/xorg.xev/camelcase"), spec, runner=runner)
    assert _name(graph.requested["1password"][0]) == "1password"
    assert _name(graph.requested["xorg.xev"][0]) == "xev"
    assert _name(graph.requested["camelcase"][0]) == "camel-case"


HOSTILE = [
    '"; builtins.abort "pwned',
    '${builtins.abort "pwned"}',
    "hello; abort",
    "(builtins.abort \"pwned\")",
    "hello.${x}",
    "'' + builtins.abort \"pwned\" + ''",
    "\\\" \n",
    "..",
    ".",
    "a..b",
    "héllo ☃",
]


@pytest.mark.usefixtures("nix")
def test_hostile_names_come_back_unknown_and_are_never_evaluated(spec: SourceSpec) -> None:
    """Names full of Nix syntax are compared as data: all reported unknown, no abort runs."""
    image = Image.from_packages(HOSTILE)
    lines: list[str] = []
    with pytest.raises(UnknownPackages) as caught:
        realise(image, spec, runner=SubprocessRunner(), on_log_line=lines.append)
    assert caught.value.packages == tuple(sorted(HOSTILE))
    assert not any("pwned" in line for line in lines)


@pytest.mark.usefixtures("nix")
def test_path_like_names_are_unknown_to_nix(spec: SourceSpec, runner: SubprocessRunner) -> None:
    """Absolute and ../ names, which images cannot even carry, are unknown to resolve.nix too."""
    names = ["../offline", "/etc/passwd", "./default.nix", "/nix/store"]
    for name in names:
        with pytest.raises(InvalidImageName):
            Image.from_name(name)
    with pytest.raises(UnknownPackages) as caught:
        resolve(names, spec, "x86_64-linux", runner=runner)
    assert caught.value.packages == tuple(sorted(names))


@pytest.mark.usefixtures("nix")
def test_arm64_evaluates_and_realises_with_extra_platforms(
    spec: SourceSpec, runner: SubprocessRunner
) -> None:
    """arm64 images realise (extra-platforms) to different paths marked aarch64-linux."""
    amd = realise(Image.from_name("hello"), spec, runner=runner)
    arm_image = Image.from_name("arm64/hello")
    assert arm_image.arch == ARM64
    arm = realise(arm_image, spec, runner=runner, nix_options=ARM_OPTIONS)
    assert set(arm.paths).isdisjoint(amd.paths)
    busybox = next(p for p in arm.paths if _name(p) == "busybox")
    marker = Path(busybox, "share/nixery-offline/system").read_text()
    assert marker == "host busybox packaged for aarch64-linux\n"


@pytest.mark.usefixtures("nix")
def test_build_failure_is_typed_with_the_builder_output(spec: SourceSpec) -> None:
    """A failing builder raises NixBuildFailed naming nix-store, its exit code and log tail."""
    lines: list[str] = []
    with pytest.raises(NixBuildFailed) as caught:
        realise(Image.from_packages(["broken-build"]), spec, runner=SubprocessRunner(),
                on_log_line=lines.append)
    assert caught.value.argv[0] == "nix-store"
    assert caught.value.returncode != 0
    assert "failing on purpose" in caught.value.stderr_tail
    assert any("failing on purpose" in line for line in lines)


@pytest.mark.usefixtures("nix")
def test_evaluation_failure_is_typed(spec: SourceSpec, runner: SubprocessRunner) -> None:
    """A package whose derivation throws fails the resolve call with Nix's message."""
    with pytest.raises(NixBuildFailed) as caught:
        realise(Image.from_packages(["broken-eval"], always_added=()), spec, runner=runner)
    assert caught.value.argv[0] == "nix-instantiate"
    assert "fails to evaluate on purpose" in caught.value.stderr_tail


# SubprocessRunner leaves the pipes of a timed-out command open (reported); the
# garbage is collected here so that the warning cannot land on a later test.
LEAKED_PIPES = "ignore::pytest.PytestUnraisableExceptionWarning"


@pytest.mark.filterwarnings(LEAKED_PIPES)
@pytest.mark.usefixtures("nix")
def test_timeout_raises_and_leaves_no_builder_behind(spec: SourceSpec) -> None:
    """A hanging build times out as NixTimeout on the realise call; its builder is gone after."""
    with pytest.raises(NixTimeout) as caught:
        realise(Image.from_packages(["slow"], always_added=()), spec,
                runner=SubprocessRunner(), timeout=1.5)
    argv, timeout = caught.value.argv, caught.value.timeout
    del caught  # its traceback holds the runner's frame, and so the leaked pipes
    gc.collect()
    assert argv[0] == "nix-store"
    assert timeout == 1.5
    wait_no_slow_builders(5.0)


def test_missing_nix_is_command_not_found(spec: SourceSpec) -> None:
    """Without Nix on PATH the first call raises CommandNotFound."""
    runner = SubprocessRunner(base_env={"PATH": "/nonexistent"})
    with pytest.raises(CommandNotFound) as caught:
        realise(Image.from_name("hello"), spec, runner=runner)
    assert caught.value.argv[0] == "nix-instantiate"


@pytest.mark.usefixtures("nix")
def test_trusted_expression_is_realised_under_its_names(
    spec: SourceSpec, runner: SubprocessRunner
) -> None:
    """realise_expression adds an expression's derivations, keyed by attribute name."""
    graph = realise_expression(
        "pkgs: { tools = pkgs.hello; shell = pkgs.bashInteractive; }",
        spec, runner=runner, packages=["coreutils"],
    )
    assert set(graph.requested) == {"tools", "shell", "coreutils"}
    assert _name(graph.requested["tools"][0]) == "hello"


@pytest.mark.usefixtures("nix")
def test_edge_cases_package_references(spec: SourceSpec, runner: SubprocessRunner) -> None:
    """A reference made by a file's content (edge-cases -> hello) shows up in the graph."""
    graph = realise(Image.from_packages(["edge-cases"], always_added=()), spec, runner=runner)
    root = graph.requested["edge-cases"][0]
    assert {_name(r) for r in graph.paths[root].references} == {"busybox", "hello"}


def test_no_packages_means_no_calls(spec: SourceSpec) -> None:
    """An image without packages gives an empty graph and never runs anything."""
    recorder = RecordingRunner(SubprocessRunner(base_env={"PATH": "/nonexistent"}))
    graph = realise(Image.from_packages([], always_added=()), spec, runner=recorder)
    assert len(graph) == 0
    assert recorder.calls == []


OFFLINE_NAMES = ["busybox", "bashInteractive", "coreutils", "moreutils", "nano", "hello",
                 "cacert", "iana-etc", "edge-cases", "multiout", "multiout.man", "xorg.xev",
                 "camelCase", "1password"]


@pytest.mark.usefixtures("nix")
def test_offline_set_rebuilds_bit_for_bit_in_the_sandbox(
    spec: SourceSpec, runner: SubprocessRunner
) -> None:
    """Every offline package builds again, identically, inside Nix's sandbox (--check)."""
    realise(Image.from_packages(OFFLINE_NAMES, always_added=()), spec, runner=runner)
    resolved = resolve(OFFLINE_NAMES, spec, "x86_64-linux", runner=runner)
    check = subprocess.run(
        ["nix-store", "--realise", "--check", "--option", "sandbox", "true",
         *sorted({r.installable for r in resolved})],
        capture_output=True, text=True, check=False,
    )
    assert check.returncode == 0, check.stderr
    assert check.stderr.count("checking outputs of") == len({r.drv_path for r in resolved})


# --- argv and parsers ------------------------------------------------------------


def test_argv_builders_round_trip_through_parse_argv(spec: SourceSpec) -> None:
    """parse_argv recovers what the builders put in; other argvs are not recognised."""
    options = {"b": "2", "a": "1"}
    argv = resolve_argv(["x", "y.z"], spec, "aarch64-linux", nix_options=options)
    call = parse_argv(argv)
    assert call == ResolveCall(("x", "y.z"), dict(spec.nix_args), "aarch64-linux", None,
                               options)
    assert argv.index("--option") < argv.index("--argstr")
    assert parse_argv(realise_argv(["/nix/store/b.drv!out", "/nix/store/a.drv!out"])) == (
        RealiseCall(("/nix/store/a.drv!out", "/nix/store/b.drv!out"), {})
    )
    assert parse_argv(path_info_argv(["/nix/store/x"], nix_options=options)) == PathInfoCall(
        ("/nix/store/x",), options
    )
    for other in ([], ["nix-build", "x"], ["nix", "build"], ["nix-instantiate", "--eval"]):
        assert parse_argv(other) is None


ARGV = ("nix", "path-info")


def test_path_info_both_json_forms_give_the_same_graph() -> None:
    """Nix 2.8's list and Nix >= 2.19's object (with base-name references) parse alike."""
    a, b = "/nix/store/" + "a" * 32 + "-a", "/nix/store/" + "b" * 32 + "-b"
    old = [{"path": a, "narSize": 10, "references": [a, b]},
           {"path": b, "narSize": 20, "references": []}]
    new = {a: {"narSize": 10, "references": [b.rsplit("/", 1)[1], a]},
           b: {"narSize": 20, "references": []}}
    parsed_old = parse_path_info_output(ARGV, json.dumps(old).encode())
    parsed_new = parse_path_info_output(ARGV, json.dumps(new).encode())
    graph_old = RuntimeGraph.build(parsed_old, {"a": [a]})
    graph_new = RuntimeGraph.build(parsed_new, {"a": [a]})
    assert graph_old == graph_new
    assert graph_old.paths[a].references == (b,)


@pytest.mark.parametrize(
    "stdout",
    [
        b"not json",
        b"42",
        b'[{"path": "/nix/store/x", "valid": false}]',
        b'{"/nix/store/x": null}',
        b'[{"path": "/nix/store/x", "narSize": "big", "references": []}]',
        b'[{"path": "/nix/store/x", "narSize": 1, "references": "none"}]',
        b'[{"path": "relative", "narSize": 1, "references": []}]',
    ],
)
def test_bad_path_info_is_an_output_error(stdout: bytes) -> None:
    """Unparseable or invalid path-info answers raise NixOutputError."""
    with pytest.raises(NixOutputError):
        parse_path_info_output(ARGV, stdout)


@pytest.mark.parametrize(
    "stdout",
    [
        b"",
        b"[]",
        b'{"error": "not_found", "pkgs": []}',
        b'{"error": "boom"}',
        b'{"packages": [{"name": "x"}]}',
        b'{"packages": [{"name": "x", "attrPath": ["x"], "drvPath": "x.drv",'
        b' "outputName": "out", "outputPath": "/nix/store/x"}]}',
        b'{"packages": []}',
    ],
)
def test_bad_resolve_answers_are_output_errors(stdout: bytes) -> None:
    """Malformed resolve answers (or ones missing a requested name) raise NixOutputError."""
    with pytest.raises(NixOutputError):
        parse_resolve_output(ARGV, stdout, ["x"])


def test_not_found_answer_raises_unknown_packages() -> None:
    """The structured not_found answer becomes UnknownPackages with every name."""
    with pytest.raises(UnknownPackages) as caught:
        parse_resolve_output(ARGV, b'{"error": "not_found", "pkgs": ["b", "a"]}', ["a", "b"])
    assert caught.value.packages == ("a", "b")


# --- expression files and the synthetic generator ------------------------------------


def test_nix_dir_prefers_the_wheel_copy(tmp_path: Path) -> None:
    """nix_dir finds nixery_core/_nix (a wheel) before <repo>/nix (a checkout)."""
    assert nix_dir() == REPO / "nix"
    package = tmp_path / "site" / "nixery_core"
    (package / "_nix").mkdir(parents=True)
    (package / "_nix" / "resolve.nix").write_text("{ ... }: { }\n")
    (tmp_path / "site" / "nix").mkdir()
    (tmp_path / "site" / "nix" / "resolve.nix").write_text("{ ... }: { }\n")
    shutil.copy(REPO / "nixery_core" / "nixexprs.py", package / "nixexprs.py")
    module_spec = importlib.util.spec_from_file_location("wheel_nixexprs", package / "nixexprs.py")
    assert module_spec is not None
    assert module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    assert module.nix_dir() == package / "_nix"
    shutil.rmtree(package / "_nix")
    assert module.nix_dir() == tmp_path / "site" / "nix"
    shutil.rmtree(tmp_path / "site" / "nix")
    with pytest.raises(NixError, match="missing"):
        module.nix_dir()


def _synthetic(tmp_path: Path, runner: SubprocessRunner, params: SyntheticParams) -> RuntimeGraph:
    source = LocalPathSource(write_synthetic_set(tmp_path / "set", params))
    image = Image.from_packages(params.names, always_added=())
    return realise(image, source.resolve("latest"), runner=runner)


def _deps(graph: RuntimeGraph) -> dict[str, list[str]]:
    return {_name(p): sorted(_name(r) for r in sp.references) for p, sp in graph.paths.items()}


@pytest.mark.usefixtures("nix")
@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("chain", {"p0000": [], "p0001": ["p0000"], "p0002": ["p0001"], "p0003": ["p0002"]}),
        ("star", {"p0000": [], "p0001": ["p0000"], "p0002": ["p0000"], "p0003": ["p0000"]}),
        ("none", {"p0000": [], "p0001": [], "p0002": [], "p0003": []}),
    ],
)
def test_synthetic_shapes(
    tmp_path: Path, runner: SubprocessRunner, shape: Shape, expected: dict[str, list[str]]
) -> None:
    """chain, star and none give exactly those reference graphs."""
    params = SyntheticParams(count=4, shape=shape, min_size=100, max_size=300)
    assert _deps(_synthetic(tmp_path, runner, params)) == expected


@pytest.mark.usefixtures("nix")
def test_synthetic_dag_is_seeded_and_sized(tmp_path: Path, runner: SubprocessRunner) -> None:
    """A DAG only points backwards, within fanout; the same seed gives the same paths and sizes."""
    params = SyntheticParams(count=12, shape="dag", fanout=3, seed=7, min_size=1000,
                             max_size=5000, files=3)
    graph = _synthetic(tmp_path / "a", runner, params)
    deps = _deps(graph)
    for name, refs in deps.items():
        assert all(ref < name for ref in refs)
        assert len(refs) <= 3
        assert refs or name == "p0000"
    assert graph == _synthetic(tmp_path / "b", runner, params)
    other = _synthetic(tmp_path / "c", runner, attrs.evolve(params, seed=8))
    assert set(other.paths).isdisjoint(graph.paths)
    for path in graph.paths:
        content = sum(f.stat().st_size for f in Path(path, "share/synthetic").iterdir())
        assert 1000 <= content <= 5000
        assert len(list(Path(path, "share/synthetic").iterdir())) == 3


@pytest.mark.usefixtures("nix")
def test_synthetic_host_mode_deals_out_host_files(
    tmp_path: Path, runner: SubprocessRunner
) -> None:
    """Host mode copies every host file (with its exec bit) into exactly one package."""
    host = tmp_path / "host"
    (host / "sub").mkdir(parents=True)
    files = {f"f{i}": bytes([i]) * (100 + i) for i in range(9)}
    for name, data in files.items():
        (host / "sub" / name).write_bytes(data)
    (host / "sub" / "f0").chmod(0o755)
    params = SyntheticParams(count=3, shape="none", mode="host", min_size=10_000,
                             max_size=10_000, host_paths=(str(host),))
    graph = _synthetic(tmp_path, runner, params)
    seen: dict[str, bytes] = {}
    for path in graph.paths:
        for copied in Path(path, "share/synthetic").rglob("f*"):
            assert copied.name not in seen
            seen[copied.name] = copied.read_bytes()
            assert bool(copied.stat().st_mode & 0o111) == (copied.name == "f0")
    assert seen == files


@pytest.mark.parametrize(
    "kwargs",
    [{"count": -1}, {"fanout": 0}, {"files": 0}, {"min_size": 5, "max_size": 4},
     {"shape": "tree"}, {"mode": "cloud"}, {"host_paths": ("relative",)}],
)
def test_synthetic_params_are_validated(kwargs: dict[str, object]) -> None:
    """Impossible generator parameters raise InvalidInput before Nix runs."""
    with pytest.raises(InvalidInput):
        SyntheticParams(**kwargs)  # type: ignore[arg-type]

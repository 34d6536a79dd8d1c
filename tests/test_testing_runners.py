"""The runner fakes: FakeNix, RecordingRunner and ReplayRunner behave as documented."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from conftest import OFFLINE_SET

from nixery_core.errors import (
    CommandNotFound,
    InvalidInput,
    NixBuildFailed,
    NixOutputError,
    NixTimeout,
    UnknownPackages,
)
from nixery_core.graph import RuntimeGraph, store_path_name
from nixery_core.names import Image
from nixery_core.nix import NixStep, realise, realise_expression
from nixery_core.protocols import Runner, RunResult
from nixery_core.runner import SubprocessRunner
from nixery_core.sources import LocalPathSource, SourceSpec
from nixery_core.testing.runners import (
    FakeDirectory,
    FakeFault,
    FakeFile,
    FakeHardLink,
    FakeNix,
    FakePackage,
    FakeSymlink,
    RecordedCall,
    RecordingRunner,
    ReplayRunner,
    UnexpectedCall,
    default_fake_packages,
    nar_size,
)

SPEC = SourceSpec({"type": "path", "path": "/pkgs"}, "id", pinned=True)
SHELL_HELLO = Image.from_name("shell/hello")


@pytest.fixture
def fake(tmp_path: Path) -> FakeNix:
    return FakeNix(tmp_path / "root", default_fake_packages())


def _shape(graph: RuntimeGraph) -> dict[str, list[str]]:
    """The graph by store names: each path's name -> its references' names."""
    return {
        store_path_name(sp.path): sorted(store_path_name(r) for r in sp.references)
        for sp in graph
    }


def test_fakes_are_runners(fake: FakeNix) -> None:
    """All three fakes satisfy the Runner protocol."""
    for runner in (fake, RecordingRunner(fake), ReplayRunner([])):
        assert isinstance(runner, Runner)


def test_fake_realise_makes_three_calls_and_writes_the_store(fake: FakeNix) -> None:
    """realise through FakeNix: resolve, realise, path-info; files land under store_root."""
    graph = realise(SHELL_HELLO, SPEC, runner=fake)
    assert fake.steps == ["resolve", "realise", "path-info"]
    assert fake.count("resolve") == 1
    assert set(graph.requested) == set(SHELL_HELLO.packages)
    hello = Path(fake.store_root, graph.requested["hello"][0].lstrip("/"))
    script = hello / "bin" / "hello"
    assert b"Hello, world!" in script.read_bytes()
    info = script.lstat()
    assert stat.S_IMODE(info.st_mode) == 0o555
    assert info.st_mtime == 1
    assert set(graph.closure_of(graph.roots)) == set(graph.paths)
    for sp in graph:
        assert sp.nar_size == nar_size(Path(fake.store_root, sp.path.lstrip("/")))


@pytest.mark.usefixtures("nix")
def test_fake_graph_has_the_shape_real_nix_gives(fake: FakeNix) -> None:
    """For shell/hello the default fake set and the offline Nix set give the same named graph."""
    real = realise(SHELL_HELLO, LocalPathSource(OFFLINE_SET).resolve("latest"),
                   runner=SubprocessRunner())
    faked = realise(SHELL_HELLO, SPEC, runner=fake)
    assert _shape(faked) == _shape(real)
    assert {k: [store_path_name(p) for p in v] for k, v in faked.requested.items()} == {
        k: [store_path_name(p) for p in v] for k, v in real.requested.items()
    }


@pytest.mark.usefixtures("nix")
def test_nar_size_matches_nix_on_the_hard_cases() -> None:
    """nar_size of real store paths (links, long names, empty dirs) equals Nix's narSize."""
    image = Image.from_packages(["edge-cases", "multiout", "bashInteractive"], always_added=())
    graph = realise(image, LocalPathSource(OFFLINE_SET).resolve("latest"),
                    runner=SubprocessRunner())
    for sp in graph:
        assert nar_size(Path(sp.path)) == sp.nar_size, sp.path


def test_unknown_names_get_the_structured_answer(fake: FakeNix) -> None:
    """Unknown names raise UnknownPackages naming exactly them, after one call."""
    with pytest.raises(UnknownPackages) as caught:
        realise(Image.from_name("hello/nope/zzz"), SPEC, runner=fake)
    assert caught.value.packages == ("nope", "zzz")
    assert fake.steps == ["resolve"]


def test_both_path_info_forms_give_one_graph(tmp_path: Path) -> None:
    """The Nix 2.8 list and Nix >= 2.19 object answers parse to the same graph."""
    old = realise(SHELL_HELLO, SPEC, runner=FakeNix(tmp_path / "a", default_fake_packages()))
    new = realise(SHELL_HELLO, SPEC, runner=FakeNix(tmp_path / "b", default_fake_packages(),
                                                     path_info_format="object"))
    assert old == new


def test_arm64_gets_other_paths(fake: FakeNix) -> None:
    """The same packages for aarch64-linux get different store paths."""
    amd = realise(SHELL_HELLO, SPEC, runner=fake)
    arm = realise(Image.from_name("arm64/shell/hello"), SPEC, runner=fake)
    assert set(amd.paths).isdisjoint(arm.paths)
    assert _shape(amd) == _shape(arm)


def test_a_changed_file_changes_its_path_and_its_dependents(tmp_path: Path) -> None:
    """Paths are input-addressed: editing busybox moves busybox and everything using it."""
    packages = default_fake_packages()
    before = FakeNix(tmp_path, packages)
    packages["busybox"] = FakePackage({"bin/busybox": FakeFile(b"v2", executable=True)})
    after = FakeNix(tmp_path, packages)
    for name in ("busybox", "hello", "coreutils"):
        assert before.store_path(name) != after.store_path(name)
    assert before.store_path("cacert") == after.store_path("cacert")


def test_every_entry_kind_is_written(tmp_path: Path) -> None:
    """Files, executables, symlinks (dangling too), empty dirs and hard links are written."""
    package = FakePackage({
        "bin/tool": FakeFile(b"#!/bin/sh\n", executable=True),
        "share/doc": "text",
        "share/raw": b"\x00\xff",
        "lib/link": FakeSymlink("../share/doc"),
        "lib/dangling": FakeSymlink("nowhere"),
        "var/empty": FakeDirectory(),
        "share/again": FakeHardLink("share/doc"),
    })
    fake = FakeNix(tmp_path, {"kinds": package})
    graph = realise(Image.from_packages(["kinds"], always_added=()), SPEC, runner=fake)
    root = Path(tmp_path, graph.roots[0].lstrip("/"))
    assert (root / "bin/tool").stat().st_mode & 0o111
    assert not (root / "share/doc").stat().st_mode & 0o111
    assert (root / "share/raw").read_bytes() == b"\x00\xff"
    assert (root / "lib/link").read_text() == "text"
    assert (root / "lib/dangling").is_symlink()
    assert list((root / "var/empty").iterdir()) == []
    assert (root / "share/again").stat().st_ino == (root / "share/doc").stat().st_ino
    assert graph.paths[graph.roots[0]].nar_size == nar_size(root)


@pytest.mark.parametrize(
    ("packages", "message"),
    [
        ({"a": FakePackage(dependencies=("b",))}, "unknown"),
        ({"a": FakePackage(dependencies=("b",)), "b": FakePackage(dependencies=("a",))}, "cycle"),
        ({"a": FakePackage({"../x": "y"})}, "relative"),
        ({"a": FakePackage({"/x": "y"})}, "relative"),
        ({"a": FakePackage({"x": FakeHardLink("missing")})}, "hard link"),
        ({"a": FakePackage({"x": FakeHardLink("d"), "d": FakeDirectory()})}, "hard link"),
    ],
)
def test_bad_declarations_are_rejected(
    tmp_path: Path, packages: dict[str, FakePackage], message: str
) -> None:
    """Unknown or cyclic dependencies, escaping paths and bad hard links raise InvalidInput."""
    with pytest.raises(InvalidInput, match=message):
        FakeNix(tmp_path, packages)


def test_bad_fake_settings_are_rejected(tmp_path: Path) -> None:
    """An unknown fault kind or path-info format raises InvalidInput."""
    with pytest.raises(InvalidInput, match="fault kind"):
        FakeFault("explode")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="path_info_format"):
        FakeNix(tmp_path, {}, path_info_format="xml")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("step", "fault", "error"),
    [
        ("resolve", FakeFault("fail", stderr="error: boom"), NixBuildFailed),
        ("realise", FakeFault("fail", returncode=100), NixBuildFailed),
        ("path-info", FakeFault("garbage"), NixOutputError),
        ("resolve", FakeFault("garbage", stdout=b'{"packages": 1}'), NixOutputError),
        ("realise", FakeFault("hang"), NixTimeout),
        ("resolve", FakeFault("not-installed"), CommandNotFound),
    ],
)
def test_injected_faults_become_typed_errors(
    tmp_path: Path, step: NixStep, fault: FakeFault, error: type[Exception]
) -> None:
    """Each fault kind at each step surfaces as the library's typed error."""
    fake = FakeNix(tmp_path, default_fake_packages(), fail_with={step: fault})
    with pytest.raises(error):
        realise(SHELL_HELLO, SPEC, runner=fake, timeout=7)
    assert fake.steps[-1] == step


def test_faults_can_be_limited_to_the_first_calls(fake: FakeNix) -> None:
    """times=1: the first realise fails, the retry succeeds."""
    fault = FakeFault("fail", times=1)
    fake = FakeNix(fake.store_root, fake.packages, fail_with={"realise": fault})
    with pytest.raises(NixBuildFailed) as caught:
        realise(SHELL_HELLO, SPEC, runner=fake)
    assert "injected failure" in caught.value.stderr_tail
    assert len(realise(SHELL_HELLO, SPEC, runner=fake)) == 8


def test_hang_reports_the_timeout_it_was_given(fake: FakeNix) -> None:
    """A hanging step raises NixTimeout carrying the timeout realise passed."""
    fake = FakeNix(fake.store_root, fake.packages, fail_with={"path-info": FakeFault("hang")})
    with pytest.raises(NixTimeout) as caught:
        realise(SHELL_HELLO, SPEC, runner=fake, timeout=3.5)
    assert caught.value.timeout == 3.5
    assert caught.value.argv[0] == "nix"


def test_build_failure_of_a_dependency(tmp_path: Path) -> None:
    """A package marked build_fails fails the realise step, logging the builder error."""
    packages = default_fake_packages()
    packages["busybox"] = FakePackage(build_fails=True)
    lines: list[str] = []
    with pytest.raises(NixBuildFailed) as caught:
        realise(SHELL_HELLO, SPEC, runner=FakeNix(tmp_path, packages), on_log_line=lines.append)
    assert caught.value.argv[0] == "nix-store"
    assert any("busybox" in line and "failed" in line for line in lines)


def test_realise_logs_only_what_it_builds(fake: FakeNix) -> None:
    """The first realise logs a building line per path; the second finds them on disk."""
    first: list[str] = []
    second: list[str] = []
    realise(SHELL_HELLO, SPEC, runner=fake, on_log_line=first.append)
    realise(SHELL_HELLO, SPEC, runner=fake, on_log_line=second.append)
    assert len([line for line in first if line.startswith("building")]) == 8
    assert second == []


def test_unrecognised_commands_are_unexpected(fake: FakeNix) -> None:
    """FakeNix refuses commands nix.py never makes, as a test failure (AssertionError)."""
    with pytest.raises(UnexpectedCall):
        fake.run(["nix-build", "-A", "hello"])
    assert issubclass(UnexpectedCall, AssertionError)


def test_unknown_derivation_fails_like_nix(fake: FakeNix) -> None:
    """Realising a .drv the fake never handed out exits 1."""
    result = fake.run(["nix-store", "--realise", "/nix/store/" + "0" * 32 + "-x.drv!out"])
    assert result.returncode == 1


def test_trusted_expressions(fake: FakeNix) -> None:
    """realise_expression works against FakeNix with declared expression answers."""
    fake = FakeNix(fake.store_root, fake.packages, expressions={"pkgs: pkgs.hello": {"h": "hello"}})
    graph = realise_expression("pkgs: pkgs.hello", SPEC, runner=fake, packages=["nano"])
    assert set(graph.requested) == {"h", "nano"}
    with pytest.raises(NixBuildFailed):
        realise_expression("pkgs: pkgs.other", SPEC, runner=fake)


# --- recording and replay ------------------------------------------------------


def test_record_save_load_replay(fake: FakeNix, tmp_path: Path) -> None:
    """A recorded build replays from its JSON file to the same graph with the same calls."""
    recorder = RecordingRunner(fake)
    graph = realise(SHELL_HELLO, SPEC, runner=recorder)
    path = tmp_path / "calls.json"
    recorder.save(path)
    replay = ReplayRunner.load(path)
    lines: list[str] = []
    assert realise(SHELL_HELLO, SPEC, runner=replay, on_log_line=lines.append) == graph
    assert replay.calls == [call.argv for call in recorder.calls]
    assert len(lines) == 8  # the recorded "building" lines are replayed as log lines


def test_replay_rejects_unexpected_argv() -> None:
    """An argv that was never recorded raises UnexpectedCall naming it."""
    replay = ReplayRunner([RecordedCall(("echo", "a"), stdout=b"a\n")])
    assert replay.run(["echo", "a"]).stdout == b"a\n"
    with pytest.raises(UnexpectedCall, match="echo"):
        replay.run(["echo", "b"])
    assert replay.calls == [("echo", "a"), ("echo", "b")]


def test_replay_answers_in_order_then_repeats_the_last() -> None:
    """Several recordings of one argv are used in turn; the last one repeats."""
    argv = ("nix", "x")
    replay = ReplayRunner([RecordedCall(argv, 1), RecordedCall(argv, 0)])
    assert [replay.run(argv).returncode for _ in range(3)] == [1, 0, 0]


def test_errors_are_recorded_and_replayed(tmp_path: Path) -> None:
    """Timeouts and missing commands are recorded, saved, and raised again on replay."""

    class Failing:
        def run(self, argv: object, **_: object) -> RunResult:
            if argv == ("slow",):
                raise NixTimeout(("slow",), 2.0, "partial\n")
            raise CommandNotFound(("absent",))

    recorder = RecordingRunner(Failing())
    with pytest.raises(NixTimeout):
        recorder.run(["slow"], timeout=2.0)
    with pytest.raises(CommandNotFound):
        recorder.run(["absent"])
    recorder.save(tmp_path / "r.json")
    replay = ReplayRunner.load(tmp_path / "r.json")
    with pytest.raises(NixTimeout) as caught:
        replay.run(["slow"])
    assert (caught.value.timeout, caught.value.stderr_tail) == (2.0, "partial")
    with pytest.raises(CommandNotFound):
        replay.run(["absent"])


def test_binary_output_survives_the_json_round_trip(tmp_path: Path) -> None:
    """Non-UTF-8 output is stored as base64 and replayed byte for byte."""
    call = RecordedCall(("x",), 0, b"\xff\x00bin", b"text\n")
    data = json.loads(json.dumps(call.to_json()))
    assert RecordedCall.from_json(data) == call


@pytest.mark.parametrize(
    "content",
    ["not json", '{"version": 2, "calls": []}', '{"version": 1}',
     '{"version": 1, "calls": [{"argv": "x"}]}',
     '{"version": 1, "calls": [{"argv": ["x"], "error": "boom"}]}',
     '{"version": 1, "calls": [{"argv": ["x"], "stdout": 3}]}'],
)
def test_bad_recordings_are_invalid_input(tmp_path: Path, content: str) -> None:
    """A recording file that does not fit the format raises InvalidInput."""
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InvalidInput):
        ReplayRunner.load(path)


def test_recording_passes_results_through(fake: FakeNix) -> None:
    """The recorder returns the inner runner's results unchanged."""
    recorder = RecordingRunner(fake)
    direct = realise(SHELL_HELLO, SPEC, runner=FakeNix(fake.store_root, fake.packages))
    assert realise(SHELL_HELLO, SPEC, runner=recorder) == direct
    assert [c.returncode for c in recorder.calls] == [0, 0, 0]

"""The benchmark's estimators of "no slower": rounds paired, not bests of different rounds."""

from __future__ import annotations

import gc
import json
import os
import random
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import pytest

from benchmarks import bench_pack, no_slower
from benchmarks.bench_pack import Result, paired_rate_ratio
from nixery_core import frame_processes
from nixery_core.archive import ArchiveOptions


def _result(runs: tuple[float, ...]) -> Result:
    return Result("x", min(runs), 0.0, 1 << 20, 1, runs=runs)


def test_a_paired_ratio_compares_each_round_with_itself() -> None:
    """A host twice as slow in one round slows both packs of that round: the pairs cancel it."""
    without = _result((1.00, 2.00, 1.00))
    cold = _result((1.02, 2.04, 1.02))
    assert paired_rate_ratio(cold, without) == pytest.approx(1 / 1.02)
    # The best of each reads the same here; a quiet round for one contender only does not.
    lucky = _result((0.90, 2.00, 1.00))
    assert lucky.seconds / cold.seconds < 0.9
    assert paired_rate_ratio(cold, lucky) == pytest.approx(1 / 1.02)


def test_a_paired_ratio_needs_the_same_rounds() -> None:
    """Results of a different number of rounds are not paired silently."""
    with pytest.raises(ValueError, match="longer"):
        paired_rate_ratio(_result((1.0, 1.0)), _result((1.0, 1.0, 1.0)))


# --- the "no slower" rounds (benchmarks/no_slower.py) -------------------------------------


def test_a_round_runs_without_in_the_middle_and_swaps_the_others_every_round() -> None:
    """Each contender is adjacent to ``without`` and runs before it in every other round."""
    orders = [no_slower.round_order(i) for i in range(4)]
    assert orders == [
        ("cold", "without", "copy"),
        ("copy", "without", "cold"),
        ("cold", "without", "copy"),
        ("copy", "without", "cold"),
    ]
    assert {no_slower.round_order(i, "fixed") for i in range(4)} == {("cold", "without", "copy")}
    with pytest.raises(ValueError, match="unknown order scheme 'abab'"):
        no_slower.round_order(0, "abab")


class _FakeHost:
    """A clock whose runs take ``work[role] * speed[round]`` seconds (times ``drift`` per
    position in the round and the position's factor in ``places``), recording the hooks'
    calls."""

    def __init__(
        self, work: dict[str, float], speed: list[float], drift: float = 1.0,
        crowded: frozenset[int] = frozenset(), places: tuple[float, float, float] = (1, 1, 1),
    ) -> None:
        self.work, self.speed, self.drift, self.crowded = work, speed, drift, crowded
        self.places = places
        self.now = 0.0
        self.others = 0.0  # CPU seconds the rest of the host used
        self.calls: list[str] = []
        self.round = 0
        self.position = 0

    def contender(self, role: str) -> Callable[[], object]:
        def run() -> None:
            self.calls.append(f"run {role}")
            seconds = (self.work[role] * self.speed[self.round] * self.drift**self.position
                       * self.places[self.position])
            self.now += seconds
            if self.round in self.crowded:
                self.others += seconds  # another process took a whole CPU meanwhile
            self.position += 1
            if self.position == 3:
                self.round, self.position = self.round + 1, 0

        return run

    def before(self, role: str) -> float:
        self.calls.append(f"before {role}")
        return 0.1 * self.round  # the host's busy share the wait for quiet ended with

    def rounds(self, count: int, scheme: str = "alternate", most: int = 0) -> no_slower.Rounds:
        return no_slower.run_rounds(
            {role: self.contender(role) for role in self.work},
            count,
            scheme=scheme,
            before=self.before,
            clock=lambda: self.now,
            cpu=lambda: self.now / 2,
            host=lambda: self.now / 2 + self.others,
            crowded=0.25,
            most=most,
        )


def test_rounds_pair_each_run_with_the_without_run_of_its_own_round() -> None:
    """A round on a host twice as slow slows all three runs of it; each round's ratio cancels it."""
    host = _FakeHost({"cold": 1.02, "without": 1.0, "copy": 1.0}, [1.0, 2.0, 1.0, 3.0])
    rounds = host.rounds(4)
    assert rounds.ratios("cold") == pytest.approx([1 / 1.02] * 4)
    assert rounds.ratios("copy") == pytest.approx([1.0] * 4)
    assert rounds.cpu_ratios("cold") == pytest.approx([1.02] * 4)
    assert rounds.orders[1] == ("copy", "without", "cold")
    assert [run.busy for run in rounds.runs["cold"]] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    # Every timed run follows its own untimed preparation, in the round's order.
    assert host.calls[:6] == [
        "before cold", "run cold", "before without", "run without", "before copy", "run copy",
    ]


def test_alternation_cancels_a_drift_within_the_round_that_a_fixed_order_keeps() -> None:
    """Runs slowing down through a round bias a fixed order's A/A control; alternating does not."""
    same = {"cold": 1.0, "without": 1.0, "copy": 1.0}
    alternate = _FakeHost(same, [1.0] * 6, drift=1.05).rounds(6)
    fixed = _FakeHost(same, [1.0] * 6, drift=1.05).rounds(6, "fixed")
    assert statistics.median(alternate.ratios("copy")) == pytest.approx(1.0, abs=0.005)
    assert statistics.median(alternate.ratios("cold")) == pytest.approx(1.0, abs=0.005)
    assert statistics.median(fixed.ratios("copy")) == pytest.approx(1 / 1.05)
    assert statistics.median(fixed.ratios("cold")) == pytest.approx(1.05)


def test_rounds_need_at_least_one_round() -> None:
    """Zero rounds is refused rather than judged on nothing."""
    with pytest.raises(ValueError, match="at least 1"):
        _FakeHost({"cold": 1.0, "without": 1.0, "copy": 1.0}, [1.0]).rounds(0)


def test_the_spread_gives_the_extremes_quartiles_and_median() -> None:
    """The five figures printed for the rounds' ratios are min, quartiles, median and max."""
    spread = no_slower.Spread.of([1.05, 0.90, 1.00, 0.95, 1.10])
    assert spread == no_slower.Spread(0.90, 0.95, 1.00, 1.05, 1.10)
    assert no_slower.Spread.of([0.97]) == no_slower.Spread(0.97, 0.97, 0.97, 0.97, 0.97)
    assert str(spread).startswith("min 0.900  q1 0.950  median 1.000")
    with pytest.raises(ValueError, match="no values"):
        no_slower.Spread.of([])


def _rounds(cold: list[float], copy: list[float], busy: float = 0.0) -> no_slower.Rounds:
    def runs(seconds: list[float]) -> tuple[no_slower.Run, ...]:
        return tuple(no_slower.Run(s, s, busy) for s in seconds)

    return no_slower.Rounds(
        {"cold": runs(cold), "without": runs([1.0] * len(cold)), "copy": runs(copy)}
    )


def test_the_verdict_is_the_median_round_against_the_target_with_the_a_a_line() -> None:
    """Cold's median ratio decides PASS or MISS at 0.95; the A/A median and spread print beside."""
    lines = no_slower.verdict_lines(
        "gzip", _rounds([1.0, 1.0, 2.0], [1.0, 0.98, 1.02], busy=0.05), main_table="paired 0.940"
    )
    assert lines[0].startswith("  PASS  gzip cold pack into fragments / without, 3 rounds")
    assert ": 1.000 [0.500, 1.000] (75% interval) (target >= 0.95)" in lines[0]
    assert "rounds' ratios: min 0.500" in lines[1]
    assert "CPU cold / without 1.000x" in lines[1]
    assert "A/A without / without (control): 1.000 [0.980, 1.020] (75% interval);  min 0.980" \
        in lines[2]
    assert lines[3].endswith("(others, steal): median 5%, max 5%")
    assert lines[4].endswith("main table: paired 0.940")
    slower = no_slower.verdict_lines("estargz", _rounds([1.06, 1.06, 0.9], [1.0, 1.0, 1.0]))
    assert slower[0].startswith("  MISS  estargz")
    assert "0.943 [0.943, 1.111] (75% interval) (target >= 0.95)" in slower[0]
    assert len(slower) == 3


def test_the_median_interval_is_the_binomial_order_statistics() -> None:
    """The interval is [x(k), x(n+1-k)] for the largest k whose binomial coverage is >= 95%."""
    twelve = no_slower.median_interval([float(v) for v in (12, 1, 11, 2, 10, 3, 9, 4, 8, 5, 7, 6)])
    assert (twelve.low, twelve.high, twelve.ranks) == (3.0, 10.0, (3, 10))
    # P(B <= 2) for B ~ Binomial(12, 1/2) is (1 + 12 + 66) / 4096.
    assert twelve.coverage == pytest.approx(1 - 2 * 79 / 4096)
    assert str(twelve) == "[3.000, 10.000] (96% interval)"
    assert no_slower.median_interval([float(v) for v in range(1, 21)]).ranks == (6, 15)
    assert no_slower.median_interval([float(v) for v in range(1, 61)]).ranks == (22, 39)
    # Too few rounds for 95%: the whole range, its coverage said as it is.
    five = no_slower.median_interval([0.9, 1.1, 1.0, 0.95, 1.05])
    assert (five.low, five.high) == (0.9, 1.1)
    assert five.coverage == pytest.approx(1 - 2 / 32)
    assert no_slower.median_interval([1.0, 1.0], confidence=0.5).ranks == (1, 2)
    with pytest.raises(ValueError, match="no values"):
        no_slower.median_interval([])


def test_the_median_interval_holds_the_true_median_as_often_as_it_says() -> None:
    """On skewed samples with a known median the interval's printed coverage is its real one."""
    rng = random.Random(18)  # noqa: S311 - a sample, not a secret
    for n in (12, 30):
        held = 0
        trials = 3000
        for _ in range(trials):
            sample = [rng.lognormvariate(0.0, 0.5) for _ in range(n)]  # median exactly 1
            interval = no_slower.median_interval(sample)
            held += interval.low <= 1.0 <= interval.high
        assert held / trials == pytest.approx(interval.coverage, abs=0.015)


def test_a_verdict_whose_interval_holds_the_target_cannot_tell() -> None:
    """PASS or MISS follows the median; an interval holding 0.95 adds 'cannot tell'."""
    cold = [1 / r for r in (0.93, 0.94, 0.96, 0.97, 0.98, 0.99, 0.935, 0.945, 0.955, 0.965,
                            0.975, 0.985)]
    control = [1.0, 0.99, 1.01, 1.02, 0.98, 1.0, 1.0, 0.99, 1.01, 1.02, 0.98, 1.0]
    lines = no_slower.verdict_lines("gzip", _rounds(cold, [1 / r for r in control]))
    assert lines[0].startswith("  PASS  gzip")
    assert lines[0].endswith("(the interval holds the target: cannot tell)")
    sure = no_slower.verdict_lines("gzip", _rounds([1 / 0.97] * 12, [1 / r for r in control]))
    assert sure[0].startswith("  PASS")
    assert "cannot tell" not in sure[0]
    missed = no_slower.verdict_lines("gzip", _rounds([1 / 0.93] * 12, [1 / r for r in control]))
    assert missed[0].startswith("  MISS")
    assert "cannot tell" not in missed[0]


def test_a_verdict_beside_an_a_a_control_missing_1_cannot_tell() -> None:
    """An A/A control whose interval misses 1 shows the method biased: no verdict is trusted."""
    lines = no_slower.verdict_lines("gzip", _rounds([1 / 0.99] * 12, [1 / 1.04] * 12))
    assert lines[0].startswith("  PASS  gzip")
    assert lines[0].endswith("(the A/A control's interval misses 1: cannot tell)")
    assert "1.040 [1.040, 1.040] (96% interval) MISSES 1" in lines[2]


def test_block_medians_are_what_shorter_runs_would_have_printed() -> None:
    """A long A/A run splits into disjoint blocks of rounds, each block's median, a tail dropped."""
    ratios = [1.0, 0.9, 1.1, 0.8, 0.7, 0.75, 1.3]
    assert no_slower.block_medians(ratios, 3) == [1.0, 0.75]
    assert no_slower.block_medians(ratios, 8) == []
    with pytest.raises(ValueError, match="at least 1"):
        no_slower.block_medians(ratios, 0)


def test_a_pairs_json_round_trips_into_rounds() -> None:
    """The tuning report reads back the rounds bench_pack --pairs-json writes."""
    rounds = _FakeHost({"cold": 1.1, "without": 1.0, "copy": 1.0}, [1.0, 2.0]).rounds(2)
    data = {
        "orders": rounds.orders,
        "kept": rounds.kept,
        **{role: [attrs.asdict(run) for run in runs] for role, runs in rounds.runs.items()},
    }
    again = no_slower.rounds_from_json(json.loads(json.dumps(data)))
    assert again == rounds
    report = no_slower.aa_report("gzip", again, [1, 5])
    assert report[0].startswith("  gzip: 2 rounds; A/A per round: min 1.000")
    assert report[0].endswith("robust sigma 0.000")
    assert report[1] == "    A/A median 1.000 [1.000, 1.000] (50% interval)"
    assert report[2].startswith("    place 0: run / its round's mean: median ")
    assert report[-2] == (
        "      1 rounds: +-0.000 (2 s.e. of the median); 2 blocks, medians 1.000 1.000  "
        "(worst |median - 1| 0.000)"
    )
    assert "0 blocks, medians   (worst |median - 1| nan)" in report[-1]


def test_the_band_of_a_median_narrows_with_the_square_root_of_the_rounds() -> None:
    """The A/A tuning figure: sigma from the quartiles, 2 s.e. of a median of n rounds."""
    assert no_slower.robust_sigma([0.9, 1.0, 1.1, 1.0, 0.95, 1.05]) == pytest.approx(
        (1.0375 - 0.9625) / 1.349
    )
    assert no_slower.median_error(0.05, 4) == pytest.approx(2 * 1.2533 * 0.05 / 2)
    assert no_slower.median_error(0.05, 16) == pytest.approx(no_slower.median_error(0.05, 4) / 2)


def test_a_round_crowded_by_the_rest_of_the_host_is_run_again_and_not_judged() -> None:
    """A round during which another process took a CPU is re-run in the same order, unjudged."""
    host = _FakeHost(
        {"cold": 1.0, "without": 1.0, "copy": 1.0}, [1.0, 1.0, 1.0, 1.0], crowded=frozenset({1})
    )
    rounds = host.rounds(3, most=6)
    assert rounds.kept == (True, False, True, True)
    # The re-run repeats the order the crowded round had, so the kept rounds alternate.
    assert rounds.orders[1] == rounds.orders[2] == ("copy", "without", "cold")
    assert rounds.runs["cold"][1].others == pytest.approx(1.0)
    judged = rounds.judged()
    assert len(judged) == 3
    assert judged.orders == tuple(no_slower.round_order(i) for i in range(3))
    lines = no_slower.verdict_lines("gzip", rounds)
    assert "3 rounds" in lines[0]
    assert lines[-1].endswith("1 of 4 rounds not judged: the rest of the host used CPU during "
                              "one of their runs")


def test_when_every_round_is_crowded_all_of_them_are_judged_and_it_says_so() -> None:
    """No round is dropped silently: with none left, all are judged and the line says so."""
    host = _FakeHost(
        {"cold": 1.0, "without": 1.0, "copy": 1.0}, [1.0] * 4, crowded=frozenset(range(4))
    )
    rounds = host.rounds(2, most=4)
    assert rounds.kept == (False, False, False, False)
    assert len(rounds.judged()) == 4
    lines = no_slower.verdict_lines("gzip", rounds)
    assert "4 rounds" in lines[0]
    assert lines[-1].endswith("none was left, so all are judged")
    recrowded = no_slower.recrowd(rounds, 2.0)
    assert recrowded.kept == (True, True, True, True)


def test_the_balanced_order_puts_every_contender_in_every_place_equally_often() -> None:
    """Every six rounds each contender runs twice in each place, before each other one thrice."""
    orders = [no_slower.round_order(i, "balanced") for i in range(12)]
    assert orders[:6] == orders[6:]
    roles = ("cold", "without", "copy")
    for role in roles:
        assert [order.index(role) for order in orders[:6]].count(0) == 2
        assert sorted(order.index(role) for order in orders[:6]) == [0, 0, 1, 1, 2, 2]
        for other in roles:
            if other != role:
                assert sum(o.index(role) < o.index(other) for o in orders[:6]) == 3
    # Each order is followed by its reverse: an even number of rounds is balanced before/after.
    assert all(orders[i + 1] == orders[i][::-1] for i in range(0, 6, 2))


def test_the_balanced_order_cancels_a_slow_middle_place_that_alternation_keeps() -> None:
    """A run slower in the middle of a round biases the alternating order; balancing cancels it."""
    same = {"cold": 1.0, "without": 1.0, "copy": 1.0}
    slow_middle = (1.0, 1.03, 1.0)
    alternate = _FakeHost(same, [1.0] * 6, places=slow_middle).rounds(6)
    balanced = _FakeHost(same, [1.0] * 6, places=slow_middle).rounds(6, "balanced")
    assert statistics.median(alternate.ratios("copy")) == pytest.approx(1.03)
    assert statistics.median(alternate.ratios("cold")) == pytest.approx(1.03)
    assert statistics.median(balanced.ratios("copy")) == pytest.approx(1.0)
    assert statistics.median(balanced.ratios("cold")) == pytest.approx(1.0)


def test_place_effects_show_which_place_of_a_round_is_slow() -> None:
    """On rounds of the same code, each place's median run over its round's mean is its effect."""
    same = {"cold": 1.0, "without": 1.0, "copy": 1.0}
    rounds = _FakeHost(same, [1.0, 2.0] * 3, places=(1.0, 1.0, 1.06)).rounds(6, "balanced")
    effects = no_slower.place_effects(rounds)
    assert [place for place, _spread, _interval in effects] == [0, 1, 2]
    assert [spread.median for _place, spread, _interval in effects] == pytest.approx(
        [1 / 1.02, 1 / 1.02, 1.06 / 1.02]
    )
    before, after = no_slower.before_after(rounds)
    assert len(before) == len(after) == 3
    adjacent, apart = no_slower.adjacent_apart(rounds)
    assert (len(adjacent), len(apart)) == (4, 2)  # copy and without apart in 2 of 6 orders
    lines = no_slower.place_lines(rounds)
    assert lines[2].startswith("    place 2: run / its round's mean: median 1.039")
    assert lines[3].startswith("    A/A with copy before without: 3 rounds, median ")


def test_untimed_steps_read_the_corpus_once_a_round_and_sync_what_earlier_runs_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With warm 'round' and sync 'written', a round reads the corpus once, each run is preceded
    by writing back the stores the runs before it wrote into (not the host's pages), and the
    earlier rounds' stores are removed at a round's start (the disk does not fill)."""
    synced: list[list[Path]] = []

    def sync_files(directories: Sequence[Path]) -> int:
        synced.append(list(directories))
        return 0

    def no_os_sync() -> None:
        pytest.fail("os.sync() with --pair-sync written")

    monkeypatch.setattr(bench_pack, "sync_files", sync_files)
    monkeypatch.setattr(os, "sync", no_os_sync)
    contenders = {
        role: bench_pack.ours(tmp_path, [[]], ArchiveOptions(),
                              blobs=bench_pack.cold_blobs(tmp_path, role))
        for role in ("cold", "without", "copy")
    }
    warmed: list[int] = []
    steps = bench_pack.Steps()
    before = bench_pack.untimed_steps(contenders, lambda: warmed.append(1), steps,
                                      warm_every="round", sync="written", quiet_wait=0)
    for role in ("cold", "without", "copy", "copy", "without"):
        assert before(role) == 0.0
    assert len(warmed) == 2
    assert synced == [
        [],
        [tmp_path / "cold-blobs-cold-1"],
        [tmp_path / "cold-blobs-without-1"],
        [tmp_path / "cold-blobs-copy-1"],
        [tmp_path / "cold-blobs-copy-2"],
    ]
    assert set(steps.seconds) == {"warm", "sync", "prepare", "collect", "quiet", "remove"}
    assert len(steps.each["prepare"]) == 5
    # The first round's stores are gone once the second round starts, this round's are kept.
    assert not (tmp_path / "cold-blobs-cold-1").exists()
    assert not (tmp_path / "cold-blobs-copy-1").exists()
    assert (tmp_path / "cold-blobs-copy-2").is_dir()


def test_untimed_steps_collect_the_garbage_earlier_runs_left_before_the_next_run(
    tmp_path: Path,
) -> None:
    """A reference cycle left by an earlier run is collected before the next timed run starts,
    so a full collection never lands inside one contender's run by chance."""

    class Garbage:
        def __init__(self) -> None:
            self.me = self

    contenders = {
        role: bench_pack.ours(tmp_path, [[]], ArchiveOptions(),
                              blobs=bench_pack.cold_blobs(tmp_path, role))
        for role in ("cold", "without", "copy")
    }
    before = bench_pack.untimed_steps(contenders, lambda: None, bench_pack.Steps(),
                                      warm_every="round", sync="none", quiet_wait=0)
    gc.disable()  # only the step may collect it
    try:
        left = weakref.ref(Garbage())
        assert left() is not None
        before("cold")
        assert left() is None
    finally:
        gc.enable()


def test_sync_files_writes_back_every_file_and_directory_under_the_ones_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every file and directory a run wrote is fsynced; symlinks and other trees are not."""
    written = tmp_path / "run"
    (written / "layers" / "sha256").mkdir(parents=True)
    (written / "layers" / "sha256" / "blob").write_bytes(b"x" * 100)
    (written / "index.sqlite").write_bytes(b"y")
    (written / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").write_bytes(b"z")
    fsynced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        fsynced.append(str(Path(f"/proc/self/fd/{fd}").readlink()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert bench_pack.sync_files([written]) == 5
    assert sorted(fsynced) == sorted(str(p) for p in (
        written, written / "layers", written / "layers" / "sha256",
        written / "layers" / "sha256" / "blob", written / "index.sqlite",
    ))


def test_the_command_lines_help_prints(capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` of bench_pack and of the tuning report prints their options (argparse '%')."""
    for main in (bench_pack.main, no_slower.main):
        with pytest.raises(SystemExit) as exited:
            main(["--help"])
        assert exited.value.code == 0
    printed = capsys.readouterr().out
    assert "less than 20% busy over 0.1 s" in printed
    assert "--pair-warm" in printed
    assert "--crowded" in printed
    assert "--sizes" in printed


def test_frame_workers_cpu_is_read_from_their_clocks_not_in_ticks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker's CPU is its clock's reading, not ``/proc`` ticks 10 ms coarse."""
    monkeypatch.setattr(frame_processes, "shared_pids", lambda: [os.getpid()])
    sum(range(300_000))  # some CPU, so the reading is no multiple of a tick by chance
    before = time.process_time()
    reading = bench_pack.workers_cpu()
    after = time.process_time()
    assert before <= reading <= after


def test_frame_workers_cpu_falls_back_to_ticks_without_their_clocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where a worker's clock cannot be read its ``/proc`` ticks count, not nothing."""
    def no_clock(clock: int) -> float:
        raise OSError("no such clock")

    monkeypatch.setattr(frame_processes, "shared_pids", lambda: [os.getpid()])
    monkeypatch.setattr(time, "clock_gettime", no_clock)
    fields = bench_pack._proc_fields(os.getpid())
    ticks = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    assert bench_pack.workers_cpu() == pytest.approx(ticks, abs=0.05)


def test_a_no_slower_run_removes_what_stopped_runs_left_and_keeps_live_ones(
    tmp_path: Path,
) -> None:
    """The rounds' directory of a run stopped before its end (its process gone) is removed
    when the next run starts; a live run's, and one named without a process, stay."""
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    stopped = tmp_path / f"no-slower-{gone.pid}-abc"
    live = tmp_path / f"no-slower-{os.getpid()}-def"
    unnamed = tmp_path / "no-slower-xyz"
    for directory in (stopped, live, unnamed):
        (directory / "cold-blobs-gzip-1").mkdir(parents=True)
    work = bench_pack.no_slower_work_dir(tmp_path)
    assert work.is_dir()
    assert work.name.startswith(f"no-slower-{os.getpid()}-")
    assert not stopped.exists()
    assert live.is_dir()
    assert unnamed.is_dir()

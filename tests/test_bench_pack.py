"""The benchmark's estimators of "no slower": rounds paired, not bests of different rounds."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable

import attrs
import pytest

from benchmarks import bench_pack, no_slower
from benchmarks.bench_pack import Result, paired_rate_ratio
from nixery_core import frame_processes


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
    position in the round), recording the hooks' calls."""

    def __init__(
        self, work: dict[str, float], speed: list[float], drift: float = 1.0,
        crowded: frozenset[int] = frozenset(),
    ) -> None:
        self.work, self.speed, self.drift, self.crowded = work, speed, drift, crowded
        self.now = 0.0
        self.others = 0.0  # CPU seconds the rest of the host used
        self.calls: list[str] = []
        self.round = 0
        self.position = 0

    def contender(self, role: str) -> Callable[[], object]:
        def run() -> None:
            self.calls.append(f"run {role}")
            seconds = self.work[role] * self.speed[self.round] * self.drift**self.position
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
    assert lines[0].startswith("  PASS  gzip cold pack into fragments / without, 3 adjacent")
    assert ": 1.000 (target >= 0.95)" in lines[0]
    assert "rounds' ratios: min 0.500" in lines[1]
    assert "CPU cold / without 1.000x" in lines[1]
    assert "A/A without / without (noise floor): 1.000;  min 0.980" in lines[2]
    assert lines[2].endswith("noise band +-0.021")
    assert "cannot tell" not in lines[0]
    assert lines[3].endswith("(others, steal): median 5%, max 5%")
    assert lines[4].endswith("main table: paired 0.940")
    slower = no_slower.verdict_lines("estargz", _rounds([1.06, 1.06, 0.9], [1.0, 1.0, 1.0]))
    assert slower[0].startswith("  MISS  estargz")
    assert "0.943 (target >= 0.95)" in slower[0]
    assert len(slower) == 3


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
    assert report[1] == (
        "      1 rounds: +-0.000 (2 s.e. of the median); 2 blocks, medians 1.000 1.000  "
        "(worst |median - 1| 0.000)"
    )
    assert "0 blocks, medians   (worst |median - 1| nan)" in report[2]


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
    assert "3 adjacent pairs" in lines[0]
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
    assert "4 adjacent pairs" in lines[0]
    assert lines[-1].endswith("none was left, so all are judged")
    recrowded = no_slower.recrowd(rounds, 2.0)
    assert recrowded.kept == (True, True, True, True)


def test_a_verdict_within_the_a_a_noise_band_of_the_target_says_it_cannot_tell() -> None:
    """PASS or MISS still follows the 0.95 threshold; within the A/A band it adds 'cannot tell'."""
    noisy = _rounds([1.06, 1.07, 1.055, 1.04, 1.08], [0.95, 1.0, 1.05, 1.1, 0.9])
    band = no_slower.noise_band(noisy.ratios("copy"))
    assert band == pytest.approx(2 * 1.2533 * no_slower.robust_sigma(noisy.ratios("copy")) / 5**0.5)
    lines = no_slower.verdict_lines("gzip", noisy)
    assert lines[0].startswith("  MISS  gzip")
    assert lines[0].endswith("(within the A/A noise band of the target: cannot tell)")
    # An A/A median off 1 widens the band to that distance.
    skewed = _rounds([1.0] * 3, [0.9, 0.9, 0.9])
    assert no_slower.noise_band(skewed.ratios("copy")) == pytest.approx(1 / 0.9 - 1)
    assert no_slower.verdict_lines("gzip", skewed)[0].endswith("cannot tell)")


def test_the_command_lines_help_prints(capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` of bench_pack and of the tuning report prints their options (argparse '%')."""
    for main in (bench_pack.main, no_slower.main):
        with pytest.raises(SystemExit) as exited:
            main(["--help"])
        assert exited.value.code == 0
    printed = capsys.readouterr().out
    assert "less than 20% busy over 0.1 s" in printed
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

"""Judging "no slower" on a noisy host: rounds of three runs, balanced order, A/A control.

``bench_pack``'s target "a cold pack into fragments no slower than one
without" (>= 0.95) compares two packs whose costs differ by a few percent
of CPU, on a shared 2-core VM whose speed moves by more than that from one
second to the next.  Here, per format:

* every round runs three contenders: ``cold`` (into an empty fragment
  cache), ``without`` (the same pack into a store, no cache) and ``copy``
  (a second, identical ``without``: the A/A control);
* in the ``"balanced"`` order (:data:`BALANCED`) every contender runs in
  every place of a round equally often, so no place's own effect favours
  one (``"alternate"``: ``without`` in the middle, the other two swapping
  every round; ``"fixed"``: never);
* before every timed run, untimed steps (``bench_pack``: the corpus read at
  a round's start, what earlier runs wrote written back, the contender
  prepared);
* a round's ratio is ``without`` seconds / ``cold`` seconds (a rate ratio:
  >= 1 means cold is no slower); the verdict is the median over the rounds
  with its distribution-free confidence interval (:func:`median_interval`),
  "cannot tell" when the interval holds the target or the A/A control's
  interval misses 1, printed with the rounds' spread (min / quartiles /
  max), the median of the rounds' CPU ratios, and the same figures for
  ``copy``: the A/A line, the method's own noise floor (its median would be
  1.00 with no noise).

Only the pure parts live here (round orders, the rounds loop with injected
clocks and hooks, statistics, the printed lines); ``bench_pack`` builds
the contenders.  The design's parameters were chosen from A/A data alone
(``docs/performance.md``, "Judging 'no slower' on a noisy host").
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

#: The contender every other is paired with (always run in the middle of a round).
WITHOUT = "without"
#: The contender judged: the same pack into an empty fragment cache.
COLD = "cold"
#: A second copy of ``WITHOUT``: the A/A control.
COPY = "copy"

ORDERS = ("alternate", "fixed", "balanced")

#: ``"balanced"``: all six orders, each one followed by its reverse, so that every six rounds
#: each contender runs twice in each place and before and after each other one three times.
BALANCED = (
    (COLD, WITHOUT, COPY),
    (COPY, WITHOUT, COLD),
    (WITHOUT, COLD, COPY),
    (COPY, COLD, WITHOUT),
    (WITHOUT, COPY, COLD),
    (COLD, COPY, WITHOUT),
)


def round_order(index: int, scheme: str = "alternate") -> tuple[str, str, str]:
    """The contenders of round ``index`` in the order they run.

    With ``"alternate"`` and ``"fixed"``, ``without`` runs in the middle,
    adjacent to both others; with ``"alternate"`` the outer two swap every
    round, with ``"fixed"`` they never do.  With ``"balanced"`` every
    contender takes every place equally often (:data:`BALANCED`).
    """
    if scheme not in ORDERS:
        msg = f"unknown order scheme {scheme!r}; expected one of {', '.join(ORDERS)}"
        raise ValueError(msg)
    if scheme == "balanced":
        return BALANCED[index % len(BALANCED)]
    if scheme == "alternate" and index % 2:
        return (COPY, WITHOUT, COLD)
    return (COLD, WITHOUT, COPY)


@attrs.frozen
class Run:
    """One timed run: wall seconds and CPU seconds (all threads and worker processes)."""

    seconds: float
    cpu: float
    #: The share of the host's CPU busy (other processes, steal) right before it, if measured.
    busy: float = 0.0
    #: CPU seconds the rest of the host used (or the hypervisor took) during it, if measured.
    others: float = 0.0

    def crowded(self, limit: float) -> bool:
        """Whether the rest of the host used more than ``limit`` CPUs on average during it."""
        return self.others > limit * self.seconds


@attrs.frozen
class Rounds:
    """Every round's run of each contender, in round order."""

    runs: Mapping[str, tuple[Run, ...]]
    #: The order each round ran in (the first contender first).
    orders: tuple[tuple[str, ...], ...] = ()
    #: Per round: whether it is judged (no run of it crowded by the rest of the host); all
    #: rounds when empty.
    kept: tuple[bool, ...] = ()

    def judged(self) -> Rounds:
        """The rounds kept, or all of them when none was (and then :attr:`kept` is empty)."""
        if not any(self.kept):
            return attrs.evolve(self, kept=())
        keep = self.kept
        return Rounds(
            {role: tuple(r for r, k in zip(runs, keep, strict=True) if k)
             for role, runs in self.runs.items()},
            tuple(o for o, k in zip(self.orders, keep, strict=True) if k),
            tuple(k for k in keep if k),
        )

    def __len__(self) -> int:
        return len(self.runs[WITHOUT])

    def ratios(self, role: str) -> list[float]:
        """Per round: ``without`` seconds / ``role`` seconds (the rate ratio; >= 1 is no slower)."""
        return [
            base.seconds / own.seconds
            for own, base in zip(self.runs[role], self.runs[WITHOUT], strict=True)
        ]

    def cpu_ratios(self, role: str) -> list[float]:
        """Per round: ``role`` CPU seconds / ``without`` CPU seconds (> 1 is more CPU)."""
        return [
            own.cpu / base.cpu
            for own, base in zip(self.runs[role], self.runs[WITHOUT], strict=True)
        ]


def run_rounds(
    contenders: Mapping[str, Callable[[], object]],
    rounds: int,
    *,
    scheme: str = "alternate",
    before: Callable[[str], float] = lambda _role: 0.0,
    clock: Callable[[], float],
    cpu: Callable[[], float],
    host: Callable[[], float] = lambda: 0.0,
    crowded: float = float("inf"),
    most: int = 0,
) -> Rounds:
    """Run rounds of ``contenders`` (keyed ``cold``, ``without``, ``copy``) until ``rounds``
    of them are kept, or ``most`` (at least ``rounds``) have run.

    Each run is preceded by ``before(role)`` (untimed: warm, prepare, sync,
    wait for a quiet host; it returns the host's busy share it ended with)
    and timed by ``clock`` (wall), ``cpu`` (our CPU seconds) and ``host``
    (the whole host's busy CPU seconds), read right before and right after
    it.  A round is kept unless the rest of the host used more than
    ``crowded`` CPUs during one of its runs; the order of a round is that of
    the number of rounds kept so far, so the kept ones follow ``scheme`` exactly.
    """
    if rounds < 1:
        msg = f"rounds must be at least 1, not {rounds}"
        raise ValueError(msg)
    runs: dict[str, list[Run]] = {role: [] for role in contenders}
    orders: list[tuple[str, str, str]] = []
    kept: list[bool] = []
    while sum(kept) < rounds and len(kept) < max(most, rounds):
        order = round_order(sum(kept), scheme)
        orders.append(order)
        fine = True
        for role in order:
            busy = before(role)
            cpu_before, host_before = cpu(), host()
            start = clock()
            contenders[role]()
            seconds = clock() - start
            used = cpu() - cpu_before
            run = Run(seconds, used, busy, max(0.0, host() - host_before - used))
            runs[role].append(run)
            fine = fine and not run.crowded(crowded)
        kept.append(fine)
    return Rounds({role: tuple(done) for role, done in runs.items()}, tuple(orders), tuple(kept))


@attrs.frozen
class Spread:
    """Five figures of a sample: lowest, lower quartile, median, upper quartile, highest."""

    low: float
    q1: float
    median: float
    q3: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """The spread of ``values`` (quartiles by linear interpolation between order statistics)."""
        if not values:
            msg = "the spread of no values"
            raise ValueError(msg)
        ordered = sorted(values)
        if len(ordered) == 1:
            q1 = q3 = ordered[0]
        else:
            q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        return cls(ordered[0], q1, statistics.median(ordered), q3, ordered[-1])

    def __str__(self) -> str:
        return (
            f"min {self.low:.3f}  q1 {self.q1:.3f}  median {self.median:.3f}  "
            f"q3 {self.q3:.3f}  max {self.high:.3f}"
        )


@attrs.frozen
class Interval:
    """A distribution-free confidence interval of a median: two order statistics of the sample."""

    low: float
    high: float
    #: The chance that an interval made so holds the true median, for any continuous
    #: distribution of independent values (exact, from the binomial distribution).
    coverage: float
    #: The 1-based ranks of ``low`` and ``high`` in the sorted sample.
    ranks: tuple[int, int]

    def __str__(self) -> str:
        return f"[{self.low:.3f}, {self.high:.3f}] ({self.coverage:.0%} interval)"


def median_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The narrowest interval ``[x(k), x(n + 1 - k)]`` of the sorted ``values`` whose coverage of
    their distribution's median is at least ``confidence``.

    Each value lies below the true median with probability 1/2, so the count
    below it is binomial (n, 1/2) and ``[x(k), x(n + 1 - k)]`` misses the
    median only when fewer than ``k`` or more than ``n - k`` lie below it:
    coverage ``1 - 2 P(B <= k - 1)``.  With too few values for
    ``confidence`` (fewer than 6 for 95%) it is the whole range, its
    coverage printed as what it is.
    """
    if not values:
        msg = "the interval of no values"
        raise ValueError(msg)
    ordered = sorted(values)
    n = len(ordered)

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / float(1 << n)

    k = 1
    while 2 * (k + 1) <= n + 1 and coverage(k + 1) >= confidence:
        k += 1
    return Interval(ordered[k - 1], ordered[n - k], coverage(k), (k, n + 1 - k))


def verdict_lines(
    name: str,
    rounds: Rounds,
    *,
    target: float = 0.95,
    main_table: str = "",
    baseline: str = "without",
) -> list[str]:
    """The printed verdict of one format: cold's paired median against ``target`` with its
    distribution-free 95% interval (:func:`median_interval`; "cannot tell" when it holds
    ``target``, or when the A/A control's interval does not hold 1), its spread and CPU, the A/A
    control's median, interval and spread beside it, and ``main_table``'s figures; judged on the
    rounds kept (all when none was); ``baseline`` names the ``without`` contender in the
    lines."""
    every = rounds
    rounds = rounds.judged()
    ratios, control_ratios = rounds.ratios(COLD), rounds.ratios(COPY)
    cold, control = Spread.of(ratios), Spread.of(control_ratios)
    interval, control_interval = median_interval(ratios), median_interval(control_ratios)
    verdict = "PASS" if cold.median >= target else "MISS"
    biased = not control_interval.low <= 1 <= control_interval.high
    if interval.low < target <= interval.high:
        unsure = "  (the interval holds the target: cannot tell)"
    elif biased:
        unsure = "  (the A/A control's interval misses 1: cannot tell)"
    else:
        unsure = ""
    lines = [
        f"  {verdict}  {name} cold pack into fragments / {baseline}, {len(rounds)} "
        f"rounds: {cold.median:.3f} {interval} (target >= {target}){unsure}",
        f"          rounds' ratios: {cold};  CPU cold / {baseline} "
        f"{statistics.median(rounds.cpu_ratios(COLD)):.3f}x (median)",
        f"          A/A {baseline} / {baseline} (control): {control.median:.3f} "
        f"{control_interval}"
        f"{' MISSES 1' if biased else ''};  {control};  "
        f"CPU {statistics.median(rounds.cpu_ratios(COPY)):.3f}x",
    ]
    busy = [run.busy for runs in every.runs.values() for run in runs]
    if any(busy):
        lines.append(
            f"          host busy right before a run (others, steal): median "
            f"{statistics.median(busy):.0%}, max {max(busy):.0%}"
        )
    if every.kept and not all(every.kept):
        dropped = len(every) - sum(every.kept)
        lines.append(
            f"          {dropped} of {len(every)} rounds not judged: the rest of the host used "
            f"CPU during one of their runs"
            + ("" if rounds.kept else "; none was left, so all are judged")
        )
    if main_table:
        lines.append(f"          main table: {main_table}")
    return lines


def block_medians(ratios: Sequence[float], size: int) -> list[float]:
    """The medians of consecutive, disjoint blocks of ``size`` rounds (a short tail dropped).

    Used to tune the number of rounds from a long A/A run: each block is
    what a run of ``size`` rounds would have printed.
    """
    if size < 1:
        msg = f"block size must be at least 1, not {size}"
        raise ValueError(msg)
    return [
        statistics.median(ratios[start : start + size])
        for start in range(0, len(ratios) - size + 1, size)
    ]



def rounds_from_json(data: Mapping[str, Any]) -> Rounds:
    """The rounds of one format as ``bench_pack --pairs-json`` wrote them."""
    runs = {
        role: tuple(
            Run(
                float(run["seconds"]),
                float(run["cpu"]),
                float(run.get("busy", 0.0)),
                float(run.get("others", 0.0)),
            )
            for run in data[role]
        )
        for role in (COLD, WITHOUT, COPY)
    }
    return Rounds(
        runs,
        tuple(tuple(order) for order in data.get("orders", ())),
        tuple(bool(k) for k in data.get("kept", ())),
    )


def recrowd(rounds: Rounds, limit: float) -> Rounds:
    """``rounds`` with each kept again by ``limit`` (CPUs the rest of the host may use)."""
    kept = [
        not any(run.crowded(limit) for run in runs)
        for runs in zip(*(rounds.runs[role] for role in (COLD, WITHOUT, COPY)), strict=True)
    ]
    return attrs.evolve(rounds, kept=tuple(kept))


def aa_report(name: str, rounds: Rounds, sizes: Sequence[int]) -> list[str]:
    """The A/A control of a long tuning run: every round's ratio, and for each number of
    rounds in ``sizes`` the medians that runs of that many rounds would have printed."""
    ratios = rounds.ratios(COPY)
    spread = Spread.of(ratios)
    sigma = robust_sigma(ratios)
    lines = [
        f"  {name}: {len(ratios)} rounds; A/A per round: {spread}; robust sigma {sigma:.3f}"
    ]
    lines.append(f"    A/A median {spread.median:.3f} {median_interval(ratios)}")
    if rounds.orders:
        lines += place_lines(rounds)
    for size in sizes:
        medians = block_medians(ratios, size)
        worst = max((abs(m - 1) for m in medians), default=float("nan"))
        lines.append(
            f"    {size:3d} rounds: +-{median_error(sigma, size):.3f} (2 s.e. of the median); "
            f"{len(medians)} blocks, medians {' '.join(f'{m:.3f}' for m in medians)}  "
            f"(worst |median - 1| {worst:.3f})"
        )
    return lines


def place_effects(rounds: Rounds) -> list[tuple[int, Spread, Interval]]:
    """Per place in the round (0 first): each run's seconds over the mean of its round's three,
    their spread and the interval of their median.  On ``--aa-only`` rounds (every run the
    same code) a median off 1 is the place's own effect on a run."""
    places: dict[int, list[float]] = {}
    for index, order in enumerate(rounds.orders):
        seconds = {role: rounds.runs[role][index].seconds for role in order}
        mean = statistics.fmean(seconds.values())
        for place, role in enumerate(order):
            places.setdefault(place, []).append(seconds[role] / mean)
    return [(place, Spread.of(v), median_interval(v)) for place, v in sorted(places.items())]


def before_after(rounds: Rounds, role: str = COPY) -> tuple[list[float], list[float]]:
    """``role``'s ratios (:meth:`Rounds.ratios`) in the rounds where it ran before ``without``,
    and in those where it ran after it."""
    return _split(rounds, role, lambda place, without: place < without)


def place_lines(rounds: Rounds) -> list[str]:
    """:func:`place_effects` and :func:`before_after` of the A/A control, printed."""
    lines = [
        f"    place {place}: run / its round's mean: median {spread.median:.3f} {interval};  "
        f"{spread}"
        for place, spread, interval in place_effects(rounds)
    ]
    for name, ratios in zip(("before", "after"), before_after(rounds), strict=True):
        if ratios:
            lines.append(
                f"    A/A with copy {name} without: {len(ratios)} rounds, median "
                f"{statistics.median(ratios):.3f} {median_interval(ratios)}"
            )
    for name, ratios in zip(("adjacent to", "apart from"), adjacent_apart(rounds), strict=True):
        if len(ratios) > 1:
            lines.append(
                f"    A/A with copy {name} without: {len(ratios)} rounds, median "
                f"{statistics.median(ratios):.3f}, robust sigma {robust_sigma(ratios):.3f}"
            )
    return lines


def adjacent_apart(rounds: Rounds, role: str = COPY) -> tuple[list[float], list[float]]:
    """``role``'s ratios in the rounds where it ran next to ``without``, and in the others."""
    return _split(rounds, role, lambda place, without: abs(place - without) == 1)


def _split(
    rounds: Rounds, role: str, first: Callable[[int, int], bool]
) -> tuple[list[float], list[float]]:
    """``role``'s ratios in the rounds where ``first(its place, without's place)`` holds, and
    in the others."""
    chosen: list[float] = []
    others: list[float] = []
    for order, ratio in zip(rounds.orders, rounds.ratios(role), strict=True):
        (chosen if first(order.index(role), order.index(WITHOUT)) else others).append(ratio)
    return chosen, others


def robust_sigma(values: Sequence[float]) -> float:
    """The standard deviation of ``values`` estimated from their interquartile range (IQR /
    1.349, as for a normal sample), so that a few rounds hit by something else weigh little."""
    spread = Spread.of(values)
    return (spread.q3 - spread.q1) / 1.349


def median_error(sigma: float, rounds: int) -> float:
    """Twice the standard error of the median of ``rounds`` values of deviation ``sigma``
    (1.2533 sigma / sqrt(n) for a normal sample): about a 95% band around the true ratio."""
    return 2 * 1.2533 * sigma / math.sqrt(rounds)


def main(argv: Sequence[str] | None = None) -> int:
    """Print :func:`aa_report` for each format of each ``--pairs-json`` file given."""
    parser = argparse.ArgumentParser(description="A/A figures of bench_pack --pairs-json files")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--sizes", nargs="+", type=int, default=[5, 9, 15])
    parser.add_argument("--crowded", nargs="*", type=float, default=[],
                        help="also the rounds kept by each of these limits (CPUs of the rest)")
    args = parser.parse_args(argv)
    for file in args.files:
        data = json.loads(file.read_text())
        print(f"{file}: order {data['order']}, sync {data['sync']}, warm "
              f"{data.get('warm', 'run')}, quiet wait {data.get('quiet_wait', 5.0)} s, "
              f"aa-only {data.get('aa_only', False)}")
        for name, rounds in data["formats"].items():
            every = rounds_from_json(rounds)
            for line in aa_report(name, every, args.sizes):
                print(line)
            for limit in args.crowded:
                kept = recrowd(every, limit).judged()
                if kept.kept:
                    for line in aa_report(f"{name}, kept at {limit} CPUs", kept, args.sizes):
                        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

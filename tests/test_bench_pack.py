"""The benchmark's estimator of "no slower": rounds paired, not bests of different rounds."""

from __future__ import annotations

import pytest

from benchmarks.bench_pack import Result, paired_rate_ratio


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

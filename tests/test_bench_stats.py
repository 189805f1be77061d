"""benchmarks/bench_network's interval of the ratio of two additions (pure arithmetic, no root)."""

from __future__ import annotations

import random

from benchmarks.bench_network import _ratio_interval


def test_ratio_of_steady_additions_is_exact() -> None:
    assert _ratio_interval([1.0] * 20, [2.0] * 20) == (0.5, 0.5, 1.0)
    assert _ratio_interval([3.0] * 20, [2.0] * 20) == (1.5, 1.5, 0.0)


def test_a_denominator_that_is_not_positive_is_an_unbounded_ratio() -> None:
    low, high, within = _ratio_interval([1.0] * 10, [0.0] * 5 + [-1.0] * 5)
    assert (low, high, within) == (float("inf"), float("inf"), 0.0)


def test_noisy_rounds_give_an_interval_around_the_ratio_of_the_medians() -> None:
    rnd = random.Random(3)
    ours = [2.0 + rnd.gauss(0, 1.0) for _ in range(400)]
    theirs = [4.0 + rnd.gauss(0, 1.0) for _ in range(400)]
    low, high, within = _ratio_interval(ours, theirs)
    assert 0.35 < low < 0.5 < high < 0.65
    assert within == 1.0  # (no resample comes near 1.0)
    # The rounds are resampled together: the pairing is kept, not shuffled apart.
    assert _ratio_interval(ours, ours) == (1.0, 1.0, 1.0)

"""The benchmarks' own arithmetic (bench_network's interval of a ratio) and ab_start's A/B run."""

from __future__ import annotations

import random
import re
import subprocess
import sys

import pytest

from benchmarks.bench_network import _ratio_interval
from tests.conftest import REPO


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


@pytest.mark.root
def test_ab_start_compares_two_trees_and_leaves_nothing_behind() -> None:
    """benchmarks/ab_start.py, for real and short: git's HEAD against the working tree, each start
    after an nspawn run (systemd-nspawn installed by the benchmark where this machine has none)."""
    def sh(*cmd: str) -> str:
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout

    def ours() -> tuple[set[str], set[str], int]:
        links = {line.split()[0] for line in sh("ip", "-br", "link").splitlines() if line.startswith("mbab")}
        tables = {line for line in sh("nft", "list", "tables").splitlines() if "machined-mbab" in line}
        return links, tables, sh("mount").count("machined-bench")

    before = ours()
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ab_start.py"), "HEAD", ".", "--rounds", "3",
                          "--after-nspawn"],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    medians = re.findall(r"^[AB] \((HEAD|\.)\): mctl start --network bridge: ([\d.]+) ms \(median of 3\)$", out, re.M)
    assert [rev for rev, _ in medians] == ["HEAD", "."] and all(float(ms) > 0 for _, ms in medians), out
    assert re.search(r"^B - A, per round: [+-][\d.]+ ms \(95% interval [+-][\d.]+ to [+-][\d.]+\)$", out, re.M), out
    assert ours() == before

"""The confidence interval that scripts/bench.py reports for its median ratios (scripts/benchlib.py)."""

import math
import sys
from pathlib import Path

from scipy.stats import binom

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from benchlib import median_ci, paired_ratio  # noqa: E402


def test_median_ci_is_the_widest_order_statistic_pair_inside_the_confidence():
    for n in range(6, 40):
        xs = [float(i) for i in range(1, n + 1)]
        med, lo, hi = median_ci(xs[::-1])  # order of the input does not matter
        k = int(lo)
        assert hi == n + 1 - k and med == (n + 1) / 2
        assert 1 - 2 * binom.cdf(k - 1, n, 0.5) >= 0.95  # [x_k, x_(n-k+1)] covers the median
        assert 1 - 2 * binom.cdf(k, n, 0.5) < 0.95  # and one rank further in would not
    assert all(math.isnan(v) for v in median_ci([1.0, 2.0, 3.0, 4.0, 5.0])[1:])  # too few rounds


def test_paired_ratio_pairs_rounds():
    times = {"a": [2.0, 4.0, 6.0, 8.0, 10.0, 12.0], "b": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}
    assert paired_ratio(times, "a", "b") == (2.0, 2.0, 2.0)

"""scripts/bench_demo.py's precision_wide section at a tiny size (figures checked for presence and
consistency, not for their values), its flipped-pair count on hand-made scores, and its wiring into
scripts/bench.py."""

import sys
import types

import numpy as np
import pytest
from conftest import REPO, load_script

sys.path.insert(0, str(REPO / "scripts"))  # bench_demo imports benchlib as a sibling


@pytest.fixture(scope="module")
def demo():
    return load_script("scripts/bench_demo.py")


def test_flipped_pairs_by_hand(demo):
    # fp32: normal [0.1, 0.5], anomalous [0.4, 0.6]: orders (0.1, 0.4) +, (0.1, 0.6) +, (0.5, 0.4) -,
    # (0.5, 0.6) +; bf16 moves 0.4 to 0.5: (0.5, 0.5) is a tie, its own sign: one flip of four
    assert demo.flipped_pairs([0.1, 0.5], [0.4, 0.6], [0.1, 0.5], [0.5, 0.6]) == (1, 4)
    # a reversal (0.3, 0.2) - -> (0.3, 0.4) + and a tie that becomes an order (0.5, 0.5) 0 -> (0.5, 0.6) +
    assert demo.flipped_pairs([0.3, 0.5], [0.5, 0.2], [0.3, 0.5], [0.6, 0.4]) == (2, 4)
    # the same scores, and a monotone change of all of them: no flip
    assert demo.flipped_pairs([0.1, 0.5], [0.4, 0.6], [0.1, 0.5], [0.4, 0.6]) == (0, 4)
    assert demo.flipped_pairs([0.1, 0.5, 0.2], [0.4], [0.2, 0.9, 0.3], [0.8]) == (0, 3)
    # both become ties with one value everywhere: every strict order flips
    assert demo.flipped_pairs([0.1, 0.5], [0.4, 0.6], [0.5, 0.5], [0.5, 0.5]) == (4, 4)
    with pytest.raises(ValueError):
        demo.flipped_pairs([0.1], [0.4, 0.6], [0.1, 0.2], [0.4, 0.6])


def test_mean_t_interval(demo):
    mean, lo, hi = demo.mean_t_interval([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert hi - mean == pytest.approx(mean - lo)
    assert hi - mean == pytest.approx(4.302652729911275 * 1.0 / np.sqrt(3))  # t(0.975, 2) * s / sqrt(n)
    assert demo.mean_t_interval([0.5, 0.5]) == (0.5, 0.5, 0.5)
    one = demo.mean_t_interval([0.3])
    assert one[0] == 0.3 and np.isnan(one[1]) and np.isnan(one[2])


def test_precision_wide_tiny(demo):
    seeds, n_good, n_bad = (0, 1), 3, 4
    fig = demo.bench_precision_wide(epochs=1, seeds=seeds, n_test_good=n_good, n_test_bad=n_bad)
    keys = [
        "image_auroc_points",
        "image_auroc_points_mean",
        "image_auroc_points_ci95",
        "image_auroc_points_max_abs",
        "pixel_auroc_points_mean",
        "pro_zsad_points_mean",
        "flipped_pairs",
        "flipped_pairs_per_seed",
        "pairs",
        "flipped_fraction",
        "resolution_points",
        "max_map_diff",
        "max_score_diff",
        "mean_within_goal",
        "ci95_within_goal",
    ]
    assert all(f"bf16_wide_{k}" in fig for k in keys)
    diffs = fig["bf16_wide_image_auroc_points"]
    assert len(diffs) == len(seeds) and len(fig["bf16_wide_flipped_pairs_per_seed"]) == len(seeds)
    categories = 3  # set B: gravel, cat, rocket
    assert fig["bf16_wide_images_per_seed"] == categories * (n_good + n_bad)
    assert fig["bf16_wide_pairs"] == categories * n_good * n_bad * len(seeds)
    assert 0 <= fig["bf16_wide_flipped_pairs"] <= fig["bf16_wide_pairs"]
    assert fig["bf16_wide_flipped_pairs"] == sum(fig["bf16_wide_flipped_pairs_per_seed"])
    assert fig["bf16_wide_image_auroc_points_mean"] == pytest.approx(np.mean(diffs))
    assert fig["bf16_wide_image_auroc_points_max_abs"] == pytest.approx(max(abs(d) for d in diffs))
    lo, hi = fig["bf16_wide_image_auroc_points_ci95"]
    assert lo <= fig["bf16_wide_image_auroc_points_mean"] <= hi
    resolution = 100 / (n_good * n_bad * categories)
    assert fig["bf16_wide_resolution_points"] == pytest.approx(resolution)
    # a flipped pair moves its category's AUROC by at most one pair's share: |diff| <= flips * resolution
    for d, flips in zip(diffs, fig["bf16_wide_flipped_pairs_per_seed"]):
        assert abs(d) <= flips * resolution + 1e-9
    assert fig["bf16_wide_max_map_diff"] >= 0 and fig["bf16_wide_max_score_diff"] >= 0


def test_bench_registers_precision_wide(monkeypatch, capsys):
    bench = load_script("scripts/bench.py")
    assert "precision_wide" in bench.SECTIONS and "precision_wide" in bench.__doc__
    calls = []

    def fake(epochs, seeds):
        calls.append((epochs, seeds))
        return {"bf16_wide_image_auroc_points_mean": 0.0}

    monkeypatch.setitem(sys.modules, "bench_demo", types.SimpleNamespace(bench_precision_wide=fake))
    fig = bench.main(["--only", "precision_wide", "--precision-wide-seeds", "3", "--precision-epochs", "7"])
    assert calls == [(7, (0, 1, 2))] and fig["bf16_wide_image_auroc_points_mean"] == 0.0
    bench.main(["--only", "precision_wide"])
    assert calls[-1] == (30, (0, 1, 2, 3, 4))
    capsys.readouterr()

"""Image- and pixel-level AUROC / AP / F1-max against slow references, sklearn and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from feclip.metrics import f1_max, image_ap, image_auroc, pixel_ap, pixel_auroc, pixel_f1_max

# ----------------------------------------------------------------------------- slow, obvious references


def ref_auroc(y, s) -> float:
    """Probability that a random positive outscores a random negative, ties counting 1/2 (all pairs)."""
    y, s = np.asarray(y).ravel() > 0, np.asarray(s, dtype=np.float64).ravel()
    pos, neg = s[y], s[~y]
    wins = sum(float(p > n) + 0.5 * float(p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def ref_curve(y, s):
    """(tp, fp) at every distinct threshold t, highest first, predicting positive where s >= t."""
    y, s = np.asarray(y).ravel() > 0, np.asarray(s, dtype=np.float64).ravel()
    points = []
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        points.append((int(np.sum(pred & y)), int(np.sum(pred & ~y))))
    return points, int(y.sum())


def ref_ap(y, s) -> float:
    """AP by its definition: sum_k (R_k - R_{k-1}) P_k over the distinct thresholds, R_0 = 0."""
    points, n_pos = ref_curve(y, s)
    ap, prev_recall = 0.0, 0.0
    for tp, fp in points:
        recall = tp / n_pos
        ap += (recall - prev_recall) * (tp / (tp + fp))
        prev_recall = recall
    return ap


def ref_f1_max(y, s) -> float:
    """Best 2PR/(P+R) over the distinct thresholds."""
    points, n_pos = ref_curve(y, s)
    best = 0.0
    for tp, fp in points:
        if tp:
            p, r = tp / (tp + fp), tp / n_pos
            best = max(best, 2 * p * r / (p + r))
    return best


def sk_f1_max(y, s) -> float:
    p, r, _ = precision_recall_curve(np.ravel(y) > 0, np.ravel(s))
    with np.errstate(divide="ignore", invalid="ignore"):
        f = 2 * p * r / (p + r)
    return float(np.max(f[np.isfinite(f)]))


def random_case(rng, n, ties: bool):
    y = rng.random(n) < rng.uniform(0.1, 0.9)
    y[0], y[1] = True, False  # both classes present
    s = rng.integers(0, 6, n).astype(np.float32) / 5 if ties else rng.random(n).astype(np.float32)
    return y, s


# ----------------------------------------------------------------------------- image level


@pytest.mark.parametrize("ties", [False, True])
def test_image_metrics_match_slow_reference_and_sklearn(ties):
    rng = np.random.default_rng(1 + ties)
    for _ in range(30):
        y, s = random_case(rng, int(rng.integers(2, 40)), ties)
        assert image_auroc(y, s) == pytest.approx(ref_auroc(y, s), abs=1e-12)
        assert image_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert image_ap(y, s) == pytest.approx(ref_ap(y, s), abs=1e-12)
        assert image_ap(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert f1_max(y, s) == pytest.approx(ref_f1_max(y, s), abs=1e-12)
        assert f1_max(y, s) == pytest.approx(sk_f1_max(y, s), abs=1e-12)


def test_image_metrics_hand_computed():
    labels = [0, 0, 1, 1]
    scores = [0.1, 0.4, 0.35, 0.8]
    # Pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3 of 4.
    assert image_auroc(labels, scores) == 0.75
    # Thresholds 0.8: P=1, R=1/2; 0.4: R unchanged; 0.35: P=2/3, R=1 -> 1/2*1 + 1/2*2/3 = 5/6.
    assert image_ap(labels, scores) == pytest.approx(5 / 6, abs=1e-15)
    # F1 = 2tp/(tp+fp+P): at 0.8 -> 2/3, at 0.4 -> 2/4, at 0.35 -> 4/5.
    assert f1_max(labels, scores) == pytest.approx(0.8, abs=1e-15)


def test_image_metrics_ties_hand_computed():
    labels = [1, 0, 1, 0]
    scores = [0.5, 0.5, 0.5, 0.2]
    # Each positive ties the 0.5 negative (1/2) and beats the 0.2 negative (1): 2 * 1.5 / (2 * 2).
    assert image_auroc(labels, scores) == 0.75
    # One threshold group at 0.5 holds both positives and one negative: P = 2/3 at R = 1.
    assert image_ap(labels, scores) == pytest.approx(2 / 3, abs=1e-15)
    # At 0.5: 2*2 / (2 + 1 + 2) = 0.8; at 0.2: 2*2 / (2 + 2 + 2) = 2/3.
    assert f1_max(labels, scores) == pytest.approx(0.8, abs=1e-15)


def test_image_metrics_perfect_and_inverted():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert image_auroc(labels, scores) == 1.0
    assert image_ap(labels, scores) == 1.0
    assert f1_max(labels, scores) == 1.0
    # Inverted: every positive below every negative -> AUROC 0; AP: the positives come last, at
    # recall 1/2 precision 1/4 and recall 1 precision 2/5 -> (1/4 + 2/5) / 2 = 0.325.
    assert image_auroc(labels, -scores) == 0.0
    assert image_ap(labels, -scores) == pytest.approx(0.325, abs=1e-15)
    # Constant scores: AUROC 1/2, AP = prevalence 2/5, F1 = 2*2/(2+3+2) = 4/7.
    const = np.full(5, 0.3)
    assert image_auroc(labels, const) == 0.5
    assert image_ap(labels, const) == pytest.approx(0.4, abs=1e-15)
    assert f1_max(labels, const) == pytest.approx(4 / 7, abs=1e-15)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1], []])
def test_single_class_gives_nan_for_every_metric(labels):
    scores = np.linspace(0, 1, len(labels))
    for fn in (image_auroc, image_ap, f1_max):
        assert math.isnan(fn(labels, scores))
    masks = np.array(labels, dtype=np.uint8).reshape(-1, 1, 1) if labels else np.zeros((0, 2, 2))
    maps = scores.reshape(-1, 1, 1) if labels else np.zeros((0, 2, 2))
    for fn in (pixel_auroc, pixel_ap, pixel_f1_max):
        assert math.isnan(fn(masks, maps))


def test_image_inputs_torch_and_label_encodings():
    rng = np.random.default_rng(3)
    y, s = random_case(rng, 25, ties=True)
    expected = image_auroc(y, s)
    assert image_auroc(torch.from_numpy(y.astype(np.int64)), torch.from_numpy(s)) == expected
    assert image_auroc(torch.from_numpy(y), torch.from_numpy(s).to(torch.bfloat16)) == image_auroc(
        y, torch.from_numpy(s).to(torch.bfloat16).float().numpy()
    )
    assert image_auroc(np.where(y, 1, -1), s) == expected  # {-1, 1} labels
    assert image_ap(y.astype(np.float32), s.astype(np.float16)) == image_ap(
        y, s.astype(np.float16).astype(np.float32)
    )


def test_image_input_errors():
    with pytest.raises(ValueError, match="same shape"):
        image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="1-D"):
        image_auroc(np.zeros((2, 2)), np.zeros((2, 2)))


# ----------------------------------------------------------------------------- pixel level


def random_pixels(rng, n=6, h=12, w=10, levels=None, dtype=np.float32):
    masks = np.zeros((n, h, w), dtype=np.uint8)
    for i in range(0, n, 2):  # every other image normal (all-zero mask)
        y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
        masks[i, y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = 255
    maps = rng.random((n, h, w)) + 0.6 * (masks > 0)
    if levels:
        maps = np.round(maps * levels) / levels
    return masks, maps.astype(dtype)


@pytest.mark.parametrize("levels", [None, 8])
def test_pixel_metrics_match_sklearn_with_ties(levels):
    rng = np.random.default_rng(10 + (levels or 0))
    for _ in range(5):
        masks, maps = random_pixels(rng, levels=levels)
        y, s = masks.ravel() > 0, maps.ravel()
        assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert pixel_ap(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert pixel_f1_max(masks, maps) == pytest.approx(sk_f1_max(y, s), abs=1e-12)


def test_pixel_metrics_match_slow_reference():
    rng = np.random.default_rng(5)
    masks, maps = random_pixels(rng, n=4, h=6, w=5, levels=5)
    assert pixel_auroc(masks, maps) == pytest.approx(ref_auroc(masks, maps), abs=1e-12)
    assert pixel_ap(masks, maps) == pytest.approx(ref_ap(masks, maps), abs=1e-12)
    assert pixel_f1_max(masks, maps) == pytest.approx(ref_f1_max(masks, maps), abs=1e-12)


def test_pixel_metrics_hand_computed():
    # One 1x4 image, anomalous pixels 0.9 and 0.4, normal pixels 0.5 and 0.1.
    masks = np.array([[[1, 1, 0, 0]]])
    maps = np.array([[[0.9, 0.4, 0.5, 0.1]]], dtype=np.float32)
    # Pairs: 0.9 beats both, 0.4 beats 0.1 only -> 3/4.
    assert pixel_auroc(masks, maps) == 0.75
    # 0.9: P=1 at R=1/2; 0.4: P=2/3 at R=1 -> 1/2 + 1/3 = 5/6.
    assert pixel_ap(masks, maps) == pytest.approx(5 / 6, abs=1e-15)
    # F1 at 0.9: 2/(1+0+2) = 2/3; at 0.4: 4/(2+1+2) = 4/5.
    assert pixel_f1_max(masks, maps) == pytest.approx(0.8, abs=1e-15)
    # A normal image (all-zero mask) with maps 0.45 adds 4 normal pixels between the two positives:
    # 0.9 beats 6 normals, 0.4 beats 1 -> 7/12.
    masks2 = np.concatenate([np.zeros((1, 1, 4)), masks])
    maps2 = np.concatenate([np.full((1, 1, 4), 0.45, dtype=np.float32), maps])
    assert pixel_auroc(masks2, maps2) == pytest.approx(7 / 12, abs=1e-15)


def test_pixel_perfect_and_inverted():
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[0, 2:5, 2:5] = True
    maps = masks.astype(np.float32) * 0.5 + 0.25
    assert pixel_auroc(masks, maps) == 1.0
    assert pixel_ap(masks, maps) == 1.0
    assert pixel_f1_max(masks, maps) == 1.0
    assert pixel_auroc(masks, -maps) == 0.0


def test_pixel_strictly_increasing_transform_invariance():
    rng = np.random.default_rng(7)
    masks, maps = random_pixels(rng, levels=16)
    transformed = maps.astype(np.float64) ** 3 + maps.astype(np.float64)
    assert pixel_auroc(masks, transformed) == pixel_auroc(masks, maps)
    assert pixel_ap(masks, np.exp(transformed)) == pixel_ap(masks, maps)
    assert pixel_f1_max(masks, transformed) == pixel_f1_max(masks, maps)


def test_pixel_float16_equals_float32_and_mask_encodings():
    rng = np.random.default_rng(8)
    masks, maps16 = random_pixels(rng, dtype=np.float16)
    maps32 = maps16.astype(np.float32)
    for fn in (pixel_auroc, pixel_ap, pixel_f1_max):
        expected = fn(masks, maps32)
        assert fn(masks, maps16) == expected
        assert fn(masks > 0, maps16) == expected
        assert fn((masks > 0).astype(np.float32), maps32) == expected
        assert fn(torch.from_numpy(masks), torch.from_numpy(maps16)) == expected


def test_pixel_input_errors():
    with pytest.raises(ValueError, match="same shape"):
        pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    maps = np.zeros((1, 2, 2))
    maps[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        pixel_auroc(np.ones((1, 2, 2)), maps)

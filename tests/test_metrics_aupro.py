"""AUPRO (exact and zsad) against brute-force references, hand-computed cases and properties."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from skimage.measure import label
from sklearn.metrics import auc

from feclip.errors import ConfigError
from feclip.metrics import aupro, pixel_auroc
from feclip.metrics.aupro import zsad_thresholds

# The package re-exports the function `aupro`, which hides the submodule attribute of the same name.
aupro_module = importlib.import_module("feclip.metrics.aupro")

# ----------------------------------------------------------------------------- slow, obvious references


def regions_of(masks):
    """[(image index, boolean region mask)] for every 8-connected region of every image."""
    out = []
    for i, m in enumerate(np.asarray(masks) > 0):
        lab, n = label(m, connectivity=2, return_num=True)
        out.extend((i, lab == r) for r in range(1, n + 1))
    return out


def pro_and_fpr(masks, binary, regions):
    """PRO (mean over regions of the covered fraction) and FPR of one binary prediction."""
    gt = np.asarray(masks) > 0
    pro = np.mean([binary[i][r].sum() / r.sum() for i, r in regions])
    fpr = np.logical_and(binary, ~gt).sum() / (~gt).sum()
    return pro, fpr


def ref_aupro_exact(masks, maps, fpr_limit=0.3):
    """Brute force: a curve point at every distinct score t (positive where map >= t), per-region loops,
    (0, 0) prepended, cut at the limit with np.interp, trapezoid, divided by the limit."""
    maps = np.asarray(maps, dtype=np.float64)
    regions = regions_of(masks)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pro, fpr = pro_and_fpr(masks, maps >= t, regions)
        fprs.append(fpr)
        pros.append(pro)
    fprs, pros = np.array(fprs), np.array(pros)
    inside = fprs <= fpr_limit
    x = np.append(fprs[inside], fpr_limit)
    y = np.append(pros[inside], np.interp(fpr_limit, fprs, pros))
    return np.trapezoid(y, x) / fpr_limit


def ref_aupro_zsad(masks, maps, fpr_limit=0.3):
    """The cal_pro_score loop, literally: 200 arange thresholds, map > th, strict FPR < limit, rescale."""
    regions = regions_of(masks)
    lo, hi = maps.min(), maps.max()
    pros, fprs = [], []
    for th in np.arange(lo, hi, (hi - lo) / 200):
        pro, fpr = pro_and_fpr(masks, maps > th, regions)
        pros.append(pro)
        fprs.append(fpr)
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < fpr_limit
    f = fprs[keep]
    f = (f - f.min()) / (f.max() - f.min())
    return auc(f, pros[keep])


def random_category(rng, n=6, size=12, levels=None, dtype=np.float32, noise=1.0):
    """Masks with 1-3 rectangles/specks on every other image, maps = noise + signal on the defects."""
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(0, n, 2):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 2, 2)
            masks[i, y : y + rng.integers(1, 5), x : x + rng.integers(1, 5)] = 1
    maps = noise * rng.random((n, size, size)) + 0.7 * masks
    if levels:
        maps = np.round(maps * levels) / levels
    return masks, maps.astype(dtype)


# ----------------------------------------------------------------------------- against the references


@pytest.mark.parametrize("levels", [None, 6])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_exact_matches_brute_force(levels, fpr_limit):
    rng = np.random.default_rng(100 + (levels or 0))
    for _ in range(3):
        masks, maps = random_category(rng, n=4, size=8, levels=levels)
        expected = ref_aupro_exact(masks, maps, fpr_limit)
        assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("levels", [None, 40])
def test_zsad_matches_literal_loop(levels):
    rng = np.random.default_rng(200 + (levels or 0))
    for fpr_limit in (0.3, 0.6):
        masks, maps = random_category(rng, n=6, size=10, levels=levels)
        expected = ref_aupro_zsad(masks, maps, fpr_limit)
        assert aupro(masks, maps, fpr_limit=fpr_limit, method="zsad") == pytest.approx(expected, abs=1e-12)


def test_zsad_many_regions_blocked_histogram(monkeypatch):
    # Isolated single pixels on a stride-2 grid: 8-connectivity keeps them apart -> 36 regions per image.
    rng = np.random.default_rng(300)
    masks = np.zeros((3, 12, 12), dtype=np.uint8)
    masks[:2, ::2, ::2] = 1
    maps = (rng.random(masks.shape) + 0.5 * masks).astype(np.float32)
    expected = ref_aupro_zsad(masks, maps)
    whole = aupro(masks, maps, method="zsad")
    monkeypatch.setattr(aupro_module, "_MAX_HIST_CELLS", 5 * 201)  # force blocks of 5 regions
    assert aupro(masks, maps, method="zsad") == pytest.approx(expected, abs=1e-12)
    assert whole == pytest.approx(expected, abs=1e-12)
    assert aupro(masks, maps) == pytest.approx(ref_aupro_exact(masks, maps), abs=1e-12)


def test_zsad_threshold_count_follows_numpy_arange():
    # numpy computes the arange length as ceil((hi - lo) / step) in the scalars' type (float32 here):
    # for (0, 1) the float32 step 0.005 gives exactly 200, but for this pair the rounded step is
    # short and the quotient exceeds 200, so there are 201 thresholds (a case from a random search).
    lo, hi = np.float32(0.8132702), np.float32(0.91275555)
    assert len(zsad_thresholds(0.0, 1.0)) == 200
    assert len(zsad_thresholds(lo, hi)) == 201
    # float16 and float32 bounds give the float32 grid.
    assert np.array_equal(
        zsad_thresholds(np.float16(0.25), np.float16(0.75), np.float16), zsad_thresholds(0.25, 0.75)
    )
    # The fast path and the literal loop agree on a category whose min/max are exactly this pair.
    rng = np.random.default_rng(301)
    masks, maps = random_category(rng, n=4, size=10)
    maps = (lo + (hi - lo) * (maps - maps.min()) / (maps.max() - maps.min())).astype(np.float32)
    maps.flat[np.argmin(maps)], maps.flat[np.argmax(maps)] = lo, hi
    assert aupro(masks, maps, method="zsad") == pytest.approx(ref_aupro_zsad(masks, maps), abs=1e-12)


# ----------------------------------------------------------------------------- hand-computed cases


def test_one_region_hand_computed():
    # One 1x4 image: region {0.9, 0.4} (area 2), normal pixels 0.5 and 0.1 (N_neg = 2).
    # Curve (FPR, PRO): (0,0) -> (0,1/2) [0.9] -> (1/2,1/2) [0.5] -> (1/2,1) [0.4] -> (1,1) [0.1].
    masks = np.array([[[1, 1, 0, 0]]])
    maps = np.array([[[0.9, 0.4, 0.5, 0.1]]], dtype=np.float32)
    # Up to 0.3 the PRO is 1/2: area 0.15, / 0.3 = 0.5.
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-15)
    # Up to 1: 1/2 * 1/2 + 1/2 * 1 = 0.75.
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.75, abs=1e-15)
    # A normal image of four 0.2 pixels: N_neg = 6, curve (0,1/2) -> (1/6,1/2) -> (1/6,1) -> (5/6,1) -> (1,1);
    # area to 0.3 = 1/6 * 1/2 + (0.3 - 1/6) * 1 = 13/60, / 0.3 = 13/18.
    masks2 = np.concatenate([masks, np.zeros((1, 1, 4))])
    maps2 = np.concatenate([maps, np.full((1, 1, 4), 0.2, dtype=np.float32)])
    assert aupro(masks2, maps2) == pytest.approx(13 / 18, abs=1e-15)


def test_zsad_and_exact_hand_computed():
    # A 2x5 image: region {1.0, 0.4975} (area 2); normal pixels 0.7975, 0.1975 and six 0.0.
    masks = np.zeros((1, 2, 5))
    masks[0, 0, :2] = 1
    maps = np.zeros((1, 2, 5), dtype=np.float32)
    maps[0, 0, :4] = [1.0, 0.4975, 0.1975, 0.7975]
    # zsad: thresholds k * d, d = float32(0.005), k = 0..199 (200 of them). A score s is above the
    # thresholds k < s / d: 0.4975 -> k <= 99, 0.1975 -> k <= 39, 0.7975 -> k <= 159, 1.0 -> all.
    # FPR = 2/8 (k <= 39), 1/8 (k <= 159), 0 after; PRO = 1 (k <= 99), 1/2 after. All FPR < 0.3 are
    # kept and rescaled by 1/4 -> points (1,1) x40, (1/2,1) x60, (1/2,1/2) x60, (0,1/2) x40:
    # area = 1/2 * 1 + 0 + 1/2 * 1/2 = 0.75.
    assert aupro(masks, maps, method="zsad") == pytest.approx(0.75, abs=1e-15)
    # exact: (0,0) -> (0,1/2) [1.0] -> (1/8,1/2) [0.7975] -> (1/8,1) [0.4975] -> (2/8,1) -> (1,1);
    # area to 0.3 = 1/8 * 1/2 + (0.3 - 1/8) * 1 = 0.2375, / 0.3 = 19/24.
    assert aupro(masks, maps) == pytest.approx(19 / 24, abs=1e-15)


def test_regions_are_8_connected_and_weigh_the_same():
    # 3x4 image. Region A = (0,0), (0,1), (1,2): (0,1)-(1,2) touch diagonally, so 8-connectivity
    # joins them (area 3). Region B = (2,0) (area 1). N_neg = 8.
    masks = np.zeros((1, 3, 4), dtype=np.uint8)
    masks[0, 0, 0] = masks[0, 0, 1] = masks[0, 1, 2] = masks[0, 2, 0] = 1
    maps = np.full((1, 3, 4), 0.05, dtype=np.float32)
    maps[0, 0, 0], maps[0, 2, 0], maps[0, 1, 2], maps[0, 0, 1] = 0.9, 0.8, 0.7, 0.1
    maps[0, 0, 2] = 0.75  # one normal pixel between the regions' scores
    # Each region weighs 1/2: A's pixels 1/6 each, B's pixel 1/2. Curve: (0,1/6) [0.9] -> (0,2/3) [0.8]
    # -> (1/8,2/3) [0.75] -> (1/8,5/6) [0.7] -> (1/8,1) [0.1] -> (1,1).
    # Area to 0.3 = 1/8 * 2/3 + (0.3 - 1/8) * 1 = 31/120, / 0.3 = 31/36.
    # (4-connectivity would split A in two and give 19/24.)
    assert aupro(masks, maps) == pytest.approx(31 / 36, abs=1e-15)


def test_many_tiny_regions_weigh_like_one_big_one():
    # Image 0: one 2x2 region; image 1: four isolated pixels (stride 2) -> 5 regions in all.
    masks = np.zeros((2, 4, 4), dtype=np.uint8)
    masks[0, :2, :2] = 1
    masks[1, ::2, ::2] = 1
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    maps[0][masks[0] > 0] = 0.9  # the big region, fully above everything
    maps[1, 0, 0] = 0.8  # one of the four specks above the normal pixels
    maps[1, 1, 1] = 0.5  # a normal pixel (1 of N_neg = 24), above the three other specks (0.0)
    # PRO: 1/5 after 0.9 (the big region is 1 region of 5), 2/5 after 0.8; FPR 1/24 after 0.5; the
    # other three specks tie with the 23 remaining normal pixels at 0.0, where the curve goes
    # diagonally from (1/24, 2/5) to (1, 1).
    # Area to 0.3: 1/24 * 2/5 + (0.3 - 1/24) * (2/5 + PRO(0.3)) / 2, PRO(0.3) = 2/5 + 3/5 * (0.3 - 1/24) / (23/24).
    pro_lim = 2 / 5 + 3 / 5 * (0.3 - 1 / 24) / (23 / 24)
    expected = (1 / 24 * 2 / 5 + (0.3 - 1 / 24) * (2 / 5 + pro_lim) / 2) / 0.3
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-14)
    assert aupro(masks, maps) == pytest.approx(ref_aupro_exact(masks, maps), abs=1e-14)


def test_perfect_and_inverted_maps():
    rng = np.random.default_rng(400)
    masks, _ = random_category(rng, n=4, size=10)
    gt = masks > 0
    # Normal pixels spread over [0, 0.5], anomalous ones over [0.6, 1].
    maps = np.where(gt, 0.6 + 0.4 * rng.random(gt.shape), 0.5 * rng.random(gt.shape)).astype(np.float32)
    assert aupro(masks, maps) == 1.0
    # zsad: PRO = 1 wherever FPR > 0 (thresholds below 0.5); the FPR = 0 points only add width 0.
    assert aupro(masks, maps, method="zsad") == pytest.approx(1.0, abs=1e-12)
    # Inverted: no anomalous pixel above any normal one below FPR 1 -> PRO 0 up to the limit.
    assert aupro(masks, -maps) == 0.0
    assert aupro(masks, -maps, method="zsad") == 0.0


# ----------------------------------------------------------------------------- undefined cases (nan)


@pytest.mark.parametrize("method", ["exact", "zsad"])
def test_category_without_anomalies_is_nan(method):
    rng = np.random.default_rng(500)
    maps = rng.random((3, 8, 8)).astype(np.float32)
    assert math.isnan(aupro(np.zeros((3, 8, 8)), maps, method=method))
    # Every pixel anomalous: no normal pixel, FPR undefined.
    assert math.isnan(aupro(np.ones((3, 8, 8)), maps, method=method))
    assert math.isnan(aupro(np.zeros((0, 8, 8)), np.zeros((0, 8, 8)), method=method))


def test_zsad_degenerate_cases_are_nan():
    masks = np.zeros((1, 4, 4), dtype=np.uint8)
    masks[0, 1:3, 1:3] = 1
    # Constant maps: the threshold step is 0 (the loop's arange fails). exact is defined: the curve is
    # the diagonal (0,0) -> (1,1), area to 0.3 = 0.045, / 0.3 = 0.15.
    const = np.full((1, 4, 4), 0.5, dtype=np.float32)
    assert math.isnan(aupro(masks, const, method="zsad"))
    assert aupro(masks, const) == pytest.approx(0.15, abs=1e-15)
    # Two-valued perfect map: FPR = 0 at every threshold -> all kept FPRs equal (loop divides 0 by 0).
    two = masks.astype(np.float32)
    assert math.isnan(aupro(masks, two, method="zsad"))
    assert aupro(masks, two) == 1.0
    # Fewer than 2 thresholds below the FPR limit: every normal pixel but one sits at the maximum.
    few = np.ones((1, 4, 4), dtype=np.float32)
    few[0, 0, 0] = 0.0
    few[0, 1:3, 1:3] = 0.5
    assert math.isnan(aupro(masks, few, method="zsad"))


# ----------------------------------------------------------------------------- properties


def test_strictly_increasing_transform_leaves_exact_aupro_unchanged():
    rng = np.random.default_rng(600)
    for levels in (None, 10):
        masks, maps = random_category(rng, n=6, size=16, levels=levels)
        base = aupro(masks, maps)
        m64 = maps.astype(np.float64)
        assert aupro(masks, m64**3 + m64) == pytest.approx(base, abs=1e-14)
        assert aupro(masks, np.exp(3 * m64)) == pytest.approx(base, abs=1e-14)
        assert pixel_auroc(masks, np.exp(3 * m64)) == pixel_auroc(masks, maps)


def test_normal_images_act_only_through_the_fpr():
    rng = np.random.default_rng(700)
    masks, maps = random_category(rng, n=6, size=16)
    gt = masks > 0
    n_neg = int((~gt).sum())
    base = aupro(masks, maps)
    # Normal images scoring below every existing pixel add N_add normal pixels at the bottom: every
    # existing curve point keeps its PRO and has its FPR scaled by c = n_neg / (n_neg + N_add), so the
    # new curve up to 0.3 is the old one up to 0.3 / c, squeezed: AUPRO_new(0.3) = AUPRO_old(0.3 / c).
    low = np.full((2, 16, 16), maps.min() - 1.0, dtype=np.float32)
    more_masks = np.concatenate([masks, np.zeros_like(low, dtype=np.uint8)])
    more_maps = np.concatenate([maps, low])
    c = n_neg / (n_neg + low.size)
    assert aupro(more_masks, more_maps) == pytest.approx(aupro(masks, maps, fpr_limit=0.3 / c), abs=1e-12)
    assert aupro(more_masks, more_maps) > base
    # Normal images scoring above everything push the whole curve right: strictly lower AUPRO.
    high = np.full((2, 16, 16), maps.max() + 1.0, dtype=np.float32)
    assert aupro(more_masks, np.concatenate([maps, high])) < base
    # The PRO side is untouched: with the limit at 1 and low normals, only the FPR axis is squeezed,
    # so AUPRO(1) = c * AUPRO_old(1) + (1 - c) * 1 (the added stretch runs at PRO = 1).
    assert aupro(more_masks, more_maps, fpr_limit=1.0) == pytest.approx(
        c * aupro(masks, maps, fpr_limit=1.0) + (1 - c), abs=1e-12
    )


@pytest.mark.parametrize("method", ["exact", "zsad"])
def test_float16_equals_float32_and_torch(method):
    rng = np.random.default_rng(800)
    masks, maps16 = random_category(rng, n=6, size=12, dtype=np.float16)
    maps32 = maps16.astype(np.float32)
    expected = aupro(masks, maps32, method=method)
    assert aupro(masks, maps16, method=method) == expected
    assert aupro(torch.from_numpy(masks), torch.from_numpy(maps16), method=method) == expected
    assert aupro(masks.astype(bool), maps32, method=method) == expected
    assert aupro((masks * 255).astype(np.float64), maps32, method=method) == expected


def test_single_image_2d_input():
    rng = np.random.default_rng(900)
    masks, maps = random_category(rng, n=2, size=10)
    assert aupro(masks[0], maps[0]) == aupro(masks[:1], maps[:1])


def test_bad_options_raise_config_error():
    masks, maps = np.zeros((1, 4, 4)), np.zeros((1, 4, 4))
    with pytest.raises(ConfigError, match="method must be one of 'exact', 'zsad'"):
        aupro(masks, maps, method="anomalib")
    for bad in (0.0, 1.5, -0.1, "x", None):
        with pytest.raises(ConfigError, match=r"fpr_limit must be a number in \(0, 1\]"):
            aupro(masks, maps, fpr_limit=bad)
    with pytest.raises(ValueError, match="same shape"):
        aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        aupro(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 4, 4)))

"""Pictures: overlays, PNG writing, the curves against slow references, the category figures."""

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from feclip.viz import (
    category_montage,
    overlay,
    plot_roc_pro,
    pro_points,
    rank_cases,
    roc_points,
    save_category_figures,
    save_png,
)


def auc(x, y):
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


@pytest.fixture()
def category():
    """Six 40x48 images: three anomalous with square defects (the map finds the first best)."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(6)]
    masks = [np.zeros((40, 48), np.uint8) for _ in range(6)]
    masks[1][5:15, 5:15] = 1
    masks[2][20:30, 30:40] = 1
    masks[3][0:4, 0:4] = 1
    masks[3][30:38, 10:14] = 1
    noise = [rng.random((40, 48)) for _ in range(6)]
    maps = [n + m * w for n, m, w in zip(noise, masks, [0, 2.0, 0.6, 0.1, 0, 0])]
    return images, masks, maps, np.array([0.1, 0.9, 0.6, 0.4, 0.2, 0.3]), np.array([0, 1, 1, 1, 0, 0])


def test_overlay_blends_a_jet_map():
    image = np.full((5, 7, 3), 100, np.uint8)
    amap = np.tile(np.linspace(0, 1, 7), (5, 1))
    out = overlay(image, amap, alpha=0.5)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    assert np.array_equal(overlay(image, amap, alpha=0.0), image)
    full = overlay(image, amap, alpha=1.0)
    assert full[0, 0, 2] > full[0, 0, 0]  # low values are blue
    assert full[0, -1, 0] > full[0, -1, 2]  # high values are red
    # values outside [vmin, vmax] are clipped: everything at or below vmin shows the lowest colour
    clipped = overlay(image, amap, alpha=1.0, vmin=0.5, vmax=1.0)
    assert np.array_equal(clipped[:, 0], clipped[:, 2])
    with pytest.raises(ValueError, match="differs"):
        overlay(image, amap[:, :3])


def test_save_png_is_atomic_and_writes_bool_as_0_255(tmp_path):
    path = save_png(tmp_path / "a" / "m.png", np.eye(4, dtype=bool))
    assert np.array_equal(np.asarray(Image.open(path)), np.eye(4, dtype=np.uint8) * 255)
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert np.array_equal(np.asarray(Image.open(save_png(tmp_path / "c.png", rgb))), rgb)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["c.png", "m.png"]
    with pytest.raises(ValueError):
        save_png(tmp_path / "f.png", np.zeros((2, 2), np.float32))


def test_roc_points_match_sklearn_with_ties():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 500)
    scores = rng.random(500).round(1) + labels * 0.2
    fpr, tpr = roc_points(labels, scores)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert auc(fpr, tpr) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert roc_points(np.ones(3), np.arange(3)) is None


def brute_force_pro(masks, maps, t):
    from skimage.measure import label

    overlaps, false_pos, normal = [], 0, 0
    for m, a in zip(masks, maps):
        regions = label(m > 0, connectivity=2)
        overlaps += [(a[regions == r] >= t).mean() for r in range(1, regions.max() + 1)]
        false_pos += ((a >= t) & (m == 0)).sum()
        normal += (m == 0).sum()
    return false_pos / normal, float(np.mean(overlaps))


def test_pro_curve_matches_a_threshold_by_threshold_reference(category):
    _, masks, maps, _, _ = category
    fpr, pro = pro_points(masks, maps, fpr_limit=0.3)
    assert fpr[-1] == pytest.approx(0.3) and np.all(np.diff(fpr) >= 0)
    for t in (1.5, 1.0, 0.9, 0.8):
        f, p = brute_force_pro(masks, maps, t)
        assert f <= 0.3
        # every threshold's (FPR, PRO) pair is a point of the exact curve
        assert np.any(np.isclose(fpr, f, atol=1e-12) & np.isclose(pro, p, atol=1e-12))
    assert pro_points([np.zeros((3, 3))], [np.zeros((3, 3))]) is None


def test_ranking_by_per_image_pixel_auroc(category):
    _, masks, maps, scores, labels = category
    ranked, notes = rank_cases(labels, scores, masks, maps)
    assert ranked[0] == 1 and ranked[-1] == 3 and set(ranked) == {1, 2, 3}
    assert notes[1].startswith("pixel AUROC")
    # without pixel ground truth: agreement of the min-max-scaled score with the label
    # (normal: 1 - scaled = 1, .875, .75 for images 0, 4, 5; anomalous: 1, .625, .375 for 1, 2, 3)
    ranked, notes = rank_cases(labels, scores)
    assert ranked == [0, 1, 4, 5, 2, 3]
    assert notes[0] == "normal" and notes[3] == "anomalous"


def nonblank(path):
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    return arr.std() > 0


def test_category_figures_exist_and_are_not_blank(category, tmp_path):
    images, masks, maps, scores, labels = category
    paths = save_category_figures(tmp_path, "metal nut/1", images, masks, maps, scores, labels)
    assert paths["montage"] == tmp_path / "figures" / "metal_nut_1_montage.png"
    assert paths["curves"] == tmp_path / "figures" / "metal_nut_1_curves.png"
    assert all(nonblank(p) for p in paths.values())
    # an image-level category (no masks) still gets both figures
    paths = save_category_figures(tmp_path, "brain", images, None, maps, scores, labels)
    assert all(nonblank(p) for p in paths.values())


def test_montage_rows_and_curves_accept_stacks(category, tmp_path):
    images, masks, maps, scores, labels = category
    path = category_montage(
        np.stack(images),
        np.stack(masks),
        np.stack(maps),
        scores,
        labels,
        tmp_path / "m.png",
        n_best=1,
        n_worst=1,
    )
    two_rows = Image.open(path).size
    path = category_montage(images, masks, maps, scores, labels, tmp_path / "m3.png", n_best=2, n_worst=1)
    assert Image.open(path).size[1] > two_rows[1]  # one more row
    assert nonblank(plot_roc_pro(labels, scores, np.stack(masks), np.stack(maps), tmp_path / "c.png"))

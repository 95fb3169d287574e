"""Pictures: overlays, PNG writing, the curves (the metrics' own, against slow references), the montage
cases and their aspect ratios, the category figures."""

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import roc_auc_score

from feclip.metrics import aupro, image_auroc, pixel_auroc, pro_curve, roc_curve
from feclip.viz import (
    category_montage,
    montage_cases,
    montage_figure,
    overlay,
    overlay_figure,
    plot_roc_pro,
    pro_points,
    rank_cases,
    roc_points,
    roc_pro_figure,
    save_category_figures,
    save_figure,
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


def brute_force_roc(labels, scores):
    """(FPR, TPR) of ``score >= t`` for every distinct score t, by counting."""
    labels, scores = np.asarray(labels) > 0, np.asarray(scores, dtype=np.float64)
    return {
        (
            float(np.sum(~labels & (scores >= t)) / np.sum(~labels)),
            float(np.sum(labels & (scores >= t)) / labels.sum()),
        )
        for t in np.unique(scores)
    }


def on_polyline(xs, ys, x, y, tol=1e-12):
    """Whether (x, y) lies on one of the segments joining consecutive points (xs[i], ys[i])."""
    for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], ys[:-1], ys[1:]):
        if x0 - tol <= x <= x1 + tol and min(y0, y1) - tol <= y <= max(y0, y1) + tol:
            if abs((x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)) <= tol:
                return True
    return False


def pairwise_auroc(labels, scores):
    """P(anomalous score > normal score) + 1/2 P(tie), over all pairs."""
    labels, scores = np.asarray(labels) > 0, np.asarray(scores, dtype=np.float64)
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def test_the_roc_curve_is_the_metrics_one_through_every_threshold():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    scores = rng.random(300).round(1) + labels * 0.2  # many ties
    fpr, tpr = roc_curve(labels, scores)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # its vertices are (0, 0) and (FPR, TPR) points of thresholds score >= t, and every threshold's
    # point lies on it (the last ones, below the lowest anomalous score, on its final flat segment)
    reference = brute_force_roc(labels, scores)
    rounded = {(round(f, 12), round(t, 12)) for f, t in reference | {(0.0, 0.0)}}
    assert {(round(float(f), 12), round(float(t), 12)) for f, t in zip(fpr, tpr)} <= rounded
    assert all(on_polyline(fpr, tpr, f, t) for f, t in reference)
    # its area is the AUROC the metrics report
    area = auc(fpr, tpr)
    assert area == pytest.approx(image_auroc(labels, scores), abs=1e-12)
    assert area == pytest.approx(pairwise_auroc(labels, scores), abs=1e-12)
    assert area == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    got = roc_points(labels, scores)  # what viz plots: the same arrays
    assert np.array_equal(got[0], fpr) and np.array_equal(got[1], tpr)
    assert roc_curve(np.ones(3), np.arange(3.0)) is None


def brute_force_pro(masks, maps, t):
    from skimage.measure import label

    overlaps, false_pos, normal = [], 0, 0
    for m, a in zip(masks, maps):
        regions = label(m > 0, connectivity=2)
        overlaps += [(a[regions == r] >= t).mean() for r in range(1, regions.max() + 1)]
        false_pos += ((a >= t) & (m == 0)).sum()
        normal += (m == 0).sum()
    return false_pos / normal, float(np.mean(overlaps))


def zsad_loop(masks, maps, fpr_limit):
    """AnomalyCLIP's cal_pro_score, literally: 200 thresholds, map > th, points with FPR < limit."""
    from skimage.measure import label

    masks, maps = np.stack(masks) > 0, np.stack(maps).astype(np.float32)
    lo, hi = maps.min(), maps.max()
    points = []
    for th in np.arange(lo, hi, (hi - lo) / 200):
        binary = maps > th
        pros = []
        for m, b in zip(masks, binary):
            regions = label(m, connectivity=2)
            pros += [b[regions == r].sum() / (regions == r).sum() for r in range(1, regions.max() + 1)]
        fpr = np.logical_and(~masks, binary).sum() / (~masks).sum()
        if fpr < fpr_limit:
            points.append((fpr, np.mean(pros)))
    return np.array(points)


def test_the_pro_curves_are_the_metrics_ones(category):
    _, masks, maps, _, _ = category
    fpr, pro = pro_points(masks, maps, fpr_limit=0.3)
    assert fpr[-1] == pytest.approx(0.3) and np.all(np.diff(fpr) >= 0)
    flat = np.sort(np.concatenate([a.ravel() for a in maps]))
    for t in (1.5, 1.0, 0.9, 0.8, *flat[-200::7]):  # between scores, and at scores
        f, p = brute_force_pro(masks, maps, t)
        assert f <= 0.3
        # every threshold's (FPR, PRO) pair lies on the exact curve
        assert on_polyline(fpr, pro, f, p)
    for limit in (0.3, 0.05):
        fpr, pro = pro_curve(masks, maps, limit, "exact")
        assert auc(fpr, pro) / limit == pytest.approx(aupro(masks, maps, limit, "exact"), abs=1e-12)
        # zsad: the grid points of the threshold loop, unrescaled; rescaled, their area is the metric
        fpr, pro = pro_curve(masks, maps, limit, "zsad")
        loop = zsad_loop(masks, maps, limit)[::-1]
        np.testing.assert_allclose(np.c_[fpr, pro], loop, rtol=0, atol=1e-12)
        rescaled = (fpr - fpr.min()) / (fpr.max() - fpr.min())
        assert sk_auc(rescaled, pro) == pytest.approx(aupro(masks, maps, limit, "zsad"), abs=1e-12)
    assert pro_points([np.zeros((3, 3))], [np.zeros((3, 3))]) is None


def test_the_curves_figure_plots_the_metrics_and_names_each_aupro(category):
    _, masks, maps, scores, labels = category
    fig = roc_pro_figure(labels, scores, masks, maps, fpr_limit=0.2)
    image_ax, pixel_ax, pro_ax = fig.axes
    # the line drawn is the metrics' curve, and its area the AUROC in the legend
    fpr, tpr = image_ax.lines[-1].get_data()
    expected = roc_curve(labels, scores)
    assert np.array_equal(fpr, expected[0]) and np.array_equal(tpr, expected[1])
    assert auc(fpr, tpr) == pytest.approx(image_auroc(labels, scores), abs=1e-12)
    assert image_ax.get_legend().get_texts()[0].get_text() == f"image_auroc {image_auroc(labels, scores):.3f}"
    flat_m = np.concatenate([m.ravel() for m in masks])
    flat_a = np.concatenate([a.ravel() for a in maps])
    fpr, tpr = pixel_ax.lines[-1].get_data()
    assert auc(fpr, tpr) == pytest.approx(pixel_auroc(flat_m, flat_a), abs=1e-12)
    # PRO: the exact curve and the zsad grid points at the limit given, each named with its value
    exact, zsad = pro_ax.lines
    expected = pro_curve(masks, maps, 0.2, "exact")
    assert np.array_equal(exact.get_xdata(), expected[0]) and exact.get_xdata()[-1] == pytest.approx(0.2)
    assert np.array_equal(zsad.get_xdata(), pro_curve(masks, maps, 0.2, "zsad")[0])
    legend = [t.get_text() for t in pro_ax.get_legend().get_texts()]
    assert legend[0].startswith("pixel_aupro: exact (MVTec AD / anomalib)")
    assert f"{aupro(masks, maps, 0.2, 'exact'):.3f}" in legend[0]
    assert legend[1].startswith("pixel_aupro_zsad: zsad (AnomalyCLIP, the paper's PRO)")
    assert f"{aupro(masks, maps, 0.2, 'zsad'):.3f}" in legend[1] and "FPR < 0.2" in legend[1]
    assert "FPR <= 0.2" in pro_ax.get_title()
    # only the methods asked for
    fig = roc_pro_figure(labels, scores, masks, maps, fpr_limit=0.2, aupro_methods=["zsad"])
    assert [t.get_text()[:16] for t in fig.axes[2].get_legend().get_texts()] == ["pixel_aupro_zsad"]


def test_montage_cases_best_worst_anomalous_and_false_positives(category):
    _, masks, maps, scores, labels = category
    ranked, notes, measure = rank_cases(labels, scores, masks, maps)
    # anomalous images 1, 2, 3 by per-image pixel AUROC (pairwise reference), highest first
    per_image = {i: pairwise_auroc(masks[i].ravel(), maps[i].ravel()) for i in (1, 2, 3)}
    assert ranked == sorted(per_image, key=lambda i: -per_image[i]) == [1, 2, 3]
    assert notes[1] == f"pixel AUROC {per_image[1]:.3f}" and measure == "per-image pixel AUROC"
    cases, meaning = montage_cases(labels, scores, masks, maps, n_best=1, n_worst=1, n_false_pos=2)
    assert [(c.kind, c.index) for c in cases] == [
        ("best anomalous 1", 1),
        ("worst anomalous 1", 3),
        ("false positive 1", 5),  # the normal images with the highest scores: 0.3, then 0.2
        ("false positive 2", 4),
    ]
    assert "pixel AUROC" in meaning and "normal images with the highest image scores" in meaning
    assert cases[2].note == "scores above 0/3 anomalous images"  # 0.3 < every anomalous score (0.4 .. 0.9)
    assert cases[1].note.endswith(", 0/3 normal images score higher")
    # without pixel ground truth the anomalous images are ranked by their image score
    cases, meaning = montage_cases(labels, scores, n_best=1, n_worst=1, n_false_pos=1)
    assert [c.index for c in cases] == [1, 3, 5] and "highest/lowest image score" in meaning
    # fewer anomalous images than rows: shared, none repeated
    cases, _ = montage_cases(labels, scores, masks, maps, n_best=3, n_worst=3, n_false_pos=0)
    assert [c.index for c in cases] == [1, 2, 3]


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


def test_montage_pictures_keep_their_aspect_ratio(category, tmp_path):
    _, masks, maps, scores, labels = category
    # wide originals (60 x 150) shown with square evaluation-size maps (32 x 32) and original masks
    rng = np.random.default_rng(3)
    originals = [rng.integers(0, 256, (60, 150, 3), dtype=np.uint8) for _ in range(6)]
    square = [np.asarray(Image.fromarray(m.astype(np.float32)).resize((32, 32))) for m in maps]
    big_masks = [np.asarray(Image.fromarray(m * 255).resize((150, 60), Image.NEAREST)) > 0 for m in masks]
    asked = []

    def picture(i):
        asked.append(i)
        return originals[i], big_masks[i], square[i]

    cases, meaning = montage_cases(labels, scores, masks, maps)
    fig = montage_figure(cases, picture, scores, labels, "cat", meaning)
    assert sorted(asked) == sorted(c.index for c in cases)  # only the rows shown are read
    for r, case in enumerate(cases):
        image_ax, mask_ax, map_ax = fig.axes[3 * r : 3 * r + 3]
        assert image_ax.images[0].get_array().shape == (60, 150, 3)  # the original aspect, not square
        assert mask_ax.images[0].get_array().shape == (60, 150)
        assert map_ax.images[1].get_array().shape == (60, 150)  # the map brought to the image's size
        assert image_ax.get_title(loc="left").startswith(f"{case.kind} (")
    assert fig.get_suptitle() == f"cat\n{meaning}"
    # large images are shown with their longer side at most 384 pixels, the aspect kept
    huge = rng.integers(0, 256, (800, 2000, 3), dtype=np.uint8)
    fig = montage_figure(cases[:1], lambda i: (huge, None, square[i]), scores, labels)
    assert fig.axes[0].images[0].get_array().shape == (154, 384, 3)
    path = save_figure(fig, tmp_path / "m.png")
    assert nonblank(path)


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
        n_false_pos=0,
    )
    two_rows = Image.open(path).size
    path = category_montage(images, masks, maps, scores, labels, tmp_path / "m3.png", n_best=1, n_worst=1)
    assert Image.open(path).size[1] > two_rows[1]  # the false positives add rows
    assert nonblank(plot_roc_pro(labels, scores, np.stack(masks), np.stack(maps), tmp_path / "c.png"))


def test_overlay_figure_shows_the_overlay_pixels_a_colour_bar_and_the_score(tmp_path):
    rng = np.random.default_rng(5)
    for h, w in ((30, 44), (700, 1300)):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        amap = rng.random((h, w)).astype(np.float32)
        fig = overlay_figure(image, amap, score=0.123456, alpha=0.4, vmin=0.2, vmax=0.9)
        picture = np.asarray(Image.open(save_figure(fig, tmp_path / "o.png")).convert("RGB"))
        scale = max(1.0, max(h, w) / 600)
        top = picture.shape[0] - max(h, round(200 * scale))
        assert np.array_equal(picture[top : top + h, :w], overlay(image, amap, 0.4, 0.2, 0.9))
        (bar,) = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert bar.get_ylim() == pytest.approx((0.2, 0.9))
        assert "image score 0.1235" in fig.texts[0].get_text()
        assert "fixed colour range" in fig.texts[0].get_text()

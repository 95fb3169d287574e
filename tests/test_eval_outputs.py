"""What an evaluation writes beside its metrics and says while it runs: ``scores/<dataset>.csv`` (equal to
the predictions the metrics were computed from, also when they come from the outputs store), the
figures with the run's AUPRO options, progress lines and each target's time."""

import csv
import logging

import numpy as np
import pytest
from conftest import compose_run, smoke_overrides

import feclip.engine.evaluate as evaluate_module
import feclip.viz as viz
from feclip.engine.evaluate import SCORE_COLUMNS, original_picture
from feclip.engine.run import run
from feclip.models import FEClip
from feclip.progress import LineProgress
from feclip.results import read_metrics


def _cfg(data_root, results, cache, *extra):
    return compose_run(smoke_overrides(data_root, results, f"paths.cache_dir={cache}", *extra))


def read_rows(path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, [dict(zip(header, row)) for row in reader]


@pytest.fixture()
def captured(monkeypatch):
    """The predictions each metric_rows call received (the ones the metrics are computed from)."""
    seen = []
    real = evaluate_module.metric_rows

    def spy(dataset_name, preds, *args, **kwargs):
        seen.append((dataset_name, preds))
        return real(dataset_name, preds, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "metric_rows", spy)
    return seen


def pairwise_auroc(labels, scores):
    pos = scores[labels == 1][:, None]
    neg = scores[labels == 0][None, :]
    return ((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size)


def test_scores_csv_holds_the_evaluated_predictions_also_from_the_outputs_store(
    data_root, tmp_path, captured, caplog, monkeypatch
):
    caplog.set_level(logging.INFO, logger="feclip")
    cache = tmp_path / "cache"
    out = run(_cfg(data_root, tmp_path / "r", cache, "train.reuse=false", "variant=a"))
    path = out / "scores" / "synthetic.csv"
    header, rows = read_rows(path)
    assert tuple(header) == SCORE_COLUMNS
    ((name, preds),) = captured
    assert name == "synthetic" and len(rows) == len(preds.scores) == 18
    for i, row in enumerate(rows):
        assert row["dataset"] == "synthetic" and row["category"] == preds.categories[i]
        assert int(row["label"]) == preds.labels[i]
        assert np.float32(row["image_score"]) == preds.scores[i]  # the same float32 value
        assert np.float32(row["map_max"]) == preds.maps[i].max()
        assert row["path"].endswith(".png") and "/test/" in row["path"]
        assert (row["mask_path"] == "") == (row["defect"] == "good") == (preds.labels[i] == 0)
    # each category's image AUROC from the file (a pairwise count) is metrics.csv's
    metrics = {
        r["category"]: r["value"] for r in read_metrics(out / "metrics.csv") if r["metric"] == "image_auroc"
    }
    for category in {r["category"] for r in rows}:
        mine = [r for r in rows if r["category"] == category]
        labels = np.array([int(r["label"]) for r in mine])
        scores = np.array([float(r["image_score"]) for r in mine])
        assert pairwise_auroc(labels, scores) == pytest.approx(metrics[category], abs=1e-12)
    assert not list(out.rglob(".*.tmp"))
    # the same weights evaluated again: outputs read from the store, no forward pass, the same file
    monkeypatch.setattr(FEClip, "forward", lambda *a, **k: pytest.fail("the model ran"))
    again = run(_cfg(data_root, tmp_path / "r", cache, "variant=b"))
    assert "read from the outputs store" in caplog.text
    assert (again / "scores" / "synthetic.csv").read_bytes() == path.read_bytes()
    # the target's time is in the run's log
    log_text = (again / "train.log").read_text()
    assert "evaluated synthetic: 18 images in " in log_text and "images/s" in log_text


def test_progress_lines_of_the_prefix_cache_and_the_evaluation(data_root, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="feclip")
    monkeypatch.setattr(LineProgress, "every_s", 0.0)  # a line after every batch
    overrides = ("train.reuse=false", "train.progress=true", "train.epochs=1", "eval.batch_size=4")
    run(_cfg(data_root, tmp_path / "r", tmp_path / "cache", *overrides))
    messages = [r.getMessage() for r in caplog.records]
    cache_lines = [m for m in messages if m.startswith("prefix cache: ") and "/18 images (" in m]
    assert [m.split(" (")[0] for m in cache_lines] == [f"prefix cache: {i}/18 images" for i in (4, 8, 12, 16)]
    eval_lines = [m for m in messages if m.startswith("synthetic: predict: ")]
    assert [m.split(" (")[0] for m in eval_lines] == [
        f"synthetic: predict: {i}/18 images" for i in (4, 8, 12, 16)
    ]
    assert all(" images/s, " in m for m in cache_lines + eval_lines)
    # without train.progress: no lines, the summaries only
    caplog.clear()
    run(_cfg(data_root, tmp_path / "r", tmp_path / "cache", "train.reuse=false", "variant=quiet"))
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "/18 images (" in m]
    assert any(m.startswith("evaluated synthetic: 18 images in ") for m in messages)
    assert any(m.startswith("prefix cache: 18 images, ") and "images/s" in m for m in messages)


def test_figures_use_the_runs_aupro_options_and_the_original_images(data_root, tmp_path, monkeypatch):
    asked = []
    real = viz.roc_pro_figure

    def recording(labels, scores, masks, maps, fpr_limit=None, aupro_methods=None):
        asked.append((fpr_limit, list(aupro_methods)))
        return real(labels, scores, masks, maps, fpr_limit, aupro_methods)

    monkeypatch.setattr(viz, "roc_pro_figure", recording)
    pictures = []
    monkeypatch.setattr(
        evaluate_module,
        "original_picture",
        lambda *a: pictures.append(original_picture(*a)) or pictures[-1],
    )
    extra = (
        "train.epochs=0",
        "eval.save_figures=true",
        "eval.aupro.fpr_limit=0.2",
        "eval.aupro.methods=[zsad]",
    )
    out = run(_cfg(data_root, tmp_path / "r", tmp_path / "cache", *extra), do_train=False)
    assert asked == [(0.2, ["zsad"])] * 3  # one curves figure per category, with eval.aupro.*
    assert len(list((out / "figures").glob("*_montage.png"))) == 3
    # the montages read the original files (64 x 64 here; the model input is 84), masks included
    assert pictures and all(image.shape == (64, 64, 3) for image, _, _ in pictures)
    assert all(amap.shape == (84, 84) for _, _, amap in pictures)  # the evaluated map, resized by viz
    assert any(mask is not None and mask.any() for _, mask, _ in pictures)


def test_progress_is_a_bar_on_a_terminal_and_nothing_when_off(monkeypatch):
    import sys

    from feclip.progress import plural, progress

    batches = [list(range(4)), list(range(4)), list(range(2))]
    assert progress(batches, False, "x", 10) is batches  # off: the iterable itself
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = progress(batches, True, "x", 10, unit="image", count=len)
    assert list(bar) == batches  # the items pass through unchanged
    assert bar.bar.n == 10 and bar.bar.total == 10  # advanced by the images of each batch
    assert [plural(u) for u in ("batch", "image", "category")] == ["batches", "images", "categories"]

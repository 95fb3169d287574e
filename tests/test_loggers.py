"""The wandb tracker: what a run sends (a fake ``wandb`` module records it on a smoke run), the labels
that group seeds, the overlays' choice, and one real offline wandb run that writes its folder."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
from conftest import compose_run, smoke_overrides

from feclip.engine.run import run
from feclip.loggers import (
    MAX_TAG,
    macro_means,
    per_category_table,
    pick_overlay_images,
    protocol_label,
    run_labels,
)
from feclip.results import MICRO, MetricRow, read_metrics

# -- pure parts ---------------------------------------------------------------------------------------


def test_labels_group_the_seeds_of_a_variant():
    a = run_labels("taps", "taps=last4", 1, "mvtec_to_visa", "train")
    b = run_labels("taps", "taps=last4", 2, "mvtec_to_visa", "train")
    assert a["name"] == "taps=last4/seed=1" and b["name"] == "taps=last4/seed=2"
    assert a["group"] == b["group"] == "taps/taps=last4"
    assert a["tags"] == ["study:taps", "variant:taps=last4", "protocol:mvtec_to_visa"]
    assert a["job_type"] == "train"
    long = run_labels("s", "x" * 100, 0, "p", "eval")
    assert long["tags"][1] == ("variant:" + "x" * 100)[:MAX_TAG] and long["name"] == "x" * 100 + "/seed=0"


def test_protocol_label():
    assert protocol_label("mvtec", ["visa"]) == "mvtec_to_visa"
    assert protocol_label("visa", ["mvtec", "btad", "mvtec"]) == "visa_to_mvtec+btad"
    nine = ["visa", "btad", "mpdd", "dtd_synthetic", "dagm", "brainmri", "br35h", "clinicdb", "kvasir"]
    assert protocol_label("mvtec", nine) == "mvtec_to_9_datasets"
    assert protocol_label("none", ["synthetic"]) == "none_to_synthetic"


def test_overlays_are_the_highest_and_lowest_scored_anomalous_images():
    labels = [0, 1, 1, 0, 1, 1, 1, 1]
    scores = [0.99, 0.5, 0.9, 0.01, 0.2, 0.7, 0.1, 0.6]
    # anomalous by score: 2 (0.9), 5 (0.7), 7 (0.6), 1 (0.5), 4 (0.2), 6 (0.1); normal images never
    assert pick_overlay_images(labels, scores) == [
        (2, "highest 1"),
        (5, "highest 2"),
        (6, "lowest 1"),
        (4, "lowest 2"),
    ]
    assert pick_overlay_images([1, 0, 1], [0.3, 0.9, 0.4]) == [(2, "highest 1"), (0, "highest 2")]
    assert pick_overlay_images([1, 1, 1], [0.5, 0.5, 0.2]) == [
        (0, "highest 1"),
        (1, "highest 2"),
        (2, "lowest 1"),
    ]
    assert pick_overlay_images([0, 0], [0.1, 0.2]) == []


def _rows():
    rows = []
    for dataset, cats in (("visa", {"a": 0.5, "b": 0.7, "c": 0.9}), ("btad", {"x": 0.25, "y": float("nan")})):
        for cat, v in cats.items():
            rows.append(MetricRow(dataset, cat, "image_auroc", v, 10))
            rows.append(MetricRow(dataset, cat, "pixel_auroc", v / 2, 10))
        rows.append(MetricRow(dataset, MICRO, "image_auroc", 0.123, 30))
    rows.append(MetricRow("visa", "a", "pixel_aupro_zsad", 0.4, 10))  # a metric only some rows have
    return rows


def test_macro_means_and_the_table_by_hand():
    means = macro_means(_rows())
    assert means["visa"]["image_auroc"] == pytest.approx(0.7, abs=1e-15)
    assert means["visa"]["pixel_auroc"] == pytest.approx(0.35, abs=1e-15)
    assert means["visa"]["pixel_aupro_zsad"] == 0.4
    assert math.isnan(means["btad"]["image_auroc"])  # an undefined category is never hidden
    columns, data = per_category_table(_rows())
    assert columns == ["dataset", "category", "n_images", "image_auroc", "pixel_auroc", "pixel_aupro_zsad"]
    assert [row[:3] for row in data] == [
        ["visa", "a", 10],
        ["visa", "b", 10],
        ["visa", "c", 10],
        ["btad", "x", 10],
        ["btad", "y", 10],
    ]  # no __micro__ row
    assert data[0][3:] == [0.5, 0.25, 0.4] and data[1][5] is None


# -- a smoke run against a fake wandb -------------------------------------------------------------------


class _FakeRun:
    def __init__(self, record: dict):
        self.record = record
        self.summary: dict = {}

    def log(self, values: dict) -> None:
        self.record["logs"].append(values)

    def finish(self) -> None:
        self.record["finished"] += 1


def _fake_wandb(record: dict) -> types.ModuleType:
    module = types.ModuleType("wandb")

    def init(**kwargs):
        record["init"].append(kwargs)
        record["run"] = _FakeRun(record)
        return record["run"]

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = list(columns), [list(r) for r in data]

    class Image:
        def __init__(self, data, caption=None):
            self.data, self.caption = np.asarray(data), caption

    module.init, module.Table, module.Image = init, Table, Image
    return module


def test_a_run_sends_losses_means_table_and_overlays(data_root, tmp_path, monkeypatch):
    record = {"init": [], "logs": [], "finished": 0}
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(record))
    cfg = compose_run(
        smoke_overrides(data_root, tmp_path, "logger=wandb", "train.reuse=false", "variant=fake")
    )
    out = run(cfg)

    (init,) = record["init"]
    assert init["mode"] == "offline" and init["project"] == "feclip" and init["dir"] == str(out)
    assert init["name"] == "fake/seed=42" and init["group"] == "default/fake" and init["job_type"] == "train"
    assert init["tags"] == ["study:default", "variant:fake", "protocol:synthetic_to_synthetic"]
    assert init["config"]["provenance"]["checkpoint"] == "trained" and init["config"]["seed"] == 42
    assert record["finished"] == 1

    logs = record["logs"]
    epochs = [entry for entry in logs if "train/loss" in entry]
    assert [e["epoch"] for e in epochs] == [1, 2] and all(math.isfinite(e["train/loss"]) for e in epochs)

    # the means and the table carry metrics.csv's values, identical
    rows = read_metrics(out / "metrics.csv")
    (results,) = [entry for entry in logs if "eval/per_category" in entry]
    per_cat = [r for r in rows if r["category"] != MICRO]
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    for metric in metrics:
        values = [r["value"] for r in per_cat if r["metric"] == metric]
        expected = math.fsum(values) / len(values)
        got = results[f"eval/synthetic/macro/{metric}"]
        assert got == expected or (math.isnan(got) and math.isnan(expected)), metric
        (micro,) = [r["value"] for r in rows if r["category"] == MICRO and r["metric"] == metric]
        assert results[f"eval/synthetic/micro/{metric}"] == micro or math.isnan(micro)
        assert record["run"].summary[f"eval/synthetic/macro/{metric}"] is got
    assert {"image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_aupro_zsad"} <= set(
        metrics
    )
    table = results["eval/per_category"]
    assert table.columns == ["dataset", "category", "n_images", *metrics]
    assert len(table.data) == 3  # set B's three categories
    for row in table.data:
        for metric, value in zip(metrics, row[3:]):
            (csv_value,) = [r["value"] for r in per_cat if (r["category"], r["metric"]) == (row[1], metric)]
            assert value == csv_value or (math.isnan(value) and math.isnan(csv_value))

    # four anomalous images, each image | overlay | ground truth at the input size
    (shown,) = [entry["eval/synthetic/overlays"] for entry in logs if "eval/synthetic/overlays" in entry]
    assert [img.caption.split(", ")[1].split(":")[0] for img in shown] == [
        "highest 1",
        "highest 2",
        "lowest 1",
        "lowest 2",
    ]
    scores = [float(img.caption.split("score ")[1].split(",")[0]) for img in shown]
    assert scores[0] >= scores[1] >= scores[3] >= scores[2]
    for img in shown:
        assert img.data.shape == (84, 3 * 84, 3) and img.data.dtype == np.uint8
        assert "/good/" not in img.caption  # anomalous images only
        truth = img.data[:, 2 * 84 :]
        assert truth.max() == 255 and set(np.unique(truth)) <= {0, 255}  # the defect's mask


def test_a_failing_overlay_loses_no_metric(data_root, tmp_path, monkeypatch, caplog):
    record = {"init": [], "logs": [], "finished": 0}
    fake = _fake_wandb(record)

    def broken(*args, **kwargs):
        raise RuntimeError("no media today")

    fake.Image = broken
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = run(compose_run(smoke_overrides(data_root, tmp_path, "logger=wandb", "variant=broken")))
    assert (out / "metrics.csv").is_file()
    assert any("eval/per_category" in entry for entry in record["logs"])
    assert "the overlays of synthetic were not logged (RuntimeError: no media today)" in caplog.text


# -- a real offline wandb run ----------------------------------------------------------------------


def test_a_real_offline_wandb_run_writes_its_folder(data_root, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose_run(smoke_overrides(data_root, tmp_path, "logger=wandb", "variant=real", "train.epochs=1"))
    out = run(cfg)
    (folder,) = (out / "wandb").glob("offline-run-*")
    assert any(folder.rglob("*.wandb"))
    media = folder / "files" / "media"
    assert len(list((media / "images").rglob("*.png"))) == 4
    assert len(list((media / "table").rglob("*.table.json"))) == 1

"""feclip-report: aggregation over categories and seeds, paired CIs, paper gaps, outputs, CLI errors.

Every expected number below is computed by hand from the values written into the fixture tree; the
arithmetic is in the comments. Fractions in the tree, points (percent) in the report.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from feclip import report
from feclip.apps import report as report_app
from feclip.metrics import macro_average
from feclip.report import backbones, write

NAN = float("nan")
HEADER = [
    "study", "variant", "seed", "train_dataset", "dataset", "category", "metric", "value", "n_images",
    "git_sha", "config_hash", "finished_at", "backbone", "checkpoint",
]  # fmt: skip
LEGACY_HEADER = HEADER[:12]
PAPER_BB = "ViT-L-14-336-quickgelu:openai@sha256=3f2a9c0b1d2e"
FILE_BB = "ViT-L-14-336-quickgelu:file:ViT-L-14-336.pt@sha256=77aa88bb99cc"
TINY_BB = "feclip-tiny:random(seed={seed})"  # a random backbone is initialised from the run's seed

# (variant, seed) -> {(dataset, category, metric): value}; study "taps", train "mvtec" everywhere.
RUNS = {
    ("spread3", 42): {
        ("visa", "candle", "image_auroc"): 0.90, ("visa", "pcb1", "image_auroc"): 0.80,
        ("visa", "__micro__", "image_auroc"): 0.80,
        ("visa", "candle", "pixel_aupro_zsad"): 0.95, ("visa", "pcb1", "pixel_aupro_zsad"): 0.91,
        ("visa", "candle", "pixel_aupro"): 0.70, ("visa", "pcb1", "pixel_aupro"): 0.60,
        ("btad", "01", "image_auroc"): 0.90, ("btad", "02", "image_auroc"): 0.88,
    },
    ("spread3", 123): {
        ("visa", "candle", "image_auroc"): 0.92, ("visa", "pcb1", "image_auroc"): 0.84,
        ("visa", "__micro__", "image_auroc"): 0.82,
        ("visa", "candle", "pixel_aupro_zsad"): 0.94, ("visa", "pcb1", "pixel_aupro_zsad"): 0.90,
        ("visa", "candle", "pixel_aupro"): 0.70, ("visa", "pcb1", "pixel_aupro"): 0.60,
        ("btad", "01", "image_auroc"): 0.92, ("btad", "02", "image_auroc"): 0.90,
    },
    ("spread3", 456): {
        ("visa", "candle", "image_auroc"): 0.88, ("visa", "pcb1", "image_auroc"): 0.78,
        ("visa", "__micro__", "image_auroc"): 0.81,
        ("visa", "candle", "pixel_aupro_zsad"): NAN, ("visa", "pcb1", "pixel_aupro_zsad"): 0.92,
        ("visa", "candle", "pixel_aupro"): 0.70, ("visa", "pcb1", "pixel_aupro"): 0.60,
        ("btad", "01", "image_auroc"): 0.88, ("btad", "02", "image_auroc"): 0.86,
    },
    ("last4", 42): {
        ("visa", "candle", "image_auroc"): 0.88, ("visa", "pcb1", "image_auroc"): 0.78,
        ("visa", "__micro__", "image_auroc"): 0.78,
        ("visa", "candle", "pixel_aupro_zsad"): 0.93, ("visa", "pcb1", "pixel_aupro_zsad"): 0.89,
        ("visa", "candle", "pixel_aupro"): 0.70, ("visa", "pcb1", "pixel_aupro"): 0.60,
        ("btad", "01", "image_auroc"): 0.86, ("btad", "02", "image_auroc"): 0.84,
    },
    ("last4", 123): {
        ("visa", "candle", "image_auroc"): 0.90, ("visa", "pcb1", "image_auroc"): 0.80,
        ("visa", "__micro__", "image_auroc"): 0.80,
        ("visa", "candle", "pixel_aupro_zsad"): 0.92, ("visa", "pcb1", "pixel_aupro_zsad"): 0.90,
        ("visa", "candle", "pixel_aupro"): 0.70, ("visa", "pcb1", "pixel_aupro"): 0.60,
        ("btad", "01", "image_auroc"): 0.89, ("btad", "02", "image_auroc"): 0.86,
    },
    ("last4", 456): {  # no btad for this seed: the btad cell of last4 has 2 seeds -> flagged
        ("visa", "candle", "image_auroc"): 0.86, ("visa", "pcb1", "image_auroc"): 0.76,
        ("visa", "__micro__", "image_auroc"): 0.79,
        ("visa", "candle", "pixel_aupro_zsad"): 0.94, ("visa", "pcb1", "pixel_aupro_zsad"): 0.90,
        ("visa", "candle", "pixel_aupro"): 0.70, ("visa", "pcb1", "pixel_aupro"): 0.60,
    },
    ("last3", 42): {  # a single seed: std undefined, CIs against it undefined
        ("visa", "candle", "image_auroc"): 0.89, ("visa", "pcb1", "image_auroc"): 0.79,
    },
}  # fmt: skip

PAPER_CSV = """\
# test copy of the paper table; '-' = not reported
method,setting,dataset,image_auroc,image_ap,pixel_auroc,pixel_aupro
FE-CLIP,zero_shot,visa,84.6,86.6,95.9,92.8
FE-CLIP,zero_shot,btad,90.3,90.0,95.6,80.4
FE-CLIP,zero_shot,brainmri,94.8,93.8,-,-
FE-CLIP,1_shot,visa,88.7,90.5,97.9,93.9
AnomalyCLIP,zero_shot,visa,82.1,85.4,95.5,87.0
"""


def write_run(
    root: Path,
    study: str,
    variant: str,
    seed: int,
    train: str,
    values: dict,
    backbone: str = PAPER_BB,
    checkpoint: str = "trained",
    legacy: bool = False,
    folder: str | None = None,
) -> Path:
    """Write one metrics.csv by hand in the results-tree layout (``legacy``: the 12-column schema)."""
    path = root / (folder or study) / variant / f"seed={seed}" / "metrics.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    backbone = backbone.format(seed=seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(LEGACY_HEADER if legacy else HEADER)
        for (dataset, category, metric), value in values.items():
            text = "nan" if math.isnan(value) else repr(value)
            row = [study, variant, seed, train, dataset, category, metric, text, 10, "abc", "h", "t"]
            writer.writerow(row if legacy else row + [backbone, checkpoint])
    return path


# Complete macros the paper can be compared with: BTAD's three official categories and BrainMRI's one.
# (seed) -> values; per-seed macros in the comments.
COMPLETE = {
    42: {
        ("btad", "01", "image_auroc"): 0.90, ("btad", "02", "image_auroc"): 0.88,
        ("btad", "03", "image_auroc"): 0.92,  # macro 0.90
        ("btad", "01", "pixel_aupro_zsad"): 0.80, ("btad", "02", "pixel_aupro_zsad"): 0.82,
        ("btad", "03", "pixel_aupro_zsad"): 0.81,  # macro 0.81
        ("brainmri", "brain", "image_auroc"): 0.95,
    },
    123: {
        ("btad", "01", "image_auroc"): 0.92, ("btad", "02", "image_auroc"): 0.90,
        ("btad", "03", "image_auroc"): 0.94,  # macro 0.92
        ("btad", "01", "pixel_aupro_zsad"): 0.78, ("btad", "02", "pixel_aupro_zsad"): 0.80,
        ("btad", "03", "pixel_aupro_zsad"): 0.79,  # macro 0.79
        ("brainmri", "brain", "image_auroc"): 0.93,
    },
}  # fmt: skip


def write_complete(root: Path, study: str = "bench", variant: str = "default", **kwargs) -> Path:
    """Two seeds of complete BTAD and BrainMRI macros, trained on MVTec AD (the paper's protocol)."""
    for seed, values in COMPLETE.items():
        write_run(root, study, variant, seed, "mvtec", values, **kwargs)
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    for (variant, seed), values in RUNS.items():
        write_run(root, "taps", variant, seed, "mvtec", values)
    return root


@pytest.fixture
def paper_file(tmp_path: Path) -> Path:
    path = tmp_path / "paper_numbers.csv"
    path.write_text(PAPER_CSV)
    return path


def cell(frame: pd.DataFrame, **where) -> pd.Series:
    """The single row of ``frame`` matching every column=value given."""
    mask = np.ones(len(frame), dtype=bool)
    for column, value in where.items():
        mask &= (frame[column] == value).to_numpy()
    rows = frame[mask]
    assert len(rows) == 1, f"{where}: {len(rows)} rows"
    return rows.iloc[0]


# --------------------------------------------------------------------------------------------------
# reading and aggregation
# --------------------------------------------------------------------------------------------------


def test_load_results_reads_every_file(tree):
    df = report.load_results(tree)
    assert len(df) == sum(len(v) for v in RUNS.values())
    assert set(df["variant"]) == {"spread3", "last4", "last3"}
    assert sorted(df["seed"].unique()) == [42, 123, 456]
    # a study's own folder works too (the study name comes from the files)
    assert len(report.load_results(tree / "taps")) == len(df)


def test_macro_per_seed_is_the_unweighted_category_mean(tree):
    per_seed = report.macro_per_seed(report.load_results(tree))
    got = cell(per_seed, variant="spread3", dataset="visa", metric="image_auroc", seed=123)["value"]
    assert got == pytest.approx((0.92 + 0.84) / 2)  # = 0.88; __micro__ (0.82) is not a category
    assert got == pytest.approx(macro_average({"candle": 0.92, "pcb1": 0.84}))


def test_mean_and_sample_std_over_seeds(tree):
    summary = report.summarize(report.load_results(tree))
    c = cell(summary, variant="spread3", dataset="visa", metric="image_auroc", averaging="macro")
    # per-seed macro: 42 -> (0.90+0.80)/2 = 0.85, 123 -> 0.88, 456 -> (0.88+0.78)/2 = 0.83
    # mean = (0.85+0.88+0.83)/3 = 0.853333 -> 85.333 points
    # deviations -0.003333, +0.026667, -0.023333; squares sum 0.00126667; /(3-1) = 0.00063333
    # std = sqrt(0.00063333) = 0.025166 -> 2.5166 points
    assert c["mean"] == pytest.approx(85.3333333, abs=1e-6)
    assert c["std"] == pytest.approx(2.5166115, abs=1e-6)
    assert c["n_seeds"] == 3
    single = cell(summary, variant="last3", dataset="visa", metric="image_auroc", averaging="macro")
    assert single["mean"] == pytest.approx(84.0)  # (0.89+0.79)/2
    assert math.isnan(single["std"]) and single["n_seeds"] == 1


def test_nan_category_propagates_by_default_and_can_be_skipped(tree):
    df = report.load_results(tree)
    c = cell(
        report.summarize(df), variant="spread3", dataset="visa", metric="pixel_aupro_zsad", averaging="macro"
    )
    assert math.isnan(c["mean"]) and math.isnan(c["std"]) and c["n_seeds"] == 3  # seed 456 has a nan category
    c = cell(
        report.summarize(df, skip_nan=True),
        variant="spread3",
        dataset="visa",
        metric="pixel_aupro_zsad",
        averaging="macro",
    )
    # skip: 42 -> (0.95+0.91)/2 = 0.93, 123 -> (0.94+0.90)/2 = 0.92, 456 -> 0.92 (pcb1 only); mean 0.923333
    assert c["mean"] == pytest.approx(92.333333, abs=1e-6)


def test_micro_rows_form_their_own_table(tree):
    summary = report.summarize(report.load_results(tree))
    micro = summary[summary["averaging"] == "micro"]
    assert set(micro["variant"]) == {"spread3", "last4"} and set(micro["metric"]) == {"image_auroc"}
    c = cell(micro, variant="spread3")
    # 0.80, 0.82, 0.81 -> mean 0.81; deviations -0.01, +0.01, 0 -> var 0.0002/2 = 0.0001 -> std 0.01
    assert c["mean"] == pytest.approx(81.0) and c["std"] == pytest.approx(1.0)
    assert not micro["flagged"].any() and micro["paper"].isna().all()  # the paper is macro only


def test_cell_with_fewer_seeds_is_flagged(tree):
    summary = report.summarize(report.load_results(tree))
    macro = summary[summary["averaging"] == "macro"]
    flagged = macro[macro["flagged"]]
    # most cells have 3 seeds; last4/btad has 2 (no btad in seed 456), last3/visa has 1
    assert set(zip(flagged["variant"], flagged["dataset"])) == {("last4", "btad"), ("last3", "visa")}
    markdown = report.render_markdown(summary)
    assert "(2)†" in markdown and "(1)†" in markdown
    assert "† fewer seeds than the other cells (most cells have 3)." in markdown


# --------------------------------------------------------------------------------------------------
# paired differences
# --------------------------------------------------------------------------------------------------


def test_paired_difference_and_t_interval(tree):
    paired = report.paired_differences(report.macro_per_seed(report.load_results(tree)))
    p = cell(paired, variant_a="last4", variant_b="spread3", dataset="visa", metric="image_auroc")
    # last4 macro per seed: 0.83, 0.85, 0.81; spread3: 0.85, 0.88, 0.83
    # differences last4 - spread3 in points: -2, -3, -2 -> mean -2.3333
    diffs = np.array([-2.0, -3.0, -2.0])
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / math.sqrt(3)  # 4.3027 * 0.57735 / 1.7321 = 1.4342
    assert p["n_shared"] == 3 and p["seeds"] == "42;123;456"
    assert p["mean_diff"] == pytest.approx(-7 / 3)
    assert p["ci_low"] == pytest.approx(-7 / 3 - half) and p["ci_high"] == pytest.approx(-7 / 3 + half)
    assert p["ci_high"] == pytest.approx(-0.8991, abs=1e-4)
    assert p["distinguishable"] is True  # [-3.77, -0.90] excludes 0

    p = cell(paired, variant_a="last4", variant_b="spread3", dataset="btad", metric="image_auroc")
    # shared seeds 42, 123: last4 0.85, 0.875; spread3 0.89, 0.91 -> differences -4.0, -3.5 points
    half = stats.t.ppf(0.975, 1) * np.std([-4.0, -3.5], ddof=1) / math.sqrt(2)  # 12.706 * 0.35355 / 1.4142
    assert p["n_shared"] == 2 and p["mean_diff"] == pytest.approx(-3.75)
    assert p["ci_high"] == pytest.approx(-3.75 + half)  # = -0.574: excludes 0
    assert p["distinguishable"] is True

    p = cell(paired, variant_a="last4", variant_b="spread3", dataset="visa", metric="pixel_aupro")
    # identical values on every seed: differences 0, 0, 0 -> CI [0, 0] does not exclude 0
    assert p["mean_diff"] == 0 and p["distinguishable"] is False


def test_paired_ci_undefined_with_one_shared_seed(tree):
    paired = report.paired_differences(report.macro_per_seed(report.load_results(tree)))
    p = cell(paired, variant_a="last3", variant_b="spread3", dataset="visa", metric="image_auroc")
    assert p["n_shared"] == 1 and p["mean_diff"] == pytest.approx(-1.0)  # 0.84 - 0.85
    assert math.isnan(p["ci_low"]) and math.isnan(p["ci_high"]) and p["distinguishable"] is None
    assert report.format_paired(p["mean_diff"], p["ci_low"], p["ci_high"], 1, None) == "−1.00 [n/a] (1)"


def test_baseline_limits_the_pairs(tree):
    paired = report.paired_differences(report.macro_per_seed(report.load_results(tree)), baseline="spread3")
    assert set(zip(paired["variant_a"], paired["variant_b"])) == {("last3", "spread3"), ("last4", "spread3")}
    every = report.paired_differences(report.macro_per_seed(report.load_results(tree)))
    assert set(zip(every["variant_a"], every["variant_b"])) == {
        ("last3", "last4"),
        ("last3", "spread3"),
        ("last4", "spread3"),
    }


def test_an_evaluation_only_variant_pairs_with_a_trained_one(tmp_path):
    root = tmp_path / "results"
    for seed, values in COMPLETE.items():
        write_run(root, "s", "trained", seed, "mvtec", values)
        write_run(root, "s", "free", seed, "none", {k: v - 0.05 for k, v in values.items()})  # training-free
        write_run(root, "s", "other", seed, "visa", values)  # trained on another set: never paired
    paired = report.paired_differences(report.macro_per_seed(report.load_results(root)))
    assert set(zip(paired["variant_a"], paired["variant_b"])) == {("free", "other"), ("free", "trained")}
    p = cell(paired, variant_a="free", variant_b="trained", dataset="btad", metric="image_auroc")
    # the same evaluated dataset and seeds; the pair's train reads A's, then B's
    assert p["train_dataset"] == "none/mvtec" and p["n_shared"] == 2
    assert p["mean_diff"] == pytest.approx(-5.0)
    p = cell(paired, variant_a="free", variant_b="other", dataset="btad", metric="image_auroc")
    assert p["train_dataset"] == "none/visa" and p["mean_diff"] == pytest.approx(-5.0)


# --------------------------------------------------------------------------------------------------
# paper comparison
# --------------------------------------------------------------------------------------------------


def test_paper_numbers_filter_and_map(paper_file):
    paper = report.load_paper_numbers(paper_file)
    assert set(paper["dataset"]) == {"visa", "btad", "brainmri"}  # FE-CLIP zero_shot rows only
    assert "pixel_aupro" not in set(paper["metric"])  # the paper's PRO is our AnomalyCLIP-style AUPRO
    assert cell(paper, dataset="visa", metric="pixel_aupro_zsad")["paper"] == 92.8
    assert (
        cell(paper, dataset="visa", metric="image_auroc")["paper"] == 84.6
    )  # not 1_shot 88.7 / AnomalyCLIP 82.1
    assert len(paper[paper["dataset"] == "brainmri"]) == 2  # '-' (not reported) is dropped


def test_paper_gap_in_points(tmp_path, paper_file):
    root = write_complete(tmp_path / "results")
    summary = report.summarize(report.load_results(root), report.load_paper_numbers(paper_file))
    c = cell(summary, dataset="btad", metric="image_auroc", averaging="macro")
    # per-seed macros 0.90, 0.92 -> 91.0 points; paper 90.3 -> gap +0.7
    assert c["categories"] == "3/3" and not c["incomplete"] and c["not_compared"] == ""
    assert c["paper"] == 90.3 and c["gap"] == pytest.approx(91.0 - 90.3)
    c = cell(summary, dataset="btad", metric="pixel_aupro_zsad", averaging="macro")
    assert c["gap"] == pytest.approx(80.0 - 80.4)  # macros 0.81, 0.79 -> 80.0
    c = cell(summary, dataset="brainmri", metric="image_auroc", averaging="macro")
    assert c["categories"] == "1/1" and c["gap"] == pytest.approx(94.0 - 94.8)
    markdown = report.render_markdown(summary)
    # the backbone column shows name and source, without the weights' hash
    assert (
        "| default | ViT-L-14-336-quickgelu:openai | mvtec | btad | 91.0 ± 1.4 (2) | 90.3 | +0.7 |"
        in markdown
    )
    assert "sha256" not in markdown and "Warning" not in markdown


def test_exact_aupro_is_not_the_papers_pro(tmp_path, paper_file):
    root = tmp_path / "results"
    values = {("btad", c, "pixel_aupro"): 0.7 for c in ("01", "02", "03")}
    write_run(root, "s", "v", 42, "mvtec", values)
    summary = report.summarize(report.load_results(root), report.load_paper_numbers(paper_file))
    exact = cell(summary, metric="pixel_aupro", averaging="macro")
    assert math.isnan(exact["paper"]) and exact["not_compared"] == ""  # the paper has no such number


def test_paper_number_only_for_the_paper_protocol(tmp_path, paper_file):
    root = tmp_path / "results"
    values = {("brainmri", "brain", "image_auroc"): 0.8}
    write_run(root, "s", "trained_on_btad", 42, "btad", values)  # the paper trains on MVTec AD here
    write_run(root, "s", "eval_only", 42, "none", values)
    summary = report.summarize(report.load_results(root), report.load_paper_numbers(paper_file))
    other = cell(summary, variant="trained_on_btad", averaging="macro")
    assert math.isnan(other["paper"]) and math.isnan(other["gap"]) and other["not_compared"] == "protocol"
    assert cell(summary, variant="eval_only", averaging="macro")["paper"] == 94.8
    markdown = report.render_markdown(summary)
    assert (
        "| trained_on_btad | ViT-L-14-336-quickgelu:openai | btad | brainmri | 80.0 ± – (1) |  |  |"
        in markdown
    )
    assert "rows trained on another auxiliary dataset than the paper's" in markdown


# --------------------------------------------------------------------------------------------------
# backbone provenance
# --------------------------------------------------------------------------------------------------


def test_backbones_never_average_together(tmp_path, paper_file):
    root = write_complete(tmp_path / "results")
    # the same study and variant on the tiny random fallback (stored elsewhere, e.g. another machine)
    tiny = {seed: {k: v - 0.3 for k, v in values.items()} for seed, values in COMPLETE.items()}
    for seed, values in tiny.items():
        write_run(root, "bench", "default", seed, "mvtec", values, backbone=TINY_BB, folder="laptop")
    summary = report.summarize(report.load_results(root), report.load_paper_numbers(paper_file))
    rows = summary[(summary["dataset"] == "btad") & (summary["metric"] == "image_auroc")]
    assert sorted(rows["backbone"]) == [
        "ViT-L-14-336-quickgelu:openai@sha256=3f2a9c0b1d2e",
        "feclip-tiny:random",
    ]
    paper_row = cell(rows, backbone=PAPER_BB)
    tiny_row = cell(rows, backbone="feclip-tiny:random")  # random(seed=42) and (seed=123): one row
    assert paper_row["mean"] == pytest.approx(91.0) and paper_row["n_seeds"] == 2
    assert tiny_row["mean"] == pytest.approx(61.0) and tiny_row["n_seeds"] == 2  # 0.60, 0.62
    assert paper_row["paper"] == 90.3
    assert (
        math.isnan(tiny_row["paper"])
        and math.isnan(tiny_row["gap"])
        and tiny_row["not_compared"] == "backbone"
    )
    markdown = report.render_markdown(summary)
    assert (
        "> **Warning: not the paper's CLIP.** Rows from a random/fallback backbone are not compared"
        in markdown
    )
    assert "| default | feclip-tiny:random | mvtec | btad | 61.0 ± 1.4 (2) |  |  |" in markdown
    assert (
        "rows from a random/fallback backbone are not compared with the paper: their backbone (feclip-tiny:random)"
        in markdown
    )
    assert "empty: not compared" in markdown
    tex = report.render_latex(summary)
    assert r"\begin{tabular}{llllrrrrrr}" in tex and "feclip-tiny:random" in tex
    assert "not compared with the paper" in tex


@pytest.mark.parametrize(
    ("backbone", "compared"),
    [
        (PAPER_BB, True),
        (FILE_BB, True),  # the OpenAI weights from a file
        ("ViT-L-14-336-quickgelu:random(seed=7)", False),  # the paper's architecture, random weights
        ("ViT-B-16:openai@sha256=0123456789ab", False),  # another CLIP
        ("feclip-tiny:random(seed=42)", False),
    ],
)
def test_only_the_papers_backbone_is_compared(tmp_path, paper_file, backbone, compared):
    root = write_complete(tmp_path / "results", backbone=backbone)
    summary = report.summarize(report.load_results(root), report.load_paper_numbers(paper_file))
    c = cell(summary, dataset="btad", metric="image_auroc", averaging="macro")
    assert (c["paper"] == 90.3) if compared else (math.isnan(c["paper"]) and c["not_compared"] == "backbone")


def test_legacy_files_are_read_as_unknown_and_not_compared(tmp_path, paper_file):
    root = write_complete(tmp_path / "results", legacy=True)
    df = report.load_results(root)
    assert set(df["backbone"]) == {"unknown"} and set(df["checkpoint"]) == {"unknown"}
    summary = report.summarize(df, report.load_paper_numbers(paper_file))
    c = cell(summary, dataset="btad", metric="image_auroc", averaging="macro")
    assert c["backbone"] == "unknown" and c["mean"] == pytest.approx(91.0)
    assert math.isnan(c["paper"]) and c["not_compared"] == "backbone"
    markdown = report.render_markdown(summary)
    assert "unknown = a metrics.csv written before the backbone column" in markdown


def test_float_rounding_past_one_is_not_an_error(tmp_path):
    root = tmp_path / "results"
    write_run(root, "s", "v", 42, "mvtec", {("btad", "01", "pixel_aupro"): 1.0000000000000002})
    assert report.load_results(root)["value"].iloc[0] == 1.0000000000000002


def test_reading_matches_results_read_metrics(tmp_path):
    from feclip.results import read_metrics

    root = tmp_path / "results"
    new = write_run(root, "s", "a", 42, "mvtec", RUNS[("spread3", 456)])
    old = write_run(root, "s", "b", 42, "mvtec", RUNS[("spread3", 456)], legacy=True)
    df = report.load_results(root)
    for path in (new, old):
        ours = df[df["source"] == str(path)].drop(columns="source").to_dict("records")
        theirs = read_metrics(path)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert {k: v for k, v in a.items() if k != "value"} == {
                k: v for k, v in b.items() if k != "value"
            }
            assert a["value"] == b["value"] or (math.isnan(a["value"]) and math.isnan(b["value"]))


def test_mixed_legacy_and_new_runs_of_one_variant_get_separate_rows(tmp_path):
    root = tmp_path / "results"
    write_run(root, "s", "v", 42, "mvtec", COMPLETE[42], legacy=True)
    write_run(root, "s", "v", 123, "mvtec", COMPLETE[123])
    summary = report.summarize(report.load_results(root))
    rows = summary[(summary["dataset"] == "btad") & (summary["metric"] == "image_auroc")]
    assert sorted(zip(rows["backbone"], rows["n_seeds"])) == [(PAPER_BB, 1), ("unknown", 1)]


def test_paired_differences_stay_within_a_backbone(tmp_path):
    root = tmp_path / "results"
    for seed, values in COMPLETE.items():
        write_run(root, "s", "a", seed, "mvtec", values)
        write_run(root, "s", "b", seed, "mvtec", {k: v - 0.01 for k, v in values.items()})
        write_run(root, "s", "c", seed, "mvtec", values, backbone=TINY_BB)  # only on the tiny backbone
    paired = report.paired_differences(report.macro_per_seed(report.load_results(root)))
    assert set(zip(paired["variant_a"], paired["variant_b"], paired["backbone"])) == {("a", "b", PAPER_BB)}
    p = cell(paired, dataset="btad", metric="image_auroc")
    assert p["mean_diff"] == pytest.approx(1.0) and p["n_shared"] == 2
    assert list(paired.columns) == report.PAIRED_COLUMNS


def test_backbone_labels_keep_a_hash_prefix_only_when_needed():
    other = "ViT-L-14-336-quickgelu:openai@sha256=999999999999"
    labels = backbones._backbone_labels([PAPER_BB, other, "feclip-tiny:random", "unknown"])
    assert labels[PAPER_BB] == "ViT-L-14-336-quickgelu:openai@3f2a9c0b"
    assert labels[other] == "ViT-L-14-336-quickgelu:openai@99999999"
    assert labels["feclip-tiny:random"] == "feclip-tiny:random" and labels["unknown"] == "unknown"
    assert report.backbone_label(FILE_BB) == "ViT-L-14-336-quickgelu:file:ViT-L-14-336.pt"
    assert report.backbone_group("ViT-L-14-336-quickgelu:random(seed=7)") == "ViT-L-14-336-quickgelu:random"
    assert report.backbone_group(PAPER_BB) == PAPER_BB


# --------------------------------------------------------------------------------------------------
# category coverage
# --------------------------------------------------------------------------------------------------


def test_incomplete_macro_is_flagged_and_never_compared(tree, paper_file):
    summary = report.summarize(report.load_results(tree), report.load_paper_numbers(paper_file))
    # VisA has 12 official categories, the tree holds candle and pcb1; BTAD has 3, the tree 01 and 02
    c = cell(summary, variant="spread3", dataset="visa", metric="image_auroc", averaging="macro")
    assert c["categories"] == "2/12" and c["incomplete"]
    assert math.isnan(c["paper"]) and math.isnan(c["gap"]) and c["not_compared"] == "incomplete"
    c = cell(summary, variant="spread3", dataset="btad", metric="image_auroc", averaging="macro")
    assert c["categories"] == "2/3" and c["incomplete"] and c["not_compared"] == "incomplete"
    micro = cell(summary, variant="spread3", dataset="visa", metric="image_auroc", averaging="micro")
    assert micro["categories"] == "2/12" and micro["incomplete"]  # pools the same two categories
    assert summary["paper"].isna().all()
    markdown = report.render_markdown(summary)
    assert "| spread3 | ViT-L-14-336-quickgelu:openai | mvtec | visa | 85.3 ± 2.5 (3)‡ |  |  |" in markdown
    assert "(2)†‡" in markdown  # last4/btad: fewer seeds and incomplete
    assert "‡ incomplete macro: the categories averaged are not the dataset's official list" in markdown
    assert "(visa 2/12, btad 2/3)" in markdown
    assert r"$^\ddagger$" in report.render_latex(summary)


def test_coverage_of_datasets_without_an_official_list(tmp_path):
    root = tmp_path / "results"
    three = {("synthetic", c, "pixel_auroc"): 0.7 for c in ("gravel", "cat", "rocket")}
    write_run(root, "s", "full", 42, "none", three)
    write_run(root, "s", "full", 123, "none", three)
    write_run(root, "s", "ragged", 42, "none", three)
    write_run(root, "s", "ragged", 123, "none", dict(list(three.items())[:2]))  # a category missing
    summary = report.summarize(report.load_results(root))
    full = cell(summary, variant="full", averaging="macro")
    assert full["categories"] == "3" and not full["incomplete"]
    ragged = cell(summary, variant="ragged", averaging="macro")
    assert ragged["categories"] == "2-3" and ragged["incomplete"]  # the seeds average different sets
    assert "(synthetic 2-3)" in report.render_markdown(summary)


def test_categories_outside_the_official_list_make_a_macro_incomplete(tmp_path, paper_file):
    root = tmp_path / "results"
    values = {("btad", c, "image_auroc"): 0.9 for c in ("01", "02", "03", "04")}
    write_run(root, "s", "v", 42, "mvtec", values)
    summary = report.summarize(report.load_results(root), report.load_paper_numbers(paper_file))
    c = cell(summary, averaging="macro")
    assert c["categories"] == "3/3 +1 other" and c["incomplete"] and math.isnan(c["paper"])


def test_skipped_nan_categories_do_not_count(tmp_path, paper_file):
    root = tmp_path / "results"
    values = {
        ("btad", "01", "image_auroc"): 0.9,
        ("btad", "02", "image_auroc"): NAN,
        ("btad", "03", "image_auroc"): 0.8,
    }
    write_run(root, "s", "v", 42, "mvtec", values)
    df = report.load_results(root)
    paper = report.load_paper_numbers(paper_file)
    c = cell(report.summarize(df, paper), averaging="macro")
    assert c["categories"] == "3/3" and math.isnan(c["mean"]) and c["not_compared"] == ""
    c = cell(report.summarize(df, paper, skip_nan=True), averaging="macro")
    # only 01 and 02 are averaged (85.0): two of the three categories, not the paper's macro
    assert c["categories"] == "2/3" and c["incomplete"] and c["mean"] == pytest.approx(85.0)
    assert math.isnan(c["paper"]) and c["not_compared"] == "incomplete"


def test_official_lists_come_from_the_dataset_registry():
    assert report.official_categories("mvtec")[:2] == ("bottle", "cable")
    assert len(report.official_categories("mvtec")) == 15 and len(report.official_categories("visa")) == 12
    assert report.official_categories("synthetic") is None and report.official_categories("folder") is None
    assert report.official_categories("no_such_dataset") is None


# --------------------------------------------------------------------------------------------------
# the reproduction study's numbers (--study-numbers)
# --------------------------------------------------------------------------------------------------

STUDY_CSV = """\
# test copy of a study table: percent, macro, 5 seeds.
# 336x336 centre crop, no map smoothing, fc_patch lr = adapter lr / 100.
taps,train,dataset,image_auroc,image_auroc_std,image_ap,pixel_auroc,pixel_auroc_std
last4,visa,mvtec,91.0,0.4,95.9,90.9,0.1
last4,mvtec,visa,87.8,0.3,90.0,92.6,0.2
last4,mvtec,btad,87.4,1.1,94.2,85.9,0.4
spread3,visa,mvtec,90.7,0.3,95.6,91.1,0.1
spread3,mvtec,visa,88.2,0.4,90.3,93.7,0.1
spread3,mvtec,btad,89.8,0.4,93.3,87.5,-
"""
BENCH = "benchmark_taps"
SPREAD3_MVTEC = "protocol=visa_to_mvtec,taps=spread3"  # Hydra's override string: the variant name
LAST4_STUDY3 = "taps=last4,protocol=study3"  # the items in another order
NO_TAPS = "protocol=study3"  # the taps default ran, but the name does not say which


def full(dataset: str, bases: dict[str, float]) -> dict:
    """Every official category of ``dataset`` (``feclip.data.dataset_info``), each metric at its base
    value except the first two categories at base + 0.02 and base - 0.02: the macro is the base."""
    from feclip.data import dataset_info

    values = {}
    for metric, base in bases.items():
        for i, category in enumerate(dataset_info(dataset).categories):
            values[(dataset, category, metric)] = base + {0: 0.02, 1: -0.02}.get(i, 0.0)
    return values


# (variant, train) -> seed -> values; per-seed macros are the bases, the means over seeds in the comments.
BENCH_RUNS = {
    (SPREAD3_MVTEC, "visa"): {
        42: full("mvtec", {"image_auroc": 0.905, "image_ap": 0.950, "pixel_auroc": 0.912})
        | {("mvtec", "__micro__", "image_auroc"): 0.90},
        123: full("mvtec", {"image_auroc": 0.915, "image_ap": 0.960, "pixel_auroc": 0.914})
        | {("mvtec", "__micro__", "image_auroc"): 0.92},
    },  # 91.0, 95.5, 91.3
    (LAST4_STUDY3, "mvtec"): {
        42: full("visa", {"image_auroc": 0.880, "pixel_auroc": 0.930})
        | full("btad", {"image_auroc": 0.870, "pixel_auroc": 0.860}),
        123: full("visa", {"image_auroc": 0.884, "pixel_auroc": 0.932})
        | full("btad", {"image_auroc": 0.880, "pixel_auroc": 0.862}),
    },  # visa 88.2, 93.1; btad 87.5, 86.1
    (NO_TAPS, "mvtec"): {
        42: full("visa", {"image_auroc": 0.880}),
        123: full("visa", {"image_auroc": 0.884}),
    },  # 88.2
    ("protocol=study3,taps=spread3", "mvtec"): {  # two of BTAD's three categories: incomplete
        seed: {("btad", "01", "image_auroc"): 0.9, ("btad", "02", "image_auroc"): 0.9} for seed in (42, 123)
    },
}


@pytest.fixture
def bench_tree(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    for (variant, train), seeds in BENCH_RUNS.items():
        for seed, values in seeds.items():
            write_run(root, BENCH, variant, seed, train, values)
            if variant == SPREAD3_MVTEC:  # the same runs on the tiny random fallback, 0.3 lower
                lower = {k: v - 0.3 for k, v in values.items()}
                write_run(root, BENCH, variant, seed, train, lower, backbone=TINY_BB, folder="laptop")
    return root


@pytest.fixture
def study_file(tmp_path: Path) -> Path:
    path = tmp_path / "study_numbers.csv"
    path.write_text(STUDY_CSV)
    return path


@pytest.mark.parametrize(
    ("variant", "taps"),
    [
        ("protocol=visa_to_mvtec,taps=spread3", "spread3"),
        ("taps=last4,protocol=study3", "last4"),
        ("taps=last4", "last4"),
        ("+taps=last4", "last4"),
        ("eval,protocol=study3,taps=last4,ckpt=1a2b3c4d", "last4"),  # feclip-eval, an adapter file
        ("data.targets=[candle,taps=x],taps=spread3", "spread3"),  # commas inside brackets stay in the item
        ("protocol=study3", None),
        ("default", None),
        ("mytaps=spread3,model.n_taps=4", None),
        ("taps=", None),
        ("model.taps=[15,18,21,23],protocol=study3", None),
        (
            "model.taps=[15,18,21,23],taps=spread3",
            None,
        ),  # the set's layers replaced: its name no longer holds
    ],
)
def test_variant_taps(variant, taps):
    assert report.variant_taps(variant) == taps


def test_study_numbers_load_long_with_stds(study_file):
    study = report.load_study_numbers(study_file)
    assert list(study.columns) == ["taps", "train_dataset", "dataset", "metric", "study_mean", "study_std"]
    assert len(study) == 6 * 3  # 6 rows x 3 metrics
    c = cell(study, taps="spread3", train_dataset="visa", dataset="mvtec", metric="image_auroc")
    assert c["study_mean"] == 90.7 and c["study_std"] == 0.3
    c = cell(study, taps="spread3", train_dataset="visa", dataset="mvtec", metric="image_ap")
    assert c["study_mean"] == 95.6 and math.isnan(c["study_std"])  # no image_ap_std column
    c = cell(study, taps="spread3", train_dataset="mvtec", dataset="btad", metric="pixel_auroc")
    assert c["study_mean"] == 87.5 and math.isnan(c["study_std"])  # '-': not reported
    assert study.attrs["source"] == str(study_file)
    assert study.attrs["comments"][1].startswith("336x336 centre crop, no map smoothing")


def test_the_repositorys_study_numbers_load():
    path = report.STUDY_NUMBERS
    assert path == report.DEFAULT_PAPER.parent / "study_numbers.csv"
    study = report.load_study_numbers(path)
    assert set(study["taps"]) == {"spread3", "last4"} and len(study) == 18
    assert set(zip(study["train_dataset"], study["dataset"])) == {
        ("visa", "mvtec"),
        ("mvtec", "visa"),
        ("mvtec", "btad"),
    }
    assert cell(study, taps="last4", train_dataset="mvtec", dataset="btad", metric="image_auroc")[
        "study_std"
    ] == pytest.approx(1.1)
    assert "no map smoothing" in " ".join(study.attrs["comments"])


def test_study_gap_in_points(bench_tree, study_file):
    summary = report.summarize(report.load_results(bench_tree), study=report.load_study_numbers(study_file))

    def row(variant, dataset, metric, backbone=PAPER_BB, averaging="macro"):
        return cell(
            summary, variant=variant, dataset=dataset, metric=metric, backbone=backbone, averaging=averaging
        )

    # spread3, trained on VisA, on MVTec AD: ours 91.0, 95.5, 91.3; the study 90.7 ± 0.3, 95.6, 91.1 ± 0.1
    for metric, ours, study, std in [
        ("image_auroc", 91.0, 90.7, 0.3),
        ("image_ap", 95.5, 95.6, NAN),
        ("pixel_auroc", 91.3, 91.1, 0.1),
    ]:
        c = row(SPREAD3_MVTEC, "mvtec", metric)
        assert c["categories"] == "15/15" and c["mean"] == pytest.approx(ours)
        assert c["study_mean"] == study and c["gap_study"] == pytest.approx(ours - study)
        assert c["study_std"] == std if not math.isnan(std) else math.isnan(c["study_std"])
        assert c["not_compared_study"] == ""
    # last4 trained on MVTec AD ("taps=last4,protocol=study3": the order of the items does not matter)
    for dataset, metric, ours, study in [
        ("visa", "image_auroc", 88.2, 87.8),  # +0.4
        ("visa", "pixel_auroc", 93.1, 92.6),  # +0.5
        ("btad", "image_auroc", 87.5, 87.4),  # +0.1
        ("btad", "pixel_auroc", 86.1, 85.9),  # +0.2
    ]:
        c = row(LAST4_STUDY3, dataset, metric)
        assert c["categories"] == ("12/12" if dataset == "visa" else "3/3")
        assert c["mean"] == pytest.approx(ours) and c["study_mean"] == study
        assert c["gap_study"] == pytest.approx(ours - study)
    # the paper columns are independent: no paper file given, none shown
    assert summary["paper"].isna().all() and (summary["not_compared"] == "").all()


def test_rows_the_study_is_not_compared_with(bench_tree, study_file):
    summary = report.summarize(report.load_results(bench_tree), study=report.load_study_numbers(study_file))
    # a variant that names no taps set: not matched (nothing to compare with, no reason to give)
    c = cell(summary, variant=NO_TAPS, metric="image_auroc", averaging="macro")
    assert c["mean"] == pytest.approx(88.2) and math.isnan(c["study_mean"]) and math.isnan(c["gap_study"])
    assert c["not_compared_study"] == ""
    # the tiny random fallback: the study has a number, the row is not comparable
    c = cell(
        summary, variant=SPREAD3_MVTEC, backbone="feclip-tiny:random", metric="image_auroc", averaging="macro"
    )
    assert c["mean"] == pytest.approx(61.0) and c["not_compared_study"] == "backbone"
    assert math.isnan(c["study_mean"]) and math.isnan(c["study_std"]) and math.isnan(c["gap_study"])
    # an incomplete macro (2 of BTAD's 3 categories)
    c = cell(summary, variant="protocol=study3,taps=spread3", metric="image_auroc", averaging="macro")
    assert (
        c["categories"] == "2/3" and c["not_compared_study"] == "incomplete" and math.isnan(c["study_mean"])
    )
    # micro rows are never compared
    c = cell(summary, variant=SPREAD3_MVTEC, backbone=PAPER_BB, metric="image_auroc", averaging="micro")
    assert c["mean"] == pytest.approx(91.0) and math.isnan(c["study_mean"]) and c["not_compared_study"] == ""
    # a metric the study does not report
    assert summary.loc[summary["metric"] == "pixel_aupro_zsad", "study_mean"].isna().all()


def test_study_columns_in_the_tables(bench_tree, study_file):
    summary = report.summarize(report.load_results(bench_tree), study=report.load_study_numbers(study_file))
    markdown = report.render_markdown(summary, study_label="study_numbers.csv (its settings)")
    assert (
        "| variant | backbone | train | dataset | image_auroc | study | study gap | image_ap | study | study gap "
        "| pixel_auroc | study | study gap |" in markdown
    )
    assert (
        "| protocol=visa_to_mvtec,taps=spread3 | ViT-L-14-336-quickgelu:openai | visa | mvtec | 91.0 ± 0.7 (2) "
        "| 90.7 ± 0.3 | +0.3 | 95.5 ± 0.7 (2) | 95.6 | −0.1 | 91.3 ± 0.1 (2) | 91.1 ± 0.1 | +0.2 |"
        in markdown
    )
    assert (
        "| protocol=visa_to_mvtec,taps=spread3 | feclip-tiny:random | visa | mvtec | 61.0 ± 0.7 (2) |  |  "
        "| 65.5 ± 0.7 (2) |  |  | 61.3 ± 0.1 (2) |  |  |" in markdown
    )
    assert (
        "| protocol=study3 | ViT-L-14-336-quickgelu:openai | mvtec | visa | 88.2 ± 0.3 (2) | – | – "
        "|  |  |  |  |  |  |" in markdown
    )
    assert "study: the numbers of study_numbers.csv (its settings)" in markdown
    assert "study gap = ours − study, in points" in markdown and "empty: not compared" in markdown
    assert "never compared with the paper or the study" in markdown  # the incomplete BTAD macro
    tex = report.render_latex(summary, study_label="study_numbers.csv")
    assert r"90.7 $\pm$ 0.3 & +0.3" in tex and "study gap" in tex and "study: the numbers of" in tex


def test_cli_study_numbers(bench_tree, study_file, paper_file, tmp_path, capsys):
    out = tmp_path / "report"
    argv = [str(bench_tree), "--out", str(out), "--paper", str(paper_file), "--no-plots"]
    assert report_app.main(argv + ["--study-numbers", str(study_file)]) == 0
    capsys.readouterr()
    summary = pd.read_csv(out / "summary.csv", keep_default_na=False, na_values=["nan"])
    assert list(summary.columns) == report.SUMMARY_COLUMNS
    c = cell(summary, variant=LAST4_STUDY3, backbone=PAPER_BB, dataset="visa", metric="image_auroc")
    # both references on one row: the paper's VisA 84.6 (trained on MVTec AD) and the study's last4 87.8
    assert c["paper"] == 84.6 and c["gap"] == pytest.approx(88.2 - 84.6)
    assert c["study_mean"] == 87.8 and c["study_std"] == 0.3 and c["gap_study"] == pytest.approx(88.2 - 87.8)
    markdown = (out / "summary.md").read_text()
    # the note names the file and quotes its settings
    assert f"study: the numbers of {study_file}, whose comments read:" in markdown
    assert "336x336 centre crop, no map smoothing, fc_patch lr = adapter lr / 100\". A row's" in markdown
    assert "| 88.2 ± 0.3 (2) | 84.6 | +3.6 | 87.8 ± 0.3 | +0.4 |" in markdown
    assert "study gap" in (out / "summary.tex").read_text()
    # off by default: the columns exist, empty, and the tables have no study columns
    assert report_app.main(argv) == 0
    capsys.readouterr()
    summary = pd.read_csv(out / "summary.csv", keep_default_na=False, na_values=["nan"])
    assert list(summary.columns) == report.SUMMARY_COLUMNS
    assert summary["study_mean"].isna().all() and summary["gap_study"].isna().all()
    assert (summary["not_compared_study"] == "").all()
    assert "study gap" not in (out / "summary.md").read_text()


def test_reproduce_study_compares_with_the_study():
    makefile = Path(__file__).resolve().parent.parent / "Makefile"
    recipe = makefile.read_text().split("\nreproduce-study:", 1)[1].split("\n\n", 1)[0]
    report_lines = [line for line in recipe.splitlines() if "feclip-report" in line]
    assert (
        len(report_lines) == 1 and "--study-numbers feclip/report/paper/study_numbers.csv" in report_lines[0]
    )


# --------------------------------------------------------------------------------------------------
# outputs and CLI
# --------------------------------------------------------------------------------------------------


def test_cli_writes_every_output(tree, paper_file, tmp_path, capsys):
    from matplotlib.image import imread

    write_complete(tree)  # a study with complete macros: the paper bars have something to show
    out = tmp_path / "report"
    assert report_app.main([str(tree), "--out", str(out), "--paper", str(paper_file)]) == 0
    printed = capsys.readouterr().out
    assert (
        "## Study `taps`" in printed and "## Study `bench`" in printed and "### Paired differences" in printed
    )
    expected = [
        "summary.csv",
        "summary.md",
        "summary.tex",
        "paired.csv",
        "study_taps_image_auroc.png",
        "study_taps_pixel_aupro_zsad.png",
        "study_bench_image_auroc.png",
        "bars_image_auroc.png",
    ]
    for name in expected + ["bars_pixel_aupro_zsad.png"]:
        assert (out / name).is_file(), name
        assert f"wrote {out / name}" in printed
    for png in out.glob("*.png"):
        image = imread(png)
        assert image.ndim == 3 and np.ptp(image) > 0, f"{png.name} is blank"
    summary = pd.read_csv(out / "summary.csv", keep_default_na=False, na_values=["nan"])
    assert list(summary.columns) == report.SUMMARY_COLUMNS
    c = cell(summary, study="bench", dataset="btad", metric="image_auroc")
    assert c["backbone"] == PAPER_BB and c["categories"] == "3/3" and c["paper"] == 90.3
    c = cell(
        summary, study="taps", variant="spread3", dataset="visa", metric="image_auroc", averaging="macro"
    )
    assert c["categories"] == "2/12" and c["incomplete"] and c["not_compared"] == "incomplete"
    assert list(pd.read_csv(out / "paired.csv").columns) == report.PAIRED_COLUMNS
    tex = (out / "summary.tex").read_text()
    assert (
        r"\begin{tabular}" in tex
        and r"85.3 $\pm$ 2.5 (3)$^\ddagger$" in tex
        and r"pixel\_aupro\_zsad: PRO (zsad, FPR$<$0.3)" in tex
    )
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_default_out_dir_and_markdown_dash_for_one_seed(tree):
    assert report_app.main([str(tree), "--no-paper", "--no-plots"]) == 0
    markdown = (tree / "report" / "summary.md").read_text()
    assert "84.0 ± – (1)†‡" in markdown  # last3: one seed, std undefined (and 2 of VisA's 12 categories)
    assert "nan ± – (3)‡" in markdown  # spread3 pixel_aupro_zsad: a nan category
    assert "**−2.33 [−3.77, −0.90] (3)**" in markdown  # last4 - spread3 on VisA image AUROC
    assert "| paper |" not in markdown  # --no-paper: no paper columns


def test_report_does_not_import_torch(tmp_path):
    root = tmp_path / "results"
    write_run(root, "s", "v", 42, "visa", {("mvtec", "bottle", "image_auroc"): 0.9})
    # the whole report, with the dataset registry's category lists and the plots
    code = (
        "import sys; from feclip import report; from feclip.apps.report import main; "
        f"assert main([{str(root)!r}, '--no-paper']) == 0; "
        "assert report.official_categories('mvtec'); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# --------------------------------------------------------------------------------------------------
# errors: one line "feclip-report: error: ...", exit status 2, no traceback, nothing half-written
# --------------------------------------------------------------------------------------------------


def fails(capsys, *argv) -> str:
    """Run the CLI in-process; it must return 2 with a single error line on stderr and print nothing else."""
    assert report_app.main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("feclip-report: error: "), captured.err
    assert captured.out == ""
    return lines[0]


def csv_line(**fields) -> str:
    """One valid metrics.csv data line of the 14-column schema, with some fields replaced."""
    row = dict(zip(HEADER, ["taps", "last4", "42", "mvtec", "visa", "candle", "image_auroc", "0.5", "10"]))
    row.update(git_sha="a", config_hash="b", finished_at="c", backbone=PAPER_BB, checkpoint="trained")
    row.update(fields)
    return ",".join(row[c] for c in HEADER) + "\n"


GOOD = csv_line()
HEAD = ",".join(HEADER) + "\n"


def test_cli_malformed_csv_exits_2_naming_the_file_and_line(tree):
    bad = tree / "taps" / "spread3" / "seed=42" / "metrics.csv"
    bad.write_text(HEAD + GOOD + csv_line(value="not-a-number"))
    result = subprocess.run(
        [sys.executable, "-m", "feclip.report", str(tree), "--no-plots"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"feclip-report: error: malformed metrics file {bad}: line 3: value 'not-a-number' is not a number\n"
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "empty file, no header line"),
        ("a,b,c\n1,2,3\n", "line 1: columns a,b,c are neither the metrics.csv schema"),
        (HEAD + "taps,last4,42,mvtec,visa,candle\n", "line 2 has 6 fields, expected 14"),
        (HEAD + GOOD.strip() + ",extra\n", "line 2 has 15 fields, expected 14"),
        (",".join(LEGACY_HEADER) + "\n" + GOOD, "line 2 has 14 fields, expected 12"),
        (HEAD + GOOD + GOOD + csv_line(value="abc"), "line 4: value 'abc' is not a number"),
        (HEAD + csv_line(value="85.3"), "line 2: value 85.3 of image_auroc is outside [0, 1]"),
        (HEAD + csv_line(value="inf"), "line 2: value inf of image_auroc is outside [0, 1]"),
        (HEAD + csv_line(value="-0.01"), "line 2: value -0.01 of image_auroc is outside [0, 1]"),
        (HEAD + csv_line(seed="4x2"), "line 2: seed '4x2' is not an integer"),
        (HEAD + csv_line(n_images=""), "line 2: n_images '' is not an integer"),
        (HEAD + csv_line(metric=""), "line 2: empty metric"),
        (HEAD + csv_line(backbone=" "), "line 2: empty backbone"),
        (HEAD + GOOD + '"taps,last4\n', "line 3: unexpected end of data"),
        ("\n".join(HEADER) + "\n", "line 1: columns study are neither"),
    ],
)
def test_malformed_metrics_files(tree, capsys, content, expected):
    bad = tree / "taps" / "last4" / "seed=42" / "metrics.csv"
    bad.write_text(content)
    message = fails(capsys, tree, "--no-plots", "--no-paper")
    assert f"malformed metrics file {bad}: {expected}" in message
    with pytest.raises(report.ReportError, match="malformed metrics file .*last4"):
        report.load_results(tree)


def test_unreadable_metrics_files(tree, capsys):
    bad = tree / "taps" / "last4" / "seed=42" / "metrics.csv"
    bad.write_bytes(HEAD.encode() + b"taps,last4,42,mvtec,visa,\xff\xfe,image_auroc,0.5,10,a,b,c,x,y\n")
    assert f"malformed metrics file {bad}: not UTF-8 text" in fails(capsys, tree, "--no-paper")
    bad.unlink()
    bad.mkdir()  # a folder named metrics.csv
    assert f"cannot read metrics file {bad}: Is a directory" in fails(capsys, tree, "--no-paper")


def test_results_folder_errors(tree, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert f"results folder {missing} does not exist" in fails(capsys, missing)
    a_file = tree / "taps" / "spread3" / "seed=42" / "metrics.csv"
    assert f"results folder {a_file} is a file, not a folder" in fails(capsys, a_file)
    (tmp_path / "empty").mkdir()
    assert f"no metrics.csv under {tmp_path / 'empty'}" in fails(capsys, tmp_path / "empty")
    write_run(tmp_path / "header_only", "s", "v", 42, "mvtec", {})
    assert "hold no rows" in fails(capsys, tmp_path / "header_only")


def test_duplicate_runs_are_an_error(tree, capsys):
    original = tree / "taps" / "spread3" / "seed=42" / "metrics.csv"
    copy = tree / "backup" / "spread3" / "seed=42" / "metrics.csv"
    copy.parent.mkdir(parents=True)
    copy.write_text(original.read_text())
    with pytest.raises(report.ReportError, match="duplicate results"):
        report.load_results(tree)
    message = fails(capsys, tree, "--no-paper")
    assert "duplicate results for study=taps variant=spread3 seed=42" in message
    assert f"in {copy} and {original}" in message and "keep one copy per run" in message


def test_the_same_run_on_two_random_inits_is_a_duplicate(tmp_path, capsys):
    root = tmp_path / "results"
    write_run(root, "s", "v", 42, "mvtec", COMPLETE[42], backbone="feclip-tiny:random(seed=42)")
    write_run(root, "s", "v", 42, "mvtec", COMPLETE[42], backbone="feclip-tiny:random(seed=7)", folder="x")
    assert "duplicate results" in fails(capsys, root, "--no-paper")


PAPER_HEAD = "method,setting,dataset,image_auroc,image_ap,pixel_auroc,pixel_aupro\n"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "empty file"),
        ("method,setting,dataset\nFE-CLIP,zero_shot,visa\n", "missing columns"),
        (
            PAPER_HEAD + "FE-CLIP,zero_shot,visa,84.6,abc,95.9,92.8\n",
            "dataset visa, column image_ap: 'abc' is not a number",
        ),
        (
            PAPER_HEAD + "AnomalyCLIP,zero_shot,visa,82.1,85.4,95.5,87.0\n",
            "no row with method=FE-CLIP and setting=zero_shot",
        ),
        (PAPER_HEAD + "FE-CLIP,zero_shot,visa,84.6,86.6,95.9,92.8\n" * 2, "dataset visa appears twice"),
        (
            PAPER_HEAD + "FE-CLIP,zero_shot,visa,0.846,0.866,0.959,0.928\n",
            "the file holds percent, not fractions",
        ),
        (
            PAPER_HEAD + "FE-CLIP,zero_shot,visa,846,86.6,95.9,92.8\n",
            "column image_auroc: 846.0 is not a percentage",
        ),
        (PAPER_HEAD + "FE-CLIP,zero_shot,visa,84.6,86.6,95.9,92.8,1,2\n", "cannot read paper numbers"),
    ],
)
def test_bad_paper_files(tree, tmp_path, capsys, content, expected):
    paper = tmp_path / "paper.csv"
    paper.write_text(content)
    message = fails(capsys, tree, "--paper", paper, "--no-plots")
    assert str(paper) in message and expected in message


def test_paper_file_missing_or_a_folder(tree, tmp_path, capsys):
    missing = tmp_path / "nope.csv"
    assert f"--paper: paper numbers file {missing} does not exist" in fails(capsys, tree, "--paper", missing)
    assert f"--paper: {tmp_path} is not a file" in fails(capsys, tree, "--paper", tmp_path)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert f"paper numbers {binary}: not UTF-8 text" in fails(capsys, tree, "--paper", binary)


def test_unknown_baseline_and_metrics_are_errors(tree, capsys):
    message = fails(capsys, tree, "--baseline", "nope", "--no-paper")
    assert "--baseline 'nope' is not a value of any study's axes (valid: last3, last4, spread3)" in message
    message = fails(capsys, tree, "--metrics", "image_auroc,image_aurc", "--no-paper")
    assert "--metrics: image_aurc not in" in message and "image_auroc" in message
    assert "--metrics: none given" in fails(capsys, tree, "--metrics", ",", "--no-paper")
    # a known metric the runs did not compute is fine (shown where present), and so is "all"
    assert report_app.main([str(tree), "--metrics", "all", "--no-paper", "--no-plots"]) == 0


def test_output_folder_that_is_a_file(tree, tmp_path, capsys):
    a_file = tmp_path / "out.txt"
    a_file.write_text("keep me")
    assert f"output folder {a_file}: {a_file} is a file, not a folder" in fails(capsys, tree, "--out", a_file)
    below = a_file / "report"
    assert f"output folder {below}: {a_file} is a file, not a folder" in fails(capsys, tree, "--out", below)
    assert a_file.read_text() == "keep me"


def test_output_folder_that_is_not_writable(tree, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    monkeypatch.setattr(write.os, "access", lambda path, mode: False)
    assert f"output folder {out}: {out} is not writable" in fails(capsys, tree, "--out", out)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_folder_that_is_read_only(tree, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert "is not writable" in fails(capsys, tree, "--out", out, "--no-paper")
        assert "is not writable" in fails(capsys, tree, "--out", out / "sub", "--no-paper")
    finally:
        out.chmod(0o755)


def test_a_failed_write_leaves_the_previous_report_intact(tree, tmp_path, capsys, monkeypatch):
    out = tmp_path / "report"
    assert report_app.main([str(tree), "--out", str(out), "--no-paper", "--no-plots"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"summary.csv", "paired.csv", "summary.md", "summary.tex"}

    # a new run changes every table; the disk fills up while the third file is written
    write_run(tree, "taps", "spread3", 789, "mvtec", RUNS[("spread3", 42)])
    real, calls = write._write_bytes, []

    def disk_full(path, data):
        calls.append(path)
        if len(calls) == 3:
            real(path, data[: len(data) // 2])  # half the file reaches the disk, then the error
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(write, "_write_bytes", disk_full)
    message = fails(capsys, tree, "--out", out, "--no-paper", "--no-plots")
    assert f"cannot write {out / 'summary.md'}: No space left on device" in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary file, nothing changed

    # bad input on the next run: the report is not touched either
    monkeypatch.setattr(write, "_write_bytes", real)
    (tree / "taps" / "last4" / "seed=42" / "metrics.csv").write_text(HEAD + csv_line(value="x"))
    assert "malformed metrics file" in fails(capsys, tree, "--out", out, "--no-paper", "--no-plots")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_folder_in_place_of_an_output_file(tree, tmp_path, capsys):
    out = tmp_path / "report"
    (out / "summary.md").mkdir(parents=True)
    assert f"cannot write {out / 'summary.md'}: it is a folder" in fails(
        capsys, tree, "--out", out, "--no-paper"
    )
    assert sorted(p.name for p in out.iterdir()) == ["summary.md"]


STUDY_HEAD = "# comment line\ntaps,train,dataset,image_auroc,image_auroc_std,image_ap\n"
STUDY_GOOD = "last4,visa,mvtec,91.0,0.4,95.9\n"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "empty file"),
        ("# only a comment\n", "empty file"),
        (STUDY_HEAD, "no rows below the header"),
        ("taps,dataset,image_auroc\nlast4,mvtec,91.0\n", "missing columns ['train']"),
        ("taps,train,dataset\nlast4,visa,mvtec\n", "no metric column"),
        (
            "taps,train,dataset,image_aurc\nlast4,visa,mvtec,91.0\n",
            "column 'image_aurc' is not one of our metrics",
        ),
        (
            "taps,train,dataset,image_auroc,pixel_auroc_std\nlast4,visa,mvtec,91.0,0.1\n",
            "column 'pixel_auroc_std' is the std of 'pixel_auroc', a column the file lacks",
        ),
        ("taps,train,dataset,image_auroc,image_auroc\n", "line 1: column 'image_auroc' appears twice"),
        (
            STUDY_HEAD + STUDY_GOOD + "spread3,visa,mvtec,abc,0.3,95.6\n",
            "line 4, column image_auroc: 'abc' is not a number",
        ),
        (
            STUDY_HEAD + "spread3,visa,mvtec,90.7,x,95.6\n",
            "line 3, column image_auroc_std: 'x' is not a number",
        ),
        (
            STUDY_HEAD + "spread3,visa,mvtec,nan,0.3,95.6\n",
            "line 3, column image_auroc: 'nan' is not a number",
        ),
        (
            STUDY_HEAD + "spread3,visa,mvtec,907,0.3,95.6\n",
            "line 3, column image_auroc: 907 is not a percentage in [0, 100]",
        ),
        (
            STUDY_HEAD + "spread3,visa,mvtec,90.7,-0.3,95.6\n",
            "line 3, column image_auroc_std: -0.3 is not a standard deviation in [0, 100]",
        ),
        (
            STUDY_HEAD + "spread3,visa,mvtec,-,0.3,95.6\n",
            "line 3: image_auroc_std 0.3 without a image_auroc value",
        ),
        (STUDY_HEAD + "spread3,visa,mvtec,0.907,0.003,0.956\n", "the file holds percent, not fractions"),
        (STUDY_HEAD + "spread3,visa,mvtec,-,-,-\n", "no value"),
        (
            STUDY_HEAD + STUDY_GOOD + "spread3,visa,mvtec,90.7,0.3,95.6,1\n",
            "line 4 has 7 fields, the header 6",
        ),
        (STUDY_HEAD + ",visa,mvtec,90.7,0.3,95.6\n", "line 3: empty taps"),
        (
            STUDY_HEAD + STUDY_GOOD + "spread3,visa,mvtec,90.7,0.3,95.6\n" + STUDY_GOOD,
            "lines 3 and 5 both give taps=last4 train=visa dataset=mvtec; keep one",
        ),
        (STUDY_HEAD + 'last4,"visa,mvtec,91.0\n', "line 3:"),
    ],
)
def test_bad_study_numbers(tree, tmp_path, capsys, content, expected):
    bad = tmp_path / "study.csv"
    bad.write_text(content)
    message = fails(capsys, tree, "--study-numbers", bad, "--no-paper", "--no-plots")
    assert str(bad) in message and "study numbers" in message and expected in message
    with pytest.raises(report.ReportError):
        report.load_study_numbers(bad)


def test_study_numbers_file_missing_or_a_folder_or_binary(tree, tmp_path, capsys):
    missing = tmp_path / "nope.csv"
    message = fails(capsys, tree, "--study-numbers", missing, "--no-paper")
    assert f"--study-numbers: study numbers file {missing} does not exist" in message
    assert f"--study-numbers: {tmp_path} is not a file" in fails(capsys, tree, "--study-numbers", tmp_path)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert f"study numbers {binary}: not UTF-8 text" in fails(capsys, tree, "--study-numbers", binary)


# --------------------------------------------------------------------------------------------------
# figures a reader can read: short labels, per dataset, error bars, honest axes; names of the AUPROs
# --------------------------------------------------------------------------------------------------

TAPS8 = ["spread3", "last4", "last5", "last3", "spread4", "mix_late", "late_skip1", "stages"]
POLICIES = ["lr_div_100", "same"]
DIRECTIONS = {"visa_to_mvtec": ("visa", ["mvtec"]), "mvtec_to_visa": ("mvtec", ["visa", "btad"])}
SEEDS5 = [42, 123, 456, 789, 1024]
PANELS = ["mvtec (trained on visa)", "visa (trained on mvtec)", "btad (trained on mvtec)"]


def write_two_axis_study(root: Path, taps=TAPS8, policies=POLICIES, study: str = "taps_fc") -> Path:
    """taps (8) x fc_patch policy (2) x protocol (2), 5 seeds, every official category of MVTec AD, VisA
    and BTAD (complete macros, compared with the paper); values from a seeded generator."""
    rng = np.random.default_rng(0)
    metrics = ["image_auroc", "image_ap", "pixel_auroc", "pixel_aupro", "pixel_aupro_zsad"]
    for t, taps_set in enumerate(taps):
        for p, policy in enumerate(policies):
            for protocol, (train, targets) in DIRECTIONS.items():
                variant = f"protocol={protocol},taps={taps_set},train.fc_patch.policy={policy}"
                for seed in SEEDS5:
                    values = {
                        (dataset, category, metric): float(
                            np.clip(0.8 + 0.02 * m - 0.004 * t + 0.01 * p + rng.normal(0, 0.02), 0, 1)
                        )
                        for dataset in targets
                        for category in report.official_categories(dataset)
                        for m, metric in enumerate(metrics)
                    }
                    write_run(root, study, variant, seed, train, values)
    return root


@pytest.fixture(scope="module")
def two_axis(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    root = write_two_axis_study(tmp_path_factory.mktemp("two_axis") / "results")
    paper = tmp_path_factory.mktemp("paper") / "paper_numbers.csv"
    paper.write_text(PAPER_CSV + "FE-CLIP,zero_shot,mvtec,91.9,96.5,92.6,88.3\n")
    return root, report.summarize(report.load_results(root), report.load_paper_numbers(paper))


def short(taps_set: str, policy: str) -> str:
    return f"{taps_set} · {policy.replace('_div_', '/')}"


def png_text(data: bytes) -> dict[str, str]:
    """The text chunks of a PNG."""
    from PIL import Image

    return dict(Image.open(io.BytesIO(data)).text)


def test_variant_axes_and_labels():
    assert report.variant_axes("protocol=visa_to_mvtec,taps=spread3") == {
        "protocol": "visa_to_mvtec",
        "taps": "spread3",
    }
    assert report.variant_axes("eval,eval.map_taps=[15,18,21],+x=1") == {
        "eval.map_taps": "[15,18,21]",
        "x": "1",
        "": "eval",
    }
    cells = pd.DataFrame(
        [
            (f"backbone=tiny,eval.aupro.include_normal={normal},protocol={p},taps={t}", train, dataset)
            for t in ("spread3", "last4")
            for normal in ("true", "false")
            for p, (train, dataset) in {
                "visa_to_mvtec": ("visa", "mvtec"),
                "mvtec_to_visa": ("mvtec", "visa"),
            }.items()
        ],
        columns=["variant", "train_dataset", "dataset"],
    )
    labels, roles = report.variant_labels(cells)
    # protocol is told by the panel, backbone=tiny is the same everywhere: only the swept values remain;
    # a word stands alone, a boolean keeps its axis' last name
    assert roles.studied == ("eval.aupro.include_normal", "taps") and roles.facets == ("protocol",)
    assert roles.fixed == (("backbone", "tiny"),)
    assert labels["backbone=tiny,eval.aupro.include_normal=false,protocol=mvtec_to_visa,taps=last4"] == (
        "include_normal=false · last4"
    )
    # variants that differ only by the panel: the facet's value; one variant alone: its name
    one = pd.DataFrame([("protocol=a_to_b", "a", "b"), ("protocol=c_to_d", "c", "d")], columns=cells.columns)
    assert set(report.variant_labels(one)[0].values()) == {"a_to_b", "c_to_d"}
    assert report.variant_labels(one.iloc[:1])[0] == {"protocol=a_to_b": "protocol=a_to_b"}


def test_two_axis_study_figures_are_readable(two_axis):
    from matplotlib.lines import Line2D

    _, summary = two_axis
    plots = report.study_plots(summary)
    # one figure per question (metric), the main metrics by default
    assert sorted(plots) == [f"study_taps_fc_{m}.png" for m in sorted(report.MAIN_METRICS)]
    expected = [short(t, p) for t in sorted(TAPS8) for p in POLICIES]
    for plot in plots.values():
        fig = plot.figure
        axes = fig.axes
        assert plot.panels == PANELS == [ax.get_title() for ax in axes]  # small multiples per dataset
        # 16 rows, named by the swept values only (the panel tells the protocol), one row each
        assert plot.labels == expected
        assert [t.get_text() for t in axes[0].get_yticklabels()] == expected
        assert "protocol=" not in " ".join(plot.labels) and "ERROR" not in plot.caption
        assert "± 1 sample std over seeds (n = 5 seeds)" in plot.caption
        assert fig.get_figheight() > 16 * 0.25  # grows with the variants
        # legend outside every panel: a figure legend, none inside an axes
        assert fig.legends and all(ax.get_legend() is None for ax in axes)
        # the value axis is zoomed on the data, and says so
        for ax in axes:
            low = ax.get_xlim()[0]
            assert low > 0 and f"axis from {low:.1f} (not 0)" in ax.get_xlabel()
        # the paper's number is a dashed line in every panel (complete macros, the paper's protocol)
        dashed = [
            line.get_xdata()[0]
            for ax in axes
            for line in ax.get_lines()
            if isinstance(line, Line2D) and line.get_linestyle() == "--"
        ]
        assert len(dashed) == 3
        # the saved PNG says what it shows
        meta = png_text(plot.png())
        assert json.loads(meta["feclip.labels"]) == expected and json.loads(meta["feclip.panels"]) == PANELS
    zsad = plots["study_taps_fc_pixel_aupro_zsad.png"]
    assert zsad.title == "study taps_fc: PRO (zsad, FPR<0.3)"
    assert "pixel_aupro_zsad: AnomalyCLIP's evaluation" in zsad.caption
    mvtec = [line.get_xdata()[0] for line in zsad.figure.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert mvtec == [88.3]


def test_report_writes_one_figure_per_metric_and_bars_from_zero(two_axis, tmp_path):
    root, summary = two_axis
    paper = tmp_path / "paper.csv"
    paper.write_text(PAPER_CSV + "FE-CLIP,zero_shot,mvtec,91.9,96.5,92.6,88.3\n")
    out = tmp_path / "report"
    _, written = report.write_report(root, out, paper_path=paper, metrics=["image_auroc", "pixel_aupro"])
    names = {p.name for p in written}
    assert {"study_taps_fc_image_auroc.png", "study_taps_fc_pixel_aupro.png"} <= names
    exact = png_text((out / "study_taps_fc_pixel_aupro.png").read_bytes())
    assert (
        exact["Title"] == "study taps_fc: AUPRO@0.3 (exact)" and "not the paper's PRO" in exact["Description"]
    )
    bars = report.paper_bar_plots(summary)
    assert list(bars) == [  # the paper's metrics, in display order
        "bars_image_auroc.png",
        "bars_image_ap.png",
        "bars_pixel_auroc.png",
        "bars_pixel_aupro_zsad.png",
    ]
    for plot in bars.values():
        assert plot.panels == ["mvtec", "visa", "btad"]
        for ax in plot.figure.axes:
            assert ax.get_xlim()[0] == 0  # bars start at 0
            assert all(patch.get_x() == 0 for patch in ax.patches)
            labels = [t.get_text() for t in ax.get_yticklabels()]
            assert labels[0] == "paper" and "taps_fc: spread3 · lr/100" in labels
    assert bars["bars_pixel_aupro_zsad.png"].title.startswith("PRO (zsad, FPR<0.3): ours vs the paper")


def test_few_variants_stand_side_by_side_and_long_labels_get_a_key(tree, tmp_path):
    plot = report.study_plots(report.summarize(report.load_results(tree)))["study_taps_image_auroc.png"]
    assert [t.get_text() for t in plot.figure.axes[0].get_xticklabels()] == ["last3", "last4", "spread3"]
    assert plot.figure.axes[0].get_ylim()[0] > 0 and "(not 0)" in plot.figure.axes[0].get_ylabel()
    long = tmp_path / "long"
    for i in range(3):
        name = f"model.adapters={'very_long_adapter_setting_' * 3}{i}"
        write_run(long, "s", name, 42, "mvtec", {("btad", "01", "image_auroc"): 0.5 + i / 10})
    plot = report.study_plots(report.summarize(report.load_results(long)))["study_s_image_auroc.png"]
    assert plot.labels == ["V1", "V2", "V3"] and plot.key["V3"].endswith("_2")
    assert "V3  " + plot.key["V3"] in " ".join(t.get_text() for t in plot.figure.texts)


def test_which_aupro_is_named_everywhere(tmp_path, paper_file):
    root = tmp_path / "results"
    for limit in ("0.3", "0.1"):
        for seed in (1, 2):
            values = {
                ("btad", c, m): 0.8 for c in ("01", "02", "03") for m in ("pixel_aupro", "pixel_aupro_zsad")
            }
            write_run(root, "aupro", f"eval.aupro.fpr_limit={limit}", seed, "mvtec", values)
    summary = report.summarize(report.load_results(root), report.load_paper_numbers(paper_file))
    c = cell(summary, variant="eval.aupro.fpr_limit=0.1", metric="pixel_aupro_zsad")
    assert c["metric_label"] == "PRO (zsad, FPR<0.1)" and c["not_compared"] == "aupro"  # not the paper's PRO
    c = cell(summary, variant="eval.aupro.fpr_limit=0.3", metric="pixel_aupro_zsad")
    assert c["metric_label"] == "PRO (zsad, FPR<0.3)" and c["paper"] == 80.4 and c["not_compared"] == ""
    assert cell(summary, variant="eval.aupro.fpr_limit=0.3", metric="pixel_aupro")["metric_label"] == (
        "AUPRO@0.3 (exact)"
    )
    markdown = report.render_markdown(summary, metrics=["pixel_aupro", "pixel_aupro_zsad"])
    # two limits in one table: the header says L, the note says what L is and which AUPRO is which
    assert "| pixel_aupro: AUPRO@L (exact) | pixel_aupro_zsad: PRO (zsad, FPR<L) |" in markdown
    assert "PRO (zsad, FPR<L) = pixel_aupro_zsad: AnomalyCLIP's evaluation code" in markdown
    assert "L = the variant's eval.aupro.fpr_limit" in markdown
    assert "other AUPRO options than the paper's" in markdown
    tex = report.render_latex(summary, metrics=["pixel_aupro_zsad"])
    assert r"pixel\_aupro\_zsad: PRO (zsad, FPR$<$L)" in tex
    titles = {p.title for p in report.study_plots(summary, ["pixel_aupro", "pixel_aupro_zsad"]).values()}
    assert titles == {"study aupro: AUPRO@L (exact)", "study aupro: PRO (zsad, FPR<L)"}


def test_the_report_default_fpr_limit_is_the_metrics_one():
    aupro = pytest.importorskip("feclip.metrics.aupro", exc_type=ImportError)
    from feclip.report import labels

    assert float(labels.DEFAULT_FPR_LIMIT) == aupro.DEFAULT_FPR_LIMIT


def test_baseline_is_a_value_of_the_studied_axis_within_each_protocol(tmp_path):
    root = write_two_axis_study(tmp_path / "results", taps=["spread3", "last4", "stages"], policies=["same"])
    per_seed = report.macro_per_seed(report.load_results(root))
    by_value = report.paired_differences(per_seed, baseline="spread3")
    by_item = report.paired_differences(per_seed, baseline="taps=spread3")
    pd.testing.assert_frame_equal(by_value, by_item)
    # a column per other axis; both protocol halves, each against its own spread3
    assert "protocol" in by_value.columns and "train.fc_patch.policy" not in by_value.columns
    assert set(by_value["protocol"]) == {"visa_to_mvtec", "mvtec_to_visa"}
    assert set(by_value["dataset"]) == {"mvtec", "visa", "btad"}
    for row in by_value.itertuples():
        assert row.variant_b == f"protocol={row.protocol},taps=spread3,train.fc_patch.policy=same"
        assert row.variant_a.startswith(f"protocol={row.protocol},") and row.n_shared == 5
    assert len(by_value) == 2 * (1 + 2) * 5  # 2 variants x 3 (protocol, dataset) cells x 5 metrics
    # the CLI: paired.csv gets the column, the report both halves
    out = tmp_path / "report"
    assert (
        report_app.main([str(root), "--out", str(out), "--no-paper", "--no-plots", "--baseline", "spread3"])
        == 0
    )
    paired = pd.read_csv(out / "paired.csv")
    assert list(paired.columns) == report.PAIRED_COLUMNS[:2] + ["protocol"] + report.PAIRED_COLUMNS[2:]
    assert set(paired["protocol"]) == {"visa_to_mvtec", "mvtec_to_visa"}


def test_bad_baselines_name_the_valid_values(tmp_path, capsys):
    root = tmp_path / "results"
    for normal in ("true", "false"):
        for norm in ("true", "false"):
            variant = f"eval.aupro.include_normal={normal},eval.aupro.per_image_norm={norm}"
            write_run(root, "aupro", variant, 42, "mvtec", {("btad", "01", "pixel_aupro_zsad"): 0.8})
    message = fails(capsys, root, "--baseline", "true", "--no-paper", "--no-plots")
    assert message.endswith(
        "--baseline 'true' is ambiguous in study aupro: name one of eval.aupro.include_normal=true, "
        "eval.aupro.per_image_norm=true"
    )
    message = fails(capsys, root, "--baseline", "maybe", "--no-paper", "--no-plots")
    assert (
        "--baseline 'maybe' is not a value of any study's axes (valid: eval.aupro.include_normal=false, "
        in message
    )
    message = fails(
        capsys, root, "--baseline", "eval.aupro.include_normal=true,eval.aupro.per_image_norm=true"
    )
    assert "names 2 values; name one value of the studied axis" in message
    # a unique axis suffix is enough
    assert report_app.main([str(root), "--baseline", "include_normal=true", "--no-paper", "--no-plots"]) == 0
    paired = pd.read_csv(root / "report" / "paired.csv")
    assert set(paired["variant_b"].str.split(",").str[0]) == {"eval.aupro.include_normal=true"}
    # within each value of the other axis, its column in paired.csv
    norms = paired["eval.aupro.per_image_norm"].astype(str).str.lower()
    assert sorted(norms) == ["false", "true"]
    for norm, a, b in zip(norms, paired["variant_a"], paired["variant_b"]):
        assert a == f"eval.aupro.include_normal=false,eval.aupro.per_image_norm={norm}"
        assert b == f"eval.aupro.include_normal=true,eval.aupro.per_image_norm={norm}"

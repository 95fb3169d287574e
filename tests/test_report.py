"""feclip-report: aggregation over categories and seeds, paired CIs, paper gaps, outputs, CLI errors.

Every expected number below is computed by hand from the values written into the fixture tree; the
arithmetic is in the comments. Fractions in the tree, points (percent) in the report.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from feclip import report
from feclip.metrics import macro_average

NAN = float("nan")
HEADER = [
    "study", "variant", "seed", "train_dataset", "dataset", "category", "metric", "value", "n_images",
    "git_sha", "config_hash", "finished_at",
]  # fmt: skip

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


def write_run(root: Path, study: str, variant: str, seed: int, train: str, values: dict) -> Path:
    """Write one metrics.csv by hand in the results-tree layout."""
    path = root / study / variant / f"seed={seed}" / "metrics.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        for (dataset, category, metric), value in values.items():
            text = "nan" if math.isnan(value) else repr(value)
            writer.writerow(
                [study, variant, seed, train, dataset, category, metric, text, 10, "abc", "h", "t"]
            )
    return path


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


def test_paper_gap_in_points(tree, paper_file):
    summary = report.summarize(report.load_results(tree), report.load_paper_numbers(paper_file))
    c = cell(summary, variant="spread3", dataset="visa", metric="image_auroc", averaging="macro")
    assert c["paper"] == 84.6 and c["gap"] == pytest.approx(85.333333 - 84.6, abs=1e-5)  # +0.733
    c = cell(summary, variant="last4", dataset="visa", metric="pixel_aupro_zsad", averaging="macro")
    # (0.91 + 0.91 + 0.92) / 3 = 0.913333 -> 91.333 - 92.8 = -1.467
    assert c["gap"] == pytest.approx(91.333333 - 92.8, abs=1e-5)
    exact = cell(summary, variant="last4", dataset="visa", metric="pixel_aupro", averaging="macro")
    assert math.isnan(exact["paper"])  # exact AUPRO is not the paper's PRO
    markdown = report.render_markdown(summary)
    assert "| spread3 | mvtec | visa | 85.3 ± 2.5 (3) | 84.6 | +0.7 |" in markdown


def test_paper_number_only_for_the_paper_protocol(tmp_path, paper_file):
    root = tmp_path / "results"
    values = {("visa", "a", "image_auroc"): 0.8}
    write_run(root, "s", "trained_on_btad", 42, "btad", values)  # the paper trains on MVTec for VisA
    write_run(root, "s", "eval_only", 42, "none", values)
    summary = report.summarize(report.load_results(root), report.load_paper_numbers(paper_file))
    assert math.isnan(cell(summary, variant="trained_on_btad", averaging="macro")["paper"])
    assert cell(summary, variant="eval_only", averaging="macro")["paper"] == 84.6


# --------------------------------------------------------------------------------------------------
# outputs and CLI
# --------------------------------------------------------------------------------------------------


def test_cli_writes_every_output(tree, paper_file, tmp_path, capsys):
    from matplotlib.image import imread

    out = tmp_path / "report"
    assert report.main([str(tree), "--out", str(out), "--paper", str(paper_file)]) == 0
    printed = capsys.readouterr().out
    assert "## Study `taps`" in printed and "### Paired differences" in printed
    expected = [
        "summary.csv",
        "summary.md",
        "summary.tex",
        "paired.csv",
        "study_taps.png",
        "bars_image_auroc.png",
    ]
    for name in expected + ["bars_pixel_aupro_zsad.png"]:
        assert (out / name).is_file(), name
        assert f"wrote {out / name}" in printed
    for png in out.glob("*.png"):
        image = imread(png)
        assert image.ndim == 3 and np.ptp(image) > 0, f"{png.name} is blank"
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == report.SUMMARY_COLUMNS
    assert list(pd.read_csv(out / "paired.csv").columns) == report.PAIRED_COLUMNS
    tex = (out / "summary.tex").read_text()
    assert r"\begin{tabular}" in tex and r"85.3 $\pm$ 2.5 (3)" in tex and r"pixel\_aupro\_zsad" in tex
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_default_out_dir_and_markdown_dash_for_one_seed(tree):
    assert report.main([str(tree), "--no-paper", "--no-plots"]) == 0
    markdown = (tree / "report" / "summary.md").read_text()
    assert "84.0 ± – (1)†" in markdown  # last3: one seed, std undefined
    assert "nan ± – (3)" in markdown  # spread3 pixel_aupro_zsad: a nan category
    assert "**−2.33 [−3.77, −0.90] (3)**" in markdown  # last4 - spread3 on VisA image AUROC
    assert "| paper |" not in markdown  # --no-paper: no paper columns


def test_report_does_not_import_torch():
    code = "import feclip.report, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_malformed_csv_exits_2_naming_the_file(tree):
    bad = tree / "taps" / "spread3" / "seed=42" / "metrics.csv"
    bad.write_text(
        ",".join(HEADER) + "\ntaps,spread3,42,mvtec,visa,candle,image_auroc,not-a-number,10,a,b,c\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "feclip.report", str(tree), "--no-plots"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert str(bad) in result.stderr and "malformed" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "content",
    [
        "",  # empty file
        "a,b,c\n1,2,3\n",  # not the schema
        ",".join(HEADER) + "\ntaps,spread3,42,mvtec,visa,candle\n",  # short row
    ],
)
def test_malformed_files_raise_a_report_error(tree, content):
    bad = tree / "taps" / "last4" / "seed=42" / "metrics.csv"
    bad.write_text(content)
    with pytest.raises(report.ReportError, match="malformed metrics file .*last4"):
        report.load_results(tree)


def test_duplicate_runs_and_empty_trees_are_errors(tree, tmp_path, capsys):
    copy = tree / "backup" / "spread3" / "seed=42" / "metrics.csv"
    copy.parent.mkdir(parents=True)
    copy.write_text((tree / "taps" / "spread3" / "seed=42" / "metrics.csv").read_text())
    with pytest.raises(report.ReportError, match="duplicate results"):
        report.load_results(tree)
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "no metrics.csv" in capsys.readouterr().err
    write_run(tmp_path / "header_only", "s", "v", 42, "mvtec", {})
    assert report.main([str(tmp_path / "header_only")]) == 2
    assert "hold no rows" in capsys.readouterr().err


def test_unknown_baseline_is_an_error(tree, capsys):
    assert report.main([str(tree), "--baseline", "nope", "--no-plots", "--no-paper"]) == 2
    assert "--baseline 'nope'" in capsys.readouterr().err

"""The peers study: its sweep composes, and feclip-report compares each method with its own published
numbers and with FE-CLIP, seed by seed, within each protocol.

The fake results tree holds the study as `feclip-train -m +experiment=peers` writes it: 4 methods x 2
protocols x 5 seeds, each run folder with its metrics.csv and a config.yaml that records the method.
Every macro is complete (all official categories), on the paper's CLIP, so every row is comparable
with the published numbers. Expected numbers are worked out by hand in the comments.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from scipy import stats

from feclip import report
from feclip.apps import report as report_app
from feclip.apps.train import CONF_DIR, to_run_config
from feclip.data import dataset_info
from feclip.report import DEFAULT_PAPER
from feclip.report.load import run_methods

HEADER = [
    "study", "variant", "seed", "train_dataset", "dataset", "category", "metric", "value", "n_images",
    "git_sha", "config_hash", "finished_at", "backbone", "checkpoint",
]  # fmt: skip
PAPER_BB = "ViT-L-14-336-quickgelu:openai@sha256=3f2a9c0b1d2e"
METHODS = ["feclip", "winclip", "aprilgan", "anomalyclip"]
SEEDS = [42, 123, 456, 789, 1024]
METRICS = ["image_auroc", "image_ap", "pixel_auroc", "pixel_aupro_zsad"]
# protocol -> (training set, evaluated datasets); the fake mvtec_to_all evaluates two of its nine targets
PROTOCOLS = {"mvtec_to_all": ("mvtec", ["visa", "btad"]), "visa_to_mvtec": ("visa", ["mvtec"])}
# every macro of a method is its base plus the seed's shift (shared by all methods: a good split is good
# for every method) plus the method's own jitter (none for FE-CLIP)
BASE = {"feclip": 0.90, "winclip": 0.80, "aprilgan": 0.85, "anomalyclip": 0.88}
SEED_SHIFT = dict(zip(SEEDS, [0.0, 0.004, -0.003, 0.002, -0.001]))
JITTER = dict(zip(SEEDS, [0.001, -0.001, 0.002, 0.0, -0.002]))


def variant(method: str, protocol: str) -> str:
    """The variant name of a sweep job: Hydra's override string of its swept values."""
    return f"method={method},protocol={protocol}"


def macro(method: str, seed: int) -> float:
    return BASE[method] + SEED_SHIFT[seed] + (0.0 if method == "feclip" else JITTER[seed])


def write_run(root: Path, study: str, name: str, seed: int, train: str, values: dict, config: str | None):
    """One run folder: metrics.csv (the schema of feclip.results) and, unless None, config.yaml."""
    folder = root / study / name / f"seed={seed}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        for (dataset, category, metric), value in values.items():
            row = [study, name, seed, train, dataset, category, metric, repr(value), 10, "abc", "h", "t"]
            writer.writerow(row + [PAPER_BB, "trained"])
    if config is not None:
        (folder / "config.yaml").write_text(config)
    return folder


def complete(datasets: list[str], base: float) -> dict:
    """Every official category of each dataset, each metric: the first two categories at base +- 0.02,
    the others at base, so that the macro is the base."""
    values = {}
    for dataset in datasets:
        for i, category in enumerate(dataset_info(dataset).categories):
            for metric in METRICS:
                values[(dataset, category, metric)] = base + {0: 0.02, 1: -0.02}.get(i, 0.0)
    return values


def method_config(method: str) -> str:
    """The part of a run's config.yaml the report reads (the engine writes the whole resolved config)."""
    return f"study: peers\nseed: 1\nmethod:\n  name: {method}\n  {method}: {{}}\ntrain:\n  epochs: 3\n"


@pytest.fixture(scope="module")
def peers_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("peers") / "results"
    for method in METHODS:
        for protocol, (train, datasets) in PROTOCOLS.items():
            trained = "none" if method == "winclip" else train  # WinCLIP is training-free: evaluation only
            for seed in SEEDS:
                values = complete(datasets, macro(method, seed))
                write_run(
                    root, "peers", variant(method, protocol), seed, trained, values, method_config(method)
                )
    return root / "peers"


@pytest.fixture(scope="module")
def peers_report(peers_tree, tmp_path_factory) -> Path:
    """`feclip-report results/peers --baseline method=feclip` with the packaged paper numbers."""
    out = tmp_path_factory.mktemp("peers_report")
    assert (
        report_app.main([str(peers_tree), "--out", str(out), "--baseline", "method=feclip", "--no-plots"])
        == 0
    )
    return out


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, na_values=["nan"])


def row(frame: pd.DataFrame, **where) -> pd.Series:
    """The single row of ``frame`` matching every column=value given."""
    mask = pd.Series(True, index=frame.index)
    for column, value in where.items():
        mask &= frame[column] == value
    rows = frame[mask]
    assert len(rows) == 1, f"{where}: {len(rows)} rows"
    return rows.iloc[0]


# --------------------------------------------------------------------------------------------------
# the experiment
# --------------------------------------------------------------------------------------------------


def sweep_jobs() -> list[list[str]]:
    """Every job of `feclip-train -m +experiment=peers`, as its list of overrides."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+experiment=peers"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    parser = OverridesParser.create()
    axes = [
        [f"{key}={v}" for v in parser.parse_override(f"{key}={value}").sweep_string_iterator()]
        for key, value in params.items()
    ]
    jobs = [[]]
    for axis in axes:
        jobs = [job + [item] for job in jobs for item in axis]
    return jobs


def test_the_peers_sweep_is_methods_by_protocols_by_seeds():
    jobs = sweep_jobs()
    assert len(jobs) == 4 * 2 * 5
    assert jobs[0] == ["method=feclip", "protocol=mvtec_to_all", "seed=42"]  # the seed varies fastest
    assert {j[0] for j in jobs} == {f"method={m}" for m in METHODS}
    assert {j[1] for j in jobs} == {"protocol=mvtec_to_all", "protocol=visa_to_mvtec"}
    assert {j[2] for j in jobs} == {f"seed={s}" for s in SEEDS}


def test_every_job_of_the_peers_sweep_composes_and_winclip_only_evaluates():
    epochs = {}
    jobs = sweep_jobs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for job in jobs:
            cfg = to_run_config(compose(config_name="train", overrides=["+experiment=peers", *job]))
            cfg.validate()
            assert cfg.study == "peers" and f"method={cfg.method.name}" == job[0]
            assert (
                cfg.data.train.name
                == {"protocol=mvtec_to_all": "mvtec", "protocol=visa_to_mvtec": "visa"}[job[1]]
            )
            epochs[cfg.method.name] = cfg.train.epochs
    # WinCLIP trains nothing (its method file), so feclip-train evaluates it; the others keep their
    # references' schedules (FE-CLIP the paper's 9 epochs)
    assert epochs == {"feclip": 9, "winclip": 0, "aprilgan": 3, "anomalyclip": 15}


# --------------------------------------------------------------------------------------------------
# which method a run is
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "method"),
    [
        ("method=aprilgan,protocol=mvtec_to_all", "aprilgan"),
        ("protocol=visa_to_mvtec,method=winclip", "winclip"),
        ("eval,method=winclip,ckpt=1a2b3c4d", "winclip"),
        ("+method=anomalyclip", "anomalyclip"),
        ("method.aprilgan.taps=[5,11],protocol=study3", None),  # an option of a method, not the method
        ("protocol=study3", None),
        ("default", None),
    ],
)
def test_variant_method(name, method):
    assert report.variant_method(name) == method


def test_the_config_is_preferred_to_the_variant_name(tmp_path):
    root = tmp_path / "results"
    values = complete(["btad"], 0.9)
    # an experiment file that sets the method: the variant name does not say it, config.yaml does
    write_run(root, "s", "default", 42, "mvtec", values, method_config("aprilgan"))
    # config.yaml wins over the variant name
    write_run(root, "s", "method=feclip", 42, "mvtec", values, method_config("anomalyclip"))
    # no config.yaml: the variant name; neither: FE-CLIP; a config.yaml from before the method group
    write_run(root, "s", "method=winclip", 42, "none", values, None)
    write_run(root, "s", "plain", 42, "mvtec", values, None)
    write_run(root, "s", "old", 42, "mvtec", values, "study: s\nseed: 42\n")
    methods = run_methods(report.load_results(root)).set_index("variant")["method"].to_dict()
    assert methods == {
        "default": "aprilgan",
        "method=feclip": "anomalyclip",
        "method=winclip": "winclip",
        "plain": "feclip",
        "old": "feclip",
    }
    summary = report.summarize(report.load_results(root), report.load_published_numbers(DEFAULT_PAPER))
    # each compared with its own method's published BTAD image AUROC (paper_numbers.csv)
    published = {"default": 73.6, "method=feclip": 88.3, "method=winclip": 68.2, "plain": 90.3, "old": 90.3}
    for name, number in published.items():
        c = row(summary, variant=name, dataset="btad", metric="image_auroc", averaging="macro")
        assert c["paper"] == number and c["gap"] == pytest.approx(90.0 - number)


def test_two_methods_in_one_variant_or_a_broken_config_are_one_line_errors(tmp_path, capsys):
    root = tmp_path / "results"
    values = complete(["btad"], 0.9)
    write_run(root, "s", "v", 42, "mvtec", values, method_config("aprilgan"))
    write_run(root, "s", "v", 123, "mvtec", values, method_config("feclip"))
    assert report_app.main([str(root), "--no-plots"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("feclip-report: error: study s variant v: runs of two methods, ")
    assert "keep one method per variant" in message and "\n" not in message
    broken = write_run(root, "t", "w", 42, "mvtec", values, "method: [unclosed\n") / "config.yaml"
    (root / "s").rename(tmp_path / "set_aside")
    assert report_app.main([str(root), "--no-plots"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"feclip-report: error: run config {broken}: line 2: not valid YAML"
    )
    broken.write_text("method:\n  name: 3\n")
    assert report_app.main([str(root), "--no-plots"]) == 2
    assert f"run config {broken}: method.name is 3, not a method name" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# the published numbers
# --------------------------------------------------------------------------------------------------


def test_every_methods_published_numbers_load_under_its_config_name():
    published = report.load_published_numbers(DEFAULT_PAPER)
    assert set(published["method"]) == set(METHODS)
    assert dict(zip(published["method"], published["paper_method"])) == report.PAPER_METHODS
    mvtec = published[(published["dataset"] == "mvtec")].set_index(["method", "metric"])["paper"]
    # paper_numbers.csv, as the FE-CLIP paper's Tables 1-2 print them (APRIL-GAN's PRO there: 84.0)
    assert mvtec["feclip", "image_auroc"] == 91.9 and mvtec["winclip", "pixel_auroc"] == 85.1
    assert mvtec["aprilgan", "pixel_aupro_zsad"] == 84.0 and mvtec["anomalyclip", "image_ap"] == 96.2
    assert "Tables 1-2" in " ".join(published.attrs["comments"])
    assert report.published_source(published).startswith("the FE-CLIP paper's Tables 1-2")


def test_a_paper_file_without_a_peer_leaves_that_peer_uncompared(tmp_path, capsys):
    paper = tmp_path / "paper.csv"
    paper.write_text(
        "# my own copy\nmethod,setting,dataset,image_auroc,image_ap,pixel_auroc,pixel_aupro\n"
        "FE-CLIP,zero_shot,btad,90.3,90.0,95.6,80.4\nAPRIL-GAN,zero_shot,btad,73.6,68.6,60.8,25.0\n"
        "CLIP,zero_shot,btad,1,2,3,4\n"  # a row of a method no run can be: ignored
    )
    published = report.load_published_numbers(paper)
    assert sorted(set(published["method"])) == ["aprilgan", "feclip"]
    assert report.published_source(published) == str(paper)
    root = tmp_path / "results"
    for method in ("feclip", "aprilgan", "winclip"):
        train = "none" if method == "winclip" else "mvtec"
        write_run(root, "s", f"method={method}", 42, train, complete(["btad"], 0.9), method_config(method))
    out = tmp_path / "report"
    assert report_app.main([str(root), "--out", str(out), "--paper", str(paper), "--no-plots"]) == 0
    capsys.readouterr()
    summary = read_csv(out / "summary.csv")
    winclip = row(summary, method="winclip", metric="image_auroc", averaging="macro")
    assert math.isnan(winclip["paper"]) and winclip["not_compared"] == ""  # never FE-CLIP's 90.3
    assert row(summary, method="aprilgan", metric="image_auroc", averaging="macro")["paper"] == 73.6
    markdown = (out / "summary.md").read_text()
    assert "| btad | APRIL-GAN | paper.csv | 73.6 | 68.6 | 60.8 | 25.0 |" in markdown
    assert f'source: {paper}, whose comments read: "my own copy"' in markdown
    assert f"no published zero_shot numbers for WinCLIP in {paper}: not compared." in markdown
    # a file without FE-CLIP's rows is refused, as before
    paper.write_text(
        "method,setting,dataset,image_auroc,image_ap,pixel_auroc,pixel_aupro\nWinCLIP,zero_shot,btad,1,2,3,4\n"
    )
    assert report_app.main([str(root), "--out", str(out), "--paper", str(paper), "--no-plots"]) == 2
    assert "no row with method=FE-CLIP and setting=zero_shot" in capsys.readouterr().err


def test_fe_clips_numbers_alone_compare_fe_clip_alone(peers_tree):
    """The notebook's load_paper_numbers (FE-CLIP's rows) never lends FE-CLIP's numbers to a peer."""
    summary = report.summarize(report.load_results(peers_tree), report.load_paper_numbers(DEFAULT_PAPER))
    macro = summary[summary["averaging"] == "macro"]
    assert macro.loc[macro["method"] != "feclip", "paper"].isna().all()
    assert macro.loc[macro["method"] == "feclip", "paper"].notna().all()


# --------------------------------------------------------------------------------------------------
# the report of the study
# --------------------------------------------------------------------------------------------------


def test_each_method_is_compared_with_its_own_published_numbers(peers_report):
    summary = read_csv(peers_report / "summary.csv")
    assert list(summary.columns) == report.SUMMARY_COLUMNS
    macro = summary[summary["averaging"] == "macro"]
    assert set(macro["method"]) == set(METHODS) and (macro["not_compared"] == "").all()
    # published numbers (paper_numbers.csv) of the row's method; per-seed macros are the base plus the
    # seed shift and jitter, whose means over the 5 seeds are 0.0004 and 0: FE-CLIP 90.04, APRIL-GAN 85.04
    expected = {
        ("feclip", "mvtec", "image_auroc"): 91.9,
        ("aprilgan", "mvtec", "image_auroc"): 86.1,
        ("aprilgan", "mvtec", "pixel_aupro_zsad"): 84.0,
        ("anomalyclip", "visa", "pixel_auroc"): 95.5,
        ("winclip", "visa", "image_auroc"): 78.1,
        ("winclip", "btad", "pixel_aupro_zsad"): 27.3,
    }
    for (method, dataset, metric), number in expected.items():
        c = row(macro, method=method, dataset=dataset, metric=metric)
        assert c["paper"] == number
        assert c["gap"] == pytest.approx(100 * (BASE[method] + 0.0004) - number)
    # WinCLIP evaluates only: its rows are compared (evaluation-only runs are)
    assert set(macro.loc[macro["method"] == "winclip", "train_dataset"]) == {"none"}


def test_the_summary_shows_each_methods_published_numbers(peers_report):
    markdown = (peers_report / "summary.md").read_text()
    assert "| variant | method | backbone | train | dataset | image_auroc | paper | gap |" in markdown
    assert (
        "| method=aprilgan,protocol=visa_to_mvtec | APRIL-GAN | ViT-L-14-336-quickgelu:openai | visa | mvtec "
        "| 85.0 ± 0.2 (5) | 86.1 | −1.1 |" in markdown
    )
    assert (
        "paper: the zero_shot number published for the row's own method (FE-CLIP, WinCLIP, APRIL-GAN, "
        in markdown
    )
    # the published numbers, side by side, labelled with their source
    assert "### Published numbers (zero_shot): FE-CLIP and its peers" in markdown
    published = markdown.split("### Published numbers", 1)[1].split("### Paired differences", 1)[0]
    assert "| dataset | method | source | image_auroc | image_ap | pixel_auroc |" in published
    for line in [
        "| mvtec | FE-CLIP | FE-CLIP paper, Tables 1-2 | 91.9 | 96.5 | 92.6 | 88.3 |",
        "| mvtec | WinCLIP | FE-CLIP paper, Tables 1-2 | 91.8 | 96.5 | 85.1 | 64.6 |",
        "| mvtec | APRIL-GAN | FE-CLIP paper, Tables 1-2 | 86.1 | 93.5 | 87.6 | 84.0 |",
        "| mvtec | AnomalyCLIP | FE-CLIP paper, Tables 1-2 | 91.5 | 96.2 | 91.1 | 81.4 |",
        "| visa | WinCLIP | FE-CLIP paper, Tables 1-2 | 78.1 | 81.2 | 79.6 | 56.8 |",
        "| btad | APRIL-GAN | FE-CLIP paper, Tables 1-2 | 73.6 | 68.6 | 60.8 | 25.0 |",
    ]:
        assert line in published, line
    assert (
        "source: the FE-CLIP paper's Tables 1-2 (feclip/report/paper/paper_numbers.csv), whose comments read:"
        in published
    )
    assert "APRIL-GAN's MVTec PRO reads 84.0 where the AnomalyCLIP paper reports 44.0" in published
    tex = (peers_report / "summary.tex").read_text()
    assert (
        "% study peers, published zero_shot numbers" in tex and "APRIL-GAN & FE-CLIP paper, Tables 1-2" in tex
    )


def test_paired_against_fe_clip_within_each_protocol(peers_report):
    paired = read_csv(peers_report / "paired.csv")
    assert list(paired.columns) == report.PAIRED_COLUMNS[:2] + ["protocol"] + report.PAIRED_COLUMNS[2:]
    assert set(paired["protocol"]) == {"mvtec_to_all", "visa_to_mvtec"}
    for protocol, part in paired.groupby("protocol"):
        # three comparisons per protocol: each peer against FE-CLIP of that protocol
        assert sorted(set(part["variant_a"])) == sorted(variant(m, protocol) for m in METHODS[1:])
        assert set(part["variant_b"]) == {variant("feclip", protocol)}
        assert (part["n_shared"] == 5).all()
        datasets = PROTOCOLS[protocol][1]
        assert len(part) == 3 * len(datasets) * len(METRICS)
    # WinCLIP, evaluation only, pairs with the trained FE-CLIP on the same evaluated dataset and seeds
    winclip = paired[paired["variant_a"].str.startswith("method=winclip")]
    assert set(winclip["train_dataset"]) == {"none/mvtec", "none/visa"}
    # APRIL-GAN - FE-CLIP on MVTec AD: per seed -5 points + the jitter: -4.9, -5.1, -4.8, -5.0, -5.2
    c = row(paired, variant_a=variant("aprilgan", "visa_to_mvtec"), dataset="mvtec", metric="image_auroc")
    diffs = [-4.9, -5.1, -4.8, -5.0, -5.2]
    sd = pd.Series(diffs).std(ddof=1)  # 0.158
    half = stats.t.ppf(0.975, 4) * sd / math.sqrt(5)  # 2.776 * 0.158 / 2.236 = 0.196
    assert c["mean_diff"] == pytest.approx(-5.0) and c["seeds"] == "42;123;456;789;1024"
    assert c["ci_low"] == pytest.approx(-5.0 - half) and c["ci_high"] == pytest.approx(-5.0 + half)
    assert c["distinguishable"]
    markdown = (peers_report / "summary.md").read_text()
    assert "B is the baseline variant with the same `protocol` as A" in markdown
    assert "| method=aprilgan,protocol=visa_to_mvtec − method=feclip,protocol=visa_to_mvtec |" in markdown


def test_the_figures_draw_each_methods_own_number(peers_tree):
    summary = report.summarize(report.load_results(peers_tree), report.load_published_numbers(DEFAULT_PAPER))
    bars = report.paper_bar_plots(summary)["bars_image_auroc.png"]
    assert bars.title == "image AUROC: ours vs the published numbers (zero_shot) of each method"
    assert "gap = ours − the published number of the row's own method" in bars.caption
    assert bars.panels == ["mvtec", "visa", "btad"]
    plots = report.study_plots(summary, ["image_auroc"])
    study = plots["study_peers_image_auroc.png"]
    assert "grey tick on a row: the zero_shot number published for the row's own method" in study.caption
    # WinCLIP's evaluation-only rows stand in the panel of the methods trained for the same dataset
    assert study.panels == [
        "mvtec (trained on visa; winclip: evaluation only)",
        "visa (trained on mvtec; winclip: evaluation only)",
        "btad (trained on mvtec; winclip: evaluation only)",
    ]
    assert study.labels == ["anomalyclip", "aprilgan", "feclip", "winclip"]
    for plot in (bars, study):
        plot.figure.clear()


def test_a_fe_clip_only_study_keeps_its_tables(tmp_path):
    root = tmp_path / "results"
    for seed in SEEDS[:2]:
        write_run(root, "taps", "taps=last4", seed, "mvtec", complete(["btad"], 0.9), method_config("feclip"))
    published = report.load_published_numbers(DEFAULT_PAPER)
    summary = report.summarize(report.load_results(root), published)
    markdown = report.render_markdown(summary, published=published)
    assert "| variant | backbone | train | dataset | image_auroc | paper | gap |" in markdown
    assert "Published numbers" not in markdown and "paper: FE-CLIP zero_shot; gap" in markdown

"""A real Hydra multirun of the demo study, the report over it, the notebook over it, the launchers."""

import os
import statistics
import subprocess
import sys

import pytest
from conftest import REPO, cache_override, run_notebook
from hydra import compose, initialize_config_dir

from feclip.apps.train import CONF_DIR
from feclip.data import make_synthetic
from feclip.report import aggregate_seeds, load_results, macro_per_seed
from feclip.results import MICRO, find_metrics, read_metrics


def _multirun(args, cwd):
    """``feclip-train -m ARGS``, its caches in the session's temporary folder."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from feclip.apps.train import train_main; train_main()",
            "-m",
            *args,
            cache_override(),
        ],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    make_synthetic(root / "data" / "synthetic", n_train_good=2, n_test_good=3, n_test_bad=3, image_size=64)
    args = [
        "+experiment=demo",
        "backbone=tiny",
        "seed=1,2",
        f"paths.data_root={root / 'data'}",
        f"paths.results_dir={root / 'results'}",
        "train.epochs=2",
        "train.batch_size=4",
        "train.progress=false",
    ]
    first = _multirun(args, REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    return root, args, first


def test_two_seeds_give_two_csvs_and_a_rerun_skips_them(sweep):
    root, args, first = sweep
    paths = find_metrics(root / "results")
    assert [p.parent.name for p in paths] == ["seed=1", "seed=2"]
    assert {p.parent.parent.name for p in paths} == {"backbone=tiny,train.batch_size=4,train.epochs=2"}
    stamps = [p.stat().st_mtime_ns for p in paths]
    again = _multirun(args, REPO)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    assert "metrics.csv is complete" in again.stderr + again.stdout


def test_report_has_two_seeds_with_the_right_mean_and_std(sweep):
    root, _, _ = sweep
    per_seed = macro_per_seed(load_results(root / "results"))
    summary = aggregate_seeds(per_seed)
    cell = summary[(summary["metric"] == "pixel_auroc") & (summary["dataset"] == "synthetic")].iloc[0]
    assert cell["n_seeds"] == 2
    # by hand from the two CSVs: macro = mean over the three categories, then mean and sample std
    macros = []
    for path in find_metrics(root / "results"):
        values = [
            r["value"] for r in read_metrics(path) if r["metric"] == "pixel_auroc" and r["category"] != MICRO
        ]
        assert len(values) == 3
        macros.append(sum(values) / 3)
    assert cell["mean"] == pytest.approx(statistics.mean(macros), abs=1e-12)
    assert cell["std"] == pytest.approx(statistics.stdev(macros), abs=1e-12)


def test_report_cli_on_the_sweep(sweep):
    root, _, _ = sweep
    res = subprocess.run(
        [sys.executable, "-m", "feclip.report", str(root / "results"), "--out", str(root / "report")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "(2)" in (root / "report" / "summary.md").read_text()


def test_notebook_runs_on_the_sweep_results(sweep):
    root, _, _ = sweep
    nb = run_notebook(root / "results", timeout=180)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_local_parallel_launcher_composes():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=["hydra/launcher=local_parallel"], return_hydra_config=True
        )
    assert cfg.hydra.launcher.n_jobs == 2 and "joblib" in cfg.hydra.launcher._target_.lower()


def test_slurm_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher.gpus_per_node == 1


def test_a_failing_job_does_not_stop_the_sweep_and_is_listed(sweep):
    root, _, _ = sweep
    args = [
        "+experiment=demo",
        "backbone=tiny",
        "seed=5",
        "data.train.dir=synthetic/set_a,synthetic/missing",
        f"paths.data_root={root / 'data'}",
        f"paths.results_dir={root / 'results_fail'}",
        "train.epochs=1",
        "train.batch_size=4",
        "train.progress=false",
    ]
    res = _multirun(args, REPO)
    assert res.returncode == 1
    assert "1 job(s) of the sweep failed" in res.stderr and "data.train.dir=synthetic.missing" in res.stderr
    assert "Traceback" not in res.stderr
    done = find_metrics(root / "results_fail")
    assert len(done) == 1 and "synthetic.set_a" in str(done[0])

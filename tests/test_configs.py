"""Every Hydra config composes into a valid RunConfig; typos fail at compose time, and on the command line
as one line with exit status 2; ``--help`` says what a command does; SLURM jobs are named after their runs."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, compose_run, train_cli
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import open_dict

from feclip.apps.train import CONF_DIR, to_run_config, variant_name
from feclip.config import RunConfig

GROUPS = ["backbone", "model", "taps", "protocol", "train", "eval", "logger"]


def options(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose_run([f"{group}={option}"])
    assert isinstance(cfg, RunConfig)
    cfg.validate()


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(experiment):
    cfg = compose_run([f"+experiment={experiment}"])
    cfg.validate()
    assert cfg.study != "default"


def test_defaults_are_the_paper_preset():
    cfg = compose_run([])
    assert cfg.backbone.name == "ViT-L-14-336-quickgelu" and cfg.backbone.pretrained == "openai"
    assert cfg.model.taps == (15, 18, 21, 23) and cfg.model.lam == 0.1 and cfg.model.temperature == 0.07
    assert cfg.train.epochs == 9 and cfg.train.batch_size == 16 and cfg.train.lr == 5e-4
    assert cfg.train.fc_patch.policy == "lr_div_100"
    assert cfg.eval.sigma == 4.0 and cfg.eval.aupro.methods == ["exact", "zsad"]
    assert cfg.data.train.name == "mvtec" and [t.name for t in cfg.data.targets] == [
        "visa",
        "btad",
        "mpdd",
        "dtd_synthetic",
        "dagm",
        "brainmri",
        "br35h",
        "clinicdb",
        "kvasir",
    ]
    assert compose_run(["protocol=visa_to_mvtec"]).data.train.name == "visa"


def test_data_root_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("DATA_ROOT", "/datasets/here")
    assert compose_run([]).paths.data_root == "/datasets/here"


@pytest.mark.parametrize("override", ["train.epochz=3", "model.tapz=[1]", "eval.sigmaa=2", "paths.data=/x"])
def test_misspelled_keys_fail_at_compose_time(override):
    with pytest.raises(ConfigCompositionException):
        compose_run([override])


def test_wrong_types_fail_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        compose_run(["train.epochs=many"])


def test_bad_values_name_the_field():
    cfg = compose_run(["train.fc_patch.policy=sometimes"])
    with pytest.raises(ValueError, match=r"train.fc_patch.policy must be one of"):
        cfg.validate()


def test_no_absolute_paths_in_configs():
    for path in Path(CONF_DIR).rglob("*.yaml"):
        for line in path.read_text().splitlines():
            value = line.split("#")[0].split(":", 1)[-1].strip()
            assert not value.startswith("/"), f"{path}: {line}"


def test_variant_names_are_folder_safe():
    assert variant_name("") == "default"
    assert variant_name("model.lam=0.2,taps=last4") == "model.lam=0.2,taps=last4"
    assert "/" not in variant_name("backbone.pretrained=/a/b.pt")


# -- the command line: one-line errors, help, job names ----------------------------------------------


def _app(entry: str, args: list[str]) -> subprocess.CompletedProcess:
    """``feclip-train`` (``entry="train_main"``) or ``feclip-eval`` (``"eval_main"``) with ``args`` in a
    fresh process, from a temporary folder, the repository's ``feclip`` first on the path."""
    if entry == "train_main":
        return train_cli(args, timeout=180)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="feclip-cli-") as cwd:
        code = f"from feclip.apps.train import {entry}; {entry}()"
        return subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=180
        )


def _one_line_usage_error(res: subprocess.CompletedProcess, prog: str) -> str:
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), res.stderr
    return lines[0]


@pytest.mark.parametrize(
    "override, says",
    [
        ("model.tapz=[1]", "Key 'tapz' not in 'FEClipConfig'"),
        ("+model.tapz=1", "unknown config key(s) model.tapz"),
        (
            "train.epochs=abc",
            "Value 'abc' of type 'str' could not be converted to Integer; full_key: train.epochs",
        ),
        ("taps=nonexistent", "Could not find 'taps/nonexistent'; Available options in 'taps': last1, last3,"),
        ("train.epochs=[", "cannot parse the override 'train.epochs=['"),
    ],
)
def test_config_errors_are_one_line_and_exit_2(override, says):
    line = _one_line_usage_error(_app("train_main", [override]), "feclip-train")
    assert says in line
    assert "Config search path" not in line and "To append" not in line  # Hydra's noise is left out


def test_eval_config_errors_and_bad_flags_are_one_line_too():
    line = _one_line_usage_error(_app("eval_main", ["eval.sigmaa=2"]), "feclip-eval")
    assert "Key 'sigmaa' not in 'EvalConfig'" in line
    line = _one_line_usage_error(_app("eval_main", ["--no-such-flag"]), "feclip-eval")
    assert "unrecognized arguments: --no-such-flag" in line


@pytest.mark.parametrize(
    "argv",
    [
        ["feclip-data", "check", ".", "--dataset", "mvtec", "--bogus"],
        ["feclip-report", "--bogus"],
        ["feclip-cache", "list", "--bogus"],
        ["feclip-predict", "x.png", "--bogus"],
    ],
)
def test_argparse_apps_report_a_bad_flag_in_one_line(argv):
    module = {
        "feclip-data": "data",
        "feclip-report": "report",
        "feclip-cache": "cache",
        "feclip-predict": "predict",
    }
    code = f"import sys; from feclip.apps.{module[argv[0]]} import main; sys.exit(main())"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", code, *argv[1:]], capture_output=True, text=True, env=env, timeout=120
    )
    line = _one_line_usage_error(res, argv[0])
    assert "--bogus" in line


def test_a_missing_launcher_names_its_extra():
    from feclip.apps.train import config_error_message

    err = MissingConfigException("In 'hydra/launcher/local_parallel': Could not find 'hydra/launcher/joblib'")
    assert config_error_message(err).endswith("pip install 'feclip[parallel]')")


@pytest.mark.parametrize(
    "entry, prog, says",
    [
        ("train_main", "feclip-train", "train FE-CLIP's adapters"),
        ("eval_main", "feclip-eval", "evaluate a saved adapter file"),
    ],
)
def test_help_says_what_the_command_does(entry, prog, says):
    res = _app(entry, ["--help"])
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert out.startswith(f"{prog}: {says}") and "powered by Hydra" not in out
    assert f"Usage: {prog} [+experiment=NAME]" in out and "--cfg job" in out  # how to override, and see it
    groups = {line.split(":")[0] for line in out.splitlines() if ": " in line and not line.startswith(" ")}
    assert {"backbone", "taps", "protocol", "experiment", "logger"} <= groups
    assert "experiment: aupro, averaging," in out and "taps: last1, last3," in out
    assert "feclip[parallel]" in out and "feclip[slurm]" in out and "docs/method.md" in out


def _launcher_name(overrides: list[str], name: str = "train") -> str:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name=name, overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True
        )
    assert cfg.hydra.launcher._target_ == "hydra_plugins.feclip_launchers.slurm.NamedSlurmLauncher"
    return cfg.hydra.launcher.name


def test_slurm_jobs_are_named_after_their_run_folder():
    assert _launcher_name(["+experiment=taps", "taps=last4", "seed=1"]) == "taps/taps=last4/seed=1"
    assert _launcher_name([]) == "default/default/seed=42"
    assert _launcher_name(["study=s", "variant=v", "seed=7", "model.lam=0.2"]) == "s/v/seed=7"
    assert _launcher_name(["seed=3", "device=cpu"], name="eval") == "eval/eval/seed=3"  # feclip-eval's prefix


@pytest.mark.parametrize(
    "name, overrides",
    [("train", ["+experiment=taps", "taps=last4", "seed=1", "model.lam=0.2"]), ("eval", ["eval.sigma=2"])],
)
def test_the_job_name_is_the_run_folder_the_job_writes(name, overrides):
    """The name resolves ``variant: auto`` exactly as the run does (:func:`to_run_config` in a Hydra job)."""
    job = _launcher_name(overrides, name)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        with open_dict(cfg):
            del cfg["hydra"]
        run = to_run_config(cfg, "eval" if name == "eval" else "")
    finally:
        HydraConfig.instance().cfg = None
    assert job == f"{run.study}/{run.variant}/seed={run.seed}"


def test_the_slurm_launcher_submits_each_job_under_its_name(monkeypatch, tmp_path):
    """Each job of a sweep is submitted alone (no array), under its own resolved name; submitit's SLURM
    executor is replaced by a recorder (no SLURM here)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins
    from hydra.core.utils import JobReturn
    from hydra.types import HydraContext, RunMode

    from feclip.apps.train import _register_launchers

    submitted = []

    class Recorder:
        def __init__(self, cluster, folder, **kwargs):
            assert cluster == "slurm"
            self.params = {}

        def update_parameters(self, **params):
            self.params.update(params)

        def submit(self, fn, overrides, *args):
            submitted.append((self.params["name"], self.params["slurm_partition"], overrides))
            ret = JobReturn()
            return type("Job", (), {"results": lambda _self: [ret]})()

    monkeypatch.setattr(submitit, "AutoExecutor", Recorder)
    _register_launchers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().hydra.config_loader
        cfg = loader.load_configuration(
            "train",
            [
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                f"paths.results_dir={tmp_path}",
                "+experiment=taps",
            ],
            run_mode=RunMode.MULTIRUN,
        )
        context = HydraContext(config_loader=loader, callbacks=Callbacks(cfg))
        launcher = Plugins.instance().instantiate_launcher(
            hydra_context=context, task_function=print, config=cfg
        )
        jobs = [["+experiment=taps", "taps=last4", "seed=1"], ["+experiment=taps", "taps=spread3", "seed=2"]]
        returns = launcher.launch(jobs, initial_job_idx=0)  # as the sweeper hands them: every override
    assert len(returns) == 2
    assert submitted == [
        ("taps/taps=last4/seed=1", "gpu", jobs[0]),
        ("taps/taps=spread3/seed=2", "gpu", jobs[1]),
    ]

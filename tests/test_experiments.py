"""Every study is a config: it composes, and its sweep expands to the intended number of runs."""

import math
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from feclip.apps.train import CONF_DIR, to_run_config

SEEDS = [42, 123, 456, 789, 1024]
# runs per experiment = (values of its axis) x (protocols) x (5 seeds)
EXPECTED_RUNS = {
    "peers": 4 * 2 * 5,
    "eval_resolution": 2 * 2 * 5,
    "aupro": 3 * 2 * 2 * 2 * 5,
    "map_taps": 4 * 2 * 5,
    "map_kind": 4 * 2 * 5,
    "postprocess": 8 * 2 * 5,
    "mask_loss_on": 2 * 2 * 5,
    "tap_aggregation": 4 * 2 * 5,
    "mask_target": 3 * 2 * 5,
    "mask_loss_input": 2 * 2 * 5,
    "fc_patch": 5 * 2 * 5,
    "averaging": 2 * 5,
    "taps": 16 * 2 * 5,
    "benchmark_taps": 2 * 2 * 5,
    "temperature": 2 * 2 * 5,
    "lfs_stat": 4 * 2 * 5,
    "benchmark": 2 * 5,
    "module_ablation": 4 * 2 * 5,
    "transform": 2 * 2 * 5,
    "fewshot": 3 * 2 * 5,
}
SINGLE_RUN = {"demo", "clip_baseline"}


def composed_params(name):
    """The experiment's ``hydra.sweeper.params`` as composed (its own axis, then the shared feclip/conf/sweep/)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"+experiment={name}"], return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.sweeper.params) or {}


def sweep_params(name):
    params = composed_params(name)
    parser = OverridesParser.create()
    return {
        k: [str(v) for v in parser.parse_override(f"{k}={v}").sweep_string_iterator()]
        for k, v in params.items()
    }


def experiments():
    return sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


def test_every_experiment_is_listed_here():
    assert set(experiments()) == set(EXPECTED_RUNS) | SINGLE_RUN


@pytest.mark.parametrize("name", sorted(EXPECTED_RUNS))
def test_sweep_expands_to_the_intended_number_of_runs(name):
    params = sweep_params(name)
    assert [int(s) for s in params["seed"]] == SEEDS
    assert math.prod(len(v) for v in params.values()) == EXPECTED_RUNS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_RUNS))
def test_the_shared_axes_come_last_and_have_one_home(name):
    """Seeds (and the ablations' two directions) come from feclip/conf/sweep/, after the study's own axis, so
    that the jobs of a sweep run in the same order (seed the fastest-varying axis)."""
    own = yaml.safe_load((Path(CONF_DIR) / "experiment" / f"{name}.yaml").read_text())
    own_params = ((own.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    assert "seed" not in own_params, "the seeds live in feclip/conf/sweep/seeds.yaml"
    keys = list(composed_params(name))
    assert keys[-1] == "seed"
    assert keys[: len(own_params)] == list(own_params)
    shared = yaml.safe_load((Path(CONF_DIR) / "sweep" / "ablation.yaml").read_text())["protocol"]
    assert own_params.get("protocol") != shared, "include /sweep/ablation instead"


@pytest.mark.parametrize("name", sorted(EXPECTED_RUNS))
def test_every_value_of_the_axis_composes(name):
    params = sweep_params(name)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for key, values in params.items():
            for value in values[:1] if key == "seed" else values:
                cfg = to_run_config(
                    compose(config_name="train", overrides=[f"+experiment={name}", f"{key}={value}"])
                )
                cfg.validate()
                assert cfg.study == name


def test_axis_values_reach_the_config():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = to_run_config(
            compose(config_name="train", overrides=["+experiment=postprocess", "postprocess=combined"])
        )
        assert (
            cfg.eval.sigma == 4.0
            and cfg.eval.postprocess.morph_open == 2
            and cfg.eval.postprocess.min_component_px == 50
        )
        cfg = to_run_config(
            compose(config_name="train", overrides=["+experiment=map_taps", "eval.map_taps=[21,23]"])
        )
        assert cfg.eval.scoring().map_taps == (21, 23)
        cfg = to_run_config(compose(config_name="train", overrides=["+experiment=taps", "taps=stages"]))
        assert cfg.model.taps == (5, 11, 17, 23)
        cfg = to_run_config(
            compose(config_name="train", overrides=["+experiment=tap_aggregation", "tap_agg=last_tap"])
        )
        assert cfg.eval.map_taps == [23] and cfg.eval.score_taps == [23]

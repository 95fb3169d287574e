"""Every Hydra config composes into a valid RunConfig; typos fail at compose time."""

from pathlib import Path

import pytest
from conftest import compose_run
from hydra.errors import ConfigCompositionException

from feclip.apps.train import CONF_DIR, variant_name
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

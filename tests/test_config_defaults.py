"""Every default value has one home: the dataclasses of feclip/config.py (and FEClipConfig).

``feclip/conf/train.yaml`` composes the schema (``run_schema``, :class:`feclip.config.RunConfig`) first, so a
dataclass default reaches ``feclip-train`` unless a YAML file sets the key. The rule for the YAML files,
by folder of ``feclip/conf/``:

- settings over the schema (``backbone/``, ``model/``, ``method/``, ``train/``, ``eval/``, ``logger/``, the primary
  configs ``train.yaml`` and ``eval.yaml``, and ``experiment/`` outside its ``defaults`` and ``hydra``
  keys) set only values that differ from the dataclass default. A group option that is the defaults
  (``model=feclip``, ``method=feclip``, ``train=paper``, ...) is an empty file. An experiment may name a default value only
  as one point of its sweep (``hydra.sweeper.params``), never as a plain setting;
- named sets (``taps/``, ``protocol/``, ``postprocess/``, ``tap_agg/``, ``preset/``) pin every value they
  name, default or not: each option stands for a fixed set (a tap set, a list of datasets, a
  post-processing recipe, the earlier study's settings) that must keep its meaning when a default
  changes, and an axis option must be complete whatever preset or experiment sits below it. The primary
  config selects none of them where the dataclass has the value (``taps: null``, not ``spread3``);
  ``protocol`` is selected because the dataclass has no dataset list;
- ``hydra/`` and ``sweep/`` hold Hydra settings (launchers, the shared sweep axes), not run values.

A new folder under ``feclip/conf/`` fails here until it is put in one of these classes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from feclip.apps.train import CONF_DIR, to_run_config
from feclip.config import BackboneConfig, LoggerConfig, PathsConfig, RunConfig, TrainConfig
from feclip.models.feclip import FEClipConfig

CONF = Path(CONF_DIR)
STATES_DIFFERENCES = {"backbone", "model", "method", "train", "eval", "logger", "experiment"}
NAMED_SETS = {"taps", "protocol", "postprocess", "tap_agg", "preset"}
NOT_RUN_VALUES = {"hydra", "sweep"}
# what the primary configs set on top of the schema (everything else composes to the dataclass default)
PRIMARY_SETS = {
    "train": {"variant", "paths.data_root", "data.train", "data.targets"},
    "eval": {"variant", "paths.data_root", "data.train", "data.targets", "study"},
}
_MISSING = object()


def _package(path: Path) -> str:
    """Where a config file's keys land in the run config ('' = the root)."""
    first = path.read_text().splitlines()[:3]
    for line in first:
        if line.startswith("# @package"):
            package = line.split("@package", 1)[1].strip()
            return "" if package == "_global_" else package
    rel = path.relative_to(CONF)
    return ".".join(rel.parts[:-1])  # a group's default package is the group; a primary config the root


def _restated(values, schema: DictConfig, prefix: str) -> list[str]:
    """Dotted keys of ``values`` whose value equals the schema's default at that key."""
    found = []
    for key, value in (values or {}).items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        default = OmegaConf.select(schema, dotted, default=_MISSING)
        if default is _MISSING:
            continue  # not a schema key: the composition tests fail on it
        if (
            isinstance(default, DictConfig)
            and isinstance(value, dict)
            and OmegaConf.get_type(default) is not dict
        ):
            found += _restated(value, schema, dotted)  # a dataclass node: field by field
            continue
        if isinstance(default, DictConfig | ListConfig):
            default = OmegaConf.to_container(default)
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (value, default))
        if value == default and (type(value) is type(default) or numbers):
            found.append(dotted)
    return found


def _stating_files() -> list[Path]:
    files = [CONF / "train.yaml", CONF / "eval.yaml"]
    for group in sorted(STATES_DIFFERENCES):
        files += sorted((CONF / group).glob("*.yaml"))
    return files


def test_every_config_folder_follows_a_rule():
    folders = {p.name for p in CONF.iterdir() if p.is_dir()}
    classes = [STATES_DIFFERENCES, NAMED_SETS, NOT_RUN_VALUES]
    assert folders == set().union(*classes), "put the new conf/ folder in one class of the module docstring"
    assert sum(len(c) for c in classes) == len(set().union(*classes))


@pytest.mark.parametrize("path", _stating_files(), ids=lambda p: str(p.relative_to(CONF)))
def test_no_yaml_file_restates_a_dataclass_default(path):
    data = yaml.safe_load(path.read_text()) or {}
    package = _package(path)
    if package == "":
        data = {k: v for k, v in data.items() if k not in ("defaults", "hydra")}
    for part in reversed(package.split(".") if package else []):
        data = {part: data}
    restated = _restated(data, OmegaConf.structured(RunConfig), "")
    assert not restated, (
        f"{path.relative_to(CONF)} restates the dataclass default of {restated}: the default lives in "
        "feclip/config.py only (delete the line; an option equal to the defaults is an empty file)"
    )


def test_the_rule_catches_a_restated_default():
    schema = OmegaConf.structured(RunConfig)
    assert _restated({"train": {"lr": 5.0e-4, "epochs": 3}}, schema, "") == ["train.lr"]
    assert _restated({"train": {"loss": {"focal_alpha": None}}}, schema, "") == ["train.loss.focal_alpha"]
    assert _restated({"eval": {"aupro": {"methods": ["exact", "zsad"]}}}, schema, "") == [
        "eval.aupro.methods"
    ]
    assert _restated({"model": {"taps": [15, 18, 21, 23], "lam": 0.2}}, schema, "") == ["model.taps"]
    assert _restated({"seed": 42, "paths": {"data_root": "${oc.env:DATA_ROOT,data}"}}, schema, "") == ["seed"]
    assert _restated({"train": {"resume": 1}}, schema, "") == []  # 1 is not the default True


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict) and value:
                out.update(_leaves(value, dotted))
            else:
                out[dotted] = value
        return out
    return {prefix: node}


def _compose(name: str, overrides=()):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.mark.parametrize("name", sorted(PRIMARY_SETS))
def test_the_composed_config_is_the_dataclass_defaults(name):
    composed = _leaves(OmegaConf.to_container(_compose(name)))
    defaults = _leaves(OmegaConf.to_container(OmegaConf.structured(RunConfig)))
    differ = {
        key
        for key in set(composed) | set(defaults)
        if composed.get(key, _MISSING) != defaults.get(key, _MISSING)
    }
    stray = {k for k in differ if not any(k == s or k.startswith(f"{s}.") for s in PRIMARY_SETS[name])}
    assert not stray, f"feclip-{name} does not take these from the dataclasses: {sorted(stray)}"


def test_a_changed_dataclass_default_reaches_feclip_train():
    """The schema with other defaults (as if feclip/config.py were edited) changes the composed run."""
    changed = RunConfig(
        seed=7,
        paths=PathsConfig(results_dir="elsewhere"),
        backbone=BackboneConfig(precision="bf16"),
        model=FEClipConfig(taps=(20, 21, 22, 23), lam=0.25, temperature=0.05),
        train=TrainConfig(lr=1.25e-3, epochs=3, betas=[0.8, 0.99]),
        logger=LoggerConfig(project="other"),
    )
    changed.train.loss.focal_gamma = 3.0
    changed.train.fc_patch.policy = "same"
    changed.eval.sigma = 2.0
    changed.eval.aupro.fpr_limit = 0.1
    changed.data.mask_resize = "nearest"
    store = ConfigStore.instance()
    store.store(name="run_schema", node=changed)
    try:
        for name in PRIMARY_SETS:
            run = to_run_config(_compose(name))
            for field in ("seed", "paths.results_dir", "backbone", "model", "train", "logger"):
                head, _, tail = field.partition(".")
                got, want = getattr(run, head), getattr(changed, head)
                if tail:
                    got, want = getattr(got, tail), getattr(want, tail)
                assert got == want, field
            assert run.eval.sigma == 2.0 and run.eval.aupro.fpr_limit == 0.1
            assert run.data.mask_resize == "nearest"
        # a group option over the defaults still applies on top of the changed ones
        assert to_run_config(_compose("train", ["+experiment=demo"])).train.lr == 2.0e-3
    finally:
        store.store(name="run_schema", node=RunConfig)
    assert to_run_config(_compose("train")).train.lr == TrainConfig().lr


def test_the_default_taps_are_the_spread3_set():
    """The docs call the default tap set spread3: the named set and the dataclass default agree."""
    spread3 = yaml.safe_load((CONF / "taps" / "spread3.yaml").read_text())["taps"]
    assert tuple(spread3) == FEClipConfig().taps
    assert to_run_config(_compose("train", ["taps=spread3"])).model == to_run_config(_compose("train")).model


# ----------------------------------------------------------------------------------------------------
# Defaults of library functions and the lists of allowed values: one home each
# ----------------------------------------------------------------------------------------------------

import ast  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import textwrap  # noqa: E402

from feclip import config as config_module  # noqa: E402
from feclip import scoring, viz  # noqa: E402
from feclip.config import DataConfig, EvalConfig  # noqa: E402
from feclip.data import dataset, transforms  # noqa: E402
from feclip.engine import cache  # noqa: E402
from feclip.errors import ConfigError  # noqa: E402
from feclip.losses import dice_loss, focal_loss  # noqa: E402
from feclip.metrics import aggregate  # noqa: E402
from feclip.models import adapters, clip, fewshot  # noqa: E402

_AUPRO = importlib.import_module("feclip.metrics.aupro")  # feclip.metrics.aupro is also a function's name
_RUN = RunConfig()

# (function, parameter, the config default it must be): the function's default is that value, and its
# source names it (a field, or the constant the field reads) instead of writing a literal of its own
SIGNATURE_DEFAULTS = [
    (_AUPRO.aupro, "fpr_limit", _RUN.eval.aupro.fpr_limit),
    (aggregate.compute_category_metrics, "fpr_limit", _RUN.eval.aupro.fpr_limit),
    (aggregate.compute_category_metrics, "aupro_methods", tuple(_RUN.eval.aupro.methods)),
    (aggregate.category_metric_sets, "fpr_limit", _RUN.eval.aupro.fpr_limit),
    (aggregate.category_metric_sets, "aupro_methods", tuple(_RUN.eval.aupro.methods)),
    (cache.PrefixCache, "storage", _RUN.train.prefix_cache_storage),
    (fewshot.tap_features, "which", _RUN.eval.fewshot_bank),
    (fewshot.MemoryBank.build, "which", _RUN.eval.fewshot_bank),
    (fewshot.MemoryBank.from_samples, "which", _RUN.eval.fewshot_bank),
    (fewshot.MemoryBank.from_samples, "resize", _RUN.data.resize),
    (fewshot.category_banks, "which", _RUN.eval.fewshot_bank),
    (fewshot.category_banks, "resize", _RUN.data.resize),
    (fewshot.fewshot_predict, "sigma", _RUN.eval.sigma),
    (dataset.AnomalyDataset, "mask_resize", _RUN.data.mask_resize),
    (dataset.AnomalyDataset, "resize", _RUN.data.resize),
    (transforms.resize_rgb, "mode", _RUN.data.resize),
    (transforms.resize_mask, "mode", _RUN.data.resize),
    (transforms.resize_mask, "method", _RUN.data.mask_resize),
    (scoring.aggregate_taps, "how", _RUN.eval.tap_aggregation),
    (scoring.fewshot_scores, "sigma", _RUN.eval.sigma),
    (focal_loss, "gamma", _RUN.train.loss.focal_gamma),
    (focal_loss, "alpha", _RUN.train.loss.focal_alpha),
    (dice_loss, "smooth", _RUN.train.loss.dice_smooth),
    (clip.load_clip, "name", _RUN.backbone.name),
    (clip.load_clip, "precision", _RUN.backbone.precision),
]
# parameters without a default: every caller passes the configured value
REQUIRED = [
    (adapters.FFEAdapter, ("p", "transform")),
    (adapters.LFSAdapter, ("q", "stat", "kernel_size", "transform")),
    (adapters.ConvAdapter, ("kernel_size",)),
    (adapters.TapAdapter, ("adapters", "lam", "p", "q", "lfs_stat", "lfs_kernel", "transform")),
    (dataset.AnomalyDataset, ("image_size",)),
    (cache.PrefixCache, ("batch_size",)),
]
# dataclass fields whose default is a library module's constant (the module cannot import feclip.config)
FIELDS_FROM_CONSTANTS = [
    (DataConfig, "resize", transforms.DEFAULT_RESIZE),
    (DataConfig, "mask_resize", transforms.DEFAULT_MASK_RESIZE),
    (BackboneConfig, "name", clip.DEFAULT_MODEL),
    (BackboneConfig, "precision", clip.DEFAULT_WEIGHT_PRECISION),
    (fewshot.MemoryBank, "which", EvalConfig.fewshot_bank),
]


def _function(obj):
    obj = obj.__init__ if inspect.isclass(obj) else obj
    return inspect.unwrap(getattr(obj, "__func__", obj))


def _is_literal(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return True
    return isinstance(node, ast.Tuple | ast.List) and all(_is_literal(e) for e in node.elts)


def _default_node(obj, param: str) -> ast.expr:
    """The expression that ``param``'s default is written as in ``obj``'s source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(_function(obj))))
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))
    args = fn.args
    positional = args.posonlyargs + args.args
    defaults = dict(zip([a.arg for a in positional[len(positional) - len(args.defaults) :]], args.defaults))
    defaults |= {a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None}
    return defaults[param]


def _field_node(cls, name: str) -> ast.expr:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)).body
    return next(s.value for s in body if isinstance(s, ast.AnnAssign) and s.target.id == name)


@pytest.mark.parametrize(
    "func, param, want", SIGNATURE_DEFAULTS, ids=lambda x: getattr(x, "__qualname__", None)
)
def test_a_function_default_is_the_config_default_not_a_literal(func, param, want):
    default = inspect.signature(func).parameters[param].default
    assert (tuple(default) if isinstance(default, list | tuple) else default) == want
    node = _default_node(func, param)
    assert not _is_literal(node), (
        f"{func.__qualname__}({param}=...) writes the literal {ast.unparse(node)}: default it to the "
        "config field (or to the constant the field reads) instead"
    )


@pytest.mark.parametrize("cls, params", REQUIRED, ids=lambda x: getattr(x, "__name__", None))
def test_parameters_every_caller_passes_have_no_default(cls, params):
    signature = inspect.signature(cls)
    assert all(signature.parameters[p].default is inspect.Parameter.empty for p in params)


@pytest.mark.parametrize(
    "cls, name, constant", FIELDS_FROM_CONSTANTS, ids=lambda x: getattr(x, "__name__", x)
)
def test_a_field_default_from_a_library_constant_names_it(cls, name, constant):
    assert getattr(cls, name) == constant
    node = _field_node(cls, name)
    assert not _is_literal(node), f"{cls.__name__}.{name} writes {ast.unparse(node)}: name the constant"


def test_the_aupro_defaults_are_read_from_the_metric(monkeypatch):
    monkeypatch.setattr(_AUPRO, "DEFAULT_FPR_LIMIT", 0.25)
    monkeypatch.setattr(_AUPRO, "DEFAULT_METHODS", ("zsad",))
    assert RunConfig().eval.aupro.fpr_limit == 0.25
    assert RunConfig().eval.aupro.methods == ["zsad"]
    # feclip.viz resolves its None to the same limit (it does not import the metrics up front)
    assert viz._fpr_limit(None) == 0.25 and viz._fpr_limit(0.1) == 0.1
    for func in (viz.pro_points, viz.plot_roc_pro, viz.save_category_figures):
        assert inspect.signature(func).parameters["fpr_limit"].default is None


def test_feclip_predict_takes_sigma_from_the_scoring_config():
    from feclip.apps.predict import build_parser

    assert build_parser().parse_args(["x.png"]).sigma is None  # resolved to ScoringConfig.sigma in run()


# (module, list, the option it lists, its dotted path in RunConfig)
ALLOWED_LISTS = [
    ("feclip.losses", "MASK_TARGETS", "train.loss.mask_target"),
    ("feclip.losses", "MASK_LOSS_ON", "train.loss.mask_loss_on"),
    ("feclip.losses", "MASK_LOSS_INPUTS", "train.loss.mask_loss_input"),
    ("feclip.models.feclip", "AMP_MODES", "train.amp"),
    ("feclip.models.clip", "WEIGHT_PRECISIONS", "backbone.precision"),
    ("feclip.engine.train", "COMPILE_MODES", "train.compile"),
    ("feclip.engine.cache", "PREFIX_CACHE_MODES", "train.prefix_cache"),
    ("feclip.engine.cache", "PREFIX_CACHE_STORAGES", "train.prefix_cache_storage"),
    ("feclip.loggers", "LOGGERS", "logger.kind"),
    ("feclip.models.fewshot", "FEATURE_KINDS", "eval.fewshot_bank"),
    ("feclip.metrics.aupro", "AUPRO_METHODS", "eval.aupro.methods"),
    ("feclip.data.transforms", "RESIZE_MODES", "data.resize"),
    ("feclip.data.transforms", "MASK_RESIZE_METHODS", "data.mask_resize"),
    ("feclip.engine.train", "FC_PATCH_LR_FACTOR", "train.fc_patch.policy"),
]


@pytest.mark.parametrize("module, name, option", ALLOWED_LISTS, ids=lambda x: x)
def test_validate_checks_an_option_against_the_list_of_the_module_that_reads_it(
    monkeypatch, module, name, option
):
    home = importlib.import_module(module)
    assert not hasattr(config_module, name), f"feclip.config writes {name} again: import it from {module}"
    cfg = RunConfig()
    cfg.validate()
    narrowed = {"other": 1.0} if isinstance(getattr(home, name), dict) else ("other",)
    monkeypatch.setattr(home, name, narrowed)  # the home's list no longer allows the default
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")) as raised:
        cfg.validate()
    assert "other" in str(raised.value)


def test_backbone_precision_is_one_the_backbone_can_be_loaded_in():
    for precision in clip.WEIGHT_PRECISIONS:
        RunConfig(backbone=BackboneConfig(precision=precision)).validate()
    with pytest.raises(ConfigError, match=r"backbone\.precision must be one of .*fp16.*'fp8'"):
        RunConfig(backbone=BackboneConfig(precision="fp8")).validate()
    # two lists, two names: what the weights are stored in, and what the model computes in
    model_module = importlib.import_module("feclip.models.feclip")
    assert not hasattr(clip, "PRECISIONS") and not hasattr(model_module, "PRECISIONS")
    assert set(model_module.COMPUTE_PRECISIONS) < set(clip.WEIGHT_PRECISIONS)

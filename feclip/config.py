"""Typed run configuration: plain dataclasses, the schema behind the Hydra configs in ``feclip/conf/``.

The library takes these objects (never a DictConfig); :mod:`feclip.apps.train` registers them with Hydra's
ConfigStore so that a misspelled key or a wrong type fails when the config is composed.
Every default is the paper preset (docs/method.md), and this is its only home: ``feclip/conf/train.yaml``
composes these dataclasses first, and the YAML files there set only what differs from them
(tests/test_config_defaults.py). A few defaults are also those of a library function that cannot import
this module (it would import torch, or itself); their one literal is a constant beside that function,
and the field here reads it (``data.resize``, ``data.mask_resize``, ``backbone.name``,
``backbone.precision``, ``eval.aupro.*``). Library functions that can import this module default to the
fields here (``feclip.losses``, ``feclip.models.fewshot``, ``feclip.engine.cache``).

The values an option may take are listed by the module that reads it, and :meth:`RunConfig.validate`
imports them from there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

from feclip.data.transforms import DEFAULT_MASK_RESIZE, DEFAULT_RESIZE
from feclip.errors import ConfigError
from feclip.methods.anomalyclip import AnomalyClipConfig
from feclip.methods.aprilgan import AprilGanConfig
from feclip.methods.winclip import WinClipConfig
from feclip.models.clip import DEFAULT_MODEL, DEFAULT_WEIGHT_PRECISION
from feclip.models.feclip import FEClipConfig
from feclip.scoring import ScoringConfig


def _aupro_default(name: str):
    """A dataclass field whose default is ``feclip.metrics.aupro.<name>`` (a tuple given as a list),
    read when a config is made: the metrics import scikit-learn, which importing this module does not
    need (``feclip-cache``)."""

    def default():
        value = getattr(import_module("feclip.metrics.aupro"), name)
        return list(value) if isinstance(value, tuple) else value

    return field(default_factory=default)


@dataclass
class PathsConfig:
    data_root: str = "data"  # datasets live under here (the Hydra config reads env DATA_ROOT)
    results_dir: str = "results"  # runs write <results_dir>/<study>/<variant>/seed=<seed>/
    cache_dir: str = ".cache/feclip"  # generated data (the synthetic sets) and other caches


@dataclass
class BackboneConfig:
    name: str = DEFAULT_MODEL  # ViT-L-14-336-quickgelu (feclip.models.clip, load_clip's default)
    pretrained: str | None = "openai"  # open_clip tag, checkpoint file, or null for random weights
    # the dtype the CLIP's weights are loaded in: fp32 | bf16 | fp16 (feclip.models.clip.WEIGHT_PRECISIONS);
    # not the compute precision of the model, which train.amp chooses
    precision: str = DEFAULT_WEIGHT_PRECISION
    image_size: int | None = None  # null = the model's own (336); e.g. 518 interpolates positions
    fallback_tiny: bool = False  # weights missing -> feclip-tiny with a loud warning (the demo)


@dataclass
class DatasetRef:
    """A dataset to read: ``name`` (a reader), its folder under ``paths.data_root`` and a split."""

    name: str = "mvtec"
    dir: str | None = None  # folder under data_root; null = the reader's default folder name
    split: str = "test"
    categories: list[str] | None = None  # null = all
    # reader options, e.g. {good_dir: ok} for `folder`, {split_file: 2cls_highshot} for `visa`,
    # {protocol: adaclip} for `dagm`, {mask_threshold: 127} for `kvasir` (docs/datasets.md)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    train: DatasetRef = field(default_factory=DatasetRef)
    targets: list[DatasetRef] = field(default_factory=list)
    cache_images: bool = True  # decode each image once, reuse across epochs
    # keep the decoded, resized images and masks on disk under <paths.cache_dir>/decoded
    # (feclip.data.decoded): the first run over a dataset decodes it once, every later run (any seed,
    # variant or process) maps the arrays and never decodes; the same numbers either way
    decoded_cache: bool = True
    num_workers: int = 0
    # how training and evaluation masks are resized to the input size: bilinear (AnomalyCLIP's
    # pipeline: antialiased bilinear on the 0/255 mask, then > 0.5) | nearest; original-resolution
    # evaluation masks are never resized
    mask_resize: str = DEFAULT_MASK_RESIZE
    # how images (and masks) become the square input: square (resize both sides; the peers') |
    # center_crop (shorter side to the input size, then the central square; the earlier study's)
    resize: str = DEFAULT_RESIZE


@dataclass
class FcPatchConfig:
    policy: str = "lr_div_100"  # same | lr_div_10 | lr_div_100 | frozen | frozen_after
    frozen_after_batches: int = 50  # for policy=frozen_after


@dataclass
class LossConfig:
    w_cls: float = 1.0  # per-tap BCE on the CLS abnormal probability (Eq. 4)
    w_focal: float = 1.0  # per-tap focal loss on the map (Eq. 5)
    w_dice: float = 1.0  # per-tap dice loss on the map (Eq. 5)
    focal_gamma: float = 2.0
    focal_alpha: float | None = None  # null = both classes weigh 1 (the peers); 0.25 = the earlier study
    dice_smooth: float = 1.0
    mask_target: str = "upsample"  # upsample (map to input size) | nearest | maxpool (mask to the grid)
    mask_loss_on: str = "all"  # all | abnormal (images)
    mask_loss_input: str = "probability"  # probability | logit_margin (upsample the margin, then sigmoid)


@dataclass
class TrainConfig:
    epochs: int = 9
    batch_size: int = 16
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    fc_patch: FcPatchConfig = field(default_factory=FcPatchConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    amp: str = "bf16"  # the model precision (training and evaluation): bf16 on CUDA, fp32 on CPU | none
    compile: str = "off"  # torch.compile the training forward: off | default | reduce-overhead | max-autotune
    prefix_cache: str = (
        "auto"  # auto (on when it fits prefix_cache_max_gb) | on | off: see feclip.engine.cache
    )
    prefix_cache_storage: str = "device"  # device (bf16 on CUDA) | pinned (host memory)
    prefix_cache_max_gb: float = 24.0
    max_steps: int | None = None  # stop after this many optimizer steps (smoke tests)
    resume: bool = True  # continue from the run directory's last epoch checkpoint
    # load the adapters of an earlier training of the same training identity (seed, backbone, model,
    # train.* but these switches, training data and its options, precision) from the adapter store
    # <paths.cache_dir>/adapters instead of training again, and store what this run trains
    # (feclip.engine.store); the same weights either way. force=true retrains and replaces the entry
    reuse: bool = True
    # strict deterministic kernels during training only (feclip.engine.train.deterministic_algorithms);
    # off by default: on CUDA a run then varies from run to run within float rounding (README, Speed)
    deterministic: bool = False
    progress: bool = True


@dataclass
class PostprocessConfig:
    """Map post-processing after Gaussian smoothing (the earlier study's experiment 5)."""

    percentile_keep: float | None = None  # keep values >= this per-image percentile (e.g. 90), floor the rest
    morph_open: int = 0  # grey opening with a (2r+1)^2 square, r pixels; 0 = off
    min_component_px: int = 0  # drop components smaller than this of the top-decile region; 0 = off
    component_quantile: float = 0.9  # per-image quantile that defines the region for min_component_px


@dataclass
class AuproConfig:
    # the defaults of feclip.metrics.aupro (DEFAULT_FPR_LIMIT: 0.3; DEFAULT_METHODS: exact and zsad)
    fpr_limit: float = _aupro_default("DEFAULT_FPR_LIMIT")
    methods: list[str] = _aupro_default("DEFAULT_METHODS")
    include_normal: bool = True  # normal images add to the FPR (the standard); false = anomalous images only
    per_image_norm: bool = False  # min-max normalise each map before the AUPRO (the earlier study's check)


@dataclass
class EvalConfig(ScoringConfig):
    """Evaluation options. The first six, ``map_kind``, ``tap_aggregation``, ``map_taps``,
    ``score_taps``, ``tap_weights`` and ``sigma`` (keys ``eval.*``), are those of
    :class:`~feclip.scoring.ScoringConfig`, their one home (defaults included); these follow."""

    resolution: str = "input"  # input (the model's square size) | original (each image's own size)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    aupro: AuproConfig = field(default_factory=AuproConfig)
    micro: bool = True  # also write pooled (__micro__) rows
    # where the metrics sort the normal pixels' scores (most of their work): auto (on the evaluation's
    # GPU when it has one, else numpy) | cpu (numpy always). The same numbers bit for bit either way
    metrics_device: str = "auto"
    batch_size: int = 32
    fewshot_k: int = 0  # 0 = zero-shot; k > 0 = k normal reference images per category (paper Table 5)
    fewshot_bank: str = "fused"  # fused (the tap tokens after fusion) | plain (before the tap's adapter)
    # where the few-shot references come from, per category: train (the target's train split) | reference
    # (its reference/ folder) | holdout (k normal test images, left out of the metrics) | auto (the first
    # of those three holding a normal image of the category; docs/fewshot.md)
    fewshot_source: str = "auto"
    save_figures: bool = False  # per category: best/worst montage and ROC/PRO curves under figures/
    # read the model's raw per-tap logits on a target from <paths.cache_dir>/outputs when the same
    # weights, backbone and data were evaluated before (no forward pass), and store them otherwise
    # (feclip.engine.store); the same numbers bit for bit. Never for few-shot (eval.fewshot_k > 0)
    reuse_outputs: bool = True

    def scoring(self) -> ScoringConfig:
        """The scoring options alone, validated (:meth:`ScoringConfig.of`)."""
        return ScoringConfig.of(self)


@dataclass
class LoggerConfig:
    kind: str = "none"  # none | wandb (offline unless WANDB_MODE says otherwise)
    project: str = "feclip"
    mode: str = "offline"


@dataclass
class MethodConfig:
    """Which method runs: FE-CLIP (``model.*``) or one of its peers, with that peer's options
    (``method.<name>.*``; each dataclass lives beside its method in :mod:`feclip.methods`, defaults =
    the authors' published setting). ``method=<name>`` (feclip/conf/method) also sets the reference's training
    schedule and smoothing."""

    name: str = "feclip"  # feclip | winclip | aprilgan | anomalyclip (feclip.methods.model.METHODS)
    winclip: WinClipConfig = field(default_factory=WinClipConfig)
    aprilgan: AprilGanConfig = field(default_factory=AprilGanConfig)
    anomalyclip: AnomalyClipConfig = field(default_factory=AnomalyClipConfig)


# FE-CLIP-only options a peer method does not read: a run of a peer refuses any of them set away from
# its default (they would be silently ignored otherwise). train.fc_patch is not among them: the demo
# and the ablations set it, and it names a layer a peer does not have (its policy is FE-CLIP's alone).
FECLIP_ONLY = (
    "model",
    "eval.map_kind",
    "eval.tap_aggregation",
    "eval.map_taps",
    "eval.score_taps",
    "eval.tap_weights",
    "eval.fewshot_k",
    "train.loss",
    "train.compile",
)


@dataclass
class RunConfig:
    study: str = "default"
    variant: str = "default"
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    force: bool = False  # re-run even when metrics.csv is complete
    checkpoint: str | None = None  # feclip-eval: adapter file to evaluate (null = untrained / bare CLIP)
    paths: PathsConfig = field(default_factory=PathsConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    model: FEClipConfig = field(default_factory=FEClipConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    method: MethodConfig = field(default_factory=MethodConfig)

    def validate(self) -> None:
        """Check option values the type system cannot; raises :class:`ConfigError` naming the field."""
        # the lists of the modules that read each option, imported when called (several of those
        # modules import this one; all are read at the call, so each list has one home)
        from feclip.engine.cache import PREFIX_CACHE_MODES, PREFIX_CACHE_STORAGES
        from feclip.engine.evaluate import RESOLUTIONS
        from feclip.engine.train import COMPILE_MODES, FC_PATCH_LR_FACTOR
        from feclip.loggers import LOGGERS
        from feclip.losses import MASK_LOSS_INPUTS, MASK_LOSS_ON, MASK_TARGETS
        from feclip.metrics.aupro import AUPRO_METHODS
        from feclip.metrics.sorting import METRICS_DEVICES
        from feclip.models.clip import WEIGHT_PRECISIONS
        from feclip.models.feclip import AMP_MODES
        from feclip.models.fewshot import FEATURE_KINDS, FEWSHOT_SOURCES

        choices = [
            ("backbone.precision", self.backbone.precision, WEIGHT_PRECISIONS),
            ("train.fc_patch.policy", self.train.fc_patch.policy, tuple(FC_PATCH_LR_FACTOR)),
            ("train.loss.mask_target", self.train.loss.mask_target, MASK_TARGETS),
            ("train.loss.mask_loss_on", self.train.loss.mask_loss_on, MASK_LOSS_ON),
            ("train.loss.mask_loss_input", self.train.loss.mask_loss_input, MASK_LOSS_INPUTS),
            ("train.amp", self.train.amp, AMP_MODES),
            ("train.compile", self.train.compile, COMPILE_MODES),
            ("train.prefix_cache", self.train.prefix_cache, PREFIX_CACHE_MODES),
            ("train.prefix_cache_storage", self.train.prefix_cache_storage, PREFIX_CACHE_STORAGES),
            ("eval.resolution", self.eval.resolution, RESOLUTIONS),
            ("eval.metrics_device", self.eval.metrics_device, METRICS_DEVICES),
            ("logger.kind", self.logger.kind, LOGGERS),
            ("eval.fewshot_bank", self.eval.fewshot_bank, FEATURE_KINDS),
            ("eval.fewshot_source", self.eval.fewshot_source, FEWSHOT_SOURCES),
        ]
        for name, value, allowed in choices:
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self.train, name) < (0 if name == "epochs" else 1):
                raise ConfigError(
                    f"train.{name} must be >= {0 if name == 'epochs' else 1}, got {getattr(self.train, name)}"
                )
        if not self.train.lr > 0 or self.train.lr != self.train.lr or self.train.lr == float("inf"):
            raise ConfigError(f"train.lr must be a positive finite number, got {self.train.lr}")
        if len(self.train.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.train.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {list(self.train.betas)}")
        if self.train.prefix_cache_max_gb < 0:
            raise ConfigError(f"train.prefix_cache_max_gb must be >= 0, got {self.train.prefix_cache_max_gb}")
        if self.train.max_steps is not None and self.train.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1 or null, got {self.train.max_steps}")
        if self.train.fc_patch.frozen_after_batches < 0:
            raise ConfigError(
                f"train.fc_patch.frozen_after_batches must be >= 0, got {self.train.fc_patch.frozen_after_batches}"
            )
        if self.eval.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.eval.batch_size}")
        if self.data.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.data.num_workers}")
        if not 0.0 < self.eval.aupro.fpr_limit <= 1.0:
            raise ConfigError(f"eval.aupro.fpr_limit must lie in (0, 1], got {self.eval.aupro.fpr_limit}")
        check_device_name(self.device)
        taps = list(self.model.taps)
        for name in ("map_taps", "score_taps"):
            chosen = getattr(self.eval, name)
            if chosen is not None:
                if not chosen:
                    raise ConfigError(f"eval.{name} must name at least one tap, or be null (all taps)")
                stray = [t for t in chosen if t not in taps]
                if stray:
                    raise ConfigError(
                        f"eval.{name} names blocks {stray} that are not taps of the model (model.taps={taps})"
                    )
        if self.eval.tap_weights is not None and len(self.eval.tap_weights) != len(taps):
            raise ConfigError(
                f"eval.tap_weights needs one weight per model tap {taps}, got {list(self.eval.tap_weights)}"
            )
        if self.eval.fewshot_k < 0:
            raise ConfigError(f"eval.fewshot_k must be >= 0, got {self.eval.fewshot_k}")
        if self.eval.fewshot_k and self.eval.resolution != "input":
            raise ConfigError("eval.fewshot_k > 0 needs eval.resolution=input")
        bad = [m for m in self.eval.aupro.methods if m not in AUPRO_METHODS]
        if bad:
            raise ConfigError(f"eval.aupro.methods must be chosen from {AUPRO_METHODS}, got {bad}")
        self.eval.scoring()
        self.model.validate()
        self._validate_method()

        # -- data options ------------------------------------------------------------------------
        from feclip.data.transforms import MASK_RESIZE_METHODS, RESIZE_MODES

        if self.data.mask_resize not in MASK_RESIZE_METHODS:
            raise ConfigError(
                f"data.mask_resize must be one of {MASK_RESIZE_METHODS}, got {self.data.mask_resize!r}"
            )
        if self.data.resize not in RESIZE_MODES:
            raise ConfigError(f"data.resize must be one of {RESIZE_MODES}, got {self.data.resize!r}")
        if self.data.resize == "center_crop" and self.eval.resolution != "input":
            raise ConfigError(
                "data.resize=center_crop needs eval.resolution=input (the maps cover the central crop only)"
            )

    def _validate_method(self) -> None:
        """``method.name`` is known; a peer's options are valid, and FE-CLIP-only options
        (:data:`FECLIP_ONLY`) stay at their defaults, the prefix cache off or ``auto``."""
        from feclip.methods.model import METHODS

        name = self.method.name
        if name not in METHODS:
            raise ConfigError(f"method.name must be one of {METHODS}, got {name!r}")
        if name == "feclip":
            return
        getattr(self.method, name).validate()
        default = RunConfig()
        changed = [key for key in FECLIP_ONLY if _get(self, key) != _get(default, key)]
        if self.train.prefix_cache == "on":
            changed.append("train.prefix_cache")
        if changed:
            raise ConfigError(
                f"method={name} does not read {', '.join(changed)} (FE-CLIP's options): leave them at their "
                f"defaults, and set {name}'s own under method.{name}.*"
            )

    def expand_paths(self) -> None:
        """Expand ``~`` and environment variables in every path, once, before anything reads them."""
        for name in ("data_root", "results_dir", "cache_dir"):
            setattr(self.paths, name, os.path.expandvars(os.path.expanduser(getattr(self.paths, name))))
        if self.checkpoint:
            self.checkpoint = os.path.expandvars(os.path.expanduser(self.checkpoint))


def check_device_name(name: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; a CUDA device must exist on this machine."""
    import re

    if name in ("auto", "cpu"):
        return
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m is None:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"device={name}: no CUDA device is available on this machine (use device=cpu or auto)"
        )
    index = int(m[1] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0 ...)"
        )


def _get(cfg, dotted: str):
    """``cfg.a.b`` for ``dotted`` = ``"a.b"``."""
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg

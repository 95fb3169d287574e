"""The only Hydra code: thin ``@hydra.main`` wrappers that turn the composed config into a typed
:class:`feclip.config.RunConfig` and call the plain library function :func:`feclip.engine.run.run`.

``feclip-train [+experiment=NAME] [key=value ...]`` trains then evaluates; ``feclip-eval checkpoint=FILE``
evaluates a saved adapter file (or, without one, the untrained model / ``+experiment=clip_baseline``).
A misspelled key fails at compose time (the configs are backed by the dataclasses); a user mistake
prints one line ``feclip-train: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from feclip.config import RunConfig
from feclip.errors import FEClipError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("feclip")

ConfigStore.instance().store(name="run_schema", node=RunConfig)


def variant_name(overrides: str, prefix: str = "") -> str:
    """A folder-safe variant name from Hydra's override string (``"default"`` when empty).

    ``prefix`` keeps evaluation-only runs (``feclip-eval``: ``eval``) apart from training runs.
    """
    name = re.sub(r"[^A-Za-z0-9=,._+\-\[\]]", "_", overrides.replace("/", "."))
    if prefix:
        return f"{prefix},{name}" if name else prefix
    return name or "default"


def to_run_config(cfg: DictConfig, prefix: str = "") -> RunConfig:
    """The composed DictConfig as a typed RunConfig, with ``variant: auto`` resolved."""
    run = OmegaConf.to_object(cfg)
    if run.variant == "auto":
        try:
            overrides = HydraConfig.get().job.override_dirname
        except ValueError:  # composed outside a Hydra app (tests)
            overrides = ""
        run.variant = variant_name(overrides, prefix)
    return run


def _execute(cfg: DictConfig, prog: str, do_train: bool) -> None:
    from feclip.engine.run import run

    try:
        run(to_run_config(cfg, "" if do_train else "eval"), do_train=do_train)
    except FEClipError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _train(cfg: DictConfig) -> None:
    _execute(cfg, "feclip-train", do_train=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def _eval(cfg: DictConfig) -> None:
    _execute(cfg, "feclip-eval", do_train=False)


def train_main() -> None:
    """Console script ``feclip-train``."""
    _train()


def eval_main() -> None:
    """Console script ``feclip-eval``."""
    _eval()

"""Optional experiment trackers beside the plain-text run log (which is always written).

``logger.kind=none`` (default) logs nothing extra; ``logger.kind=wandb`` sends the epoch losses and the
final metrics to Weights & Biases, offline by default (``logger.mode=offline``: no account, no network;
``wandb sync`` uploads later).
"""

from __future__ import annotations

import logging
from pathlib import Path

from feclip.errors import ConfigError

log = logging.getLogger("feclip")

LOGGERS = ("none", "wandb")  # logger.kind (feclip.config.RunConfig.validate checks it against this)


class NullLogger:
    """Logs nothing: ``logger.kind=none``."""

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        pass

    def log_results(self, rows) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger(NullLogger):
    """Weights & Biases run in ``run_dir/wandb``."""

    def __init__(self, cfg, run_dir: Path, name: str, config: dict):
        try:
            import wandb
        except ImportError as e:
            raise ConfigError("logger.kind=wandb needs the wandb package: pip install 'feclip[wandb]'") from e
        self._run = wandb.init(
            project=cfg.project,
            mode=cfg.mode,
            dir=str(run_dir),
            name=name,
            config=config,
            reinit="create_new",
        )

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        self._run.log({f"train/{k}": v for k, v in values.items()} | {"epoch": epoch})

    def log_results(self, rows) -> None:
        for r in rows:
            self._run.summary[f"{r.dataset}/{r.category}/{r.metric}"] = r.value

    def finish(self) -> None:
        self._run.finish()


def make_logger(cfg, run_dir: Path, name: str, config: dict) -> NullLogger:
    """The tracker named by ``cfg.kind`` (a :class:`feclip.config.LoggerConfig`)."""
    if cfg.kind == "none":
        return NullLogger()
    if cfg.kind == "wandb":
        return WandbLogger(cfg, run_dir, name, config)
    raise ConfigError(f"logger.kind must be one of {LOGGERS}, got {cfg.kind!r}")

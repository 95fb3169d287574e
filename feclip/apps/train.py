"""``feclip-train`` and ``feclip-eval``, the only Hydra code: thin ``@hydra.main`` wrappers that turn the composed config into a typed
:class:`feclip.config.RunConfig` and call the plain library function :func:`feclip.engine.run.run`.

``feclip-train [+experiment=NAME] [key=value ...]`` trains then evaluates; ``feclip-eval checkpoint=FILE``
evaluates a saved adapter file (or, without one, the untrained model / ``+experiment=clip_baseline``).
A misspelled key fails at compose time (the configs are backed by the dataclasses); a user mistake
prints one line ``feclip-train: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from feclip.apps.common import fail
from feclip.config import RunConfig
from feclip.errors import ConfigError, FEClipError

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger("feclip")

ConfigStore.instance().store(name="run_schema", node=RunConfig)


def hydra_dir(results_dir: str) -> str:
    """Where Hydra keeps its own outputs (``.hydra/`` configs, job log): ``<results_dir>/.hydra`` with
    ``~`` expanded, or a folder in the system's temporary directory when the results folder cannot be
    written, so that a read-only results tree can still be read (finished runs skipped) and a run that
    must write there fails with feclip's one-line error rather than Hydra's traceback."""
    import tempfile

    path = Path(os.path.expandvars(os.path.expanduser(results_dir))) / ".hydra"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return str(path)
    except OSError:
        pass
    return str(Path(tempfile.gettempdir()) / f"feclip-hydra-{os.getuid() if hasattr(os, 'getuid') else 0}")


if not OmegaConf.has_resolver("feclip_hydra_dir"):
    OmegaConf.register_new_resolver("feclip_hydra_dir", hydra_dir)


def variant_name(overrides: str, prefix: str = "") -> str:
    """A folder-safe variant name from Hydra's override string (``"default"`` when empty).

    ``prefix`` keeps evaluation-only runs (``feclip-eval``: ``eval``) apart from training runs.
    """
    name = re.sub(r"[^A-Za-z0-9=,._+\-\[\]]", "_", overrides.replace("/", "."))
    if prefix:
        return f"{prefix},{name}" if name else prefix
    return name or "default"


def unknown_keys(node, path: str = "") -> list[str]:
    """Keys of a composed config that its schema does not have, dotted.

    Hydra refuses ``train.epochz=3`` at compose time, but ``+train.epochz=3`` and ``++train.epochz=3``
    add the key to the structured node, and converting to the dataclass would drop it silently.
    Free-form ``dict`` fields (``data.*.options``) take any key.
    """
    import dataclasses

    found = []
    if isinstance(node, DictConfig):
        schema = OmegaConf.get_type(node)
        fields = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
        for key in node.keys():
            dotted = f"{path}.{key}" if path else str(key)
            if fields is not None and key not in fields:
                found.append(dotted)
            elif fields is not None:
                found += unknown_keys(node._get_node(key), dotted)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            found += unknown_keys(node._get_node(i), f"{path}[{i}]")
    return found


def to_run_config(cfg: DictConfig, prefix: str = "") -> RunConfig:
    """The composed DictConfig as a typed RunConfig, with ``variant: auto`` resolved.

    Raises ConfigError for a key the schema does not have (however it was added).
    """
    stray = unknown_keys(cfg)
    if stray:
        raise ConfigError(
            f"unknown config key(s) {', '.join(stray)}: not a field of the run schema "
            "(see `feclip-train --cfg job` for the keys there are)"
        )
    run = OmegaConf.to_object(cfg)
    if run.variant == "auto":
        try:
            overrides = HydraConfig.get().job.override_dirname
        except ValueError:  # composed outside a Hydra app (tests)
            overrides = ""
        run.variant = variant_name(overrides, prefix)
    return run


FAILURES_FILE = "failures.txt"


def _in_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def _execute(cfg: DictConfig, prog: str, do_train: bool) -> None:
    """Run one job. In a sweep a failing job is logged and recorded, and the sweep goes on."""
    from feclip.engine.run import run

    try:
        run_cfg = to_run_config(cfg, "" if do_train else "eval")
    except FEClipError as e:
        raise SystemExit(fail(prog, e)) from None
    try:
        run(run_cfg, do_train=do_train)
    except KeyboardInterrupt:
        print(
            f"{prog}: interrupted; every finished epoch is kept in the run folder: run the same command "
            "again to resume",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    except Exception as e:  # noqa: BLE001 - reported below, with a traceback only for bugs
        user_error = isinstance(e, FEClipError)
        if not _in_multirun():
            if user_error:
                raise SystemExit(fail(prog, e)) from None
            raise
        if user_error:
            log.error("job failed: %s", e)
        else:
            log.exception("job failed")
        record = f"{run_cfg.study}/{run_cfg.variant}/seed={run_cfg.seed}\t{type(e).__name__}: {str(e).splitlines()[0]}\n"
        with open(Path(HydraConfig.get().sweep.dir) / FAILURES_FILE, "a") as f:
            f.write(record)


class SweepReport(Callback):
    """Lists the failed jobs of a sweep at its end (and exits with status 1 when there are any)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        (Path(config.hydra.sweep.dir) / FAILURES_FILE).unlink(missing_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        path = Path(config.hydra.sweep.dir) / FAILURES_FILE
        failures = path.read_text().splitlines() if path.exists() else []
        if failures:
            print(f"\n{len(failures)} job(s) of the sweep failed (listed in {path}):", file=sys.stderr)
            for line in failures:
                print(f"  {line}", file=sys.stderr)
            raise SystemExit(1)
        print("every job of the sweep finished (complete runs were skipped)", file=sys.stderr)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _train(cfg: DictConfig) -> None:
    _execute(cfg, "feclip-train", do_train=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def _eval(cfg: DictConfig) -> None:
    _execute(cfg, "feclip-eval", do_train=False)


# Under torchrun, ranks other than 0 leave Hydra's outputs (.hydra/, the job log) to rank 0.
OTHER_RANK_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none")


def _quiet_other_ranks() -> None:
    if int(os.environ.get("RANK", "0")) > 0:
        sys.argv += [o for o in OTHER_RANK_OVERRIDES if o not in sys.argv]


def train_main() -> None:
    """Console script ``feclip-train`` (also under ``torchrun``: docs/distributed.md)."""
    _quiet_other_ranks()
    _train()


def eval_main() -> None:
    """Console script ``feclip-eval``."""
    _quiet_other_ranks()
    _eval()

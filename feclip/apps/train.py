"""``feclip-train`` and ``feclip-eval``, the only Hydra code: thin ``@hydra.main`` wrappers that turn the composed config into a typed
:class:`feclip.config.RunConfig` and call the plain library function :func:`feclip.engine.run.run`.

``feclip-train [+experiment=NAME] [key=value ...]`` trains then evaluates; ``feclip-eval checkpoint=FILE``
evaluates a saved adapter file (or, without one, the untrained model / ``+experiment=clip_baseline``).
A misspelled key fails at compose time (the configs are backed by the dataclasses); a user mistake
prints one line ``feclip-train: error: ...`` and exits with status 2: a bad flag, a malformed override,
an unknown key or group option, a value of the wrong type (Hydra's own report of those is several lines
and exit status 1: :func:`_hydra_app` runs Hydra so that it raises them instead, and folds them).
The configs are package data (``feclip/conf/``), so a wheel install has them too.
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
from hydra.errors import HydraException, OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from feclip.apps.common import fail, one_line
from feclip.config import RunConfig
from feclip.errors import ConfigError, FEClipError

#: The Hydra configs, shipped inside the package (``feclip/conf/``) so that a wheel install has them.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
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


def variant_name(overrides: str, prefix: str = "") -> str:
    """A folder-safe variant name from Hydra's override string (``"default"`` when empty).

    ``prefix`` keeps evaluation-only runs (``feclip-eval``: ``eval``) apart from training runs.
    """
    name = re.sub(r"[^A-Za-z0-9=,._+\-\[\]]", "_", overrides.replace("/", "."))
    if prefix:
        return f"{prefix},{name}" if name else prefix
    return name or "default"


def job_name(study: str, variant: str, seed: int, config_name: str, overrides: str) -> str:
    """A job's name, its run folder under the results: ``<study>/<variant>/seed=<seed>``, with
    ``variant: auto`` resolved as :func:`to_run_config` does (``feclip-eval``, config ``eval``: prefixed
    ``eval``). The SLURM launcher names each job so (``hydra/launcher=slurm``)."""
    if variant == "auto":
        variant = variant_name(overrides, "eval" if config_name == "eval" else "")
    return f"{study}/{variant}/seed={seed}"


if not OmegaConf.has_resolver("feclip_hydra_dir"):
    OmegaConf.register_new_resolver("feclip_hydra_dir", hydra_dir)
if not OmegaConf.has_resolver("feclip_job_name"):
    OmegaConf.register_new_resolver("feclip_job_name", job_name)


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
    except Exception as e:
        setattr(e, _RAISED_IN_JOB, True)  # raised by the run, not by the command line or a config
        _report_job_failure(e, prog, run_cfg)
    except KeyboardInterrupt:
        print(
            f"{prog}: interrupted; every finished epoch is kept in the run folder: run the same command "
            "again to resume",
            file=sys.stderr,
        )
        raise SystemExit(130) from None


def _report_job_failure(e: Exception, prog: str, run_cfg: RunConfig) -> None:
    """A failed run: one line and exit 2 for a user error, the exception for a bug; in a sweep, logged and
    recorded (with a traceback only for bugs), and the sweep goes on."""
    user_error = isinstance(e, FEClipError)
    if not _in_multirun():
        if user_error:
            raise SystemExit(fail(prog, e)) from None
        raise e
    if user_error:
        log.error("job failed: %s", e)
    else:
        log.error("job failed", exc_info=e)
    record = f"{run_cfg.study}/{run_cfg.variant}/seed={run_cfg.seed}\t{type(e).__name__}: {(str(e).splitlines() or [''])[0]}\n"
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


#: Set on an exception raised by a run itself (a bug), so that :func:`_hydra_app` does not take it for
#: a config error.
_RAISED_IN_JOB = "_feclip_raised_in_job"

#: Launcher configs that come with an extra: a missing one names the extra to install.
LAUNCHER_EXTRAS = {"joblib": "parallel", "submitit_slurm": "slurm", "submitit_local": "slurm"}


def _raised_by_hydra(err: BaseException) -> bool:
    """Whether ``err`` was raised in Hydra's or OmegaConf's own code (its innermost frame)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return module.split(".")[0] in ("hydra", "omegaconf")


def is_config_error(err: BaseException) -> bool:
    """Whether ``err``, raised outside a run, is a mistake on the command line or in a config: Hydra's
    and OmegaConf's errors (composition, unknown key or option, wrong type, override syntax), and the
    ``ValueError``/``ImportError`` Hydra raises itself (conflicting flags, a launcher plugin missing)."""
    if getattr(err, _RAISED_IN_JOB, False):
        return False
    if isinstance(err, (HydraException, OmegaConfBaseException)):
        return True
    return isinstance(err, (ValueError, ImportError)) and _raised_by_hydra(err)


def config_error_message(err: BaseException) -> str:
    """Hydra's multi-line report of a config error as one line.

    The OmegaConf error behind it is added when Hydra's message does not already hold it, without
    OmegaConf's ``reference_type``/``object_type`` lines, Hydra's config search path and its advice to
    add an unknown key with ``+`` (the schema refuses that too); a list of
    available options (``Available options in 'taps':`` then one a line) becomes a comma-separated list;
    a malformed override is named; a missing launcher config names the extra that brings it.
    """
    text = str(err)
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException) and str(cause).strip() not in text:
        text += "\n" + str(cause)
    out: list[str] = []
    listing = False  # inside "Available options in 'group':"
    for raw in text.split("Config search path:")[0].splitlines():
        line = raw.strip().rstrip(".")
        # the schema refuses the "+key" that Hydra suggests for an unknown key just as well
        if not line or line.startswith(("reference_type=", "object_type=", "To append to your config use")):
            continue
        if listing and raw.startswith("\t"):
            out[-1] += (" " if out[-1].endswith(":") else ", ") + line
            continue
        listing = line.startswith("Available options")
        out.append(line)
    message = one_line("; ".join(out))
    if isinstance(err, OverrideParseException):
        message = f"cannot parse the override {err.override!r}: {message}"
    for config, extra in LAUNCHER_EXTRAS.items():
        if f"hydra/launcher/{config}'" in message:
            message += f" (this launcher comes with the {extra} extra: pip install 'feclip[{extra}]')"
            break
    return message


def _check_flags(prog: str, argv: list[str]) -> None:
    """Hydra's command-line flags, checked with Hydra's own parser: a bad one is one line, exit 2."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def error(message: str):
        print(f"{prog}: error: {one_line(message)} (see {prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    parser.error = error  # type: ignore[method-assign]
    parser.parse_args(argv)


def _register_launchers() -> None:
    """Register feclip's SLURM launcher with Hydra (when the slurm extra is installed).

    Hydra finds plugins by scanning the ``hydra_plugins`` namespace, which a wheel install satisfies but
    an editable one may not (setuptools' editable finder hides the folder from the scan)."""
    try:
        from hydra_plugins.feclip_launchers.slurm import NamedSlurmLauncher
    except ImportError:  # no hydra-submitit-launcher: hydra/launcher=slurm says which extra is missing
        return
    from hydra.core.plugins import Plugins

    Plugins.instance().register(NamedSlurmLauncher)


def _hydra_app(app, prog: str) -> None:
    """Run the ``@hydra.main`` function ``app`` with feclip's error discipline.

    Hydra prints a config error (unknown key or option, wrong type, malformed override) as several lines
    and exits 1. Here Hydra raises it instead (``HYDRA_FULL_ERROR=1`` while it runs, unless the user set
    it: then Hydra's full report is kept), and an error raised outside a run is printed as one line
    ``prog: error: ...`` with exit status 2. Errors of a run keep their handling in :func:`_execute`.
    """
    _check_flags(prog, sys.argv[1:])
    _register_launchers()
    user_full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        app()
    except Exception as err:
        if user_full_error == "1" or not is_config_error(err):
            raise
        raise SystemExit(fail(prog, config_error_message(err))) from None
    finally:
        if user_full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = user_full_error


def train_main() -> None:
    """Console script ``feclip-train`` (also under ``torchrun``: docs/distributed.md)."""
    _quiet_other_ranks()
    _hydra_app(_train, "feclip-train")


def eval_main() -> None:
    """Console script ``feclip-eval``."""
    _quiet_other_ranks()
    _hydra_app(_eval, "feclip-eval")

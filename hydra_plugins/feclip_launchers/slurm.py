"""``hydra/launcher=slurm``: submitit's SLURM launcher, with one SLURM job per sweep job, named after it.

submitit's own launcher submits a sweep as one job array, named once for all of its jobs from the
sweep's primary config (``hydra.job.name``: the same name, e.g. ``train``, for every job). This one
composes each job's config as the job will (:meth:`load_sweep_config`), reads its resolved
``hydra.launcher.name`` (``feclip/conf/hydra/launcher/slurm.yaml``: ``<study>/<variant>/seed=<seed>``)
and submits the job alone under that name, so ``squeue`` and ``sacct`` say which run is which. Jobs
run exactly as under submitit's launcher (its ``__call__``).

Defined only when the ``slurm`` extra (hydra-submitit-launcher) is installed; without it Hydra's plugin
scan finds nothing here, and ``hydra/launcher=slurm`` fails to compose (its ``submitit_slurm`` base is
missing) with a one-line error naming the extra.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurm
except ImportError:  # pip install 'feclip[slurm]'
    _SubmititSlurm = None

__all__ = ["job_names"]


def job_names(hydra_context: Any, config: Any, job_overrides: Sequence[Sequence[str]]) -> list[str]:
    """The resolved ``hydra.launcher.name`` of each job of a sweep, from the job's own config."""
    names = []
    for overrides in job_overrides:
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        names.append(str(sweep_config.hydra.launcher.name))
    return names


if _SubmititSlurm is not None:
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn, filter_overrides
    from omegaconf import OmegaConf

    class NamedSlurmLauncher(_SubmititSlurm):
        """submitit's SLURM launcher, submitting each job of a sweep alone under its own name."""

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            import logging

            import submitit
            from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

            log = logging.getLogger(__name__)
            assert self.config is not None and self.hydra_context is not None
            init_keys = {"submitit_folder", "max_num_timeout"}
            init_params = {"folder": self.params["submitit_folder"]}
            if "max_num_timeout" in self.params:
                init_params[f"{self._EXECUTOR}_max_num_timeout"] = self.params["max_num_timeout"]
            executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
            base = set(OmegaConf.structured(BaseQueueConf).keys())
            executor.update_parameters(
                **{
                    (key if key in base else f"{self._EXECUTOR}_{key}"): value
                    for key, value in self.params.items()
                    if key not in init_keys
                }
            )
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            if "mode" in self.config.hydra.sweep:
                os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
            log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
            names = job_names(self.hydra_context, self.config, job_overrides)
            jobs = []
            for offset, (overrides, name) in enumerate(zip(job_overrides, names)):
                idx = initial_job_idx + offset
                log.info(f"\t#{idx} {name} : {' '.join(filter_overrides(overrides))}")
                executor.update_parameters(name=name)
                jobs.append(
                    executor.submit(
                        self,
                        list(overrides),
                        "hydra.sweep.dir",
                        idx,
                        f"job_id_for_{idx}",
                        Singleton.get_state(),
                    )
                )
            return [job.results()[0] for job in jobs]

    __all__ += ["NamedSlurmLauncher"]

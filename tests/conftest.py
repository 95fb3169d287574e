"""What many test files build: the tiny CLIP and FE-CLIP, the synthetic data sets, the run configs.

Plain helpers (``from conftest import compose_run, make_tiny_feclip``) and the fixtures on them:

* models are fresh on every call (tests train and change them): :func:`make_tiny_clip`,
  :func:`make_tiny_feclip`, :func:`randomize_adapters`; the factory fixtures ``tiny_clip`` and
  ``tiny_feclip`` hand out the first two;
* the synthetic sets are made once per session for each size (``make_synthetic`` is deterministic, and
  the tests only read them): the factory fixture ``synthetic_sets``, and ``sets`` / ``data_root`` at the
  smoke runs' size (:data:`SMOKE_SIZES`);
* runs: :func:`compose_run` (a Hydra config as ``feclip-train`` composes it), :func:`smoke_overrides`
  (a short run of the tiny CLIP on ``data_root``) and :func:`cache_override`;
* child processes import this checkout's ``feclip``, installed or not: :func:`repo_python_path`,
  :func:`train_cli`, :func:`run_notebook` (``experiments/analysis.ipynb`` on a results tree).

A run keeps decoded images under ``paths.cache_dir`` (default ``.cache/feclip``, relative to the working
folder: the repository's). :func:`smoke_overrides` and :func:`cache_override` point it to a temporary
folder of the session, so that a test run writes nothing in the repository.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parent.parent
TINY = "feclip-tiny"
# the synthetic sets of the smoke runs: 18 test images per set (3 categories of 3 good and 3 defective)
SMOKE_SIZES = {"n_train_good": 2, "n_test_good": 3, "n_test_bad": 3, "image_size": 64}

_RUN_CACHE: Path | None = None  # paths.cache_dir of the test runs; set by the session fixture below


# -- scripts ------------------------------------------------------------------------------------------


def load_script(relative: str):
    """A script of the repository (``scripts/peers/pin_winclip.py``) imported as a module, by path:
    the scripts are not a package."""
    import importlib.util

    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- models -------------------------------------------------------------------------------------------


def make_tiny_clip(seed: int | None = 0, *, logit_scale: float | None = None, **load_options):
    """A fresh tiny random CLIP, drawn after ``torch.manual_seed(seed)`` (None: the RNG as it is).

    ``logit_scale``: the CLIP's logit scale (a random CLIP starts at 1/0.07, the paper's temperature;
    100 is OpenAI's trained value). ``load_options`` go to :func:`feclip.models.load_clip`.
    """
    from feclip.models import load_clip

    if seed is not None:
        torch.manual_seed(seed)
    clip = load_clip(TINY, **load_options)
    if logit_scale is not None:
        clip.logit_scale.data.fill_(math.log(logit_scale))
    return clip


def make_tiny_feclip(
    clip=None, config=None, *, seed: int | None = 0, precision: str | None = None, **options
):
    """``FEClip(clip, config)`` built after ``torch.manual_seed(seed)`` (None: the RNG as it is); without
    ``clip`` the tiny CLIP is drawn then, without ``config`` it is ``FEClipConfig(**options)``."""
    from feclip.models import FEClip, FEClipConfig, load_clip

    if seed is not None:
        torch.manual_seed(seed)
    if clip is None:
        clip = load_clip(TINY)
    if config is None:
        config = FEClipConfig(**options)
    elif options:
        raise TypeError(f"make_tiny_feclip: options {sorted(options)} given with a config")
    return FEClip(clip, config, precision=precision)


def randomize_adapters(model, *, seed: int, scale: float):
    """Adapters that matter (normal draws times ``scale``, from a generator seeded with ``seed``) in
    place of the near-identity initialisation; returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.device))
    return model


@pytest.fixture()
def tiny_clip():
    """Factory: :func:`make_tiny_clip`."""
    return make_tiny_clip


@pytest.fixture()
def tiny_feclip():
    """Factory: :func:`make_tiny_feclip`."""
    return make_tiny_feclip


# -- synthetic data -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def synthetic_sets(tmp_path_factory):
    """Factory: ``synthetic_sets(**sizes)`` is ``make_synthetic(<root>/synthetic, **sizes)``, the folders
    ``{"set_a": ..., "set_b": ...}``, made once per session for each ``sizes``. Read them only (copy one to
    change it); ``<root>`` (``sets["set_a"].parents[1]``) is a ``paths.data_root`` for runs."""
    from feclip.data import make_synthetic

    made: dict[tuple, dict[str, Path]] = {}

    def make(**sizes) -> dict[str, Path]:
        key = tuple(sorted(sizes.items()))
        if key not in made:
            made[key] = make_synthetic(tmp_path_factory.mktemp("data") / "synthetic", **sizes)
        return made[key]

    return make


@pytest.fixture(scope="session")
def sets(synthetic_sets) -> dict[str, Path]:
    """The synthetic sets at :data:`SMOKE_SIZES`: ``{"set_a": folder, "set_b": folder}``."""
    return synthetic_sets(**SMOKE_SIZES)


@pytest.fixture(scope="session")
def data_root(sets) -> Path:
    """``paths.data_root`` of the smoke runs: it holds ``synthetic/set_a`` and ``synthetic/set_b``."""
    return sets["set_a"].parents[1]


# -- runs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def run_cache_dir(tmp_path_factory) -> Path:
    """``paths.cache_dir`` of the test runs (:func:`cache_override`): a folder of the session."""
    global _RUN_CACHE
    _RUN_CACHE = tmp_path_factory.mktemp("cache")
    return _RUN_CACHE


def cache_override() -> str:
    """The override that keeps a run's caches (decoded images) in the session's temporary folder."""
    if _RUN_CACHE is None:
        raise RuntimeError("cache_override() is for tests: the session fixture run_cache_dir sets it")
    return f"paths.cache_dir={_RUN_CACHE}"


def compose_run(overrides, name="train"):
    """The :class:`~feclip.config.RunConfig` that ``feclip-train`` (``name="eval"``: ``feclip-eval``)
    composes from ``overrides``."""
    from feclip.apps.train import CONF_DIR, to_run_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_run_config(compose(config_name=name, overrides=overrides))


def smoke_overrides(data_root, results, *extra) -> list[str]:
    """A short run of the tiny CLIP on the demo protocol: ``data_root`` (the synthetic sets), results in
    ``results``, caches in the session's folder; ``extra`` overrides come last (and win)."""
    return [
        "backbone=tiny",
        "protocol=demo",
        f"paths.data_root={data_root}",
        f"paths.results_dir={results}",
        cache_override(),
        "train.epochs=2",
        "train.batch_size=4",
        "train.progress=false",
        "eval.batch_size=8",
        *extra,
    ]


def train_cli(args, env_extra=None, timeout=120) -> subprocess.CompletedProcess:
    """``feclip-train ARGS`` in a fresh process (offline), output captured, run from a temporary working
    folder: the relative default paths (``results/.hydra`` of a run that fails, ``.cache/feclip``) land
    there, not in the repository; ``feclip`` is the repository's (``PYTHONPATH``)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": repo_python_path(), **(env_extra or {})}
    with tempfile.TemporaryDirectory(prefix="feclip-cli-") as cwd:
        return subprocess.run(
            [sys.executable, "-c", "from feclip.apps.train import train_main; train_main()", *args],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env,
            timeout=timeout,
        )


def repo_python_path() -> str:
    """``PYTHONPATH`` with the repository first: a child process (a CLI, a notebook kernel) imports this
    checkout's ``feclip`` whether or not it is installed."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


def run_notebook(results: Path, timeout: int = 300):
    """``experiments/analysis.ipynb`` executed (nbclient, kernel ``python3``) on the results tree
    ``results``, from ``experiments/``, plots on Agg; returns the executed notebook (its cells hold the
    outputs). The kernel imports this checkout's ``feclip`` (:func:`repo_python_path`)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = REPO / "experiments" / "analysis.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    with pytest.MonkeyPatch.context() as env:  # the kernel inherits this process's environment
        env.setenv("FECLIP_RESULTS", str(results))
        env.setenv("MPLBACKEND", "Agg")
        env.setenv("PYTHONPATH", repo_python_path())
        nbclient.NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}}
        ).execute()
    return nb


def torchrun_train(args, nproc: int = 2, timeout: int = 180) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=NPROC feclip-train ARGS`` (offline, from the repository),
    output captured."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "--no-python",
            sys.executable,
            "-c",
            "from feclip.apps.train import train_main; train_main()",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=timeout,
    )

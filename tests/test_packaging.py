"""The package installs like one: a built wheel holds everything the commands read besides code (the
Hydra configs, the paper's numbers, the tiny CLIP's model config, the SLURM launcher plugin) and the
extras of the README. ``.ci/run`` installs that wheel into a separate environment and runs the demo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from conftest import REPO

#: Data files the commands need, as they must appear in the wheel.
REQUIRED = [
    "feclip/conf/train.yaml",
    "feclip/conf/eval.yaml",
    "feclip/conf/experiment/demo.yaml",
    "feclip/conf/experiment/taps.yaml",
    "feclip/conf/hydra/launcher/slurm.yaml",
    "feclip/conf/hydra/launcher/local_parallel.yaml",
    "feclip/report/paper/paper_numbers.csv",
    "feclip/report/paper/study_numbers.csv",
    "feclip/report/paper/module_ablation.csv",
    "feclip/models/configs/feclip-tiny.json",
    "feclip/py.typed",
    "hydra_plugins/feclip_launchers/slurm.py",
]


def _setuptools_builds_offline() -> bool:
    """Whether the installed setuptools can build the wheel without an isolated build environment (one
    that pip would fill from the package index): it must be new enough to have ``bdist_wheel`` itself."""
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source (the repository's own ``build/`` is left alone)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in ("feclip", "hydra_plugins"):
        shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(root / "dist"), str(src)]
    if _setuptools_builds_offline():
        cmd.insert(5, "--no-build-isolation")
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PIP_NO_INPUT": "1"}
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (built,) = (root / "dist").glob("feclip-*.whl")
    return built


def test_the_wheel_holds_the_configs_the_paper_numbers_and_the_model_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in REQUIRED if name not in names]
    assert not missing, f"not in the wheel: {missing}"
    # every file of the source package that is not code, and every experiment, is there
    source = {
        p.relative_to(REPO).as_posix()
        for folder in ("feclip", "hydra_plugins")
        for p in (REPO / folder).rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    }
    assert source - names == set(), f"package files left out of the wheel: {sorted(source - names)}"
    experiments = {p.stem for p in (REPO / "feclip" / "conf" / "experiment").glob("*.yaml")}
    in_wheel = {
        Path(n).stem for n in names if n.startswith("feclip/conf/experiment/") and n.endswith(".yaml")
    }
    assert experiments and in_wheel == experiments


def test_the_wheel_declares_the_commands_and_the_extras(wheel):
    with zipfile.ZipFile(wheel) as zf:
        info = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(zf.read(info).decode())
        entry_points = zf.read(info.replace("METADATA", "entry_points.txt")).decode()
    for command in (
        "feclip-train",
        "feclip-eval",
        "feclip-report",
        "feclip-data",
        "feclip-predict",
        "feclip-cache",
    ):
        assert f"{command} = " in entry_points
    assert {"slurm", "parallel", "wandb", "all", "dev"} <= set(metadata.get_all("Provides-Extra"))
    requires = metadata.get_all("Requires-Dist")
    assert any(r.startswith("hydra-submitit-launcher") and 'extra == "slurm"' in r for r in requires)
    assert any(r.startswith("hydra-joblib-launcher") and 'extra == "parallel"' in r for r in requires)
    assert any(r.startswith("wandb") and 'extra == "wandb"' in r for r in requires)


def test_packaged_paths_are_inside_the_package():
    """The commands find their data next to their code, never in the source tree around it."""
    import feclip
    from feclip.apps.train import CONF_DIR
    from feclip.report.references import DEFAULT_PAPER, STUDY_NUMBERS

    package = Path(feclip.__file__).resolve().parent
    for path in (Path(CONF_DIR), DEFAULT_PAPER, STUDY_NUMBERS):
        assert path.exists() and package in path.resolve().parents, path

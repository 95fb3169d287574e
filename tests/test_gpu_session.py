"""scripts/gpu_session.sh's preflight: the carried wheels and the machine's modules are checked in the
first second, and what is missing is listed (exit 2) before anything is installed or run."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_session.sh"
WHEELS = [
    "open_clip_torch-3.3.0-py3-none-any.whl",
    "ftfy-6.3.1-py3-none-any.whl",
    "wcwidth-0.7.0-py3-none-any.whl",
    "hydra_core-1.3.8-py3-none-any.whl",
    "omegaconf-2.3.1-py3-none-any.whl",
    "antlr4_python3_runtime-4.9.3-py3-none-any.whl",
]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def preflight(wheel_dir: Path, tmp_path: Path, **env):
    started = time.perf_counter()
    res = subprocess.run(
        ["bash", str(SCRIPT), "--preflight"],
        capture_output=True,
        text=True,
        env={**os.environ, "FECLIP_WHEELS": str(wheel_dir), "OUT": str(tmp_path / "out"), **env},
        timeout=60,
    )
    return res, time.perf_counter() - started


def fake_wheels(folder: Path, names) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"not a real wheel")
    return folder


def test_a_complete_wheel_folder_passes(tmp_path):
    res, seconds = preflight(fake_wheels(tmp_path / "whl", WHEELS), tmp_path)
    assert res.returncode == 0, res.stderr
    assert "preflight ok (6 wheels" in res.stdout
    assert seconds < 5  # in practice well under a second
    assert not (tmp_path / "out").exists()  # nothing made, installed or run


def test_missing_wheels_and_modules_are_listed_before_anything_runs(tmp_path):
    folder = fake_wheels(
        tmp_path / "whl",
        [w for w in WHEELS if not w.startswith(("antlr4", "hydra"))]
        + ["antlr4_python3_runtime-4.11.0-py3-none-any.whl"],
    )
    res, seconds = preflight(folder, tmp_path, FECLIP_REQUIRED_MODULES="torch not_a_module_xyz")
    assert res.returncode == 2
    err = res.stderr
    assert "preflight failed, nothing was run" in err
    assert "wheel hydra_core" in err and "wheel antlr4_python3_runtime-4.9.3" in err  # 4.11 is not 4.9.3
    assert "module not_a_module_xyz" in err and "module torch" not in err
    assert "wheel open_clip_torch" not in err and "docs/gpu_bench.md" in err
    assert seconds < 5 and not (tmp_path / "out").exists()


def test_no_wheel_folder_at_all_lists_every_wheel(tmp_path):
    res, _ = preflight(tmp_path / "nowhere", tmp_path)
    assert res.returncode == 2
    assert all(f"wheel {w.split('-')[0]}" in res.stderr for w in WHEELS)

"""``feclip-data``: synth, check (the ground-truth sanity check), download/info, and one-line usage errors."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feclip.apps.data import main
from feclip.data.check import check_dataset


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def mvtec_with_problems(tmp_path):
    """A tiny MVTec tree with one of each ground-truth problem ``check`` must report."""
    root = tmp_path / "mvtec"
    img = _png(np.full((16, 16, 3), 100, np.uint8))
    small = np.zeros((16, 16), np.uint8)
    small[2:5, 2:5] = 255
    big = np.full((16, 16), 255, np.uint8)  # an object mask, not a defect mask
    visa_like = small // 255  # values {0, 1}
    soft = np.linspace(0, 255, 256, dtype=np.uint8).reshape(16, 16)
    for i in range(2):
        _write(root / f"bottle/train/good/{i}.png", img)
        _write(root / f"bottle/test/good/{i}.png", img)
    files = {
        "bottle/test/crack/000.png": img,
        "bottle/ground_truth/crack/000_mask.png": _png(small),
        "bottle/test/crack/001.png": img,
        "bottle/ground_truth/crack/001_mask.png": _png(big),
        "bottle/test/crack/002.png": img,
        "bottle/ground_truth/crack/002_mask.png": _png(np.zeros((8, 8), np.uint8)),  # size mismatch + empty
        "bottle/test/crack/003.png": img,  # no mask
        "bottle/ground_truth/crack/009_mask.png": _png(small),  # mask without image
        "bottle/test/hole/000.png": img,
        "bottle/ground_truth/hole/000_mask.png": _png(visa_like),
        "bottle/test/hole/001.png": img,
        "bottle/ground_truth/hole/001_mask.png": _png(soft),
        "bottle/test/good/broken.png": b"\x89PNG\r\n\x1a\n truncated",
    }
    for rel, data in files.items():
        _write(root / rel, data)
    return root


def test_check_finds_each_problem(mvtec_with_problems, capsys):
    report = check_dataset("mvtec", mvtec_with_problems)
    errors, warnings = "\n".join(report.errors), "\n".join(report.warnings)
    assert "003.png has no mask" in errors
    assert "mask without image" in errors and "009_mask.png" in errors
    assert "size mismatch" in errors and "002_mask.png is 8x8" in errors
    assert "broken.png" in errors
    assert "covers 100%" in warnings and "001_mask.png" in warnings
    assert "empty mask" in warnings and "not binary" in warnings
    assert "official categories missing: cable" in warnings
    assert ("bottle", "test", 9, 3, 6, 5) in report.rows and ("bottle", "train", 2, 2, 0, 0) in report.rows
    assert main(["check", str(mvtec_with_problems), "--dataset", "mvtec"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "mask values bottle" in out and "{0,1}" in out


def test_synth_then_check_ok(tmp_path, capsys):
    code = main(["synth", str(tmp_path), "--n-train-good", "1", "--n-test-good", "1", "--n-test-bad", "4",
                 "--image-size", "40"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "set_a:" in out and "set_b:" in out
    assert main(["check", str(tmp_path / "set_b"), "--dataset", "synthetic"]) == 0
    out = capsys.readouterr().out
    assert "OK: no errors" in out and "{0,255}" in out


def test_check_medical_notes(tmp_path, capsys):
    img = _png(np.zeros((8, 8, 3), np.uint8))
    for rel in ("yes/y1.jpg", "no/n1.jpg", "pred/p1.jpg"):
        _write(tmp_path / rel, img)
    assert main(["check", str(tmp_path), "--dataset", "br35h"]) == 0
    out = capsys.readouterr().out
    assert "ignored unlabeled folder" in out and "pred" in out and "image level only" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["check", "{tmp}/missing", "--dataset", "mvtec"], "does not exist"),
        (["check", "{tmp}", "--dataset", "visa"], "split_csv/1cls.csv not found"),
        (["check", "{tmp}", "--dataset", "nope"], "invalid choice"),
        (["check", "{tmp}"], "--dataset"),
        (["download", "folder", "--root", "{tmp}"], "nothing to download"),
        (["synth", "{tmp}/s", "--n-test-bad", "0"], "n_test_bad"),
        (["check", "{tmp}", "--dataset", "mvtec", "--option", "oops"], "key=value"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_are_one_line_exit_2(tmp_path, capsys, argv, needle):
    try:
        code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("feclip-data: error: ") and err.count("\n") == 1 and needle in err
    assert "Traceback" not in err


def test_entry_point_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "feclip.apps.data", "check", str(tmp_path / "nope"), "--dataset", "visa"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("feclip-data: error: visa: dataset root") and "Traceback" not in proc.stderr


def test_download_manual_and_info(tmp_path, capsys):
    assert main(["download", "brainmri", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "kaggle datasets download -d navoneel/brain-mri-images-for-brain-tumor-detection" in out
    assert "layout:" in out and "brainmri" in out
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "mvtec" in out and "CC BY-NC-SA 4.0" in out and "kvasir" in out
    assert main(["info", "visa"]) == 0
    assert "2eb8690c" in capsys.readouterr().out

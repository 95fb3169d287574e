"""feclip-predict: outputs at the input's size, bad files reported by name, mismatched checkpoints refused."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from feclip.data.transforms import normalize, resize_rgb
from feclip.models import FEClip, FEClipConfig, load_clip, save_adapters
from feclip.predict import find_inputs, main


def write_rgb(path, h, w, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def tiny_model(**config):
    torch.manual_seed(0)  # feclip-predict draws random tiny weights with the same seed
    clip = load_clip("feclip-tiny")
    model = FEClip(clip, FEClipConfig(**config))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_model(taps=(18, 23), lam=0.2, lfs_stat="abs")
    path = save_adapters(model, tmp_path_factory.mktemp("ckpt") / "adapters.safetensors")
    return path, model


@pytest.fixture()
def good_folder(tmp_path):
    folder = tmp_path / "imgs"
    write_rgb(folder / "wide.png", 50, 70, seed=1)
    write_rgb(folder / "sub" / "square.jpg", 64, 64, seed=2)
    return folder


def read_scores(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_outputs_have_the_input_size_and_one_row_per_image(checkpoint, good_folder, tmp_path, capsys):
    ckpt, _ = checkpoint
    out = tmp_path / "out"
    rc = main(
        [
            "--checkpoint",
            str(ckpt),
            "--out",
            str(out),
            "--threshold",
            "0.5",
            "--batch-size",
            "1",
            str(good_folder),
        ]
    )
    assert rc == 0
    overlay = np.asarray(Image.open(out / "wide_overlay.png"))
    assert overlay.shape == (50, 70, 3) and overlay.std() > 0
    assert np.asarray(Image.open(out / "sub" / "square_overlay.png")).shape == (64, 64, 3)
    mask = np.asarray(Image.open(out / "wide_mask.png"))
    assert mask.shape == (50, 70) and set(np.unique(mask)) <= {0, 255}
    rows = read_scores(out / "scores.csv")
    assert sorted(r["path"] for r in rows) == sorted(
        [str(good_folder / "wide.png"), str(good_folder / "sub" / "square.jpg")]
    )
    assert all(0.0 < float(r["score"]) < 1.0 for r in rows)
    printed = capsys.readouterr().out
    assert "FE-CLIP adapters" in printed and rows[0]["score"] in printed
    assert json.loads((out / "predict.json").read_text())["config"]["taps"] == [18, 23]
    assert not list(out.glob(".*tmp"))


def test_scores_equal_the_model_rebuilt_from_the_checkpoint(checkpoint, tmp_path):
    ckpt, model = checkpoint
    rgb = write_rgb(tmp_path / "one.png", 84, 84, seed=3)
    assert (
        main(
            [
                "--checkpoint",
                str(ckpt),
                "--out",
                str(tmp_path / "out"),
                "--sigma",
                "0",
                str(tmp_path / "one.png"),
            ]
        )
        == 0
    )
    with torch.inference_mode():
        expected = model(normalize(resize_rgb(rgb, 84))[None]).image_score.item()
    (row,) = read_scores(tmp_path / "out" / "scores.csv")
    assert float(row["score"]) == pytest.approx(expected, abs=2e-6)


def test_bad_files_are_reported_by_name_and_the_rest_processed(checkpoint, good_folder, tmp_path, capsys):
    ckpt, _ = checkpoint
    (good_folder / "notes.txt").write_text("not an image")
    data = (good_folder / "wide.png").read_bytes()
    (good_folder / "broken.png").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    rc = main(["--checkpoint", str(ckpt), "--out", str(out), str(good_folder)])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert any("notes.txt" in line for line in err) and any("broken.png" in line for line in err)
    assert all(line.startswith("feclip-predict: skipped") for line in err)
    assert len(read_scores(out / "scores.csv")) == 2
    assert (out / "wide_overlay.png").is_file() and not (out / "broken_overlay.png").exists()


def test_without_checkpoint_the_bare_clip_baseline_runs(good_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--backbone", "feclip-tiny", "--out", str(out), str(good_folder / "wide.png")]) == 0
    printed = capsys.readouterr().out
    assert "bare CLIP zero-shot baseline" in printed and "random CLIP weights" in printed
    record = json.loads((out / "predict.json").read_text())
    assert record["config"]["lam"] == 0.0 and record["config"]["taps"] == [23]
    assert record["config"]["fc_patch_init"] == "clip_proj"


def test_a_checkpoint_for_another_backbone_is_refused(checkpoint, good_folder, tmp_path, capsys):
    ckpt, _ = checkpoint
    rc = main(
        ["--checkpoint", str(ckpt), "--backbone", "ViT-B-32", "--out", str(tmp_path / "o"), str(good_folder)]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("feclip-predict: error:")
    assert "feclip-tiny" in err and "ViT-B-32" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_for_another_tap_set_is_refused(checkpoint, good_folder, tmp_path, capsys):
    _, model = checkpoint
    claimed = json.dumps(dataclasses.asdict(FEClipConfig(taps=(23,))))  # metadata disagrees with tensors
    bad = save_adapters(model, tmp_path / "bad.safetensors", metadata={"config": claimed})
    rc = main(["--checkpoint", str(bad), "--out", str(tmp_path / "o"), str(good_folder)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tap set" in err and "Traceback" not in err


def test_user_errors_exit_2_with_one_line(good_folder, tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "missing.safetensors"), str(good_folder)]) == 2
    assert (
        capsys.readouterr().err
        == f"feclip-predict: error: adapter file not found: {tmp_path}/missing.safetensors\n"
    )
    (tmp_path / "empty").mkdir()
    assert main(["--backbone", "feclip-tiny", str(tmp_path / "empty")]) == 2
    assert "no image files" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--batch-size", "x", str(good_folder)])
    assert exc.value.code == 2


def test_output_names_are_unique_and_skip_the_output_folder(tmp_path):
    write_rgb(tmp_path / "a.png", 8, 8, 0)
    write_rgb(tmp_path / "a.jpg", 8, 8, 0)
    write_rgb(tmp_path / "out" / "old_overlay.png", 8, 8, 0)
    (tmp_path / ".hidden.png").write_bytes(b"")
    items, problems = find_inputs(
        [tmp_path, tmp_path / "a.png", tmp_path / "nothere.png"], exclude=tmp_path / "out"
    )
    assert [(i.path.name, i.name) for i in items] == [("a.jpg", "a"), ("a.png", "a_png"), ("a.png", "a_2")]
    assert problems == [f"{tmp_path / 'nothere.png'}: no such file or folder"]

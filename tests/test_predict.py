"""feclip-predict: the trained model rebuilt exactly (or refused), outputs at a bounded size, bad input
reported on one line, nothing in --out lost."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_feclip, randomize_adapters
from PIL import Image
from safetensors.torch import save_file

import feclip.apps.predict as app
import feclip.scoring
from feclip.apps.predict import main
from feclip.data.transforms import load_rgb, normalize, resize_rgb
from feclip.models import FEClip, FEClipConfig, load_clip, save_adapters
from feclip.predict import decode, find_inputs, output_size
from feclip.scoring import ScoringConfig, image_scores

SEED = 7  # the backbone seed of the test checkpoint: not feclip-predict's baseline seed 0


def write_rgb(path, h, w, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def tiny_model(seed=SEED, pretrained=None, **config):
    """A tiny FE-CLIP on a backbone drawn with ``seed`` (or loaded from ``pretrained``), with adapters
    moved away from their initialisation so that they change the scores."""
    model = make_tiny_feclip(load_clip("feclip-tiny", pretrained, seed=seed), seed=None, **config)
    return randomize_adapters(model, seed=11, scale=0.2).eval()


def python_score(model, path):
    """The image score of ``model`` in Python, preprocessed as in evaluation."""
    with torch.inference_mode():
        x = normalize(resize_rgb(load_rgb(path), model.image_size))[None]
        return image_scores(model(x).tap_cls_logits, model.config.taps, ScoringConfig()).item()


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


def one_error_line(capsys, *words):
    """stderr holds exactly one line, ``feclip-predict: error: ...``, containing ``words``."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("feclip-predict: error:"), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    return err


@pytest.fixture()
def no_model(monkeypatch):
    """Fails the test if a model gets built (for errors that must be found before)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the error was found")

    monkeypatch.setattr(app, "build_model", refuse)


# -- the model: exactly the one trained, or refused ----------------------------------------------------


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
    # the raw maps at each image's own size, the overlay figures larger (header, colour bar)
    assert np.load(out / "wide_map.npy").shape == (50, 70)
    assert np.load(out / "sub" / "square_map.npy").shape == (64, 64)
    overlay = np.asarray(Image.open(out / "wide_overlay.png"))
    assert overlay.shape[0] > 50 and overlay.shape[1] > 70 and overlay.std() > 0
    mask = np.asarray(Image.open(out / "wide_mask.png"))
    assert mask.shape == (50, 70) and set(np.unique(mask)) <= {0, 255}
    rows = read_scores(out / "scores.csv")
    assert sorted(r["path"] for r in rows) == sorted(
        [str(good_folder / "wide.png"), str(good_folder / "sub" / "square.jpg")]
    )
    assert all(0.0 < float(r["score"]) < 1.0 for r in rows)
    printed = capsys.readouterr().out
    assert f"FE-CLIP adapters {ckpt} (backbone feclip-tiny:random(seed={SEED})" in printed
    assert rows[0]["score"] in printed
    record = json.loads((out / "predict.json").read_text())
    assert record["config"]["taps"] == [18, 23]
    assert record["backbone"] == f"feclip-tiny:random(seed={SEED})" and record["weights_file"] is None
    assert len(record["checkpoint_sha256"]) == 64
    assert [i["size"] for i in record["images"]] == [i["output_size"] for i in record["images"]]
    assert record["n_downscaled"] == 0 and record["options"]["max_side"] == 2048
    assert not list(out.rglob(".*tmp"))


def test_the_raw_map_is_the_one_drawn_with_its_colour_bar_and_score(checkpoint, tmp_path, monkeypatch):
    import feclip.viz as viz
    from feclip.predict import score_batch

    ckpt, model = checkpoint
    rgb = write_rgb(tmp_path / "in" / "wide.png", 45, 77, seed=4)
    figures = []
    make_figure = viz.overlay_figure

    def recording(*args, **kwargs):
        figures.append(make_figure(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(viz, "overlay_figure", recording)
    out = tmp_path / "out"
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--alpha", "0.6", str(tmp_path / "in")]) == 0
    saved = np.load(out / "wide_map.npy")
    assert saved.dtype == np.float32 and saved.shape == (45, 77)  # the original size
    # the map made independently: the model's S x S map (sigma 4), bilinear to the original size
    x = normalize(resize_rgb(load_rgb(tmp_path / "in" / "wide.png"), model.image_size))[None]
    scores, maps = score_batch(model, x, 4.0)
    expected = feclip.scoring.upsample(maps, (45, 77))[0].numpy()
    np.testing.assert_allclose(saved, expected, rtol=0, atol=1e-6)
    # the overlay figure draws exactly these values: its pixels below the header are overlay(image, map)
    (figure,) = figures
    picture = np.asarray(Image.open(out / "wide_overlay.png").convert("RGB"))
    top = picture.shape[0] - max(45, 200)  # the header above the overlay (viz.overlay_figure's layout)
    assert np.array_equal(picture[top : top + 45, :77], viz.overlay(rgb, saved, alpha=0.6))
    (colorbar,) = [ax for ax in figure.axes if ax.get_label() == "<colorbar>"]
    assert colorbar.get_ylim() == pytest.approx((float(saved.min()), float(saved.max())))
    (score,) = json.loads((out / "predict.json").read_text())["images"]
    assert score["score"] == pytest.approx(float(scores[0]))
    assert any(f"image score {score['score']:.4f}" in t.get_text() for t in figure.texts)


def test_scores_equal_the_trained_model_on_its_own_backbone_seed(checkpoint, tmp_path):
    ckpt, model = checkpoint
    write_rgb(tmp_path / "one.png", 84, 84, seed=3)
    out = tmp_path / "out"
    assert (
        main(["--checkpoint", str(ckpt), "--out", str(out), "--sigma", "0", str(tmp_path / "one.png")]) == 0
    )
    expected = python_score(model, tmp_path / "one.png")
    (image,) = json.loads((out / "predict.json").read_text())["images"]
    assert image["score"] == expected  # exactly: the same backbone, adapters and pixels
    (row,) = read_scores(out / "scores.csv")
    assert row["score"] == f"{expected:.6f}"
    # the same adapters on a backbone drawn with another seed (what feclip-predict used to build) differ
    other = FEClip(load_clip("feclip-tiny", seed=0), model.config).eval()
    other.load_state_dict(model.trainable_state_dict(), strict=False)
    assert abs(python_score(other, tmp_path / "one.png") - expected) > 1e-4


def test_a_random_backbone_without_a_recorded_seed_is_refused(checkpoint, good_folder, tmp_path, capsys):
    _, model = checkpoint
    legacy = save_adapters(model, tmp_path / "legacy.safetensors", metadata={"backbone_weights": ""})
    out = tmp_path / "o"
    assert main(["--checkpoint", str(legacy), "--out", str(out), str(good_folder)]) == 2
    one_error_line(capsys, "legacy.safetensors", "does not record its seed")
    unseeded = save_adapters(
        model,
        tmp_path / "unseeded.safetensors",
        metadata={"backbone_weights": "feclip-tiny:random(seed=None)"},
    )
    assert main(["--checkpoint", str(unseeded), "--out", str(out), str(good_folder)]) == 2
    one_error_line(capsys, "unseeded.safetensors", "without a seed")
    assert not out.exists()


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory):
    """Two tiny CLIP weights files (different draws) and an adapter file trained on the first."""
    folder = tmp_path_factory.mktemp("weights")
    files = []
    for seed in (3, 4):
        clip = load_clip("feclip-tiny", seed=seed)
        files.append(folder / f"w{seed}.safetensors")
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, files[-1])
    model = tiny_model(pretrained=str(files[0]), taps=(23,))
    return files, save_adapters(model, folder / "adapters.safetensors"), model


def test_loaded_weights_are_checked_against_the_recorded_hash(weights_files, checkpoint, tmp_path, capsys):
    (right, wrong), ckpt, model = weights_files
    write_rgb(tmp_path / "one.png", 40, 30, seed=4)
    image = str(tmp_path / "one.png")
    out = tmp_path / "out"
    assert main(["--checkpoint", str(ckpt), "--pretrained", str(right), "--out", str(out), image]) == 0
    record = json.loads((out / "predict.json").read_text())
    assert record["backbone"].startswith("feclip-tiny:file:w3.safetensors@sha256=")
    assert record["weights_file"] == str(right)
    assert record["images"][0]["score"] == python_score(model, image)
    assert record["backbone"] in capsys.readouterr().out
    # another weights file, random weights, no weights file at all: refused before anything is written
    assert (
        main(["--checkpoint", str(ckpt), "--pretrained", str(wrong), "--out", str(tmp_path / "o"), image])
        == 2
    )
    one_error_line(capsys, "another weights file", "w4.safetensors")
    assert main(["--checkpoint", str(ckpt), "--pretrained", "none", "--out", str(tmp_path / "o"), image]) == 2
    one_error_line(capsys, "random(seed=None)")
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), image]) == 2
    one_error_line(capsys, "w3.safetensors", "--pretrained")
    # and a checkpoint trained on random weights does not run on loaded ones
    random_ckpt, _ = checkpoint
    assert (
        main(
            [
                "--checkpoint",
                str(random_ckpt),
                "--pretrained",
                str(right),
                "--out",
                str(tmp_path / "o"),
                image,
            ]
        )
        == 2
    )
    one_error_line(capsys, f"random(seed={SEED})")
    assert not (tmp_path / "o").exists()


def test_without_checkpoint_the_bare_clip_baseline_runs(good_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--backbone", "feclip-tiny", "--out", str(out), str(good_folder / "wide.png")]) == 0
    printed = capsys.readouterr().out
    assert "bare CLIP zero-shot baseline (backbone feclip-tiny:random(seed=0)" in printed
    assert "random CLIP weights" in printed
    record = json.loads((out / "predict.json").read_text())
    assert record["config"]["lam"] == 0.0 and record["config"]["taps"] == [23]
    assert record["config"]["fc_patch_init"] == "clip_proj"
    assert record["backbone"] == "feclip-tiny:random(seed=0)" and record["checkpoint"] is None


def test_a_checkpoint_for_another_backbone_is_refused(checkpoint, good_folder, tmp_path, capsys):
    ckpt, _ = checkpoint
    rc = main(
        ["--checkpoint", str(ckpt), "--backbone", "ViT-B-32", "--out", str(tmp_path / "o"), str(good_folder)]
    )
    assert rc == 2
    one_error_line(capsys, "feclip-tiny", "ViT-B-32")
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_for_another_tap_set_is_refused(checkpoint, good_folder, tmp_path, capsys):
    _, model = checkpoint
    claimed = json.dumps(dataclasses.asdict(FEClipConfig(taps=(23,))))  # metadata disagrees with tensors
    bad = save_adapters(model, tmp_path / "bad.safetensors", metadata={"config": claimed})
    assert main(["--checkpoint", str(bad), "--out", str(tmp_path / "o"), str(good_folder)]) == 2
    one_error_line(capsys, "tap set")


def test_unusable_adapter_files_are_refused_on_one_line(checkpoint, good_folder, tmp_path, capsys):
    ckpt, model = checkpoint
    out = str(tmp_path / "o")
    # NaN weights
    tensors = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as f:
        meta = f.metadata()
    save_file(tensors, tmp_path / "nan.safetensors", metadata=meta)
    assert main(["--checkpoint", str(tmp_path / "nan.safetensors"), "--out", out, str(good_folder)]) == 2
    one_error_line(capsys, "nan.safetensors", "non-finite", name)
    # a folder (with the hint of the file inside), a file that is not safetensors, a broken config
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "adapters.safetensors").write_bytes(ckpt.read_bytes())
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", out, str(good_folder)]) == 2
    one_error_line(capsys, "is a folder", "did you mean")
    (tmp_path / "notes.safetensors").write_text("hello")
    assert main(["--checkpoint", str(tmp_path / "notes.safetensors"), "--out", out, str(good_folder)]) == 2
    one_error_line(capsys, "notes.safetensors", "not a safetensors adapter file")
    broken = save_adapters(model, tmp_path / "broken.safetensors", metadata={"config": '{"taps": "abc"}'})
    assert main(["--checkpoint", str(broken), "--out", out, str(good_folder)]) == 2
    one_error_line(capsys, "broken.safetensors", "invalid model config")
    assert not (tmp_path / "o").exists()


# -- inputs --------------------------------------------------------------------------------------------


def test_bad_files_are_reported_by_name_and_the_rest_processed(checkpoint, good_folder, tmp_path, capsys):
    ckpt, _ = checkpoint
    (good_folder / "notes.txt").write_text("not an image")
    data = (good_folder / "wide.png").read_bytes()
    (good_folder / "broken.png").write_bytes(data[: len(data) // 2])
    (good_folder / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    rc = main(["--checkpoint", str(ckpt), "--out", str(out), str(good_folder)])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3
    for name in ("notes.txt", "broken.png", "empty.jpg"):
        assert sum(name in line for line in err) == 1
    assert all(line.startswith("feclip-predict: skipped") for line in err)
    assert len(read_scores(out / "scores.csv")) == 2
    assert (out / "wide_overlay.png").is_file() and not (out / "broken_overlay.png").exists()
    assert len(json.loads((out / "predict.json").read_text())["failed"]) == 3


def test_nothing_to_process_is_one_error_line(tmp_path, capsys, no_model):
    (tmp_path / "empty").mkdir()
    assert main(["--backbone", "feclip-tiny", "--out", str(tmp_path / "o"), str(tmp_path / "empty")]) == 2
    one_error_line(capsys, "no image files")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    (tmp_path / "docs" / "b.csv").write_text("x")
    assert main(["--backbone", "feclip-tiny", "--out", str(tmp_path / "o"), str(tmp_path / "docs")]) == 2
    one_error_line(capsys, "no image to process", "a.txt", "1 more")
    assert (
        main(["--backbone", "feclip-tiny", "--out", str(tmp_path / "o"), str(tmp_path / "nothere.png")]) == 2
    )
    one_error_line(capsys, "no such file")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "option",
    [
        ["--threshold", "-0.1"],
        ["--threshold", "nan"],
        ["--threshold", "1.5"],
        ["--sigma", "nan"],
        ["--sigma", "-1"],
        ["--alpha", "inf"],
        ["--vmin", "0.6", "--vmax", "0.4"],
        ["--vmax", "nan"],
        ["--max-side", "-1"],
        ["--batch-size", "0"],
    ],
)
def test_bad_option_values_are_one_error_line(option, good_folder, tmp_path, capsys, no_model):
    assert main([*option, "--out", str(tmp_path / "o"), str(good_folder)]) == 2
    one_error_line(capsys, option[-2])
    assert not (tmp_path / "o").exists()


def test_unparsable_options_exit_2(good_folder):
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


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "1", "I;16", "CMYK"])
def test_decoding_gives_the_pixels_evaluation_uses(mode, tmp_path):
    rgb = np.random.default_rng(5).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray((rgb[:, :, 0].astype(np.uint16) * 200).astype(np.uint16))
    elif mode != "RGB":
        img = img.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png")
    img.save(path)
    decoded = decode(path, 24, max_side=20)
    assert np.array_equal(decoded.model_input, resize_rgb(load_rgb(path), 24))
    assert decoded.size == (37, 53) and decoded.shown.shape == (14, 20, 3)
    assert np.array_equal(decode(path, 24, max_side=0).shown, load_rgb(path))


# -- large images: outputs at a bounded size, nothing full-size in floating point ----------------------


def test_output_size_caps_the_longer_side():
    assert output_size(2000, 3000, 1024) == (683, 1024)
    assert output_size(3000, 2000, 1024) == (1024, 683)
    assert output_size(500, 700, 1024) == (500, 700)
    assert output_size(5000, 5000, 0) == (5000, 5000)
    assert output_size(1, 100000, 2048) == (1, 2048)


def test_a_large_image_gets_capped_outputs_and_no_full_size_map(checkpoint, tmp_path, monkeypatch):
    ckpt, model = checkpoint
    y, x = np.mgrid[0:2000, 0:3000]
    rgb = np.stack([x % 256, y % 256, (x // 12) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "big.png")
    asked = []
    upsample = feclip.scoring.upsample

    def recording(maps, size):
        asked.append((size, size) if isinstance(size, int) else tuple(size))
        return upsample(maps, size)

    monkeypatch.setattr(feclip.scoring, "upsample", recording)
    out = tmp_path / "out"
    args = ["--checkpoint", str(ckpt), "--max-side", "1024", "--threshold", "0.5", "--out", str(out)]
    assert main([*args, str(tmp_path / "big.png")]) == 0
    assert np.load(out / "big_map.npy").shape == (683, 1024)
    height, width = np.asarray(Image.open(out / "big_overlay.png")).shape[:2]
    assert height >= 683 and width >= 1024  # the overlay at 683 x 1024 plus its header and colour bar
    assert np.asarray(Image.open(out / "big_mask.png")).shape == (683, 1024)
    assert asked and max(max(size) for size in asked) <= 1024  # the map is never made at 3000 x 2000
    record = json.loads((out / "predict.json").read_text())
    (image,) = record["images"]
    assert image["size"] == [2000, 3000] and image["output_size"] == [683, 1024]
    assert record["n_downscaled"] == 1 and record["options"]["max_side"] == 1024
    assert image["score"] == python_score(model, tmp_path / "big.png")  # scored from the full image


# -- --out: refused early, nothing in it lost ----------------------------------------------------------


def test_an_unusable_out_is_refused_before_the_model_is_built(good_folder, tmp_path, capsys, no_model):
    a_file = tmp_path / "results.txt"
    a_file.write_text("precious")
    assert main(["--out", str(a_file), str(good_folder)]) == 2
    one_error_line(capsys, "results.txt", "not a folder")
    assert main(["--out", str(a_file / "sub"), str(good_folder)]) == 2
    one_error_line(capsys, "is a file")
    assert a_file.read_text() == "precious"
    # an output that would land on an input file
    write_rgb(tmp_path / "o" / "x_overlay.png", 8, 8, 0)
    write_rgb(tmp_path / "x.png", 8, 8, 1)
    before = (tmp_path / "o" / "x_overlay.png").read_bytes()
    args = ["--out", str(tmp_path / "o"), str(tmp_path / "o" / "x_overlay.png"), str(tmp_path / "x.png")]
    assert main(args) == 2
    one_error_line(capsys, "would overwrite the input", "x_overlay.png")
    assert (tmp_path / "o" / "x_overlay.png").read_bytes() == before


def test_existing_outputs_survive_and_are_replaced_only_by_complete_ones(
    checkpoint, good_folder, tmp_path, capsys, monkeypatch
):
    ckpt, _ = checkpoint
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "scores.csv").write_text("path,score\nold.png,0.5\n")
    # Ctrl-C during the run: exit 130, one line, the previous scores.csv untouched
    monkeypatch.setattr(app, "score_batch", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["--checkpoint", str(ckpt), "--out", str(out), str(good_folder)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("feclip-predict: interrupted after 0 of 2 image(s)")
    assert (out / "scores.csv").read_text() == "path,score\nold.png,0.5\n"
    monkeypatch.undo()
    # an output that cannot be written (a folder in its place): one line, exit 2
    (out / "wide_overlay.png").mkdir()
    assert main(["--checkpoint", str(ckpt), "--out", str(out), str(good_folder)]) == 2
    one_error_line(capsys, "cannot write", "wide_overlay.png")
    (out / "wide_overlay.png").rmdir()
    assert main(["--checkpoint", str(ckpt), "--out", str(out), str(good_folder)]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert len(read_scores(out / "scores.csv")) == 2
    assert not list(out.rglob(".*tmp"))

"""The earlier study's settings as a preset, and the centre-crop transform it needs."""

import numpy as np
import pytest
from conftest import compose_run
from PIL import Image
from torchvision.transforms import CenterCrop, InterpolationMode, Resize

from feclip.data.transforms import center_crop, resize_mask, resize_rgb, short_side_size
from feclip.errors import ConfigError


def _reference(array: np.ndarray, size: int, interpolation) -> np.ndarray:
    """torchvision's Resize(int) + CenterCrop on the PIL image: what the study's pipeline ran."""
    out = CenterCrop(size)(Resize(size, interpolation=interpolation)(Image.fromarray(array)))
    return np.asarray(out)


@pytest.mark.parametrize("shape", [(40, 60), (61, 37), (30, 30), (90, 91)])
def test_center_crop_matches_torchvision_on_non_square_images(shape):
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    out = resize_rgb(image, 24, mode="center_crop")
    assert out.shape == (24, 24, 3)
    assert np.array_equal(out, _reference(image, 24, InterpolationMode.BICUBIC))
    mask = rng.random(shape) > 0.7
    ref = _reference(mask.astype(np.uint8) * 255, 24, InterpolationMode.NEAREST) > 127
    assert np.array_equal(resize_mask(mask, 24, "nearest", mode="center_crop"), ref)
    ref = _reference(mask.astype(np.uint8) * 255, 24, InterpolationMode.BILINEAR) > 127
    assert np.array_equal(resize_mask(mask, 24, "bilinear", mode="center_crop"), ref)


def test_center_crop_by_hand():
    assert short_side_size((40, 60), 20) == (20, 30) and short_side_size((61, 37), 24) == (39, 24)
    grid = np.arange(5 * 8).reshape(5, 8)
    assert np.array_equal(center_crop(grid, 4), grid[0:4, 2:6])  # offsets round((5-4)/2)=0, (8-4)/2=2
    # a defect on the right border of a wide image is cut away by the crop, kept by the square resize
    mask = np.zeros((20, 40), bool)
    mask[5:15, 36:40] = True
    assert not resize_mask(mask, 10, "nearest", mode="center_crop").any()
    assert resize_mask(mask, 10, "nearest", mode="square").any()


def test_images_and_masks_stay_aligned_through_the_dataset(tmp_path):
    from feclip.data import AnomalyDataset
    from feclip.data.sample import Sample

    image = np.zeros((48, 80, 3), np.uint8)
    image[20:30, 35:45] = 255  # a white square at the centre of a wide image
    mask = np.zeros((48, 80), np.uint8)
    mask[20:30, 35:45] = 255
    Image.fromarray(image).save(tmp_path / "x.png")
    Image.fromarray(mask).save(tmp_path / "x_mask.png")
    sample = Sample(tmp_path / "x.png", tmp_path / "x_mask.png", 1, "c", "bad")
    item = AnomalyDataset([sample], image_size=24, resize="center_crop", mask_resize="nearest")[0]
    bright = (item["image"] > 0.5).all(0).numpy()  # the square, as the bicubic resize left it
    mask = item["mask"].bool().numpy()
    overlap = (bright & mask).sum() / (bright | mask).sum()
    assert overlap > 0.7 and mask.sum() > 0  # (edges differ by a resampling pixel, bicubic vs nearest)
    centre = [np.mean(np.nonzero(a)[k]) for a in (bright, mask) for k in (0, 1)]
    assert abs(centre[0] - centre[2]) <= 1 and abs(centre[1] - centre[3]) <= 1
    with pytest.raises(ConfigError, match="resize must be one of"):
        AnomalyDataset([sample], image_size=24, resize="crop")


def test_the_study_preset_holds_the_studys_settings_and_the_paper_stays_the_default():
    study = compose_run(["preset=study"])
    assert (study.data.resize, study.data.mask_resize, study.eval.sigma) == ("center_crop", "nearest", 0.0)
    assert (study.train.loss.focal_alpha, study.train.loss.dice_smooth) == (0.25, 1e-6)
    assert study.train.fc_patch.policy == "lr_div_100"
    bench = compose_run(["+experiment=benchmark_taps"])
    assert (
        bench.data.resize == "center_crop"
        and bench.eval.sigma == 0.0
        and bench.train.loss.focal_alpha == 0.25
    )
    paper = compose_run([])
    assert (paper.data.resize, paper.data.mask_resize, paper.eval.sigma) == ("square", "bilinear", 4.0)
    assert (paper.train.loss.focal_alpha, paper.train.loss.dice_smooth) == (None, 1.0)
    assert (
        compose_run(["+experiment=taps"]).data.resize == "square"
    )  # the other studies keep the paper preset
    assert compose_run(["preset=paper"]) == paper


def test_center_crop_with_original_resolution_is_refused():
    cfg = compose_run(["backbone=tiny", "preset=study", "eval.resolution=original"])
    with pytest.raises(ConfigError, match="center_crop needs eval.resolution=input"):
        cfg.validate()


def test_the_resize_mode_changes_the_run_identity():
    from feclip.engine.identity import make_identity

    a, b = compose_run([]), compose_run(["data.resize=center_crop"])
    assert make_identity(a, "x", "trained", {})["hash"] != make_identity(b, "x", "trained", {})["hash"]

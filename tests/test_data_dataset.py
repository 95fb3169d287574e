"""AnomalyDataset and transforms: colour modes, resizing, CLIP normalisation, masks, caching, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from feclip.data import CLIP_MEAN, CLIP_STD, AnomalyDataset, Sample
from feclip.data.transforms import load_mask, load_rgb, normalize, resize_mask
from feclip.errors import ConfigError, DatasetError

S = 16


def save(path: Path, arr: np.ndarray, mode: str | None = None, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr)
    if mode is not None:
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def sample(image: Path, mask: Path | None = None, label: int | None = None, category: str = "c") -> Sample:
    label = int(mask is not None) if label is None else label
    return Sample(image, mask, label, category, "bad" if label else "good")


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    out = {}
    out["rgb"] = save(tmp_path / "rgb.png", rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))  # non-square
    out["gray"] = save(tmp_path / "gray.png", rng.integers(0, 256, (10, 10), dtype=np.uint8))
    rgba = rng.integers(0, 256, (10, 10, 4), dtype=np.uint8)
    out["rgba"] = save(tmp_path / "rgba.png", rgba)
    out["bmp"] = save(tmp_path / "img.bmp", rng.integers(0, 256, (9, 7, 3), dtype=np.uint8), fmt="BMP")
    out["gray16"] = save(tmp_path / "g16.png", (np.arange(100, dtype=np.uint16).reshape(10, 10) * 600))
    mask = np.zeros((12, 20), np.uint8)
    mask[2:6, 3:9] = 1  # VisA-style values: 0/1/255
    mask[8:10, 14:18] = 255
    out["visa_mask"] = save(tmp_path / "visa_mask.png", mask)
    out["small_mask"] = save(tmp_path / "small_mask.png", np.zeros((5, 5), np.uint8))
    return out


def test_color_modes_to_rgb(files):
    for key in ("rgb", "gray", "rgba", "bmp", "gray16"):
        arr = load_rgb(files[key])
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3, key
    gray = load_rgb(files["gray"])
    assert np.array_equal(gray[..., 0], gray[..., 2])
    g16 = load_rgb(files["gray16"])
    assert g16.max() > 200 and g16.min() == 0  # 16-bit scaled to 8 bits, not clipped
    rgba = np.asarray(Image.open(files["rgba"]))
    assert np.array_equal(load_rgb(files["rgba"]), rgba[..., :3])  # alpha dropped


def test_items_shapes_and_normalisation(files, tmp_path):
    const = save(tmp_path / "const.png", np.full((7, 9, 3), (255, 0, 128), np.uint8))
    samples = [sample(files[k]) for k in ("rgb", "gray", "rgba", "bmp")] + [sample(const)]
    ds = AnomalyDataset(samples, image_size=S)
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (S, S) and item["mask"].dtype == torch.float32
        assert item["mask"].sum() == 0 and item["label"] == 0 and item["has_mask"] is True
        assert item["path"] == str(samples[i].image_path) and item["category"] == "c"
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(ds[4]["image"][:, 3, 3], expected, atol=1e-5)
    assert ds[0]["original_size"].tolist() == [12, 20]
    custom = AnomalyDataset([sample(const)], image_size=S, mean=(0, 0, 0), std=(1, 1, 1))
    assert torch.allclose(custom[0]["image"][:, 0, 0], torch.tensor([1.0, 0.0, 128 / 255]), atol=1e-6)


def test_visa_mask_binarised_then_resized(files):
    full = load_mask(files["visa_mask"])
    assert full.dtype == bool and full.sum() == 4 * 6 + 2 * 4  # the 1-valued pixels count too
    ds = AnomalyDataset([sample(files["rgb"], files["visa_mask"])], image_size=S)
    item = ds[0]
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(item["mask"], torch.from_numpy(resize_mask(full, S).astype(np.float32)))
    orig = ds.original_mask(0)
    assert orig.shape == (12, 20) and orig.dtype == np.uint8 and set(np.unique(orig)) == {0, 1}
    assert ds.original_image(0).shape == (12, 20, 3)
    assert (
        AnomalyDataset([sample(files["rgb"], files["visa_mask"])], S, mask_threshold=1)[0]["mask"].sum()
        < item["mask"].sum()
    )


def test_image_level_dataset_has_no_masks(files):
    ds = AnomalyDataset(
        [
            sample(files["rgb"], None, label=1, category="brain"),
            sample(files["gray"], None, label=0, category="brain"),
        ],
        image_size=S,
    )
    assert ds.has_masks is False and ds.category_has_masks == {"brain": False}
    for i in range(2):
        assert ds[i]["has_mask"] is False and ds[i]["mask"].sum() == 0
    assert ds.original_mask(0).shape == (12, 20)
    pixel = AnomalyDataset([sample(files["rgb"], files["visa_mask"])], image_size=S)
    assert pixel.has_masks is True


def test_mixed_masks_in_one_category_is_an_error(files):
    with pytest.raises(DatasetError, match="mixes anomalous images with masks"):
        AnomalyDataset([sample(files["rgb"], files["visa_mask"]), sample(files["gray"], None, label=1)], S)


def test_bad_inputs(files, tmp_path):
    with pytest.raises(DatasetError, match="no samples"):
        AnomalyDataset([], S)
    with pytest.raises(ConfigError):
        AnomalyDataset([sample(files["rgb"])], image_size=0)
    truncated = tmp_path / "trunc.png"
    data = files["rgb"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image")
    for path in (truncated, garbage, tmp_path / "missing.png"):
        ds = AnomalyDataset([sample(path)], S)
        with pytest.raises(DatasetError, match=str(path)):
            ds[0]
        with pytest.raises(DatasetError, match=str(path)):
            ds.preload(num_threads=2)
    mismatch = AnomalyDataset([sample(files["rgb"], files["small_mask"])], S)
    with pytest.raises(DatasetError, match=r"small_mask\.png is 5x5.*rgb\.png is 12x20"):
        mismatch[0]


def test_cache_decodes_once(files, monkeypatch):
    import feclip.data.dataset as module

    calls = []
    real = module.load_rgb
    monkeypatch.setattr(module, "load_rgb", lambda p: calls.append(p) or real(p))
    ds = AnomalyDataset([sample(files["rgb"]), sample(files["gray"])], S, cache=True).preload(num_threads=2)
    assert len(calls) == 2
    for _ in range(3):  # epochs
        for i in range(len(ds)):
            ds[i]
    assert len(calls) == 2
    nocache = AnomalyDataset([sample(files["rgb"])], S, cache=False)
    nocache[0]
    nocache[0]
    assert len(calls) == 4


def test_dataloader_collate(files):
    ds = AnomalyDataset(
        [sample(files["rgb"], files["visa_mask"]), sample(files["gray"]), sample(files["bmp"])], S
    )
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, S, S) and batch["mask"].shape == (3, S, S)
    assert batch["label"].tolist() == [1, 0, 0] and batch["original_size"].shape == (3, 2)
    assert batch["has_mask"].tolist() == [True, True, True]
    assert ds.labels.tolist() == [1, 0, 0] and ds.categories == ["c"] and ds.indices("c") == [0, 1, 2]


def test_normalize_shape():
    out = normalize(np.zeros((4, 5, 3), np.uint8))
    assert out.shape == (3, 4, 5)
    assert torch.allclose(out[:, 0, 0], -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD))


def test_end_to_end_visa_tree_with_01_255_mask(tmp_path):
    """A VisA tree (non-square JPEGs, a mask holding 0/1/255) listed and loaded like the real thing."""
    import csv

    from feclip.data import list_samples

    root = tmp_path / "visa"
    rng = np.random.default_rng(3)
    save(
        root / "pcb1/Data/Images/Normal/0000.JPG",
        rng.integers(0, 256, (10, 14, 3), dtype=np.uint8),
        fmt="JPEG",
    )
    save(
        root / "pcb1/Data/Images/Anomaly/000.JPG",
        rng.integers(0, 256, (10, 14, 3), dtype=np.uint8),
        fmt="JPEG",
    )
    mask = np.zeros((10, 14), np.uint8)
    mask[1:3, 1:3], mask[6:9, 8:12] = 1, 255
    save(root / "pcb1/Data/Masks/Anomaly/000.png", mask)
    (root / "split_csv").mkdir()
    with (root / "split_csv/1cls.csv").open("w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerow(["pcb1", "test", "normal", "pcb1/Data/Images/Normal/0000.JPG", ""])
        w.writerow(
            ["pcb1", "test", "anomaly", "pcb1/Data/Images/Anomaly/000.JPG", "pcb1/Data/Masks/Anomaly/000.png"]
        )
    ds = AnomalyDataset(list_samples("visa", root), image_size=S).preload()
    assert [ds[i]["label"] for i in range(2)] == [1, 0]
    assert ds[0]["mask"].sum() > 0 and ds[1]["mask"].sum() == 0
    assert int(ds.original_mask(0).sum()) == 4 + 12
    assert ds[0]["original_size"].tolist() == [10, 14]

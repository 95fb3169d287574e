"""The on-disk cache of decoded, resized images (feclip.data.decoded, ``AnomalyDataset(disk_cache=)``):
bit-identical items, no decoding once written, a new entry for a changed file or option, corrupt
entries rebuilt, DataLoader workers, concurrent builders and an unwritable cache folder."""

import json
import logging
import multiprocessing
import os
import pickle
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from feclip import fileio
from feclip.data import AnomalyDataset, decoded
from feclip.data import dataset as dataset_module
from feclip.data.dataset import collate
from feclip.data.sample import Sample
from feclip.errors import DatasetError

S = 24
H, W = 40, 50


def _write(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


@pytest.fixture
def files(tmp_path):
    """Samples of three categories: RGB and grayscale PNGs and a JPEG with binary masks (``part``),
    non-binary masks binarised at 127 (``soft``), anomalous images without masks (``level``)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:H, :W]
    samples = []
    for i in range(6):
        rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        if i % 3 == 0:
            image = _write(tmp_path / "part" / f"{i}.png", rgb)
        elif i % 3 == 1:
            image = _write(tmp_path / "part" / f"{i}.png", rgb[..., 0])  # grayscale (mode L)
        else:
            image = _write(tmp_path / "part" / f"{i}.jpg", rgb, quality=90)
        mask = None
        if i % 2:
            blob = ((yy - 10 - 3 * i) ** 2 + (xx - 25) ** 2 < 60).astype(np.uint8) * 255
            mask = _write(tmp_path / "part_gt" / f"{i}.png", blob)
        samples.append(Sample(image, mask, i % 2, "part", "bad" if i % 2 else "good"))
    for i in range(4):
        image = _write(tmp_path / "soft" / f"{i}.png", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        mask = None
        if i % 2:
            soft = np.clip((xx * 5 + yy * 2 + 30 * i), 0, 255).astype(np.uint8)  # a ramp, not 0/255
            mask = _write(tmp_path / "soft_gt" / f"{i}.png", soft)
        samples.append(Sample(image, mask, i % 2, "soft", "bad" if i % 2 else "good", mask_threshold=127))
    for i in range(3):
        image = _write(tmp_path / "level" / f"{i}.png", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        samples.append(Sample(image, None, i % 2, "level", "bad" if i % 2 else "good"))
    return samples


def _assert_same_items(a: AnomalyDataset, b: AnomalyDataset):
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        for key in ("image", "mask", "original_size"):
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), (i, key)
        assert {k: v for k, v in x.items() if not torch.is_tensor(v)} == {
            k: v for k, v in y.items() if not torch.is_tensor(v)
        }


def _entries(root):
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"resize": "center_crop"},
        {"mask_resize": "nearest"},
        {"mask_threshold": 200},
        {"resize": "center_crop", "mask_resize": "nearest"},
    ],
)
def test_items_are_bit_identical_to_decoding_in_memory(files, tmp_path, options):
    plain = AnomalyDataset(files, image_size=S, **options)
    cached = AnomalyDataset(files, image_size=S, disk_cache=tmp_path / "dc", **options).preload()
    _assert_same_items(plain, cached)
    again = AnomalyDataset(files, image_size=S, disk_cache=tmp_path / "dc", **options)  # from the entry
    _assert_same_items(plain, again)
    for i in range(len(files)):
        assert np.array_equal(plain.original_mask(i), again.original_mask(i))
    (entry,) = _entries(tmp_path / "dc")
    meta = json.loads((tmp_path / "dc" / entry / "meta.json").read_text())
    assert meta["n"] == len(files) and meta["image_size"] == S and meta["key"] == entry
    assert np.load(tmp_path / "dc" / entry / "images.npy").shape == (len(files), S, S, 3)
    assert np.load(tmp_path / "dc" / entry / "sizes.npy").tolist() == [[H, W]] * len(files)
    assert not cached._cache  # the memory map is the cache


@pytest.mark.parametrize("disk", [False, True])
def test_items_are_normalised_exactly_as_transforms_normalize(files, tmp_path, disk):
    from feclip.data.transforms import normalize

    mean, std = (0.5, 0.25, 0.125), (0.3, 0.2, 0.7)
    for kwargs in ({}, {"mean": mean, "std": std}):
        ds = AnomalyDataset(files, image_size=S, disk_cache=tmp_path / "dc" if disk else None, **kwargs)
        for i in range(len(files)):
            image = ds[i]["image"]
            assert image.is_contiguous()  # the batch's stack is a plain copy
            assert torch.equal(image, normalize(ds._decode(i).image, **kwargs))
    rng = np.random.default_rng(1)
    for _ in range(5):  # every uint8 value, odd sizes
        image = rng.integers(0, 256, (37, 41, 3), dtype=np.uint8)
        image[0, :3] = [[0, 0, 0], [255, 255, 255], [1, 128, 254]]
        m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        assert torch.equal(dataset_module._normalize_chw(image, m, s), normalize(image, mean, std))


def test_a_second_dataset_reads_the_entry_without_decoding(files, tmp_path, monkeypatch):
    reference = AnomalyDataset(files, image_size=S).preload()  # decoded now, kept in memory
    AnomalyDataset(files, image_size=S, disk_cache=tmp_path / "dc").preload()

    def no_decoding(path, *args):
        raise AssertionError(f"decoded {path}")

    monkeypatch.setattr(dataset_module, "load_rgb", no_decoding)
    monkeypatch.setattr(dataset_module, "load_mask", no_decoding)
    second = AnomalyDataset(files, image_size=S, disk_cache=tmp_path / "dc")
    _assert_same_items(reference, second)


def test_a_changed_file_or_option_gives_another_entry(files, tmp_path):
    root = tmp_path / "dc"
    AnomalyDataset(files, image_size=S, disk_cache=root).preload()
    first = _entries(root)
    # rewrite one image with other pixels (another size and mtime)
    victim = files[3].image_path
    _write(victim, np.full((H, W), 7, dtype=np.uint8))
    st = os.stat(victim)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = AnomalyDataset(files, image_size=S, disk_cache=root)
    _assert_same_items(AnomalyDataset(files, image_size=S), changed)
    assert changed[3]["image"].unique().numel() == 3  # the new, flat gray image (one value per channel)
    assert len(_entries(root)) == 2 and first[0] in _entries(root)
    # options change the key; labels, categories and the normalisation do not
    key = decoded.entry_key(
        files, [None if s.mask_path is None else 0 for s in files], S, "square", "bilinear"
    )
    assert key != decoded.entry_key(files, [None] * len(files), S, "square", "bilinear")
    assert key != decoded.entry_key(
        files, [None if s.mask_path is None else 0 for s in files], S + 1, "square", "bilinear"
    )
    assert key != decoded.entry_key(
        files, [None if s.mask_path is None else 0 for s in files], S, "center_crop", "bilinear"
    )
    assert key != decoded.entry_key(
        files, [None if s.mask_path is None else 0 for s in files], S, "square", "nearest"
    )
    AnomalyDataset(files, image_size=S, disk_cache=root, mean=(0.5,) * 3).preload()
    assert len(_entries(root)) == 2


@pytest.mark.parametrize("damage", ["truncate_images", "delete_masks", "wrong_meta", "no_meta"])
def test_a_corrupt_entry_is_rebuilt_not_used(files, tmp_path, caplog, damage):
    root = tmp_path / "dc"
    AnomalyDataset(files, image_size=S, disk_cache=root).preload()
    (key,) = _entries(root)
    entry = root / key
    if damage == "truncate_images":
        size = (entry / "images.npy").stat().st_size
        with open(entry / "images.npy", "r+b") as f:
            f.truncate(size // 2)
    elif damage == "delete_masks":
        (entry / "masks.npy").unlink()
    elif damage == "wrong_meta":
        meta = json.loads((entry / "meta.json").read_text())
        (entry / "meta.json").write_text(json.dumps(meta | {"n": 3}))
    else:
        (entry / "meta.json").unlink()
    with caplog.at_level(logging.WARNING, logger="feclip"):
        rebuilt = AnomalyDataset(files, image_size=S, disk_cache=root)
        _assert_same_items(AnomalyDataset(files, image_size=S), rebuilt)
    assert any("rebuilding" in r.getMessage() and key in r.getMessage() for r in caplog.records)
    assert _entries(root) == [key]
    assert not [p for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    decoded.open_entry(entry, key, len(files), S)  # valid again


@pytest.mark.parametrize("warm", [False, True])
def test_dataloader_workers_read_the_entry(files, tmp_path, warm):
    root = tmp_path / "dc"
    ds = AnomalyDataset(files, image_size=S, disk_cache=root)
    if warm:
        ds.preload()  # opened before the workers fork: they share the map
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
    reference = [
        collate([AnomalyDataset(files, image_size=S)[i] for i in range(j, min(j + 4, len(files)))])
        for j in range(0, len(files), 4)
    ]
    batches = list(loader)
    assert len(batches) == len(reference)
    for got, want in zip(batches, reference):
        assert torch.equal(got["image"], want["image"]) and torch.equal(got["mask"], want["mask"])
        assert got["original_size"] == want["original_size"]
    assert len(_entries(root)) == 1  # cold: one worker built it while the other waited
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_a_pickled_dataset_reopens_the_entry_instead_of_copying_it(files, tmp_path):
    ds = AnomalyDataset(files, image_size=S, disk_cache=tmp_path / "dc").preload()
    blob = pickle.dumps(ds)  # what a spawned DataLoader worker receives
    assert len(blob) < 3 * S * S * len(files)  # not the arrays
    _assert_same_items(ds, pickle.loads(blob))


def _build_in_child(files, root, barrier):
    barrier.wait()
    AnomalyDataset(files, image_size=S, disk_cache=root).preload(num_threads=2)


def test_concurrent_builders_leave_one_valid_entry(files, tmp_path):
    root = tmp_path / "dc"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_build_in_child, args=(files, root, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    threads_done = []

    def in_thread():
        AnomalyDataset(files, image_size=S, disk_cache=root).preload()
        threads_done.append(True)

    thread = threading.Thread(target=in_thread)
    barrier.wait()
    thread.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    thread.join(120)
    assert threads_done
    (key,) = _entries(root)
    decoded.open_entry(root / key, key, len(files), S)
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    _assert_same_items(
        AnomalyDataset(files, image_size=S), AnomalyDataset(files, image_size=S, disk_cache=root)
    )


def test_a_builder_that_finishes_second_discards_its_copy(files, tmp_path):
    # without the lock (e.g. no flock on a network file system) two builds race to the rename
    root = tmp_path / "dc"
    root.mkdir()
    ds = AnomalyDataset(files, image_size=S)
    thresholds = [None if s.mask_path is None else 0 for s in files]
    key = decoded.entry_key(files, thresholds, S, "square", "bilinear")
    meta = {"format": decoded.FORMAT_VERSION, "key": key, "n": len(files), "image_size": S}
    for _ in range(2):
        decoded._build(root, key, len(files), S, ds._decode_file, 2, meta)
    assert _entries(root) == [key] and not list(root.glob(".tmp-*"))
    decoded.open_entry(root / key, key, len(files), S)


def test_stale_temporary_folders_are_cleaned_fresh_ones_kept(files, tmp_path):
    root = tmp_path / "dc"
    old, fresh = root / ".tmp-killed-1-aaaa", root / ".tmp-running-2-bbbb"
    for d in (old, fresh):
        d.mkdir(parents=True)
        (d / "images.npy").write_bytes(b"partial")
    day_ago = time.time() - fileio.STALE_SECONDS - 60
    os.utime(old, (day_ago, day_ago))
    AnomalyDataset(files, image_size=S, disk_cache=root).preload()
    assert not old.exists() and fresh.exists()


def test_an_unwritable_cache_folder_decodes_in_memory_with_one_warning(files, tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="feclip"):
        ds = AnomalyDataset(files, image_size=S, disk_cache=blocker / "decoded")
        _assert_same_items(AnomalyDataset(files, image_size=S), ds.preload())
    warnings = [r for r in caplog.records if "decoded-image cache" in r.getMessage()]
    assert len(warnings) == 1 and "decoding in memory" in warnings[0].getMessage()
    assert len(ds._cache) == len(files)  # the in-memory cache as without disk_cache


def test_a_bad_file_is_named_at_build_time_and_leaves_no_entry(files, tmp_path):
    root = tmp_path / "dc"
    bad = files[4].image_path
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature, then garbage
    ds = AnomalyDataset(files, image_size=S, disk_cache=root)
    with pytest.raises(DatasetError, match=str(bad)):
        ds[0]  # any first access builds the entry, which decodes the bad file
    assert _entries(root) == [] and not list(root.glob(".tmp-*"))
    missing = files[2].image_path
    missing.unlink()
    with pytest.raises(DatasetError, match=f"image {missing} not found"):
        AnomalyDataset(files, image_size=S, disk_cache=root).preload()


def test_runs_cache_under_paths_cache_dir_unless_switched_off(tmp_path):
    from types import SimpleNamespace

    from feclip.config import RunConfig
    from feclip.engine import identity
    from feclip.engine.run import make_dataset as _dataset

    sample = Sample(_write(tmp_path / "x.png", np.zeros((H, W, 3), np.uint8)), None, 0, "c", "good")
    cfg = RunConfig()
    cfg.paths.cache_dir = str(tmp_path / "cache")
    model = SimpleNamespace(image_size=S)
    assert _dataset([sample], cfg, model).disk_cache == tmp_path / "cache" / "decoded"
    cfg.data.decoded_cache = False
    assert _dataset([sample], cfg, model).disk_cache is None
    assert "data.decoded_cache" in identity.NOT_IDENTITY

"""The embedded synthetic sets: layout, disjoint categories, exact masks, determinism, idempotency."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feclip.data import AnomalyDataset, list_samples, make_synthetic
from feclip.data.synthetic import DEFECT_KINDS, MARKER, SETS, _defect, _normal, _source
from feclip.errors import ConfigError

SMALL = dict(n_train_good=1, n_test_good=2, n_test_bad=4, image_size=48)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.png"))
    }


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("synth"), seed=0, **SMALL)


def test_sources_load_offline():
    for categories in SETS.values():
        for source, kind in categories.values():
            img = _source(source)
            assert img.dtype == np.uint8 and min(img.shape[:2]) >= 256, source
            assert (img.ndim == 2) == (kind == "texture"), source


def test_layout_and_counts(sets):
    assert set(sets) == {"set_a", "set_b"}
    cats = {}
    for name, root in sets.items():
        assert (root / MARKER).is_file()
        test = list_samples("synthetic", root)
        train = list_samples("synthetic", root, split="train")
        cats[name] = {s.category for s in test}
        assert len(test) == 3 * 6 and sum(s.label for s in test) == 3 * 4 and len(train) == 3
        assert {s.defect for s in test if s.label} == set(DEFECT_KINDS)
        for s in test:
            if s.label:
                assert (
                    s.mask_path
                    == root / s.category / "ground_truth" / s.defect / f"{s.image_path.stem}_mask.png"
                )
    assert cats["set_a"] == set(SETS["set_a"]) and cats["set_b"] == set(SETS["set_b"])
    assert not cats["set_a"] & cats["set_b"]  # disjoint categories


def test_masks_are_binary_and_images_load(sets):
    samples = list_samples("synthetic", sets["set_b"])
    for s in samples:
        img = Image.open(s.image_path)
        assert img.size == (48, 48) and img.mode in ("L", "RGB")
        if s.mask_path is not None:
            mask = np.asarray(Image.open(s.mask_path))
            assert set(np.unique(mask)) == {0, 255}
            assert 0 < (mask > 0).mean() < 0.5
    ds = AnomalyDataset(samples, image_size=32)
    assert ds.has_masks and ds[len(ds) - 1]["image"].shape == (3, 32, 32)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_mask_is_exactly_the_changed_pixels(kind):
    for category, (source, texture) in {**SETS["set_a"], **SETS["set_b"]}.items():
        rng = np.random.default_rng(1)
        clean = _normal(_source(source), texture, rng, 64)
        img, mask = _defect(clean, kind, rng, 64)
        changed = np.abs(img - clean) > 0
        if changed.ndim == 3:
            changed = changed.any(axis=2)
        assert not (changed & ~mask).any(), (kind, category)  # nothing outside the mask
        assert changed[mask].mean() > 0.5, (kind, category)  # most of the mask really changed


def test_deterministic_and_seed_dependent(tmp_path, sets):
    again = make_synthetic(tmp_path / "again", seed=0, **SMALL)
    other = make_synthetic(tmp_path / "other", seed=1, **SMALL)
    for name in sets:
        assert _digest(again[name]) == _digest(sets[name])
        assert _digest(other[name]) != _digest(sets[name])


def test_idempotent_and_rebuilds_on_change(tmp_path):
    root = tmp_path / "s"
    sets = make_synthetic(root, **SMALL)
    marker = sets["set_a"] / MARKER
    stamp = marker.stat().st_mtime_ns
    make_synthetic(root, **SMALL)
    assert marker.stat().st_mtime_ns == stamp  # skipped: complete with the same parameters
    make_synthetic(root, **{**SMALL, "n_test_bad": 5})
    assert len(list_samples("synthetic", sets["set_a"])) == 3 * 7
    # an incomplete set (no marker, e.g. a crash in an older version) is rebuilt
    marker.unlink()
    (sets["set_a"] / "brick" / "test" / "good" / "000.png").unlink()
    make_synthetic(root, **SMALL)
    assert marker.is_file() and (sets["set_a"] / "brick" / "test" / "good" / "000.png").is_file()
    # no temporary folders left behind
    assert sorted(p.name for p in root.iterdir()) == ["set_a", "set_b"]


def test_bad_parameters(tmp_path):
    with pytest.raises(ConfigError, match="n_test_bad"):
        make_synthetic(tmp_path, n_test_bad=0)
    with pytest.raises(ConfigError, match="image_size"):
        make_synthetic(tmp_path, image_size=8)

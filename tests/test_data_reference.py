"""Datasets as the community's reference code reads them (issue 13): mask resizing, mask thresholds
reachable from the config, DAGM's two test protocols, BrainMRI's duplicate copy, the published counts
``feclip-data check`` compares with, and the hints it gives. Fake trees in the released layouts, tiny
images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from feclip.config import DatasetRef, PathsConfig, RunConfig
from feclip.data import AnomalyDataset, Sample, dataset_info, list_samples
from feclip.data.check import check_dataset
from feclip.data.transforms import MASK_RESIZE_METHODS, load_mask, resize_mask
from feclip.data.validate import check_target, jpeg_mask_warnings
from feclip.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _encode(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


PNG = _encode(np.full((8, 8, 3), 120, np.uint8))


def _square_mask(value: int = 255) -> bytes:
    m = np.zeros((8, 8), np.uint8)
    m[2:6, 2:6] = value
    return _encode(m)


def write(path: Path, data: bytes = PNG) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def disc(size: int = 64, radius: float = 15.0) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return ((yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 <= radius**2).astype(np.uint8) * 255


# ---------------------------------------------------------------------------------------------------
# Mask resizing
# ---------------------------------------------------------------------------------------------------


def test_bilinear_mask_resize_hand_computed():
    # 4 -> 2 pixels per axis (scale 2). PIL's bilinear filter widens its support to 2 input pixels when
    # shrinking: output pixel 0 (centre at input 1.0) weighs input pixels 0, 1, 2 (centres 0.5, 1.5, 2.5)
    # by the triangle 1 - |d|/2 = 3/4, 3/4, 1/4, i.e. 3/7, 3/7, 1/7; output pixel 1 weighs pixels 1, 2, 3
    # by 1/7, 3/7, 3/7. Nearest neighbour copies input pixels 1 and 3 (floor of the centres 1.0, 3.0).
    last_column = np.zeros((4, 4), bool)
    last_column[:, 3] = True  # rows [0, 0, 0, 255]: bilinear 0 and 255*3/7 = 109.3 -> 109 < 128
    gray = np.asarray(Image.fromarray(last_column.astype(np.uint8) * 255).resize((2, 2), Image.BILINEAR))
    assert gray.tolist() == [[0, 109], [0, 109]]
    assert resize_mask(last_column, 2).tolist() == [[False, False], [False, False]]
    assert resize_mask(last_column, 2, "nearest").tolist() == [[False, True], [False, True]]

    middle = np.zeros((4, 4), bool)
    middle[:, 1:3] = True  # rows [0, 255, 255, 0]: bilinear 255*4/7 = 145.7 -> 146 >= 128 on both sides
    gray = np.asarray(Image.fromarray(middle.astype(np.uint8) * 255).resize((2, 2), Image.BILINEAR))
    assert gray.tolist() == [[146, 146], [146, 146]]
    assert resize_mask(middle, 2).tolist() == [[True, True], [True, True]]
    assert resize_mask(middle, 2, "nearest").tolist() == [[True, False], [True, False]]

    same = np.eye(3, dtype=bool)
    assert resize_mask(same, 3) is same  # already the right size: untouched
    with pytest.raises(ConfigError, match="bilinear"):
        resize_mask(middle, 2, "bicubic")


def test_bilinear_is_anomalyclips_target_transform():
    """AnomalyCLIP: Resize((S, S)) (bilinear, antialiased on PIL images) + CenterCrop(S) + ToTensor on the
    0/255 'L' mask, then > 0.5. Same pixels, for shrinking and enlarging, square or not."""
    transforms = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(0)
    n_differ = 0
    for h, w, s in [(37, 53, 16), (64, 64, 24), (20, 30, 45), (100, 17, 33), (9, 9, 4)]:
        mask = np.zeros((h, w), bool)
        for _ in range(3):
            y, x = rng.integers(0, h), rng.integers(0, w)
            mask[y : y + rng.integers(1, h), x : x + rng.integers(1, w)] = True
        pipeline = transforms.Compose(
            [transforms.Resize((s, s)), transforms.CenterCrop(s), transforms.ToTensor()]
        )
        reference = (pipeline(Image.fromarray(mask.astype(np.uint8) * 255, mode="L"))[0] > 0.5).numpy()
        assert np.array_equal(resize_mask(mask, s), reference), (h, w, s)
        n_differ += int((resize_mask(mask, s, "nearest") != reference).sum())
    assert n_differ > 0  # nearest is another pipeline: it differs on boundaries


def test_dataset_resizes_masks_by_option_and_keeps_the_original(tmp_path):
    image = write(tmp_path / "img.png", _encode(np.full((30, 50, 3), 90, np.uint8)))
    yy, xx = np.mgrid[0:30, 0:50]
    full = (((yy - 14) ** 2 / 81 + (xx - 24) ** 2 / 256) <= 1).astype(np.uint8) * 255  # an ellipse
    mask = write(tmp_path / "mask.png", _encode(full))
    samples = [Sample(image, mask, 1, "c", "bad")]
    default = AnomalyDataset(samples, image_size=16)
    nearest = AnomalyDataset(samples, image_size=16, mask_resize="nearest")
    assert default.mask_resize == "bilinear" and MASK_RESIZE_METHODS == ("bilinear", "nearest")
    binary = full > 0
    assert np.array_equal(default[0]["mask"].numpy().astype(bool), resize_mask(binary, 16, "bilinear"))
    assert np.array_equal(nearest[0]["mask"].numpy().astype(bool), resize_mask(binary, 16, "nearest"))
    assert not np.array_equal(default[0]["mask"].numpy(), nearest[0]["mask"].numpy())
    for ds in (default, nearest):  # original-resolution masks are never resized
        assert np.array_equal(ds.original_mask(0), binary.astype(np.uint8))
    with pytest.raises(ConfigError, match="mask_resize"):
        AnomalyDataset(samples, image_size=16, mask_resize="area")


def test_mask_resize_is_a_config_field_in_the_identity():
    from feclip.engine.identity import make_identity

    cfg = RunConfig()
    assert cfg.data.mask_resize == "bilinear"
    cfg.validate()
    first = make_identity(cfg, "b", "trained", {})
    cfg.data.mask_resize = "nearest"
    cfg.validate()
    second = make_identity(cfg, "b", "trained", {})
    assert first["hash"] != second["hash"]
    cfg.data.mask_resize = "bicubic"
    with pytest.raises(ConfigError, match="data.mask_resize"):
        cfg.validate()


# ---------------------------------------------------------------------------------------------------
# Mask thresholds: Kvasir's JPEG masks
# ---------------------------------------------------------------------------------------------------


def fake_kvasir(root: Path, n: int = 3, quality: int = 75) -> Path:
    for i in range(n):
        write(
            root / "Kvasir-SEG" / "images" / f"cju{i}.jpg",
            _encode(np.full((64, 64, 3), 90, np.uint8), "JPEG"),
        )
        write(root / "Kvasir-SEG" / "masks" / f"cju{i}.jpg", _encode(disc(), "JPEG", quality=quality))
    return root


def test_jpeg_masks_grow_with_gt_0_and_mask_threshold_fixes_it(tmp_path):
    root = fake_kvasir(tmp_path / "kvasir")
    truth = int((disc() > 0).sum())
    plain = list_samples("kvasir", root)
    assert {s.mask_threshold for s in plain} == {0}
    path = plain[0].mask_path
    loose, strict = int(load_mask(path, 0).sum()), int(load_mask(path, 127).sum())
    assert loose > truth * 1.05 and abs(strict - truth) <= truth * 0.05  # > 0 counts the JPEG noise
    for value in (127, "127"):  # YAML gives an int, the command line a string
        samples = list_samples("kvasir", root, mask_threshold=value)
        assert {s.mask_threshold for s in samples} == {127}
        ds = AnomalyDataset(samples, image_size=32)
        assert int(ds.original_mask(0).sum()) == strict  # the dataset applies each sample's threshold
        assert int(AnomalyDataset(samples, 32, mask_threshold=0).original_mask(0).sum()) == loose  # override
    assert int(AnomalyDataset(plain, 32).original_mask(0).sum()) == loose
    # the run's checks and feclip-data check warn about JPEG masks read with > 0, and only then
    assert any("JPEG" in w and "mask_threshold" in w for w in check_target("kvasir", plain))
    assert not jpeg_mask_warnings("kvasir", list_samples("kvasir", root, mask_threshold=127))
    warnings = check_dataset("kvasir", root).warnings
    assert any("JPEG" in w for w in warnings) and any("not binary" in w and "127" in w for w in warnings)
    report = check_dataset("kvasir", root, mask_threshold="127")
    assert not any("JPEG" in w or "not binary" in w for w in report.warnings)
    assert any("binarised with > 127" in n for n in report.notes)


def test_mask_threshold_option_values_and_readers(tmp_path):
    root = fake_kvasir(tmp_path / "kvasir", n=1)
    for bad in ("abc", 255, -1, True, 12.5, ""):
        with pytest.raises(ConfigError, match="mask_threshold"):
            list_samples("kvasir", root, mask_threshold=bad)
    for name in ("kvasir", "clinicdb", "folder", "meta_json"):
        assert "mask_threshold" in dataset_info(name).options
    for name in ("visa", "mvtec", "dagm"):  # VisA's masks hold small class ids: 127 would empty them
        assert "mask_threshold" not in dataset_info(name).options
    with pytest.raises(ConfigError, match="unknown reader option mask_threshold"):
        list_samples("mvtec", tmp_path, mask_threshold=127)


def test_mask_threshold_reaches_the_run_from_the_config(tmp_path):
    from feclip.engine.run import list_dataset

    fake_kvasir(tmp_path / "kvasir", n=2)
    ref = DatasetRef(name="kvasir", options={"mask_threshold": 127})
    samples = list_dataset(ref, PathsConfig(data_root=str(tmp_path)))
    assert {s.mask_threshold for s in samples} == {127}


def test_paper_protocol_sets_the_recommended_reader_options():
    protocol = yaml.safe_load((REPO / "feclip" / "conf" / "protocol" / "mvtec_to_all.yaml").read_text())
    by_name = {t["name"]: t.get("options", {}) for t in protocol["targets"]}
    assert by_name["kvasir"] == {"mask_threshold": 127} and by_name["clinicdb"] == {"mask_threshold": 127}
    assert by_name["dagm"] == {"protocol": "anomalyclip"}
    assert by_name["visa"] == {}


# ---------------------------------------------------------------------------------------------------
# feclip-data check: mask value hints
# ---------------------------------------------------------------------------------------------------


def test_visa_class_id_masks_get_no_threshold_hint(tmp_path):
    root = tmp_path / "visa"
    rows = ["object,split,label,image,mask"]
    for cat in ("candle", "pcb1"):
        for i in range(2):
            rel = f"{cat}/Data/Images/Normal/{i}.JPG"
            write(root / rel)
            rows.append(f"{cat},test,normal,{rel},")
        for i, class_id in enumerate((1, 7, 9)):  # VisA masks hold class ids, not 255
            rel, mrel = f"{cat}/Data/Images/Anomaly/{i}.JPG", f"{cat}/Data/Masks/Anomaly/{i}.png"
            write(root / rel)
            ids = np.zeros((8, 8), np.uint8)
            ids[1:4, 1:4] = class_id
            ids[5:7, 5:7] = (class_id % 9) + 1
            write(root / mrel, _encode(ids))
            rows.append(f"{cat},test,anomaly,{rel},{mrel}")
    write(root / "split_csv" / "1cls.csv", ("\n".join(rows) + "\n").encode())
    report = check_dataset("visa", root)
    text = "\n".join(report.warnings + report.errors)
    assert "mask_threshold" not in text and "not binary" not in text
    assert any("small label values" in n and "as intended" in n for n in report.notes)


def test_label_masks_emptied_by_a_threshold_are_reported(tmp_path):
    root = tmp_path / "widget"
    write(root / "good" / "0.png")
    write(root / "dent" / "0.png")
    ids = np.zeros((8, 8), np.uint8)
    ids[2:5, 2:5] = 3
    ids[5:7, 1:3] = 5
    write(root / "ground_truth" / "dent" / "0_mask.png", _encode(ids))
    report = check_dataset("folder", root, mask_threshold="127")
    text = "\n".join(report.warnings)
    assert "empties it" in text and "dropped" in text and "threshold 0" in text


# ---------------------------------------------------------------------------------------------------
# DAGM: AnomalyCLIP's and AdaCLIP's test sets
# ---------------------------------------------------------------------------------------------------


def fake_dagm(root: Path, layout: dict[str, dict[str, tuple[int, int]]]) -> Path:
    """``layout[class][folder] = (n_normal, n_defective)``; defective images get a Label mask. Train
    and Test number their files separately, as in the Kaggle copy's folders."""
    for cls, folders in layout.items():
        for folder, (n_ok, n_bad) in folders.items():
            order = np.random.default_rng(len(cls)).permutation(n_ok + n_bad)  # defects among normals
            for j, i in enumerate(order):
                stem = f"{i + 1:04d}"
                write(root / cls / folder / f"{stem}.PNG")
                if j >= n_ok:
                    write(root / cls / folder / "Label" / f"{stem}_label.PNG", _square_mask())
    return root


def test_dagm_protocols(tmp_path):
    layout = {"Class1": {"Train": (9, 3), "Test": (8, 2)}, "Class2": {"Train": (5, 1), "Test": (6, 4)}}
    root = fake_dagm(tmp_path / "dagm", layout)

    def counts(samples):
        out = {}
        for s in samples:
            key = (s.category, s.image_path.parent.name)
            normal, bad = out.get(key, (0, 0))
            out[key] = (normal + (s.label == 0), bad + (s.label == 1))
        return out

    default = list_samples("dagm", root)
    assert default == list_samples("dagm", root, protocol="anomalyclip")
    assert counts(default) == {("Class1", "Test"): (8, 2), ("Class2", "Test"): (6, 4)}
    assert counts(list_samples("dagm", root, split="train")) == {
        ("Class1", "Train"): (9, 3),
        ("Class2", "Train"): (5, 1),
    }

    test = list_samples("dagm", root, protocol="adaclip")
    train = list_samples("dagm", root, split="train", protocol="adaclip")
    # every defect of Train/ and Test/, and as many normal images of the same folder
    assert counts(test) == {
        ("Class1", "Train"): (3, 3),
        ("Class1", "Test"): (2, 2),
        ("Class2", "Train"): (1, 1),
        ("Class2", "Test"): (4, 4),
    }
    assert counts(train) == {
        ("Class1", "Train"): (6, 0),
        ("Class1", "Test"): (6, 0),
        ("Class2", "Train"): (4, 0),
        ("Class2", "Test"): (2, 0),
    }
    all_images = {p for p in root.rglob("*.PNG") if p.parent.name != "Label"}
    test_paths, train_paths = {s.image_path for s in test}, {s.image_path for s in train}
    assert not test_paths & train_paths and test_paths | train_paths == all_images
    # the normal test images are the first by file name in each folder
    for cls in layout:
        for folder in ("Train", "Test"):
            normals = sorted(
                s.image_path.name
                for s in test + train
                if s.label == 0 and s.category == cls and s.image_path.parent.name == folder
            )
            chosen = sorted(
                s.image_path.name
                for s in test
                if s.label == 0 and s.category == cls and s.image_path.parent.name == folder
            )
            assert chosen == normals[: len(chosen)]
    assert all(s.mask_path.name == s.image_path.stem + "_label.PNG" for s in test if s.label)
    with pytest.raises(ConfigError, match="anomalyclip, adaclip"):
        list_samples("dagm", root, protocol="winclip")
    report = check_dataset("dagm", root, protocol="adaclip")
    assert not report.errors and ("Class1", "test", 10, 5, 5, 5) in report.rows


# ---------------------------------------------------------------------------------------------------
# BrainMRI's duplicate copy
# ---------------------------------------------------------------------------------------------------


def fake_brainmri(root: Path, copies: tuple[str, ...]) -> Path:
    for copy in copies:
        base = root / copy if copy else root
        for i in range(5):
            write(base / "yes" / f"Y{i}.jpg", _encode(np.full((8, 8, 3), 10 * i, np.uint8)))
        for i in range(3):
            write(base / "no" / f"N{i}.jpg", _encode(np.full((8, 8, 3), 200 - i, np.uint8)))
    return root


def test_brainmri_reads_brain_tumor_dataset_and_compares_the_copies(tmp_path):
    root = fake_brainmri(tmp_path / "brainmri", ("brain_tumor_dataset", ""))
    samples = list_samples("brainmri", root)
    assert len(samples) == 8 and all(s.image_path.parts[-3] == "brain_tumor_dataset" for s in samples)
    report = check_dataset("brainmri", root)
    assert not any("unlabeled" in w for w in report.warnings + report.notes)
    assert any("agrees" in n and "brain_tumor_dataset" in n and "8 files" in n for n in report.notes)
    # the copies drift apart: a warning naming what differs
    write(root / "yes" / "Y0.jpg", _encode(np.full((8, 8, 3), 99, np.uint8)))
    (root / "no" / "N2.jpg").unlink()
    text = "\n".join(check_dataset("brainmri", root).warnings)
    assert "does NOT agree" in text and "Y0.jpg" in text and "N2.jpg" in text
    # only the top-level copy: it is read
    top = fake_brainmri(tmp_path / "top", ("",))
    assert len(list_samples("brainmri", top)) == 8
    assert not any("agree" in x for x in check_dataset("brainmri", top).notes)


# ---------------------------------------------------------------------------------------------------
# Published counts
# ---------------------------------------------------------------------------------------------------


def test_published_counts_are_consistent():
    mvtec = dataset_info("mvtec").test_counts
    assert (mvtec.normal, mvtec.anomalous, mvtec.images) == (467, 1258, 1725)
    assert sum(n for _, n, _ in mvtec.per_category) == 467 and sum(a for *_, a in mvtec.per_category) == 1258
    assert [c for c, *_ in mvtec.per_category] == list(dataset_info("mvtec").categories)
    visa = dataset_info("visa").test_counts
    assert (visa.normal, visa.anomalous, visa.images) == (962, 1200, 2162)
    assert sum(n for _, n, _ in visa.per_category) == 962 and {a for *_, a in visa.per_category} == {100}
    assert visa.category("pcb3") == (101, 100) and visa.category("nope") is None
    for name, totals in (("btad", (451, 290)), ("mpdd", (176, 282))):
        counts = dataset_info(name).test_counts
        assert (counts.normal, counts.anomalous) == totals and "third-party" in counts.source
        assert counts.per_category == ()
    for name in ("dtd_synthetic", "dagm", "synthetic", "folder", "meta_json"):
        assert dataset_info(name).test_counts is None


def fake_mvtec_counts(root: Path) -> Path:
    for category, normal, bad in dataset_info("mvtec").test_counts.per_category:
        for i in range(normal):
            write(root / category / "test" / "good" / f"{i:03d}.png")
        for i in range(bad):
            write(root / category / "test" / "crack" / f"{i:03d}.png")
            write(root / category / "ground_truth" / "crack" / f"{i:03d}_mask.png", _square_mask())
        write(root / category / "train" / "good" / "000.png")
    return root


def test_check_compares_with_the_published_counts(tmp_path):
    root = fake_mvtec_counts(tmp_path / "mvtec")
    report = check_dataset("mvtec", root, threads=4)
    assert not report.errors and not any("counts differ" in w for w in report.warnings)
    assert any("match the published ones in all" in n for n in report.notes)
    # a partial download: one image and one whole category fewer
    (root / "bottle" / "test" / "crack" / "000.png").unlink()
    (root / "bottle" / "ground_truth" / "crack" / "000_mask.png").unlink()
    for path in sorted((root / "zipper").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "zipper").rmdir()
    text = "\n".join(check_dataset("mvtec", root, threads=4).warnings)
    assert "bottle: 82 test images (20 normal + 62 anomalous), published 83 (20 + 63)" in text
    assert "in all: 1573 test images" in text and "published 1725 (467 + 1258)" in text
    assert "official categories missing: zipper" in text
    # a subset of categories: compared per category only
    report = check_dataset("mvtec", root, ["cable", "grid"], threads=4)
    assert any("for the categories checked" in n for n in report.notes)


def test_check_counts_totals_only_and_listing_options(tmp_path):
    root = tmp_path / "mpdd"
    write(root / "tubes" / "train" / "good" / "0.png")
    for i in range(2):
        write(root / "tubes" / "test" / "good" / f"{i}.png")
        write(root / "tubes" / "test" / "bad" / f"{i}.png")
        write(root / "tubes" / "ground_truth" / "bad" / f"{i}_mask.png", _square_mask())
    text = "\n".join(check_dataset("mpdd", root).warnings)
    assert "in all: 4 test images (2 normal + 2 anomalous), published 458 (176 + 282)" in text
    assert "third-party" in text
    dagm = fake_dagm(tmp_path / "dagm", {"Class1": {"Train": (2, 1), "Test": (2, 1)}})
    assert any("no published test counts" in n for n in check_dataset("dagm", dagm).notes)
    # BTAD: totals only, per product not published by its authors
    report = check_dataset("btad", _btad(tmp_path / "btad"))
    assert any("counts differ" in w for w in report.warnings)


def _btad(root: Path) -> Path:
    for product in ("01", "02", "03"):
        write(root / "BTech_Dataset_transformed" / product / "test" / "ok" / "0.png")
        write(root / "BTech_Dataset_transformed" / product / "test" / "ko" / "0.png")
        write(root / "BTech_Dataset_transformed" / product / "ground_truth" / "ko" / "0.png", _square_mask())
        write(root / "BTech_Dataset_transformed" / product / "train" / "ok" / "0.png")
    return root


def test_check_does_not_compare_counts_of_another_listing(tmp_path):
    root = tmp_path / "visa"
    write(root / "pcb1" / "Data" / "Images" / "Normal" / "0.JPG")
    write(root / "pcb1" / "Data" / "Images" / "Anomaly" / "0.JPG")
    write(root / "pcb1" / "Data" / "Masks" / "Anomaly" / "0.png", _square_mask())
    csv = "object,split,label,image,mask\npcb1,test,normal,pcb1/Data/Images/Normal/0.JPG,\n"
    csv += "pcb1,test,anomaly,pcb1/Data/Images/Anomaly/0.JPG,pcb1/Data/Masks/Anomaly/0.png\n"
    write(root / "split_csv" / "2cls_fewshot.csv", csv.encode())
    report = check_dataset("visa", root, split_file="2cls_fewshot")
    assert not any("counts differ" in w for w in report.warnings)
    assert any("not compared" in n and "split_file" in n for n in report.notes)

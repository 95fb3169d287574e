"""Readers: listings, labels, mask pairing by name and counts on fake trees shaped like the real datasets.

The trees hold tiny (8x8) files written from one pre-encoded PNG, so building the full-size MVTec and
VisA shapes takes about a second; readers never decode images.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feclip.data import DATASETS, DEFAULT_DIRS, Sample, dataset_info, list_samples
from feclip.errors import ConfigError, DatasetError


def _png(mode: str = "RGB", value: int = 128, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (8, 8), value if mode == "L" else (value,) * len(mode)).save(buf, format=fmt)
    return buf.getvalue()


PNG = _png()
MASK = _png("L", 255)
BMP = _png(fmt="BMP")


def touch(path: Path, data: bytes = PNG) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def build_tree(root: Path, files: dict[str, bytes] | list[str]) -> Path:
    """Generic fake-tree builder: relative path -> bytes (a list means the default PNG for each)."""
    items = files.items() if isinstance(files, dict) else ((f, PNG) for f in files)
    for rel, data in items:
        touch(root / rel, data)
    return root


def fake_mvtec(
    root: Path,
    test: dict[str, tuple[int, int]],
    train: dict[str, int] | None = None,
    *,
    good: str = "good",
    bad: tuple[str, ...] = ("crack", "scratch"),
    ext: str = ".png",
    mask_name: str = "{stem}_mask.png",
) -> Path:
    """MVTec layout: test = {category: (n_good, n_bad)}, anomalies spread over ``bad`` folders."""
    files: dict[str, bytes] = {}
    image = BMP if ext == ".bmp" else PNG
    for cat, (n_good, n_bad) in test.items():
        for i in range(n_good):
            files[f"{cat}/test/{good}/{i:03d}{ext}"] = image
        for i in range(n_bad):
            defect = bad[i % len(bad)]
            stem = f"{i:03d}"
            files[f"{cat}/test/{defect}/{stem}{ext}"] = image
            files[f"{cat}/ground_truth/{defect}/{mask_name.format(stem=stem)}"] = MASK
        for i in range((train or {}).get(cat, 1)):
            files[f"{cat}/train/{good}/{i:03d}{ext}"] = image
    return build_tree(root, files)


# Real per-category counts: test (good, anomalous) and train (good).
MVTEC_TEST = {
    "bottle": (20, 63),
    "cable": (58, 92),
    "capsule": (23, 109),
    "carpet": (28, 89),
    "grid": (21, 57),
    "hazelnut": (40, 70),
    "leather": (32, 92),
    "metal_nut": (22, 93),
    "pill": (26, 141),
    "screw": (41, 119),
    "tile": (33, 84),
    "toothbrush": (12, 30),
    "transistor": (60, 40),
    "wood": (19, 60),
    "zipper": (32, 119),
}
MVTEC_TRAIN = {
    "bottle": 209,
    "cable": 224,
    "capsule": 219,
    "carpet": 280,
    "grid": 264,
    "hazelnut": 391,
    "leather": 245,
    "metal_nut": 220,
    "pill": 267,
    "screw": 320,
    "tile": 230,
    "toothbrush": 60,
    "transistor": 213,
    "wood": 247,
    "zipper": 240,
}
# VisA 1cls: category -> (train normal, test normal); every category has 100 anomalous test images.
VISA_1CLS = {
    "candle": (900, 100),
    "capsules": (542, 60),
    "cashew": (450, 50),
    "chewinggum": (453, 50),
    "fryum": (450, 50),
    "macaroni1": (900, 100),
    "macaroni2": (900, 100),
    "pcb1": (904, 100),
    "pcb2": (901, 100),
    "pcb3": (905, 101),
    "pcb4": (904, 101),
    "pipe_fryum": (450, 50),
}


def fake_visa(root: Path, counts: dict[str, tuple[int, int]], n_bad: int = 100, mask: bytes = MASK) -> Path:
    rows = []
    files: dict[str, bytes] = {}
    for cat, (n_train, n_test) in counts.items():
        for i in range(n_train + n_test):
            rel = f"{cat}/Data/Images/Normal/{i:04d}.JPG"
            files[rel] = PNG
            rows.append((cat, "train" if i < n_train else "test", "normal", rel, ""))
        for i in range(n_bad):
            rel, mrel = f"{cat}/Data/Images/Anomaly/{i:03d}.JPG", f"{cat}/Data/Masks/Anomaly/{i:03d}.png"
            files[rel], files[mrel] = PNG, mask
            rows.append((cat, "test", "anomaly", rel, mrel))
    build_tree(root, files)
    (root / "split_csv").mkdir()
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return root


def _summary(samples: list[Sample]) -> tuple[int, int, int]:
    return len(samples), sum(s.label for s in samples), len({s.category for s in samples})


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------


def test_registry_names_and_default_dirs():
    assert DATASETS == (
        "mvtec",
        "visa",
        "btad",
        "mpdd",
        "dtd_synthetic",
        "dagm",
        "brainmri",
        "br35h",
        "clinicdb",
        "kvasir",
        "synthetic",
        "meta_json",
        "folder",
    )
    for name in DATASETS:
        assert dataset_info(name).name == name
    assert set(DEFAULT_DIRS) == set(DATASETS) - {"meta_json", "folder"}
    assert DEFAULT_DIRS["mvtec"] == "mvtec" and DEFAULT_DIRS["visa"] == "visa"


def test_unknown_name_split_and_missing_root(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset 'mvtc'"):
        list_samples("mvtc", tmp_path)
    with pytest.raises(ConfigError, match="brainmri has no split 'train'"):
        list_samples("brainmri", tmp_path, split="train")
    with pytest.raises(DatasetError, match=r"does not exist.*expected layout"):
        list_samples("mvtec", tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------
# Real counts on full-shape fake trees
# ---------------------------------------------------------------------------------------------------


def test_mvtec_real_counts(tmp_path):
    root = fake_mvtec(tmp_path / "mvtec", MVTEC_TEST, MVTEC_TRAIN)
    test = list_samples("mvtec", root)
    assert _summary(test) == (1725, 1258, 15)
    assert sum(1 for s in test if s.label == 0) == 467
    assert all(s.defect == "good" for s in test if s.label == 0)
    assert all(
        s.mask_path is not None and s.mask_path.name == s.image_path.stem + "_mask.png"
        for s in test
        if s.label
    )
    assert _summary(list_samples("mvtec", root, split="train")) == (3629, 0, 15)
    bottle = list_samples("mvtec", root, categories="bottle")
    assert len(bottle) == 83 and {s.category for s in bottle} == {"bottle"}
    # sorted: categories, then paths
    keys = [(s.category, str(s.image_path)) for s in test]
    assert keys == sorted(keys)


def test_visa_real_counts(tmp_path):
    root = fake_visa(tmp_path / "visa", VISA_1CLS)
    test = list_samples("visa", root)
    assert _summary(test) == (2162, 1200, 12)
    train = list_samples("visa", root, split="train")
    assert _summary(train) == (8659, 0, 12)
    assert len(test) + len(train) == 10821
    per_cat = {c: sum(1 for s in test if s.category == c) for c in VISA_1CLS}
    assert per_cat["pcb3"] == 201 and per_cat["capsules"] == 160 and per_cat["candle"] == 200
    assert [s.category for s in test][-1] == "pipe_fryum"
    assert [c for c in dict.fromkeys(s.category for s in test)][:3] == ["candle", "capsules", "cashew"]


def test_brainmri_real_counts_and_nesting(tmp_path):
    root = tmp_path / "brainmri"
    files = [f"brain_tumor_dataset/yes/Y{i}.jpg" for i in range(155)]
    files += [f"brain_tumor_dataset/no/N{i}.jpg" for i in range(98)]
    build_tree(root, files)
    samples = list_samples("brainmri", root)
    assert _summary(samples) == (253, 155, 1)
    assert all(s.mask_path is None and s.category == "brain" for s in samples)
    # The Kaggle archive also has a duplicate top-level yes/no: brain_tumor_dataset/ (AnomalyCLIP's
    # choice) is read, nothing is counted twice.
    build_tree(root, [f"yes/Y{i}.jpg" for i in range(155)] + [f"no/N{i}.jpg" for i in range(98)])
    samples = list_samples("brainmri", root)
    assert _summary(samples) == (253, 155, 1)
    assert all(s.image_path.parent.parent.name == "brain_tumor_dataset" for s in samples)


def test_br35h_real_counts_ignores_pred(tmp_path):
    root = tmp_path / "br35h"
    files = [f"yes/y{i}.jpg" for i in range(1500)] + [f"no/no{i}.jpg" for i in range(1500)]
    files += [f"pred/pred{i}.jpg" for i in range(60)]
    build_tree(root, files)
    samples = list_samples("br35h", root)
    assert _summary(samples) == (3000, 1500, 1)
    assert not any("pred" in s.image_path.parts for s in samples)


def test_clinicdb_and_kvasir_real_counts(tmp_path):
    clinic = build_tree(
        tmp_path / "clinicdb",
        [f"images/{i}.png" for i in range(1, 613)] + [f"masks/{i}.png" for i in range(1, 613)],
    )
    samples = list_samples("clinicdb", clinic)
    assert _summary(samples) == (612, 612, 1)
    assert all(s.mask_path.stem == s.image_path.stem for s in samples)
    # Kvasir-SEG unzips to Kvasir-SEG/{images,masks}
    names = [f"cju{i:04d}" for i in range(1000)]
    kvasir = build_tree(
        tmp_path / "kvasir",
        [f"Kvasir-SEG/images/{n}.jpg" for n in names] + [f"Kvasir-SEG/masks/{n}.jpg" for n in names],
    )
    assert _summary(list_samples("kvasir", kvasir)) == (1000, 1000, 1)


def test_clinicdb_original_release_folder_names(tmp_path):
    root = build_tree(
        tmp_path / "c",
        ["CVC-ClinicDB/Original/1.tif", "CVC-ClinicDB/Ground Truth/1.tif", "CVC-ClinicDB/Original/2.tif"],
    )
    with pytest.raises(DatasetError, match=r"Original/2\.tif has no mask"):
        list_samples("clinicdb", root)
    touch(root / "CVC-ClinicDB/Ground Truth/2.tif")
    assert len(list_samples("clinicdb", root)) == 2


# ---------------------------------------------------------------------------------------------------
# MVTec family details
# ---------------------------------------------------------------------------------------------------


def test_mask_pairing_is_by_name_not_sorted_order(tmp_path):
    root = build_tree(
        tmp_path / "m",
        [
            "cat/train/good/000.png",
            "cat/test/crack/001.png",
            "cat/test/crack/003.png",
            "cat/ground_truth/crack/000_mask.png",  # orphan: sorted-order pairing would misalign
            "cat/ground_truth/crack/001_mask.png",
            "cat/ground_truth/crack/003_mask.png",
        ],
    )
    samples = list_samples("mvtec", root)
    assert [(s.image_path.name, s.mask_path.name) for s in samples] == [
        ("001.png", "001_mask.png"),
        ("003.png", "003_mask.png"),
    ]


def test_missing_mask_names_both_paths(tmp_path):
    root = fake_mvtec(tmp_path / "m", {"cat": (1, 2)})
    (root / "cat/ground_truth/scratch/001_mask.png").unlink()
    with pytest.raises(DatasetError) as err:
        list_samples("mvtec", root)
    message = str(err.value)
    assert str(root / "cat/test/scratch/001.png") in message
    assert str(root / "cat/ground_truth/scratch/001_mask.png") in message
    problems: list[str] = []
    samples = list_samples("mvtec", root, problems=problems)
    assert len(samples) == 3 and len(problems) == 1 and "001.png" in problems[0]


def test_mvtec_layout_errors(tmp_path):
    build_tree(tmp_path / "empty", ["readme.txt"])
    with pytest.raises(DatasetError, match=r"no category folder.*expected layout"):
        list_samples("mvtec", tmp_path / "empty")
    one = fake_mvtec(tmp_path / "one", {"bottle": (1, 1)})
    with pytest.raises(DatasetError, match="single category folder; pass its parent"):
        list_samples("mvtec", one / "bottle")
    with pytest.raises(DatasetError, match=r"categor.* cable not found.*available: bottle"):
        list_samples("mvtec", one, categories=["cable"])


def test_category_without_anomalies_and_non_image_files(tmp_path):
    root = fake_mvtec(tmp_path / "m", {"a": (2, 2), "b": (3, 0)})
    touch(root / "b/test/good/.DS_Store", b"x")
    touch(root / "b/test/good/notes.txt", b"x")
    samples = list_samples("mvtec", root, categories=["b"])
    assert _summary(samples) == (3, 0, 1)


def test_btad_bmp_and_png_same_stem_masks(tmp_path):
    base = tmp_path / "btad" / "BTech_Dataset_transformed"
    fake_mvtec(base, {"01": (2, 3)}, good="ok", bad=("ko",), ext=".bmp", mask_name="{stem}.png")
    fake_mvtec(base, {"02": (1, 2)}, good="ok", bad=("ko",), ext=".png", mask_name="{stem}.png")
    fake_mvtec(base, {"03": (1, 1)}, good="ok", bad=("ko",), ext=".bmp", mask_name="{stem}.bmp")
    samples = list_samples("btad", tmp_path / "btad")
    assert _summary(samples) == (10, 6, 3)
    for s in samples:
        if s.label:
            assert s.mask_path.stem == s.image_path.stem and s.mask_path.parent.name == "ko"
    assert [s.category for s in samples][0] == "01"
    assert len(list_samples("btad", base, split="train")) == 3  # the inner folder works as root too


def test_mpdd_and_dtd_synthetic(tmp_path):
    mpdd = {
        c: (3, 4)
        for c in ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")
    }
    assert _summary(list_samples("mpdd", fake_mvtec(tmp_path / "mpdd", mpdd))) == (42, 24, 6)
    dtd = {c: (2, 3) for c in dataset_info("dtd_synthetic").categories}
    root = fake_mvtec(tmp_path / "dtd", dtd, mask_name="{stem}.png")  # masks without the _mask suffix
    assert _summary(list_samples("dtd_synthetic", root)) == (60, 36, 12)


# ---------------------------------------------------------------------------------------------------
# VisA details
# ---------------------------------------------------------------------------------------------------


def test_visa_errors(tmp_path):
    root = fake_visa(tmp_path / "visa", {"candle": (2, 2)}, n_bad=2)
    (root / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DatasetError, match=r"split_csv/1cls\.csv not found.*expected layout"):
        list_samples("visa", root)
    root = fake_visa(tmp_path / "visa2", {"candle": (2, 2)}, n_bad=2)
    (root / "candle/Data/Masks/Anomaly/001.png").unlink()
    with pytest.raises(DatasetError, match=r"line \d+: anomalous image .*001\.JPG has no mask"):
        list_samples("visa", root)
    (root / "candle/Data/Images/Normal/0003.JPG").unlink()
    problems: list[str] = []
    list_samples("visa", root, problems=problems)
    assert len(problems) == 2 and "0003.JPG not found" in problems[0]


def test_visa_bad_header(tmp_path):
    build_tree(tmp_path / "v", {"split_csv/1cls.csv": b"object,split,image\ncandle,test,x.JPG\n"})
    with pytest.raises(DatasetError, match="lacks column"):
        list_samples("visa", tmp_path / "v")


# ---------------------------------------------------------------------------------------------------
# DAGM
# ---------------------------------------------------------------------------------------------------


def fake_dagm(root: Path, classes: dict[str, tuple[int, int]], labels_txt: bool = True) -> Path:
    for cls, (n_ok, n_bad) in classes.items():
        for split in ("Train", "Test"):
            rows = ["1"]
            for i in range(n_ok + n_bad):
                stem = f"{i + 1:04d}"
                touch(root / cls / split / f"{stem}.PNG")
                bad = i >= n_ok
                if bad:
                    touch(root / cls / split / "Label" / f"{stem}_label.PNG", MASK)
                rows.append(f"{i + 1}\t{int(bad)}\t{stem}.PNG\t0\t{stem + '_label.PNG' if bad else '0'}")
            if labels_txt:
                (root / cls / split / "Label").mkdir(parents=True, exist_ok=True)
                (root / cls / split / "Label" / "Labels.txt").write_text("\n".join(rows) + "\n")
    return root


def test_dagm_counts_natural_order_and_labels_txt(tmp_path):
    classes = {f"Class{i}": (5, 2) for i in range(1, 11)}
    root = fake_dagm(tmp_path / "dagm", classes)
    touch(root / "Class1_def" / "1.PNG")  # the original release's defect-only folder: not read
    test = list_samples("dagm", root)
    assert _summary(test) == (70, 20, 10)
    order = list(dict.fromkeys(s.category for s in test))
    assert order == [f"Class{i}" for i in range(1, 11)]  # Class2 before Class10
    assert all(s.mask_path.name == s.image_path.stem + "_label.PNG" for s in test if s.label)
    assert _summary(list_samples("dagm", root, split="train")) == (70, 20, 10)
    # Labels.txt says defective but the mask is gone -> error naming both
    (root / "Class3/Test/Label/0006_label.PNG").unlink()
    with pytest.raises(DatasetError, match=r"Class3/Test/0006\.PNG is flagged defective.*0006_label\.PNG"):
        list_samples("dagm", root)


def test_dagm_nested_class_folders(tmp_path):
    root = tmp_path / "dagm"
    fake_dagm(root / "Class1", {"Class1": (2, 1)}, labels_txt=False)  # Class1/Class1/Train
    assert _summary(list_samples("dagm", root)) == (3, 1, 1)
    with pytest.raises(DatasetError, match=r"pass that as the root"):
        list_samples("dagm", tmp_path)


# ---------------------------------------------------------------------------------------------------
# meta.json
# ---------------------------------------------------------------------------------------------------


def test_meta_json(tmp_path):
    root = build_tree(tmp_path / "m", ["bottle/a.png", "bottle/b.png", "bottle/b_mask.png", "brain/c.png"])
    (root / "brain" / "cls_only").mkdir()
    item = lambda img, mask, cls, sp, an: dict(  # noqa: E731
        img_path=img, mask_path=mask, cls_name=cls, specie_name=sp, anomaly=an
    )
    meta = {
        "Train": {},
        "Test": {
            "bottle": [
                item("bottle/a.png", "", "bottle", "good", 0),
                item("bottle/b.png", "bottle/b_mask.png", "bottle", "broken", 1),
            ],
            "brain": [item("brain/c.png", "brain/cls_only", "brain", "", 1)],
        },
    }
    (root / "meta.json").write_text(json.dumps(meta))
    samples = list_samples("meta_json", root)
    assert [(s.category, s.label, s.defect, s.mask_path.name if s.mask_path else None) for s in samples] == [
        ("bottle", 0, "good", None),
        ("bottle", 1, "broken", "b_mask.png"),
        ("brain", 1, "anomaly", None),  # mask_path is a folder: image-level item
    ]
    meta["Test"]["bottle"][1]["mask_path"] = "bottle/missing.png"
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"mask .*missing\.png of anomalous image .*b\.png not found"):
        list_samples("meta_json", root)
    with pytest.raises(DatasetError, match="no train images"):
        list_samples("meta_json", root, split="train")
    (root / "meta.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        list_samples("meta_json", root)


# ---------------------------------------------------------------------------------------------------
# folder (the user's own data)
# ---------------------------------------------------------------------------------------------------


def test_folder_single_category_with_and_without_masks(tmp_path):
    root = build_tree(tmp_path / "widget", ["good/1.png", "good/2.png", "dent/3.png", "scratch/4.jpg"])
    samples = list_samples("folder", root)
    assert [(s.category, s.label, s.defect) for s in samples] == [
        ("widget", 1, "dent"),
        ("widget", 0, "good"),
        ("widget", 0, "good"),
        ("widget", 1, "scratch"),
    ]
    assert all(s.mask_path is None for s in samples)  # image level only
    build_tree(root, {"ground_truth/dent/3_mask.png": MASK})
    with pytest.raises(DatasetError, match=r"scratch/4\.jpg has no mask.*all-or-nothing"):
        list_samples("folder", root)
    build_tree(root, {"ground_truth/scratch/4.png": MASK})
    masks = {s.image_path.name: s.mask_path.name for s in list_samples("folder", root) if s.label}
    assert masks == {"3.png": "3_mask.png", "4.jpg": "4.png"}
    assert {s.category for s in list_samples("folder", root, category="mine")} == {"mine"}


def test_folder_several_categories(tmp_path):
    root = build_tree(
        tmp_path / "f", ["a/ok/1.png", "a/bad/2.png", "b/ok/3.png", "b/bad/4.png", "b/bad/5.png"]
    )
    with pytest.raises(DatasetError, match="no good/ folder"):
        list_samples("folder", root)
    samples = list_samples("folder", root, good_dir="ok")
    assert _summary(samples) == (5, 3, 2)
    assert len(list_samples("folder", root, categories=["b"], good_dir="ok")) == 3


# ---------------------------------------------------------------------------------------------------
# synthetic reader on a hand-made set root
# ---------------------------------------------------------------------------------------------------


def test_synthetic_reader_wants_a_set_root(tmp_path):
    fake_mvtec(tmp_path / "synthetic" / "set_a", {"brick": (1, 1)})
    touch(tmp_path / "synthetic" / "set_a" / ".feclip_synthetic.json", b"{}")
    with pytest.raises(DatasetError, match=r"pass one set root"):
        list_samples("synthetic", tmp_path / "synthetic")
    assert _summary(list_samples("synthetic", tmp_path / "synthetic" / "set_a")) == (2, 1, 1)


def test_readers_never_decode(tmp_path):
    """A listing only checks existence; a corrupt file is caught when it is first read."""
    root = fake_mvtec(tmp_path / "m", {"cat": (1, 1)})
    (root / "cat/test/good/000.png").write_bytes(b"not a png")
    assert len(list_samples("mvtec", root)) == 2
    arr = np.asarray(Image.open(root / "cat/ground_truth/crack/000_mask.png"))
    assert arr.max() == 255

"""``feclip.data.validate``: the checks a run makes on its targets, training set and few-shot pool before
training, and ``feclip-data check`` agreeing with them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feclip.apps.data import main
from feclip.data import Sample, list_samples
from feclip.data.check import check_dataset
from feclip.data.validate import check_fewshot, check_target, check_train
from feclip.errors import ConfigError, DatasetError


def _encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


IMG = _encode(np.full((8, 8, 3), 90, np.uint8))
NOISE = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
BIG = _encode(NOISE)  # big enough that its first half holds the whole header
JPG = _encode(NOISE, "JPEG")
MASK = _encode(np.pad(np.full((2, 2), 255, np.uint8), 3))


def put(path: Path, data: bytes = IMG) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def normal(tmp: Path, name: str, category: str = "c", data: bytes = IMG) -> Sample:
    return Sample(put(tmp / category / f"{name}.png", data), None, 0, category, "good")


def bad(tmp: Path, name: str, category: str = "c", mask: bytes | None = MASK, data: bytes = IMG) -> Sample:
    image = put(tmp / category / f"{name}.png", data)
    mask_path = put(tmp / category / f"{name}_mask.png", mask) if mask is not None else None
    return Sample(image, mask_path, 1, category, "crack")


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------
# check_target: listing rules
# ---------------------------------------------------------------------------------------------------


def test_valid_target_passes(tmp_path):
    samples = [normal(tmp_path, "n0"), normal(tmp_path, "n1"), bad(tmp_path, "b0"), bad(tmp_path, "b1")]
    assert check_target("mvtec", samples) == []


def test_category_without_anomalies_is_an_error(tmp_path):
    samples = [normal(tmp_path, "n0"), bad(tmp_path, "b0"), normal(tmp_path, "x", category="only_good")]
    with pytest.raises(DatasetError) as err:
        check_target("mvtec", samples)
    message = one_line(err)
    assert message.startswith("mvtec: category 'only_good' has no anomalous images (1 normal)")
    assert "image AUROC" in message and "undefined" in message


def test_all_abnormal_category_with_masks_is_a_warning(tmp_path):
    # CVC-ClinicDB / Kvasir: every image abnormal, pixel metrics still defined
    warnings = check_target("clinicdb", [bad(tmp_path, "b0", category="colon"), bad(tmp_path, "b1", "colon")])
    assert len(warnings) == 1 and "'colon' has no normal images" in warnings[0] and "nan" in warnings[0]


def test_all_abnormal_category_without_masks_is_an_error(tmp_path):
    samples = [bad(tmp_path, "b0", mask=None), bad(tmp_path, "b1", mask=None)]
    with pytest.raises(DatasetError, match=r"folder: category 'c' has no normal images and no pixel masks"):
        check_target("folder", samples)


def test_image_level_dataset_is_fine(tmp_path):
    samples = [normal(tmp_path, "n0", "brain"), bad(tmp_path, "b0", "brain", mask=None)]
    assert check_target("br35h", samples) == []  # image level by design: nothing to say
    warnings = check_target("folder", samples)  # a user's folder without masks: say so
    assert len(warnings) == 1 and "no pixel masks in category brain" in warnings[0]


def test_mixed_masks_is_an_error_like_anomaly_dataset(tmp_path):
    from feclip.data import AnomalyDataset

    samples = [normal(tmp_path, "n0"), bad(tmp_path, "b0"), bad(tmp_path, "b1", mask=None)]
    with pytest.raises(DatasetError) as err:
        check_target("meta_json", samples)
    message = one_line(err)
    assert "category 'c' mixes anomalous images with masks" in message and "b1.png" in message
    with pytest.raises(DatasetError, match="mixes anomalous images"):
        AnomalyDataset(samples, 8)  # the same rule, later
    # categories that are wholly image-level next to ones with masks: fine, but micro has no pixel rows
    other = [normal(tmp_path, "n", "img_only"), bad(tmp_path, "b", "img_only", mask=None)]
    warnings = check_target("meta_json", samples[:2] + other)
    assert any("__micro__" in w for w in warnings)


def test_duplicate_image_is_an_error(tmp_path):
    samples = [normal(tmp_path, "n0"), bad(tmp_path, "b0")]
    with pytest.raises(DatasetError, match=r"n0\.png is listed 2 times"):
        check_target("meta_json", samples + samples[:1])


def test_empty_listing(tmp_path):
    with pytest.raises(DatasetError, match="no images"):
        check_target("mvtec", [])


# ---------------------------------------------------------------------------------------------------
# check_target: file headers
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, needle",
    [
        (b"", "is an empty file (0 bytes)"),
        (b"just some text, not an image", "is not a readable image"),
        (BIG[: len(BIG) // 2], "cannot be decoded"),  # truncated PNG: header fine, data cut
        (BIG[:20], "truncated"),  # truncated inside the header
        (JPG[: len(JPG) // 2], "cannot be decoded"),  # truncated JPEG
    ],
)
def test_bad_image_file_is_named(tmp_path, data, needle):
    broken = normal(tmp_path, "broken", data=data)
    samples = [normal(tmp_path, "n0"), bad(tmp_path, "b0"), broken]
    with pytest.raises(DatasetError) as err:
        check_target("mvtec", samples)
    message = one_line(err)
    assert message.startswith("mvtec: category 'c': image ") and str(broken.image_path) in message
    assert needle in message
    assert check_target("mvtec", samples, decode_headers=False) == []  # the listing rules alone


def test_bad_mask_and_size_mismatch_are_named(tmp_path):
    ok = [normal(tmp_path, "n0"), bad(tmp_path, "b0")]
    broken = bad(tmp_path, "b1", mask=b"")
    with pytest.raises(DatasetError, match=r"mask .*b1_mask\.png is an empty file"):
        check_target("mvtec", ok + [broken])
    other = bad(tmp_path, "b2", mask=_encode(np.zeros((4, 6), np.uint8)))
    with pytest.raises(DatasetError) as err:
        check_target("mvtec", ok + [other])
    message = one_line(err)
    assert "b2_mask.png is 4x6 (HxW) but its image" in message and "b2.png is 8x8" in message


def test_complete_files_without_end_marker_are_accepted(tmp_path):
    # some writers omit the PNG IEND chunk or add bytes after the JPEG end marker: decoded to decide
    no_iend = normal(tmp_path, "no_iend", data=IMG[:-12])
    trailing = Sample(put(tmp_path / "c" / "t.jpg", JPG + b"\0" * 200), None, 0, "c", "good")
    assert check_target("mvtec", [no_iend, trailing, bad(tmp_path, "b0")]) == []


def test_several_problems_one_line_with_count(tmp_path):
    samples = [normal(tmp_path, f"e{i}", data=b"") for i in range(3)] + [bad(tmp_path, "b0")]
    with pytest.raises(DatasetError) as err:
        check_target("mvtec", samples)
    message = one_line(err)
    assert "e0.png" in message and "and 2 more problems" in message and "feclip-data check" in message


def test_one_size_per_category(tmp_path):
    big = Sample(
        put(tmp_path / "c" / "big.png", _encode(np.zeros((10, 10, 3), np.uint8))), None, 0, "c", "good"
    )
    samples = [big, bad(tmp_path, "b0")]
    assert check_target("mvtec", samples) == []
    with pytest.raises(DatasetError, match=r"category 'c' holds images of 2 sizes.*eval\.resolution=input"):
        check_target("mvtec", samples, one_size_per_category=True)


def test_many_headers_are_read_in_threads(tmp_path):
    samples = [normal(tmp_path, f"n{i}") for i in range(150)] + [bad(tmp_path, f"b{i}") for i in range(50)]
    assert check_target("mvtec", samples) == []


# ---------------------------------------------------------------------------------------------------
# check_train
# ---------------------------------------------------------------------------------------------------


def test_check_train(tmp_path):
    good = [normal(tmp_path, "n0"), bad(tmp_path, "b0")]
    assert check_train("mvtec", good) == []
    with pytest.raises(DatasetError, match=r"mvtec: the training set has no anomalous images.*split=test"):
        check_train("mvtec", [normal(tmp_path, "n1")])
    with pytest.raises(DatasetError) as err:
        check_train("br35h", good + [bad(tmp_path, "b1", category="brain", mask=None)])
    message = one_line(err)
    assert "1 of 2 anomalous training images have no pixel mask" in message and "b1.png" in message
    warnings = check_train("clinicdb", [bad(tmp_path, "b2")])
    assert len(warnings) == 1 and "no normal images" in warnings[0]
    with pytest.raises(DatasetError, match=r"image .*broken\.png is an empty file"):
        check_train("mvtec", good + [normal(tmp_path, "broken", data=b"")])
    assert check_train("mvtec", good + [normal(tmp_path, "broken", data=b"")], decode_headers=False) == []


# ---------------------------------------------------------------------------------------------------
# check_fewshot
# ---------------------------------------------------------------------------------------------------


def test_check_fewshot(tmp_path):
    pool = [normal(tmp_path, f"a{i}", "a") for i in range(3)] + [normal(tmp_path, "b0", "b")]
    pool.append(bad(tmp_path, "bb", "b"))  # anomalous images are not references
    assert check_fewshot("mvtec", pool, ["a"], 2) == []
    warnings = check_fewshot("mvtec", pool, ["a", "b"], 1)
    assert len(warnings) == 1 and "'b' has exactly k=1" in warnings[0]
    with pytest.raises(DatasetError) as err:
        check_fewshot("mvtec", pool, ["a", "b", "c"], 2)
    message = one_line(err)
    assert "k=2 needs 2 normal training images per category" in message and "b (1), c (0)" in message
    with pytest.raises(DatasetError, match="train split is empty or absent"):
        check_fewshot("visa", [], ["a"], 1)
    for k in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="positive int"):
            check_fewshot("mvtec", pool, ["a"], k)


def test_check_fewshot_matches_pick_reference_samples(tmp_path):
    from feclip.models.fewshot import pick_reference_samples

    pool = [normal(tmp_path, f"a{i}", "a") for i in range(2)]
    for k in (1, 2, 3):
        try:
            check_fewshot("x", pool, ["a"], k)
            ok = True
        except DatasetError:
            ok = False
        try:
            pick_reference_samples(pool, k, 0, "a")
            picked = True
        except DatasetError:
            picked = False
        assert ok == picked, k


# ---------------------------------------------------------------------------------------------------
# feclip-data check agrees with check_target
# ---------------------------------------------------------------------------------------------------


def _mvtec(root: Path, categories: dict[str, tuple[int, int]]) -> Path:
    for cat, (n_good, n_bad) in categories.items():
        put(root / cat / "train" / "good" / "000.png")
        for i in range(n_good):
            put(root / cat / "test" / "good" / f"{i:03d}.png")
        for i in range(n_bad):
            put(root / cat / "test" / "crack" / f"{i:03d}.png")
            put(root / cat / "ground_truth" / "crack" / f"{i:03d}_mask.png", MASK)
    return root


def _meta(root: Path, test: dict[str, list[tuple[str, int, str]]], train: bool = True) -> Path:
    meta: dict = {"test": {}}
    if train:
        meta["train"] = {c: [] for c in test}
    for cls, items in test.items():
        meta["test"][cls] = []
        for img, anomaly, mask in items:
            put(root / img)
            if mask:
                put(root / mask, MASK)
            meta["test"][cls].append(
                {"img_path": img, "mask_path": mask, "cls_name": cls, "specie_name": "", "anomaly": anomaly}
            )
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize(
    "case, needle",
    [
        ("only_normal", "has no anomalous images"),
        ("empty_category", "has no test images"),
        ("mixed_masks", "mixes anomalous images with masks"),
        ("truncated", "cannot be decoded"),
        ("ok", None),
    ],
)
def test_check_command_agrees_with_check_target(tmp_path, case, needle, capsys):
    if case in ("only_normal", "ok"):
        root = _mvtec(tmp_path / "m", {"a": (2, 2), "b": (2, 0 if case == "only_normal" else 1)})
        name = "mvtec"
    elif case == "empty_category":
        root = _mvtec(tmp_path / "m", {"a": (2, 2), "b": (0, 0)})
        (root / "b" / "test").mkdir(parents=True)
        name = "mvtec"
    elif case == "mixed_masks":
        items = [("a/0.png", 0, ""), ("a/1.png", 1, "a/1_mask.png"), ("a/2.png", 1, "")]
        root, name = _meta(tmp_path / "j", {"a": items}, train=False), "meta_json"
    else:
        root = _mvtec(tmp_path / "m", {"a": (2, 2)})
        put(root / "a" / "test" / "crack" / "001.png", BIG[: len(BIG) // 2])
        name = "mvtec"

    report = check_dataset(name, root)
    try:
        check_target(name, list_samples(name, root, "test"))
        run_error = None
    except DatasetError as err:
        run_error = str(err)
    if needle is None:
        assert run_error is None and report.errors == []
        assert main(["check", str(root), "--dataset", name]) == 0
    else:
        assert run_error is not None and needle in run_error
        assert any(needle in e for e in report.errors), report.errors
        assert main(["check", str(root), "--dataset", name]) == 1
        assert "FAILED" in capsys.readouterr().out


def test_meta_json_with_only_a_test_key_is_accepted(tmp_path, capsys):
    items = [("a/0.png", 0, ""), ("a/1.png", 1, "a/1_mask.png")]
    root = _meta(tmp_path / "j", {"a": items}, train=False)
    report = check_dataset("meta_json", root)
    assert report.errors == [] and any("no train split" in n for n in report.notes)
    assert main(["check", str(root), "--dataset", "meta_json"]) == 0
    out = capsys.readouterr().out
    assert "OK: no errors" in out and "notes (1)" in out
    assert len(list_samples("meta_json", root)) == 2
    with pytest.raises(DatasetError, match=r"has no 'train' key \(keys: test\)"):
        list_samples("meta_json", root, split="train")

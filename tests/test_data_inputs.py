"""Bad (and unusual but valid) user inputs: each gives one clear line naming the file or field, or the
correct result. Image formats, masks, meta.json types, VisA csv, folder layouts, reader options."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feclip.apps.data import main
from feclip.data import DATASETS, AnomalyDataset, Sample, dataset_info, list_samples
from feclip.data.check import check_dataset
from feclip.data.transforms import load_mask, load_rgb
from feclip.errors import ConfigError, DatasetError, FEClipError

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8)


def encode(img: Image.Image | np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


PNG = encode(RGB)
JPG = encode(RGB, "JPEG", quality=95)
MASK = encode(np.pad(np.full((2, 2), 255, np.uint8), ((4, 4), (5, 5))))  # 10x12


def put(path: Path, data: bytes = PNG) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def png16_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def single_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ---------------------------------------------------------------------------------------------------
# Images: unreadable files name the file, unusual modes load correctly
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, needle",
    [
        (b"", "empty file (0 bytes)"),
        (PNG[: len(PNG) // 2], "truncated"),
        (JPG[: len(JPG) // 2], "truncated"),
        (b"a text file named like an image\n", "not a readable image"),
        (None, "is a folder"),
    ],
    ids=["zero_byte", "truncated_png", "truncated_jpeg", "text_file", "folder"],
)
def test_dataset_decode_failure_names_the_file(tmp_path, data, needle):
    path = tmp_path / "img.png"
    if data is None:
        path.mkdir()
    else:
        put(path, data)
    for run in (lambda ds: ds[0], lambda ds: ds.preload(num_threads=2)):
        ds = AnomalyDataset([Sample(path, None, 0, "c", "good")], 8)
        with pytest.raises(DatasetError) as err:
            run(ds)
        message = single_line(err)
        assert str(path) in message and needle in message
    # the same file as a mask: named as the mask
    mask_path = tmp_path / "m" / "img_mask.png"
    if data is None:
        mask_path.mkdir(parents=True)
    else:
        put(mask_path, data)
    ds = AnomalyDataset([Sample(put(tmp_path / "ok.png"), mask_path, 1, "c", "bad")], 8)
    with pytest.raises(DatasetError, match=r"^mask .*img_mask\.png"):
        ds[0]


def test_mask_size_differs_from_image(tmp_path):
    image = put(tmp_path / "img.png")
    mask = put(tmp_path / "img_mask.png", encode(np.zeros((5, 5), np.uint8)))
    ds = AnomalyDataset([Sample(image, mask, 1, "c", "bad")], 8)
    with pytest.raises(DatasetError) as err:
        ds[0]
    message = single_line(err)
    assert str(mask) in message and "5x5" in message and str(image) in message and "10x12" in message


def _modes() -> dict[str, tuple[bytes, np.ndarray]]:
    """file bytes -> the RGB array they must load as."""
    img = Image.fromarray(RGB)
    gray16 = (np.arange(120, dtype=np.uint16).reshape(10, 12) * 550).astype(np.uint16)
    rgb16 = RNG.integers(0, 65536, (10, 12, 3)).astype(np.uint16)
    rgba = np.dstack([RGB, RNG.integers(0, 256, (10, 12), dtype=np.uint8)])
    pal_t = img.convert("P")
    pal_t.info["transparency"] = 0
    cases = {
        "gray_L": (encode(img.convert("L")), np.asarray(img.convert("L").convert("RGB"))),
        "gray16": (encode(gray16), np.repeat(np.round(gray16 / 257).astype(np.uint8)[..., None], 3, 2)),
        "rgb16": (png16_rgb(rgb16), (rgb16 >> 8).astype(np.uint8)),
        "rgba": (encode(rgba), RGB),
        "palette": (encode(img.convert("P")), np.asarray(img.convert("P").convert("RGB"))),
        "palette_transparency": (encode(pal_t), np.asarray(pal_t.convert("RGB"))),
        "la": (encode(img.convert("LA")), np.asarray(img.convert("L").convert("RGB"))),
        "bilevel": (encode(img.convert("1")), np.asarray(img.convert("1").convert("RGB"))),
        "cmyk_tiff": (encode(img.convert("CMYK"), "TIFF"), RGB),
        "bmp": (encode(img, "BMP"), RGB),
    }
    return cases


@pytest.mark.parametrize("mode", list(_modes()))
def test_valid_image_modes_load_correctly(tmp_path, mode):
    data, expected = _modes()[mode]
    path = put(tmp_path / f"img.{'tif' if 'tiff' in mode else 'bmp' if mode == 'bmp' else 'png'}", data)
    arr = load_rgb(path)
    assert arr.dtype == np.uint8 and arr.shape == (10, 12, 3)
    assert np.array_equal(arr, expected), mode
    item = AnomalyDataset([Sample(path, None, 0, "c", "good")], 8)[0]
    assert item["image"].shape == (3, 8, 8) and item["original_size"].tolist() == [10, 12]


def test_cmyk_jpeg_loads(tmp_path):
    path = put(tmp_path / "cmyk.jpg", encode(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=100))
    arr = load_rgb(path)
    assert arr.shape == (10, 12, 3) and np.abs(arr.astype(int) - RGB).mean() < 12


@pytest.mark.parametrize(
    "name, mask",
    [
        ("levels", np.array([[0, 37, 200]], np.uint8).repeat(2, 0)),
        ("jpeg_like_noise", np.array([[0, 1, 3, 254, 255, 2]], np.uint8)),
        ("sixteen_bit", np.array([[0, 300, 65535]], np.uint16)),
    ],
)
def test_non_binary_masks_are_binarised(tmp_path, name, mask):
    path = put(tmp_path / f"{name}.png", encode(mask))
    binary = load_mask(path)
    assert binary.dtype == bool and np.array_equal(binary, mask > 0)
    if name == "jpeg_like_noise":
        assert np.array_equal(load_mask(path, threshold=127), mask > 127)
    image = put(tmp_path / f"{name}_img.png", encode(np.zeros((*mask.shape, 3), np.uint8)))
    ds = AnomalyDataset([Sample(image, path, 1, "c", "bad")], mask.shape[1])
    assert set(np.unique(ds.original_mask(0))) <= {0, 1}


def test_colour_and_palette_masks(tmp_path):
    m = np.zeros((6, 6), np.uint8)
    m[1:3, 1:3] = 1
    red = np.zeros((6, 6, 3), np.uint8)
    red[m > 0] = (255, 0, 0)
    pal = Image.fromarray(m, mode="L").convert("P")
    for name, data in (("red", encode(red)), ("pal", encode(pal)), ("bw", encode(Image.fromarray(m > 0)))):
        assert np.array_equal(load_mask(put(tmp_path / f"{name}.png", data)), m > 0), name


# ---------------------------------------------------------------------------------------------------
# Dataset roots and layouts
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DATASETS)
def test_root_that_is_a_file(tmp_path, name):
    root = put(tmp_path / "data.zip", b"PK")
    with pytest.raises(DatasetError) as err:
        list_samples(name, root, split=dataset_info(name).splits[0])
    message = single_line(err)
    assert str(root) in message and "is not a folder" in message


def test_mvtec_category_with_empty_test_folder(tmp_path):
    root = tmp_path / "m"
    put(root / "a" / "train" / "good" / "0.png")
    put(root / "a" / "test" / "good" / "0.png")
    put(root / "a" / "test" / "crack" / "0.png")
    put(root / "a" / "ground_truth" / "crack" / "0_mask.png", MASK)
    put(root / "b" / "train" / "good" / "0.png")
    (root / "b" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError) as err:
        list_samples("mvtec", root)
    message = single_line(err)
    assert "mvtec: category 'b' has no test images" in message and str(root / "b" / "test") in message
    assert len(list_samples("mvtec", root, categories="a")) == 2  # leaving it out works


def test_folder_without_good_dir(tmp_path):
    root = tmp_path / "widget"
    put(root / "dent" / "1.png")
    with pytest.raises(DatasetError) as err:
        list_samples("folder", root)
    message = single_line(err)
    assert "no good/ folder" in message and str(root) in message
    assert len(list_samples("folder", root / "..", categories=["widget"], good_dir="dent")) == 1


def test_folder_notes_ignored_files(tmp_path, capsys):
    root = tmp_path / "f"
    put(root / "a" / "good" / "1.png")
    put(root / "a" / "bad" / "2.png")
    put(root / "a" / "loose.png")
    put(root / "b" / "ok" / "3.png")  # no good/: not a category
    report = check_dataset("folder", root)
    notes = "\n".join(report.warnings)
    assert "loose.png" in notes and "ignored" in notes and str(root / "b") in notes
    assert main(["check", str(root), "--dataset", "folder"]) == 0


def test_visa_csv_problems(tmp_path):
    root = tmp_path / "visa"
    put(root / "candle" / "Data" / "Images" / "Normal" / "0.JPG", JPG)
    put(root / "candle" / "Data" / "Images" / "Anomaly" / "0.JPG", JPG)
    put(root / "candle" / "Data" / "Masks" / "Anomaly" / "0.png", MASK)
    csv_path = root / "split_csv" / "1cls.csv"
    header = "object,split,label,image,mask\n"
    rows = [
        "candle,test,normal,candle/Data/Images/Normal/0.JPG,\n",
        "candle,test,anomaly,candle/Data/Images/Anomaly/0.JPG,candle/Data/Masks/Anomaly/0.png\n",
    ]
    put(csv_path, (header + "".join(rows)).encode())
    assert len(list_samples("visa", root)) == 2
    # a row naming a missing file: the csv line and the path
    put(csv_path, (header + "".join(rows) + "candle,test,normal,candle/Data/Images/Normal/9.JPG,\n").encode())
    with pytest.raises(DatasetError) as err:
        list_samples("visa", root)
    message = single_line(err)
    assert "1cls.csv line 4" in message and "9.JPG not found" in message
    # a missing column
    put(csv_path, b"object,split,image,mask\ncandle,test,x.JPG,\n")
    with pytest.raises(DatasetError, match=r"1cls\.csv lacks column\(s\) label"):
        list_samples("visa", root)
    # not text at all
    put(csv_path, b"\xff\xfe\x00\x81\x82garbage\x00")
    with pytest.raises(DatasetError, match=r"1cls\.csv is not a readable csv file"):
        list_samples("visa", root)
    # short rows: missing cells are empty, reported by line
    put(csv_path, (header + "candle,test\n").encode())
    with pytest.raises(DatasetError, match=r"line 2: label '' is neither"):
        list_samples("visa", root)
    # a category with train rows only: no test images
    put(csv_path, (header + "".join(rows) + "pcb1,train,normal,candle/Data/Images/Normal/0.JPG,\n").encode())
    with pytest.raises(DatasetError, match=r"visa: category 'pcb1' has no test images"):
        list_samples("visa", root)
    assert len(list_samples("visa", root, categories=["candle"])) == 2


# ---------------------------------------------------------------------------------------------------
# meta.json with wrong types
# ---------------------------------------------------------------------------------------------------


def _item(**kw):
    item = {"img_path": "a/0.png", "mask_path": "", "cls_name": "a", "specie_name": "", "anomaly": 0}
    item.update(kw)
    return {k: v for k, v in item.items() if v is not ...}


@pytest.mark.parametrize(
    "meta, needle",
    [
        ([1, 2], "holds a JSON list, not an object"),
        ({"test": [_item()]}, "'test' holds a JSON list, not an object of class"),
        ({"test": {"a": _item()}}, "[test][a] holds a JSON dict, not a list"),
        ({"test": {"a": ["a/0.png"]}}, "[test][a][0]: the item is a JSON str, not an object"),
        ({"test": {"a": [_item(anomaly="yes")]}}, "'anomaly' is 'yes', expected 0 or 1"),
        ({"test": {"a": [_item(anomaly=1.5)]}}, "'anomaly' is 1.5, expected 0 or 1"),
        ({"test": {"a": [_item(anomaly=None)]}}, "'anomaly' is None"),
        ({"test": {"a": [_item(img_path=...)]}}, "the item lacks 'img_path'"),
        ({"test": {"a": [_item(img_path=None)]}}, "'img_path' is None, expected a path"),
        ({"test": {"a": [_item(img_path="")]}}, "'img_path' is '', expected a path"),
        ({"test": {"a": [_item(anomaly=1, mask_path=3)]}}, "'mask_path' is 3"),
        ({"test": {"a": []}}, "category 'a' has no test images"),
        ({"train": {"a": [_item()]}}, "has no 'test' key (keys: train)"),
    ],
)
def test_meta_json_wrong_types(tmp_path, meta, needle):
    root = tmp_path / "j"
    put(root / "a" / "0.png")
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError) as err:
        list_samples("meta_json", root)
    message = single_line(err)
    assert needle in message and "meta" in message


def test_meta_json_lenient_values(tmp_path):
    root = tmp_path / "j"
    put(root / "a" / "0.png")
    put(root / "a" / "1.png")
    put(root / "a" / "1_mask.png", MASK)
    items = [_item(anomaly="0"), _item(img_path="a/1.png", anomaly=True, mask_path="a/1_mask.png")]
    items[0]["mask_path"] = None
    (root / "meta.json").write_text(json.dumps({"test": {"a": items}}))
    samples = list_samples("meta_json", root)
    assert [(s.label, s.mask_path is not None) for s in samples] == [(0, False), (1, True)]


# ---------------------------------------------------------------------------------------------------
# Reader options
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DATASETS)
def test_unknown_option_names_option_reader_and_accepted(tmp_path, name):
    with pytest.raises(ConfigError) as err:
        list_samples(name, tmp_path, split=dataset_info(name).splits[0], colour="blue")
    message = single_line(err)
    assert message.startswith(f"{name}: unknown reader option colour; the {name} reader accepts")
    accepted = dataset_info(name).options
    assert (", ".join(accepted) in message) if accepted else ("accepts no options" in message)


@pytest.mark.parametrize(
    "name, key, value",
    [
        ("folder", "good_dir", 0),
        ("folder", "category", None),
        ("visa", "split_file", 2),
        ("meta_json", "meta_file", ["meta.json"]),
        ("folder", "good_dir", ""),
    ],
)
def test_option_of_wrong_type(tmp_path, name, key, value):
    with pytest.raises(ConfigError) as err:
        list_samples(name, tmp_path, **{key: value})
    message = single_line(err)
    assert f"reader option {key} must be a non-empty string" in message and repr(value) in message


@pytest.mark.parametrize("categories", [5, 1.5, {"a": 1}, [None], [["a"]]])
def test_categories_of_wrong_type(tmp_path, categories):
    with pytest.raises(ConfigError, match="categories must be"):
        list_samples("mvtec", tmp_path, categories=categories)


def test_check_command_option_errors_are_one_line(tmp_path, capsys):
    code = main(["check", str(tmp_path), "--dataset", "mvtec", "--option", "good_dir=ok"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "unknown reader option good_dir; the mvtec reader accepts no options" in err


def test_every_error_is_a_feclip_error(tmp_path):
    """The readers raise nothing else for the inputs above (a traceback would mean a bug)."""
    put(tmp_path / "meta.json", b"[]")
    for name in DATASETS:
        with pytest.raises(FEClipError):
            list_samples(name, tmp_path, split=dataset_info(name).splits[0])

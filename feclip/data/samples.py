"""The :class:`Sample` record, the readers registry and :func:`list_samples`.

A *reader* turns one on-disk dataset layout into a sorted ``list[Sample]``. Readers never decode
images; they check that every listed file exists and that every anomalous image of a pixel-level
dataset has its mask (paired by name, never by sorted order). Problems are raised as
:class:`feclip.errors.DatasetError` naming the path and the expected layout, so a bad dataset fails
when it is listed, not deep inside a training epoch. Nothing is silently skipped.

Every listing is sorted: categories in natural order (``Class2`` before ``Class10``), then image paths.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from feclip.errors import ConfigError, DatasetError

__all__ = [
    "DATASETS",
    "DEFAULT_DIRS",
    "IMAGE_EXTENSIONS",
    "DatasetInfo",
    "EmptyDatasetError",
    "OfficialCounts",
    "Sample",
    "dataset_info",
    "list_samples",
]

#: Every dataset name :func:`list_samples` accepts.
DATASETS: tuple[str, ...] = (
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

#: Default folder of each benchmark under ``DATA_ROOT`` (``$DATA_ROOT/<dir>`` is the root given to the
#: reader). ``synthetic`` holds two set roots, ``synthetic/set_a`` and ``synthetic/set_b``; the reader
#: takes one set root. ``meta_json`` and ``folder`` point at the user's own data and have no default.
DEFAULT_DIRS: dict[str, str] = {
    "mvtec": "mvtec",
    "visa": "visa",
    "btad": "btad",
    "mpdd": "mpdd",
    "dtd_synthetic": "dtd_synthetic",
    "dagm": "dagm",
    "brainmri": "brainmri",
    "br35h": "br35h",
    "clinicdb": "clinicdb",
    "kvasir": "kvasir",
    "synthetic": "synthetic",
}

#: File suffixes (lower case) treated as images; anything else in an image folder is ignored.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

#: Reader options that change how masks are binarised, not what is listed. :func:`list_samples` applies
#: them itself (every listed :class:`Sample` carries the value), so readers never see them.
MASK_OPTIONS: tuple[str, ...] = ("mask_threshold",)


class EmptyDatasetError(DatasetError):
    """The layout is right but the requested split (and categories) holds no image."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    Attributes:
        image_path: the image file.
        mask_path: its ground-truth mask (any non-zero pixel is anomalous), or None: a normal image
            (all-zero mask) or an anomalous image of an image-level-only dataset.
        label: 0 normal, 1 anomalous.
        category: the sub-dataset (MVTec "bottle", VisA "pcb1", BrainMRI "brain", ...).
        defect: the defect folder name (``"good"`` for normal images).
        mask_threshold: a mask pixel is anomalous when its gray value is ``> mask_threshold`` (0 by
            default: any non-zero pixel; 127 for JPEG masks such as Kvasir-SEG's). Set by the reader
            option ``mask_threshold`` of the datasets that accept it.
    """

    image_path: Path
    mask_path: Path | None
    label: int
    category: str
    defect: str
    mask_threshold: int = 0

    @property
    def has_pixel_gt(self) -> bool:
        """True when the pixel ground truth is known: a normal image, or an anomalous one with a mask."""
        return self.label == 0 or self.mask_path is not None


@dataclass(frozen=True)
class OfficialCounts:
    """Published test-split counts of a benchmark, which ``feclip-data check`` compares with the files.

    Attributes:
        normal: normal test images in all.
        anomalous: anomalous test images in all.
        per_category: ``(category, normal, anomalous)`` per category where published, else empty.
        source: where the numbers come from (the dataset's paper or page, or a third-party table).
    """

    normal: int
    anomalous: int
    per_category: tuple[tuple[str, int, int], ...] = ()
    source: str = ""

    @property
    def images(self) -> int:
        """Test images in all."""
        return self.normal + self.anomalous

    def category(self, name: str) -> tuple[int, int] | None:
        """(normal, anomalous) of one category, or None when not published."""
        for category, normal, anomalous in self.per_category:
            if category == name:
                return normal, anomalous
        return None


@dataclass(frozen=True)
class DatasetInfo:
    """What the registry knows about one dataset name.

    Attributes:
        name: the dataset name.
        module: the reader module under :mod:`feclip.data`.
        function: the reader function in it:
            ``f(root: Path, split: str, categories: list[str] | None, problems: list[str] | None, **options)``.
        splits: the splits the layout has.
        pixel_masks: True for pixel-level ground truth, False for image-level only, None when it depends
            on the files (``folder``, ``meta_json``).
        categories: the official category names, empty when open-ended (synthetic, meta_json, folder).
        layout: the expected on-disk layout, one line, quoted in error messages.
        mask_files: name of a function ``f(root, **options) -> list[Path]`` in ``module`` returning every
            mask file on disk (for the masks-without-images check), or None.
        notes: name of a function ``f(root, **options) -> list[str]`` in ``module`` remarking on ignored
            folders, or None.
        options: the reader options the reader accepts (each a string; ``mask_threshold`` also an
            int); any other option is a :class:`ConfigError` naming it and these.
        test_counts: the published counts of the test split (default options), or None when unknown.
    """

    name: str
    module: str
    function: str
    splits: tuple[str, ...]
    pixel_masks: bool | None
    categories: tuple[str, ...]
    layout: str
    mask_files: str | None = None
    notes: str | None = None
    options: tuple[str, ...] = ()
    test_counts: OfficialCounts | None = None


MVTEC_CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
VISA_CATEGORIES = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)
MPDD_CATEGORIES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")
DTD_CATEGORIES = (
    "Blotchy_099",
    "Fibrous_183",
    "Marbled_078",
    "Matted_069",
    "Mesh_114",
    "Perforated_037",
    "Stratified_154",
    "Woven_001",
    "Woven_068",
    "Woven_104",
    "Woven_125",
    "Woven_127",
)

# Published test-split counts, (category, normal, anomalous). MVTec AD: the dataset paper's table
# (Bergmann et al., CVPR 2019), 1,725 = 467 + 1,258. VisA: the official split_csv/1cls.csv (100
# anomalous images per category), 2,162 = 962 + 1,200.
MVTEC_TEST_COUNTS = OfficialCounts(
    467,
    1258,
    (
        ("bottle", 20, 63),
        ("cable", 58, 92),
        ("capsule", 23, 109),
        ("carpet", 28, 89),
        ("grid", 21, 57),
        ("hazelnut", 40, 70),
        ("leather", 32, 92),
        ("metal_nut", 22, 93),
        ("pill", 26, 141),
        ("screw", 41, 119),
        ("tile", 33, 84),
        ("toothbrush", 12, 30),
        ("transistor", 60, 40),
        ("wood", 19, 60),
        ("zipper", 32, 119),
    ),
    "MVTec AD paper (Bergmann et al., CVPR 2019)",
)
VISA_TEST_COUNTS = OfficialCounts(
    962,
    1200,
    (
        ("candle", 100, 100),
        ("capsules", 60, 100),
        ("cashew", 50, 100),
        ("chewinggum", 50, 100),
        ("fryum", 50, 100),
        ("macaroni1", 100, 100),
        ("macaroni2", 100, 100),
        ("pcb1", 100, 100),
        ("pcb2", 100, 100),
        ("pcb3", 101, 100),
        ("pcb4", 101, 100),
        ("pipe_fryum", 50, 100),
    ),
    "the official split_csv/1cls.csv (amazon-science/spot-diff)",
)

_MVTEC_LAYOUT = (
    "<root>/<category>/{train/good, test/good, test/<defect>}/*.png and "
    "<root>/<category>/ground_truth/<defect>/<stem>_mask.png"
)

_REGISTRY: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "mvtec",
            "mvtec",
            "list_mvtec",
            ("train", "test"),
            True,
            MVTEC_CATEGORIES,
            _MVTEC_LAYOUT,
            "mask_files",
            test_counts=MVTEC_TEST_COUNTS,
        ),
        DatasetInfo(
            "visa",
            "visa",
            "list_visa",
            ("train", "test"),
            True,
            VISA_CATEGORIES,
            "<root>/split_csv/1cls.csv (columns object,split,label,image,mask) and "
            "<root>/<category>/Data/{Images/{Normal,Anomaly}/*.JPG, Masks/Anomaly/*.png}",
            "mask_files",
            options=("split_file",),
            test_counts=VISA_TEST_COUNTS,
        ),
        DatasetInfo(
            "btad",
            "mvtec",
            "list_btad",
            ("train", "test"),
            True,
            ("01", "02", "03"),
            "<root>[/BTech_Dataset_transformed]/<01|02|03>/{train/ok, test/ok, test/ko}/*.{bmp,png} and "
            "<root>/<category>/ground_truth/ko/<stem>.{bmp,png}",
            "mask_files",
            test_counts=OfficialCounts(
                451,
                290,
                source="third-party tables only (not from the dataset's authors); per product not quoted",
            ),
        ),
        DatasetInfo(
            "mpdd",
            "mvtec",
            "list_mpdd",
            ("train", "test"),
            True,
            MPDD_CATEGORIES,
            _MVTEC_LAYOUT,
            "mask_files",
            test_counts=OfficialCounts(
                176,
                282,
                source="third-party tables only (not from the dataset's authors); per category not quoted",
            ),
        ),
        DatasetInfo(
            "dtd_synthetic",
            "mvtec",
            "list_dtd_synthetic",
            ("train", "test"),
            True,
            DTD_CATEGORIES,
            _MVTEC_LAYOUT,
            "mask_files",
        ),
        DatasetInfo(
            "dagm",
            "dagm",
            "list_dagm",
            ("train", "test"),
            True,
            tuple(f"Class{i}" for i in range(1, 11)),
            "<root>/Class<N>/{Train,Test}/*.PNG with masks <root>/Class<N>/{Train,Test}/Label/<stem>_label.PNG",
            "mask_files",
            options=("protocol",),
        ),
        DatasetInfo(
            "brainmri",
            "medical",
            "list_brainmri",
            ("test",),
            False,
            ("brain",),
            "<root>[/brain_tumor_dataset]/{yes,no}/*.jpg (yes = tumour, no = normal; brain_tumor_dataset/ "
            "is read when present)",
            None,
            "brainmri_notes",
            test_counts=OfficialCounts(98, 155, (("brain", 98, 155),), "the Kaggle dataset page"),
        ),
        DatasetInfo(
            "br35h",
            "medical",
            "list_br35h",
            ("test",),
            False,
            ("brain",),
            "<root>/{yes,no}/*.jpg (yes = tumour, no = normal; unlabeled folders such as pred/ are ignored)",
            None,
            "br35h_notes",
            test_counts=OfficialCounts(1500, 1500, (("brain", 1500, 1500),), "the Kaggle dataset page"),
        ),
        DatasetInfo(
            "clinicdb",
            "medical",
            "list_clinicdb",
            ("test",),
            True,
            ("colon",),
            "<root>[/CVC-ClinicDB]/{images,masks}/<stem>.<ext> (also Original/ + 'Ground Truth'/); all abnormal",
            "clinicdb_mask_files",
            options=("mask_threshold",),
            test_counts=OfficialCounts(0, 612, (("colon", 0, 612),), "CVC-ClinicDB (Bernal et al., 2015)"),
        ),
        DatasetInfo(
            "kvasir",
            "medical",
            "list_kvasir",
            ("test",),
            True,
            ("colon",),
            "<root>[/Kvasir-SEG]/{images,masks}/<stem>.jpg; all abnormal",
            "kvasir_mask_files",
            options=("mask_threshold",),
            test_counts=OfficialCounts(0, 1000, (("colon", 0, 1000),), "Kvasir-SEG (Jha et al., 2020)"),
        ),
        DatasetInfo(
            "synthetic",
            "mvtec",
            "list_synthetic",
            ("train", "test"),
            True,
            (),
            "a set root written by feclip-data synth (e.g. <DATA_ROOT>/synthetic/set_a), MVTec layout: "
            + _MVTEC_LAYOUT,
            "mask_files",
        ),
        DatasetInfo(
            "meta_json",
            "meta_json",
            "list_meta_json",
            ("train", "test"),
            None,
            (),
            '<root>/meta.json = {"train"|"test": {<cls>: [{"img_path", "mask_path", "cls_name", '
            '"specie_name", "anomaly"}]}} with paths relative to <root>',
            options=("meta_file", "mask_threshold"),
        ),
        DatasetInfo(
            "folder",
            "folder",
            "list_folder",
            ("test",),
            None,
            (),
            "<root>/good/*.png and <root>/<defect>/*.png, optional masks in "
            "<root>/{ground_truth,masks}/<defect>/<stem>[_mask].png; or <root>/<category>/ holding that",
            "mask_files",
            "folder_notes",
            options=("good_dir", "category", "mask_threshold"),
        ),
    )
}


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of ``name``; raises :class:`ConfigError` for an unknown name."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}") from None


def reader_hook(info: DatasetInfo, attribute: str | None) -> Callable | None:
    """The function named ``attribute`` in the reader module of ``info`` (None when ``attribute`` is None)."""
    if attribute is None:
        return None
    module = importlib.import_module(f"feclip.data.{info.module}")
    return getattr(module, attribute)


def list_samples(
    name: str,
    root: str | Path,
    split: str = "test",
    categories: str | Iterable[str] | None = None,
    *,
    problems: list[str] | None = None,
    **options,
) -> list[Sample]:
    """List the images of one dataset split, sorted by (category, path).

    Args:
        name: one of :data:`DATASETS`.
        root: the dataset root (e.g. ``$DATA_ROOT/mvtec``); see each reader for the layout.
        split: ``"test"`` (default) or ``"train"`` where the layout has one.
        categories: a category name or names to keep (default: all); an unknown name is an error.
        problems: when given, per-image problems (a missing mask, a missing file) are appended to this
            list instead of raised, and the affected images are still listed (mask_path None); layout
            errors are always raised. :mod:`feclip.data.cli` ``check`` uses this.
        **options: reader options, each a string (e.g. ``split_file="2cls_highshot"`` for VisA,
            ``meta_file`` for ``meta_json``, ``good_dir``/``category`` for ``folder``,
            ``protocol="adaclip"`` for DAGM); ``mask_threshold`` (an int in [0, 254], or its digits)
            for ``kvasir``, ``clinicdb``, ``folder`` and ``meta_json`` sets every listed sample's
            :attr:`Sample.mask_threshold`. The other readers take none.

    Returns:
        list[Sample], never empty.

    Raises:
        ConfigError: unknown dataset name, split or reader option; an option or ``categories`` of the
            wrong type.
        DatasetError: missing root, wrong layout, unknown category, a category without images in the
            split, missing file or mask, no images.
    """
    info = dataset_info(name)
    if split not in info.splits:
        raise ConfigError(f"{name} has no split {split!r}; it has: {', '.join(info.splits)}")
    check_reader_options(name, options, info.options)
    if not isinstance(root, (str, os.PathLike)) or not str(root):
        raise ConfigError(f"{name}: the dataset root must be a folder path, got {root!r}")
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"{name}: dataset root {root} does not exist; expected layout: {info.layout}")
    if not root.is_dir():
        raise DatasetError(f"{name}: dataset root {root} is not a folder; expected layout: {info.layout}")
    wanted = _as_category_list(categories, name)
    reader = reader_hook(info, info.function)
    samples = reader(root, split, wanted, problems, **listing_options(options))
    if not samples:
        which = f" for categories {wanted}" if wanted else ""
        raise EmptyDatasetError(
            f"{name}: no {split} images found under {root}{which}; expected layout: {info.layout}"
        )
    if "mask_threshold" in options:
        threshold = parse_mask_threshold(options["mask_threshold"], name)
        samples = [dataclasses.replace(s, mask_threshold=threshold) for s in samples]
    return sort_samples(samples)


def listing_options(options: dict) -> dict:
    """The reader options that change what is listed: ``options`` without :data:`MASK_OPTIONS`
    (those are applied by :func:`list_samples` to every listed sample)."""
    return {k: v for k, v in options.items() if k not in MASK_OPTIONS}


# ----------------------------------------------------------------------------------------------------
# Helpers shared by the readers
# ----------------------------------------------------------------------------------------------------


def natural_key(text: str) -> tuple:
    """Sort key that orders digit runs by value: ``Class2`` < ``Class10``, ``macaroni1`` < ``macaroni2``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text))


def sort_samples(samples: Iterable[Sample]) -> list[Sample]:
    """Sort by (category in natural order, image path)."""
    return sorted(samples, key=lambda s: (natural_key(s.category), str(s.image_path)))


def _as_category_list(categories: str | Iterable[str] | None, name: str = "") -> list[str] | None:
    if categories is None:
        return None
    if isinstance(categories, str):
        return [categories]
    if isinstance(categories, (bytes, dict)) or not isinstance(categories, Iterable):
        raise ConfigError(
            f"{name}: categories must be a category name or a list of names, got {categories!r} "
            f"({type(categories).__name__})"
        )
    out = []
    for c in categories:
        if isinstance(c, bool) or not isinstance(c, (str, int)):
            raise ConfigError(f"{name}: categories must be names (strings), got {c!r} ({type(c).__name__})")
        out.append(str(c))
    return out or None


def select_categories(found: Sequence[str], wanted: list[str] | None, name: str, root: Path) -> list[str]:
    """Return ``wanted`` (or all of ``found``) sorted naturally; raise for a category not on disk."""
    if wanted is None:
        return sorted(found, key=natural_key)
    missing = [c for c in wanted if c not in found]
    if missing:
        raise DatasetError(
            f"{name}: categor{'y' if len(missing) == 1 else 'ies'} {', '.join(missing)} not found under {root}; "
            f"available: {', '.join(sorted(found, key=natural_key)) or '(none)'}"
        )
    return sorted(set(wanted), key=natural_key)


def is_image_file(path: Path) -> bool:
    """A visible file whose suffix is in :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def list_images(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name (sub-folders are not entered)."""
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def subdirs(folder: Path) -> list[Path]:
    """The visible sub-folders of ``folder``, sorted by name."""
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name
    )


def child_dir(folder: Path, name: str) -> Path | None:
    """The sub-folder of ``folder`` named ``name``, compared case-insensitively (exact match preferred)."""
    exact = folder / name
    if exact.is_dir():
        return exact
    matches = [p for p in subdirs(folder) if p.name.lower() == name.lower()] if folder.is_dir() else []
    return matches[0] if len(matches) == 1 else None


class MaskFinder:
    """Pairs images with masks by name: ``<stem><suffix>.<any image ext>`` in a mask folder.

    One instance per listing; each mask folder is read once, so pairing n images is O(n).
    """

    def __init__(self, suffixes: Sequence[str] = ("_mask", "")) -> None:
        self.suffixes = tuple(suffixes)
        self._index: dict[Path, dict[str, list[Path]]] = {}

    def find(self, folder: Path, stem: str) -> Path | None:
        """The mask of image ``stem`` in ``folder`` (first matching suffix wins), or None."""
        index = self._index.get(folder)
        if index is None:
            index = {}
            if folder.is_dir():
                for path in list_images(folder):
                    index.setdefault(path.stem, []).append(path)
            self._index[folder] = index
        for suffix in self.suffixes:
            candidates = index.get(stem + suffix)
            if candidates:
                return sorted(candidates, key=_ext_rank)[0]
        return None


def _ext_rank(path: Path) -> tuple[int, str]:
    ext = path.suffix.lower()
    return (IMAGE_EXTENSIONS.index(ext) if ext in IMAGE_EXTENSIONS else len(IMAGE_EXTENSIONS), path.name)


def report(problems: list[str] | None, message: str) -> None:
    """Raise ``DatasetError(message)``, or append it to ``problems`` when a list is given."""
    if problems is None:
        raise DatasetError(message)
    problems.append(message)


def check_reader_options(name: str, options: dict, accepted: Sequence[str] = ()) -> None:
    """Raise :class:`ConfigError` for an option of reader ``name`` that is not in ``accepted``, or whose
    value is not a non-empty string (options come from YAML, where ``good_dir: 0`` is a number)."""
    unknown = sorted(str(k) for k in options if k not in accepted)
    if unknown:
        takes = f"accepts: {', '.join(accepted)}" if accepted else "accepts no options"
        raise ConfigError(
            f"{name}: unknown reader option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"the {name} reader {takes}"
        )
    for key, value in options.items():
        if key in MASK_OPTIONS:
            parse_mask_threshold(value, name)
            continue
        if not isinstance(value, str) or not value.strip():
            quote = (
                f"; in YAML quote it: {key}: '{value}'"
                if isinstance(value, (int, float)) and not isinstance(value, bool)
                else ""
            )
            raise ConfigError(
                f"{name}: reader option {key} must be a non-empty string, got {value!r} "
                f"({type(value).__name__}){quote}"
            )


def parse_mask_threshold(value, name: str = "") -> int:
    """The ``mask_threshold`` option as an int in [0, 254] (an int, or a string of digits from the
    command line); anything else is a :class:`ConfigError`."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    if number is None or not 0 <= number <= 254:
        raise ConfigError(
            f"{name}: reader option mask_threshold must be an integer in [0, 254] (a mask pixel is "
            f"anomalous when its gray value is > mask_threshold), got {value!r}"
        )
    return number


def reject_options(name: str, options: dict) -> None:
    """Raise :class:`ConfigError` when a reader that takes no options is given some."""
    check_reader_options(name, options, ())


def report_empty_categories(
    name: str,
    split: str,
    selected: Iterable[str],
    samples: Sequence[Sample],
    problems: list[str] | None,
    where,
) -> None:
    """Report (see :func:`report`) each selected category that has no image in ``split``.

    ``where(category)`` names the place that was searched (a folder or a file), for the message.
    """
    present = {s.category for s in samples}
    for category in selected:
        if category not in present:
            report(
                problems,
                f"{name}: category {category!r} has no {split} images ({where(category)}); "
                f"add its images or leave it out with categories=...",
            )


def layout_error(name: str, root: Path, what: str) -> DatasetError:
    """A DatasetError saying what is wrong under ``root`` and quoting the expected layout."""
    return DatasetError(f"{name}: {what} (root {root}); expected layout: {dataset_info(name).layout}")


def image_files_under(folders: Iterable[Path]) -> list[Path]:
    """Every image file inside the given folders (recursively), sorted."""
    out: list[Path] = []
    for folder in folders:
        if folder.is_dir():
            out.extend(p for p in folder.rglob("*") if is_image_file(p))
    return sorted(out)

"""The records a reader module declares about its datasets: :class:`DatasetInfo` (one per dataset name),
:class:`OfficialCounts` (published test counts) and :class:`Source` (where the files come from).

Each reader module (:mod:`feclip.data.mvtec`, :mod:`~feclip.data.visa`, ...) declares one
``DatasetInfo`` per dataset name it reads, once, next to its reader function;
:mod:`feclip.data.catalogue` lists those declarations and derives every table from them (names,
default folders, the reader lookup, the download sources).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ANOMALIB_DOWNLOAD_INFO", "DatasetInfo", "OfficialCounts", "Source", "kaggle_steps"]

#: Where the known archive checksums come from; a :attr:`Source.checksum_source` appends the file name.
ANOMALIB_DOWNLOAD_INFO = (
    "anomalib's DownloadInfo (openvinotoolkit/anomalib, src/anomalib/data/datamodules/image/)"
)

#: The reader option that sets :attr:`Sample.mask_threshold`; :func:`feclip.data.list_samples` applies it
#: itself, so it is never a parameter of a reader (see :attr:`DatasetInfo.takes_mask_threshold`).
MASK_THRESHOLD = "mask_threshold"


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
class Source:
    """Where a benchmark comes from: one row of the source table (:data:`feclip.data.download.SOURCES`).

    A reader module declares it without ``name`` and ``layout``: the catalogue fills both in from the
    dataset's :class:`DatasetInfo` (:meth:`DatasetInfo.download_source`), and replaces ``<folder>`` in
    ``manual`` by ``$DATA_ROOT/<default folder>`` and ``<name>`` by the dataset name.

    Attributes:
        title: the dataset's full name and citation.
        homepage: where it is described and (officially) obtained.
        licence: as stated by the source; "verify" where only a secondary source states it.
        manual: the manual steps (the only way when ``url`` is None; a fallback otherwise).
        url: a public archive URL, or None when there is none (form, Kaggle, file-sharing page).
        filename: the archive's file name.
        size: archive size in bytes, or None when not known (then the server's Content-Length is used).
        sha256: archive sha256, or None when not known (then the size alone is verified).
        checksum_source: where ``sha256`` comes from.
        name: the dataset name (a key of :data:`feclip.data.DEFAULT_DIRS`).
        layout: what must be under the dataset's folder afterwards (the reader's layout).
    """

    title: str
    homepage: str
    licence: str
    manual: str
    url: str | None = None
    filename: str | None = None
    size: int | None = None
    sha256: str | None = None
    checksum_source: str = ""
    name: str = ""
    layout: str = ""


@dataclass(frozen=True)
class DatasetInfo:
    """Everything feclip knows about one dataset name, declared once in its reader module.

    Attributes:
        name: the dataset name (``--dataset NAME``, ``list_samples(NAME, ...)``).
        reader: the reader function ``reader(job: Listing, **options) -> list[Sample]``
            (:class:`feclip.data.layout.Listing`); its keyword-only parameters are the dataset's reader
            options (:attr:`options`).
        splits: the splits the layout has.
        pixel_masks: True for pixel-level ground truth, False for image-level only, None when it depends
            on the files (``folder``, ``meta_json``).
        categories: the official category names, empty when open-ended (synthetic, meta_json, folder).
        layout: the expected on-disk layout under the dataset root ``<root>``, one line, quoted in error
            messages and in the download instructions.
        default_dir: the dataset's folder under ``DATA_ROOT`` (``$DATA_ROOT/<default_dir>`` is the root a
            run gives the reader), or None for the user's own data (no default).
        mask_files: ``f(job: Listing, **options) -> list[Path]``, every mask file on disk (for the
            masks-without-images check of ``feclip-data check``), or None.
        notes: ``f(job: Listing, **options) -> list[str | (level, str)]``, remarks on ignored folders and
            duplicate copies for ``feclip-data check``, or None.
        takes_mask_threshold: True when the reader option ``mask_threshold`` applies (JPEG or user
            masks); :func:`feclip.data.list_samples` applies it to every listed sample.
        test_counts: the published counts of the test split (default options), or None when unknown.
        source: where the files come from (:class:`Source`), or None for the user's own data.
    """

    name: str
    reader: Callable[..., list]
    splits: tuple[str, ...]
    pixel_masks: bool | None
    categories: tuple[str, ...]
    layout: str
    default_dir: str | None = None
    mask_files: Callable[..., list] | None = None
    notes: Callable[..., list] | None = None
    takes_mask_threshold: bool = False
    test_counts: OfficialCounts | None = None
    source: Source | None = None

    @property
    def options(self) -> tuple[str, ...]:
        """The reader options it accepts: the reader's keyword-only parameters, then ``mask_threshold``
        when it applies. Each is a string (``mask_threshold`` also an int); any other option is a
        :class:`~feclip.errors.ConfigError` naming it and these."""
        parameters = inspect.signature(self.reader).parameters.values()
        names = tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)
        return names + ((MASK_THRESHOLD,) if self.takes_mask_threshold else ())

    def download_source(self) -> Source | None:
        """:attr:`source` completed with the name, the layout and the folder (see :class:`Source`)."""
        if self.source is None:
            return None
        folder = f"$DATA_ROOT/{self.default_dir or self.name}"
        manual = self.source.manual.replace("<folder>", folder).replace("<name>", self.name)
        return dataclasses.replace(self.source, name=self.name, layout=self.layout, manual=manual)


def kaggle_steps(slug: str) -> str:
    """The manual steps of a Kaggle dataset (``<folder>``/``<name>`` placeholders, see :class:`Source`)."""
    return (
        f"1. Sign in to Kaggle and accept the dataset's terms at https://www.kaggle.com/datasets/{slug}\n"
        "2. With the Kaggle CLI (pip install kaggle; API token in ~/.kaggle/kaggle.json):\n"
        f"   kaggle datasets download -d {slug} -p <folder> --unzip\n"
        "   (or download the zip in the browser and unzip it into <folder>)\n"
        "3. feclip-data check <folder> --dataset <name>"
    )

"""Datasets: readers for the benchmarks' on-disk layouts, the torch Dataset, and the embedded synthetic data.

>>> from feclip.data import list_samples, AnomalyDataset
>>> samples = list_samples("mvtec", "/data/mvtec", split="test")   # list[Sample], sorted
>>> ds = AnomalyDataset(samples, image_size=336)                     # ds[i]["image"]: (3, 336, 336)

Dataset names: :data:`DATASETS`; default folders under ``DATA_ROOT``: :data:`DEFAULT_DIRS`; both, the
download sources and the reader lookup are derived in :mod:`feclip.data.catalogue` from the declarations
of the reader modules. The ground-truth check is :mod:`feclip.data.check` (command line ``feclip-data``,
:mod:`feclip.apps.data`); downloads are :mod:`feclip.data.download`; the checks a run makes before
training are in :mod:`feclip.data.validate`.
"""

from feclip.data.catalogue import DATASETS, DEFAULT_DIRS, dataset_info
from feclip.data.layout import EmptyDatasetError
from feclip.data.listing import list_samples
from feclip.data.sample import Sample
from feclip.data.spec import DatasetInfo
from feclip.data.synthetic import make_synthetic
from feclip.data.transforms import CLIP_MEAN, CLIP_STD
from feclip.data.validate import check_fewshot, check_target, check_train


def __getattr__(name: str):
    # AnomalyDataset imports torch; loading it lazily keeps ``feclip-data`` and the readers quick to start.
    if name == "AnomalyDataset":
        from feclip.data.dataset import AnomalyDataset

        return AnomalyDataset
    raise AttributeError(f"module 'feclip.data' has no attribute {name!r}")


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DATASETS",
    "DEFAULT_DIRS",
    "AnomalyDataset",
    "DatasetInfo",
    "EmptyDatasetError",
    "Sample",
    "check_fewshot",
    "check_target",
    "check_train",
    "dataset_info",
    "list_samples",
    "make_synthetic",
]

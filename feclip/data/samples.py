"""Compatibility path: the names this module held before the dataset catalogue was split up.

Nothing is defined here; each name lives in the module named after what it holds:
:mod:`feclip.data.sample` (``Sample``, ``natural_key``), :mod:`feclip.data.catalogue` (``DATASETS``,
``DEFAULT_DIRS``, ``dataset_info``), :mod:`feclip.data.listing` (``list_samples``),
:mod:`feclip.data.layout` (``IMAGE_EXTENSIONS``, ``EmptyDatasetError``), :mod:`feclip.data.spec`
(``DatasetInfo``, ``OfficialCounts``) and the reader modules (``MVTEC_CATEGORIES``). New code imports
from there (or from :mod:`feclip.data`); this module goes once no caller imports it.
"""

from feclip.data.catalogue import DATASETS, DEFAULT_DIRS, dataset_info
from feclip.data.layout import IMAGE_EXTENSIONS, EmptyDatasetError
from feclip.data.listing import list_samples
from feclip.data.mvtec import MVTEC_CATEGORIES
from feclip.data.sample import Sample, natural_key, sort_samples
from feclip.data.spec import DatasetInfo, OfficialCounts

__all__ = [
    "DATASETS",
    "DEFAULT_DIRS",
    "IMAGE_EXTENSIONS",
    "MVTEC_CATEGORIES",
    "DatasetInfo",
    "EmptyDatasetError",
    "OfficialCounts",
    "Sample",
    "dataset_info",
    "list_samples",
    "natural_key",
    "sort_samples",
]

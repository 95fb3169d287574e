"""The dataset catalogue: the one list of datasets, and every table derived from it.

Each reader module declares its datasets once (a :class:`~feclip.data.spec.DatasetInfo` next to its
reader function: name, splits, categories, layout, default folder, published counts, download source and
licence). :data:`SPECS` lists those declarations, by direct reference, in the order names are shown;
everything else is derived from it:

- :data:`DATASETS`, every name :func:`feclip.data.list_samples` accepts;
- :data:`DEFAULT_DIRS`, each benchmark's folder under ``DATA_ROOT`` (``$DATA_ROOT/<dir>`` is the root
  given to the reader; ``synthetic`` holds two set roots, ``synthetic/set_a`` and ``synthetic/set_b``;
  ``meta_json`` and ``folder`` point at the user's own data and have no default);
- :data:`SOURCES`, the download source table (:mod:`feclip.data.download`);
- :data:`BY_NAME` and :func:`dataset_info`, the lookup of a name's declaration (and so of its reader).

Adding a dataset is one new reader module declaring its ``DatasetInfo``, one line in :data:`SPECS`
(and in :data:`PAPER_ORDER` when it is one of the paper's benchmarks), and its section in
docs/datasets.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from feclip.data import dagm, folder, medical, meta_json, mvtec, visa
from feclip.data.spec import DatasetInfo, Source
from feclip.errors import ConfigError

__all__ = [
    "BY_NAME",
    "DATASETS",
    "DEFAULT_DIRS",
    "PAPER_ORDER",
    "SOURCES",
    "SPECS",
    "Catalogue",
    "dataset_info",
]

#: Every dataset, in the order names are listed (``--dataset`` choices, ``feclip-data info``, errors).
SPECS: tuple[DatasetInfo, ...] = (
    mvtec.MVTEC,
    visa.VISA,
    mvtec.BTAD,
    mvtec.MPDD,
    mvtec.DTD_SYNTHETIC,
    dagm.DAGM,
    medical.BRAINMRI,
    medical.BR35H,
    medical.CLINICDB,
    medical.KVASIR,
    mvtec.SYNTHETIC,
    meta_json.META_JSON,
    folder.FOLDER,
)


@dataclass(frozen=True)
class Catalogue:
    """The tables derived from a tuple of declarations (:meth:`of`); the module-level names below are
    those of :data:`SPECS`.

    Attributes:
        specs: the declarations, in order.
        names: their names, in order.
        by_name: name -> declaration (read-only).
        default_dirs: name -> folder under ``DATA_ROOT``, for the datasets that have one.
        sources: name -> download source (:meth:`DatasetInfo.download_source`), for the datasets that
            have one.
    """

    specs: tuple[DatasetInfo, ...]
    names: tuple[str, ...]
    by_name: Mapping[str, DatasetInfo]
    default_dirs: dict[str, str]
    sources: dict[str, Source]

    @classmethod
    def of(cls, specs: Iterable[DatasetInfo]) -> Catalogue:
        """Derive every table from ``specs``; a name declared twice is a :class:`ConfigError`."""
        specs = tuple(specs)
        names = tuple(s.name for s in specs)
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"dataset catalogue: {', '.join(twice)} declared more than once")
        return cls(
            specs=specs,
            names=names,
            by_name=MappingProxyType({s.name: s for s in specs}),
            default_dirs={s.name: s.default_dir for s in specs if s.default_dir is not None},
            sources={s.name: s.download_source() for s in specs if s.source is not None},
        )


CATALOGUE = Catalogue.of(SPECS)

#: Every dataset name :func:`feclip.data.list_samples` accepts.
DATASETS: tuple[str, ...] = CATALOGUE.names
#: Default folder of each benchmark under ``DATA_ROOT`` (see the module docstring).
DEFAULT_DIRS: dict[str, str] = CATALOGUE.default_dirs
#: The dataset source table: name -> :class:`~feclip.data.spec.Source` (also
#: :data:`feclip.data.download.SOURCES`, the same dict).
SOURCES: dict[str, Source] = CATALOGUE.sources
#: Name -> declaration.
BY_NAME: Mapping[str, DatasetInfo] = CATALOGUE.by_name

#: The paper's benchmarks in its tables' column order (then the embedded synthetic set): the report's
#: display order of datasets.
PAPER_ORDER: tuple[str, ...] = tuple(
    spec.name
    for spec in (
        mvtec.MVTEC,
        visa.VISA,
        mvtec.BTAD,
        mvtec.MPDD,
        dagm.DAGM,
        mvtec.DTD_SYNTHETIC,
        medical.BRAINMRI,
        medical.BR35H,
        medical.CLINICDB,
        medical.KVASIR,
        mvtec.SYNTHETIC,
    )
)


def dataset_info(name: str) -> DatasetInfo:
    """The declaration of ``name``; raises :class:`ConfigError` for an unknown name."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}") from None

"""The dataset catalogue is the single source: every reader module's declaration is listed in it, and
the names, default folders, download sources and reader lookup are all derived from that list."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

import feclip.data
from feclip.data import catalogue, download, list_samples
from feclip.data.catalogue import BY_NAME, DATASETS, DEFAULT_DIRS, PAPER_ORDER, SOURCES, SPECS, Catalogue
from feclip.data.layout import Listing
from feclip.data.sample import Sample
from feclip.data.spec import DatasetInfo, Source
from feclip.errors import ConfigError

DOCS = Path(__file__).resolve().parent.parent / "docs" / "datasets.md"


def _declared() -> dict[str, list[DatasetInfo]]:
    """Every DatasetInfo bound at module level in a module of feclip.data, by module."""
    found: dict[str, list[DatasetInfo]] = {}
    for module_info in pkgutil.iter_modules(feclip.data.__path__, "feclip.data."):
        module = importlib.import_module(module_info.name)
        specs = [v for v in vars(module).values() if isinstance(v, DatasetInfo)]
        if specs and module.__name__ != catalogue.__name__:
            found[module.__name__] = specs
    return found


def test_every_declaration_is_in_the_catalogue_once():
    declared = _declared()
    assert set(declared) == {
        "feclip.data.mvtec",
        "feclip.data.visa",
        "feclip.data.dagm",
        "feclip.data.medical",
        "feclip.data.meta_json",
        "feclip.data.folder",
    }
    for module, specs in declared.items():
        for spec in specs:
            assert any(spec is s for s in SPECS), f"{module} declares {spec.name}, which SPECS does not list"
            assert spec.reader.__module__ == module, f"{spec.name}: its reader lives in another module"
    assert len({id(s) for specs in declared.values() for s in specs}) == len(SPECS)


def test_tables_are_derived_from_the_specs():
    assert DATASETS == tuple(s.name for s in SPECS)
    assert DEFAULT_DIRS == {s.name: s.default_dir for s in SPECS if s.default_dir is not None}
    assert list(SOURCES) == [s.name for s in SPECS if s.source is not None]
    for spec in SPECS:
        assert feclip.data.dataset_info(spec.name) is spec and BY_NAME[spec.name] is spec
        if spec.source is not None:
            src = SOURCES[spec.name]
            assert (src.name, src.layout, src.url, src.licence) == (
                spec.name,
                spec.layout,
                spec.source.url,
                spec.source.licence,
            )
            assert "<folder>" not in src.manual and "<name>" not in src.manual
    # one object each, whichever module it is imported from
    assert feclip.data.DATASETS is DATASETS and feclip.data.DEFAULT_DIRS is DEFAULT_DIRS
    assert download.SOURCES is SOURCES
    from feclip.data import layout, listing, sample

    assert listing.list_samples is list_samples and feclip.data.list_samples is list_samples
    assert sample.Sample is Sample and feclip.data.Sample is Sample
    assert feclip.data.EmptyDatasetError is layout.EmptyDatasetError


def _fake_reader(job: Listing, *, colour: str = "red") -> list[Sample]:
    image = job.root / "a.png"
    return [Sample(image, None, 0, colour, "good"), Sample(image, None, 1, colour, "defect")]


FAKE = DatasetInfo(
    name="fake",
    reader=_fake_reader,
    splits=("test",),
    pixel_masks=False,
    categories=("red",),
    layout="<root>/a.png",
    default_dir="fake_dir",
    takes_mask_threshold=True,
    source=Source(
        title="Fake",
        homepage="-",
        licence="CC0",
        manual="put it in <folder>; feclip-data check <folder> --dataset <name>",
    ),
)


def test_a_new_declaration_shows_up_everywhere(tmp_path, monkeypatch):
    extended = Catalogue.of(SPECS + (FAKE,))
    assert extended.names == DATASETS + ("fake",)
    assert extended.by_name["fake"] is FAKE
    assert extended.default_dirs == {**DEFAULT_DIRS, "fake": "fake_dir"}
    assert list(extended.sources) == [*SOURCES, "fake"]
    fake_source = extended.sources["fake"]
    assert fake_source.name == "fake" and fake_source.layout == "<root>/a.png"
    assert (
        fake_source.manual
        == "put it in $DATA_ROOT/fake_dir; feclip-data check $DATA_ROOT/fake_dir --dataset fake"
    )
    # the reader options are the reader's keyword-only parameters (plus mask_threshold where it applies)
    assert FAKE.options == ("colour", "mask_threshold")
    # listing goes through the lookup alone: no other table needs the new name
    monkeypatch.setattr(catalogue, "BY_NAME", extended.by_name)
    samples = list_samples("fake", tmp_path, colour="blue", mask_threshold=127)
    assert [(s.category, s.label, s.mask_threshold) for s in samples] == [("blue", 0, 127), ("blue", 1, 127)]
    with pytest.raises(ConfigError, match="the fake reader accepts: colour, mask_threshold"):
        list_samples("fake", tmp_path, size="big")


def test_a_name_declared_twice_is_refused():
    with pytest.raises(ConfigError, match="mvtec declared more than once"):
        Catalogue.of(SPECS + (SPECS[0],))


def test_paper_order_is_the_reports_and_every_name_is_documented():
    from feclip.report import DATASET_ORDER

    assert PAPER_ORDER == DATASET_ORDER
    assert set(PAPER_ORDER) <= set(DATASETS)
    docs = DOCS.read_text(encoding="utf-8")
    for name in DATASETS:
        assert f"`{name}`" in docs, f"docs/datasets.md does not describe {name}"

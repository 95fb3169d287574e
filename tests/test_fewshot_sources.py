"""Few-shot references on any target (eval.fewshot_source): a train split, a reference/ folder, or normal
test images held out of the metrics; the choice per category, recorded, and the errors."""

import csv
import json

import numpy as np
import pytest
from conftest import compose_run, smoke_overrides, train_cli
from PIL import Image

from feclip.data import Sample, list_samples
from feclip.engine.run import run
from feclip.engine.run_data import fewshot_references
from feclip.errors import ConfigError, DatasetError
from feclip.models.fewshot import choose_references
from feclip.results import read_metrics

K = 2


def _png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_folder(root, categories):
    """A ``folder`` dataset with several categories: ``{name: (good, dent, reference)}`` image counts."""
    seed = 0
    for name, (good, dent, reference) in categories.items():
        for sub, n in (("good", good), ("dent", dent), ("reference", reference)):
            for i in range(n):
                seed += 1
                _png(root / name / sub / f"{i:03d}.png", seed)
    return root


def _cfg(data_root, results, *extra, target="{name: folder, dir: mine}"):
    return compose_run(
        smoke_overrides(
            data_root, results, "train.epochs=0", f"data.targets=[{target}]", f"eval.fewshot_k={K}", *extra
        ),
        "eval",
    )


def _references(cfg):
    ref = cfg.data.targets[0]
    samples = list_samples(ref.name, cfg.paths.data_root + f"/{ref.dir}", **ref.options)
    return samples, fewshot_references(ref, cfg, samples)


# -- the choice ------------------------------------------------------------------------------------


def test_a_folder_without_train_split_holds_out_k_normal_test_images_fixed_by_the_seed(tmp_path):
    make_folder(tmp_path / "mine", {"a": (5, 2, 0), "b": (4, 2, 0)})
    samples, refs = _references(_cfg(tmp_path, tmp_path / "r"))
    assert refs.sources == {"a": "holdout", "b": "holdout"}
    assert all(len(c) == K and all(s.label == 0 and s in samples for s in c) for c in refs.chosen.values())
    kept = refs.test_samples(samples)
    assert len(kept) == len(samples) - 2 * K and not set(refs.held_out) & set(kept)
    assert any("held out" in w for w in refs.warnings)  # auto says so
    again = _references(_cfg(tmp_path, tmp_path / "r"))[1]
    assert again.chosen == refs.chosen
    draws = {
        tuple(
            s.image_path.name for s in _references(_cfg(tmp_path, tmp_path / "r", f"seed={s}"))[1].chosen["a"]
        )
        for s in range(6)
    }
    assert len(draws) > 1


def test_a_reference_folder_is_used_when_present_and_is_not_a_defect(tmp_path):
    make_folder(tmp_path / "mine", {"a": (3, 2, 3), "b": (4, 2, 0)})
    samples, refs = _references(_cfg(tmp_path, tmp_path / "r"))
    assert not any("reference" in s.image_path.parts for s in samples)  # not in the test split
    assert {s.defect for s in samples} == {"good", "dent"}
    assert refs.sources == {"a": "reference", "b": "holdout"}  # auto, per category
    assert all(s.image_path.parent.name == "reference" for s in refs.chosen["a"])
    assert refs.test_samples(samples) == [s for s in samples if s not in refs.chosen["b"]]
    listed = list_samples("folder", tmp_path / "mine", split="reference")
    assert sorted(s.image_path.name for s in listed) == ["000.png", "001.png", "002.png"]
    # explicit: reference only, and a category without reference images is too short
    with pytest.raises(DatasetError, match=r"'b' \(0 reference/ images\)") as err:
        _references(_cfg(tmp_path, tmp_path / "r", "eval.fewshot_source=reference"))
    assert "\n" not in str(err.value)


def test_a_single_category_root_takes_its_reference_folder(tmp_path):
    make_folder(tmp_path, {"mine": (3, 2, 2)})
    _, refs = _references(_cfg(tmp_path, tmp_path / "r"))
    assert refs.sources == {"mine": "reference"} and len(refs.chosen["mine"]) == K
    assert any("exactly 2 reference/ images" in w for w in refs.warnings)  # every seed draws them all


def test_meta_json_references_per_category(tmp_path):
    root = tmp_path / "mine"
    items = {"train": {"x": []}, "test": {"x": [], "y": []}}
    seed = 100
    for split, cls, n_good, n_bad in (("train", "x", 3, 0), ("test", "x", 2, 1), ("test", "y", 3, 1)):
        for i in range(n_good + n_bad):
            seed += 1
            rel = f"{split}/{cls}/{i}.png"
            _png(root / rel, seed)
            label = int(i >= n_good)
            items[split][cls].append({"img_path": rel, "mask_path": "", "cls_name": cls, "anomaly": label})
    (root / "meta.json").write_text(json.dumps(items))
    target = "{name: meta_json, dir: mine}"
    _, refs = _references(_cfg(tmp_path, tmp_path / "r", target=target))
    assert refs.sources == {"x": "train", "y": "holdout"}  # the train key lists x only
    for i in range(2):
        _png(root / "reference" / "y" / f"{i}.png", 500 + i)
    _, refs = _references(_cfg(tmp_path, tmp_path / "r", target=target))
    assert refs.sources == {"x": "train", "y": "reference"}
    _png(root / "reference" / "loose.png", 900)
    with pytest.raises(DatasetError, match=r"directly in .*reference.*<category>"):
        _references(_cfg(tmp_path, tmp_path / "r", target=target))


def test_a_dataset_with_a_train_split_keeps_its_training_references(data_root, tmp_path):
    from feclip.engine.run_data import list_dataset, list_samples_of
    from feclip.models.fewshot import pick_reference_samples

    cfg = compose_run(smoke_overrides(data_root, tmp_path, "train.epochs=0", "eval.fewshot_k=2"), "eval")
    ref = cfg.data.targets[0]
    samples = list_dataset(ref, cfg.paths)
    categories = sorted({s.category for s in samples})
    train = list_samples_of(ref, cfg.paths, "train", categories)
    for source in ("auto", "train"):
        cfg.eval.fewshot_source = source
        refs = fewshot_references(ref, cfg, samples)
        assert refs.sources == dict.fromkeys(categories, "train")
        assert refs.pool == train  # the fingerprint of the run's identity is the train split's, as before
        assert refs.chosen == {c: pick_reference_samples(train, 2, cfg.seed, c) for c in categories}
        assert refs.test_samples(samples) == samples and refs.held_out == []


# -- errors ----------------------------------------------------------------------------------------


def test_explicit_train_on_a_layout_without_one_is_a_one_line_error(tmp_path):
    make_folder(tmp_path / "mine", {"a": (5, 2, 0)})
    with pytest.raises(
        ConfigError, match="eval.fewshot_source=train, but the folder layout has no train split"
    ) as err:
        _references(_cfg(tmp_path, tmp_path / "r", "eval.fewshot_source=train"))
    assert "\n" not in str(err.value)
    # and from the command line: one line on stderr, exit 2, before anything is built
    res = train_cli(
        smoke_overrides(
            tmp_path,
            tmp_path / "r",
            "train.epochs=0",
            "data.targets=[{name: folder, dir: mine}]",
            "eval.fewshot_k=2",
            "eval.fewshot_source=train",
        )
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "has no train split" in res.stderr


def test_too_few_normal_images_is_a_one_line_error_naming_the_category(tmp_path):
    make_folder(tmp_path / "mine", {"a": (5, 2, 0), "b": (2, 2, 0)})
    # holdout needs k + 1 normal test images: k references and one left to test
    with pytest.raises(
        DatasetError, match=r"k=2 .*category 'b' \(2 normal test images; holdout needs k\+1=3"
    ) as err:
        _references(_cfg(tmp_path, tmp_path / "r"))
    assert "\n" not in str(err.value) and "'a'" not in str(err.value)
    with pytest.raises(DatasetError, match="too few"):  # before the run folder or a model
        run(_cfg(tmp_path, tmp_path / "r"), do_train=False)
    assert not (tmp_path / "r").exists()


def test_choose_references_refuses_a_source_the_layout_lacks_and_bad_values():
    test = [Sample(f"/t/{i}.png", None, 0, "c", "good") for i in range(4)]
    with pytest.raises(ConfigError, match="no reference/ folder"):
        choose_references("mvtec", ["c"], 1, 0, "reference", train=[], reference=None, test=test)
    with pytest.raises(ConfigError, match="eval.fewshot_source must be one of"):
        choose_references("x", ["c"], 1, 0, "nearby", test=test)
    with pytest.raises(ConfigError, match="positive int"):
        choose_references("x", ["c"], 0, 0, "holdout", test=test)
    # auto never falls back because of k: a category with a train image too few is an error
    train = [Sample("/tr/0.png", None, 0, "c", "good")]
    with pytest.raises(DatasetError, match=r"'c' \(1 normal train images\)"):
        choose_references("x", ["c"], 2, 0, "auto", train=train, reference=None, test=test)


def test_the_configured_source_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="eval.fewshot_source must be one of"):
        _cfg(tmp_path, tmp_path / "r", "eval.fewshot_source=nearby").validate()


# -- a run ----------------------------------------------------------------------------------------


def test_a_holdout_run_scores_the_rest_and_records_the_held_out_files(tmp_path):
    make_folder(tmp_path / "mine", {"a": (5, 2, 0), "b": (4, 2, 0)})
    out = run(_cfg(tmp_path, tmp_path / "r", "variant=h"), do_train=False)
    rows = read_metrics(out / "metrics.csv")
    counts = {r["category"]: r["n_images"] for r in rows if r["metric"] == "image_auroc"}
    assert counts == {"a": 7 - K, "b": 6 - K, "__micro__": 13 - 2 * K}
    with open(out / "fewshot_references.csv", newline="") as f:
        recorded = list(csv.DictReader(f))
    assert len(recorded) == 2 * K and {r["source"] for r in recorded} == {"holdout"}
    assert {(r["category"], r["k"], r["seed"]) for r in recorded} == {("a", "2", "42"), ("b", "2", "42")}
    assert all("/good/" in r["image_path"] for r in recorded)
    identity = json.loads((out / "identity.json").read_text())
    assert identity["config"]["eval"]["fewshot_source"] == "auto" and "fewshot0:folder" in identity["data"]
    # another seed holds out other files: another identity, other numbers
    other = run(_cfg(tmp_path, tmp_path / "r", "variant=h", "seed=5"), do_train=False)
    with open(other / "fewshot_references.csv", newline="") as f:
        assert {r["image_path"] for r in csv.DictReader(f)} != {r["image_path"] for r in recorded}
    # a reference/ folder added: the references change source, the data identity with them
    for i in range(K):
        _png(tmp_path / "mine" / "a" / "reference" / f"{i}.png", 700 + i)
    with_ref = run(_cfg(tmp_path, tmp_path / "r", "variant=ref"), do_train=False)
    counts = {
        r["category"]: r["n_images"]
        for r in read_metrics(with_ref / "metrics.csv")
        if r["metric"] == "image_auroc"
    }
    assert counts["a"] == 7  # nothing held out of category a
    new_identity = json.loads((with_ref / "identity.json").read_text())
    assert new_identity["data"]["fewshot0:folder"] != identity["data"]["fewshot0:folder"]

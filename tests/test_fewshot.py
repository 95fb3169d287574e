"""Few-normal-shot memory bank: reference choice, distances, maps and scores (tiny random CLIP)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_feclip, randomize_adapters

from feclip.data import AnomalyDataset, list_samples
from feclip.errors import ConfigError, DatasetError
from feclip.models import FEClip, FEClipConfig, load_clip
from feclip.models.fewshot import (
    MemoryBank,
    category_banks,
    fewshot_predict,
    pick_reference_samples,
    record_references,
    tap_features,
)
from feclip.scoring import ScoringConfig, anomaly_maps, combine, fewshot_maps, fewshot_scores, image_scores

TAPS = (15, 18, 21, 23)


@pytest.fixture(scope="module")
def model():
    # non-trivial adapters, so fused and plain tokens differ
    return randomize_adapters(make_tiny_feclip(taps=TAPS), seed=3, scale=0.3).eval()


@pytest.fixture(scope="module")
def data(synthetic_sets):
    roots = synthetic_sets(n_train_good=6, n_test_good=2, n_test_bad=2, image_size=64)
    train = list_samples("synthetic", roots["set_a"], split="train", categories="brick")
    test = list_samples("synthetic", roots["set_a"], split="test", categories="brick")
    return train, test


def images_of(samples):
    ds = AnomalyDataset(samples, image_size=84)
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 84, 84, generator=g)


# -- references -----------------------------------------------------------------------------------


def test_references_are_normal_sorted_and_fixed_by_the_seed(data):
    train, test = data
    first = pick_reference_samples(train, 2, seed=42)
    again = pick_reference_samples(list(reversed(train)), 2, seed=42)
    assert first == again
    assert len(first) == 2 and all(s.label == 0 for s in first)
    assert [str(s.image_path) for s in first] == sorted(str(s.image_path) for s in first)
    by_seed = {tuple(str(s.image_path) for s in pick_reference_samples(train, 2, seed)) for seed in range(4)}
    assert len(by_seed) > 1
    # only normal test images are candidates
    assert all(s.label == 0 for s in pick_reference_samples(test, 2, seed=0))


def test_reference_choice_errors(data):
    train, _ = data
    with pytest.raises(DatasetError, match="k=7"):
        pick_reference_samples(train, 7, seed=0)
    with pytest.raises(ConfigError, match="positive"):
        pick_reference_samples(train, 0, seed=0)
    other = [s.__class__(s.image_path, None, 0, "other", "good") for s in train[:2]]
    with pytest.raises(ConfigError, match="one category"):
        pick_reference_samples(train + other, 1, seed=0)
    assert len(pick_reference_samples(train + other, 1, seed=0, category="other")) == 1


# -- the bank and its distances -------------------------------------------------------------------


def test_bank_holds_unit_norm_tap_tokens(model, batch):
    bank = MemoryBank.build(model, batch[:2], reference_paths=["a.png", "b.png"])
    assert bank.features.shape == (len(TAPS), 2 * 36, 32)
    assert torch.allclose(bank.features.norm(dim=-1), torch.ones(len(TAPS), 72), atol=1e-5)
    assert bank.k == 2 and bank.taps == TAPS and bank.grid == (6, 6)
    assert bank.reference_paths == ["a.png", "b.png"]
    tokens = model(batch[:2], return_tokens=True).tap_tokens  # (N, 2, 6, 6, D)
    expected = F.normalize(tokens.reshape(len(TAPS), 72, 32), dim=-1)
    assert torch.allclose(bank.features, expected, atol=1e-6)


@pytest.mark.parametrize("which", ["fused", "plain"])
def test_a_reference_in_the_test_batch_is_at_distance_zero(model, batch, which):
    bank = MemoryBank.build(model, batch[:1], which=which)
    _, tokens = tap_features(model, batch, which)
    dist = bank.distance_maps(tokens)  # (N, 3, 6, 6)
    assert dist.shape == (len(TAPS), 3, 6, 6)
    assert dist[:, 0].abs().max() < 1e-5  # every token of the reference finds itself
    assert dist[:, 1:].amin() > 1e-3  # other images' tokens have no identical twin
    assert (dist >= 0).all() and (dist <= 2).all()


def test_distances_match_a_brute_force_computation_when_chunked(model, batch):
    bank = MemoryBank.build(model, batch[:2])
    tokens = model(batch, return_tokens=True).tap_tokens
    chunked = bank.distance_maps(tokens, chunk_elements=100)  # 1 query token per chunk
    for n in range(len(TAPS)):
        q = F.normalize(tokens[n].reshape(-1, 32), dim=-1)
        brute = 1 - (q[:, None, :] * bank.features[n][None]).sum(-1).amax(1)
        assert torch.allclose(chunked[n].reshape(-1), brute.clamp(0, 2), atol=1e-5)


def test_plain_features_are_the_tap_blocks_before_fusion(model, batch):
    out, plain = tap_features(model, batch, "plain")
    assert plain.shape == out.tap_tokens.shape
    first = model.prefix(batch)[:, 1:].reshape(3, 6, 6, 32)  # block 15's output, before its adapter
    assert torch.allclose(plain[0], first, atol=1e-5)
    assert not torch.allclose(plain, out.tap_tokens, atol=1e-3)


def test_bank_refuses_another_model(model, batch):
    bank = MemoryBank.build(model, batch[:1])
    torch.manual_seed(0)
    other = FEClip(load_clip("feclip-tiny"), FEClipConfig(taps=(23,)))
    with pytest.raises(ConfigError, match="taps"):
        bank.check_compatible(other)
    with pytest.raises(ConfigError, match="fit the memory bank"):
        bank.distance_maps(other(batch, return_tokens=True).tap_tokens)


# -- maps and scores ------------------------------------------------------------------------------


def test_combine_adds_the_map_and_its_maximum():
    zs_scores = torch.tensor([0.2, 0.5])
    zs_maps = torch.zeros(2, 4, 4)
    few = torch.zeros(2, 4, 4)
    few[0, 1, 2] = 0.3
    few[1] = 0.1
    scores, maps = combine(zs_scores, zs_maps + 1.0, few)
    assert torch.allclose(scores, torch.tensor([0.5, 0.6]))
    assert torch.allclose(maps, 1.0 + few)


def test_fewshot_map_is_the_tap_mean_of_upsampled_distances(model, batch):
    bank = MemoryBank.build(model, batch[:1])
    tokens = model(batch, return_tokens=True).tap_tokens
    maps = fewshot_maps(tokens, bank, (84, 84), sigma=0)
    dist = bank.distance_maps(tokens)
    by_tap = [
        F.interpolate(d[:, None], size=(84, 84), mode="bilinear", align_corners=False)[:, 0] for d in dist
    ]
    assert maps.shape == (3, 84, 84)
    assert torch.allclose(maps, torch.stack(by_tap).mean(0), atol=1e-6)
    assert maps[0].abs().max() < 1e-5


def test_fewshot_changes_scores_deterministically_per_seed(model, data):
    train, test = data
    images = images_of(test)
    out = model(images, return_tokens=True)

    def run(seed):
        refs = pick_reference_samples(train, 2, seed)
        bank = MemoryBank.from_samples(model, refs)
        return [str(s.image_path) for s in refs], *fewshot_scores(out, bank, 84, sigma=4)

    refs_a, scores_a, maps_a = run(0)
    refs_b, scores_b, maps_b = run(0)
    refs_c, scores_c, _ = run(1)
    assert refs_a == refs_b and torch.equal(scores_a, scores_b) and torch.equal(maps_a, maps_b)
    assert refs_a != refs_c and not torch.allclose(scores_a, scores_c)
    assert scores_a.shape == (len(test),) and maps_a.shape == (len(test), 84, 84)
    zero_shot = image_scores(out.tap_cls_logits, TAPS, ScoringConfig())
    assert (scores_a > zero_shot + 1e-4).all()  # each test image is some distance from the bank


def test_fewshot_predict_adds_to_any_zero_shot_result(model, data):
    train, test = data
    images = images_of(test)
    bank = MemoryBank.from_samples(model, pick_reference_samples(train, 1, seed=5))
    out = model(images, return_tokens=True)
    cfg = ScoringConfig(sigma=4)
    zs_scores = image_scores(out.tap_cls_logits, TAPS, cfg)
    zs_maps = anomaly_maps(out.tap_patch_logits, TAPS, cfg, 84, model.logit_scale)
    scores, maps = fewshot_predict(model, bank, images, zs_scores, zs_maps, sigma=4)
    ref_scores, ref_maps = fewshot_scores(out, bank, 84, sigma=4)
    assert torch.allclose(scores, ref_scores, atol=1e-5)
    assert torch.allclose(maps, ref_maps, atol=1e-5)
    few = maps - zs_maps
    assert torch.allclose(scores - zs_scores, few.flatten(1).amax(1), atol=1e-5)


def test_the_documented_names_stay_importable_from_the_fewshot_module():
    import feclip.models.fewshot as fewshot
    import feclip.scoring as scoring

    for name in ("combine", "fewshot_maps", "fewshot_scores"):  # one home: feclip.scoring
        assert getattr(fewshot, name) is getattr(scoring, name)


def test_category_banks_and_their_record(model, data, tmp_path):
    train, _ = data
    banks = category_banks(model, train, ["brick"], 2, seed=3)
    refs = pick_reference_samples(train, 2, 3, "brick")
    assert banks["brick"].reference_paths == [str(s.image_path) for s in refs]
    assert torch.equal(banks["brick"].features, MemoryBank.from_samples(model, refs).features)
    path = tmp_path / "fewshot_references.csv"
    header = "dataset,category,k,seed,source,image_path"
    path.write_text(f"{header}\nother,x,1,0,train,o.png\nsyn,old,1,0,train,gone.png\n")
    record_references(path, "syn", 2, 3, banks)
    lines = path.read_text().splitlines()
    assert lines[:2] == [header, "other,x,1,0,train,o.png"]
    assert lines[2:] == [f"syn,brick,2,3,train,{s.image_path}" for s in refs]
    # the source of each category is recorded; a file of the older layout is replaced whole
    path.write_text("dataset,category,k,seed,image_path\nother,x,1,0,o.png\n")
    record_references(path, "syn", 2, 3, banks, {"brick": "holdout"})
    assert path.read_text().splitlines() == [header] + [f"syn,brick,2,3,holdout,{s.image_path}" for s in refs]

"""Map kinds, tap aggregation, upsampling and Gaussian smoothing."""

import numpy as np
import pytest
import scipy.ndimage
import torch

from feclip.errors import ConfigError
from feclip.models import FEClip, FEClipConfig, load_clip
from feclip.scoring import (
    ScoringConfig,
    aggregate_taps,
    anomaly_maps,
    gaussian_blur,
    image_scores,
    map_values,
    score_output,
    scores_and_maps,
    select_taps,
    upsample,
)


def test_map_kinds_by_hand():
    logits = torch.tensor([[1.0, 3.0], [2.0, 0.0]])  # margins +2, -2
    assert torch.allclose(map_values(logits, "logit_margin"), torch.tensor([2.0, -2.0]))
    assert torch.allclose(map_values(logits, "cos_gap", logit_scale=4.0), torch.tensor([0.5, -0.5]))
    p = torch.tensor([1 / (1 + np.exp(-2)), 1 / (1 + np.exp(2))], dtype=torch.float32)
    assert torch.allclose(map_values(logits, "prob_abnormal"), p)
    assert torch.allclose(map_values(logits, "sigmoid_margin"), logits.softmax(-1)[:, 1])


def test_aggregation_by_hand():
    v = torch.tensor([[1.0, 4.0], [3.0, 0.0]])  # two taps, two values
    assert torch.equal(aggregate_taps(v, "mean"), torch.tensor([2.0, 2.0]))
    assert torch.equal(aggregate_taps(v, "max"), torch.tensor([3.0, 4.0]))
    assert torch.allclose(aggregate_taps(v, "weighted", [3.0, 1.0]), torch.tensor([1.5, 3.0]))
    assert torch.equal(select_taps(v, (15, 23), [23]), v[1:])
    with pytest.raises(ConfigError, match="subset of the model taps"):
        select_taps(v, (15, 23), [18])
    with pytest.raises(ConfigError, match="one value per selected tap"):
        aggregate_taps(v, "weighted", [1.0])


def test_weights_follow_the_selected_taps():
    logits = torch.zeros(3, 1, 2)
    logits[:, 0, 1] = torch.tensor([0.0, 10.0, -10.0])  # tap probabilities 0.5, ~1, ~0
    cfg = ScoringConfig(tap_aggregation="weighted", tap_weights=(1.0, 1.0, 3.0), score_taps=(5, 9))
    # taps (1, 5, 9): the subset (5, 9) keeps weights (1, 3) -> (1 * ~1 + 3 * ~0) / 4
    assert abs(image_scores(logits, (1, 5, 9), cfg).item() - 0.25) < 1e-3


@pytest.mark.parametrize("sigma", [0.5, 1.0, 4.0, 9.0])
def test_gaussian_equals_scipy(sigma):
    x = torch.rand(2, 23, 17, generator=torch.Generator().manual_seed(0))
    ref = np.stack([scipy.ndimage.gaussian_filter(m.double().numpy(), sigma) for m in x])
    np.testing.assert_allclose(gaussian_blur(x, sigma).numpy(), ref, atol=1e-6)


def test_sigma_zero_is_identity_and_upsample_shapes():
    x = torch.rand(2, 6, 6)
    assert gaussian_blur(x, 0.0) is x
    assert upsample(x, 84).shape == (2, 84, 84)
    assert upsample(x, (30, 40)).shape == (2, 30, 40)
    const = torch.full((1, 6, 6), 0.3)
    assert torch.allclose(upsample(const, 50), torch.full((1, 50, 50), 0.3))


def test_default_scoring_is_the_paper_mean_of_the_tap_probabilities():
    torch.manual_seed(0)
    model = FEClip(load_clip("feclip-tiny"), FEClipConfig())
    out = model(torch.randn(2, 3, 84, 84))
    scores, maps = score_output(out, model.config.taps, ScoringConfig(sigma=0.0), 84)
    assert torch.allclose(scores, out.tap_scores.mean(0), atol=1e-6)
    assert torch.allclose(maps, upsample(out.tap_maps.mean(0), 84), atol=1e-6)
    # the model-level entry point gives the same bits, at the model input size by default
    same = scores_and_maps(model, out, ScoringConfig(sigma=0.0))
    assert torch.equal(same[0], scores) and torch.equal(same[1], maps)
    # a single-tap map is that tap's upsampled probability
    one = anomaly_maps(out.tap_patch_logits, model.config.taps, ScoringConfig(sigma=0.0, map_taps=(21,)), 84)
    assert torch.allclose(one, upsample(out.tap_maps[2], 84), atol=1e-6)


def test_logit_margin_map_is_monotone_per_tap_but_not_after_averaging():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 4, 4, 2, generator=g) * 3
    single = ScoringConfig(sigma=0.0, map_taps=(1,))
    a = anomaly_maps(logits, (1, 2), single, 4)
    b = anomaly_maps(logits, (1, 2), ScoringConfig(sigma=0.0, map_taps=(1,), map_kind="logit_margin"), 4)
    assert torch.equal(a.flatten().argsort(), b.flatten().argsort())


def test_config_validation():
    with pytest.raises(ConfigError, match="eval.map_kind"):
        ScoringConfig(map_kind="entropy").validate()
    with pytest.raises(ConfigError, match="eval.tap_aggregation"):
        ScoringConfig(tap_aggregation="median").validate()
    with pytest.raises(ConfigError, match="eval.tap_weights"):
        ScoringConfig(tap_aggregation="weighted").validate()
    with pytest.raises(ConfigError, match="eval.sigma"):
        ScoringConfig(sigma=-1).validate()


def test_eval_config_is_the_scoring_config_with_its_defaults():
    from feclip.config import EvalConfig

    assert issubclass(EvalConfig, ScoringConfig)
    assert EvalConfig().scoring() == ScoringConfig()
    cfg = EvalConfig(map_taps=[21, 23], score_taps=[], tap_weights=[1.0, 2.0]).scoring()
    assert cfg.map_taps == (21, 23) and cfg.score_taps is None and cfg.tap_weights == (1.0, 2.0)
    with pytest.raises(ConfigError, match="eval.sigma"):
        EvalConfig(sigma=-1.0).scoring()

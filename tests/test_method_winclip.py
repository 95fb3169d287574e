"""WinCLIP (feclip.methods.winclip): pinned to anomalib's WinClipModel, and its parts checked by hand.

The pin: scripts/peers/pin_winclip.py ran anomalib's zero-shot model on the tiny random CLIP of
:func:`build_tiny_clip` and stored its outputs in tests/data/peers/winclip.npz, for both window layouts
(anomalib with open_clip 2.24.0, its lock file's: ``per_window``; with open_clip >= 2.26: ``transposed``).
Measured when pinned: max abs difference 3.0e-7 (per_window) and 1.8e-7 (transposed), fp32 on the CPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import REPO, load_script, make_tiny_clip

from feclip.errors import ConfigError
from feclip.methods.base import MethodOutput
from feclip.methods.winclip import (
    WINCLIP_TEMPLATES,
    WinClip,
    WinClipConfig,
    anomalous_probability,
    harmonic_aggregation,
    winclip_prompts,
    window_indices,
)

FIXTURE = REPO / "tests" / "data" / "peers" / "winclip.npz"
TOLERANCE = 1e-5  # fp32 rounding: the pin measured <= 3e-7


def _pin_script():
    return load_script("scripts/peers/pin_winclip.py")


@pytest.fixture(scope="module")
def pinned():
    """``(fixture, clip, images)``: the stored reference and the same CLIP and images rebuilt here."""
    pin = _pin_script()
    fixture = np.load(FIXTURE, allow_pickle=False)
    assert int(fixture["clip_seed"]) == pin.CLIP_SEED and int(fixture["image_seed"]) == pin.IMAGE_SEED
    clip = pin.build_tiny_clip()
    assert pin.weights_sha256(clip) == str(fixture["weights_sha256"]), (
        "the tiny CLIP drawn from the fixture's seed has other weights than when it was pinned "
        "(torch's RNG or open_clip's init changed): rerun scripts/peers/pin_winclip.py"
    )
    images = pin.make_images(clip.visual.image_size[0])
    assert pin.tensor_sha256(images) == str(fixture["images_sha256"]), "the fixture's images changed"
    return fixture, clip, images


@pytest.mark.parametrize("layout", ["per_window", "transposed"])
def test_matches_anomalib(pinned, layout):
    fixture, clip, images = pinned
    method = WinClip(clip, WinClipConfig(window_layout=layout), precision="fp32")
    out = method(images)
    assert isinstance(out, MethodOutput)
    ref_scores = torch.from_numpy(fixture[f"{layout}/image_scores"])
    ref_maps = torch.from_numpy(fixture[f"{layout}/maps"])
    ref_text = torch.from_numpy(fixture[f"{layout}/text_embeddings"])
    assert out.image_scores.shape == ref_scores.shape == (len(images),)
    assert out.maps.shape == ref_maps.shape == (len(images), *images.shape[-2:])
    assert out.image_scores.dtype == out.maps.dtype == torch.float32
    torch.testing.assert_close(method.text_embeddings, ref_text / ref_text.norm(dim=-1, keepdim=True))
    diff = max((out.image_scores - ref_scores).abs().max().item(), (out.maps - ref_maps).abs().max().item())
    assert diff < TOLERANCE, f"{layout}: max abs difference {diff:.2e} with anomalib"


def test_layouts_differ_and_transposed_is_flat(pinned):
    """The two stored references are not the same numbers: the pin discriminates the layouts; the
    transposed one gives every window the same embedding, so each map is flat."""
    fixture, _, _ = pinned
    per_window, transposed = fixture["per_window/maps"], fixture["transposed/maps"]
    assert np.abs(per_window - transposed).max() > 1e-2
    flat = transposed.reshape(len(transposed), -1)
    assert np.ptp(flat, axis=1).max() < 1e-5
    assert np.ptp(per_window.reshape(len(per_window), -1), axis=1).min() > 1e-2


def test_window_indices_by_hand():
    # a 3x4 grid (ids 0..11, row-major), 2x2 windows, stride 1: 2 x 3 windows
    assert window_indices((3, 4), 2).tolist() == [
        [0, 1, 4, 5],
        [1, 2, 5, 6],
        [2, 3, 6, 7],
        [4, 5, 8, 9],
        [5, 6, 9, 10],
        [6, 7, 10, 11],
    ]
    # a 4x4 grid, 3x3 windows: 4 windows of 9 patches
    w3 = window_indices((4, 4), 3)
    assert w3.shape == (4, 9)
    assert w3[3].tolist() == [5, 6, 7, 9, 10, 11, 13, 14, 15]
    # stride 2 on a 4x4 grid: non-overlapping 2x2 blocks
    assert window_indices((4, 4), 2, stride=2).tolist() == [
        [0, 1, 4, 5],
        [2, 3, 6, 7],
        [8, 9, 12, 13],
        [10, 11, 14, 15],
    ]
    assert window_indices((6, 6), 1).tolist() == [[i] for i in range(36)]
    with pytest.raises(ConfigError, match="does not fit"):
        window_indices((2, 5), 3)


def test_harmonic_aggregation_by_hand():
    # 2x3 grid, 2x2 windows: A = {0,1,3,4} score 0.5, B = {1,2,4,5} score 0.25
    windows = window_indices((2, 3), 2)
    scores = torch.tensor([[0.5, 0.25], [1.0, 1.0]])
    got = harmonic_aggregation(scores, windows, (2, 3))
    # patches 0, 3 only in A: 0.5; 2, 5 only in B: 0.25; 1, 4 in both: 2 / (1/0.5 + 1/0.25) = 1/3
    third = 1.0 / 3.0
    expected = torch.tensor([[[0.5, third, 0.25], [0.5, third, 0.25]], [[1.0] * 3, [1.0] * 3]])
    torch.testing.assert_close(got, expected)


def test_harmonic_aggregation_uncovered_and_zero():
    # 1x3 grid, 1x1 window on the middle patch only: the others are in no window -> 0
    got = harmonic_aggregation(torch.tensor([[0.8]]), torch.tensor([[1]]), (1, 3))
    torch.testing.assert_close(got, torch.tensor([[[0.0, 0.8, 0.0]]]))
    # a zero window score makes its patches 0 (1/0 = inf), the others keep their mean
    windows = window_indices((1, 3), 1)
    got = harmonic_aggregation(torch.tensor([[0.0, 0.5, 0.2]]), windows, (1, 3))
    torch.testing.assert_close(got, torch.tensor([[[0.0, 0.5, 0.2]]]))


def test_anomalous_probability_by_hand():
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalised inside: e_normal = x, e_anomalous = y
    emb = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    got = anomalous_probability(emb, text, temperature=0.5)
    # cosines (1, 0) -> logits (2, 0) -> p = 1 / (1 + e^2); equal cosines -> 0.5
    torch.testing.assert_close(got, torch.tensor([1.0 / (1.0 + math.exp(2.0)), 0.5]))


def test_prompt_ensemble():
    normal, anomalous = winclip_prompts(WinClipConfig(object_word="bottle"))
    assert len(WINCLIP_TEMPLATES) == 21
    assert len(normal) == 7 * 21 and len(anomalous) == 4 * 21
    assert normal[0] == "a cropped photo of the bottle."
    assert anomalous[21] == "a cropped photo of the bottle with flaw."
    assert normal.count("a jpeg corrupted photo of the flawless bottle.") == 2  # as listed by anomalib


def test_map_is_harmonic_mean_of_scales():
    """Rebuild the grid map from the parts: image score and one map per scale, harmonic mean."""
    clip = make_tiny_clip(seed=3)
    images = torch.randn(2, 3, 84, 84, generator=torch.Generator().manual_seed(0))
    method = WinClip(clip, WinClipConfig(map_size="grid"), precision="fp32")
    out = method(images)
    assert out.maps.shape == (2, *method.grid)
    text = method.text_embeddings
    t = method.tokens(images)
    s_img = anomalous_probability(method.encode_cls(t), text, 0.07)
    torch.testing.assert_close(out.image_scores, s_img)
    terms = [1.0 / s_img[:, None, None]]
    for windows in method.windows:
        # one window at a time, as its own image-sized forward: the window path in isolation
        emb = torch.stack(
            [method.encode_cls(torch.cat([t[:, :1], t[:, 1 + idx]], dim=1)) for idx in windows], dim=1
        )
        terms.append(1.0 / harmonic_aggregation(anomalous_probability(emb, text, 0.07), windows, method.grid))
    torch.testing.assert_close(out.maps, 3.0 / sum(terms), atol=1e-6, rtol=1e-5)
    # the default map is this one, upsampled bilinearly to the input size
    up = WinClip(clip, WinClipConfig(), precision="fp32")(images).maps
    assert up.shape == (2, 84, 84)
    torch.testing.assert_close(
        up, torch.nn.functional.interpolate(out.maps[:, None], size=(84, 84), mode="bilinear")[:, 0]
    )


def test_windows_are_masked_and_batch_independent():
    """A window's score depends on its own patches only, and an image's outputs not on the batch."""
    clip = make_tiny_clip(seed=4)
    method = WinClip(clip, WinClipConfig(scales=(2,), map_size="grid"), precision="fp32")
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 84, 84, generator=gen)
    both = method(torch.stack([a, b]))
    alone = method(a[None])
    torch.testing.assert_close(both.maps[:1], alone.maps, atol=1e-6, rtol=1e-5)
    # change the bottom-right 14x14 patch only: windows away from it keep their embedding
    a2 = a.clone()
    a2[:, -14:, -14:] += 1.0
    t, t2 = method.tokens(a[None]), method.tokens(a2[None])
    windows = method.windows[0]
    e, e2 = method.window_embeddings(t, windows), method.window_embeddings(t2, windows)
    last = method.grid[0] * method.grid[1] - 1
    holds = (windows == last).any(dim=1)
    torch.testing.assert_close(e[:, ~holds], e2[:, ~holds])
    assert (e[:, holds] - e2[:, holds]).abs().max() > 1e-4


def test_normalize_prompts_switch_and_scales():
    clip = make_tiny_clip(seed=5)
    raw = WinClip(clip, WinClipConfig(), precision="fp32").text_embeddings
    normed = WinClip(clip, WinClipConfig(normalize_prompts=True), precision="fp32").text_embeddings
    assert raw.shape == normed.shape == (2, 32)
    torch.testing.assert_close(raw.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(raw, normed)
    # no window scale: the map is the image score everywhere
    images = torch.randn(1, 3, 84, 84)
    out = WinClip(clip, WinClipConfig(scales=(), map_size="grid"), precision="fp32")(images)
    torch.testing.assert_close(out.maps, out.image_scores.view(1, 1, 1).expand(1, 6, 6))


def test_bf16_close_to_fp32():
    clip = make_tiny_clip(seed=6)
    images = torch.randn(2, 3, 84, 84, generator=torch.Generator().manual_seed(2))
    fp32 = WinClip(clip, precision="fp32")(images)
    bf16 = WinClip(clip, precision="bf16")(images)
    assert bf16.maps.dtype == torch.float32
    assert (fp32.maps - bf16.maps).abs().max() < 5e-2
    assert next(clip.parameters()).dtype == torch.float32  # the CLIP's weights are left as they were


def test_config_errors():
    clip = make_tiny_clip(seed=7)
    for bad, match in [
        ({"map_size": "pixels"}, "map_size"),
        ({"window_layout": "both"}, "window_layout"),
        ({"temperature": 0.0}, "temperature"),
        ({"scales": (2, 7)}, "token grid"),
        ({"scales": (0,)}, "scales"),
        ({"window_stride": 0}, "window_stride"),
        ({"templates": ()}, "templates"),
    ]:
        with pytest.raises(ConfigError, match=match):
            WinClip(clip, WinClipConfig(**bad))
    with pytest.raises(ConfigError, match="precision"):
        WinClip(clip, precision="fp16")
    with pytest.raises(ConfigError, match="images must have shape"):
        WinClip(clip, precision="fp32")(torch.randn(1, 3, 64, 64))

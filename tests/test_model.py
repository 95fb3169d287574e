"""FE-CLIP model: agreement with open_clip, where the adapters act, gradients, options, checkpoints."""

import dataclasses
import itertools

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_clip, make_tiny_feclip
from conftest import randomize_adapters as random_adapters

from feclip.errors import CheckpointMismatchError, ConfigError
from feclip.models import FEClip, FEClipConfig, load_adapters, save_adapters
from feclip.models.prompts import PAPER_PROMPTS
from feclip.scoring import ScoringConfig, score_output

TINY_TAPS = (15, 18, 21, 23)


@pytest.fixture(scope="module")
def clip():
    # a random CLIP starts at logit scale 1/0.07, the paper's temperature; OpenAI's trained value is 100
    return make_tiny_clip(logit_scale=100.0)


@pytest.fixture()
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 84, 84, generator=g)


def make(clip, **kw):
    return make_tiny_feclip(clip, **kw)


def randomize_adapters(model, scale=0.5):
    random_adapters(model, seed=7, scale=scale)


def scored(model, out):
    """Image scores (B,) and unsmoothed maps (B, S, S) of a model output (feclip.scoring's defaults)."""
    return score_output(out, model.config.taps, ScoringConfig(sigma=0.0), model.image_size, model.logit_scale)


def test_output_shapes_match_the_design(clip, images):
    model = make(clip)
    out = model(images)
    # the model returns its raw per-tap outputs only; feclip.scoring makes the scores and maps
    assert {f.name for f in dataclasses.fields(out)} == {"tap_cls_logits", "tap_patch_logits", "tap_tokens"}
    image_score, anomaly_map = scored(model, out)
    assert image_score.shape == (3,)
    assert anomaly_map.shape == (3, 84, 84)
    assert out.tap_scores.shape == (4, 3)
    assert out.tap_maps.shape == (4, 3, 6, 6)
    assert model.text_embeddings.shape == (2, 32)
    assert torch.allclose(model.text_embeddings.norm(dim=-1), torch.ones(2))
    assert torch.allclose(image_score, out.tap_scores.mean(0))
    assert ((out.tap_maps > 0) & (out.tap_maps < 1)).all()
    up = F.interpolate(out.tap_maps.mean(0)[:, None], size=(84, 84), mode="bilinear", align_corners=False)[
        :, 0
    ]
    assert torch.allclose(anomaly_map, up)


def test_last_tap_with_lambda_zero_equals_open_clip_zero_shot(clip, images):
    model = make(clip, lam=0.0)
    randomize_adapters(model)  # lam = 0 must switch them off entirely
    out = model(images)
    feats = F.normalize(clip.encode_image(images), dim=-1)
    tok = open_clip.get_tokenizer("feclip-tiny")
    text = F.normalize(clip.encode_text(tok(list(PAPER_PROMPTS))), dim=-1)
    expected = (feats @ text.T / 0.07).softmax(-1)[:, 1]
    assert torch.allclose(out.tap_scores[-1], expected, atol=1e-6)
    assert torch.allclose(model.text_embeddings, text, atol=1e-6)


def test_prefix_equals_open_clip_intermediate_tokens(clip, images):
    model = make(clip)
    inter = clip.visual.forward_intermediates(images, indices=[15], intermediates_only=True)
    ref = inter["image_intermediates"][0].flatten(2).transpose(1, 2)  # (B, h*w, D)
    assert torch.allclose(model.prefix(images)[:, 1:], ref, atol=1e-5)


def test_first_tap_score_does_not_depend_on_adapters(clip, images):
    a = make(clip)
    b = make(clip)
    randomize_adapters(b)
    out_a, out_b = a(images), b(images)
    assert torch.allclose(out_a.tap_scores[0], out_b.tap_scores[0])
    assert not torch.allclose(out_a.tap_scores[1:], out_b.tap_scores[1:])


def test_adapters_change_tokens_only_from_their_tap_on(clip, images):
    model = make(clip)
    randomize_adapters(model)
    out = model(images, return_tokens=True)
    plain = clip.visual.forward_intermediates(images, indices=list(TINY_TAPS), intermediates_only=True)
    plain = [t.permute(0, 2, 3, 1) for t in plain["image_intermediates"]]  # (B, h, w, D)
    # at the first tap the input of the adapter is the plain CLIP token grid, the output is the fusion
    first = model.adapters["15"](plain[0])
    assert torch.allclose(out.tap_tokens[0], first, atol=1e-5)
    for fused, ref in zip(out.tap_tokens, plain):
        assert not torch.allclose(fused, ref, atol=1e-4)
    # and nothing before the first tap moved
    assert torch.allclose(model.prefix(images), make(clip).prefix(images))


def test_only_adapters_and_fc_patch_get_gradients(clip, images):
    model = make(clip)
    model.train()
    assert not model.clip.training and model.adapters.training
    out = model(images)
    (out.tap_maps.mean() + out.tap_scores.mean()).backward()
    for name, p in model.named_parameters():
        trainable = name.startswith(("adapters.", "fc_patch."))
        assert p.requires_grad == trainable, name
        if trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


OPTIONS = [
    dict(adapters="ffe"),
    dict(adapters="lfs"),
    dict(adapters="conv"),
    dict(transform="fft"),
    dict(transform="fft", lfs_stat="abs"),
    dict(lfs_stat="abs"),
    dict(lfs_stat="power"),
    dict(lfs_stat="log_abs"),
    dict(lfs_kernel=5),
    dict(p=4, q=5),  # 6 x 6 grid is not divisible by 4: padded and cropped back
    dict(temperature=0.01),
    dict(use_clip_logit_scale=True),
    dict(fc_patch_init="clip_proj"),
    dict(prompts="ensemble"),
    dict(normal_prompt="a flawless part", abnormal_prompt="a broken part"),
    dict(ln_post=False),
    dict(taps=(23,)),
    dict(taps=(0, 8, 15, 23)),
    dict(taps=(5, 11, 17, 23)),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_option_builds_runs_and_changes_the_output(clip, images, options):
    base = make(clip)
    model = make(clip, **options)
    out = model(images)
    assert out.tap_maps.shape == (len(model.config.taps), 3, 6, 6)
    image_score, anomaly_map = scored(model, out)
    assert torch.isfinite(anomaly_map).all() and torch.isfinite(image_score).all()
    out.tap_maps.mean().backward()
    ref = base(images)
    if options.get("taps") == (5, 11, 17, 23) or "taps" not in options:
        assert not torch.allclose(out.tap_maps, ref.tap_maps) or not torch.allclose(
            out.tap_scores, ref.tap_scores
        )


def test_parameter_counts_follow_the_adapter_set(clip):
    d, e = 32, 32
    ffe = d * d + d
    lfs = d * d * 9 + d
    counts = {
        "both": 4 * (ffe + lfs),
        "ffe": 4 * ffe,
        "lfs": 4 * lfs,
        "conv": 4 * lfs,  # same parameter count as LFS, as in the paper's baseline
    }
    for adapters, n in counts.items():
        model = make(clip, adapters=adapters)
        got = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert got == n + d * e + e, adapters


def test_fc_patch_from_clip_projection(clip):
    model = make(clip, fc_patch_init="clip_proj")
    assert torch.equal(model.fc_patch.weight, clip.visual.proj.T)
    assert torch.count_nonzero(model.fc_patch.bias) == 0


def test_logit_scale_option(clip, images):
    model = make(clip, use_clip_logit_scale=True)
    out = model(images)
    margin = out.tap_cls_logits[..., 1] - out.tap_cls_logits[..., 0]
    fixed = make(clip)(images)
    fixed_margin = fixed.tap_cls_logits[..., 1] - fixed.tap_cls_logits[..., 0]
    ratio = clip.logit_scale.exp() * 0.07
    assert torch.allclose(margin, fixed_margin * ratio, atol=1e-4)


@pytest.mark.parametrize(
    "options,field",
    [
        (dict(taps=(15, 24)), "taps"),
        (dict(taps=(-1, 3)), "taps"),
        (dict(taps=(18, 15)), "taps"),
        (dict(taps=()), "taps"),
        (dict(p=7), "p"),
        (dict(q=9), "q"),
        (dict(lfs_stat="median"), "lfs_stat"),
        (dict(adapters="all"), "adapters"),
        (dict(transform="wavelet"), "transform"),
        (dict(fc_patch_init="zeros"), "fc_patch_init"),
        (dict(prompts="learned"), "prompts"),
        (dict(lam=1.5), "lam"),
        (dict(temperature=0.0), "temperature"),
        (dict(lfs_kernel=4), "lfs_kernel"),
    ],
)
def test_bad_options_name_the_field(clip, options, field):
    with pytest.raises(ConfigError, match=f"model.{field}"):
        FEClip(clip, FEClipConfig(**options))


def test_bad_options_list_the_allowed_values(clip):
    with pytest.raises(ConfigError, match=r"\('mean', 'abs', 'power', 'log_abs'\)"):
        FEClip(clip, FEClipConfig(lfs_stat="median"))


def test_wrong_image_size_is_refused(clip):
    model = make(clip)
    with pytest.raises(ConfigError, match=r"\(B, 3, 84, 84\)"):
        model(torch.zeros(1, 3, 98, 98))


def test_checkpoint_round_trip(clip, images, tmp_path):
    model = make(clip)
    randomize_adapters(model)
    path = save_adapters(model, tmp_path / "adapters.safetensors", {"seed": "42"})
    fresh = make(clip)
    meta = load_adapters(fresh, path)
    assert meta["seed"] == "42" and meta["backbone"] == "feclip-tiny"
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, fresh.trainable_state_dict()[k]), k
    assert torch.equal(scored(model, model(images))[1], scored(fresh, fresh(images))[1])
    assert set(model.trainable_state_dict()) == {
        k for k, _ in model.named_parameters() if not k.startswith("clip.")
    }
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_from_other_taps_or_adapters_is_refused(clip, tmp_path):
    path = save_adapters(make(clip), tmp_path / "a.safetensors")
    with pytest.raises(CheckpointMismatchError, match="tap set"):
        load_adapters(make(clip, taps=(20, 21, 22, 23)), path)
    with pytest.raises(CheckpointMismatchError, match="does not fit"):
        load_adapters(make(clip, adapters="ffe"), path)


def test_config_is_a_plain_dataclass():
    fields = {f.name for f in dataclasses.fields(FEClipConfig)}
    assert {
        "taps",
        "lam",
        "p",
        "q",
        "lfs_stat",
        "adapters",
        "transform",
        "temperature",
        "prompts",
        "ln_post",
    } <= fields
    assert FEClipConfig(taps=[1, 2]).taps == (1, 2)


def test_batch_first_flag_is_read_from_open_clip(clip, images):
    model = make(clip)
    assert model.batch_first == clip.visual.transformer.batch_first
    # feeding (L, B, D) to a batch-first block would mix images: results must not depend on batch peers
    one = scored(model, model(images[:1]))[1]
    assert torch.allclose(one, scored(model, model(images))[1][:1], atol=1e-5)


def test_option_grid_runs_quickly(clip, images):
    # a compact cross of the options most likely to interact
    for adapters, transform, stat in itertools.product(["both", "lfs"], ["dct", "fft"], ["mean", "log_abs"]):
        out = make(clip, adapters=adapters, transform=transform, lfs_stat=stat)(images[:1])
        assert torch.isfinite(out.tap_maps).all()


def test_plain_block_equals_open_clip_block_forward_and_backward(clip):
    from feclip.models.feclip import is_plain_block, plain_block

    blk = clip.visual.transformer.resblocks[7]
    assert is_plain_block(blk)
    x = torch.randn(3, 37, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ours = plain_block(blk, x)
    theirs = blk(x)
    assert torch.allclose(ours, theirs, atol=1e-5)
    g_ours = torch.autograd.grad(ours.square().sum(), x)[0]
    g_theirs = torch.autograd.grad(theirs.square().sum(), x)[0]
    assert torch.allclose(g_ours, g_theirs, atol=1e-4)


def test_training_and_inference_paths_agree(clip, images):
    model = make(clip)
    randomize_adapters(model, scale=0.05)
    with torch.no_grad():
        inference = model(images).tap_maps
    training = model(images).tap_maps  # adapters require grad: the plain-block path after the first tap
    assert torch.allclose(inference, training, atol=1e-5)


def test_the_head_runs_in_fp32_under_bf16_autocast(clip, images):
    """The logits the metrics rank are never rounded to bf16, whatever the blocks before ran in."""
    model = make(clip, taps=TINY_TAPS)
    randomize_adapters(model)
    g = torch.Generator().manual_seed(5)
    n, b, (h, w), d = len(TINY_TAPS), 4, model.grid, clip.visual.conv1.out_channels
    cls = torch.randn(n, b, d, generator=g).bfloat16()  # tap features as bf16 blocks leave them
    patches = torch.randn(n, b, h, w, d, generator=g).bfloat16()
    with torch.no_grad():
        plain = model.head(cls, patches)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_amp = model.head(cls, patches)
            whole = model(images)
    for name in ("tap_cls_logits", "tap_patch_logits", "tap_scores", "tap_maps"):
        assert getattr(under_amp, name).dtype == torch.float32, name
        assert torch.equal(getattr(under_amp, name), getattr(plain, name)), name
    assert whole.tap_patch_logits.dtype == torch.float32 and whole.tap_cls_logits.dtype == torch.float32


# -- taps are 0-based -----------------------------------------------------------------------------


def test_a_tap_equal_to_the_depth_reads_as_one_based_and_gives_the_zero_based_taps(clip):
    """AnomalyCLIP's --features_list 6 12 18 24 is 1-based: 24 is no block of a 24-block ViT."""
    with pytest.raises(ConfigError) as info:
        FEClip(clip, FEClipConfig(taps=(6, 12, 18, 24)))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("model.taps are 0-based block indices in [0, 23] for this 24-block backbone")
    assert message.endswith("the 0-based taps are model.taps=[5,11,17,23]")
    assert make(clip, taps=(5, 11, 17, 23)).config.taps == (5, 11, 17, 23)  # what it suggests is valid


@pytest.mark.parametrize(
    "taps,suggested",
    [((0, 24), None), ((23, 24), "[22,23]"), ((5, 25), None), ((-1, 3), None)],
)
def test_out_of_range_taps_say_they_are_zero_based(taps, suggested):
    with pytest.raises(ConfigError, match=r"^model\.taps are 0-based block indices in \[0, 23\]") as info:
        FEClipConfig(taps=taps).validate(depth=24)
    message = str(info.value)
    assert ("the 0-based taps are model.taps=" in message) == (suggested is not None)
    if suggested is not None:
        assert message.endswith(f"model.taps={suggested}")
    assert ("24 is the block count, not an index (the last block is 23)" in message) == (24 in taps)


def test_negative_taps_are_refused_without_a_depth():
    with pytest.raises(ConfigError, match=r"model\.taps are 0-based block indices \(>= 0\), got \[-1, 3\]"):
        FEClipConfig(taps=(-1, 3)).validate()
    FEClipConfig(taps=(0, 24)).validate()  # without the depth, 24 may be a block of a deeper backbone


def test_the_run_checks_taps_against_the_backbone_depth_before_building_it():
    from feclip.engine.run import check_taps_fit

    # ViT-L/14@336's depth from open_clip's model config alone: no weights are read
    with pytest.raises(ConfigError, match=r"model\.taps=\[5,11,17,23\]$"):
        check_taps_fit(FEClipConfig(taps=(6, 12, 18, 24)), "ViT-L-14-336-quickgelu")
    check_taps_fit(FEClipConfig(taps=(5, 11, 17, 23)), "ViT-L-14-336-quickgelu")


def test_feclip_train_refuses_one_based_taps_in_one_line_with_exit_2(tmp_path):
    from conftest import train_cli

    res = train_cli(["backbone=tiny", "model.taps=[6,12,18,24]", f"paths.results_dir={tmp_path}"])
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert "model.taps are 0-based block indices in [0, 23]" in lines[0]
    assert lines[0].endswith("the 0-based taps are model.taps=[5,11,17,23]")
    assert not list(tmp_path.glob("*/*/seed=*"))  # refused before the run folder was made

"""load_clip: checkpoint files of every kind, the offline error, bad names; never the network."""

import time

import open_clip
import pytest
import torch
from conftest import make_tiny_clip
from safetensors.torch import save_file

from feclip.errors import ConfigError, FEClipError, WeightsNotFoundError
from feclip.models import clip as clip_module
from feclip.models import load_clip


class Payload:
    """Any non-tensor object: a weights-only load must refuse to build it."""


@pytest.fixture(scope="module")
def reference():
    return make_tiny_clip(3)


@pytest.fixture()
def image():
    return torch.randn(2, 3, 84, 84, generator=torch.Generator().manual_seed(0))


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_random_tiny_model_is_frozen_and_in_eval(reference):
    assert not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    assert reference.feclip_model_name == "feclip-tiny"
    assert isinstance(reference.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


def test_quick_gelu_can_be_switched_off():
    model = load_clip("feclip-tiny", quick_gelu=False)
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pt"])
def test_loads_plain_checkpoint_files(reference, tmp_path, suffix, image):
    path = tmp_path / f"weights{suffix}"
    sd = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if suffix == ".safetensors":
        save_file(sd, str(path))
    elif suffix == ".bin":
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        torch.save(sd, path)
    model = load_clip("feclip-tiny", pretrained=path)
    assert _same_weights(model, reference)
    assert torch.equal(model.encode_image(image), reference.encode_image(image))


def test_loads_openai_style_torchscript_archive(reference, tmp_path, image):
    traced = torch.jit.trace(reference, (image, open_clip.tokenize(["x"])), strict=False)
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(traced, str(path))
    model = load_clip("feclip-tiny", pretrained=str(path), quick_gelu=None)
    assert _same_weights(model, reference)
    assert clip_module._is_torchscript(path)


def test_pickled_objects_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weights": Payload()}, path)
    with pytest.raises(FEClipError, match="evil.pt: not a weights-only"):
        load_clip("feclip-tiny", pretrained=path)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"visual.proj": torch.zeros(3, 3)}, str(path))
    with pytest.raises(FEClipError, match="other.safetensors: does not match"):
        load_clip("feclip-tiny", pretrained=path)


def test_image_size_override_interpolates_positions(reference, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = load_clip("feclip-tiny", pretrained=path, image_size=112)
    assert model.visual.positional_embedding.shape == (8 * 8 + 1, 32)
    assert model.encode_image(torch.zeros(1, 3, 112, 112)).shape == (1, 32)


def test_offline_tag_fails_fast_with_the_cache_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(
        clip_module, "hub_reachable", lambda timeout=3.0: pytest.fail("must not touch the network")
    )
    t0 = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as err:
        load_clip("ViT-L-14-336-quickgelu", pretrained="openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    assert "models--timm--vit_large_patch14_clip_336.openai" in msg
    assert "ViT-L-14-336px.pt" in msg and "pretrained=" in msg


def test_unreachable_hub_fails_fast_without_retrying(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("FECLIP_OFFLINE", raising=False)
    calls = []
    monkeypatch.setattr(clip_module, "hub_reachable", lambda timeout=3.0: calls.append(timeout) or False)
    with pytest.raises(WeightsNotFoundError, match="no network"):
        load_clip("ViT-L-14-336-quickgelu", pretrained="openai", cache_dir=str(tmp_path))
    assert calls == [3.0]


def test_cached_weights_are_found_in_the_hugging_face_layout(monkeypatch, tmp_path):
    repo = tmp_path / "models--timm--vit_large_patch14_clip_336.openai"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snap / "open_clip_model.safetensors").write_bytes(b"x")
    found = clip_module.find_cached_weights("ViT-L-14-336-quickgelu", "openai", cache_dir=str(tmp_path))
    assert found == snap / "open_clip_model.safetensors"


def test_unknown_model_lists_known_names():
    with pytest.raises(
        ConfigError,
        match="unknown CLIP model 'ViT-Q-99'.*ViT-L-14-336-quickgelu.*feclip-tiny|feclip-tiny.*ViT-L-14-336",
    ):
        load_clip("ViT-Q-99")


def test_unknown_tag_or_missing_file_is_explained():
    with pytest.raises(ConfigError, match="neither a tag of 'feclip-tiny'"):
        load_clip("feclip-tiny", pretrained="/no/such/file.pt")


def test_precision_is_validated_and_applied():
    with pytest.raises(ConfigError, match="precision must be one of"):
        load_clip("feclip-tiny", precision="int4")
    assert load_clip("feclip-tiny", precision="bf16").visual.conv1.weight.dtype == torch.bfloat16

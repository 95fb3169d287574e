"""Pin feclip's AnomalyCLIP to the reference implementation (zqhang/AnomalyCLIP) on the same weights.

Usage (the reference tree extracted outside the repository, e.g. with
``git --git-dir=<mirror> archive HEAD | tar -x -C /tmp/peers/anomalyclip``)::

    python scripts/peers/pin_anomalyclip.py --reference /tmp/peers/anomalyclip            # writes the fixture
    python scripts/peers/pin_anomalyclip.py --reference ... --model ViT-L-14-336-quickgelu --images 1 --no-save

What it does: draws the tiny random CLIP (``feclip-tiny``, fixed seed), converts its state dict into the
reference's own CLIP class (``AnomalyCLIP_lib.AnomalyCLIP``; open_clip keeps OpenAI's key names, so the
conversion is the identity), builds the reference's prompt learner on it and sets its learnable tensors
to fixed random values, then runs the reference's computation as train.py (loss, one backward) and
test.py (image score, map before smoothing) on a few fixed random images and masks, for two tap sets:
the published one (the top block) and train.py's default (6, 12, 18, 24). The same is run through
:class:`feclip.methods.anomalyclip.AnomalyClip` and the differences printed. With the tiny CLIP the
reference's outputs are written to ``tests/data/peers/anomalyclip.{npz,json}``, which
tests/test_method_anomalyclip.py compares against.

The helpers that do not need the reference (:func:`make_inputs`, :func:`weights_checksum`,
:func:`prompt_values`, :func:`run_ours`) are imported by that test.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "data" / "peers" / "anomalyclip"
CLIP_SEED = 1234  # the tiny CLIP's weights: load_clip("feclip-tiny", seed=CLIP_SEED)
INPUT_SEED = 5678  # images, masks
PROMPT_SEED = 91011  # the learnable prompt values
PROMPT_STD = 0.1
TAP_SETS = {"top": (23,), "multi": (5, 11, 17, 23)}  # 0-based; the reference's --features_list minus 1


# -- what the test shares ---------------------------------------------------------------------------


def weights_checksum(clip: torch.nn.Module) -> str:
    """SHA-256 of the CLIP's state dict (sorted keys, each tensor's fp32 bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(clip.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def tensor_checksum(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def make_inputs(n_images: int, size: int, seed: int = INPUT_SEED):
    """``(images (B, 3, S, S), masks (B, S, S) in {0, 1}, labels (B,))``: image 0 normal (empty mask),
    the others anomalous with a random rectangle."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, 3, size, size, generator=g)
    masks = torch.zeros(n_images, size, size)
    labels = torch.zeros(n_images, dtype=torch.long)
    for i in range(1, n_images):
        y0, x0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
        hh, ww = (int(v) for v in torch.randint(size // 8, size // 2, (2,), generator=g))
        masks[i, y0 : y0 + hh, x0 : x0 + ww] = 1
        labels[i] = 1
    return images, masks, labels


def prompt_values(width: int, n_ctx: int = 12, depth: int = 9, t_n_ctx: int = 4, seed: int = PROMPT_SEED):
    """The values given to the learnable prompts of both implementations (reference key names)."""
    g = torch.Generator().manual_seed(seed)
    values = {
        "ctx_pos": torch.randn(1, 1, n_ctx, width, generator=g) * PROMPT_STD,
        "ctx_neg": torch.randn(1, 1, n_ctx, width, generator=g) * PROMPT_STD,
    }
    for i in range(depth - 1):
        values[f"compound_prompts_text.{i}"] = torch.randn(t_n_ctx, width, generator=g) * PROMPT_STD
    return values


def run_ours(clip, taps, prompts, images, masks, labels, **config):
    """feclip's AnomalyClip at fp32: scores, maps, total loss, loss parts, prompt gradients, token ids."""
    from feclip.methods.anomalyclip import AnomalyClip, AnomalyClipConfig

    model = AnomalyClip(clip, AnomalyClipConfig(taps=taps, **config), precision="fp32")
    model.load_trainable_state_dict(prompts)
    out = model(images)
    total, parts = model.loss(out, masks, labels)
    total.backward()
    grads = {
        k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for k, p in model.named_parameters()
        if p.requires_grad
    }
    return {
        "scores": out.image_scores.detach(),
        "maps": out.maps.detach(),
        "loss": total.detach(),
        "parts": torch.stack([parts["focal"], parts["dice"], parts["image"]]),
        "grads": grads,
        "tokens": model.tokenized_prompts,
    }


# -- the reference ----------------------------------------------------------------------------------


def _import_reference(root: Path):
    """Import the reference's modules from ``root`` (stubs for two imports it does not use here)."""
    sys.path.insert(0, str(root))
    if "thop" not in sys.modules:  # AnomalyCLIP.py imports thop.profile, never calls it
        sys.modules["thop"] = types.SimpleNamespace(profile=None)
    try:
        import pkg_resources  # noqa: F401
    except ImportError:  # prompt_ensemble / model_load only read pkg_resources.packaging.version
        import packaging.version

        sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=packaging)
    with contextlib.redirect_stdout(io.StringIO()):
        lib = importlib.import_module("AnomalyCLIP_lib")
        arch = importlib.import_module("AnomalyCLIP_lib.AnomalyCLIP")
        prompts = importlib.import_module("prompt_ensemble")
        loss = importlib.import_module("loss")
    return lib, arch, prompts, loss


def build_reference(arch, clip, design: dict):
    """The reference's AnomalyCLIP with the open_clip CLIP's weights.

    The reference derives its head counts as ``width // 64``; the tiny CLIP has narrower heads, so the
    head counts are taken from the open_clip model instead (for ViT-L both agree: 16 and 12).
    """
    sd = {k: v.detach().clone().float() for k, v in clip.state_dict().items()}
    vis_heads = clip.visual.transformer.resblocks[0].attn.num_heads
    txt_heads = clip.transformer.resblocks[0].attn.num_heads

    base = arch.VisionTransformer

    class HeadsFromOpenClip(base):
        def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
            super().__init__(input_resolution, patch_size, width, layers, vis_heads, output_dim)

    arch.VisionTransformer = HeadsFromOpenClip
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model = arch.AnomalyCLIP(
                embed_dim=sd["text_projection"].shape[1],
                image_resolution=clip.visual.image_size[0],
                vision_layers=len(clip.visual.transformer.resblocks),
                vision_width=sd["visual.conv1.weight"].shape[0],
                vision_patch_size=sd["visual.conv1.weight"].shape[-1],
                context_length=sd["positional_embedding"].shape[0],
                vocab_size=sd["token_embedding.weight"].shape[0],
                transformer_width=sd["ln_final.weight"].shape[0],
                transformer_heads=txt_heads,
                transformer_layers=len(clip.transformer.resblocks),
                design_details=design,
            )
    finally:
        arch.VisionTransformer = base
    model.load_state_dict(sd, strict=True)
    return model.float().eval()


def run_reference(
    refs, clip, taps, prompts, images, masks, labels, dpam_layer=20, n_ctx=12, depth=9, t_n_ctx=4
):
    """The reference's computation, glued as train.py (loss, backward) and test.py (score, map)."""
    lib, arch, prompt_mod, loss_mod = refs
    design = {
        "Prompt_length": n_ctx,
        "learnabel_text_embedding_depth": depth,
        "learnabel_text_embedding_length": t_n_ctx,
    }
    model = build_reference(arch, clip, design)
    with contextlib.redirect_stdout(io.StringIO()):
        learner = prompt_mod.AnomalyCLIP_PromptLearner(model, design)
    with torch.no_grad():
        for k, p in learner.named_parameters():
            if k in prompts:
                p.copy_(prompts[k])
    model.visual.DAPM_replace(DPAM_layer=dpam_layer)
    features_list = [t + 1 for t in taps]
    size = images.shape[-1]

    def text():
        p, tok, deep = learner(cls_id=None)
        tf = model.encode_text_learn(p, tok, deep).float()
        tf = torch.stack(torch.chunk(tf, dim=0, chunks=2), dim=1)
        return tf / tf.norm(dim=-1, keepdim=True)

    # train.py: one batch
    with torch.no_grad():
        image_features, patch_features = model.encode_image(images, features_list, DPAM_layer=dpam_layer)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text()
    logits = (image_features.unsqueeze(1) @ text_features.permute(0, 2, 1))[:, 0, ...] / 0.07
    image_loss = F.cross_entropy(logits, labels.long())
    focal, dice = loss_mod.FocalLoss(), loss_mod.BinaryDiceLoss()
    l_focal = l_dice = 0
    for pf in patch_features:
        pf = pf / pf.norm(dim=-1, keepdim=True)
        sim, _ = lib.compute_similarity(pf, text_features[0])
        sm = lib.get_similarity_map(sim[:, 1:, :], size).permute(0, 3, 1, 2)
        l_focal = l_focal + focal(sm, masks)
        l_dice = l_dice + dice(sm[:, 1, :, :], masks) + dice(sm[:, 0, :, :], 1 - masks)
    total = 4 * (l_focal + l_dice) + image_loss
    learner.zero_grad()
    total.backward()
    grads = {
        k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for k, p in learner.named_parameters()
        if k in prompts
    }

    # test.py: one image at a time
    with torch.no_grad():
        text_features = text()
        scores, maps = [], []
        for i in range(images.shape[0]):
            img_f, patch_f = model.encode_image(images[i : i + 1], features_list, DPAM_layer=dpam_layer)
            img_f = img_f / img_f.norm(dim=-1, keepdim=True)
            probs = ((img_f @ text_features.permute(0, 2, 1)) / 0.07).softmax(-1)
            scores.append(probs[:, 0, 1])
            tap_maps = []
            for pf in patch_f:
                pf = pf / pf.norm(dim=-1, keepdim=True)
                sim, _ = lib.compute_similarity(pf, text_features[0])
                sm = lib.get_similarity_map(sim[:, 1:, :], size)
                tap_maps.append((sm[..., 1] + 1 - sm[..., 0]) / 2.0)
            maps.append(torch.stack(tap_maps).sum(dim=0))
    tokens = torch.cat(
        [learner.tokenized_prompts_pos.reshape(-1, 77), learner.tokenized_prompts_neg.reshape(-1, 77)]
    )
    return {
        "scores": torch.cat(scores),
        "maps": torch.cat(maps),
        "loss": total.detach(),
        "parts": torch.stack([torch.as_tensor(l_focal), torch.as_tensor(l_dice), image_loss]).detach(),
        "grads": grads,
        "tokens": tokens.long(),
    }


def differences(ours: dict, ref: dict) -> dict:
    """Max abs differences (and relative ones where the scale varies), as plain floats."""

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    out = {
        "scores_max_abs": float((ours["scores"] - ref["scores"]).abs().max()),
        "maps_max_abs": float((ours["maps"] - ref["maps"]).abs().max()),
        "loss_abs": float((ours["loss"] - ref["loss"]).abs()),
        "loss_rel": rel(ours["loss"], ref["loss"]),
        "parts_max_abs": float((ours["parts"] - ref["parts"]).abs().max()),
    }
    out["grads_rel"] = {
        k: rel(ours["grads"][k], ref["grads"][k]) for k in ref["grads"] if ref["grads"][k].any()
    }
    out["grads_max_rel"] = max(
        rel(ours["grads"][k], ref["grads"][k]) for k in ref["grads"] if ref["grads"][k].any()
    )
    out["grads_max_abs"] = max(float((ours["grads"][k] - ref["grads"][k]).abs().max()) for k in ref["grads"])
    return out


def _commit(root: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True, type=Path, help="the extracted zqhang/AnomalyCLIP tree")
    ap.add_argument("--commit", default=None, help="the reference commit (recorded in the fixture)")
    ap.add_argument("--model", default="feclip-tiny")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--no-save", action="store_true", help="print the differences only")
    ap.add_argument("--taps", choices=sorted(TAP_SETS), nargs="+", default=sorted(TAP_SETS))
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from feclip.models import load_clip

    torch.set_num_threads(max(1, torch.get_num_threads()))
    refs = _import_reference(args.reference.resolve())
    clip = load_clip(args.model, pretrained=None, seed=CLIP_SEED)
    size = clip.visual.image_size[0]
    width = clip.ln_final.weight.shape[0]
    images, masks, labels = make_inputs(args.images, size)
    prompts = prompt_values(width)
    arrays, report = {}, {}
    for name in args.taps:
        taps = TAP_SETS[name]
        ref = run_reference(refs, clip, taps, prompts, images, masks, labels)
        ours = run_ours(clip, taps, prompts, images, masks, labels)
        if not torch.equal(ours["tokens"].cpu(), ref["tokens"]):
            raise SystemExit("token ids differ between open_clip's tokenizer and the reference's")
        report[name] = differences(ours, ref)
        print(name, json.dumps(report[name], indent=1))
        arrays.update({f"{name}/{k}": ref[k].numpy() for k in ("scores", "maps", "loss", "parts")})
        arrays.update({f"{name}/grad/{k}": v.numpy() for k, v in ref["grads"].items()})
        arrays["tokens"] = ref["tokens"].numpy().astype(np.int32)
    if args.no_save:
        return 0
    if args.model != "feclip-tiny":
        raise SystemExit("the fixture is made with feclip-tiny only (use --no-save)")
    arrays.update({f"prompt/{k}": v.numpy() for k, v in prompts.items()})
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(FIXTURE.with_suffix(".npz"), **arrays)
    import open_clip

    meta = {
        "reference": "zqhang/AnomalyCLIP",
        "reference_commit": args.commit or _commit(args.reference),
        "model": args.model,
        "clip_seed": CLIP_SEED,
        "clip_sha256": weights_checksum(clip),
        "input_seed": INPUT_SEED,
        "n_images": args.images,
        "inputs_sha256": tensor_checksum(images, masks, labels),
        "prompt_seed": PROMPT_SEED,
        "tap_sets": {k: list(TAP_SETS[k]) for k in args.taps},
        "dpam_layer": 20,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "differences_at_pin_time": report,
    }
    FIXTURE.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    print("wrote", FIXTURE.with_suffix(".npz"), FIXTURE.with_suffix(".npz").stat().st_size, "bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

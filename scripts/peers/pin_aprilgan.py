"""Pin :mod:`feclip.methods.aprilgan` to the authors' code on identical weights and inputs.

Usage::

    python scripts/peers/pin_aprilgan.py /path/to/VAND-APRIL-GAN            # writes the fixture
    python scripts/peers/pin_aprilgan.py REF --model ViT-L-14-336-quickgelu --n-images 1 --no-save

``REF`` is an extracted tree of ``ByChelsea/VAND-APRIL-GAN`` (its ``train.py``, ``model.py``,
``loss.py``, ``prompt_ensemble.py`` and its own modified ``open_clip``); nothing of it is kept.

1. Here: a random CLIP drawn from a fixed seed (``feclip-tiny`` by default, through
   :func:`feclip.models.load_clip`), fixed random images, masks, category names and linear-layer
   weights; the SHA-256 of each.
2. In a child process (the reference's ``open_clip`` package shadows the installed one): the
   reference's own CLIP class built from the same config and loaded with the same state dict, then the
   reference's ``train()`` run for one step on those images, with its data set, model factory,
   linear layer (same weights), losses and optimiser replaced by thin wrappers that feed the inputs
   and record what it computes: the per-tap 2-channel maps its focal loss receives, each focal and
   dice value, the gradients of the linear layers at the optimiser step, the final image features and
   the text features of its prompt ensemble. The image score and the summed map are then formed as its
   ``test.py`` forms them (abnormal entry of ``softmax(100 f @ t)``; sum over taps of the abnormal
   channel). Two edits to the reference's source (in a temporary copy) let it run on a CPU in fp32:
   the attention map it sums into a tensor created with ``.to('cuda')`` (unused downstream) is
   created on the tokens' device; and ``train.py``'s in-place normalisation of the projected tokens
   (``t /= t.norm(...)``) becomes ``t = t / t.norm(...)``. In fp32 the in-place form overwrites the
   input that ``norm``'s backward saved and autograd refuses it; the reference only trains under
   CUDA autocast, where ``norm`` runs on an fp32 copy of the fp16 tokens: the out-of-place form
   computes the same values and gradients.
3. Here again: :class:`~feclip.methods.aprilgan.AprilGan` on the same inputs; the differences are
   printed, and (unless ``--no-save``) the reference's numbers go to ``tests/data/peers/aprilgan.pt``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "data" / "peers" / "aprilgan.pt"
CLIP_SEED = 0  # the random CLIP (load_clip's seed)
DATA_SEED = 1234  # images, masks
FC_SEED = 4321  # the linear layers
CLASS_NAMES = ("bottle", "object", "metal_nut", "object")  # cycled over the images
REFERENCE_COMMIT = "f13b8a634e04f9fde8fa03db125b25af5695d8e1"  # the ByChelsea/VAND-APRIL-GAN commit read
REF_TAPS = (6, 12, 18, 24)  # the reference's 1-based features_list = feclip's (5, 11, 17, 23)


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names and fp32 bytes of ``tensors`` in sorted name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def make_inputs(n: int, size: int, width: int, embed_dim: int, n_taps: int) -> dict:
    """Fixed random inputs: images ``(n, 3, S, S)``, masks ``(n, S, S)`` (every other image anomalous:
    a random rectangle), category names, and linear-layer weights ``fc.<i>.weight/bias``."""
    g = torch.Generator().manual_seed(DATA_SEED)
    images = torch.randn(n, 3, size, size, generator=g)
    masks = torch.zeros(n, size, size)
    for i in range(0, n, 2):
        y0, x0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        hh, ww = torch.randint(size // 8, size // 2, (2,), generator=g).tolist()
        masks[i, y0 : y0 + hh, x0 : x0 + ww] = 1.0
    g = torch.Generator().manual_seed(FC_SEED)
    fc = {}
    for t in range(n_taps):
        fc[f"fc.{t}.weight"] = torch.randn(embed_dim, width, generator=g) * width**-0.5
        fc[f"fc.{t}.bias"] = torch.randn(embed_dim, generator=g) * 0.1
    names = [CLASS_NAMES[i % len(CLASS_NAMES)] for i in range(n)]
    return {"images": images, "masks": masks, "fc": fc, "class_names": names}


def build_clip(model: str, image_size: int | None):
    from feclip.models import load_clip

    return load_clip(model, seed=CLIP_SEED, image_size=image_size)


def model_config(model: str, image_size: int | None) -> dict:
    from feclip.models.clip import _open_clip

    cfg = _open_clip().get_model_config(model)
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = image_size
    return cfg


def run_aprilgan(clip, inputs: dict) -> dict:
    """feclip's side: AprilGan on the inputs, loss and one backward."""
    from feclip.methods.aprilgan import AprilGan, AprilGanConfig

    # a batch of one: the reference's dice then runs over mask rows (AprilGanConfig's switch)
    model = AprilGan(clip, AprilGanConfig(dice_rows_for_one_image=len(inputs["images"]) == 1))
    model.load_trainable_state_dict(inputs["fc"])
    out = model(inputs["images"], inputs["class_names"])
    labels = (inputs["masks"].flatten(1).amax(1) > 0).float()
    total, parts = model.loss(out, inputs["masks"], labels)
    total.backward()
    return {
        "image_scores": out.image_scores.detach(),
        "maps": out.maps.detach(),
        "loss": total.detach(),
        "focal": parts["focal"],
        "dice": parts["dice"],
        "grads": {f"fc.{k}": p.grad.detach().clone() for k, p in model.fc.named_parameters()},
    }


# -- the reference's side (child process) ---------------------------------------------------------


def reference_side(work: Path, ref_dir: Path) -> None:
    """Run the reference's ``train()`` for one step on ``work/inputs.pt``; write ``work/reference.pt``."""
    src = work / "ref"
    shutil.copytree(ref_dir, src, ignore=shutil.ignore_patterns("*.pth", "illustration", ".git"))
    tf = src / "open_clip" / "transformer.py"
    text = tf.read_text()
    cuda_line = "out_attn = torch.zeros([H, H]).to('cuda')"
    if cuda_line not in text:
        raise SystemExit(f"{tf}: the line to make CPU-safe was not found: {cuda_line!r}")
    tf.write_text(text.replace(cuda_line, "out_attn = torch.zeros([H, H]).to(x.device)"))
    tr = src / "train.py"
    text = tr.read_text()
    in_place = "patch_tokens[layer] /= patch_tokens[layer].norm(dim=-1, keepdim=True)"
    if text.count(in_place) != 1:
        raise SystemExit(f"{tr}: the in-place normalisation to rewrite was not found once: {in_place!r}")
    tr.write_text(
        text.replace(
            in_place,
            "patch_tokens[layer] = patch_tokens[layer] / patch_tokens[layer].norm(dim=-1, keepdim=True)",
        )
    )
    sys.modules.setdefault("pkg_resources", types.SimpleNamespace(packaging=None))  # unused import
    sys.path.insert(0, str(src))
    import open_clip as ref_open_clip  # the reference's copy
    import train as ref_train  # its train.py

    if not str(Path(ref_open_clip.__file__)).startswith(str(src)):
        raise SystemExit(f"imported {ref_open_clip.__file__}, not the reference's open_clip")
    inp = torch.load(work / "inputs.pt", weights_only=True)
    cfg = inp["config"]
    clip = ref_open_clip.model.CLIP(**cfg)
    clip.load_state_dict(inp["state_dict"], strict=True)
    clip.eval()
    n = inp["images"].shape[0]
    size = cfg["vision_cfg"]["image_size"]
    record: dict = {"maps": [], "focal": [], "dice": []}

    encode_image = clip.encode_image

    def recording_encode_image(image, out_layers, normalize=False):
        feats, tokens = encode_image(image, out_layers, normalize)
        record["images"], record["image_features"] = image.detach().clone(), feats.detach().clone()
        return feats, tokens

    clip.encode_image = recording_encode_image
    ref_train.open_clip.create_model_and_transforms = lambda *a, **k: (clip, None, None)
    ref_train.open_clip.get_tokenizer = lambda name: ref_open_clip.tokenize

    class Items(torch.utils.data.Dataset):
        def __init__(self, **kwargs):
            pass

        def __len__(self):
            return n

        def get_cls_names(self):
            return sorted(set(inp["class_names"]))

        def __getitem__(self, i):
            return {
                "img": inp["images"][i],
                "img_mask": inp["masks"][i][None],
                "cls_name": inp["class_names"][i],
                "anomaly": int(inp["masks"][i].max() > 0),
                "img_path": f"{i}.png",
            }

    class Linear(ref_train.LinearLayer):
        def __init__(self, *a):
            super().__init__(*a)
            self.load_state_dict(inp["fc"], strict=True)
            record["linear"] = self

    class Focal(ref_train.FocalLoss):
        def forward(self, logit, target):
            record["maps"].append(logit.detach().clone())
            value = super().forward(logit, target)
            record["focal"].append(value.detach().clone())
            return value

    class Dice(ref_train.BinaryDiceLoss):
        def forward(self, input, targets):
            value = super().forward(input, targets)
            record["dice"].append(value.detach().clone())
            return value

    class Adam(torch.optim.Adam):
        def step(self, closure=None):
            record["grads"] = {k: p.grad.detach().clone() for k, p in record["linear"].named_parameters()}
            return super().step(closure)

    text_fn = ref_train.encode_text_with_prompt_ensemble

    def recording_text(*a, **k):
        record["text"] = text_fn(*a, **k)
        return record["text"]

    ref_train.MVTecDataset = Items
    ref_train.LinearLayer = Linear
    ref_train.FocalLoss = Focal
    ref_train.BinaryDiceLoss = Dice
    ref_train.encode_text_with_prompt_ensemble = recording_text
    torch.optim.Adam = Adam
    widths = {"embed_dim": cfg["embed_dim"], "vision_cfg": {"width": cfg["vision_cfg"]["width"]}}
    (work / "cfg.json").write_text(json.dumps(widths))
    args = argparse.Namespace(
        train_data_path=str(work),
        save_path=str(work / "exp"),
        config_path=str(work / "cfg.json"),
        dataset="mvtec",
        model="ViT-pinned",
        pretrained=None,
        features_list=list(REF_TAPS),
        epoch=1,
        learning_rate=0.001,
        batch_size=n,
        image_size=size,
        aug_rate=0.2,
        print_freq=1,
        save_freq=1000,
    )
    ref_train.train(args)

    # the data loader shuffles: put the batch back in the inputs' order
    batch = record["images"]
    perm = [int((batch - inp["images"][i]).abs().flatten(1).amax(1).argmin()) for i in range(n)]
    if sorted(perm) != list(range(n)) or any(
        not torch.equal(batch[perm[i]], inp["images"][i]) for i in range(n)
    ):
        raise SystemExit("could not match the reference's batch to the inputs")
    feats = record["image_features"][perm]
    feats = feats / feats.norm(dim=-1, keepdim=True)
    scores = torch.stack(
        [
            (100.0 * feats[i] @ record["text"][name]).softmax(dim=-1)[1]
            for i, name in enumerate(inp["class_names"])
        ]
    )  # test.py's zero-shot image score
    maps = torch.stack([m[perm][:, 1] for m in record["maps"]]).sum(0)  # test.py: sum of the abnormal channel
    focal, dice = torch.stack(record["focal"]), torch.stack(record["dice"])
    torch.save(
        {
            "image_scores": scores,
            "maps": maps,
            "focal": focal.sum(),
            "dice": dice.sum(),
            "loss": focal.sum() + dice.sum(),
            "grads": record["grads"],
        },
        work / "reference.pt",
    )


# -- driver -----------------------------------------------------------------------------------------


def compare(ours: dict, ref: dict) -> dict[str, tuple[float, float]]:
    """``name -> (max abs difference, that over the largest reference magnitude)`` of every output."""
    pairs = {k: (ours[k], ref[k]) for k in ("image_scores", "maps", "loss", "focal", "dice")}
    pairs.update({f"grad {k}": (ours["grads"][k], ref["grads"][k]) for k in ref["grads"]})
    out = {}
    for k, (a, b) in pairs.items():
        diff = (a.double() - b.double()).abs()
        out[k] = (float(diff.max()), float(diff.max() / b.double().abs().max().clamp_min(1e-30)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reference", type=Path, help="extracted ByChelsea/VAND-APRIL-GAN tree")
    ap.add_argument("--model", default="feclip-tiny")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--n-images", type=int, default=4)
    ap.add_argument("--no-save", action="store_true", help="print the differences, write no fixture")
    ap.add_argument("--out", type=Path, default=FIXTURE)
    ap.add_argument("--reference-side", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reference_side is not None:
        reference_side(args.reference_side, args.reference.resolve())
        return 0

    clip = build_clip(args.model, args.image_size)
    cfg = model_config(args.model, args.image_size)
    v = clip.visual
    inputs = make_inputs(args.n_images, v.image_size[0], v.conv1.out_channels, v.proj.shape[1], len(REF_TAPS))
    state = clip.state_dict()
    with tempfile.TemporaryDirectory(prefix="pin-aprilgan-") as tmp:
        work = Path(tmp)
        torch.save({"config": cfg, "state_dict": state, **inputs}, work / "inputs.pt")
        subprocess.run(
            [sys.executable, __file__, str(args.reference), "--reference-side", str(work)],
            check=True,
            cwd=work,
        )
        ref = torch.load(work / "reference.pt", weights_only=True)
    ours = run_aprilgan(clip, inputs)
    for k, (a, r) in compare(ours, ref).items():
        print(f"{k:>16}: max abs {a:.3e}  relative to max |ref| {r:.3e}")
    if not args.no_save:
        fixture = {
            "model": args.model,
            "reference_commit": REFERENCE_COMMIT,
            "image_size": v.image_size[0],
            "seeds": {"clip": CLIP_SEED, "data": DATA_SEED, "fc": FC_SEED},
            "n_images": args.n_images,
            "class_names": inputs["class_names"],
            "sha256": {
                "clip": tensor_sha256(state),
                "inputs": tensor_sha256({"images": inputs["images"], "masks": inputs["masks"]}),
                "fc": tensor_sha256(inputs["fc"]),
            },
            "reference": ref,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(fixture, args.out)
        print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pin feclip's WinCLIP to anomalib's: same tiny random CLIP, same images, outputs stored as a fixture.

Usage (the reference tree is extracted outside the repository, nothing of it is committed)::

    git --git-dir=<anomalib mirror> archive HEAD src/anomalib/models/image/winclip \\
        src/anomalib/models/components/base/buffer_list.py \\
        src/anomalib/models/components/base/dynamic_buffer.py | tar -x -C /tmp/peers/winclip
    python scripts/peers/pin_winclip.py --reference /tmp/peers/winclip \\
        --reference-python /tmp/peers/venv/bin/python --reference-python python3

Each ``--reference-python`` interpreter runs anomalib's ``WinClipModel`` (zero-shot, ``class_name="object"``)
in a child process, with the open_clip that interpreter has: open_clip < 2.26 (anomalib's lock file has
2.24.0) gives the reference's ``per_window`` layout, open_clip >= 2.26 its ``transposed`` one
(feclip.methods.winclip.WINDOW_LAYOUTS). Only anomalib's torch-model modules are imported: the package
``anomalib`` is stubbed (no lightning), ``open_clip.create_model_and_transforms`` is replaced by the tiny
architecture with the weights built here (no download). feclip's ``WinClip`` then runs on the same CLIP
and images with the matching layout; the maximum absolute differences are printed and the reference's
outputs saved to ``tests/data/peers/winclip.npz`` with the seeds and the weights' SHA-256
(tests/test_method_winclip.py reads it). ``--model ViT-L-14-336-quickgelu --n-images 1 --out -`` runs
the same comparison on another random-weight architecture and writes nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "data" / "peers" / "winclip.npz"
REFERENCE_REPO = "open-edge-platform/anomalib (formerly openvinotoolkit/anomalib)"
REFERENCE_COMMIT = "b7233686172e3485bfbe01272a8cd7a7e4576986"
CLIP_SEED = 1234
IMAGE_SEED = 5678
N_IMAGES = 3
MODEL = "feclip-tiny"


# -- shared with tests/test_method_winclip.py ---------------------------------------------------------


def build_tiny_clip(name: str = MODEL):
    """The random CLIP of the fixture: ``feclip-tiny`` (or ``name``) drawn from :data:`CLIP_SEED`, fp32, eval."""
    from feclip.models import load_clip

    return load_clip(name, seed=CLIP_SEED)


def weights_sha256(module) -> str:
    """SHA-256 over the module's state dict (sorted names, each name, shape and fp32 bytes)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def make_images(image_size: int, n: int = N_IMAGES):
    """``n`` standard-normal images ``(n, 3, S, S)`` from :data:`IMAGE_SEED` (CLIP-normalised range)."""
    import torch

    gen = torch.Generator().manual_seed(IMAGE_SEED)
    return torch.randn(n, 3, image_size, image_size, generator=gen)


def tensor_sha256(t) -> str:
    return hashlib.sha256(t.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()


def layout_for(open_clip_version: str) -> str:
    """The window layout anomalib's code computes with this open_clip (module docstring)."""
    major, minor = (int(p) for p in open_clip_version.split(".")[:2])
    return "per_window" if (major, minor) < (2, 26) else "transposed"


# -- the reference, in a child process ----------------------------------------------------------------


def _find_winclip_dir(root: Path) -> Path:
    for cand in (root, root / "src", *root.glob("**/src")):
        d = cand / "anomalib" / "models" / "image" / "winclip"
        if (d / "torch_model.py").is_file():
            return d
    raise SystemExit(f"pin_winclip: no anomalib/models/image/winclip/torch_model.py under {root}")


def _load_reference(root: Path):
    """Import anomalib's winclip torch model alone: stub packages, the two buffer mixins from their files."""
    import importlib
    import importlib.util
    import types
    from typing import NamedTuple

    import torch

    winclip_dir = _find_winclip_dir(root)
    anomalib_dir = winclip_dir.parents[2]

    def package(name: str, path: Path | None = None):
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)] if path else []
        sys.modules[name] = mod
        return mod

    def from_file(name: str, path: Path):
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod

    package("anomalib")
    data = package("anomalib.data")

    class InferenceBatch(NamedTuple):  # the fields of anomalib's own
        pred_score: torch.Tensor | None = None
        pred_label: torch.Tensor | None = None
        anomaly_map: torch.Tensor | None = None
        pred_mask: torch.Tensor | None = None

    data.InferenceBatch = InferenceBatch
    package("anomalib.models")
    components = package("anomalib.models.components")
    base = anomalib_dir / "models" / "components" / "base"
    components.BufferListMixin = from_file(
        "anomalib.models.components.base.buffer_list", base / "buffer_list.py"
    ).BufferListMixin
    components.DynamicBufferMixin = from_file(
        "anomalib.models.components.base.dynamic_buffer", base / "dynamic_buffer.py"
    ).DynamicBufferMixin
    package("anomalib.models.image")
    package("anomalib.models.image.winclip", winclip_dir)  # its __init__ (lightning) is never run
    return importlib.import_module("anomalib.models.image.winclip.torch_model")


def run_child(work: Path, reference: Path, config_dir: Path) -> None:
    """Run anomalib's WinClipModel on ``work/weights.pt`` and ``work/images.pt`` (the architecture:
    ``config_dir/pinmodel.json``); write ``work/ref.pt``."""
    import importlib.metadata
    import types

    import open_clip
    import torch

    tm = _load_reference(reference)
    open_clip.add_model_config(config_dir)
    state = torch.load(work / "weights.pt", weights_only=True)

    def create_model_and_transforms(name, pretrained=None, **_):
        del name, pretrained  # the tiny architecture with the given weights, never a download
        model = open_clip.create_model("pinmodel")
        model.load_state_dict(state, strict=True)
        model.eval()
        return model, None, None

    tm.open_clip = types.SimpleNamespace(create_model_and_transforms=create_model_and_transforms)
    model = tm.WinClipModel(class_name="object").eval()  # anomalib's zero-shot defaults
    images = torch.load(work / "images.pt", weights_only=True)
    out = model(images)
    version = importlib.metadata.version("open_clip_torch")
    torch.save(
        {
            "image_scores": out.pred_score.float(),
            "maps": out.anomaly_map.float(),
            "text_embeddings": model.text_embeddings.float(),
            "open_clip": version,
            "torch": str(torch.__version__),
        },
        work / "ref.pt",
    )


# -- the parent -----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="extracted anomalib tree")
    parser.add_argument(
        "--reference-python",
        action="append",
        help="interpreter that runs the reference (repeatable; default: this one)",
    )
    parser.add_argument("--out", default=str(FIXTURE), help="fixture to write; '-' writes nothing")
    parser.add_argument(
        "--model", default=MODEL, help="CLIP architecture (random weights); default feclip-tiny"
    )
    parser.add_argument("--n-images", type=int, default=N_IMAGES)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--config-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child, args.reference, args.config_dir)
        return 0

    import numpy as np
    import torch

    from feclip.methods.winclip import WinClip, WinClipConfig
    from feclip.models.clip import _open_clip

    clip = build_tiny_clip(args.model)
    images = make_images(clip.visual.image_size[0], args.n_images)
    fixture = {
        "model": np.array(args.model),
        "clip_seed": np.array(CLIP_SEED),
        "image_seed": np.array(IMAGE_SEED),
        "n_images": np.array(args.n_images),
        "weights_sha256": np.array(weights_sha256(clip)),
        "images_sha256": np.array(tensor_sha256(images)),
        "reference_repo": np.array(REFERENCE_REPO),
        "reference_commit": np.array(REFERENCE_COMMIT),
        "torch": np.array(torch.__version__),
    }
    report = {}
    with tempfile.TemporaryDirectory(prefix="pin-winclip-") as tmp:
        work = Path(tmp)
        torch.save(clip.state_dict(), work / "weights.pt")
        torch.save(images, work / "images.pt")
        config_dir = work / "configs"
        config_dir.mkdir()
        (config_dir / "pinmodel.json").write_text(json.dumps(_open_clip().get_model_config(args.model)))
        for python in args.reference_python or [sys.executable]:
            cmd = [python, "-W", "ignore", __file__, "--child", str(work), "--reference", str(args.reference)]
            subprocess.run([*cmd, "--config-dir", str(config_dir)], check=True)
            ref = torch.load(work / "ref.pt", weights_only=True)
            layout = layout_for(ref["open_clip"])
            method = WinClip(clip, WinClipConfig(window_layout=layout), precision="fp32")
            ours = method(images)
            ref_text = ref["text_embeddings"] / ref["text_embeddings"].norm(dim=-1, keepdim=True)
            diffs = {
                "image_scores": (ours.image_scores - ref["image_scores"]).abs().max().item(),
                "maps": (ours.maps - ref["maps"]).abs().max().item(),
                "text_embeddings": (method.text_embeddings - ref_text).abs().max().item(),
            }
            report[layout] = {"open_clip": ref["open_clip"], "max_abs_diff": diffs}
            for key in ("image_scores", "maps", "text_embeddings"):
                fixture[f"{layout}/{key}"] = ref[key].numpy().astype(np.float32)
            fixture[f"{layout}/open_clip"] = np.array(ref["open_clip"])
            fixture[f"{layout}/max_abs_diff"] = np.array(max(diffs["image_scores"], diffs["maps"]))
    print(json.dumps(report, indent=2))
    if args.out != "-":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out, **fixture)
        print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

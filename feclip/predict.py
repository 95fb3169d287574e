"""``feclip-predict``: anomaly scores and heatmaps for image files with a trained adapter file.

    feclip-predict --checkpoint adapters.safetensors [--backbone NAME] [--pretrained TAG_OR_FILE]
                   [--out DIR] [--threshold T] [--batch-size B] [--device cpu|cuda] [--sigma 4]
                   PATH...

PATHs are image files or folders (searched recursively for image suffixes). For each image: the
image score (CLS path, mean over taps) is printed and collected in ``<out>/scores.csv`` (columns
``path,score``), and ``<out>/<name>_overlay.png`` shows the anomaly map over the image at its original
size (``<name>`` is the file stem, with the sub-folder path for images found inside a folder). With
``--threshold T`` the binary mask ``map >= T`` is written as ``<name>_mask.png`` (0/255).
``<out>/predict.json`` records the model, the options and the files that failed.

The map is computed as in evaluation: mean over taps of the abnormal probability on the token grid,
bilinear to the model input size ``S``, Gaussian ``sigma`` (0 = off), then bilinear to the image's
original size. Overlay colours are scaled per image (``--vmin``/``--vmax`` fix the scale).

The model is rebuilt from the adapter file: its metadata holds the full FEClipConfig and the backbone
name. Without ``--checkpoint`` the paper's bare CLIP baseline runs instead: no adapters (lam = 0),
the last block's patch tokens projected with CLIP's own ``visual.proj``.

Exit status: 0 all images processed; 1 some input could not be read (each reported on stderr by
name, the rest processed); 2 a usage error (bad option, missing or mismatched adapter file), printed
as one line ``feclip-predict: error: ...``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from feclip.errors import CheckpointMismatchError, ConfigError, DatasetError, FEClipError

PROG = "feclip-predict"

__all__ = ["PROG", "build_parser", "find_inputs", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line and exits 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Anomaly scores and heatmap overlays for images, with FE-CLIP adapters "
        "(or the bare CLIP zero-shot baseline without --checkpoint).",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("--checkpoint", help="adapter file (adapters.safetensors) written by feclip-train")
    p.add_argument(
        "--backbone",
        help="CLIP model name (default: the one recorded in the adapter file, "
        "or ViT-L-14-336-quickgelu without --checkpoint)",
    )
    p.add_argument(
        "--pretrained",
        help="CLIP weights: an open_clip tag or a file; 'none' = random "
        "(default: openai, none for feclip-tiny)",
    )
    p.add_argument("--out", default="predictions", help="output folder (default: ./predictions)")
    p.add_argument("--threshold", type=float, help="also write binary masks map >= T as <name>_mask.png")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument(
        "--sigma",
        type=float,
        default=4.0,
        help="Gaussian smoothing of the map at the input size, in pixels; 0 = off (default 4)",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the heatmap (default 0.5)")
    p.add_argument("--vmin", type=float, help="map value shown as dark blue (default: the image's minimum)")
    p.add_argument("--vmax", type=float, help="map value shown as dark red (default: the image's maximum)")
    return p


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputImage:
    """One file to process: its path and the output name (relative stem, POSIX separators)."""

    path: Path
    name: str


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _inside(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        path.resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def find_inputs(
    paths: Sequence[str | Path], exclude: Path | None = None
) -> tuple[list[InputImage], list[str]]:
    """The images named by ``paths`` and the problems found while listing them.

    A file is taken as given (its decoding decides); a folder contributes every visible file below it
    with an image suffix, and each other visible file is a problem ("not an image file"). Files under
    ``exclude`` (the output folder) are skipped. Output names are unique: a clash gets the suffix
    (``a_jpg``), then a counter.
    """
    from feclip.data.samples import IMAGE_EXTENSIONS

    exclude = exclude.resolve() if exclude is not None else None
    found: list[tuple[Path, str]] = []
    problems: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                if _hidden(f, path) or _inside(f, exclude):
                    continue
                if f.suffix.lower() not in IMAGE_EXTENSIONS:
                    problems.append(f"{f}: not an image file (suffix {f.suffix or 'none'!r})")
                    continue
                found.append((f, f.relative_to(path).with_suffix("").as_posix()))
        elif path.is_file():
            found.append((path, path.stem))
        else:
            problems.append(f"{path}: no such file or folder")
    return _unique_names(found), problems


def _unique_names(found: list[tuple[Path, str]]) -> list[InputImage]:
    taken: set[str] = set()
    out = []
    for path, name in found:
        candidate = name
        if candidate in taken:
            candidate = f"{name}_{path.suffix.lstrip('.').lower() or 'file'}"
        n = 2
        while candidate in taken:
            candidate, n = f"{name}_{n}", n + 1
        taken.add(candidate)
        out.append(InputImage(path, candidate))
    return out


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------


def resolve_pretrained(backbone: str, pretrained: str | None) -> str | None:
    """The weights to load: the given tag/file, ``None`` for 'none'/'random', else the default."""
    from feclip.models import TINY_MODEL

    if pretrained is None:
        return None if backbone == TINY_MODEL else "openai"
    return None if pretrained.lower() in ("none", "random") else pretrained


def config_from_metadata(meta: dict[str, str], path: str | Path):
    """Rebuild the :class:`~feclip.models.FEClipConfig` stored in an adapter file's metadata."""
    from feclip.models import FEClipConfig

    if "config" not in meta:
        raise CheckpointMismatchError(
            f"{path}: no model config in the file's metadata (not written by feclip)"
        )
    try:
        values = json.loads(meta["config"])
    except json.JSONDecodeError as err:
        raise CheckpointMismatchError(f"{path}: unreadable model config in the metadata ({err})") from None
    if not isinstance(values, dict):
        raise CheckpointMismatchError(f"{path}: the model config in the metadata is not a JSON object")
    known = {f.name for f in dataclasses.fields(FEClipConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        print(f"{PROG}: warning: {path}: ignoring unknown config fields {unknown}", file=sys.stderr)
    return FEClipConfig(**{k: v for k, v in values.items() if k in known})


def _saved_backbone(meta: dict[str, str]) -> str | None:
    name = meta.get("backbone")
    return None if name in (None, "", "None") else name


def _load_clip(backbone: str, weights: str | None, device: str):
    """load_clip; random weights are drawn with seed 0 so that a run without weights repeats."""
    import torch

    from feclip.models import load_clip

    if weights is not None:
        return load_clip(backbone, pretrained=weights, device=device)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(0)
        return load_clip(backbone, pretrained=None, device=device)


def build_model(checkpoint: str | None, backbone: str | None, pretrained: str | None, device: str):
    """The FE-CLIP model to run (eval mode), a one-line description of it, and the CLIP weights used.

    With a checkpoint: the config and backbone recorded in the file (``backbone`` must agree when
    given); without: the bare CLIP baseline (lam = 0, the last block, ``fc_patch`` = ``visual.proj``).
    """
    from feclip.models import DEFAULT_MODEL, FEClip, FEClipConfig, load_adapters
    from feclip.models.checkpoint import read_adapters

    if checkpoint is None:
        backbone = backbone or DEFAULT_MODEL
        weights = resolve_pretrained(backbone, pretrained)
        clip = _load_clip(backbone, weights, device)
        depth = len(clip.visual.transformer.resblocks)
        cfg = FEClipConfig(taps=(depth - 1,), lam=0.0, fc_patch_init="clip_proj")
        model = FEClip(clip, cfg)
        what = (
            f"no --checkpoint: bare CLIP zero-shot baseline ({backbone}, weights {weights}; no adapters, "
            f"patch tokens of block {depth - 1} through CLIP's projection)"
        )
        return model.eval(), what, weights
    _, meta = read_adapters(checkpoint)
    saved = _saved_backbone(meta)
    if backbone is not None and saved is not None and backbone != saved:
        raise CheckpointMismatchError(
            f"{checkpoint}: made for backbone {saved}, but --backbone is {backbone}"
        )
    backbone = backbone or saved
    if backbone is None:
        raise FEClipError(f"{checkpoint}: the file does not name its backbone; pass --backbone")
    cfg = config_from_metadata(meta, checkpoint)
    weights = resolve_pretrained(backbone, pretrained)
    model = FEClip(_load_clip(backbone, weights, device), cfg)
    load_adapters(model, checkpoint)
    what = f"FE-CLIP adapters {checkpoint} ({backbone}, weights {weights}, taps {list(cfg.taps)})"
    return model.eval(), what, weights


def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu)")
    return name


# ----------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------


def _load(items: Sequence[InputImage], size: int):
    """Decode a batch: (kept items, originals (H, W, 3) uint8, images (B, 3, S, S), problems)."""
    import torch

    from feclip.data.transforms import load_rgb, normalize, resize_rgb

    kept, originals, tensors, problems = [], [], [], []
    for item in items:
        try:
            rgb = load_rgb(item.path)
        except DatasetError as err:
            problems.append(str(err))
            continue
        kept.append(item)
        originals.append(rgb)
        tensors.append(normalize(resize_rgb(rgb, size)))
    images = torch.stack(tensors) if tensors else None
    return kept, originals, images, problems


def score_batch(model, images, sigma: float):
    """Image scores ``(B,)`` and maps ``(B, S, S)`` (smoothed, at the input size), on the CPU."""
    import torch

    from feclip.scoring import ScoringConfig, anomaly_maps

    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(images.to(device))
        maps = anomaly_maps(
            out.tap_patch_logits,
            model.config.taps,
            ScoringConfig(sigma=sigma),
            model.image_size,
            model.logit_scale,
        )
    return out.image_score.float().cpu(), maps.float().cpu()


def _write_outputs(item: InputImage, rgb: np.ndarray, amap, out_dir: Path, args) -> None:
    """Overlay (and mask) PNGs at the original size of the image."""
    from feclip.scoring import upsample
    from feclip.viz import overlay, save_png

    full = upsample(amap[None], rgb.shape[:2])[0].numpy()
    save_png(out_dir / f"{item.name}_overlay.png", overlay(rgb, full, args.alpha, args.vmin, args.vmax))
    if args.threshold is not None:
        save_png(out_dir / f"{item.name}_mask.png", full >= args.threshold)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_scores_csv(path: Path, rows: Sequence[tuple[str, float]]) -> Path:
    """``path,score`` rows, written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "score"])
    writer.writerows((p, f"{s:.6f}") for p, s in rows)
    _write_text(path, buf.getvalue())
    return path


def _report(problem: str) -> None:
    print(f"{PROG}: skipped: {' '.join(problem.split())}", file=sys.stderr)


def run(args) -> int:
    """Everything after argument parsing; returns the exit status (FEClipError propagates)."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.sigma < 0:
        raise ConfigError(f"--sigma must be >= 0, got {args.sigma}")
    if not 0.0 <= args.alpha <= 1.0:
        raise ConfigError(f"--alpha must lie in [0, 1], got {args.alpha}")
    device = _device(args.device)
    out_dir = Path(args.out)
    items, problems = find_inputs(args.paths, exclude=out_dir)
    for problem in problems:
        _report(problem)
    if not items and not problems:
        raise FEClipError(f"no image files found in {', '.join(map(str, args.paths))}")
    model, what, weights = build_model(args.checkpoint, args.backbone, args.pretrained, device)
    print(f"# {what}")
    if weights is None:
        print("# warning: random CLIP weights: the scores are meaningless (for testing only)")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, float]] = []
    for start in range(0, len(items), args.batch_size):
        kept, originals, images, bad = _load(items[start : start + args.batch_size], model.image_size)
        for problem in bad:
            _report(problem)
        problems.extend(bad)
        if images is None:
            continue
        scores, maps = score_batch(model, images, args.sigma)
        for item, rgb, score, amap in zip(kept, originals, scores.tolist(), maps):
            _write_outputs(item, rgb, amap, out_dir, args)
            rows.append((str(item.path), score))
            print(f"{score:.6f}  {item.path}", flush=True)
    write_scores_csv(out_dir / "scores.csv", rows)
    record = {
        "model": what,
        "backbone": model.backbone_name,
        "checkpoint": args.checkpoint,
        "weights": weights,
        "config": dataclasses.asdict(model.config),
        "options": {k: getattr(args, k) for k in ("sigma", "threshold", "alpha", "vmin", "vmax")},
        "n_images": len(rows),
        "failed": [" ".join(p.split()) for p in problems],
    }
    _write_text(out_dir / "predict.json", json.dumps(record, indent=1) + "\n")
    print(f"# {len(rows)} image(s) scored, {len(problems)} skipped; outputs in {out_dir}")
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``feclip-predict``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except FEClipError as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``feclip-predict``: anomaly scores and heatmaps for image files with a trained adapter file.

    feclip-predict --checkpoint adapters.safetensors [--backbone NAME] [--pretrained TAG_OR_FILE]
                   [--out DIR] [--threshold T] [--batch-size B] [--device cpu|cuda] [--sigma 4]
                   [--max-side 2048] PATH...

PATHs are image files or folders (searched recursively for image suffixes). For each image: the
image score (CLS path, mean over taps) is printed and collected in ``<out>/scores.csv`` (columns
``path,score``), ``<out>/<name>_map.npy`` holds the anomaly map (float32) at the image's original size,
downscaled so that its longer side is at most ``--max-side``, and ``<out>/<name>_overlay.png`` draws it
over the image at that size, with a colour bar and the image score (``<name>`` is the file stem, with
the sub-folder path for images found inside a folder). With ``--threshold T`` the binary mask
``map >= T`` is written as ``<name>_mask.png`` (0/255). ``<out>/predict.json`` records the model (the
backbone with its weights' hash or random seed), the options, each image's size and output size, and
the files that failed. Overlay colours are scaled per image (``--vmin``/``--vmax`` fix the scale).

What is computed, and how the model is rebuilt from the adapter file (or the bare CLIP baseline runs
without ``--checkpoint``): :mod:`feclip.predict`. This module is the command line only: the options,
the order of the steps, what is printed, the exit status.

Exit status: 0 all images processed; 1 some input could not be read (each reported on stderr by
name, the rest processed); 2 an error (bad option, unusable ``--out``, missing or mismatched adapter
file, nothing to process, an output that cannot be written), printed as one line
``feclip-predict: error: ...``; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from feclip.apps.common import OneLineParser, run_app
from feclip.errors import ConfigError, FEClipError
from feclip.predict import (
    build_model,
    check_no_input_overwritten,
    check_out_dir,
    find_inputs,
    load_batch,
    make_folder,
    score_batch,
    write_image_outputs,
    write_record,
    write_scores_csv,
)

PROG = "feclip-predict"
DEFAULT_MAX_SIDE = 2048

__all__ = ["PROG", "build_parser", "check_options", "main", "run"]


def build_parser() -> OneLineParser:
    p = OneLineParser(
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
        help="CLIP weights: an open_clip tag or a file; 'none' = random (default: the weights recorded "
        "in the adapter file, which given weights must match; without --checkpoint openai, none for "
        "feclip-tiny)",
    )
    p.add_argument("--out", default="predictions", help="output folder (default: ./predictions)")
    p.add_argument("--threshold", type=float, help="also write binary masks map >= T as <name>_mask.png")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument(
        "--sigma",
        type=float,
        help="Gaussian smoothing of the map at the input size, in pixels; 0 = off "
        "(default: the evaluation's, eval.sigma)",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the heatmap (default 0.5)")
    p.add_argument("--vmin", type=float, help="map value shown as dark blue (default: the image's minimum)")
    p.add_argument("--vmax", type=float, help="map value shown as dark red (default: the image's maximum)")
    p.add_argument(
        "--max-side",
        type=int,
        default=DEFAULT_MAX_SIDE,
        help="longest side of the overlays and masks, in pixels; larger images get downscaled outputs "
        f"(scores are unaffected); 0 = the original size (default {DEFAULT_MAX_SIDE})",
    )
    return p


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _report(problem: str) -> None:
    print(f"{PROG}: skipped: {' '.join(problem.split())}", file=sys.stderr)


def check_options(args) -> None:
    """Refuse option values that would give silently wrong outputs (NaN, out of range)."""

    def finite(name: str, value: float | None) -> None:
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"--{name} must be a finite number, got {value}")

    for name in ("threshold", "sigma", "alpha", "vmin", "vmax"):
        finite(name, getattr(args, name))
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.sigma is not None and args.sigma < 0:
        raise ConfigError(f"--sigma must be >= 0, got {args.sigma}")
    if not 0.0 <= args.alpha <= 1.0:
        raise ConfigError(f"--alpha must lie in [0, 1], got {args.alpha}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(
            f"--threshold must lie in [0, 1] (the maps are probabilities), got {args.threshold}"
        )
    if args.vmin is not None and args.vmax is not None and args.vmin >= args.vmax:
        raise ConfigError(f"--vmin must be below --vmax, got {args.vmin} and {args.vmax}")
    if args.max_side < 0:
        raise ConfigError(f"--max-side must be >= 1 (or 0 for the original size), got {args.max_side}")


def _nothing_to_do(paths: Sequence[str], problems: list[str]) -> FEClipError:
    where = ", ".join(map(str, paths))
    if not problems:
        return FEClipError(f"no image files found in {where}")
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return FEClipError(f"no image to process in {where}: {problems[0]}{more}")


def run(args) -> int:
    """Everything after argument parsing; returns the exit status (FEClipError propagates)."""
    from feclip.models.provenance import file_sha256

    check_options(args)
    if args.sigma is None:  # the evaluation's smoothing: its one home is feclip.scoring (imports torch)
        from feclip.scoring import ScoringConfig

        args.sigma = ScoringConfig.sigma
    out_dir = Path(args.out)
    check_out_dir(out_dir)
    from feclip.device import resolve_device

    device = str(resolve_device(args.device, option="--device"))
    items, problems = find_inputs(args.paths, exclude=out_dir)
    if not items:
        raise _nothing_to_do(args.paths, problems)
    check_no_input_overwritten(items, out_dir, args.threshold is not None)
    for problem in problems:
        _report(problem)
    model, what, weights = build_model(args.checkpoint, args.backbone, args.pretrained, device, _warn)
    print(f"# {what}")
    if weights.is_random:
        print("# warning: random CLIP weights: the scores are meaningless (for testing only)")
    make_folder(out_dir)
    rows: list[tuple[str, float]] = []
    images: list[dict] = []
    try:
        for start in range(0, len(items), args.batch_size):
            kept, decoded, batch, bad = load_batch(
                items[start : start + args.batch_size], model.image_size, args.max_side
            )
            for problem in bad:
                _report(problem)
            problems.extend(bad)
            if batch is None:
                continue
            scores, maps = _score(model, batch, args, device)
            del batch
            for item, image, score, amap in zip(kept, decoded, scores.tolist(), maps):
                if not (math.isfinite(score) and bool(amap.isfinite().all())):
                    problems.append(f"{item.path}: the model gave a non-finite score or map")
                    _report(problems[-1])
                    continue
                write_image_outputs(
                    item, image, amap, out_dir, args.alpha, args.vmin, args.vmax, args.threshold, score
                )
                rows.append((str(item.path), score))
                images.append(
                    {
                        "path": str(item.path),
                        "name": item.name,
                        "score": score,
                        "size": list(image.size),
                        "output_size": list(image.shown.shape[:2]),
                    }
                )
                print(f"{score:.6f}  {item.path}", flush=True)
            del decoded, maps
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"after {len(rows)} of {len(items)} image(s); scores.csv and predict.json in {out_dir} not written"
        ) from None
    write_scores_csv(out_dir / "scores.csv", rows)
    downscaled = sum(i["size"] != i["output_size"] for i in images)
    record = {
        "model": what,
        "backbone": weights.describe(),
        "backbone_name": model.backbone_name,
        "weights_file": weights.path,
        "checkpoint": args.checkpoint,
        "checkpoint_sha256": file_sha256(args.checkpoint) if args.checkpoint else None,
        "config": dataclasses.asdict(model.config),
        "options": {
            k: getattr(args, k)
            for k in ("sigma", "threshold", "alpha", "vmin", "vmax", "max_side", "batch_size")
        }
        | {"device": device},
        "n_images": len(rows),
        "n_downscaled": downscaled,
        "images": images,
        "failed": [" ".join(p.split()) for p in problems],
    }
    write_record(out_dir / "predict.json", record)
    scaled = f", {downscaled} with outputs downscaled to --max-side {args.max_side}" if downscaled else ""
    print(f"# {len(rows)} image(s) scored, {len(problems)} skipped{scaled}; outputs in {out_dir}")
    return 1 if problems else 0


def _score(model, batch, args, device: str):
    import torch

    try:
        return score_batch(model, batch, args.sigma)
    except torch.OutOfMemoryError:
        raise FEClipError(
            f"out of memory on {device} with --batch-size {args.batch_size}; use a smaller --batch-size"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``feclip-predict``; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_app(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())

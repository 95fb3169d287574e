"""``feclip-predict``: anomaly scores and heatmaps for image files with a trained adapter file.

    feclip-predict --checkpoint adapters.safetensors [--backbone NAME] [--pretrained TAG_OR_FILE]
                   [--out DIR] [--threshold T] [--batch-size B] [--device cpu|cuda] [--sigma 4]
                   [--max-side 2048] PATH...

PATHs are image files or folders (searched recursively for image suffixes). For each image: the
image score (CLS path, mean over taps) is printed and collected in ``<out>/scores.csv`` (columns
``path,score``), and ``<out>/<name>_overlay.png`` shows the anomaly map over the image at its original
size, downscaled so that its longer side is at most ``--max-side`` (``<name>`` is the file stem, with
the sub-folder path for images found inside a folder). With ``--threshold T`` the binary mask
``map >= T`` is written as ``<name>_mask.png`` (0/255). ``<out>/predict.json`` records the model (the
backbone with its weights' hash or random seed), the options, each image's size and output size, and
the files that failed.

The score and the map are computed from the full-resolution image exactly as in evaluation (decoded to
RGB, bicubic to the model input size ``S``): mean over taps of the abnormal probability on the token
grid, bilinear to ``S``, Gaussian ``sigma`` (0 = off), then bilinear to the output size. Overlay
colours are scaled per image (``--vmin``/``--vmax`` fix the scale). Only one full-size image is held
at a time, and nothing full-size in floating point, so memory stays bounded for huge inputs.

The model is rebuilt from the adapter file: its metadata holds the full FEClipConfig and the backbone
the adapters were trained on (``backbone_weights``): random weights are redrawn with the recorded seed,
loaded weights are checked against the recorded SHA-256; anything else is refused. Without
``--checkpoint`` the paper's bare CLIP baseline runs instead: no adapters (lam = 0), the last block's
patch tokens projected with CLIP's own ``visual.proj`` (random weights: seed 0).

Exit status: 0 all images processed; 1 some input could not be read (each reported on stderr by
name, the rest processed); 2 an error (bad option, unusable ``--out``, missing or mismatched adapter
file, nothing to process, an output that cannot be written), printed as one line
``feclip-predict: error: ...``; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from feclip.errors import CheckpointMismatchError, ConfigError, DatasetError, FEClipError

PROG = "feclip-predict"
BASELINE_SEED = 0  # random weights without an adapter file are drawn with this seed
DEFAULT_MAX_SIDE = 2048

__all__ = [
    "PROG",
    "build_model",
    "build_parser",
    "decode",
    "find_inputs",
    "main",
    "output_size",
    "score_batch",
]


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
        default=4.0,
        help="Gaussian smoothing of the map at the input size, in pixels; 0 = off (default 4)",
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
        elif path.exists():
            problems.append(f"{path}: not a regular file or folder")
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
    values = {k: tuple(v) if k == "taps" and isinstance(v, list) else v for k, v in values.items()}
    try:
        cfg = FEClipConfig(**{k: v for k, v in values.items() if k in known})
        cfg.validate()
    except (TypeError, ValueError) as err:  # wrong types or values written into the metadata
        raise CheckpointMismatchError(f"{path}: invalid model config in the metadata ({err})") from None
    return cfg


def _saved_backbone(meta: dict[str, str]) -> str | None:
    name = meta.get("backbone")
    return None if name in (None, "", "None") else name


def _recorded_image_size(meta: dict[str, str], path) -> int | None:
    """The input size the adapters were trained at (None for files that do not record it)."""
    value = meta.get("image_size")
    if value in (None, "", "None"):
        return None
    try:
        return int(value)
    except ValueError:
        raise CheckpointMismatchError(f"{path}: unreadable image_size {value!r} in the metadata") from None


def _load_clip(planned, pretrained: str | None, device: str, image_size: int | None = None):
    """Build the CLIP ``planned`` describes (at ``image_size``, None = the model's own) and check
    that it is what was built."""
    from feclip.models import load_clip

    clip = load_clip(planned.name, pretrained, device=device, seed=planned.seed, image_size=image_size)
    built = getattr(clip, "feclip_weights", None)
    same = built is not None and built.is_random == planned.is_random
    if same and planned.is_random:
        same = built.seed == planned.seed
    elif same:
        same = bool(built.sha256) and built.sha256.startswith(planned.sha256 or "")
    if not same:
        raise CheckpointMismatchError(
            f"the CLIP built is {built.describe() if built else 'unknown'}, not the planned {planned.describe()}"
        )
    return clip


def _checkpoint_metadata(checkpoint: str) -> dict[str, str]:
    from feclip.models.checkpoint import read_metadata

    path = Path(checkpoint)
    if path.is_dir():
        inside = path / "adapters.safetensors"
        hint = f" (did you mean {inside}?)" if inside.is_file() else ""
        raise FEClipError(f"--checkpoint {path} is a folder, not an adapter file{hint}")
    if not path.exists():
        raise FEClipError(f"adapter file not found: {path}")
    if not path.is_file():
        raise FEClipError(f"--checkpoint {path} is not a regular file")
    return read_metadata(path)


def _checkpoint_weights(checkpoint: str, meta: dict[str, str], backbone: str, pretrained: str | None):
    """The ``pretrained`` argument that rebuilds the recorded backbone, and the plan aligned with the
    record (:func:`~feclip.models.provenance.align_with_checkpoint`: another model, random vs loaded
    weights, another weights file or an unrecorded random seed are refused)."""
    from feclip.models.provenance import SHA_CHARS, align_with_checkpoint, checkpoint_backbone, plan

    recorded = checkpoint_backbone(meta)
    if pretrained is not None or recorded is None or recorded.name != backbone:
        weights = resolve_pretrained(backbone, pretrained)  # checked against the record below
    elif recorded.is_random:
        weights = None
    elif recorded.source.startswith("file:"):
        sha = f" (sha256 {recorded.sha256[:SHA_CHARS]}...)" if recorded.sha256 else ""
        raise FEClipError(
            f"{checkpoint}: trained with the CLIP weights file {recorded.source[5:]}{sha}; "
            "pass that file as --pretrained FILE"
        )
    else:
        weights = recorded.source
    planned = align_with_checkpoint(plan(backbone, weights, seed=None), meta, checkpoint)
    if planned.is_random and planned.seed is None:
        raise CheckpointMismatchError(
            f"{checkpoint}: trained on {recorded.describe() if recorded else 'a random backbone'}, drawn "
            "without a seed, so the model it was trained with cannot be rebuilt; re-train it with a seed"
        )
    if recorded is None:
        print(
            f"{PROG}: warning: {checkpoint} does not record the CLIP weights it was trained on "
            f"(written before feclip recorded them); assuming {planned.describe()}",
            file=sys.stderr,
        )
    return weights, planned


def build_model(checkpoint: str | None, backbone: str | None, pretrained: str | None, device: str):
    """The FE-CLIP model to run (eval mode), a one-line description of it, and the
    :class:`~feclip.models.provenance.WeightsSource` of its CLIP.

    With a checkpoint: the config and backbone recorded in the file (``backbone`` and ``pretrained``
    must agree with the record when given); random weights are redrawn with the recorded seed and
    loaded weights must have the recorded SHA-256. Without: the bare CLIP baseline (lam = 0, the last
    block, ``fc_patch`` = ``visual.proj``), random weights drawn with seed :data:`BASELINE_SEED`.
    """
    from feclip.models import DEFAULT_MODEL, FEClip, FEClipConfig, load_adapters
    from feclip.models.provenance import checkpoint_backbone, plan

    if checkpoint is None:
        backbone = backbone or DEFAULT_MODEL
        weights = resolve_pretrained(backbone, pretrained)
        clip = _load_clip(plan(backbone, weights, seed=BASELINE_SEED), weights, device)
        source = clip.feclip_weights
        depth = len(clip.visual.transformer.resblocks)
        cfg = FEClipConfig(taps=(depth - 1,), lam=0.0, fc_patch_init="clip_proj")
        model = FEClip(clip, cfg)
        what = (
            f"no --checkpoint: bare CLIP zero-shot baseline (backbone {source.describe()}; no adapters, "
            f"patch tokens of block {depth - 1} through CLIP's projection)"
        )
        return model.eval(), what, source
    meta = _checkpoint_metadata(checkpoint)
    saved = _saved_backbone(meta)
    if backbone is not None and saved is not None and backbone != saved:
        raise CheckpointMismatchError(
            f"{checkpoint}: made for backbone {saved}, but --backbone is {backbone}"
        )
    recorded = checkpoint_backbone(meta)
    backbone = backbone or saved or (recorded.name if recorded is not None else None)
    if backbone is None:
        raise FEClipError(f"{checkpoint}: the file does not name its backbone; pass --backbone")
    cfg = config_from_metadata(meta, checkpoint)
    weights, planned = _checkpoint_weights(checkpoint, meta, backbone, pretrained)
    clip = _load_clip(planned, weights, device, _recorded_image_size(meta, checkpoint))
    try:
        model = FEClip(clip, cfg)
    except ValueError as err:  # ConfigError included: e.g. taps beyond this backbone's depth
        raise CheckpointMismatchError(f"{checkpoint}: does not fit backbone {backbone}: {err}") from None
    load_adapters(model, checkpoint)  # refuses another tap set or width, and non-finite weights
    source = clip.feclip_weights
    what = f"FE-CLIP adapters {checkpoint} (backbone {source.describe()}, taps {list(cfg.taps)})"
    return model.eval(), what, source


def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu)")
    return name


# ----------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------

# modes that load_rgb turns into RGB with PIL's own convert("RGB"); the others (16-bit, float) go
# through load_rgb itself
_PIL_RGB_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})


def output_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) of the outputs for an image of (height, width): the same, or scaled so that the longer
    side is ``max_side`` (0 = never scaled)."""
    longest = max(height, width)
    if max_side <= 0 or longest <= max_side:
        return height, width
    if height >= width:
        return max_side, max(1, round(width * max_side / height))
    return max(1, round(height * max_side / width)), max_side


@dataclass
class Decoded:
    """One decoded image: the model input ``(S, S, 3)`` uint8, the image at the output size
    ``(h, w, 3)`` uint8 and the original ``(H, W)``."""

    model_input: np.ndarray
    shown: np.ndarray
    size: tuple[int, int]


def decode(path: str | Path, size: int, max_side: int) -> Decoded:
    """Decode an image once and keep only what is needed: the model input, bicubic from the full
    image (the same pixels as ``resize_rgb(load_rgb(path), size)``, so scores equal evaluation's), and
    a copy at the output size (Lanczos, through PIL's ``reduce``). Nothing full-size outlives the call.

    Raises:
        DatasetError: naming the file (as :func:`feclip.data.transforms.load_rgb` words it).
    """
    from PIL import Image

    from feclip.data.transforms import load_rgb

    path = Path(path)
    img = None
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(path)
                img.load()
        except MemoryError:
            raise
        except Exception:
            load_rgb(path)  # raises the DatasetError that names the file and says what is wrong
            raise DatasetError(f"image {path} cannot be decoded") from None
        if img.mode not in _PIL_RGB_MODES:  # 16-bit or float pixels: load_rgb's own scaling
            img.close()
            img = Image.fromarray(load_rgb(path))
        elif img.mode != "RGB":
            try:
                rgb = img.convert("RGB")
            except Exception:
                load_rgb(path)
                raise DatasetError(f"image {path}: cannot convert its {img.mode} pixels to RGB") from None
            img.close()
            img = rgb
        width, height = img.size
        h, w = output_size(height, width, max_side)
        model_input = img if img.size == (size, size) else img.resize((size, size), Image.Resampling.BICUBIC)
        shown = (
            img
            if (h, w) == (height, width)
            else img.resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0)
        )
        return Decoded(
            np.array(model_input, dtype=np.uint8), np.array(shown, dtype=np.uint8), (height, width)
        )
    except MemoryError:
        raise DatasetError(f"image {path} is too large to decode in the memory available") from None
    finally:
        if img is not None:
            img.close()


def _load(items: Sequence[InputImage], size: int, max_side: int):
    """Decode a batch: (kept items, decoded images, model inputs (B, 3, S, S) or None, problems)."""
    import torch

    from feclip.data.transforms import normalize

    kept, decoded, problems = [], [], []
    for item in items:
        try:
            image = decode(item.path, size, max_side)
        except DatasetError as err:
            problems.append(str(err))
            continue
        kept.append(item)
        decoded.append(image)
    images = torch.stack([normalize(d.model_input) for d in decoded]) if decoded else None
    return kept, decoded, images, problems


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


# ----------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------


def check_out_dir(out: Path) -> None:
    """Refuse an ``--out`` that cannot be (or become) a writable folder; nothing is created."""
    if os.path.lexists(out):
        if not out.is_dir():
            what = "a broken link" if not out.exists() else "a file"
            raise ConfigError(f"--out {out} is {what}, not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ConfigError(f"--out {out}: the folder is not writable")
        return
    for above in out.absolute().parents:
        if os.path.lexists(above):
            if not above.is_dir():
                raise ConfigError(f"--out {out} cannot be created: {above} is a file, not a folder")
            if not os.access(above, os.W_OK | os.X_OK):
                raise ConfigError(f"--out {out} cannot be created: {above} is not writable")
            return


def check_no_input_overwritten(items: Sequence[InputImage], out_dir: Path, masks: bool) -> None:
    """Refuse a run whose overlay or mask would replace one of its own input files."""
    inputs = {item.path.resolve(): item.path for item in items}
    for item in items:
        for suffix in ("overlay", "mask") if masks else ("overlay",):
            target = (out_dir / f"{item.name}_{suffix}.png").resolve()
            if target in inputs:
                raise ConfigError(
                    f"the {suffix} of {item.path} would overwrite the input {inputs[target]}; choose another --out"
                )


def _writing(path: Path, action) -> None:
    try:
        action()
    except OSError as err:
        raise FEClipError(f"cannot write {path}: {err.strerror or err}") from None


def _write_outputs(item: InputImage, image: Decoded, amap, out_dir: Path, args) -> None:
    """Overlay (and mask) PNGs at the output size of the image (the map never exceeds it)."""
    from feclip.scoring import upsample
    from feclip.viz import overlay, save_png

    shown = upsample(amap[None], image.shown.shape[:2])[0].numpy()
    path = out_dir / f"{item.name}_overlay.png"
    picture = overlay(image.shown, shown, args.alpha, args.vmin, args.vmax)
    _writing(path, lambda: save_png(path, picture))
    if args.threshold is not None:
        mask_path = out_dir / f"{item.name}_mask.png"
        _writing(mask_path, lambda: save_png(mask_path, shown >= args.threshold))


def _write_text(path: Path, text: str) -> None:
    from feclip.results import atomic_write_text

    try:
        atomic_write_text(path, text)
    except OSError as err:
        raise FEClipError(f"cannot write {path}: {err.strerror or err}") from None


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


# ----------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------


def check_options(args) -> None:
    """Refuse option values that would give silently wrong outputs (NaN, out of range)."""

    def finite(name: str, value: float | None) -> None:
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"--{name} must be a finite number, got {value}")

    for name in ("threshold", "sigma", "alpha", "vmin", "vmax"):
        finite(name, getattr(args, name))
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.sigma < 0:
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
    out_dir = Path(args.out)
    check_out_dir(out_dir)
    device = _device(args.device)
    items, problems = find_inputs(args.paths, exclude=out_dir)
    if not items:
        raise _nothing_to_do(args.paths, problems)
    check_no_input_overwritten(items, out_dir, args.threshold is not None)
    for problem in problems:
        _report(problem)
    model, what, weights = build_model(args.checkpoint, args.backbone, args.pretrained, device)
    print(f"# {what}")
    if weights.is_random:
        print("# warning: random CLIP weights: the scores are meaningless (for testing only)")
    _writing(out_dir, lambda: out_dir.mkdir(parents=True, exist_ok=True))
    rows: list[tuple[str, float]] = []
    images: list[dict] = []
    try:
        for start in range(0, len(items), args.batch_size):
            kept, decoded, batch, bad = _load(
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
                _write_outputs(item, image, amap, out_dir, args)
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
    _write_text(out_dir / "predict.json", json.dumps(record, indent=1) + "\n")
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
    try:
        return run(args)
    except FEClipError as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        detail = f" {' '.join(str(err).split())}" if str(err) else ""
        print(f"{PROG}: interrupted{detail}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

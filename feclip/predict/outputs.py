"""What ``feclip-predict`` writes into its output folder, every file atomically (:mod:`feclip.fileio`).

``<name>_overlay.png`` (a figure: the map over the image at the image's output size, its colour bar and
the image score), ``<name>_map.npy`` (the map drawn there: float32 ``(h, w)``, the output size),
``<name>_mask.png`` (``map >= threshold``, 0/255), ``scores.csv`` (``path,score``) and
``predict.json`` (the record). A
file of the same name is replaced only by a complete new one; an output that would replace one of the
run's own inputs, or a folder that cannot hold the outputs, is refused before anything runs. A file
that cannot be written raises :class:`~feclip.errors.FEClipError` naming it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from feclip.errors import ConfigError, FEClipError
from feclip.predict.images import Decoded, InputImage

#: The files written per image, ``<name>_<suffix>``; the last only with a threshold.
OUTPUT_SUFFIXES = ("overlay.png", "map.npy", "mask.png")

__all__ = [
    "OUTPUT_SUFFIXES",
    "check_no_input_overwritten",
    "check_out_dir",
    "make_folder",
    "write_image_outputs",
    "write_record",
    "write_scores_csv",
]


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
        for suffix in OUTPUT_SUFFIXES if masks else OUTPUT_SUFFIXES[:-1]:
            target = (out_dir / f"{item.name}_{suffix}").resolve()
            if target in inputs:
                raise ConfigError(
                    f"the {suffix.split('.')[0]} of {item.path} would overwrite the input {inputs[target]}; choose another --out"
                )


def _writing(path: Path, action) -> None:
    try:
        action()
    except OSError as err:
        raise FEClipError(f"cannot write {path}: {err.strerror or err}") from None


def make_folder(out_dir: Path) -> None:
    """Create the output folder (and its parents)."""
    _writing(out_dir, lambda: out_dir.mkdir(parents=True, exist_ok=True))


def write_image_outputs(
    item: InputImage,
    image: Decoded,
    amap,
    out_dir: Path,
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
    threshold: float | None = None,
    score: float | None = None,
) -> np.ndarray:
    """The files of one image at its output size (``image.shown``'s: the original size unless
    ``--max-side`` scaled it down): ``amap`` ``(S, S)`` is resized bilinearly straight to that size
    (never to a larger original), saved as ``<name>_map.npy`` (float32) and drawn, with a colour bar
    and the image ``score``, as ``<name>_overlay.png`` (:func:`feclip.viz.overlay_figure`); with
    ``threshold``, ``map >= threshold`` as ``<name>_mask.png``. Returns the map written, ``(h, w)``
    float32."""
    from feclip import scoring
    from feclip.viz import overlay_figure, save_figure, save_png

    shown = np.ascontiguousarray(scoring.upsample(amap[None], image.shown.shape[:2])[0].numpy(), np.float32)
    map_path = out_dir / f"{item.name}_map.npy"
    _writing(map_path, lambda: _save_npy(map_path, shown))
    path = out_dir / f"{item.name}_overlay.png"
    figure = overlay_figure(image.shown, shown, score, alpha, vmin, vmax)
    _writing(path, lambda: save_figure(figure, path))
    if threshold is not None:
        mask_path = out_dir / f"{item.name}_mask.png"
        _writing(mask_path, lambda: save_png(mask_path, shown >= threshold))
    return shown


def _save_npy(path: Path, array: np.ndarray) -> Path:
    from feclip.fileio import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a path
            np.save(f, array, allow_pickle=False)

    return atomic_write(path, write)


def _write_text(path: Path, text: str) -> Path:
    from feclip.fileio import atomic_write_text

    try:
        return atomic_write_text(path, text)
    except OSError as err:
        raise FEClipError(f"cannot write {path}: {err.strerror or err}") from None


def write_scores_csv(path: Path, rows: Sequence[tuple[str, float]]) -> Path:
    """``path,score`` rows, written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "score"])
    writer.writerows((p, f"{s:.6f}") for p, s in rows)
    return _write_text(path, buf.getvalue())


def write_record(path: Path, record: dict) -> Path:
    """``predict.json``: ``record`` as indented JSON, written atomically."""
    return _write_text(path, json.dumps(record, indent=1) + "\n")

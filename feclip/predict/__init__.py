"""Scores and heatmaps for image files with a trained adapter file: the library behind
``feclip-predict`` (the command line is :mod:`feclip.apps.predict`; docs/predict.md).

* :mod:`feclip.predict.model`: the model, rebuilt exactly from the adapter file's metadata (the full
  FEClipConfig and the backbone the adapters were trained on), or the bare CLIP baseline without one;
* :mod:`feclip.predict.images`: the inputs (files and folders), each image decoded once, a batch
  scored;
* :mod:`feclip.predict.outputs`: overlay figures, raw maps (``.npy``), masks, ``scores.csv`` and
  ``predict.json``, written atomically.

The score and the map are computed from the full-resolution image exactly as in evaluation (decoded to
RGB, bicubic to the model input size ``S``), by :mod:`feclip.scoring` with the evaluation's defaults:
the image score is the CLS path's abnormal probability averaged over the taps; the map is the mean
over taps of the abnormal probability on the token grid, bilinear to ``S``, Gaussian ``sigma`` (0 =
off), then bilinear to the output size.
"""

from feclip.predict.images import (
    Decoded,
    InputImage,
    decode,
    find_inputs,
    load_batch,
    output_size,
    score_batch,
)
from feclip.predict.model import BASELINE_SEED, build_model, config_from_metadata, resolve_pretrained
from feclip.predict.outputs import (
    check_no_input_overwritten,
    check_out_dir,
    make_folder,
    write_image_outputs,
    write_record,
    write_scores_csv,
)

__all__ = [
    "BASELINE_SEED",
    "Decoded",
    "InputImage",
    "build_model",
    "check_no_input_overwritten",
    "check_out_dir",
    "config_from_metadata",
    "decode",
    "find_inputs",
    "load_batch",
    "make_folder",
    "output_size",
    "resolve_pretrained",
    "score_batch",
    "write_image_outputs",
    "write_record",
    "write_scores_csv",
]

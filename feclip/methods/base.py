"""The contract between a peer method and the engine.

A method is an ``nn.Module`` built over a frozen open_clip ``CLIP`` model. Its ``forward`` takes a
batch of preprocessed images ``(B, 3, S, S)`` (the toolkit's transforms: CLIP mean/std, square ``S``)
and returns a :class:`MethodOutput`: the method's *own* image score and anomaly map, computed the way
its reference code computes them, on the token grid (``h = w = S / patch``) or at the input size when
the reference builds its map there. The engine does the rest for every method alike: upsampling to
the evaluation size, the toolkit's smoothing/post-processing options, metrics, CSVs.

Training methods also give ``trainable_state_dict()`` (what a checkpoint holds) and
``loss(output, masks, labels) -> (total, parts)`` over the same output (``masks (B, S, S)`` in {0, 1},
``labels (B,)`` in {0, 1}); training-free methods have no trainable parameters and no ``loss``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MethodOutput:
    """One batch's outputs. Shapes: ``B`` images, maps ``(B, h, w)`` or ``(B, S, S)``."""

    image_scores: torch.Tensor  # (B,) fp32, higher = more anomalous (the method's image score)
    maps: torch.Tensor  # (B, h, w) or (B, S, S) fp32 abnormal map, before the toolkit's upsampling/smoothing
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # what the method's loss reads (training)

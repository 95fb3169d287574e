"""Where the pixel metrics sort the normal pixels' scores: on the host (numpy) or on a GPU (torch).

Sorting the scores of a category's normal pixels (tens of millions: 115 maps of 336 x 336 hold
13 M) is most of the work of its pixel metrics, and of the pooled ``__micro__`` rows (195 M values
for MVTec AD). A GPU that has just made the maps sorts them in milliseconds while the host's numpy
takes about 0.1 s per 28 M values on one core, so the evaluation hands this one step to the GPU
(``eval.metrics_device=auto``). Every other step, and every number, stays on the host.

The values are the same bit for bit whichever sorts: a sort of scores (no indices) has one result up
to the order of equal values, which are interchangeable (a -0.0 and a 0.0 may trade places; every
metric compares them as equal). ``tests/test_metrics_sorting.py`` checks whole metric sets both ways.

A sort is a callable ``sort(values) -> values``: it sorts the 1-D contiguous numpy array ``values``
ascending, in place, and returns it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from feclip.errors import ConfigError

__all__ = ["METRICS_DEVICES", "Sort", "host_sort", "DeviceSort", "metrics_sort"]

#: Values of ``eval.metrics_device``: ``auto`` sorts on the evaluation's device when it is a GPU (else
#: on the host); ``cpu`` always on the host.
METRICS_DEVICES = ("auto", "cpu")

Sort = Callable[[np.ndarray], np.ndarray]


def host_sort(values: np.ndarray) -> np.ndarray:
    """numpy's in-place sort (SIMD quicksort for float16/32/64). Shape: (n,) -> (n,)."""
    values.sort()
    return values


@dataclass(frozen=True)
class DeviceSort:
    """Sort on a torch device: copy up, ``torch.sort``, copy the sorted values back into the same array.

    Arrays shorter than ``min_values`` (where the copies cost more than numpy's sort) and arrays the
    device has no memory for (``torch.OutOfMemoryError``, e.g. while a training holds it) are sorted
    by numpy: the result is the same either way. Safe to call from several threads at once.
    """

    device: Any  # torch.device
    min_values: int = 1 << 20

    def __call__(self, values: np.ndarray) -> np.ndarray:
        import torch

        if values.size < self.min_values:
            return host_sort(values)
        host = torch.from_numpy(values)
        try:
            host.copy_(torch.sort(host.to(self.device)).values)
        except torch.OutOfMemoryError:
            return host_sort(values)
        return values


def metrics_sort(metrics_device: str, device: Any = None) -> Sort:
    """The sort of ``eval.metrics_device`` for an evaluation on ``device`` (a torch device or ``None``):
    :class:`DeviceSort` on that device for ``auto`` with a CUDA device, else :func:`host_sort`."""
    if metrics_device not in METRICS_DEVICES:
        raise ConfigError(f"eval.metrics_device must be one of {METRICS_DEVICES}, got {metrics_device!r}")
    if metrics_device == "auto" and device is not None and getattr(device, "type", None) == "cuda":
        return DeviceSort(device)
    return host_sort

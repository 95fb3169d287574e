"""What the benchmark scripts share: ``scripts/bench.py`` (CPU ratios) and ``scripts/bench_gpu.py``
(CUDA, with ``bench_gpu_kernels.py``, which ``tests/test_cuda.py`` uses too).

* timing: :func:`seconds_per_call` (the device's queue drained), :func:`interleaved` rounds, and the
  median of their paired ratios with a distribution-free 95 % interval (:func:`median_ci`,
  :func:`paired_ratio`);
* a model and a training step: :func:`feclip_model`, :func:`training_batch` (random images, their prefix
  tokens, masks and labels) and :func:`train_step` (forward, loss, backward, optimizer step);
* data: :func:`blob_mask`, :class:`RandomAnomalySet` (an MVTec-sized set in memory) and
  :func:`png_category` (PNG files on disk, for the pipeline sections).

The scripts import it as a sibling (their folder is ``sys.path[0]`` when run; the tests put it there);
``feclip`` comes from the installed package or ``PYTHONPATH``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

# MVTec AD's test split: 1,725 images in 15 categories, 1,258 of them anomalous
MVTEC_TEST_IMAGES = 1725
MVTEC_ANOMALOUS_FRACTION = 1258 / 1725

# -- timing ----------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for the device's queue (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Mean wall seconds of ``fn()`` over ``iters`` calls after ``warmup`` calls, the queue drained."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Run each function once per round, in turn, so slow drifts hit all of them alike."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Median of ``values`` and a distribution-free confidence interval for it (order statistics:
    the interval between the k-th smallest and the k-th largest value, k the largest rank whose
    binomial(n, 1/2) tail stays within (1 - confidence) / 2). ``nan`` bounds when n is too small
    (n >= 6 gives a 95 % interval)."""
    from scipy.stats import binom

    xs = sorted(values)
    n = len(xs)
    k = 0  # 1-based rank of the lower bound; 0: no interval at this confidence
    while k + 1 <= n // 2 and binom.cdf(k, n, 0.5) <= (1 - confidence) / 2:
        k += 1
    lo, hi = (xs[k - 1], xs[n - k]) if k else (float("nan"), float("nan"))
    return statistics.median(xs), lo, hi


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> tuple[float, float, float]:
    """Median and 95 % CI of the per-round ratios ``num / den`` of interleaved timings."""
    return median_ci([a / b for a, b in zip(times[num], times[den])])


def ci_text(ratio: tuple[float, float, float]) -> str:
    return f"{ratio[0]:.3f} (95% CI {ratio[1]:.3f}-{ratio[2]:.3f})"


# -- a model and a training step -------------------------------------------------------------------


def feclip_model(clip, seed: int | None = 0, precision: str | None = None, **config):
    """``FEClip(clip, FEClipConfig(**config), precision=precision)``, its adapters drawn after
    ``torch.manual_seed(seed)`` (None: from the random state as it is). On CUDA the default precision
    is bf16: the frozen CLIP's matrices are then stored in bf16 (``clip`` changes)."""
    from feclip.models import FEClip, FEClipConfig

    if seed is not None:
        torch.manual_seed(seed)
    return FEClip(clip, FEClipConfig(**config), precision=precision)


def training_batch(model, batch: int, device: torch.device, seed: int | None = None):
    """A training batch at the model's input size: ``(images, tokens, masks, labels)``.

    Images are normal draws (from a generator on ``device`` seeded with ``seed``; None: the global
    random state); every other image is anomalous (label 1) with a square of ones in its mask; tokens
    are the images' prefix (what :class:`~feclip.engine.cache.PrefixCache` holds, in the model's token
    dtype)."""
    size = model.image_size
    g = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    images = torch.randn(batch, 3, size, size, device=device, generator=g)
    masks = torch.zeros(batch, size, size, device=device)
    masks[1::2, size // 4 : size // 2, size // 3 : size // 2] = 1.0
    labels = torch.arange(batch, device=device) % 2
    with torch.no_grad():
        tokens = model.prefix(images)
    return images, tokens, masks, labels


def train_step(model, optimizer, inputs: torch.Tensor, masks, labels, cached: bool) -> torch.Tensor:
    """One training step as :func:`feclip.engine.train.train` takes it: the forward from the prefix
    tokens (``cached``) or from the images, the loss (the paper's), backward and the optimizer's step.
    Returns the loss, unread (no synchronisation)."""
    from feclip.config import LossConfig
    from feclip.losses import feclip_loss

    out = model.forward_from_prefix(inputs) if cached else model(inputs)
    loss, _ = feclip_loss(out, masks, labels, LossConfig())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


# -- data ------------------------------------------------------------------------------------------


def blob_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """One to three random ellipses. Shape: ``(size, size)`` uint8 in {0, 1}."""
    yy, xx = np.ogrid[:size, :size]
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(max(2, size / 50), max(3, size / 6), 2)
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return mask.astype(np.uint8)


class RandomAnomalySet(torch.utils.data.Dataset):
    """``n`` random images held in memory with blob masks on the anomalous ones, in ``n_categories``
    categories, each with both normal and anomalous images (MVTec AD's test split: 1,725 images, 73 %
    anomalous, 15 categories).

    Items carry the keys of :class:`~feclip.data.AnomalyDataset` that training and evaluation read:
    ``image`` (3, S, S) float32, ``mask`` (S, S) float32, ``label``, ``index``, ``original_size`` (2,);
    ``samples[i].category`` and ``category_has_masks`` serve :mod:`feclip.engine.evaluate`.
    Memory: ``n * 3 * S * S * 4`` bytes for the images (2.3 GB for 1,725 at 336).
    """

    def __init__(self, n: int, size: int, n_categories: int, seed: int = 0):
        from feclip.data.mvtec import MVTEC_CATEGORIES

        names = list(MVTEC_CATEGORIES[:n_categories])
        names += [f"category_{i}" for i in range(len(names), n_categories)]
        self.images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
        self.masks = torch.zeros(n, size, size, dtype=torch.uint8)
        self.labels = [0] * n
        self.samples = [SimpleNamespace(category=names[i % len(names)]) for i in range(n)]
        self.category_has_masks = dict.fromkeys(names, True)
        rng = np.random.default_rng(seed)
        for c in range(len(names)):
            members = list(range(c, n, len(names)))
            k = min(max(round(len(members) * MVTEC_ANOMALOUS_FRACTION), 1), len(members) - 1)
            for i in rng.permutation(members)[:k].tolist():
                self.labels[i] = 1
                self.masks[i] = torch.from_numpy(blob_mask(rng, size))
        self.size = torch.tensor([size, size])

    @property
    def categories(self) -> list[str]:
        return list(self.category_has_masks)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {
            "image": self.images[index],
            "mask": self.masks[index].float(),
            "label": self.labels[index],
            "index": index,
            "original_size": self.size,
        }


class ByCategory(torch.utils.data.Dataset):
    """The images of a :class:`RandomAnomalySet` (categories interleaved) reordered category by category,
    as the readers list a benchmark's test split: each category's last image comes before the next's."""

    def __init__(self, data: RandomAnomalySet):
        self.data = data
        self.order = sorted(
            range(len(data)), key=lambda i: (data.categories.index(data.samples[i].category), i)
        )
        self.samples = [data.samples[i] for i in self.order]
        self.category_has_masks = data.category_has_masks

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> dict:
        return {**self.data[self.order[index]], "index": index}


def png_category(root: Path, n: int, size: int) -> list:
    """``n`` MVTec-like PNGs of ``size`` x ``size`` (every other one anomalous, with a blob mask) of one
    category ``root.name``, listed as an ``mvtec`` dataset (the samples)."""
    from PIL import Image

    from feclip.data import list_samples

    rng = np.random.default_rng(0)
    for sub in ("good", "bad"):
        (root / "test" / sub).mkdir(parents=True, exist_ok=True)
    (root / "ground_truth" / "bad").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        # smooth texture plus noise: compresses like a photo of a part (a few hundred kB per PNG)
        base = 128 + 60 * np.sin(xx / (17 + i) + yy / 29.0)[..., None] * np.array([1.0, 0.8, 0.6])
        img = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        sub = "bad" if i % 2 else "good"
        Image.fromarray(img).save(root / "test" / sub / f"{i:03d}.png")
        if sub == "bad":
            mask = blob_mask(rng, size) * 255
            Image.fromarray(mask).save(root / "ground_truth" / "bad" / f"{i:03d}_mask.png")
    return list_samples("mvtec", root.parent, categories=[root.name])

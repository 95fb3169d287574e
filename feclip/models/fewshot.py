"""Few-normal-shot FE-CLIP (paper section 4.6; docs/method.md, A13; docs/fewshot.md): everything but the arithmetic of
the scores, in one place.

* the references: :func:`pick_reference_samples` draws ``k`` of a category's normal images with
  ``numpy.random.default_rng(seed)`` from the path-sorted list, so a seed fixes the references;
  :func:`choose_references` says where a target's come from, per category (``eval.fewshot_source``:
  its train split, its ``reference/`` images, or ``k`` normal test images held out of the metrics);
* the features: :func:`tap_features` (the model's tap tokens of either kind);
* the memory bank: :class:`MemoryBank`, the per-tap patch features of the references, and the
  few-shot distance at tap ``n``, ``1 - max_m cos(token, bank_n[m])`` (0 when the token has an
  identical twin in the bank, at most 2);
* a run's banks: :func:`reference_banks` (one per category, of :func:`choose_references`' choice),
  :func:`category_banks` (the same from a pool of training images) and :func:`record_references`
  (``fewshot_references.csv``);
* :func:`fewshot_predict`: runs the model for a bank's kind of features and adds the few-shot part.

The few-shot map and its combination with the zero-shot score and map are scoring, made in
:mod:`feclip.scoring` (the formula is there): :func:`~feclip.scoring.fewshot_maps`,
:func:`~feclip.scoring.combine` and :func:`~feclip.scoring.fewshot_scores` live there and are
re-exported here for the documented API (docs/fewshot.md).

What is banked (a choice the paper leaves open): ``which="fused"`` (default) banks the fused tap tokens
of Eq. 2, i.e. ``FEClipOutput.tap_tokens``: the same features the patch path of the zero-shot map
sees. ``which="plain"`` banks the tokens of each tap block *before* its adapter fuses them (the
adapter's input). Every tap of the model is banked; test tokens are always compared tap by tap.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from feclip.config import DataConfig, EvalConfig
from feclip.errors import ConfigError, DatasetError
from feclip.fileio import atomic_write_text
from feclip.scoring import ScoringConfig, add_fewshot, combine, fewshot_maps, fewshot_scores

FEATURE_KINDS = ("fused", "plain")
#: ``eval.fewshot_source``: where a target's references come from. ``auto`` takes, per category, the first
#: of :data:`REFERENCE_SOURCES` that holds any normal image of it.
FEWSHOT_SOURCES = ("auto", "train", "reference", "holdout")
#: The sources a category's references may come from, in the order ``auto`` tries them.
REFERENCE_SOURCES = ("train", "reference", "holdout")
#: The columns of ``fewshot_references.csv`` (:func:`record_references`).
REFERENCES_HEADER = ("dataset", "category", "k", "seed", "source", "image_path")

__all__ = [
    "FEATURE_KINDS",
    "FEWSHOT_SOURCES",
    "REFERENCES_HEADER",
    "REFERENCE_SOURCES",
    "MemoryBank",
    "References",
    "category_banks",
    "choose_references",
    "combine",
    "fewshot_maps",
    "fewshot_predict",
    "fewshot_scores",
    "pick_reference_samples",
    "record_references",
    "reference_banks",
    "tap_features",
]


# ----------------------------------------------------------------------------------------------------
# Choosing the reference images
# ----------------------------------------------------------------------------------------------------


def pick_reference_samples(samples: Sequence, k: int, seed: int, category: str | None = None) -> list:
    """Draw ``k`` normal reference images of one category, deterministically per ``seed``.

    Args:
        samples: :class:`~feclip.data.Sample` records (the category's ``train`` split, its reference
            images, or its test images: :func:`choose_references`); only normal ones (``label == 0``)
            are candidates.
        k: how many references (the paper uses 1, 2 and 4).
        seed: the draw is ``numpy.random.default_rng(seed).choice(n, k, replace=False)`` over the
            candidates sorted by path, so it does not depend on the order of ``samples``.
        category: keep only this category; ``None`` requires the candidates to be of one category.

    Returns:
        the chosen samples, sorted by path (record ``[str(s.image_path) for s in ...]``).

    Raises:
        ConfigError: ``k < 1``, or candidates of several categories without ``category``.
        DatasetError: fewer than ``k`` normal candidates.
    """
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ConfigError(f"few-shot k must be a positive int, got {k!r}")
    normal = [s for s in samples if s.label == 0 and (category is None or s.category == category)]
    categories = sorted({s.category for s in normal})
    if len(categories) > 1:
        raise ConfigError(
            f"few-shot references must come from one category; got {categories[:5]} (pass category=...)"
        )
    if len(normal) < k:
        which = f" of category {category!r}" if category is not None else ""
        raise DatasetError(f"few-shot k={k} needs {k} normal reference images{which}, found {len(normal)}")
    candidates = sorted(normal, key=lambda s: str(s.image_path))
    chosen = np.random.default_rng(seed).choice(len(candidates), size=int(k), replace=False)
    return [candidates[i] for i in sorted(chosen.tolist())]


@dataclass
class References:
    """The few-shot references of one evaluation target, per category (:func:`choose_references`).

    Attributes:
        dataset: the target's dataset name.
        k: references per category.
        seed: the seed of the draw.
        sources: category -> ``train``, ``reference`` or ``holdout`` (one of :data:`REFERENCE_SOURCES`).
        chosen: category -> its ``k`` reference samples, sorted by path.
        pool: every candidate the draws were made from (the data of the run's identity).
        warnings: things to log (a draw every seed makes alike, test images held out by ``auto``).
    """

    dataset: str
    k: int
    seed: int
    sources: dict[str, str]
    chosen: dict[str, list]
    pool: list
    warnings: list[str] = field(default_factory=list)

    @property
    def held_out(self) -> list:
        """The references taken from the test set (``holdout``): not scored."""
        return [s for c, chosen in self.chosen.items() if self.sources[c] == "holdout" for s in chosen]

    def test_samples(self, samples: Sequence) -> list:
        """``samples`` less the images held out as references (the images the metrics are over)."""
        out = {str(s.image_path) for s in self.held_out}
        return [s for s in samples if str(s.image_path) not in out]


def _normal_of(pool: Sequence | None, category: str) -> list:
    return [s for s in pool or () if s.label == 0 and s.category == category]


def choose_references(
    dataset: str,
    categories: Sequence[str],
    k: int,
    seed: int,
    source: str = EvalConfig.fewshot_source,
    *,
    train: Sequence | None = None,
    reference: Sequence | None = None,
    test: Sequence = (),
) -> References:
    """Where each category's ``k`` references come from, and which they are (no file access).

    Per category, ``source`` (``eval.fewshot_source``) is ``train`` (its normal images of ``train``),
    ``reference`` (its images of ``reference``), ``holdout`` (``k`` of its normal images of ``test``,
    which are then left out of the metrics: :meth:`References.test_samples`) or ``auto``: the first of
    these three that holds any normal image of the category (never chosen by count: a category with
    two normal training images and ``k=4`` is an error, not a holdout). The draw is
    :func:`pick_reference_samples` with ``seed`` in every case.

    Args:
        dataset: the dataset name (for messages and the record).
        categories: the target's categories.
        k: references per category.
        seed: the seed of the draws.
        source: one of :data:`FEWSHOT_SOURCES`.
        train: the target dataset's ``train`` split, ``[]`` when it has none on disk, None when its
            layout has no train split.
        reference: its ``reference`` images (the ``reference/`` folders of ``folder`` and
            ``meta_json``), ``[]`` when there are none on disk, None when the layout has none.
        test: the target's test samples (the holdout's candidates).

    Raises:
        ConfigError: ``k`` is not a positive int, an unknown ``source``, or a ``source`` the layout
            does not have.
        DatasetError: one line naming every category with too few candidates: ``k`` (``k + 1`` for
            ``holdout``: one normal image must stay in the test set), with their counts.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"few-shot k (eval.fewshot_k) must be a positive int, got {k!r}")
    if source not in FEWSHOT_SOURCES:
        raise ConfigError(f"eval.fewshot_source must be one of {FEWSHOT_SOURCES}, got {source!r}")
    pools = {"train": train, "reference": reference, "holdout": test}
    if source in ("train", "reference") and pools[source] is None:
        what = "train split" if source == "train" else "reference/ folder (folder and meta_json layouts)"
        raise ConfigError(
            f"{dataset}: eval.fewshot_source={source}, but the {dataset} layout has no {what}; "
            "use eval.fewshot_source=auto or holdout"
        )
    k = int(k)
    sources: dict[str, str] = {}
    short: list[str] = []
    warnings: list[str] = []
    for category in dict.fromkeys(categories):
        if source == "auto":
            found = [s for s in REFERENCE_SOURCES if _normal_of(pools[s], category)]
            chosen_source = found[0] if found else "holdout"
        else:
            chosen_source = source
        sources[category] = chosen_source
        n = len(_normal_of(pools[chosen_source], category))
        need = k + 1 if chosen_source == "holdout" else k
        if n < need:
            short.append(f"{category!r} ({_count(chosen_source, n, k)})")
        elif n == need:
            warnings.append(
                f"{dataset}: category {category!r} has exactly {need} {_what(chosen_source)}: every seed uses "
                "the same few-shot references"
            )
        if chosen_source == "holdout" and source == "auto" and n >= need:
            warnings.append(
                f"{dataset}: category {category!r} has no train split nor reference/ images: {k} of its "
                f"{n} normal test images are held out as few-shot references and left out of its metrics "
                "(listed in fewshot_references.csv)"
            )
    if short:
        listed = ", ".join(short[:6]) + (f" (+{len(short) - 6} more)" if len(short) > 6 else "")
        raise DatasetError(
            f"{dataset}: few-shot k={k} (eval.fewshot_source={source}) has too few normal images in "
            f"categor{'y' if len(short) == 1 else 'ies'} {listed}: lower eval.fewshot_k or add normal "
            "images (a reference/ folder: docs/fewshot.md)"
        )
    chosen = {c: pick_reference_samples(pools[src], k, seed, c) for c, src in sources.items()}
    pool = [s for src in REFERENCE_SOURCES for s in pools[src] or () if sources.get(s.category) == src]
    pool = [s for s in pool if s.label == 0 or sources[s.category] != "holdout"]  # holdout: normals only
    return References(dataset, k, int(seed), sources, chosen, pool, warnings)


def _what(source: str) -> str:
    return {
        "train": "normal train images",
        "reference": "reference/ images",
        "holdout": "normal test images (holdout: k references + 1 left to test)",
    }[source]


def _count(source: str, n: int, k: int) -> str:
    if source == "holdout":
        return f"{n} normal test images; holdout needs k+1={k + 1}: k references + 1 left to test"
    return f"{n} {_what(source)}"


# ----------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------


@contextmanager
def _capture_adapter_inputs(model, store: list[torch.Tensor]):
    """Append each tap adapter's input ``(B, h, w, D)`` to ``store`` while the block runs."""

    def hook(_module, args):
        store.append(args[0])

    handles = [model.adapters[str(t)].register_forward_pre_hook(hook) for t in model.config.taps]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def tap_features(model, images: torch.Tensor, which: str = EvalConfig.fewshot_bank):
    """Run ``model`` once; return its output and the per-tap patch features of kind ``which``.

    Shape: images ``(B, 3, S, S)`` -> (:class:`~feclip.models.FEClipOutput` with ``tap_tokens``,
    features ``(N, B, h, w, D)``). ``fused`` features are ``out.tap_tokens``; ``plain`` are the tap
    blocks' outputs before fusion.
    """
    if which not in FEATURE_KINDS:
        raise ConfigError(f"few-shot features must be one of {FEATURE_KINDS}, got {which!r}")
    if which == "fused":
        out = model(images, return_tokens=True)
        return out, out.tap_tokens
    captured: list[torch.Tensor] = []
    with _capture_adapter_inputs(model, captured):
        out = model(images, return_tokens=True)
    return out, torch.stack(captured)


# ----------------------------------------------------------------------------------------------------
# The memory bank
# ----------------------------------------------------------------------------------------------------


@dataclass
class MemoryBank:
    """Per-tap L2-normalised patch features of ``k`` normal images of one category.

    Attributes:
        features: ``(N, k*h*w, D)`` float32, unit norm along D; tap ``n`` is ``taps[n]``.
        taps: the model's tap blocks.
        grid: ``(h, w)``, the token grid the features come from.
        which: ``"fused"`` or ``"plain"`` (see the module docstring).
        reference_paths: the reference images, when known (for the run record).
    """

    features: torch.Tensor
    taps: tuple[int, ...]
    grid: tuple[int, int]
    which: str = EvalConfig.fewshot_bank
    reference_paths: list[str] = field(default_factory=list)

    @property
    def k(self) -> int:
        """Number of reference images."""
        return self.features.shape[1] // (self.grid[0] * self.grid[1])

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model,
        images: torch.Tensor,
        which: str = EvalConfig.fewshot_bank,
        reference_paths: Sequence[str] = (),
        batch_size: int = 8,
    ) -> MemoryBank:
        """Bank the tap features of reference images ``(k, 3, S, S)`` (CLIP-normalised, model input size).

        The features come from the model's own forward, at its precision (``FEClip.precision``), as the
        test tokens they are compared with; they are stored in fp32 and stay on the model's device.
        Shape: ``features (N, k*h*w, D)``.
        """
        if images.ndim != 4 or images.shape[0] < 1:
            raise ConfigError(f"few-shot references must be a (k, 3, S, S) batch, got {tuple(images.shape)}")
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        chunks = []
        try:
            for start in range(0, images.shape[0], batch_size):
                _, feats = tap_features(model, images[start : start + batch_size].to(device), which)
                chunks.append(feats.float())
        finally:
            model.train(was_training)
        feats = torch.cat(chunks, dim=1)  # (N, k, h, w, D)
        n, k, h, w, d = feats.shape
        bank = F.normalize(feats.reshape(n, k * h * w, d), dim=-1)
        return cls(bank, tuple(model.config.taps), (h, w), which, [str(p) for p in reference_paths])

    @classmethod
    def from_samples(
        cls,
        model,
        samples: Sequence,
        which: str = EvalConfig.fewshot_bank,
        batch_size: int = 8,
        resize: str = DataConfig.resize,
    ) -> MemoryBank:
        """Decode the reference ``samples`` (as :class:`~feclip.data.AnomalyDataset` does, with the same
        ``resize`` as the test images) and bank them."""
        from feclip.data import AnomalyDataset

        ds = AnomalyDataset(list(samples), image_size=model.image_size, cache=False, resize=resize)
        images = torch.stack([ds[i]["image"] for i in range(len(ds))])
        return cls.build(model, images, which, [str(s.image_path) for s in samples], batch_size)

    def check_compatible(self, model) -> None:
        """Raise :class:`ConfigError` when ``model`` has other taps, grid or width than the bank."""
        width = model.fc_patch.in_features
        if tuple(model.config.taps) != self.taps or tuple(model.grid) != self.grid:
            raise ConfigError(
                f"memory bank built for taps {list(self.taps)} on a {self.grid} grid, "
                f"but the model has taps {list(model.config.taps)} on a {tuple(model.grid)} grid"
            )
        if self.features.shape[-1] != width:
            raise ConfigError(f"memory bank width {self.features.shape[-1]} != model width {width}")

    @torch.no_grad()
    def distance_maps(self, tokens: torch.Tensor, chunk_elements: int = 1 << 24) -> torch.Tensor:
        """Cosine distance of each test token to its nearest banked token, per tap.

        Computed per tap in chunks of test tokens so that a similarity block never holds more than
        about ``chunk_elements`` floats. Shape: ``(N, B, h, w, D) -> (N, B, h, w)``, values in [0, 2].
        """
        n, b, h, w, d = tokens.shape
        if n != self.features.shape[0] or d != self.features.shape[-1]:
            raise ConfigError(
                f"tokens {tuple(tokens.shape)} do not fit the memory bank {tuple(self.features.shape)} "
                "(taps, width)"
            )
        bank = self.features.to(tokens.device)
        queries = F.normalize(tokens.float().reshape(n, b * h * w, d), dim=-1)
        step = max(1, chunk_elements // bank.shape[1])
        best = torch.empty(n, b * h * w, device=tokens.device)
        for t in range(n):
            for start in range(0, b * h * w, step):
                sims = queries[t, start : start + step] @ bank[t].T  # (chunk, k*h*w)
                best[t, start : start + step] = sims.amax(dim=1)
        return (1.0 - best).clamp_(0.0, 2.0).reshape(n, b, h, w)


# ----------------------------------------------------------------------------------------------------
# A run's banks, and the few-shot part of a prediction
# ----------------------------------------------------------------------------------------------------


def category_banks(
    model,
    pool: Sequence,
    categories: Sequence[str],
    k: int,
    seed: int,
    which: str = EvalConfig.fewshot_bank,
    resize: str = DataConfig.resize,
) -> dict[str, MemoryBank]:
    """One bank per category, from ``k`` normal images of ``pool`` (a dataset's ``train`` samples)
    drawn with ``seed`` (:func:`pick_reference_samples`), decoded with the test images' ``resize``."""
    banks = {}
    for category in categories:
        chosen = pick_reference_samples(pool, k, seed, category)
        banks[category] = MemoryBank.from_samples(model, chosen, which=which, resize=resize)
    return banks


def reference_banks(
    model,
    references: References,
    which: str = EvalConfig.fewshot_bank,
    resize: str = DataConfig.resize,
    progress: bool = False,
) -> dict[str, MemoryBank]:
    """One bank per category of the references :func:`choose_references` chose, decoded with the test
    images' ``resize``; ``progress``: show the categories done (:func:`feclip.progress.progress`)."""
    from feclip.progress import progress as show_progress

    chosen = references.chosen
    items = show_progress(list(chosen.items()), progress, "few-shot banks", len(chosen), unit="category")
    return {
        category: MemoryBank.from_samples(model, refs, which=which, resize=resize) for category, refs in items
    }


def record_references(
    path: str | Path,
    dataset: str,
    k: int,
    seed: int,
    banks: dict[str, MemoryBank],
    sources: dict[str, str] | None = None,
) -> Path:
    """Record the banks' reference images in ``path`` (``fewshot_references.csv``: columns
    :data:`REFERENCES_HEADER`, ``source`` being ``train``, ``reference`` or ``holdout``: a test image
    left out of the metrics; ``sources``: per category, default ``train``), replacing the rows of
    ``dataset`` and keeping the others' (a run evaluates several targets). Written atomically."""
    path = Path(path)
    sources = sources or {}
    kept = []
    if path.exists():
        old = list(csv.reader(io.StringIO(path.read_text())))
        if old and tuple(old[0]) == REFERENCES_HEADER:  # a file of another layout is replaced whole
            kept = [row for row in old[1:] if row and row[0] != dataset]
    rows = [
        [dataset, c, k, seed, sources.get(c, "train"), p]
        for c, bank in banks.items()
        for p in bank.reference_paths
    ]
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([REFERENCES_HEADER, *kept, *rows])
    return atomic_write_text(path, text.getvalue())


@torch.no_grad()
def fewshot_predict(
    model,
    bank: MemoryBank,
    images: torch.Tensor,
    zero_shot_scores: torch.Tensor,
    zero_shot_maps: torch.Tensor,
    sigma: float = ScoringConfig.sigma,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the few-shot part to zero-shot results computed by any scoring configuration.

    Runs ``model`` on ``images`` again for the bank's kind of features, then
    :func:`feclip.scoring.add_fewshot`; ``sigma`` should be the one the zero-shot maps were smoothed
    with. Shape: images ``(B, 3, S, S)``, scores ``(B,)``, maps ``(B, H, W)`` -> final scores ``(B,)``
    and maps ``(B, H, W)``.
    """
    bank.check_compatible(model)
    _, tokens = tap_features(model, images, bank.which)
    return add_fewshot(tokens, bank, zero_shot_scores, zero_shot_maps, sigma)

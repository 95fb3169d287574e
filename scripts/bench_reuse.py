"""The ``reuse`` section of scripts/bench.py: train once, evaluate many (:mod:`feclip.engine.store`).

* ``eval_sweep_speedup``: an eval-only sweep of the demo (``+experiment=demo backbone=tiny``: feclip-tiny
  trained on synthetic set A, evaluated on set B) over ``variants`` values of ``eval.sigma``, each
  variant one :func:`feclip.engine.run.run` as a Hydra sweep makes it, with the stores (one training,
  one forward pass, then rescoring) and without them (``train.reuse=false eval.reuse_outputs=false``:
  a training and a forward pass per variant). Each sweep starts from empty results and cache folders
  (decoded images included), the two alternate round by round, and the speed-up is the median of the
  per-round ratios with its 95 % interval. The metrics.csv values of the two sweeps are compared
  variant by variant (``eval_sweep_identical``).
* ``rescore_seconds_per_image``: evaluating stored outputs (:func:`feclip.engine.evaluate.predict` from
  a :class:`~feclip.engine.store.RawOutputs`, the masks fed from the warm decoded-image cache, maps at
  336 with sigma 4, then every metric of :func:`~feclip.engine.evaluate.metric_rows`) per image, against
  the forward pass of one image it replaces: ViT-L-14-336 (random weights, fp32, batch 1), timed in the
  same interleaved rounds (``rescore_fraction_of_vitl_forward``, goal < 0.05).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from benchlib import ci_text, interleaved, median_ci, paired_ratio, png_category

SIGMAS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)  # eval.sigma of the sweep's variants


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from feclip.apps.train import CONF_DIR, to_run_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_run_config(compose(config_name="train", overrides=overrides))


def _sweep(data_root: Path, work: Path, reuse: bool, variants: int, epochs: int | None) -> dict:
    """One eval-only sweep of the demo into fresh folders under ``work``; the metrics by variant."""
    from feclip.engine.run import run
    from feclip.results import read_metrics

    base = [
        "+experiment=demo",
        "backbone=tiny",
        f"paths.data_root={data_root}",
        f"paths.results_dir={work / 'results'}",
        f"paths.cache_dir={work / 'cache'}",
        "train.progress=false",
    ]
    if epochs is not None:
        base.append(f"train.epochs={epochs}")
    if not reuse:
        base += ["train.reuse=false", "eval.reuse_outputs=false"]
    metrics = {}
    for sigma in SIGMAS[:variants]:
        out = run(_compose([*base, f"eval.sigma={sigma}", f"variant=sigma{sigma:g}"]))
        metrics[sigma] = {
            (r["category"], r["metric"]): repr(r["value"]) for r in read_metrics(out / "metrics.csv")
        }
    return metrics


def bench_eval_sweep(rounds: int, variants: int = 8, epochs: int | None = None) -> dict:
    """``eval_sweep_speedup``: the sweep without the stores over the sweep with them (module docstring).
    ``epochs``: ``train.epochs`` (None: the demo's 30)."""
    from feclip.data import make_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_synthetic(tmp / "data" / "synthetic")  # the demo's sets (make demo generates the same)
        results: dict[str, list] = {"reuse": [], "plain": []}
        counter = iter(range(10**6))

        def one(kind: str) -> None:
            work = tmp / f"{kind}{next(counter)}"
            results[kind].append(_sweep(tmp / "data", work, kind == "reuse", variants, epochs))

        times = interleaved({"reuse": lambda: one("reuse"), "plain": lambda: one("plain")}, rounds)
        identical = all(a == b for a, b in zip(results["reuse"], results["plain"]))
    ratio = paired_ratio(times, "plain", "reuse")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"[reuse] eval-only sweep of the demo ({variants} values of eval.sigma, {epochs or 30} epochs, "
        f"feclip-tiny, {rounds} interleaved rounds): {med['plain']:.1f} s without the stores, "
        f"{med['reuse']:.1f} s with them: median paired speed-up {ci_text(ratio)}; metrics identical: "
        f"{identical}"
    )
    return {
        "eval_sweep_speedup": ratio[0],
        "eval_sweep_speedup_ci95": [ratio[1], ratio[2]],
        "eval_sweep_seconds_plain": med["plain"],
        "eval_sweep_seconds_reuse": med["reuse"],
        "eval_sweep_variants": variants,
        "eval_sweep_identical": identical,
    }


def bench_rescore(rounds: int, n_images: int = 16, model_name: str = "ViT-L-14-336-quickgelu") -> dict:
    """``rescore_seconds_per_image`` against one image's ``model_name`` forward (module docstring)."""
    from feclip.config import EvalConfig
    from feclip.data import AnomalyDataset
    from feclip.engine.evaluate import metric_rows, predict
    from feclip.models import FEClip, FEClipConfig, load_clip

    device = torch.device("cpu")
    torch.manual_seed(0)
    model = FEClip(load_clip(model_name, pretrained=None), FEClipConfig()).eval()
    size = model.image_size
    cfg = EvalConfig(batch_size=8)
    with tempfile.TemporaryDirectory() as tmp:
        samples = png_category(Path(tmp) / "part", n_images, size)
        disk = Path(tmp) / "decoded"
        dataset = AnomalyDataset(samples, image_size=size, disk_cache=disk)
        t0 = time.perf_counter()
        preds = predict(model, dataset, cfg, device, keep_outputs=True)  # the outputs to store
        first_s = time.perf_counter() - t0
        stored = preds.outputs
        one_image = dataset[0]["image"][None]

        def rescore() -> None:
            ds = AnomalyDataset(samples, image_size=size, disk_cache=disk)  # a run's fresh dataset
            p = predict(model, ds, cfg, device, stored=stored)
            metric_rows("bench", p, ds.category_has_masks, cfg)

        def forward() -> None:
            with torch.inference_mode():
                model(one_image)

        rescore(), forward()  # warm-up
        times = interleaved({"rescore": rescore, "forward": forward}, rounds)
    per_image = [t / n_images for t in times["rescore"]]
    fraction = median_ci([r / f for r, f in zip(per_image, times["forward"])])
    rescore_s = median_ci(per_image)
    forward_s = statistics.median(times["forward"])
    short = "vitl" if "ViT" in model_name else "tiny"
    print(
        f"[reuse] rescoring stored outputs of {n_images} images at {size} px (feed from the decoded "
        f"cache, maps with sigma 4, every metric; {rounds} interleaved rounds): {1000 * rescore_s[0]:.1f} ms "
        f"per image against {forward_s:.2f} s for one {model_name} forward (batch 1): "
        f"{ci_text(fraction)} of the forward (the first evaluation, forward included: {first_s:.1f} s)"
    )
    return {
        "rescore_seconds_per_image": rescore_s[0],
        "rescore_seconds_per_image_ci95": [rescore_s[1], rescore_s[2]],
        f"forward_seconds_per_image_{short}": forward_s,
        f"rescore_fraction_of_{short}_forward": fraction[0],
        f"rescore_fraction_of_{short}_forward_ci95": [fraction[1], fraction[2]],
    }


def bench_reuse(
    rounds: int, sweep_rounds: int, variants: int = 8, epochs: int | None = None, model_name: str = ""
) -> dict:
    """Both figures of the section (``model_name``: the forward the rescoring is compared with)."""
    figures = bench_eval_sweep(sweep_rounds, variants, epochs)
    figures.update(bench_rescore(rounds, model_name=model_name or "ViT-L-14-336-quickgelu"))
    return figures

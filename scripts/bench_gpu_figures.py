"""The figures of ``scripts/bench_gpu.py`` beyond what it measures: the FLOP model (GFLOPs per image,
achieved TFLOP/s, MFU, the protocol's ideal time) and the human summary.

FLOP model (GFLOPs per image; F = 381.9 for the ViT-L/14@336 image encoder's forward, 24 blocks of
F/24 each, embedding and head neglected; A = 13.6 % of F for the adapters and fc_patch at 4 taps,
A/4 per tap; taps t_1 < ... < t_N):
  encode_image             F
  FE-CLIP forward          F (t_N + 1) / 24 + A                    (blocks after the last tap never run)
  training step, uncached  F (t_N + 1) / 24 + A  +  F (t_N - t_1) / 24  +  2 A
  training step, cached    F (t_N - t_1) / 24 + A  +  F (t_N - t_1) / 24  +  2 A
The backward pass runs through the frozen blocks after the first tap for their input gradients only
(as many FLOPs as their forward) and through the adapters for input and weight gradients (twice their
forward); the blocks up to the first tap need no backward. spread3 [15, 18, 21, 23]: 433.8 GFLOPs per
image forward, 665.0 per uncached and 410.4 per cached training step. Achieved TFLOP/s = images/s x
GFLOPs per image / 1000; MFU = that / the peak (``--peak-tflops``, 989 for the H200 SXM's dense bf16:
NVIDIA's datasheet gives 1,979 TFLOP/s with 2:4 sparsity; the H200 NVL's dense figure is 835; a large
bf16 matrix product reaches about 790 on the H200 this project is lent). See docs/gpu_bench.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench_gpu_kernels import ATTENTION_PATHS, classify_attention

PEAK_TFLOPS_H200 = 989.0  # H200 SXM, dense bf16 (datasheet: 1,979 with sparsity)
VIT_L_FORWARD_GFLOPS = 381.9
ADAPTER_FRACTION = 0.136  # adapters + fc_patch at 4 taps, relative to the encoder forward
PAPER_TAPS = (15, 18, 21, 23)
FLOP_MODELS = ("ViT-L-14-336", "ViT-L-14-336-quickgelu")  # the backbones the FLOP model describes


@dataclass(frozen=True)
class FlopModel:
    """GFLOPs per image of FE-CLIP's passes (the model of the module docstring)."""

    forward_gflops: float = VIT_L_FORWARD_GFLOPS  # the image encoder's forward, all blocks
    depth: int = 24
    adapter_fraction: float = ADAPTER_FRACTION  # adapters + fc_patch at 4 taps, relative to forward
    taps: tuple[int, ...] = PAPER_TAPS

    @property
    def block(self) -> float:
        return self.forward_gflops / self.depth

    @property
    def adapters(self) -> float:
        return self.adapter_fraction * self.forward_gflops * len(self.taps) / 4

    def encode_image(self) -> float:
        return self.forward_gflops

    def feclip_forward(self) -> float:
        return self.block * (self.taps[-1] + 1) + self.adapters

    def prefix(self) -> float:
        """What the prefix cache computes once per image: the blocks up to the first tap."""
        return self.block * (self.taps[0] + 1)

    def train_step(self, cached: bool) -> float:
        between = self.block * (self.taps[-1] - self.taps[0])  # blocks after the first tap
        forward = between + self.adapters if cached else self.feclip_forward()
        return forward + between + 2 * self.adapters

    def per_image(self) -> dict[str, float]:
        return {
            "encode_image": self.encode_image(),
            "feclip_forward": self.feclip_forward(),
            "train_step_uncached": self.train_step(cached=False),
            "train_step_cached": self.train_step(cached=True),
        }


def tflops(images_per_s: float, gflops_per_image: float) -> float:
    """Achieved TFLOP/s."""
    return images_per_s * gflops_per_image / 1e3


def mfu(images_per_s: float, gflops_per_image: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved / peak, a fraction."""
    return tflops(images_per_s, gflops_per_image) / peak_tflops


def protocol_gflops(flops: FlopModel, n_images: int, epochs: int) -> float:
    """The whole cached protocol: the prefix of every image once, then ``epochs`` cached steps each."""
    return n_images * (flops.prefix() + epochs * flops.train_step(cached=True))


def add_flop_figures(figures: dict, flops: FlopModel, peak_tflops: float) -> None:
    """Achieved TFLOP/s and MFU for every speed figure present, and the protocol's ideal time."""
    per_image = flops.per_image()
    rates = {
        "infer": ("infer_images_per_s", per_image["feclip_forward"]),
        "encode_image": ("encode_image_images_per_s", per_image["encode_image"]),
        "train_cached": ("train_images_per_s_cached", per_image["train_step_cached"]),
        "train_uncached": ("train_images_per_s_uncached", per_image["train_step_uncached"]),
    }
    for name, (key, gflops) in rates.items():
        if key in figures:
            figures[f"tflops_{name}"] = tflops(figures[key], gflops)
            figures[f"mfu_{name}"] = mfu(figures[key], gflops, peak_tflops)
    if "protocol_seconds" in figures:
        total = protocol_gflops(flops, figures["protocol_images"], figures["protocol_epochs"])
        figures["protocol_ideal_seconds"] = total / (peak_tflops * 1e3)
        figures["mfu_protocol"] = figures["protocol_ideal_seconds"] / figures["protocol_seconds"]
    if "eval_predict_seconds" in figures:
        ideal = figures["eval_images"] * per_image["feclip_forward"] / (peak_tflops * 1e3)
        figures["mfu_eval_predict"] = ideal / figures["eval_predict_seconds"]
    figures["gflops_per_image"] = per_image
    figures["peak_tflops"] = peak_tflops


def _mfu(figures: dict, key: str) -> str:
    if f"mfu_{key}" not in figures:  # a backbone the FLOP model does not describe
        return ""
    return f" ({figures['tflops_' + key]:.0f} TFLOP/s, {100 * figures['mfu_' + key]:.1f} % MFU)"


def format_summary(figures: dict) -> str:
    """The human summary: one line per figure present (sections that did not run are left out)."""
    f = figures
    lines = [
        f"[env] {f.get('device_name')}; torch {f.get('torch')}, CUDA {f.get('cuda')}, cuDNN {f.get('cudnn')}, "
        f"open_clip {f.get('open_clip')}; {f.get('model')}{' (quick sizes)' if f.get('quick') else ''}"
    ]
    if "attention_design" in f:
        lines.append(f"[checks] precision {f.get('precision')}; {f['attention_design']}")
        for path in ATTENTION_PATHS:
            kinds = classify_attention(f.get(f"attention_ops_{path}", []))
            lines.append(f"[checks] {path}: fused {kinds['fused'] or 'none'}; math {kinds['math'] or 'none'}")
    if "nondeterministic_max_rel_diff" in f:
        lines.append(
            f"[checks] without train.deterministic, {f['determinism_steps']} cached steps twice from one "
            f"start: max rel. diff {f['nondeterministic_max_rel_diff']:.1e} (the run-to-run spread)"
        )
    if "infer_images_per_s" in f:
        lines.append(
            f"[infer] batch {f['infer_batch']}: FE-CLIP {f['infer_images_per_s']:.1f} images/s"
            + _mfu(f, "infer")
            + f", encode_image {f['encode_image_images_per_s']:.1f} images/s"
            + _mfu(f, "encode_image")
            + f"; overhead x{f['forward_overhead']:.3f}"
        )
    if "train_images_per_s_cached" in f:
        lines.append(
            f"[train] batch {f['train_batch']}: cached {f['train_images_per_s_cached']:.1f} images/s"
            + _mfu(f, "train_cached")
            + f", uncached {f['train_images_per_s_uncached']:.1f} images/s"
            + _mfu(f, "train_uncached")
            + f"; prefix cache x{f['prefix_cache_speedup']:.2f}"
            + (
                f"; deterministic {f['train_images_per_s_cached_deterministic']:.1f} images/s "
                f"(x{f['deterministic_cost']:.2f} time)"
                if "deterministic_cost" in f
                else ""
            )
        )
    if "protocol_seconds" in f:
        ideal = (
            f"; ideal at peak {f['protocol_ideal_seconds']:.1f} s, {100 * f['mfu_protocol']:.1f} % MFU"
            if "mfu_protocol" in f
            else ""
        )
        lines.append(
            f"[protocol] {f['protocol_epochs']} epochs x {f['protocol_images']} images: "
            f"{f['protocol_seconds']:.1f} s ({f['protocol_images_per_s']:.1f} images/s{ideal}; "
            f"{f['protocol_outside_epochs_seconds']:.1f} s outside the epochs)"
        )
        for w in f["protocol_warnings"]:
            lines.append(f"[protocol] warning: {w}")
    if "eval_seconds" in f:
        predict_mfu = f", {100 * f['mfu_eval_predict']:.1f} % MFU" if "mfu_eval_predict" in f else ""
        lines.append(
            f"[eval] {f['eval_images']} images, {f['eval_categories']} categories: {f['eval_seconds']:.1f} s "
            f"(predict {f['eval_predict_seconds']:.1f} s{predict_mfu}; "
            f"metrics {f['eval_metrics_seconds']:.1f} s, {f['eval_metric_rows']} rows)"
        )
        if "eval_metrics_host_sort_seconds" in f:
            lines.append(
                f"[eval] metrics with the pixels sorted on the device {f['eval_metrics_seconds']:.2f} s, by "
                f"numpy {f['eval_metrics_host_sort_seconds']:.2f} s (x{f['eval_metrics_gpu_sort_speedup']:.2f}); "
                f"values differing: {f['eval_metric_values_differing']}"
            )
        if "eval_overlap_seconds" in f:
            lines.append(
                f"[eval] evaluate() with the metrics after the predictions {f['eval_after_seconds']:.2f} s, "
                f"metrics overlapped with them {f['eval_overlap_seconds']:.2f} s "
                f"(x{f['eval_overlap_speedup']:.2f}); values differing: {f['eval_overlap_values_differing']}"
            )
    if "pipeline_model_images_per_s" in f:
        w = f["pipeline_workers"]
        lines.append(
            f"[pipeline] {f['pipeline_images']} PNGs of {f['pipeline_side']}^2: model alone "
            f"{f['pipeline_model_images_per_s']:.1f} images/s; evaluation from the files "
            f"{f['eval_images_per_s_w0']:.1f} images/s with 0 workers (ratio {f['eval_pipeline_ratio_w0']:.3f}), "
            f"{f[f'eval_images_per_s_w{w}']:.1f} with {w} (ratio {f[f'eval_pipeline_ratio_w{w}']:.3f})"
        )
    if "eval_images_per_s_cached_w0" in f:
        w = f["pipeline_workers"]
        lines.append(
            f"[pipeline] from the warm decoded-image cache (written in "
            f"{f['pipeline_cache_build_seconds']:.1f} s): {f['eval_images_per_s_cached_w0']:.1f} images/s "
            f"with 0 workers (ratio {f['eval_pipeline_ratio_cached_w0']:.3f}), "
            f"{f[f'eval_images_per_s_cached_w{w}']:.1f} with {w} "
            f"(ratio {f[f'eval_pipeline_ratio_cached_w{w}']:.3f})"
        )
    if "pipeline_cached_feed_images_per_s" in f:
        lines.append(
            f"[pipeline] cached, {f['pipeline_workers']} workers, each part alone: feed "
            f"{f['pipeline_cached_feed_images_per_s']:.1f} images/s, predict (feed + model + maps) "
            f"{f['pipeline_cached_predict_images_per_s']:.1f} images/s, metrics "
            f"{f['pipeline_cached_metrics_seconds']:.2f} s"
        )
    for key in sorted(k for k in f if k.startswith("peak_memory_gb_")):
        lines.append(f"[memory] {key.removeprefix('peak_memory_gb_')}: {f[key]:.1f} GB peak")
    for section, error in f.get("section_errors", {}).items():
        lines.append(f"SECTION {section} FAILED: {error}")
    return "\n".join(lines)

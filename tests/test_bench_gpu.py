"""scripts/bench_gpu.py without a GPU: arguments, the FLOP model, the report (bench_gpu_figures.py), and
every section's code run on the CPU with the tiny CLIP (figures are checked for presence and sense,
never for speed), the kernels' profile and the repeated training (bench_gpu_kernels.py) included."""

import importlib.util
import json
import math
import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import bench_gpu_figures as gpu_figures  # noqa: E402
import bench_gpu_kernels as kernels  # noqa: E402
import benchlib  # noqa: E402


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "scripts" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_gpu"]


def test_arguments(bench):
    args = bench.parse_args([])
    assert args.sections == list(bench.SECTIONS) and args.sizes == bench.Sizes()
    assert (args.sizes.infer_batch, args.sizes.train_batch, args.sizes.n_images, args.sizes.epochs) == (
        64,
        16,
        1725,
        9,
    )
    assert args.peak_tflops == 989.0 and args.out is None
    quick = bench.parse_args(["--quick", "--only", "infer, eval", "--out", "x.json"])
    assert quick.sizes == bench.QUICK and quick.sections == ["infer", "eval"] and quick.out == "x.json"
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--only", "infer,speed"])
    assert e.value.code == 2


def test_flop_model_by_hand(bench):
    f = bench.FlopModel()
    block, adapters = 381.9 / 24, 0.136 * 381.9
    assert f.encode_image() == 381.9
    assert f.feclip_forward() == pytest.approx(381.9 * 1.136)  # 433.8: the issue's +13.6 %
    # uncached: full forward + backward through blocks 16..23 (input gradients) + adapters (x2)
    assert f.train_step(cached=False) == pytest.approx(381.9 + adapters + 8 * block + 2 * adapters)
    assert f.train_step(cached=False) == pytest.approx(665.0, abs=0.1)
    assert f.train_step(cached=True) == pytest.approx(8 * block + adapters + 8 * block + 2 * adapters)
    assert f.train_step(cached=True) == pytest.approx(410.4, abs=0.1)
    assert f.prefix() == pytest.approx(16 * block)
    last4 = bench.FlopModel(taps=(20, 21, 22, 23))
    assert last4.train_step(cached=True) == pytest.approx(3 * block + adapters + 3 * block + 2 * adapters)
    two_taps = bench.FlopModel(taps=(21, 23))
    assert two_taps.adapters == pytest.approx(adapters / 2)
    assert gpu_figures.tflops(100.0, 433.8) == pytest.approx(43.38)
    assert gpu_figures.mfu(100.0, 433.8, 989.0) == pytest.approx(43.38 / 989.0)
    assert gpu_figures.protocol_gflops(f, 10, 9) == pytest.approx(10 * (16 * block + 9 * f.train_step(True)))


def test_flop_figures_and_summary(bench):
    figures = {
        "device_name": "NVIDIA H200",
        "torch": "2.14.1",
        "cuda": "13.0",
        "cudnn": 91000,
        "open_clip": "3.3.0",
        "model": "ViT-L-14-336-quickgelu",
        "infer_batch": 64,
        "infer_images_per_s": 1000.0,
        "encode_image_images_per_s": 1100.0,
        "forward_overhead": 1.1,
        "protocol_images": 1725,
        "protocol_epochs": 9,
        "protocol_seconds": 60.0,
        "protocol_images_per_s": 1725 * 9 / 60.0,
        "protocol_outside_epochs_seconds": 4.0,
        "protocol_warnings": ["something happened"],
        "section_errors": {"checks": "RuntimeError: profiler unavailable"},
    }
    bench.add_flop_figures(figures, bench.FlopModel(), 989.0)
    assert figures["tflops_infer"] == pytest.approx(381.9 * 1.136)  # 1000 images/s x 433.8 GFLOPs
    assert figures["mfu_infer"] == pytest.approx(381.9 * 1.136 / 989)
    assert figures["mfu_encode_image"] == pytest.approx(1100 * 381.9 / 1e3 / 989)
    ideal = gpu_figures.protocol_gflops(bench.FlopModel(), 1725, 9) / 989e3
    assert figures["protocol_ideal_seconds"] == pytest.approx(ideal)
    assert figures["mfu_protocol"] == pytest.approx(ideal / 60.0)
    assert "mfu_train_cached" not in figures  # the train section did not run
    text = bench.format_summary(figures)
    assert "[env] NVIDIA H200; torch 2.14.1, CUDA 13.0" in text
    assert "FE-CLIP 1000.0 images/s (434 TFLOP/s, 43.9 % MFU)" in text
    assert "[protocol] 9 epochs x 1725 images: 60.0 s (258.8 images/s; ideal at peak" in text
    assert "4.0 s outside the epochs" in text and "warning: something happened" in text
    assert text.endswith("SECTION checks FAILED: RuntimeError: profiler unavailable")
    assert "[train]" not in text and "[eval]" not in text
    json.dumps(figures)  # the last printed line


def test_attention_classification():
    cuda = [
        "aten::scaled_dot_product_attention",
        "aten::_scaled_dot_product_flash_attention",
        "flash_fwd_kernel",
    ]
    assert kernels.uses_fused_attention(cuda)
    assert kernels.classify_attention(cuda)["fused"] == ["aten::_scaled_dot_product_flash_attention"]
    math_path = ["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_attention_math"]
    assert not kernels.uses_fused_attention(math_path)
    assert not kernels.uses_fused_attention(cuda + math_path)
    assert not kernels.uses_fused_attention(["aten::_native_multi_head_attention"])


def test_without_cuda_it_stops_at_once_with_a_clear_message(bench, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick"])
    assert e.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_blob_masks_and_the_random_set():
    import numpy as np

    rng = np.random.default_rng(0)
    masks = [benchlib.blob_mask(rng, 64) for _ in range(20)]
    assert all(m.dtype == np.uint8 and m.shape == (64, 64) and 0 < m.sum() < 64 * 64 for m in masks)
    ds = benchlib.RandomAnomalySet(30, 32, 3)
    assert ds.categories == ["bottle", "cable", "capsule"]
    for c in ds.categories:  # both classes in every category, masks exactly on the anomalous images
        labels = [ds.labels[i] for i in range(30) if ds.samples[i].category == c]
        assert 0 < sum(labels) < len(labels)
    item = ds[4]
    assert set(item) == {"image", "mask", "label", "index", "original_size"}
    assert item["image"].shape == (3, 32, 32) and item["mask"].dtype == torch.float32
    assert all((ds[i]["mask"].sum() > 0) == bool(ds.labels[i]) for i in range(30))


def test_every_section_runs_on_the_cpu_with_the_tiny_clip(bench, monkeypatch):
    args = bench.parse_args(["--model", "feclip-tiny"])
    tiny = bench.Sizes(
        infer_batch=2,
        train_batch=2,
        iters=1,
        warmup=1,
        n_images=6,
        categories=2,
        epochs=1,
        pipeline_images=4,
        pipeline_side=96,
        pipeline_workers=1,
        determinism_steps=2,
    )
    monkeypatch.setattr(args, "sizes", tiny)
    figures = bench.run_sections(args, torch.device("cpu"))
    # the CPU runs FE-CLIP's training blocks through SDPA's fused CPU kernel
    assert kernels.uses_fused_attention(figures["attention_ops_training"])
    assert "MultiheadAttention" in figures["attention_design"]
    for key in (
        "infer_images_per_s",
        "encode_image_images_per_s",
        "train_images_per_s_cached",
        "train_images_per_s_uncached",
        "protocol_seconds",
        "eval_seconds",
        "train_images_per_s_cached_deterministic",
        "pipeline_model_images_per_s",
        "eval_images_per_s_w0",
        "eval_images_per_s_w1",
        "eval_pipeline_ratio_w1",
        "eval_images_per_s_cached_w0",
        "eval_images_per_s_cached_w1",
        "eval_pipeline_ratio_cached_w0",
        "eval_pipeline_ratio_cached_w1",
        "pipeline_cached_feed_images_per_s",
        "pipeline_cached_predict_images_per_s",
        "pipeline_cached_metrics_seconds",
    ):
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    # the same start and batches give the same weights, bit for bit: the CPU is deterministic either way
    assert figures["determinism_steps"] == 2 and figures["nondeterministic_max_rel_diff"] == 0.0
    assert figures["precision"] == "fp32 (tokens torch.float32)"
    assert "[pipeline] 4 PNGs of 96^2" in bench.format_summary(figures)
    assert "[pipeline] from the warm decoded-image cache" in bench.format_summary(figures)
    assert "[pipeline] cached, 1 workers, each part alone: feed" in bench.format_summary(figures)
    assert not any(k.startswith(("mfu_", "tflops_")) for k in figures)  # ViT-L/14@336's FLOP model only
    assert figures["protocol_images"] == 6 and len(figures["protocol_epoch_images_per_s"]) == 1
    assert figures["eval_metric_rows"] == 3 * 8  # 2 categories + micro, 8 metrics each
    assert "protocol_9ep_seconds" not in figures and "eval_mvtec_seconds" not in figures
    assert "[eval] 6 images, 2 categories" in bench.format_summary(figures)
    assert figures["eval_metric_values_differing"] == 0 and figures["eval_metrics_host_sort_seconds"] > 0
    assert "sorted on the device" in bench.format_summary(figures)
    assert figures["eval_overlap_values_differing"] == 0 and figures["eval_overlap_speedup"] > 0
    assert "metrics overlapped" in bench.format_summary(figures)
    json.dumps(figures)


def test_a_failing_section_is_reported_and_the_others_still_run(bench, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(bench, "measure_infer", broken)
    args = bench.parse_args(["--model", "feclip-tiny", "--only", "infer,train"])
    monkeypatch.setattr(args, "sizes", bench.Sizes(train_batch=2, iters=1, warmup=0))
    figures = bench.run_sections(args, torch.device("cpu"))
    assert figures["section_errors"] == {"infer": "RuntimeError: CUDA out of memory"}
    assert figures["train_images_per_s_cached"] > 0 and "infer_images_per_s" not in figures
    assert "SECTION infer FAILED: RuntimeError: CUDA out of memory" in bench.format_summary(figures)


def test_repeated_deterministic_training_is_bit_for_bit_on_the_cpu(tiny_clip):
    """What tests/test_cuda.py checks on ViT-L on a GPU, through the same code, on the tiny CLIP."""
    a, b = kernels.repeated_training(tiny_clip(), torch.device("cpu"), 2, deterministic=True, batch=4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert kernels.max_rel_diff(a, b) == 0.0
    start = benchlib.feclip_model(tiny_clip()).trainable_state_dict()
    assert kernels.max_rel_diff(start, a) > 0  # two steps moved the weights

"""The host never waits for the device inside a training step, and once per evaluation batch; constant
tensors live on the device; ``train.deterministic`` is strict, scoped to training, and needs no op
without a deterministic CUDA kernel. Counted on the CPU (feclip.engine.hostsync)."""

import math

import pytest
import torch
from conftest import make_tiny_feclip as tiny
from torch.utils._python_dispatch import TorchDispatchMode

from feclip.config import EvalConfig, LossConfig, TrainConfig
from feclip.data import AnomalyDataset, list_samples
from feclip.engine import hostsync
from feclip.engine import train as train_module
from feclip.engine.evaluate import predict
from feclip.engine.hostsync import DEVICE_UNDER_TEST, HostSyncCounter
from feclip.losses import feclip_loss


def test_the_counter_counts_device_reads_and_ignores_host_tensors():
    weight = torch.randn(4)
    with HostSyncCounter().on_device(weight) as counter:
        y = (weight * 2).sum()
        y.item()
        bool(y > 0)
        weight[weight > 0]  # boolean mask: the output size depends on device values
        (weight * 3).tolist()
        host = torch.tensor([1, 2, 3])  # a host tensor: reading it costs nothing on a GPU
        host.tolist(), int(host.sum()), host.numpy()
        torch.ones(3).to(DEVICE_UNDER_TEST)  # a blocking host -> device copy
        on_device = torch.ones(3).to(DEVICE_UNDER_TEST, non_blocking=True)
        (back,) = hostsync.to_host(on_device * 2)  # the one blessed wait
        back.numpy()  # host memory now
    assert counter.counts == {"item": 2, "bool_index": 1, "tolist": 1, "blocking_copy": 1, "to_host": 1}
    assert counter.syncs == 6


def _per_step_counts(monkeypatch, counter):
    """Snapshot the counter before every optimizer step."""
    snapshots = []
    real_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        snapshots.append(counter.syncs)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    return snapshots


@pytest.mark.parametrize(
    "prefix_cache,mask_loss_on", [("on", "all"), ("off", "all"), ("on", "abnormal"), ("off", "abnormal")]
)
def test_a_training_step_never_waits_for_the_device(sets, tmp_path, monkeypatch, prefix_cache, mask_loss_on):
    """Between two steps of an epoch: no wait at all. The epoch's end reads the losses once (the NaN
    guard, the progress and the epoch's mean loss); every CHECK_EVERY steps the same read."""
    ds = AnomalyDataset(list_samples("synthetic", sets["set_a"]), image_size=84)  # 18 images
    model = tiny()
    cfg = TrainConfig(epochs=2, batch_size=4, prefix_cache=prefix_cache, progress=False, resume=False)
    cfg.loss.mask_loss_on = mask_loss_on
    monkeypatch.setattr(train_module, "CHECK_EVERY", 3)
    counter = HostSyncCounter().on_device(model)
    before = _per_step_counts(monkeypatch, counter)
    with counter:
        result = train_module.train(model, ds, cfg, tmp_path, 0, DEVICE_UNDER_TEST)
    assert result.steps == 10 and math.isfinite(result.last_loss)
    assert set(counter.counts) == {"to_host"}, counter.counts  # nothing but the loss reads
    waits = [b - a for a, b in zip([0] + before, before)]  # waits before each step since the last one
    # epoch 1: steps 1-5, a read after step 3 and at the end; epoch 2 (steps 6-10): after its step 3
    assert waits == [0, 0, 0, 1, 0, 1, 0, 0, 1, 0], waits
    assert counter.syncs == 4 and counter.syncs / result.steps <= 1


@pytest.mark.parametrize(
    "resolution,batch_size,fewshot",
    [("input", 4, False), ("original", 4, False), ("input", 4, True), ("input", 5, True)],
)
def test_an_evaluation_batch_waits_for_the_device_once(sets, resolution, batch_size, fewshot):
    from feclip.models.fewshot import MemoryBank

    ds = AnomalyDataset(list_samples("synthetic", sets["set_b"]), image_size=84)  # 18 images, 3 categories
    model = tiny()
    banks = None
    if fewshot:  # batch 5 mixes categories within a batch
        pool = list_samples("synthetic", sets["set_b"], split="train")
        banks = {
            c: MemoryBank.from_samples(model, [s for s in pool if s.category == c][:1]) for c in ds.categories
        }
    counter = HostSyncCounter().on_device(model, *(b.features for b in (banks or {}).values()))
    cfg = EvalConfig(batch_size=batch_size, resolution=resolution)
    with counter:
        preds = predict(model, ds, cfg, DEVICE_UNDER_TEST, banks)
    batches = math.ceil(len(ds) / batch_size)
    assert counter.counts == {"to_host": batches}, counter.counts
    reference = predict(model, ds, cfg, torch.device("cpu"), banks)  # the same numbers, counted or not
    assert (preds.scores == reference.scores).all()


def test_the_old_boolean_indexing_would_have_been_counted():
    """The loss's images are chosen by weights; boolean indexing, what it replaced, is what the
    counter catches (one per tap and mask)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 3, 2, generator=g)
    out = type("Out", (), {"tap_cls_logits": torch.randn(2, 4, 2, generator=g), "tap_patch_logits": logits})
    labels, masks = torch.tensor([0, 1, 1, 0]), torch.zeros(4, 6, 6)
    cfg = LossConfig(mask_loss_on="abnormal")
    with HostSyncCounter().on_device(out.tap_cls_logits, logits, labels, masks) as counter:
        feclip_loss(out, masks, labels, cfg, n_kept=2)
    assert counter.syncs == 0
    with HostSyncCounter().on_device(out.tap_cls_logits, logits, labels, masks) as counter:
        feclip_loss(out, masks, labels, cfg)  # the count of kept images read from the device: one wait
        logits[0][labels > 0]
    assert counter.counts == {"item": 1, "bool_index": 1}


@pytest.mark.parametrize("options", [{}, {"lfs_stat": "log_abs"}, {"transform": "fft", "lfs_stat": "abs"}])
def test_frequency_bases_are_device_buffers_built_once(monkeypatch, options):
    from feclip.models import frequency

    model = tiny(**options)
    calls = []
    for name in ("dct_matrix", "sliding_basis", "window_basis", "sliding_mean_kernel"):
        real = getattr(frequency, name)
        monkeypatch.setattr(
            frequency, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k)
        )
    x = torch.randn(2, 3, 84, 84)
    model(x).tap_maps.mean().backward()
    assert calls == []
    buffers = dict(model.named_buffers())
    assert "adapters.15.ffe.basis" in buffers and "adapters.15.lfs.basis" in buffers
    assert not any(".basis" in k for k in model.trainable_state_dict())  # never in a checkpoint


# ops that raise under torch.use_deterministic_algorithms(True) on CUDA (PyTorch's documented list)
CUDA_NONDETERMINISTIC = {
    "upsample_linear1d_backward",
    "upsample_bilinear2d_backward",
    "_upsample_bilinear2d_aa_backward",
    "upsample_bicubic2d_backward",
    "_upsample_bicubic2d_aa_backward",
    "upsample_trilinear3d_backward",
    "avg_pool3d_backward",
    "adaptive_avg_pool2d_backward",
    "_adaptive_avg_pool2d_backward",
    "adaptive_avg_pool3d_backward",
    "_adaptive_avg_pool3d_backward",
    "adaptive_max_pool2d_backward",
    "fractional_max_pool2d_backward",
    "fractional_max_pool3d_backward",
    "max_unpool2d",
    "max_unpool3d",
    "reflection_pad1d_backward",
    "reflection_pad2d_backward",
    "reflection_pad3d_backward",
    "nll_loss2d_forward",
    "_ctc_loss_backward",
    "put_",
    "histc",
    "bincount",
    "median",
    "nanmedian",
    "grid_sampler_2d_backward",
    "grid_sampler_3d_backward",
}


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "model_options,loss_options",
    [
        ({}, {}),
        ({}, {"mask_loss_input": "logit_margin", "mask_loss_on": "abnormal"}),
        ({"lfs_stat": "abs", "transform": "fft"}, {"mask_target": "maxpool"}),
        ({"adapters": "conv", "p": 4}, {"mask_target": "nearest"}),
        ({"lfs_stat": "log_abs", "fc_patch_init": "clip_proj"}, {"focal_alpha": 0.25}),
    ],
)
def test_the_training_step_has_a_deterministic_cuda_kernel_for_every_op(model_options, loss_options):
    """With train.deterministic the step runs in PyTorch's strict deterministic mode, where an op
    without a deterministic CUDA kernel raises: none of those is in FE-CLIP's step (forward, loss,
    backward, Adam), whichever option."""
    model = tiny(**model_options).train()
    optimizer = train_module.build_optimizer(model, TrainConfig())
    x = torch.randn(4, 3, 84, 84)
    masks = torch.zeros(4, 84, 84)
    masks[1::2, 20:40, 30:60] = 1
    labels = torch.tensor([0, 1, 0, 1])
    with _OpNames() as ops:
        loss, _ = feclip_loss(model(x), masks, labels, LossConfig(**loss_options))
        loss.backward()
        optimizer.step()
    assert "mm" in ops.names or "addmm" in ops.names or "bmm" in ops.names
    assert not ops.names & CUDA_NONDETERMINISTIC, ops.names & CUDA_NONDETERMINISTIC


def test_deterministic_mode_is_strict_during_training_only(sets, tmp_path, monkeypatch):
    ds = AnomalyDataset(list_samples("synthetic", sets["set_a"])[:8], image_size=84)
    seen = []
    real_loss = train_module.feclip_loss

    def loss(*args, **kwargs):
        seen.append(
            (
                torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
            )
        )
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "feclip_loss", loss)
    assert not torch.are_deterministic_algorithms_enabled()
    cfg = TrainConfig(epochs=1, batch_size=4, progress=False, resume=False, deterministic=True)
    train_module.train(tiny(), ds, cfg, tmp_path / "det", 0, torch.device("cpu"))
    assert seen == [(True, False)] * 2  # strict: an op without a deterministic kernel would raise
    assert not torch.are_deterministic_algorithms_enabled()  # evaluation runs without it
    cfg.deterministic = False
    seen.clear()
    train_module.train(tiny(), ds, cfg, tmp_path / "free", 0, torch.device("cpu"))
    assert seen == [(False, False)] * 2
    assert TrainConfig().deterministic is False  # the default: see README "Speed" for the spread


def test_deterministic_mode_restores_what_was_there():
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with train_module.deterministic_algorithms(True, torch.device("cpu")):
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert (
            torch.are_deterministic_algorithms_enabled()
            and torch.is_deterministic_algorithms_warn_only_enabled()
        )
    finally:
        torch.use_deterministic_algorithms(False)

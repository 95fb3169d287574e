"""Training and evaluation end to end on the tiny CLIP and small synthetic sets."""

import csv
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, compose_run, make_tiny_feclip, smoke_overrides
from conftest import train_cli as _cli

from feclip.engine import train as train_module
from feclip.engine.run import run
from feclip.engine.train import TrainingDivergedError, build_optimizer, epoch_order
from feclip.errors import CheckpointMismatchError, DatasetError
from feclip.results import COLUMNS, MICRO, read_metrics


def test_smoke_train_and_eval_writes_a_valid_csv(data_root, tmp_path):
    cfg = compose_run(smoke_overrides(data_root, tmp_path, "train.max_steps=2", "study=smoke", "variant=v"))
    out = run(cfg)
    assert out == tmp_path / "smoke" / "v" / "seed=42"
    for name in ("metrics.csv", "config.yaml", "env.txt", "train.log", "adapters.safetensors"):
        assert (out / name).is_file(), name
    with open(out / "metrics.csv") as f:
        assert tuple(next(csv.reader(f))) == COLUMNS
    rows = read_metrics(out / "metrics.csv")
    cats = {r["category"] for r in rows}
    assert cats == {"cat", "gravel", "rocket", MICRO}
    metrics = {r["metric"] for r in rows}
    assert metrics == {
        "image_auroc",
        "image_ap",
        "image_f1_max",
        "pixel_auroc",
        "pixel_ap",
        "pixel_f1_max",
        "pixel_aupro",
        "pixel_aupro_zsad",
    }
    for r in rows:
        assert (
            r["study"] == "smoke"
            and r["variant"] == "v"
            and r["seed"] == 42
            and r["train_dataset"] == "synthetic"
        )
        assert 0.0 <= r["value"] <= 1.0, r
        assert r["n_images"] == (18 if r["category"] == MICRO else 6)
    assert "steps" in (out / "train.log").read_text()


def test_a_complete_run_is_skipped_unless_forced(data_root, tmp_path):
    cfg = compose_run(smoke_overrides(data_root, tmp_path, "train.max_steps=1"))
    out = run(cfg)
    stamp = (out / "metrics.csv").stat().st_mtime_ns
    run(cfg)
    assert (out / "metrics.csv").stat().st_mtime_ns == stamp
    cfg.force = True
    run(cfg)
    assert (out / "metrics.csv").stat().st_mtime_ns != stamp


def _train_only(cfg, run_dir):
    from feclip.data import AnomalyDataset, list_samples
    from feclip.engine.run import training_fingerprint
    from feclip.engine.run_data import dataset_root

    model = make_tiny_feclip(config=cfg.model, seed=cfg.seed)
    ds = AnomalyDataset(list_samples("synthetic", dataset_root(cfg.data.train, cfg.paths)), image_size=84)
    train_module.train(
        model, ds, cfg.train, run_dir, cfg.seed, torch.device("cpu"), training_fingerprint(cfg)
    )
    return model


def test_resume_after_a_crash_gives_the_same_weights_bit_for_bit(data_root, tmp_path, monkeypatch):
    cfg = compose_run(smoke_overrides(data_root, tmp_path, "train.epochs=3"))
    reference = _train_only(cfg, tmp_path / "straight").trainable_state_dict()

    real_loss = train_module.feclip_loss
    calls = {"n": 0}

    def crashing_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # in the middle of the second epoch (5 steps per epoch)
            raise KeyboardInterrupt("simulated kill")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "feclip_loss", crashing_loss)
    with pytest.raises(KeyboardInterrupt):
        _train_only(cfg, tmp_path / "crashed")
    monkeypatch.setattr(train_module, "feclip_loss", real_loss)
    assert torch.load(tmp_path / "crashed" / "train_state.pt", weights_only=True)["epoch"] == 0
    resumed = _train_only(cfg, tmp_path / "crashed").trainable_state_dict()
    for k, v in reference.items():
        assert torch.equal(v, resumed[k]), k


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(data_root, tmp_path, monkeypatch):
    cfg = compose_run(smoke_overrides(data_root, tmp_path, "train.epochs=3"))
    real_loss = train_module.feclip_loss
    calls = {"n": 0}

    def nan_loss(*args, **kwargs):
        calls["n"] += 1
        total, parts = real_loss(*args, **kwargs)
        return (total * math.nan, parts) if calls["n"] == 8 else (total, parts)

    monkeypatch.setattr(train_module, "feclip_loss", nan_loss)
    with pytest.raises(TrainingDivergedError, match=r"loss is nan at epoch 2, step 8.*epoch 1\) is kept"):
        _train_only(cfg, tmp_path / "nan")
    assert (tmp_path / "nan" / "adapters.safetensors").is_file()


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert epoch_order(20, 42, 3) == epoch_order(20, 42, 3)
    assert epoch_order(20, 42, 3) != epoch_order(20, 42, 4)
    assert sorted(epoch_order(20, 7, 0)) == list(range(20))


@pytest.mark.parametrize(
    "policy,expected",
    [("same", [5e-4, 5e-4]), ("lr_div_10", [5e-4, 5e-5]), ("lr_div_100", [5e-4, 5e-6]), ("frozen", [5e-4])],
)
def test_fc_patch_policy_sets_the_parameter_groups(policy, expected):
    from feclip.models import FEClip, load_clip

    cfg = compose_run(["backbone=tiny", f"train.fc_patch.policy={policy}"])
    model = FEClip(load_clip("feclip-tiny"), cfg.model)
    opt = build_optimizer(model, cfg.train)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(expected)
    assert model.fc_patch.weight.requires_grad == (policy != "frozen")


def test_configs_control_the_constructed_objects(data_root):
    from feclip.models import FEClip, load_clip

    clip = load_clip("feclip-tiny")
    base = compose_run(["backbone=tiny"])
    changed = compose_run(
        [
            "backbone=tiny",
            "model.lfs_stat=log_abs",
            "taps=last4",
            "model.lam=0.3",
            "train.lr=1e-3",
            "train.betas=[0.5,0.999]",
            "eval.sigma=0",
        ]
    )
    m0, m1 = FEClip(clip, base.model), FEClip(clip, changed.model)
    assert m0.adapters["15"].lfs.stat == "mean" and m1.adapters["20"].lfs.stat == "log_abs"
    assert list(m1.adapters) == ["20", "21", "22", "23"] and m1.adapters["20"].lam == 0.3
    opt = build_optimizer(m1, changed.train)
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["betas"] == (0.5, 0.999)
    assert changed.eval.scoring().sigma == 0.0 and base.eval.scoring().sigma == 4.0


def test_eval_of_an_adapter_file_matches_and_mismatch_is_refused(data_root, tmp_path):
    trained = run(compose_run(smoke_overrides(data_root, tmp_path, "train.max_steps=2", "study=a")))
    ckpt = trained / "adapters.safetensors"
    evaluated = run(
        compose_run(smoke_overrides(data_root, tmp_path, "study=b", f"checkpoint='{ckpt}'"), "eval"),
        do_train=False,
    )
    a = {(r["category"], r["metric"]): r["value"] for r in read_metrics(trained / "metrics.csv")}
    b = {(r["category"], r["metric"]): r["value"] for r in read_metrics(evaluated / "metrics.csv")}
    assert a == b
    assert {r["train_dataset"] for r in read_metrics(evaluated / "metrics.csv")} == {"none"}
    with pytest.raises(
        CheckpointMismatchError, match=r"model\.taps=\[15, 18, 21, 23\] \(this run: \[20, 21, 22, 23\]\)"
    ):
        run(
            compose_run(
                smoke_overrides(data_root, tmp_path, "study=c", "taps=last4", f"checkpoint='{ckpt}'"), "eval"
            ),
            do_train=False,
        )
    assert not (tmp_path / "c").exists()  # refused before any folder was made


def test_missing_dataset_names_the_path_and_the_commands(tmp_path):
    cfg = compose_run(
        ["backbone=tiny", f"paths.data_root={tmp_path / 'nowhere'}", f"paths.results_dir={tmp_path}"]
    )
    with pytest.raises(
        DatasetError, match=r"not found at .*nowhere/mvtec.*feclip-data download mvtec.*feclip-data check"
    ):
        run(cfg)
    assert not list(tmp_path.rglob("metrics.csv"))


def test_cli_user_errors_are_one_line_without_traceback(tmp_path):
    res = _cli(["backbone=tiny", f"paths.data_root={tmp_path}/none", f"paths.results_dir={tmp_path}"])
    assert res.returncode == 2
    assert "feclip-train: error: dataset 'mvtec' not found" in res.stderr
    assert "Traceback" not in res.stderr
    res = _cli(["+experiment=nope"])
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "demo" in res.stderr and "clip_baseline" in res.stderr  # the valid experiment names are listed
    res = _cli(["train.epochz=3"])
    assert res.returncode != 0 and "epochz" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_a_killed_run_leaves_no_metrics_and_resumes(data_root, tmp_path):
    args = smoke_overrides(data_root, tmp_path, "train.epochs=40", "study=kill", "variant=v")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from feclip.apps.train import train_main; train_main()", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = tmp_path / "kill" / "v" / "seed=42" / "train_state.pt"
    deadline = time.time() + 90
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state.exists(), "the run never reached its first checkpoint"
    out = state.parent
    assert not (out / "metrics.csv").exists()
    res = _cli(args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "metrics.csv").is_file()
    assert "resumed from" in (out / "train.log").read_text()


def test_wandb_logger_works_offline_without_an_account(data_root, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose_run(smoke_overrides(data_root, tmp_path, "train.max_steps=2", "logger=wandb", "variant=w"))
    assert cfg.logger.mode == "offline"
    out = run(cfg)
    assert (out / "metrics.csv").is_file()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_original_resolution_and_postprocessing_options(data_root, tmp_path):
    base = run(
        compose_run(smoke_overrides(data_root, tmp_path, "train.epochs=0", "variant=input"), "eval"),
        do_train=False,
    )
    orig = run(
        compose_run(
            smoke_overrides(
                data_root, tmp_path, "train.epochs=0", "variant=orig", "eval.resolution=original"
            ),
            "eval",
        ),
        do_train=False,
    )
    post = run(
        compose_run(
            smoke_overrides(
                data_root,
                tmp_path,
                "train.epochs=0",
                "variant=post",
                "eval.postprocess.morph_open=2",
                "eval.postprocess.min_component_px=30",
                "eval.postprocess.percentile_keep=50",
            ),
            "eval",
        ),
        do_train=False,
    )
    values = [
        {(r["category"], r["metric"]): r["value"] for r in read_metrics(d / "metrics.csv")}
        for d in (base, orig, post)
    ]
    key = ("cat", "pixel_auroc")
    assert values[0][key] != values[1][key] and values[0][key] != values[2][key]
    image_keys = [k for k in values[0] if k[1].startswith("image_")]
    assert all(values[0][k] == values[1][k] == values[2][k] for k in image_keys)  # maps only


def test_postprocess_by_hand():
    import numpy as np

    from feclip.config import PostprocessConfig
    from feclip.engine.evaluate import postprocess

    amap = np.zeros((10, 10), np.float32)
    amap[1, 1] = 5.0  # a one-pixel spike
    amap[4:9, 4:9] = 3.0  # a 25-pixel blob
    opened = postprocess(amap, PostprocessConfig(morph_open=1))
    assert opened[1, 1] == 0.0 and opened[6, 6] == 3.0
    small = postprocess(
        amap, PostprocessConfig(min_component_px=2, component_quantile=0.8)
    )  # region: values >= 3
    assert small[1, 1] == 0.0 and small[6, 6] == 3.0
    kept = postprocess(amap, PostprocessConfig(percentile_keep=99))
    assert kept[1, 1] == 5.0 and kept[6, 6] == 0.0


def test_unknown_dataset_name_lists_the_valid_ones(tmp_path):
    cfg = compose_run(
        [
            "backbone=tiny",
            "data.train.name=mvtech",
            f"paths.data_root={tmp_path}",
            f"paths.results_dir={tmp_path}",
            "data.train.dir=x",
        ]
    )
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match=r"mvtech.*mvtec.*visa"):
        run(cfg)


def test_prefix_cache_gives_the_same_weights_on_cpu(data_root, tmp_path):
    with_cache = compose_run(smoke_overrides(data_root, tmp_path, "train.epochs=2", "train.prefix_cache=on"))
    without = compose_run(smoke_overrides(data_root, tmp_path, "train.epochs=2", "train.prefix_cache=off"))
    a = _train_only(with_cache, tmp_path / "cache").trainable_state_dict()
    b = _train_only(without, tmp_path / "nocache").trainable_state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_prefix_cache_batch_holds_the_prefix_masks_and_labels(data_root):
    """A cached batch is what the dataset and the model's prefix give for those indices; empty works."""
    from feclip.data import AnomalyDataset, list_samples
    from feclip.engine.cache import PrefixCache, prefix_bytes
    from feclip.models import FEClip, FEClipConfig, load_clip

    torch.manual_seed(0)
    model = FEClip(load_clip("feclip-tiny"), FEClipConfig())
    samples = list_samples("synthetic", data_root / "synthetic" / "set_a")[:6]
    ds = AnomalyDataset(samples, image_size=model.image_size)
    cache = PrefixCache(model, ds, torch.device("cpu"), batch_size=4)
    assert cache.tokens.nbytes + cache.masks.nbytes == prefix_bytes(model, len(ds), torch.float32)
    picked = [5, 0, 3]
    got = cache.batch(picked)
    items = [ds[i] for i in picked]
    with torch.inference_mode():
        tokens = model.prefix(torch.stack([it["image"] for it in items]))
    assert torch.equal(got["tokens"], tokens)
    assert torch.equal(got["mask"], torch.stack([it["mask"] for it in items]))
    assert got["label"].tolist() == [it["label"] for it in items] and got["index"].tolist() == picked
    assert any(it["mask"].sum() > 0 for it in items) and any(it["label"] == 0 for it in items)
    empty = cache.batch([])
    assert empty["tokens"].shape[0] == empty["mask"].shape[0] == len(empty["label"]) == 0


def test_prefix_cache_over_budget_is_refused_or_skipped(data_root, tmp_path, caplog):
    refuse = compose_run(
        smoke_overrides(data_root, tmp_path, "train.prefix_cache=on", "train.prefix_cache_max_gb=1e-9")
    )
    with pytest.raises(ValueError, match=r"prefix cache needs .* over train.prefix_cache_max_gb"):
        _train_only(refuse, tmp_path / "a")
    auto = compose_run(
        smoke_overrides(data_root, tmp_path, "train.prefix_cache=auto", "train.prefix_cache_max_gb=1e-9")
    )
    with caplog.at_level("INFO", logger="feclip"):
        _train_only(auto, tmp_path / "b")
    assert "training without it" in caplog.text


def test_fewshot_changes_scores_records_references_and_is_deterministic(data_root, tmp_path):
    def values(variant, *extra):
        cfg = compose_run(
            smoke_overrides(data_root, tmp_path, "train.epochs=0", f"variant={variant}", *extra), "eval"
        )
        out = run(cfg, do_train=False)
        return out, {(r["category"], r["metric"]): r["value"] for r in read_metrics(out / "metrics.csv")}

    _, zero = values("zs")
    out1, few1 = values("k1a", "eval.fewshot_k=1")
    _, few1b = values("k1b", "eval.fewshot_k=1")
    out2, few2 = values("k1c", "eval.fewshot_k=1", "seed=7")
    assert few1 == few1b
    assert few1 != zero
    refs = (out1 / "fewshot_references.csv").read_text().splitlines()
    assert refs[0] == "dataset,category,k,seed,source,image_path" and len(refs) == 1 + 3  # one per category
    assert all(",train," in line and "/train/good/" in line for line in refs[1:])
    other = (out2 / "fewshot_references.csv").read_text().splitlines()[1:]
    assert [line.split(",")[-1] for line in other] != [line.split(",")[-1] for line in refs[1:]]


def test_save_figures_writes_non_blank_pngs(data_root, tmp_path):
    import numpy as np
    from PIL import Image

    cfg = compose_run(
        smoke_overrides(data_root, tmp_path, "train.epochs=0", "eval.save_figures=true"), "eval"
    )
    out = run(cfg, do_train=False)
    pngs = sorted((out / "figures").glob("*.png"))
    assert [p.name for p in pngs] == [
        f"synthetic_{c}_{k}.png" for c in ("cat", "gravel", "rocket") for k in ("curves", "montage")
    ]
    for p in pngs:
        assert np.asarray(Image.open(p)).std() > 0


def test_a_missing_target_fails_before_training(data_root, tmp_path, monkeypatch):
    cfg = compose_run(smoke_overrides(data_root, tmp_path, "data.targets=[{name: mvtec}]"))
    monkeypatch.setattr(
        train_module, "train", lambda *a, **k: pytest.fail("trained before checking the targets")
    )
    with pytest.raises(DatasetError, match="dataset 'mvtec' not found"):
        run(cfg)


@pytest.mark.slow
def test_torch_compile_trains_like_eager(data_root, tmp_path):
    eager = compose_run(smoke_overrides(data_root, tmp_path, "train.epochs=1", "train.max_steps=2"))
    compiled = compose_run(
        smoke_overrides(data_root, tmp_path, "train.epochs=1", "train.max_steps=2", "train.compile=default")
    )
    a = _train_only(eager, tmp_path / "eager").trainable_state_dict()
    b = _train_only(compiled, tmp_path / "compiled").trainable_state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


@pytest.mark.parametrize("include_normal,per_image_norm", [(False, False), (True, True), (False, True)])
def test_aupro_variants_of_study_2(include_normal, per_image_norm):
    """eval.aupro.include_normal=false drops the normal images; per_image_norm rescales each map to
    [0, 1]; both change the AUPRO rows exactly as doing it by hand does, and nothing else."""
    import numpy as np

    from feclip.config import EvalConfig
    from feclip.engine.evaluate import Predictions, metric_rows
    from feclip.metrics import aupro

    rng = np.random.default_rng(0)
    n, s = 8, 24
    labels = np.array([0, 1] * (n // 2))
    masks = np.zeros((n, s, s), np.uint8)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(0, s - 6, 2)
        masks[i, y : y + 6, x : x + 6] = 1
    # maps whose scale differs per image, so that per-image normalisation changes the ranking
    maps = (rng.random((n, s, s)) + 2 * masks) * rng.uniform(0.2, 5.0, (n, 1, 1))
    maps = maps.astype(np.float32)
    preds = Predictions(maps.reshape(n, -1).max(1), list(maps), list(masks), labels, ["c"] * n)
    cfg = EvalConfig()
    cfg.aupro.include_normal, cfg.aupro.per_image_norm = include_normal, per_image_norm
    got = {r.metric: r.value for r in metric_rows("d", preds, {"c": True}, cfg)}
    plain = {r.metric: r.value for r in metric_rows("d", preds, {"c": True}, EvalConfig())}

    keep = labels > 0 if not include_normal else np.ones(n, bool)
    m, a = masks[keep], maps[keep]
    if per_image_norm:
        lo, hi = a.min(axis=(1, 2), keepdims=True), a.max(axis=(1, 2), keepdims=True)
        a = (a - lo) / (hi - lo)
    assert got["pixel_aupro"] == pytest.approx(aupro(m, a, 0.3, "exact"), abs=1e-12)
    assert got["pixel_aupro_zsad"] == pytest.approx(aupro(m, a, 0.3, "zsad"), abs=1e-12)
    assert got["pixel_aupro"] != pytest.approx(plain["pixel_aupro"], abs=1e-6)
    assert {k: v for k, v in got.items() if "aupro" not in k} == {
        k: v for k, v in plain.items() if "aupro" not in k
    }

"""Train once, evaluate many: the adapter store and the outputs store give the numbers of a fresh run,
bit for bit, without training or running the model again; their keys, locks, writes and the
``feclip-cache`` app."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import REPO, compose_run, smoke_overrides, torchrun_train
from safetensors.torch import load_file

from feclip.apps.cache import main as cache_main
from feclip.engine import identity
from feclip.engine import train as train_module
from feclip.engine.run import run
from feclip.engine.store import ADAPTERS, DECODED, OUTPUTS, AdapterStore, list_entries, store_key
from feclip.models import FEClip
from feclip.models.provenance import WeightsSource
from feclip.results import read_metrics


def _cfg(data_root, results, cache, *extra):
    return compose_run(smoke_overrides(data_root, results, f"paths.cache_dir={cache}", *extra))


def _values(out) -> dict:
    """metrics.csv's values by (dataset, category, metric), as text (NaN equals NaN)."""
    return {
        (r["dataset"], r["category"], r["metric"]): repr(r["value"])
        for r in read_metrics(out / "metrics.csv")
    }


def _entries(cache, kind) -> list:
    return list_entries(cache, (kind,))


@pytest.fixture()
def count_training(monkeypatch):
    """Counts the calls of feclip.engine.train.train (still training)."""
    real = train_module.train
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[3])  # the run folder
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train", counted)
    return calls


def _no_training(monkeypatch):
    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("trained again"))


def _no_forward(monkeypatch):
    def fail(*args, **kwargs):
        pytest.fail("the model ran")

    monkeypatch.setattr(FEClip, "forward", fail)
    monkeypatch.setattr(FEClip, "forward_from_prefix", fail)


# -- the numbers of a fresh run -------------------------------------------------------------------


def test_an_eval_variant_reuses_the_adapters_and_equals_a_fresh_run(data_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = run(_cfg(data_root, tmp_path / "r", cache, "study=s", "variant=a"))
    assert len(_entries(cache, ADAPTERS)) == 1 and len(_entries(cache, OUTPUTS)) == 1
    eval_options = ("eval.map_kind=logit_margin", "eval.sigma=2")
    with monkeypatch.context() as m:
        _no_training(m)
        reused = run(_cfg(data_root, tmp_path / "r", cache, "study=s", "variant=b", *eval_options))
    fresh = run(
        _cfg(
            data_root,
            tmp_path / "fresh",
            tmp_path / "other_cache",
            "study=s",
            "variant=b",
            "train.reuse=false",
            "eval.reuse_outputs=false",
            *eval_options,
        )
    )
    assert _values(reused) == _values(fresh) and _values(reused) != _values(first)
    # the run folder is self-contained: the adapter file is the trained one, byte for byte (a fresh
    # training writes the same tensors; safetensors orders the metadata of each file its own way)
    assert (reused / "adapters.safetensors").read_bytes() == (first / "adapters.safetensors").read_bytes()
    a, b = load_file(reused / "adapters.safetensors"), load_file(fresh / "adapters.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (reused / "train_state.pt").exists()
    log = (reused / "train.log").read_text()
    assert "loaded from the adapter store" in log and "steps" in log and "no forward pass" in log
    key = _entries(cache, ADAPTERS)[0].key
    assert json.loads((reused / "identity.json").read_text())["adapters_store"] == key
    assert f"adapters_store: {key}" in (reused / "config.yaml").read_text()
    # the reuse switches change no identity: the same run folder content otherwise
    assert (
        json.loads((reused / "identity.json").read_text())["hash"]
        == json.loads((fresh / "identity.json").read_text())["hash"]
    )


@pytest.mark.parametrize(
    "eval_options",
    [
        ("eval.map_kind=cos_gap", "eval.map_taps=[21,23]"),
        ("tap_agg=weighted", "eval.score_taps=[23]"),
        ("postprocess=combined",),
        ("eval.resolution=original", "eval.sigma=0"),
        ("eval.aupro.include_normal=false", "eval.aupro.per_image_norm=true", "eval.aupro.fpr_limit=0.1"),
    ],
)
def test_an_eval_only_variant_runs_no_forward_and_gives_the_same_numbers(
    data_root, tmp_path, monkeypatch, eval_options
):
    cache = tmp_path / "cache"
    run(_cfg(data_root, tmp_path / "r", cache, "variant=a"))
    with monkeypatch.context() as m:
        _no_training(m)
        _no_forward(m)
        stored = run(_cfg(data_root, tmp_path / "r", cache, "variant=b", *eval_options))
    fresh = run(
        _cfg(
            data_root,
            tmp_path / "fresh",
            tmp_path / "other_cache",
            "variant=b",
            "train.reuse=false",
            "eval.reuse_outputs=false",
            *eval_options,
        )
    )
    assert _values(stored) == _values(fresh)
    assert len(_entries(cache, OUTPUTS)) == 1  # one forward pass for every variant


def test_feclip_eval_of_an_adapter_file_reads_the_outputs_of_its_training_run(
    data_root, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    trained = run(_cfg(data_root, tmp_path / "r", cache, "variant=a"))
    _no_forward(monkeypatch)
    args = smoke_overrides(
        data_root,
        tmp_path / "r",
        f"paths.cache_dir={cache}",
        f"checkpoint='{trained / 'adapters.safetensors'}'",
    )
    evaluated = run(compose_run(args, "eval"), do_train=False)
    assert _values(evaluated) == _values(trained)


def test_fewshot_runs_the_model_and_stores_no_outputs(data_root, tmp_path):
    cache = tmp_path / "cache"
    run(_cfg(data_root, tmp_path / "r", cache, "variant=a", "eval.reuse_outputs=false"))
    assert _entries(cache, OUTPUTS) == []
    run(_cfg(data_root, tmp_path / "r", cache, "variant=k", "eval.fewshot_k=1"))
    assert _entries(cache, OUTPUTS) == [] and len(_entries(cache, ADAPTERS)) == 1


# -- the keys ---------------------------------------------------------------------------------------


def _key(cfg, weights=None, data="d1", precision="fp32"):
    weights = weights or WeightsSource("feclip-tiny", "random", seed=cfg.seed)
    return store_key(identity.training_identity(cfg, weights, data, precision))


def test_the_training_key_covers_what_changes_the_weights_and_nothing_else():
    base_cfg = compose_run(["backbone=tiny"])
    base = _key(base_cfg)
    for override in (
        "seed=7",
        "train.lr=1e-3",
        "train.epochs=3",
        "train.max_steps=5",
        "train.fc_patch.policy=same",
        "train.loss.mask_target=nearest",
        "model.taps=[20,21,22,23]",
        "data.train.dir=synthetic/set_b",
        "data.resize=center_crop",
        "data.mask_resize=nearest",
        "backbone.image_size=112",
    ):
        assert _key(compose_run(["backbone=tiny", override])) != base, override
    assert _key(base_cfg, weights=WeightsSource("feclip-tiny", "random", seed=1)) != base  # another backbone
    assert _key(base_cfg, weights=WeightsSource("ViT-B-16", "openai", sha256="ab" * 32)) != base
    assert _key(base_cfg, data="d2") != base  # the training images changed
    assert _key(base_cfg, precision="bf16") != base  # train.amp=bf16 on CUDA
    for override in (
        "eval.sigma=2",
        "eval.map_kind=logit_margin",
        "postprocess=combined",
        "eval.aupro.fpr_limit=0.1",
        "eval.fewshot_k=2",
        "eval.resolution=original",
        "study=x",
        "variant=y",
        "force=true",
        "device=cpu",
        "paths.results_dir=/elsewhere",
        "train.progress=false",
        "train.resume=false",
        "train.reuse=false",
        "eval.reuse_outputs=false",
        "data.num_workers=2",
        "protocol=mvtec_to_visa",  # the targets: not the training (the training set is MVTec's either way)
    ):
        cfg = compose_run(["backbone=tiny", override])
        if override.startswith("protocol"):
            assert _key(cfg) == _key(compose_run(["backbone=tiny", "protocol=mvtec_to_all"])), override
        else:
            assert _key(cfg) == base, override
    # the resume fingerprint kept its value (a killed run of an earlier version still resumes)
    from feclip.results import config_hash

    train = identity.plain(base_cfg.train)
    for k in ("resume", "progress", "max_steps", "reuse"):
        train.pop(k)
    old = {
        "seed": base_cfg.seed,
        "backbone": identity.plain(base_cfg.backbone),
        "weights": None,
        "model": identity.plain(base_cfg.model),
        "data": identity.plain(base_cfg.data.train),
        "train": train,
    }
    assert identity.training_fingerprint(base_cfg) == config_hash(old)
    assert {"train.reuse", "eval.reuse_outputs"} <= set(identity.NOT_IDENTITY)


def test_runs_that_change_the_training_train_again(data_root, tmp_path, count_training):
    cache = tmp_path / "cache"
    run(_cfg(data_root, tmp_path / "r", cache, "variant=a"))
    run(_cfg(data_root, tmp_path / "r", cache, "variant=a2", "eval.sigma=1"))
    assert len(count_training) == 1
    for i, override in enumerate(("seed=7", "train.lr=1e-3", "data.train.dir=synthetic/set_b")):
        run(_cfg(data_root, tmp_path / "r", cache, f"variant=v{i}", override))
        assert len(count_training) == 2 + i, override
    assert len(_entries(cache, ADAPTERS)) == 4


def test_force_bypasses_both_stores_and_replaces_the_entries(
    data_root, tmp_path, count_training, monkeypatch
):
    cache = tmp_path / "cache"
    run(_cfg(data_root, tmp_path / "r", cache, "variant=a"))
    (entry,) = _entries(cache, ADAPTERS)
    (outputs,) = _entries(cache, OUTPUTS)
    time.sleep(1.1)  # the creation time is recorded to the second
    forwards = []
    real = FEClip.forward
    monkeypatch.setattr(FEClip, "forward", lambda self, *a, **k: forwards.append(1) or real(self, *a, **k))
    run(_cfg(data_root, tmp_path / "r", cache, "variant=b", "eval.sigma=2", "force=true"))
    assert len(count_training) == 2 and forwards
    (again,) = _entries(cache, ADAPTERS)
    (outputs_again,) = _entries(cache, OUTPUTS)
    assert again.key == entry.key and again.created > entry.created
    assert outputs_again.key == outputs.key and outputs_again.created > outputs.created


# -- safety -----------------------------------------------------------------------------------------


def test_an_interrupted_store_write_leaves_no_entry(data_root, tmp_path, monkeypatch, count_training):
    import feclip.engine.store as store_module

    cache = tmp_path / "cache"

    def killed(path):
        raise KeyboardInterrupt("killed while storing")

    with monkeypatch.context() as m:
        m.setattr(store_module, "fsync_file", killed)
        with pytest.raises(KeyboardInterrupt):
            run(_cfg(data_root, tmp_path / "r", cache, "variant=a"))
    root = cache / ADAPTERS
    assert [p.name for p in root.iterdir() if not p.name.startswith(".lock-")] == []  # no entry, no half
    # a folder of a write killed by SIGKILL is never read: the next run trains and stores
    (root / ".tmp-abc-1-2").mkdir()
    (root / ".tmp-abc-1-2" / "adapters.safetensors").write_bytes(b"half")
    run(_cfg(data_root, tmp_path / "r", cache, "variant=a"))
    assert len(count_training) == 2 and len(_entries(cache, ADAPTERS)) == 1


def test_a_corrupt_or_foreign_entry_is_ignored_with_a_warning_and_rebuilt(
    data_root, tmp_path, count_training, caplog
):
    cache = tmp_path / "cache"
    run(_cfg(data_root, tmp_path / "r", cache, "variant=a"))
    (entry,) = _entries(cache, ADAPTERS)
    file = entry.path / "adapters.safetensors"
    file.write_bytes(file.read_bytes()[:-100])  # truncated
    run(_cfg(data_root, tmp_path / "r", cache, "variant=b", "eval.sigma=2"))
    assert len(count_training) == 2 and "does not match the SHA-256" in caplog.text
    # meta.json of another identity under this key: never used
    meta = json.loads((entry.path / "meta.json").read_text())
    meta["identity"]["seed"] = 999
    (entry.path / "meta.json").write_text(json.dumps(meta))
    run(_cfg(data_root, tmp_path / "r", cache, "variant=c", "eval.sigma=3"))
    assert len(count_training) == 3 and "another identity" in caplog.text
    (outputs,) = _entries(cache, OUTPUTS)
    (outputs.path / "patch.npy").write_bytes(b"not an array")
    caplog.clear()
    run(_cfg(data_root, tmp_path / "r", cache, "variant=d", "eval.sigma=1"))
    assert "outputs store: ignoring entry" in caplog.text
    assert AdapterStore(cache).find(entry.key, meta["identity"]) is None  # (this identity is not stored)


def test_concurrent_runs_of_one_training_identity_train_once(data_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cfgs = [_cfg(data_root, tmp_path / "r", cache, f"variant=t{i}", f"eval.sigma={i + 1}") for i in range(2)]
    real = train_module.train
    calls = []

    def slow(*args, **kwargs):
        calls.append(args[3])
        time.sleep(1.0)  # the other thread arrives while this one holds the key's lock
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train", slow)
    outs, errors = [None, None], []

    def job(i):
        try:
            outs[i] = run(cfgs[i])
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(calls) == 1
    assert all(
        (o / "adapters.safetensors").read_bytes() == (outs[0] / "adapters.safetensors").read_bytes()
        for o in outs
    )
    assert len(_entries(cache, ADAPTERS)) == 1 and len(_entries(cache, OUTPUTS)) == 1


# -- feclip-cache -----------------------------------------------------------------------------------


def test_feclip_cache_lists_and_clears(data_root, tmp_path, capsys):
    cache = tmp_path / "cache"
    run(_cfg(data_root, tmp_path / "r", cache, "variant=a"))
    assert cache_main(["list", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out.splitlines()
    kinds = [line.split()[0] for line in out[:-1]]
    assert kinds == [ADAPTERS, OUTPUTS, DECODED, DECODED], out
    assert "seed 42" in out[0] and "synthetic" in out[1] and "84 px" in out[2] and "4 entries" in out[-1]
    assert cache_main(["clear", "--cache-dir", str(cache), "--older-than", "1"]) == 0
    assert "removed 0 entries" in capsys.readouterr().out and len(list_entries(cache)) == 4
    assert cache_main(["clear", "--cache-dir", str(cache), "--outputs"]) == 0
    assert [e.kind for e in list_entries(cache)] == [ADAPTERS, DECODED, DECODED]
    assert cache_main(["clear", "--cache-dir", str(cache)]) == 0
    assert "removed 3 entries" in capsys.readouterr().out.splitlines()[-1]
    assert list_entries(cache) == [] and (data_root / "synthetic").is_dir()
    assert cache_main(["list", "--cache-dir", str(cache)]) == 0
    assert "no cache entries" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["clear", "--older-than", "-1"], "--older-than takes a number of days >= 0"),
        (["list", "--cache-dir", "pyproject.toml"], "is not a folder"),
        (["purge"], "invalid choice"),
        (["clear", "--older-than", "soon"], "invalid float value"),
    ],
)
def test_feclip_cache_errors_are_one_line_exit_2(args, message):
    res = subprocess.run(
        [sys.executable, "-m", "feclip.apps.cache", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=60,
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("feclip-cache: error:") and message in res.stderr


def test_the_stores_keep_outputs_in_float32_as_the_model_computes_them(data_root, tmp_path):
    import numpy as np

    cache = tmp_path / "cache"
    run(_cfg(data_root, tmp_path / "r", cache, "variant=a"))
    (entry,) = _entries(cache, OUTPUTS)
    cls, patch = np.load(entry.path / "cls.npy"), np.load(entry.path / "patch.npy")
    assert cls.dtype == patch.dtype == np.float32
    assert cls.shape == (18, 4, 2) and patch.shape[:2] == (18, 4) and patch.shape[-1] == 2
    assert torch.from_numpy(patch).isfinite().all()


def test_under_torchrun_every_rank_follows_rank_0_to_the_stored_adapters(data_root, tmp_path):
    cache = tmp_path / "cache"
    single = run(_cfg(data_root, tmp_path / "one", cache, "study=ddp", "variant=v"))
    args = smoke_overrides(data_root, tmp_path / "ddp", f"paths.cache_dir={cache}", "study=ddp", "variant=v")
    res = torchrun_train(args)
    assert res.returncode == 0, res.stderr[-3000:]
    ddp = tmp_path / "ddp" / "ddp" / "v" / "seed=42"
    log = (ddp / "train.log").read_text()
    assert "loaded from the adapter store" in log and "epoch 1/2: loss" not in log
    assert _values(ddp) == _values(single)

"""FE-CLIP's peers (``method=winclip|aprilgan|anomalyclip``) through the engine, on the tiny CLIP and the
smoke sets: runs end to end, the engine's numbers are the peer module's own, a peer's adapter file is
evaluated (and refused for another method), a killed peer training resumes, user mistakes are one line
(exit 2), and the identities hold a peer's options (and FE-CLIP's do not change)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from conftest import REPO, TINY, compose_run, smoke_overrides
from safetensors.torch import load_file

from feclip.engine import distributed
from feclip.engine.evaluate import SCORE_COLUMNS, predict
from feclip.engine.identity import (
    STORE_FORMAT,
    TRAIN_NOT_WEIGHTS,
    _training_config,
    make_identity,
    plain,
    training_identity,
)
from feclip.engine.run import run
from feclip.engine.store import store_key
from feclip.errors import CheckpointMismatchError, ConfigError
from feclip.methods.anomalyclip import AnomalyClip
from feclip.methods.aprilgan import AprilGan
from feclip.methods.model import PeerModel
from feclip.methods.winclip import WinClip
from feclip.models.checkpoint import read_metadata
from feclip.results import MICRO, read_metrics

TRAINED = ("aprilgan", "anomalyclip")
PEERS = ("winclip", *TRAINED)
CLASSES = {"winclip": WinClip, "aprilgan": AprilGan, "anomalyclip": AnomalyClip}
SMOOTHED_SIGMA = (
    2.0  # WinCLIP's and APRIL-GAN's own setting is no smoothing: the runs here smooth, to see it done
)
REFERENCE_SIGMA = {"winclip": SMOOTHED_SIGMA, "aprilgan": SMOOTHED_SIGMA, "anomalyclip": 4.0}


def _sigma(name: str) -> tuple[str, ...]:
    """The override that makes a run of ``name`` smooth its maps (REFERENCE_SIGMA)."""
    return (f"eval.sigma={SMOOTHED_SIGMA}",) if name in ("winclip", "aprilgan") else ()


CATEGORIES = {"cat", "gravel", "rocket", MICRO}  # synthetic set B, the demo protocol's target


def _peer_overrides(data_root, results, name: str, *extra) -> list[str]:
    """A short run of peer ``name`` (2 steps for a trained one, no adapter store), study = its name."""
    steps = () if name == "winclip" else ("train.max_steps=2", "train.reuse=false")
    sigma = _sigma(name)
    return smoke_overrides(data_root, results, f"method={name}", f"study={name}", *steps, *sigma, *extra)


@pytest.fixture(scope="module")
def peer_runs(data_root, tmp_path_factory):
    """Factory: ``(run folder, RunConfig)`` of ``feclip-train method=<name>`` (``feclip-eval`` for the
    training-free WinCLIP), run once for the module."""
    results = tmp_path_factory.mktemp("peer-runs")
    done: dict[str, tuple] = {}

    def get(name: str):
        if name not in done:
            trained = name in TRAINED
            cfg = compose_run(_peer_overrides(data_root, results, name), "train" if trained else "eval")
            out = run(cfg, do_train=trained)
            done[name] = (out, compose_run(_peer_overrides(data_root, results, name)))
        return done[name]

    return get


def _metrics(folder) -> dict:
    return {(r["category"], r["metric"]): r["value"] for r in read_metrics(folder / "metrics.csv")}


def _scores(folder) -> list[dict]:
    with open(folder / "scores" / "synthetic.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and tuple(rows[0]) == SCORE_COLUMNS
    return rows


# -- 1. end to end ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PEERS)
def test_a_peer_runs_end_to_end(peer_runs, name):
    out, cfg = peer_runs(name)
    rows = read_metrics(out / "metrics.csv")
    assert {r["category"] for r in rows} == CATEGORIES
    assert {r["train_dataset"] for r in rows} == {"synthetic" if name in TRAINED else "none"}
    for r in rows:
        assert math.isfinite(r["value"]) and 0.0 <= r["value"] <= 1.0, r
    identity = json.loads((out / "identity.json").read_text())
    # the method and its options alone (not the other peers')
    assert identity["config"]["method"] == {"name": name, "options": plain(getattr(cfg.method, name))}
    scores = _scores(out)
    assert len(scores) == 18 and {r["category"] for r in scores} == CATEGORIES - {MICRO}
    assert all(math.isfinite(float(r["image_score"])) for r in scores)
    if name in TRAINED:
        meta = read_metadata(out / "adapters.safetensors")
        assert meta["method"] == name and meta["format"] == "feclip-peer-v1"
        assert all(k.startswith("method.") for k in load_file(out / "adapters.safetensors"))
        assert "2 steps" in (out / "train.log").read_text()
    else:
        assert not (out / "adapters.safetensors").exists()
        # feclip-eval method=winclip as it comes: anomalib's maps, unsmoothed
        assert compose_run(["backbone=tiny", "method=winclip"], "eval").eval.sigma == 0.0


# -- 2. the engine's numbers are the method's own --------------------------------------------------------


def _own_peer(name: str, cfg, folder):
    """The peer module itself, over the run's CLIP (the tiny one drawn with the run's seed), with the
    run's trained weights."""
    from feclip.models import load_clip

    clip = load_clip(TINY, seed=cfg.seed)
    method = CLASSES[name](clip, getattr(cfg.method, name), precision="fp32")
    if name in TRAINED:
        state = load_file(folder / "adapters.safetensors")
        method.load_trainable_state_dict({k.removeprefix("method."): v for k, v in state.items()})
    return method.eval()


def _smoothed(maps: torch.Tensor, size: tuple[int, int], sigma: float) -> list[np.ndarray]:
    """The toolkit's map of a method's maps, computed here: bilinear to ``size`` (align_corners=False),
    then scipy's Gaussian (reflect, truncate 4)."""
    up = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return [ndi.gaussian_filter(m.double().numpy(), sigma, mode="reflect", truncate=4.0) for m in up]


@pytest.mark.parametrize("name", PEERS)
def test_the_engines_scores_and_maps_are_the_methods_own(peer_runs, sets, name):
    from feclip.data import AnomalyDataset, list_samples

    out, cfg = peer_runs(name)
    sigma = cfg.eval.sigma
    assert sigma == REFERENCE_SIGMA[name]
    method = _own_peer(name, cfg, out)
    dataset = AnomalyDataset(list_samples("synthetic", sets["set_b"]), image_size=84)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([it["image"] for it in items])
    with torch.no_grad():  # one batch of all 18 images (the engine's were 8, 8, 2)
        if name == "aprilgan":
            own = method(images, class_names=[it["category"] for it in items])
        else:
            own = method(images)
    expected = _smoothed(own.maps, (84, 84), sigma)
    assert not np.allclose(expected[0], _smoothed(own.maps[:1], (84, 84), 0.0)[0])  # smoothing matters

    rows = {r["path"]: r for r in _scores(out)}
    assert len(rows) == len(dataset)
    for i, sample in enumerate(dataset.samples):
        row = rows[str(sample.image_path)]
        assert int(row["label"]) == sample.label
        assert float(row["image_score"]) == pytest.approx(float(own.image_scores[i]), abs=1e-6), row
        assert float(row["map_max"]) == pytest.approx(expected[i].max(), abs=1e-6), row

    # the whole maps, the engine's predict on the same module (maps at each image's original size too)
    model = PeerModel(name, method, TINY)
    for resolution in ("input", "original"):
        eval_cfg = dataclasses.replace(cfg.eval, resolution=resolution)
        preds = predict(model, dataset, eval_cfg, torch.device("cpu"))
        np.testing.assert_allclose(preds.scores, own.image_scores.numpy(), rtol=0, atol=1e-6)
        for i, engine_map in enumerate(preds.maps):
            size = (84, 84) if resolution == "input" else tuple(dataset.original_mask(i).shape[:2])
            want = expected[i] if resolution == "input" else _smoothed(own.maps[i : i + 1], size, sigma)[0]
            assert engine_map.shape == want.shape
            np.testing.assert_allclose(engine_map, want, rtol=0, atol=2e-6)


# -- 3. a peer's adapter file ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRAINED)
def test_a_peer_adapter_file_evaluates_as_trained_and_other_methods_refuse_it(
    peer_runs, data_root, tmp_path, name
):
    out, _ = peer_runs(name)
    ckpt = out / "adapters.safetensors"
    evaluated = run(
        compose_run(
            smoke_overrides(data_root, tmp_path, f"method={name}", f"checkpoint='{ckpt}'", *_sigma(name)),
            "eval",
        ),
        do_train=False,
    )
    assert _metrics(evaluated) == _metrics(out)
    assert all(r["checkpoint"].startswith(f"{ckpt}@sha256=") for r in read_metrics(evaluated / "metrics.csv"))
    other_peer = next(p for p in TRAINED if p != name)
    for other in ("feclip", "winclip", other_peer):
        cfg = compose_run(
            smoke_overrides(data_root, tmp_path, f"method={other}", f"checkpoint='{ckpt}'", "study=other"),
            "eval",
        )
        with pytest.raises(CheckpointMismatchError, match=rf"holds {name}'s weights.*method={other}") as e:
            run(cfg, do_train=False)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "other").exists()  # refused before any folder was made


def test_an_anomalyclip_file_records_its_resolved_options(peer_runs, data_root, tmp_path):
    """Its default taps (None: the top block) are resolved on the backbone: the same taps given
    explicitly evaluate the file alike; other taps are refused, naming them."""
    out, _ = peer_runs("anomalyclip")
    ckpt = out / "adapters.safetensors"
    assert json.loads(read_metadata(ckpt)["config"])["taps"] == [23]
    explicit = run(
        compose_run(
            smoke_overrides(
                data_root,
                tmp_path,
                "method=anomalyclip",
                "method.anomalyclip.taps=[23]",
                f"checkpoint='{ckpt}'",
            ),
            "eval",
        ),
        do_train=False,
    )
    assert _metrics(explicit) == _metrics(out)
    cfg = compose_run(
        smoke_overrides(
            data_root, tmp_path, "method=anomalyclip", "method.anomalyclip.taps=[20]", f"checkpoint='{ckpt}'"
        ),
        "eval",
    )
    with pytest.raises(CheckpointMismatchError, match=r"taps=\[23\] \(this run: \[20\]\)"):
        run(cfg, do_train=False)


def test_a_killed_peer_training_resumes_to_the_same_weights(data_root, tmp_path, monkeypatch):
    def overrides(study):  # 2 epochs of 3 steps (18 images, batches of 8)
        return smoke_overrides(
            data_root,
            tmp_path,
            "method=anomalyclip",
            "train.reuse=false",
            "train.batch_size=8",
            f"study={study}",
        )

    straight = run(compose_run(overrides("straight")))
    real_loss = PeerModel.loss
    calls = {"n": 0}

    def crashing_loss(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # in the second epoch
            raise KeyboardInterrupt("simulated kill")
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(PeerModel, "loss", crashing_loss)
    with pytest.raises(KeyboardInterrupt):
        run(compose_run(overrides("killed")))
    monkeypatch.setattr(PeerModel, "loss", real_loss)
    killed = tmp_path / "killed" / straight.parent.name / straight.name
    assert torch.load(killed / "train_state.pt", weights_only=True)["epoch"] == 0
    assert not (killed / "metrics.csv").exists()

    assert run(compose_run(overrides("killed"))) == killed
    assert "resumed from" in (killed / "train.log").read_text()
    a, b = load_file(straight / "adapters.safetensors"), load_file(killed / "adapters.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _metrics(killed) == _metrics(straight)


def test_a_peers_trained_weights_are_reused_from_the_adapter_store(data_root, tmp_path):
    def overrides(study):  # the store in this test's own cache folder: empty at first
        return smoke_overrides(
            data_root,
            tmp_path,
            "method=anomalyclip",
            "train.max_steps=2",
            f"study={study}",
            f"paths.cache_dir={tmp_path}/cache",
        )

    first = run(compose_run(overrides("first")))
    second = run(compose_run(overrides("second")))
    assert "loaded from the adapter store" not in (first / "train.log").read_text()
    assert "loaded from the adapter store" in (second / "train.log").read_text()
    assert (first / "adapters.safetensors").read_bytes() == (second / "adapters.safetensors").read_bytes()
    assert _metrics(first) == _metrics(second)


def test_a_peer_trains_in_one_process_only(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    cfg = compose_run(smoke_overrides(data_root, tmp_path, "method=aprilgan", "train.max_steps=1"))
    with pytest.raises(ConfigError, match="method=aprilgan trains in one process"):
        run(cfg)
    assert not list(tmp_path.rglob("identity.json"))


# -- 4. refusals on the command line -------------------------------------------------------------------

# feclip-train / feclip-eval with each argument list in one process (the CLI's own entry points; one
# interpreter for all of them): exit status, stdout and stderr of each
_CLI_BATCH = r"""
import contextlib, io, json, sys
from feclip.apps.train import eval_main, train_main

results = []
for prog, args in json.loads(sys.argv[1]):
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [prog, *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            (train_main if prog == "feclip-train" else eval_main)()
        except SystemExit as e:
            code = e.code
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
with open(RESULT, "w") as f:
    json.dump(results, f)
"""


def _cli_batch(calls: list[tuple[str, list[str]]], cwd) -> list[dict]:
    result = cwd / "cli-results.json"
    script = _CLI_BATCH.replace("RESULT", repr(str(result)))
    res = subprocess.run(
        [sys.executable, "-c", script, json.dumps(calls)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
        timeout=180,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(result.read_text())


def test_peer_user_mistakes_are_one_line_exit_2(peer_runs, data_root, tmp_path):
    ckpt = peer_runs("aprilgan")[0] / "adapters.safetensors"
    results = tmp_path / "results"
    cases = [
        # epochs asked for (method=winclip alone sets train.epochs=0: feclip-train then only evaluates)
        ("feclip-train", ["method=winclip", "train.epochs=2"], "method=winclip is training-free"),
        ("feclip-train", ["method=aprilgan", "eval.map_kind=logit_margin"], "does not read eval.map_kind"),
        ("feclip-train", ["method=aprilgan", "eval.fewshot_k=2"], "does not read eval.fewshot_k"),
        ("feclip-train", ["method=anomalyclip", "train.prefix_cache=on"], "does not read train.prefix_cache"),
        ("feclip-train", ["method=nonexistent"], "Available options in 'method': anomalyclip, aprilgan"),
        (
            "feclip-train",
            ["method=aprilgan", "method.aprilgan.tapz=[1]"],
            "Key 'tapz' not in 'AprilGanConfig'",
        ),
        (
            "feclip-train",
            ["method=anomalyclip", "method.anomalyclip.taps=[24]"],
            "anomalyclip.taps must lie in [0, 23]",
        ),
        ("feclip-eval", ["method=winclip", "method.winclip.scales=[7]"], "larger than the 6x6 token grid"),
        ("feclip-eval", ["method=feclip", f"checkpoint='{ckpt}'"], "holds aprilgan's weights"),
    ]
    base = smoke_overrides(data_root, results)
    answers = _cli_batch([(prog, [*base, *args]) for prog, args, _ in cases], tmp_path)
    for (prog, args, expected), got in zip(cases, answers, strict=True):
        lines = got["stderr"].splitlines()
        assert got["code"] == 2, (args, got)
        assert got["stdout"] == "" and len(lines) == 1, (args, got)
        assert lines[0].startswith(f"{prog}: error: ") and expected in lines[0], (args, lines)
    assert not list(results.rglob("identity.json"))  # every one refused before a run folder was made


# -- 5. identity -------------------------------------------------------------------------------------


def _identities(overrides: list[str]) -> tuple[str, str]:
    """(run identity hash, adapter store key) of a config, on made-up data fingerprints."""
    cfg = compose_run(["backbone=tiny", *overrides])
    run_id = make_identity(cfg, "feclip-tiny:random(seed=42)", "trained", {"train:synthetic": "abc"})["hash"]
    return run_id, store_key(training_identity(cfg, None, "abc", "fp32"))


def test_a_peers_options_are_its_identity_and_no_one_elses():
    base = _identities(["method=aprilgan"])
    scaled = _identities(["method=aprilgan", "method.aprilgan.logit_scale=50"])
    assert scaled[0] != base[0] and scaled[1] != base[1]
    # another method's options change nothing: WinCLIP's (and APRIL-GAN's) for FE-CLIP, ...
    feclip = _identities([])
    assert _identities(["method.winclip.temperature=0.5"]) == feclip
    assert _identities(["method.aprilgan.logit_scale=50"]) == feclip
    # ... and FE-CLIP's model.* for... nothing else: a peer refuses them (validate), WinCLIP's for APRIL-GAN
    assert _identities(["method=aprilgan", "method.winclip.temperature=0.5"]) == base
    assert base[1] != _identities(["method=anomalyclip"])[1]


def test_feclips_training_identity_has_no_method_key():
    """FE-CLIP's adapter store keys stay those of before the method group: its record is the seed, the
    backbone, the model, the training data and train.* (less what changes no weight), nothing else."""
    cfg = compose_run(["backbone=tiny", "method.winclip.temperature=0.5"])
    assert "method" not in _training_config(cfg, None)
    train = plain(cfg.train)
    for key in TRAIN_NOT_WEIGHTS:
        train.pop(key)
    expected = {
        "format": STORE_FORMAT,
        "seed": cfg.seed,
        "backbone": plain(cfg.backbone),
        "weights": None,
        "model": plain(cfg.model),
        "data": plain(cfg.data.train),
        "train": train,
        "data_fingerprint": "abc",
        "data_options": {"resize": cfg.data.resize, "mask_resize": cfg.data.mask_resize},
        "precision": "fp32",
        "init": None,
    }
    assert training_identity(cfg, None, "abc", "fp32") == expected
    peer = training_identity(compose_run(["backbone=tiny", "method=aprilgan"]), None, "abc", "fp32")
    assert peer["method"]["name"] == "aprilgan" and "logit_scale" in peer["method"]["options"]


def test_feclip_predict_refuses_a_peers_file_in_one_line(peer_runs, tmp_path, capsys):
    from feclip.apps.predict import main as predict_main

    out, _ = peer_runs("aprilgan")
    from PIL import Image

    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (120, 60, 30)).save(image)
    code = predict_main(
        ["--checkpoint", str(out / "adapters.safetensors"), "--out", str(tmp_path / "o"), str(image)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "aprilgan's weights" in err[0] and "feclip-eval method=aprilgan" in err[0]
    assert not (tmp_path / "o").exists()

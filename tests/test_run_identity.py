"""A run's folder is its identity: checkpoints, backbones, configs and data that change a number never
share a folder, every output records the backbone that ran, and faults lose nothing."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, compose_run, smoke_overrides
from conftest import train_cli as _cli
from safetensors.torch import load_file, save_file

from feclip.engine import identity
from feclip.engine import train as train_module
from feclip.engine.run import run
from feclip.errors import CheckpointMismatchError, ConfigError, FEClipError
from feclip.models.provenance import WeightsSource, parse
from feclip.results import is_paper_backbone, read_metrics


def _values(out):
    return {(r["category"], r["metric"]): r["value"] for r in read_metrics(out / "metrics.csv")}


def _eval(data_root, results, ckpt, *extra):
    cfg = compose_run(smoke_overrides(data_root, results, "study=e", f"checkpoint='{ckpt}'", *extra), "eval")
    return run(cfg, do_train=False)


# -- run identity ---------------------------------------------------------------------------------


def test_two_checkpoints_of_one_study_and_seed_get_two_folders_with_their_own_numbers(data_root, tmp_path):
    a = run(compose_run(smoke_overrides(data_root, tmp_path, "train.max_steps=1", "study=t", "variant=a")))
    b = run(compose_run(smoke_overrides(data_root, tmp_path, "train.max_steps=3", "study=t", "variant=b")))
    ea = _eval(data_root, tmp_path, a / "adapters.safetensors")
    eb = _eval(data_root, tmp_path, b / "adapters.safetensors")
    assert ea != eb and ea.parent.name.startswith("ckpt=") and eb.parent.name.startswith("ckpt=")
    assert _values(ea) == _values(a) and _values(eb) == _values(b) and _values(ea) != _values(eb)
    rows = read_metrics(eb / "metrics.csv")
    sha = eb.parent.name.removeprefix("ckpt=")
    assert {r["checkpoint"].split("@sha256=")[0] for r in rows} == {str(b / "adapters.safetensors")}
    assert {r["checkpoint"].split("@sha256=")[1][:8] for r in rows} == {sha}
    assert {r["backbone"] for r in rows} == {"feclip-tiny:random(seed=42)"}
    # the same checkpoint again: the complete run is found and skipped, numbers untouched
    stamp = (eb / "metrics.csv").stat().st_mtime_ns
    assert _eval(data_root, tmp_path, b / "adapters.safetensors") == eb
    assert (eb / "metrics.csv").stat().st_mtime_ns == stamp


def test_a_missing_checkpoint_is_an_error_before_anything_is_built(data_root, tmp_path, monkeypatch):
    import feclip.engine.run as run_module

    monkeypatch.setattr(run_module, "build_clip", lambda *a, **k: pytest.fail("backbone built"))
    with pytest.raises(FEClipError, match=r"checkpoint=.*nope\.safetensors: no such file"):
        _eval(data_root, tmp_path, tmp_path / "nope.safetensors")
    assert not (tmp_path / "e").exists()
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "from feclip.apps.train import eval_main; eval_main()",
            *smoke_overrides(data_root, tmp_path),
        ]
        + [f"checkpoint={tmp_path}/nope.safetensors"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "no such file" in res.stderr


def test_a_folder_of_another_configuration_is_refused_untouched(data_root, tmp_path):
    out = run(compose_run(smoke_overrides(data_root, tmp_path, "train.max_steps=1", "variant=v")))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(
        FEClipError, match=r"holds a run of another configuration \(train\.lr: 0\.0005 -> 0\.001"
    ):
        run(
            compose_run(
                smoke_overrides(data_root, tmp_path, "train.max_steps=1", "variant=v", "train.lr=1e-3")
            )
        )
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_options_that_change_no_number_change_no_identity(data_root):
    base = compose_run(smoke_overrides(data_root, "r"))
    quiet = compose_run(
        smoke_overrides(data_root, "r", "eval.save_figures=true", "train.progress=true", "logger=wandb")
    )
    data = {"x": "1"}
    same = [identity.make_identity(c, "b", "trained", data)["hash"] for c in (base, quiet)]
    other = identity.make_identity(
        compose_run(smoke_overrides(data_root, "r", "eval.sigma=2")), "b", "trained", data
    )
    assert same[0] == same[1] != other["hash"]
    assert identity.make_identity(base, "other-backbone", "trained", data)["hash"] != same[0]
    # and they are left out of the folder name Hydra builds from the overrides
    from omegaconf import OmegaConf

    excluded = OmegaConf.load(
        REPO / "feclip" / "conf" / "train.yaml"
    ).hydra.job.config.override_dirname.exclude_keys
    assert {"logger", "eval.save_figures", "train.progress"} <= set(excluded)


def test_the_data_is_part_of_the_identity(tmp_path):
    from feclip.data import list_samples, make_synthetic

    make_synthetic(tmp_path / "s", n_train_good=1, n_test_good=1, n_test_bad=1, image_size=32)
    root = tmp_path / "s" / "set_b"
    samples = list_samples("synthetic", root)
    fp = identity.data_fingerprint(root, samples)
    moved = tmp_path / "moved"
    root.rename(moved)
    assert identity.data_fingerprint(moved, list_samples("synthetic", moved)) == fp
    victim = next(s.image_path for s in list_samples("synthetic", moved))
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert identity.data_fingerprint(moved, list_samples("synthetic", moved)) != fp


def test_unknown_keys_fail_in_every_form():
    for form in ("+train.epochz=3", "++train.epochz=3", "+eval.aupro.method=exact"):
        with pytest.raises(ConfigError, match="unknown config key"):
            compose_run([form])
    res = _cli(["+train.epochz=3"])
    assert res.returncode == 2 and "train.epochz" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.lr=-1", "train.lr"),
        ("train.betas=[1.5,0.9]", "train.betas"),
        ("device=foo", "device"),
        ("device=cuda:7", "device=cuda:7"),
        ("eval.map_taps=[3]", "eval.map_taps"),
        ("eval.tap_weights=[1,2]", "eval.tap_weights"),
        ("eval.batch_size=0", "eval.batch_size"),
    ],
)
def test_bad_values_are_refused_naming_the_field(override, field):
    cfg = compose_run(["backbone=tiny", override])
    with pytest.raises(ConfigError, match=field.replace("[", r"\[")):
        cfg.validate()


def test_cli_bad_value_is_one_line(tmp_path):
    res = _cli(["backbone=tiny", "device=cuda", f"paths.results_dir={tmp_path}"])
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "device" in res.stderr


# -- provenance -----------------------------------------------------------------------------------


def test_a_fallback_backbone_is_named_in_the_folder_and_every_output(data_root, tmp_path, monkeypatch):
    import feclip.models.clip as clip_module

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(clip_module, "find_cached_weights", lambda *a, **k: None)  # even where they are
    cfg = compose_run(
        smoke_overrides(
            data_root, tmp_path, "train.max_steps=1", "backbone=vit_l14_336", "backbone.fallback_tiny=true"
        )
    )
    out = run(cfg)
    assert out.parent.name == "fallback=feclip-tiny"
    rows = read_metrics(out / "metrics.csv")
    assert {r["backbone"] for r in rows} == {"feclip-tiny:random(seed=42)"}
    assert {r["variant"] for r in rows} == {"fallback=feclip-tiny"}
    assert not is_paper_backbone(rows[0]["backbone"])
    assert "FALLBACK" in (out / "env.txt").read_text()
    import yaml

    assert (
        yaml.safe_load((out / "config.yaml").read_text())["provenance"]["backbone"]
        == "feclip-tiny:random(seed=42)"
    )


def test_a_checkpoint_rebuilds_the_random_backbone_it_was_trained_on(data_root, tmp_path):
    trained = run(compose_run(smoke_overrides(data_root, tmp_path, "train.max_steps=2", "seed=1", "study=s")))
    evaluated = _eval(data_root, tmp_path, trained / "adapters.safetensors")  # seed 42 here
    assert _values(evaluated) == _values(trained)
    assert {r["backbone"] for r in read_metrics(evaluated / "metrics.csv")} == {"feclip-tiny:random(seed=1)"}
    # a file that does not record its random backbone's seed cannot be rebuilt: refused
    tensors = load_file(trained / "adapters.safetensors")
    from safetensors import safe_open

    with safe_open(str(trained / "adapters.safetensors"), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "backbone_weights"}
    save_file(tensors, tmp_path / "old.safetensors", metadata=meta)
    with pytest.raises(CheckpointMismatchError, match="does not record its seed"):
        _eval(data_root, tmp_path, tmp_path / "old.safetensors")


def test_weights_sources_round_trip_and_paper_detection():
    for w in (
        WeightsSource("ViT-L-14-336-quickgelu", "openai", sha256="ab" * 32),
        WeightsSource("feclip-tiny", "random", seed=3),
        WeightsSource("ViT-L-14-336-quickgelu", "file:ViT-L-14-336.pt", sha256="cd" * 32),
    ):
        back = parse(w.describe())
        assert back.describe() == w.describe() and back.seed == w.seed
    assert is_paper_backbone("ViT-L-14-336-quickgelu:openai@sha256=abababababab")
    assert not is_paper_backbone("ViT-L-14-336-quickgelu:random(seed=1)")
    assert not is_paper_backbone("feclip-tiny:random(seed=1)") and not is_paper_backbone("unknown")


# -- faults: nothing lost, nothing half-written -----------------------------------------------------


def test_a_nan_checkpoint_is_refused(data_root, tmp_path):
    trained = run(compose_run(smoke_overrides(data_root, tmp_path, "train.max_steps=1", "study=n")))
    from safetensors import safe_open

    with safe_open(str(trained / "adapters.safetensors"), "pt") as f:
        meta = f.metadata()
    tensors = load_file(trained / "adapters.safetensors")
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone().fill_(float("nan"))
    save_file(tensors, tmp_path / "nan.safetensors", metadata=meta)
    with pytest.raises(FEClipError, match=rf"non-finite .* in {first}"):
        _eval(data_root, tmp_path, tmp_path / "nan.safetensors")


def test_an_interrupted_save_never_splits_the_checkpoint_pair(data_root, tmp_path, monkeypatch):
    """Disk full after the training state was written: the next run resumes from that state and
    re-exports the adapters; the weights equal those of an uninterrupted run."""
    straight = run(
        compose_run(smoke_overrides(data_root, tmp_path, "train.epochs=3", "study=p", "variant=a"))
    )
    # train.reuse=false: run b trains (the adapter store holds run a's training, the same identity)
    cfg_args = smoke_overrides(
        data_root, tmp_path, "train.epochs=3", "study=p", "variant=b", "train.reuse=false"
    )
    real = train_module.save_adapters
    calls = {"n": 0}

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "save_adapters", full_disk)
    with pytest.raises(FEClipError, match="No space left on device.*safe in train_state.pt"):
        run(compose_run(cfg_args))
    monkeypatch.setattr(train_module, "save_adapters", real)
    out = tmp_path / "p" / "b" / "seed=42"
    assert torch.load(out / "train_state.pt", weights_only=True)["epoch"] == 1
    assert not list(out.glob(".*.tmp"))
    run(compose_run(cfg_args))
    a, b = load_file(straight / "adapters.safetensors"), load_file(out / "adapters.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_state_save_keeps_the_previous_state(data_root, tmp_path, monkeypatch):
    cfg = compose_run(
        smoke_overrides(data_root, tmp_path, "train.epochs=3", "variant=d", "train.reuse=false")
    )
    real = torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(f, "wb") as fh:
                fh.write(b"half")
            raise OSError(28, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(train_module.torch, "save", full_disk)
    with pytest.raises(FEClipError, match="previous checkpoint is kept"):
        run(cfg)
    monkeypatch.setattr(train_module.torch, "save", real)
    out = tmp_path / "default" / "d" / "seed=42"
    assert torch.load(out / "train_state.pt", weights_only=True)["epoch"] == 0
    assert not list(out.glob(".*.tmp"))


def test_a_truncated_training_state_is_one_clear_error(data_root, tmp_path):
    # train.reuse=false: the second run must resume from the run folder, not load the adapters store
    args = smoke_overrides(
        data_root, tmp_path, "train.epochs=2", "train.max_steps=1", "variant=t", "train.reuse=false"
    )
    out = run(compose_run(args))
    (out / "metrics.csv").unlink()
    state = out / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(FEClipError, match=r"train_state\.pt cannot be read .*delete it"):
        run(compose_run(args))


def test_a_second_process_on_the_same_folder_is_refused(data_root, tmp_path):
    cfg = compose_run(smoke_overrides(data_root, tmp_path, "train.max_steps=1", "variant=l"))
    out = tmp_path / "default" / "l" / "seed=42"
    code = (
        "import sys, time; from pathlib import Path; from feclip.engine.identity import RunLock;"
        f"lock = RunLock(Path({str(out)!r})).acquire(); print('held', flush=True); time.sleep(30)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FEClipError, match=rf"in use by pid {holder.pid}"):
            run(cfg)
    finally:
        holder.kill()
        holder.wait()
    assert (run(cfg) / "metrics.csv").is_file()  # released with its process


def test_an_unwritable_results_folder_is_one_line(data_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = compose_run(smoke_overrides(data_root, blocker / "results", "train.max_steps=1"))
    with pytest.raises(FEClipError, match="cannot write in .*set paths.results_dir to a writable folder"):
        run(cfg)


def test_a_failing_target_keeps_the_rows_of_the_others(data_root, tmp_path, monkeypatch):
    import feclip.engine.evaluate as evaluate_module
    from feclip.errors import DatasetError

    real = evaluate_module.evaluate
    calls = {"n": 0}

    def second_fails(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise DatasetError("synthetic: image x.png cannot be decoded")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", second_fails)
    targets = "data.targets=[{name: synthetic, dir: synthetic/set_b},{name: synthetic, dir: synthetic/set_a}]"
    with pytest.raises(FEClipError, match=r"failed on 1 of 2 target\(s\) .*rows of the others are in"):
        run(compose_run(smoke_overrides(data_root, tmp_path, "train.max_steps=1", "variant=f", targets)))
    out = tmp_path / "default" / "f" / "seed=42"
    assert not (out / "metrics.csv").exists()
    partial = read_metrics(out / "metrics.partial.csv")
    assert partial and {r["dataset"] for r in partial} == {"synthetic"}
    assert "cannot be decoded" in (out / "train.log").read_text()


def test_home_in_paths_is_expanded_once_for_every_reader(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(data_root.parent))
    cfg = compose_run(smoke_overrides(f"'~/{data_root.name}'", tmp_path, "train.max_steps=1", "variant=h"))
    out = run(cfg)
    assert (out / "metrics.csv").is_file() and not (tmp_path / "~").exists()


def test_progress_is_periodic_lines_when_stderr_is_not_a_terminal(data_root, tmp_path, caplog, monkeypatch):
    caplog.set_level("INFO", logger="feclip.train")
    from feclip.progress import LineProgress

    monkeypatch.setattr(LineProgress, "every_s", 0.0)  # a line after every batch
    run(
        compose_run(
            smoke_overrides(
                data_root,
                tmp_path,
                "train.progress=true",
                "variant=pg",
                "train.epochs=1",
                "train.reuse=false",
            )
        )
    )
    lines = [r.getMessage() for r in caplog.records if "batches" in r.getMessage()]
    assert [line.split(" (")[0] for line in lines] == [f"epoch 1/1: {i}/5 batches" for i in range(1, 5)]


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_run_resumes(data_root, tmp_path):
    args = smoke_overrides(data_root, tmp_path, "train.epochs=60", "study=int", "variant=v")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from feclip.apps.train import train_main; train_main()", *args],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    state = tmp_path / "int" / "v" / "seed=42" / "train_state.pt"
    deadline = time.time() + 90
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "resume" in err and "Traceback" not in err
    assert "run failed: interrupted" in (state.parent / "train.log").read_text()
    assert torch.load(state, weights_only=True)["epoch"] >= 0


def test_hydra_outputs_move_aside_when_the_results_folder_cannot_be_written(tmp_path):
    from feclip.apps.train import hydra_dir

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert hydra_dir(str(tmp_path / "ok")) == str(tmp_path / "ok" / ".hydra")
    assert not hydra_dir(str(blocker / "r")).startswith(str(blocker))
    res = _cli(
        ["backbone=tiny", "protocol=demo", f"paths.data_root={tmp_path}/d", f"paths.results_dir={blocker}/r"]
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("feclip-train: error: cannot write in")


# -- fail before spending compute -----------------------------------------------------------------


def _no_training(monkeypatch):
    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("trained before the check"))


def test_an_undecodable_target_image_fails_before_training(data_root, tmp_path, monkeypatch):
    import shutil

    from feclip.errors import DatasetError

    copy = tmp_path / "copy"
    shutil.copytree(data_root / "synthetic" / "set_b", copy)
    victim = sorted((copy / "cat" / "test").rglob("*.png"))[0]
    victim.write_bytes(b"not a png")
    _no_training(monkeypatch)
    cfg = compose_run(
        smoke_overrides(tmp_path, tmp_path / "r", "data.targets=[{name: synthetic, dir: copy}]")
    )
    with pytest.raises(DatasetError, match=victim.name):
        run(cfg)
    assert not (tmp_path / "r" / "default").exists()


def test_fewshot_k_over_the_normal_images_fails_before_training(data_root, tmp_path, monkeypatch):
    from feclip.errors import DatasetError

    _no_training(monkeypatch)
    with pytest.raises(DatasetError, match="fewer than 50|50"):
        run(compose_run(smoke_overrides(data_root, tmp_path, "eval.fewshot_k=50")))


def test_reader_options_come_from_the_command_line(tmp_path):
    from feclip.engine.run import list_dataset
    from feclip.errors import ConfigError as CfgError

    root = tmp_path / "mine"
    from PIL import Image

    for folder, n in (("ok", 2), ("scratch", 2)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(root / folder / f"{i}.png")
    cfg = compose_run(
        [f"paths.data_root={tmp_path}", "data.targets=[{name: folder, dir: mine, options: {good_dir: ok}}]"]
    )
    samples = list_dataset(cfg.data.targets[0], cfg.paths)
    assert sorted((s.image_path.parent.name, s.label) for s in samples) == [
        ("ok", 0),
        ("ok", 0),
        ("scratch", 1),
        ("scratch", 1),
    ]
    bad = compose_run(
        [f"paths.data_root={tmp_path}", "data.targets=[{name: folder, dir: mine, options: {good: ok}}]"]
    )
    with pytest.raises(CfgError, match="good"):
        list_dataset(bad.data.targets[0], bad.paths)


def test_checkpoints_that_cannot_be_rebuilt_exactly_are_refused(tmp_path):
    from feclip.models import FEClip, FEClipConfig, load_adapters, load_clip, save_adapters
    from feclip.models.provenance import align_with_checkpoint

    planned = WeightsSource("feclip-tiny", "random", seed=42)
    with pytest.raises(CheckpointMismatchError, match="drawn without a seed"):
        align_with_checkpoint(planned, {"backbone_weights": "feclip-tiny:random(seed=None)"}, "f")
    assert align_with_checkpoint(planned, {"backbone_weights": "feclip-tiny:random(seed=3)"}, "f").seed == 3
    loaded = WeightsSource("ViT-L-14-336-quickgelu", "openai", sha256="ab" * 32)
    with pytest.raises(CheckpointMismatchError, match="another weights file"):
        align_with_checkpoint(
            loaded, {"backbone_weights": "ViT-L-14-336-quickgelu:openai@sha256=cdcdcdcdcdcd"}, "f"
        )
    # the input size is recorded and checked (a model trained at 518 is not rebuilt at 336)
    model = FEClip(load_clip("feclip-tiny", seed=0), FEClipConfig(taps=(20, 23)))
    path = save_adapters(model, tmp_path / "a.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert (
        meta["image_size"] == str(model.image_size)
        and meta["backbone_weights"] == "feclip-tiny:random(seed=0)"
    )
    save_file(load_file(path), tmp_path / "b.safetensors", metadata={**meta, "image_size": "518"})
    with pytest.raises(CheckpointMismatchError, match="input size 518"):
        load_adapters(model, tmp_path / "b.safetensors")

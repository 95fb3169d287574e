"""``make_synthetic`` where it cannot write: one line naming the folder, nothing half-written left behind;
``~`` in paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import feclip.data.synthetic as synthetic
from feclip.apps.data import main
from feclip.data import list_samples, make_synthetic
from feclip.errors import DatasetError

TINY = dict(n_train_good=1, n_test_good=1, n_test_bad=1, image_size=32)


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def _single_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_root_below_a_file(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.raises(DatasetError) as err:
        make_synthetic(blocker / "synthetic", **TINY)
    message = _single_line(err)
    assert str(blocker / "synthetic") in message and "writable folder" in message
    assert "paths.data_root" in message and "paths.cache_dir" in message
    with pytest.raises(DatasetError, match="exists and is not a folder"):
        make_synthetic(blocker, **TINY)


def test_permission_denied(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(kwargs.get("dir")))

    monkeypatch.setattr(synthetic.tempfile, "mkdtemp", denied)
    root = tmp_path / "ro"
    with pytest.raises(DatasetError) as err:
        make_synthetic(root, **TINY)
    message = _single_line(err)
    assert f"under {root}: Permission denied" in message and "writable folder" in message
    assert _leftovers(root) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_folder(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    try:
        with pytest.raises(DatasetError, match=r"Permission denied.*writable folder"):
            make_synthetic(root, **TINY)
        assert _leftovers(root) == []
    finally:
        root.chmod(0o755)


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_save = synthetic._save

    def save(path, arr):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(28, "No space left on device", str(path))
        real_save(path, arr)

    monkeypatch.setattr(synthetic, "_save", save)
    root = tmp_path / "s"
    with pytest.raises(DatasetError) as err:
        make_synthetic(root, **TINY)
    message = _single_line(err)
    assert "No space left on device" in message and str(root) in message
    assert _leftovers(root) == []  # no set, no temporary folder


def test_failed_rebuild_keeps_the_complete_old_set(tmp_path, monkeypatch):
    root = tmp_path / "s"
    sets = make_synthetic(root, **TINY)
    before = len(list_samples("synthetic", sets["set_a"]))
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".set_a.tmp-"):
            raise OSError(5, "Input/output error", str(self))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(DatasetError, match="Input/output error"):
        make_synthetic(root, **{**TINY, "n_test_bad": 2})
    assert _leftovers(root) == ["set_a", "set_b"]
    assert len(list_samples("synthetic", sets["set_a"])) == before


def test_complete_sets_in_a_read_only_place_are_used(tmp_path, monkeypatch):
    root = tmp_path / "s"
    make_synthetic(root, **TINY)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(synthetic.tempfile, "mkdtemp", denied)
    monkeypatch.setattr(Path, "mkdir", denied)
    sets = make_synthetic(root, **TINY)  # nothing to write: no error
    assert sets["set_b"] == root / "set_b"


def test_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    sets = make_synthetic("~/synth", **TINY)
    assert sets["set_a"] == tmp_path / "synth" / "set_a" and sets["set_a"].is_dir()
    assert not Path("~").exists()  # no literal '~' folder in the working directory
    assert len(list_samples("synthetic", "~/synth/set_b")) == 3 * 2
    assert main(["check", "~/synth/set_a", "--dataset", "synthetic"]) == 0


def test_synth_command_unwritable_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["synth", str(blocker / "out"), "--image-size", "32"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "writable folder" in err and "Traceback" not in err

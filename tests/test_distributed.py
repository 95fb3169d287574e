"""Training on two CPU processes (gloo) gives the weights of one process; only rank 0 writes files.

Tolerance: the ranks average over their own micro-batches and the weighted sum of those means adds the
same terms as the single-process mean in another order, so each step's gradient differs in the last
float32 bits (~1e-7 relative); over the 10 Adam steps of these runs the weights end up about 1e-7
apart. ``atol=1e-5`` leaves two orders of magnitude for that, while a real mistake (a share weighed
wrongly, a gradient not reduced, an image dropped or seen twice) moves a weight by about the learning
rate, 5e-4, per step. Adam's update is nearly blind to a common scale of the gradients, so the first
moments in ``train_state.pt`` (linear in the gradients) are compared as well.
"""

import os
import socket
from pathlib import Path

import pytest
import torch
from conftest import compose_run, make_tiny_feclip, smoke_overrides, torchrun_train
from safetensors.torch import load_file

from feclip.config import LossConfig, TrainConfig
from feclip.engine import distributed as dist
from feclip.engine.run import run
from feclip.engine.train import ADAPTERS_FILE, STATE_FILE, train
from feclip.errors import ConfigError

ATOL = 1e-5


def assert_same_training(run_a: Path, run_b: Path) -> None:
    """Adapters and Adam's first moments of two run directories agree within ATOL."""
    a, b = load_file(run_a / ADAPTERS_FILE), load_file(run_b / ADAPTERS_FILE)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=ATOL, msg=k)
    sa, sb = (torch.load(d / STATE_FILE, weights_only=True)["optimizer"]["state"] for d in (run_a, run_b))
    assert sa.keys() == sb.keys()
    for i in sa:
        torch.testing.assert_close(sa[i]["exp_avg"], sb[i]["exp_avg"], rtol=1e-4, atol=1e-7)


def test_torchrun_on_two_processes_matches_one_process(data_root, tmp_path):
    # train.reuse=false: the two processes train (the session's adapter store may hold this identity)
    args = smoke_overrides(data_root, tmp_path / "ddp", "study=ddp", "variant=v", "train.reuse=false")
    res = torchrun_train(args)
    assert res.returncode == 0, res.stderr[-3000:]
    ddp = tmp_path / "ddp" / "ddp" / "v" / "seed=42"
    # trained again in one process (not loaded from the adapters store the two-process run filled)
    single = run(
        compose_run(
            smoke_overrides(data_root, tmp_path / "one", "study=ddp", "variant=v", "train.reuse=false")
        )
    )
    assert_same_training(ddp, single)

    # rank 0 alone wrote the run directory, its log and Hydra's outputs
    assert [p.parent for p in (tmp_path / "ddp").rglob("metrics.csv")] == [ddp]
    log_text = (ddp / "train.log").read_text()
    for epoch in (1, 2):
        assert log_text.count(f"epoch {epoch}/2: loss") == 1
    assert log_text.count("trained 2 epochs (10 steps)") == 1  # 18 images, batches of 4: 5 steps/epoch
    assert "distributed: 2 processes (gloo)" in (ddp / "env.txt").read_text()
    assert len(list((tmp_path / "ddp" / ".hydra").rglob("*.log"))) == 1
    assert len(list((tmp_path / "ddp" / ".hydra").rglob("config.yaml"))) == 1


class ImageSet(torch.utils.data.Dataset):
    """``n`` random images at the tiny CLIP's 84x84 input; only the last one is anomalous."""

    def __init__(self, n: int = 5, size: int = 84):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, size, size, generator=g)
        self.masks = torch.zeros(n, size, size)
        self.masks[-1, 20:40, 30:50] = 1.0
        self.labels = [0] * (n - 1) + [1]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        size = torch.tensor(self.images.shape[-2:])
        return {
            "image": self.images[i],
            "mask": self.masks[i],
            "label": self.labels[i],
            "index": i,
            "original_size": size,
        }


def _train_tiny(run_dir: Path) -> None:
    """Two epochs over 5 images in global batches of 2: the last batch (1 image) leaves rank 1 of 2 an
    empty share; with ``mask_loss_on=abnormal`` the map losses see the single anomalous image on one
    rank only, so fc_patch has a gradient on that rank alone, and none at all in the other steps."""
    model = make_tiny_feclip()
    cfg = TrainConfig(
        epochs=2,
        batch_size=2,
        prefix_cache="off",
        progress=False,
        loss=LossConfig(mask_loss_on="abnormal"),
    )
    train(model, ImageSet(), cfg, run_dir, seed=3, device=torch.device("cpu"))


def _spawned_rank(rank: int, world: int, port: int, run_dir: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    dist.init(torch.device("cpu"))
    try:
        _train_tiny(run_dir)
    finally:
        dist.teardown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_empty_shares_and_unreached_parameters_match_one_process(tmp_path):
    torch.multiprocessing.spawn(_spawned_rank, args=(2, _free_port(), tmp_path / "ddp"), nprocs=2)
    _train_tiny(tmp_path / "one")
    assert_same_training(tmp_path / "ddp", tmp_path / "one")


def test_micro_batches_are_strided_shares_of_the_global_batches(monkeypatch):
    order = list(range(10, 0, -1))
    shares = {}
    for r in range(4):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        monkeypatch.setattr(dist, "world_size", lambda: 4)
        shares[r], sizes = dist.micro_batches(order, 4)
        assert sizes == [4, 4, 2]
    assert shares[1] == [[9], [5], [1]] and shares[3] == [[7], [3], []]
    for j, start in enumerate(range(0, 10, 4)):  # together, exactly the single-process batch
        assert sorted(sum((shares[r][j] for r in range(4)), [])) == sorted(order[start : start + 4])
    with pytest.raises(
        ConfigError, match=r"train.batch_size=6 .* divisible by the number of processes \(4\)"
    ):
        dist.check_batch_size(6)


def test_alone_every_helper_is_a_no_op():
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert dist.micro_batches([2, 0, 1], 2) == ([[2, 0], [1]], [2, 1])
    assert dist.loss_shares(torch.tensor([True, False])) is None
    value = torch.tensor(3.0)
    assert dist.sum_over_ranks(value) is value
    assert dist.init(torch.device("cpu")) == torch.device("cpu")
    dist.check_batch_size(7)

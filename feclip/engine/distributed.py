"""Training on several processes (``torchrun``): the process group, rank helpers, batch sharding and the
gradient all-reduce. Alone (no ``WORLD_SIZE`` > 1 in the environment) every helper is a no-op.

``torchrun --standalone --nproc_per_node=4 --no-python feclip-train ...`` starts one process per GPU;
:func:`init` joins them (nccl on CUDA, each rank on ``cuda:LOCAL_RANK``; gloo on the CPU). How a step
is shared (see docs/distributed.md):

- ``train.batch_size`` is the *global* batch. Every rank draws the same seeded epoch order, cuts it
  into the same global batches and takes its strided share of each (:func:`micro_batches`): the ranks'
  micro-batches together are exactly the single-process batch, nothing dropped or duplicated.
- Each rank weighs its loss by its share of the global batch (:func:`loss_shares`), so the ranks'
  losses sum to the single-process loss of the whole batch, and :func:`all_reduce_gradients` sums the
  gradients. This stays exact for a last, partial batch whose shares differ in size (or are empty),
  and for ``mask_loss_on=abnormal``, where the map losses average over a different subset per rank.

Why not ``DistributedDataParallel``: only the adapters and fc_patch (43 M of 471 M parameters for
ViT-L) are trained, the step enters the model through ``forward_from_prefix`` as well as ``forward``,
fc_patch may stop training mid-run (``fc_patch.policy=frozen_after``) and a rank's micro-batch may
leave some trainable parameters without a gradient. DDP would wrap (and broadcast) the frozen CLIP,
needs its own ``forward`` to be called, a fixed set of parameters that require gradients, and
``find_unused_parameters`` for the rest. One flat all-reduce of the trainable gradients after
``backward`` does the same job in a few lines; it does not overlap communication with the backward
pass, which costs about 1 ms per step for 43 M fp32 gradients over NVLink.
"""

from __future__ import annotations

import atexit
import logging
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from feclip.errors import ConfigError

log = logging.getLogger("feclip.distributed")


def env_world_size() -> int:
    """The number of processes ``torchrun`` started (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``; 0 when alone)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """The number of processes in the group (1 when no group was joined)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the group (0 when no group was joined)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and when alone): the process that writes files and logs."""
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join the process group that ``torchrun`` describes; return this rank's device.

    Alone, nothing happens and ``device`` comes back as it is. Under torchrun, ``cuda`` (or ``auto`` on
    a GPU machine) becomes ``cuda:LOCAL_RANK`` with the nccl backend and the CPU uses gloo; an explicit
    ``cuda:N`` is refused (every rank would use the same GPU). Ranks other than 0 log warnings only.
    Calling it again (e.g. for the next job of a sweep) keeps the group.
    """
    if env_world_size() == 1:
        return device
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(
                f"device={device} names one GPU, but torchrun started {env_world_size()} processes: "
                "use device=auto or device=cuda (each rank takes cuda:LOCAL_RANK)"
            )
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        atexit.register(teardown)
        if not is_main():
            logging.getLogger("feclip").setLevel(logging.WARNING)
        log.info("process group: %d ranks (%s), this is rank %d on %s", world_size(), backend, rank(), device)
    return device


def teardown() -> None:
    """Leave the process group (registered to run at exit by :func:`init`; safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (no-op alone)."""
    if world_size() > 1:
        dist.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block first, the other ranks once it is done (e.g. files made once, then read).

    If rank 0 fails inside, the others stay at the barrier until torchrun stops them.
    """
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def describe() -> str:
    """One line for env.txt: the world size and backend, or that the run used one process."""
    if world_size() == 1:
        return "distributed: no (one process)"
    return f"distributed: {world_size()} processes ({dist.get_backend()})"


def check_batch_size(batch_size: int) -> None:
    """Refuse a global batch that the ranks cannot share equally."""
    if batch_size % world_size():
        raise ConfigError(
            f"train.batch_size={batch_size} (the global batch) must be divisible by the number of "
            f"processes ({world_size()}); e.g. train.batch_size={batch_size - batch_size % world_size() or world_size()}"
        )


def micro_batches(order: list[int], batch_size: int) -> tuple[list[list[int]], list[int]]:
    """This rank's share of each global batch of an epoch, and the global batch sizes.

    The global batches are ``order`` cut every ``batch_size`` images (the last one may be shorter);
    rank ``r`` of ``W`` takes ``batch[r::W]``. Alone, the micro-batches are the global batches.
    Shape: ``order`` (n,) -> ``ceil(n / batch_size)`` lists of at most ``batch_size / W`` indices
    (possibly empty in a last batch with fewer than ``W`` images), and as many sizes.
    """
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    r, w = rank(), world_size()
    return [b[r::w] for b in batches], [len(b) for b in batches]


def loss_shares(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """This rank's share of the global batch: ``(b_r / B, k_r / K)``; ``None`` alone.

    ``b_r`` is the number of images in this rank's micro-batch, ``k_r`` the number the map losses see
    (``keep``, see :func:`feclip.losses.mask_loss_images`), and ``B``, ``K`` their sums over the ranks
    (``K / K`` is taken as 0 when ``K = 0``). Weighting the image terms of a rank's loss (BCE, a mean
    over its images) by the first and the map terms (focal and dice, means over its kept images) by the
    second makes the ranks' losses sum to the loss of the whole batch. One all-reduce of two numbers.
    Shape: keep ``(b_r,)`` bool -> two 0-dim float tensors on its device.
    """
    if world_size() == 1:
        return None
    local = torch.stack([torch.tensor(float(keep.numel()), device=keep.device), keep.sum().float()])
    total = local.clone()
    dist.all_reduce(total)
    shares = local / total.clamp(min=1.0)
    return shares[0], shares[1]


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over the ranks (a new tensor; ``value`` itself alone)."""
    if world_size() == 1:
        return value
    total = value.clone()
    dist.all_reduce(total)
    return total


def broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
    """Copy rank 0's values of ``params`` to every rank (what DDP does when it wraps a model).

    The ranks build the same model from the same seed (or checkpoint) anyway; this makes the start
    identical by construction. Only the trainable parameters travel, never the frozen CLIP.
    """
    if world_size() == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of the parameters that require one over the ranks, in place.

    One all-reduce over a flat buffer of every gradient plus one presence flag per parameter. A rank
    whose micro-batch did not reach a parameter (grad ``None``) contributes zeros; a parameter that no
    rank reached keeps no gradient, as in a single process, so Adam skips it there too.
    Shape: the gradients as they are, fp32; the buffer ``(sum of numels + len(params),)``.
    """
    if world_size() == 1:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    ref = params[0]
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        + [torch.tensor([float(p.grad is not None) for p in params], dtype=ref.dtype, device=ref.device)]
    )
    dist.all_reduce(flat)
    grads = flat[: -len(params)].split([p.numel() for p in params])
    present = flat[-len(params) :].tolist()
    for p, g, n in zip(params, grads, present):
        p.grad = g.view_as(p) if n > 0 else None

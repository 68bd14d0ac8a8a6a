"""Data parallelism for the training stages on torch distributed: the same recipe runs as one process or under
`torchrun`, with a global batch that does not depend on the number of ranks.

    python recipes/pretrain.py                                   # one process
    torchrun --nproc_per_node 2 recipes/pretrain.py              # 2 ranks on this machine (gloo on CPU, nccl on GPU)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_endpoint HOST:29500 recipes/pretrain.py   # 2 nodes of 8 GPUs

The rule every stage follows: each step draws one global batch of `batch_size` rows (a function of the step, so a
run resumes with any rank count), rank r trains on rows r, r + R, r + 2R, ... of it, and the loss is scaled so that
DistributedDataParallel's gradient average equals the one-process gradient of the whole batch (`global_scale`).
Rank 0 alone writes checkpoints, logs and evaluates; the checkpoint holds the whole model and optimizer (DDP
keeps them identical on every rank), so it resumes under a different rank count.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch

# What torchrun puts in each rank's environment; a process that leaves the group (rank 0's evaluation, which may
# start a vLLM engine) drops them so that nothing it starts mistakes itself for a rank.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
                "TORCH_NCCL_ASYNC_ERROR_HANDLING")
# Rank 0 may evaluate (minutes) while the other ranks wait at the next collective; gloo's default is 30 min.
GROUP_TIMEOUT = datetime.timedelta(hours=4)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the data-parallel group (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, idx: np.ndarray) -> np.ndarray:
        """This rank's rows of a global batch (rows rank, rank + world, ...).  [B] -> [B / world]"""
        return idx[self.rank::self.world]

    def check_batch(self, batch_size: int, what: str = "batch_size") -> None:
        """Every rank must hold the same number of rows, or the gradient average would weigh rows unequally."""
        if batch_size % self.world:
            raise SystemExit(f"{what}={batch_size} does not split over {self.world} ranks: set {what} to a multiple "
                             f"of the rank count (the global batch is the same for any rank count)")


def init_ranks() -> Ranks:
    """Joins the group torchrun started (gloo on CPU, nccl with CUDA), or returns rank 0 of 1 when not under
    torchrun. Each rank seeds nothing here: batches are functions of (seed, step), the same on every rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=GROUP_TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank)


def leave_group(ranks: Ranks) -> None:
    """Ends the group (after training) and drops torchrun's variables from this process's environment."""
    if not ranks.distributed:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    for key in TORCHRUN_ENV:
        os.environ.pop(key, None)


def wrap(model: torch.nn.Module, ranks: Ranks) -> torch.nn.Module:
    """The module to run forward/backward through: DistributedDataParallel over the group (gradients averaged
    across ranks in backward), or the model itself in one process. Parameters and optimizer stay the model's."""
    if not ranks.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ranks.local_rank] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, device_ids=device_ids)


def global_sum(x: float | int, ranks: Ranks) -> float:
    """The sum of a number over all ranks (a count of tokens, of titles); x itself in one process."""
    if not ranks.distributed:
        return float(x)
    import torch.distributed as dist

    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def global_scale(local_count: float, global_count: float, ranks: Ranks) -> float:
    """The factor that turns a mean over this rank's `local_count` items into its share of the mean over all
    ranks' `global_count` items, under DDP's gradient average (which divides by the rank count):
    mean_local * local_count * world / global_count. 1 in one process."""
    if not ranks.distributed:
        return 1.0
    return local_count * ranks.world / global_count if global_count else 0.0


def broadcast_flag(flag: bool, ranks: Ranks) -> bool:
    """Rank 0's value of a yes/no decision (reuse the outputs or train), on every rank."""
    if not ranks.distributed:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()

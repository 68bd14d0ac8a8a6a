"""common/distributed.py: each rank's rows of a global batch, and a loss scaled so that DDP's gradient average is
the one-process gradient of the whole batch, checked in a real 2-rank gloo group."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from common.distributed import Ranks, global_scale, global_sum, init_ranks, wrap

# A global batch of 6 "sequences" with different numbers of valid tokens: a per-token mean weighs ranks unequally.
LENGTHS = [1, 5, 2, 4, 6, 3]
WIDTH = 6


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T, 3], valid [B, T] (the first LENGTHS[b] positions)."""
    x = torch.randn(len(LENGTHS), WIDTH, 3, generator=torch.Generator().manual_seed(0))
    valid = torch.arange(WIDTH)[None, :] < torch.tensor(LENGTHS)[:, None]
    return x, valid


def model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Linear(3, 1)


def token_mean_loss(net, x, valid, ranks: Ranks, scaled: bool) -> torch.Tensor:
    """Per-token mean of the squared output over this rank's rows, scaled to its share of the global mean."""
    per_token = net(x).squeeze(-1) ** 2  # [b, T]
    n = float(valid.sum())
    loss = (per_token * valid).sum() / n
    return loss * global_scale(n, global_sum(n, ranks), ranks) if scaled else loss


def one_process_grad() -> torch.Tensor:
    net = model()
    x, valid = batch()
    token_mean_loss(net, x, valid, Ranks(), scaled=True).backward()
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def _rank(rank: int, world: int, port: int, scaled: bool, out: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ranks = init_ranks()
    net = model()
    ddp = wrap(net, ranks)
    x, valid = batch()
    rows = ranks.shard(np.arange(len(LENGTHS)))
    token_mean_loss(ddp, x[rows], valid[rows], ranks, scaled).backward()
    out[rank] = torch.cat([p.grad.flatten() for p in net.parameters()]).tolist()
    torch.distributed.destroy_process_group()


def two_rank_grads(scaled: bool) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(2, port, scaled, out), nprocs=2, join=True)
        return dict(out)


def test_shards_partition_the_global_batch():
    idx = np.arange(10, 22)
    shards = [Ranks(r, 3).shard(idx) for r in range(3)]
    assert all(len(s) == 4 for s in shards)
    assert sorted(np.concatenate(shards).tolist()) == idx.tolist()


def test_a_batch_that_does_not_split_over_the_ranks_is_refused():
    Ranks(0, 2).check_batch(16)
    with pytest.raises(SystemExit, match="batch_size=15 does not split over 2 ranks"):
        Ranks(1, 2).check_batch(15)


def test_one_process_is_rank_zero_of_one_and_scales_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ranks = init_ranks()
    assert (ranks.rank, ranks.world, ranks.is_main, ranks.distributed) == (0, 1, True, False)
    assert global_scale(3, 7, ranks) == 1.0 and global_sum(3, ranks) == 3.0
    net = model()
    assert wrap(net, ranks) is net


def test_two_gloo_ranks_give_the_one_process_gradient_of_the_whole_batch():
    """Rows 0, 2, 4 hold 9 tokens and rows 1, 3, 5 hold 12: the scaled per-token loss gives every rank the
    one-process gradient; the unscaled one (each rank's own mean, then DDP's average) does not."""
    expected = one_process_grad()
    scaled = two_rank_grads(scaled=True)
    for rank in (0, 1):
        torch.testing.assert_close(torch.tensor(scaled[rank]), expected, rtol=1e-5, atol=1e-6)
    naive = two_rank_grads(scaled=False)
    assert not torch.allclose(torch.tensor(naive[0]), expected, rtol=1e-3, atol=1e-4)

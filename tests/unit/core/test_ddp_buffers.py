"""How DDP treats buffers under each sync strategy, without a deprecation warning: grad sync
copies rank 0's buffers (BatchNorm statistics) to every worker before each forward; the
post-local-SGD warm-up's DDP leaves them to ParamSync's averaging. 2 gloo processes; the
expectation is what the definition says of a forward on identical data."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_gloo
from torch import nn

from raymb.core.sync import GradSync, ParamSync

W = 2


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))


def _buffers_after(sync, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0's and rank 1's running means after a forward on each rank's own data, then one
    on data identical on both ranks."""
    net = sync.wrap(_bn_model())
    own = torch.randn(8, 3, generator=torch.Generator().manual_seed(rank)) * (rank + 1)
    same = torch.randn(8, 3, generator=torch.Generator().manual_seed(99))
    net(own)
    net(same)
    bn = (net.module if hasattr(net, "module") else net)[1]
    means = [torch.empty(4) for _ in range(W)]
    dist.all_gather(means, bn.running_mean.detach().clone())
    return means[0], means[1]


def _worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=W)
    torch.set_num_threads(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grad = _buffers_after(GradSync(W), rank)
        warm = _buffers_after(ParamSync(W, every=4, warmup=2), rank)
    results[rank] = {
        "grad": grad,
        "warm": warm,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, FutureWarning)],
    }
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results() -> dict:
    return spawn_gloo(_worker, W)


def test_no_future_warning_from_ddp(results):
    assert results[0]["warnings"] == [] and results[1]["warnings"] == []


def test_grad_sync_gives_every_worker_rank_0s_buffers_before_a_forward(results):
    # The second forward starts from rank 0's statistics on both ranks and sees the same rows.
    rank0, rank1 = results[0]["grad"]
    torch.testing.assert_close(rank0, rank1, rtol=0, atol=0)


def test_warmup_ddp_leaves_buffers_to_parameter_averaging(results):
    # Each rank's first forward moved its own statistics; nothing copied them since.
    rank0, rank1 = results[0]["warm"]
    assert not torch.allclose(rank0, rank1)

"""Under autocast the expert computation runs in the autocast dtype (bf16) in the single-device layer,
under expert parallelism and under FSSDP, and the three agree with each other (2 gloo ranks, CPU autocast)."""

import pytest
import torch

from moesys.config import ParallelConfig
from moesys.layers import MoELayer
from moesys.parallel import parallelize
from moesys.parallel.fssdp_runtime import fssdp_parallelize
from moesys.parallel.testing import Holder, spawn


def build():
    torch.manual_seed(0)
    return MoELayer(16, 4, 2, 16, backend="grouped_mm")


def test_single_device_experts_run_in_bf16_under_autocast():
    layer = build()
    x = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x)
    y32, _ = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y32, rtol=5e-2, atol=5e-3)


def _worker(rank, W, mode):
    x_all = torch.randn(W, 6, 16, generator=torch.Generator().manual_seed(1))
    ref = build()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, _ = ref(x_all.view(-1, 16))
    holder = Holder(build())
    if mode == "ep":
        parallelize(holder, ParallelConfig(ep=W))
    else:
        fssdp_parallelize(holder, policy="fsdp").begin_step()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = holder.moe(x_all[rank])
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref.view(W, 6, 16)[rank], rtol=2e-2, atol=2e-3)


@pytest.mark.slow
def test_ep_and_fssdp_match_single_device_under_autocast():
    spawn(_worker, 2, "ep")
    spawn(_worker, 2, "fssdp")

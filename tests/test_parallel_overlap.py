"""Overlap where it is a feature, observed by event order on 2 gloo ranks (not by time): FSSDP's
SparseAllGather of a block's experts is in flight before the block's attention ends, and EP's token
dispatch is started before the shared expert runs and waited for only after it."""

from __future__ import annotations

import pytest
import torch

import moesys.parallel.ep as ep_module
from moesys.config import ParallelConfig, load_config
from moesys.layers.moe import MoELayer
from moesys.models import MoETransformer
from moesys.parallel import parallelize
from moesys.parallel.fssdp_runtime import fssdp_parallelize
from moesys.parallel.testing import Holder, spawn
from tests.test_model import TINY


def _fssdp_gather_in_flight_during_attention(rank, world):
    cfg = load_config(TINY, ["model.num_layers=2", "moe.num_experts=4", "moe.backend=loop"])
    torch.manual_seed(0)
    model = MoETransformer.from_config(cfg)
    handle = fssdp_parallelize(model, policy="fssdp")
    seen = []
    for i, block in enumerate(model.blocks):
        experts = block.ffn.experts
        block.attn.register_forward_hook(
            lambda m, a, o, i=i, ex=experts: seen.append((i, "attention ends", ex._prefetch is not None)))
        experts.register_forward_pre_hook(
            lambda m, a, i=i, ex=experts: seen.append((i, "experts start", ex._prefetch is not None)))
    ids = torch.randint(0, cfg.model.vocab_size, (2, 8), generator=torch.Generator().manual_seed(rank))
    for _ in range(2):
        seen.clear()
        handle.begin_step()
        model(ids).logits.sum().backward()
        handle.reduce_gradients()
        handle.end_step()
        # Each block's gather was posted by its pre-hook, before attention, and is still pending
        # (taken, not restarted) when the experts run.
        assert seen == [(0, "attention ends", True), (0, "experts start", True),
                        (1, "attention ends", True), (1, "experts start", True)], (rank, seen)


def _ep_dispatch_around_shared_expert(rank, world):
    events = []
    real = ep_module.all_to_all_async

    def logged(*args, **kwargs):
        pending = real(*args, **kwargs)
        events.append("dispatch posted")
        wait = pending.wait

        def logged_wait():
            events.append("dispatch waited")
            return wait()
        pending.wait = logged_wait
        return pending
    ep_module.all_to_all_async = logged  # this worker process only; it exits after the test
    try:
        for overlap in (True, False):
            torch.manual_seed(0)
            model = Holder(MoELayer(8, 4, 2, 6, shared_ffn_size=6, shared_gate=True, backend="grouped_mm"))
            parallelize(model, ParallelConfig(ep=2, ep_overlap=overlap))
            model.moe.shared_expert.register_forward_hook(lambda m, a, o: events.append("shared expert"))
            events.clear()
            model.moe(torch.randn(5, 8))
            want = ["dispatch posted", "shared expert", "dispatch waited"] if overlap else \
                ["dispatch posted", "dispatch waited", "shared expert"]
            assert events == want, (overlap, events)
    finally:
        ep_module.all_to_all_async = real


def _both(rank, world):
    _fssdp_gather_in_flight_during_attention(rank, world)
    _ep_dispatch_around_shared_expert(rank, world)


@pytest.mark.slow
def test_gather_overlaps_attention_and_dispatch_overlaps_shared_expert():
    spawn(_both, 2)

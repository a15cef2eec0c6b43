"""Overlap where it is a feature, observed by event order on 2 gloo ranks (not by time): FSSDP's
SparseAllGather of a block's experts is in flight before the block's attention ends, and EP's token
dispatch is started before the shared expert runs and waited for only after it."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import moesys.parallel.ep as ep_module
import moesys.parallel.fssdp as fssdp_module
from moesys.config import ParallelConfig, load_config
from moesys.layers import Experts
from moesys.layers.moe import MoELayer
from moesys.models import MoETransformer
from moesys.parallel import parallelize
from moesys.parallel.fssdp import LayerPlan
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


def _fssdp_prefetch_is_the_steps_gather(rank, world):
    gathers = []  # (plan, dtype) of each SparseAllGather posted
    real = fssdp_module.start_gather

    def counted(module, plan, dtype, owned):
        gathers.append((plan, dtype))
        return real(module, plan, dtype, owned)
    fssdp_module.start_gather = counted  # this worker process only; it exits after the test
    try:
        cfg = load_config(TINY, ["model.num_layers=2", "moe.num_experts=4", "moe.backend=loop"])
        ids = torch.randint(0, cfg.model.vocab_size, (2, 8), generator=torch.Generator().manual_seed(rank))
        for remat, dtype in [(False, torch.float32), (True, torch.float32), (False, torch.bfloat16)]:
            torch.manual_seed(0)
            model = MoETransformer.from_config(cfg)
            handle = fssdp_parallelize(model, policy="fssdp", rematerialize=remat)
            for step in range(2):
                gathers.clear()
                plans = handle.begin_step()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    model(ids).logits.float().sum().backward()
                handle.reduce_gradients()
                handle.end_step()
                # Once the compute dtype is known (after the first forward), the gather prefetched before
                # attention is the one the layer uses, in that dtype; re-materialisation gathers again in
                # backward. (The first bf16 step prefetches in the master dtype, then gathers in bf16.)
                if step == 1 or dtype == torch.float32:
                    got = Counter((id(p), d) for p, d in gathers)
                    assert got == {(id(p), dtype): 2 if remat else 1 for p in plans}, (remat, dtype, step, gathers)

        # A gather prefetched for another plan (a forward that did not reach the layer, then a new step)
        # is drained, and the layer gathers for its current plan.
        E, H = 8, 8
        torch.manual_seed(0)
        ref = Experts(E, H, 6, backend="loop")
        holder = torch.nn.Sequential(MoELayer(H, E, 2, 6, backend="loop"))
        holder[0].experts.load_state_dict(ref.state_dict())
        fssdp_parallelize(holder, policy="ep")
        ex = holder[0].experts
        owners = tuple(e // (E // world) for e in range(E))
        only_owners, everywhere = LayerPlan(owners, tuple((o,) for o in owners)), LayerPlan(owners, ((0, 1),) * E)
        g = torch.Generator().manual_seed(7)
        x, topk = torch.randn(world, 5, H, generator=g), torch.randint(0, E, (world, 5, 2), generator=g)
        w = torch.rand(world, 5, 2, generator=g)
        for before, now in [(only_owners, everywhere), (everywhere, only_owners)]:
            gathers.clear()
            ex.plan = before
            ex.block_started()
            ex.plan = now
            y = ex(x[rank], topk[rank], w[rank])
            assert [p for p, _ in gathers] == [before, now]
            torch.testing.assert_close(y, ref(x[rank], topk[rank], w[rank]), rtol=1e-5, atol=1e-6)

        # A second prefetch before the layer runs (the hook called twice) posts nothing more: the gather in
        # flight is the one the layer takes.
        gathers.clear()
        ex.block_started()
        ex.block_started()
        torch.testing.assert_close(ex(x[rank], topk[rank], w[rank]), ref(x[rank], topk[rank], w[rank]),
                                   rtol=1e-5, atol=1e-6)
        assert [p for p, _ in gathers] == [ex.plan]
    finally:
        fssdp_module.start_gather = real


@pytest.mark.slow
def test_fssdp_uses_its_prefetched_gather_and_drains_a_stale_one():
    spawn(_fssdp_prefetch_is_the_steps_gather, 2)

"""Expert-parallel MoE layer (2 and 4 gloo processes) against the single-process MoELayer on the same batches:
outputs and every gradient, dropless and capacity modes, skewed routing, ranks with zero tokens."""

from __future__ import annotations

import types

import pytest
import torch

import moesys.parallel.ep as ep_module

from moesys.config import ParallelConfig
from moesys.layers.moe import MoELayer
from moesys.parallel import ExpertParallelExperts, ExpertParallelMoELayer, parallelize
from moesys.parallel.mesh import check_ep
from moesys.parallel.testing import Holder, spawn

H, E, K, I = 16, 8, 2, 12
TOL = dict(rtol=1e-9, atol=1e-9)


def _layer(capacity_factor, shared: bool, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(H, E, K, I, expert_bias=True, shared_ffn_size=8 if shared else 0, shared_gate=shared,
                     backend="grouped_mm", capacity_factor=capacity_factor)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 1 or "bias" in str(p.shape):
                p.normal_(std=0.1)  # non-zero biases, so their gradients mean something
    return layer.double()


def _batches(world: int, tokens, skew: str):
    """Per-rank inputs and output cotangents; `skew` pushes tokens towards the first experts."""
    g = torch.Generator().manual_seed(1)
    xs, gs = [], []
    for r in range(world):
        x = torch.randn(tokens[r], H, generator=g, dtype=torch.float64)
        if skew != "none":
            x[:, 0] += 3.0 if skew == "first_rank" else 1.0
        xs.append(x)
        gs.append(torch.randn(tokens[r], H, generator=g, dtype=torch.float64))
    return xs, gs


def _skew_router(layer: MoELayer, skew: str) -> None:
    with torch.no_grad():
        if skew == "first_rank":      # experts 0 and 1 win every token: all rows go to ep rank 0
            layer.router.weight[:2, 0] = torch.tensor([4.0, 3.5])
        elif skew == "zipf":          # one hot expert, a few warm ones
            layer.router.weight[:, 0] = torch.tensor([1.0, 0.6, 0.3, 0.1, 0.0, 0.0, -0.2, -0.4])


def _record_routing(experts) -> dict:
    """The routing each dispatch of `experts` gets (ids and weights, detached), kept in the returned dict."""
    routed, dispatch = {}, experts.dispatch

    def recording(x_TH, ids_TK, weights_TK, *rest):
        routed["ids"], routed["weights"] = ids_TK.detach(), weights_TK.detach()
        return dispatch(x_TH, ids_TK, weights_TK, *rest)
    experts.dispatch = recording
    return routed


def _case(rank, world, ep, capacity_factor, shared, skew, tokens, overlap):
    xs, gs = _batches(world, tokens, skew)
    ref = _layer(capacity_factor, shared)
    _skew_router(ref, skew)
    ref_outs, ref_xgrads, ref_stats = [], [], []
    for x, g in zip(xs, gs):
        x = x.clone().requires_grad_(True)
        y, stats = ref(x)
        (y * g).sum().backward()
        ref_outs.append(y.detach())
        ref_xgrads.append(x.grad)
        ref_stats.append(stats)
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}

    model = Holder(_layer(capacity_factor, shared))
    _skew_router(model.moe, skew)
    handle = parallelize(model, ParallelConfig(ep=ep, ep_overlap=overlap))
    assert isinstance(model.moe, ExpertParallelMoELayer)
    experts = model.moe.experts
    routed = _record_routing(experts)
    x = xs[rank].clone().requires_grad_(True)
    y, stats = model.moe(x)
    (y * gs[rank]).sum().backward()
    handle.reduce_gradients()

    what = f"rank {rank} ep={ep} cf={capacity_factor} shared={shared} skew={skew} tokens={tokens}"
    torch.testing.assert_close(y, ref_outs[rank], **TOL, msg=lambda m: f"{what}: output\n{m}")
    torch.testing.assert_close(x.grad, ref_xgrads[rank], **TOL, msg=lambda m: f"{what}: x grad\n{m}")
    assert torch.equal(stats.tokens_per_expert, ref_stats[rank].tokens_per_expert), what
    # Rows sent per ep rank: every assignment to that rank's experts, less (capacity mode) the dropped ones.
    L, first = experts.num_local_experts, handle.mesh.ep_rank * (E // ep)
    ids_N, weights_N = routed["ids"].reshape(-1), routed["weights"].reshape(-1)
    shipped = ids_N if capacity_factor is None else ids_N[weights_N != 0]
    assert experts.last_splits[0] == torch.bincount(shipped // L, minlength=ep).tolist(), what
    assert experts.global_expert_ids == list(range(first, first + L)), what
    assert experts.extra_repr() == \
        f"experts {first}..{first + L - 1} of {E}, ep={ep}, backend='grouped_mm', overlap={overlap}", what
    local = slice(experts.expert_offset, experts.expert_offset + experts.num_local_experts)
    for name, p in model.moe.named_parameters():
        want = ref_grads[name][local] if name.startswith("experts.") else ref_grads[name]
        # reduce_gradients averages over the world (the mean of the per-rank losses); the reference summed.
        torch.testing.assert_close(p.grad * world, want, **TOL, msg=lambda m: f"{what}: grad of {name}\n{m}")


def _defaults_and_dispatch_waits(rank, world):
    """Built directly (as DeepSpeed's layer does), ExpertParallelExperts computes the experts' output, ships
    zero-weight rows and overlaps by default (ExpertParallelMoELayer too); with `dispatch_waits` set it
    records the host seconds spent in the dispatch wait; drop_zero_weight=True drops only zero weights."""
    handle = parallelize(Holder(_layer(None, False)), ParallelConfig(ep=2))
    full = _layer(None, False).experts
    experts = ExpertParallelExperts(full, handle.mesh)
    assert experts.overlap is True and experts.drop_zero_weight is False
    assert ExpertParallelMoELayer(_layer(None, False), handle.mesh, layer_name="moe").experts.overlap is True
    ids_TK = torch.tensor([[0, 5], [7, 2], [1, 4]])
    weights_TK = torch.tensor([[0.5, 0.0], [1.0, -0.5], [0.25, 0.75]], dtype=torch.float64)
    x_TH = torch.randn(3, H, dtype=torch.float64)
    experts.dispatch_waits = []
    clock = iter([10.0, 10.25])
    real_time, ep_module.time = ep_module.time, types.SimpleNamespace(perf_counter=lambda: next(clock))
    try:
        y_TH = experts(x_TH, ids_TK, weights_TK)
    finally:
        ep_module.time = real_time
    torch.testing.assert_close(y_TH, full(x_TH, ids_TK, weights_TK), **TOL)
    assert experts.last_splits == ([3, 3], [3, 3]), experts.last_splits
    assert experts.dispatch_waits == [0.25], experts.dispatch_waits
    # drop_zero_weight drops exactly the zero weights: a negative one (a negative routed scale) still counts.
    dropping = ExpertParallelExperts(full, handle.mesh, drop_zero_weight=True)
    torch.testing.assert_close(dropping(x_TH, ids_TK, weights_TK), full(x_TH, ids_TK, weights_TK), **TOL)
    assert dropping.last_splits[0] == [3, 2], dropping.last_splits


def _cases_2(rank, world):
    _defaults_and_dispatch_waits(rank, world)
    _case(rank, world, 2, None, True, "none", [9, 6], True)
    _case(rank, world, 2, None, False, "first_rank", [7, 5], True)       # ep rank 1 receives no rows
    _case(rank, world, 2, None, True, "zipf", [8, 0], True)              # rank 1 has no tokens
    _case(rank, world, 2, 1.0, True, "zipf", [11, 6], True)              # capacity drops assignments
    _case(rank, world, 2, 0.5, False, "first_rank", [0, 9], False)      # no tokens + drops, no overlap


def _cases_4(rank, world):
    _case(rank, world, 4, None, True, "zipf", [6, 0, 9, 4], True)
    _case(rank, world, 2, None, True, "first_rank", [5, 7, 0, 3], True)  # dp=2: expert grads over 2 replicas
    _case(rank, world, 2, 1.0, True, "zipf", [9, 4, 6, 0], True)
    _case(rank, world, 4, 0.75, False, "none", [0, 0, 0, 0], True)       # nobody has tokens


@pytest.mark.slow
def test_ep_layer_matches_single_process_2_ranks():
    spawn(_cases_2, 2)


@pytest.mark.slow
def test_ep_layer_matches_single_process_4_ranks():
    spawn(_cases_4, 4)


def test_check_ep_names_bad_values():
    with pytest.raises(ValueError, match="parallel.ep=3 does not divide the world size 4"):
        check_ep(3, 4)
    with pytest.raises(ValueError, match="parallel.ep=4 does not divide moe.num_experts=6"):
        check_ep(4, 4, 6)
    with pytest.raises(ValueError, match="parallel.ep=0"):
        check_ep(0, 4)


def test_parallelize_single_process_is_a_no_op():
    model = Holder(_layer(None, True))
    handle = parallelize(model, ParallelConfig(ep=1))
    assert type(model.moe) is MoELayer and not handle.mesh.distributed
    with pytest.raises(ValueError, match="parallel.ep=2 does not divide the world size 1"):
        parallelize(Holder(_layer(None, True)), ParallelConfig(ep=2))

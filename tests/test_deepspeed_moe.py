"""moesys.integrations.deepspeed.MoE against deepspeed.moe.layer.MoE on the same weights and RNG state
(outputs, l_aux, exp_counts and every gradient; k = 1, 2, 3, dropless and capacity modes), and
ep_size=2 (2 gloo processes, DeepSpeed's own expert groups) against ep_size=1 on the same batches."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

deepspeed = pytest.importorskip("deepspeed", reason="needs the optional extra moesys[deepspeed] (pip install deepspeed)")
from deepspeed.moe.layer import MoE as DeepSpeedMoE  # noqa: E402

from moesys.integrations.deepspeed import MoE  # noqa: E402
from moesys.layers.experts import DenseMLP  # noqa: E402
from moesys.parallel.ep import ExpertParallelExperts  # noqa: E402
from moesys.parallel.testing import spawn  # noqa: E402

H, I, E = 8, 6, 4
TOL = dict(rtol=1e-10, atol=1e-10)
# Gradients that pass back through the gate: both gates run in fp32 (DeepSpeed's rule) but record
# different autograd graphs (top-k gathers here, [T, E] masks there), so they agree to fp32 rounding.
GRAD_TOL = dict(rtol=1e-5, atol=1e-7)


def _expert(act: nn.Module = None) -> nn.Module:
    return nn.Sequential(nn.Linear(H, I), act or nn.GELU(), nn.Linear(I, H))


def _pair(seed: int = 0, **kwargs):
    """DeepSpeed's layer with experts made different from each other, and ours loaded from its state dict."""
    torch.manual_seed(seed)
    expert = _expert()
    ours_expert = copy.deepcopy(expert)  # with use_residual, DeepSpeed keeps `expert` itself as its mlp
    ds = DeepSpeedMoE(H, expert, num_experts=E, **kwargs).double()
    with torch.no_grad():
        for p in ds.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ours = MoE(H, ours_expert, num_experts=E, backend="grouped_mm", **kwargs).double()
    ours.load_state_dict(ds.state_dict())  # DeepSpeed's keys, strict
    return ds, ours


def _run(layer, x, g, seed, used_token=None):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the gate's random draws (RTS, Gumbel, jitter) start from the same state
    y, l_aux, counts = layer(x, used_token)
    ((y * g).sum() + 0.7 * l_aux).backward()
    return y.detach(), l_aux.detach(), counts, x.grad


def _ds_grads(ds: DeepSpeedMoE) -> dict[str, torch.Tensor]:
    """DeepSpeed's gradients under our parameter names (per-expert tensors stacked)."""
    ours = {"gate.wg.weight": ds.deepspeed_moe.gate.wg.weight.grad}
    experts = ds.deepspeed_moe.experts.deepspeed_experts
    for mod, t, name in (("0", "weight", "gate_up_proj"), ("2", "weight", "down_proj"),
                         ("0", "bias", "gate_up_proj_bias"), ("2", "bias", "down_proj_bias")):
        ours[f"experts.{name}"] = torch.stack([getattr(e.get_submodule(mod), t).grad for e in experts])
    for name, p in ds.named_parameters():
        if name.startswith(("mlp.", "coefficient.")):
            ours[name] = p.grad
    return ours


CASES = [
    dict(k=1, drop_tokens=False),
    dict(k=1, capacity_factor=0.5, min_capacity=1),                       # RTS drops over-full experts
    dict(k=1, capacity_factor=0.75, noisy_gate_policy="RSample", min_capacity=2),
    dict(k=1, capacity_factor=0.5, noisy_gate_policy="Jitter", min_capacity=0, use_residual=True),
    dict(k=2, drop_tokens=False),
    dict(k=2, capacity_factor=0.5, min_capacity=1),                       # first choices fill experts first
    dict(k=2, capacity_factor=0.5, min_capacity=1, top2_2nd_expert_sampling=False, use_residual=True),
    dict(k=3, capacity_factor=0.4, min_capacity=1),                       # drop the least probable
    dict(k=3, drop_tokens=False),
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("training", [True, False])
def test_matches_deepspeed_moe(kwargs, training):
    ds, ours = _pair(**kwargs)
    ds.train(training)
    ours.train(training)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, H, generator=gen, dtype=torch.float64) * 2
    g = torch.randn(3, 7, H, generator=gen, dtype=torch.float64)
    want = _run(ds, x, g, seed=11)
    got = _run(ours, x, g, seed=11)
    for name, a, b in zip(("output", "l_aux", "exp_counts", "x grad"), got, want):
        tol = GRAD_TOL if name == "x grad" else TOL
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{kwargs} training={training}: {name}\n{m}")
    if kwargs.get("drop_tokens", True) and training:
        torch.manual_seed(11)  # the capacity cases really drop (else they would not test the drop rule)
        assert not ours.gate(x.reshape(-1, H)).kept_TK.all(), f"{kwargs}: no assignment was dropped"
    ds_grads = _ds_grads(ds)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ds_grads[name], **GRAD_TOL,
                                   msg=lambda m: f"{kwargs} training={training}: grad of {name}\n{m}")


def test_used_token_masks_tokens_like_deepspeed():
    ds, ours = _pair(k=1, capacity_factor=1.0, min_capacity=1)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(10, H, generator=gen, dtype=torch.float64)
    g = torch.randn(10, H, generator=gen, dtype=torch.float64)
    used = (torch.arange(10) % 3 != 0).to(torch.int64)
    want, got = _run(ds, x, g, 2, used), _run(ours, x, g, 2, used)
    for a, b, tol in zip(got, want, (TOL, TOL, TOL, GRAD_TOL)):
        torch.testing.assert_close(a, b, **tol)
    assert (got[0][used == 0] == 0).all()


def test_refuses_what_it_does_not_reproduce():
    with pytest.raises(ValueError, match="use_rts=False"):
        MoE(H, _expert(), num_experts=E, k=1, use_rts=False)
    with pytest.raises(ValueError, match="RSample"):
        MoE(H, _expert(), num_experts=E, k=2, noisy_gate_policy="RSample")
    with pytest.raises(ValueError, match="use_tutel"):
        MoE(H, _expert(), num_experts=E, use_tutel=True)
    with pytest.raises(ValueError, match="enable_expert_tensor_parallelism"):
        MoE(H, _expert(), num_experts=E, enable_expert_tensor_parallelism=True)
    with pytest.raises(TypeError, match="nn.Sequential"):
        MoE(H, nn.Linear(H, H), num_experts=E)
    with pytest.raises(ValueError, match="ep_size=3"):
        MoE(H, _expert(), num_experts=E, ep_size=3)
    with pytest.raises(ValueError, match="used_token with k=2"):
        MoE(H, _expert(), num_experts=E, k=2)(torch.randn(8, H), torch.ones(8))
    with pytest.raises(ValueError, match="min_capacity=4"):
        MoE(H, _expert(), num_experts=E, k=1, drop_tokens=False)(torch.randn(3, H))
    with pytest.raises(RuntimeError, match="set_deepspeed_parallelism"):
        MoE(H, _expert(), num_experts=E, ep_size=2)(torch.randn(8, H))


def test_state_dict_has_deepspeeds_keys_and_round_trips():
    ds, ours = _pair(k=2, use_residual=True)
    theirs_sd, ours_sd = ds.state_dict(), ours.state_dict()
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in theirs_sd.items()}
    for k in theirs_sd:
        assert torch.equal(ours_sd[k], theirs_sd[k]), k
    fresh = MoE(H, _expert(), num_experts=E, k=2, use_residual=True).double()
    fresh.load_state_dict(ours_sd)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), ours.parameters()))
    with pytest.raises(RuntimeError, match="deepspeed_experts.3"):
        fresh.load_state_dict({k: v for k, v in ours_sd.items() if "deepspeed_experts.3." not in k})


def test_expert_marks_and_sizes_mode():
    moe = MoE(H, None, num_experts=E, k=2, ffn_size=I, activation="silu")
    assert moe.experts.gate_up_proj.shape == (E, 2 * I, H)
    assert all(p.allreduce is False and p.group_name == "ep_size_1" for p in moe.experts.parameters())
    assert isinstance(moe, DeepSpeedMoE)  # deepspeed.initialize must see an MoE layer
    dense = MoE(H, DenseMLP(H, I, activation="silu"), num_experts=E, k=2)
    assert dense.experts.activation == "silu" and torch.equal(dense.experts.down_proj[1], dense.experts.down_proj[0])


# ---- ep_size = 2 over DeepSpeed's expert groups, against ep_size = 1 --------------------------------

EP_CASES = [dict(k=2, capacity_factor=0.5, min_capacity=1), dict(k=1, drop_tokens=False),
            dict(k=1, capacity_factor=0.75, min_capacity=1), dict(k=3, drop_tokens=False)]


def _ep_worker(rank, world):
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    for case, kwargs in enumerate(EP_CASES):
        tokens = [9, 5] if case != 3 else [6, 0]   # the last case: rank 1 has no tokens
        torch.manual_seed(case)
        ref = MoE(H, _expert(nn.ReLU()), num_experts=E, backend="grouped_mm", **kwargs).double()
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        gen = torch.Generator().manual_seed(7)
        xs = [torch.randn(t, H, generator=gen, dtype=torch.float64) for t in tokens]
        gs = [torch.randn(t, H, generator=gen, dtype=torch.float64) for t in tokens]
        for r in range(world):
            ref.gate.wg.weight.grad = None  # the gate's gradient per batch; expert gradients add up
            out = _run(ref, xs[r], gs[r], seed=100 + r)
            if r == rank:
                ref_out = (out, ref.gate.wg.weight.grad.clone())
        expert_grads = {n: p.grad for n, p in ref.experts.named_parameters()}  # summed over both batches
        ep = MoE(H, _expert(nn.ReLU()), num_experts=E, ep_size=2, backend="grouped_mm", **kwargs).double()
        L = E // 2
        with torch.no_grad():
            ep.gate.wg.weight.copy_(ref.gate.wg.weight)
            for n, p in ep.experts.named_parameters():
                p.copy_(getattr(ref.experts, n)[rank * L:(rank + 1) * L])
        ep.set_deepspeed_parallelism()
        assert isinstance(ep.experts, ExpertParallelExperts)
        got = _run(ep, xs[rank], gs[rank], seed=100 + rank)
        what = f"rank {rank} {kwargs}"
        (want, want_gate_grad) = ref_out
        for name, a, b in zip(("output", "l_aux", "exp_counts", "x grad"), got, want):
            torch.testing.assert_close(a, b, **TOL, equal_nan=True, msg=lambda m: f"{what}: {name}\n{m}")
        torch.testing.assert_close(ep.gate.wg.weight.grad, want_gate_grad, **TOL, msg=lambda m: f"{what}: gate grad\n{m}")
        for n, p in ep.experts.named_parameters():
            torch.testing.assert_close(p.grad, expert_grads[n][rank * L:(rank + 1) * L], **TOL,
                                       msg=lambda m: f"{what}: grad of experts.{n}\n{m}")


@pytest.mark.slow
def test_ep2_equals_ep1():
    spawn(_ep_worker, 2, timeout_s=120)


# ---- inside a DeepSpeed job: deepspeed.initialize with ZeRO-2 ---------------------------------------

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(H, H)
        self.moe = MoE(H, _expert(), num_experts=E, k=2, backend="grouped_mm")

    def forward(self, x):
        y, l_aux, _ = self.moe(self.inp(x))
        return y.square().mean() + 0.01 * l_aux


def _zero2_worker(rank, world, ckpt_dir):
    import os

    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    os.environ.setdefault("LOCAL_RANK", str(rank))  # what torchrun / the deepspeed launcher set
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    ref, net = _Net(), _Net()
    net.load_state_dict(ref.state_dict())
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(net.parameters()), "name": "all"})
    moe_groups = [g for g in groups if g.get("moe")]
    assert [set(map(id, g["params"])) for g in moe_groups] == [set(map(id, net.moe.experts.parameters()))]
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=torch.optim.AdamW(groups, lr=1e-2),
                                           config={"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}})
    assert engine.has_moe_layers  # DeepSpeed sees an MoE layer: expert groups, MoE reductions
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(4, H, generator=gen)
        torch.manual_seed(step)
        loss = engine(x)
        engine.backward(loss)
        engine.step()
        torch.manual_seed(step)
        ref_loss = ref(x)
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step}: loss\n{m}")
    for name, p in engine.module.named_parameters():
        torch.testing.assert_close(p, ref.get_parameter(name), rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}\n{m}")
    # DeepSpeed's own checkpoint: the experts saved one file per expert, merged back on load.
    engine.save_checkpoint(ckpt_dir, tag="t")
    assert len(list(Path(ckpt_dir, "t").glob("*expert_*"))) == E
    again = _Net()
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(again.parameters()), "name": "all"})
    engine2, _, _, _ = deepspeed.initialize(model=again, optimizer=torch.optim.AdamW(groups, lr=1e-2),
                                            config={"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}})
    engine2.load_checkpoint(ckpt_dir, tag="t")
    for (name, a), b in zip(engine.module.named_parameters(), engine2.module.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_zero2_engine_steps_equal_plain_adamw(tmp_path):
    spawn(_zero2_worker, 1, str(tmp_path), timeout_s=180)

"""moesys.integrations.megatron.MoesysExperts against Megatron-core's own experts module on the same
weights: outputs and every gradient. On the CPU against SequentialMLP, built through Megatron's
build_module from the MoE spec (Megatron's router moves its weight to CUDA, so the whole MoELayer
runs on the GPU machine only: the gpu test swaps the spec inside MoELayer and compares layers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("megatron.core", reason="needs the optional extra moesys[megatron] (pip install megatron-core)")

from moesys.parallel.testing import spawn  # noqa: E402

H, I, L = 8, 6, 3
TOL = dict(rtol=1e-10, atol=1e-10)


def _config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig
    kwargs = dict(num_layers=1, hidden_size=H, num_attention_heads=1, num_moe_experts=L, moe_router_topk=2,
                  moe_ffn_hidden_size=I, ffn_hidden_size=I, gated_linear_unit=True, activation_func=F.silu,
                  add_bias_linear=False, use_cpu_initialization=True, moe_token_dispatcher_type="allgather",
                  params_dtype=torch.float64)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _pair(config, spec_fn):
    """Megatron's SequentialMLP and MoesysExperts, both built from a MoE spec the way MoELayer builds them."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module
    spec = get_moe_module_spec(use_te=False, num_experts=L, moe_grouped_gemm=False)
    pgc = ProcessGroupCollection.use_mpu_process_groups()
    theirs = build_module(spec.submodules.experts, L, config, pg_collection=pgc)
    ours = build_module(spec_fn(spec).submodules.experts, L, config, pg_collection=pgc)
    ours.load_megatron_state_dict(theirs.state_dict())
    return theirs, ours


def _run(module, x, counts, probs, g):
    x, probs = x.clone().requires_grad_(True), probs.clone().requires_grad_(True)
    y, bias = module(x, counts, probs)
    assert bias is None
    (y * g).sum().backward()
    return y.detach(), x.grad, probs.grad


def _cpu_cases(rank, world):
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.experts import SequentialMLP

    from moesys.integrations.megatron import MoesysExperts, with_moesys_experts
    parallel_state.initialize_model_parallel()
    try:
        cases = [dict(), dict(gated_linear_unit=False, activation_func=F.gelu),
                 dict(gated_linear_unit=False, activation_func=F.relu),
                 dict(moe_router_topk=1, moe_router_pre_softmax=True, moe_apply_probs_on_input=True)]
        for overrides in cases:
            torch.manual_seed(0)
            theirs, ours = _pair(_config(**overrides), lambda s: with_moesys_experts(s, backend="grouped_mm"))
            assert isinstance(theirs, SequentialMLP) and isinstance(ours, MoesysExperts)
            gen = torch.Generator().manual_seed(1)
            counts = torch.tensor([4, 0, 5])  # an expert with no tokens
            x = torch.randn(9, H, generator=gen, dtype=torch.float64)
            probs = torch.rand(9, generator=gen, dtype=torch.float64)
            g = torch.randn(9, H, generator=gen, dtype=torch.float64)
            want, got = _run(theirs, x, counts, probs, g), _run(ours, x, counts, probs, g)
            for name, a, b in zip(("output", "x grad", "probs grad"), got, want):
                torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{overrides}: {name}\n{m}")
            for ours_name, j in (("experts.gate_up_proj", 1), ("experts.down_proj", 2)):
                want_grad = torch.stack([getattr(e, f"linear_fc{j}").weight.grad for e in theirs.local_experts])
                torch.testing.assert_close(ours.get_parameter(ours_name).grad, want_grad, **TOL,
                                           msg=lambda m: f"{overrides}: grad of {ours_name}\n{m}")
            assert all(p.allreduce for p in ours.parameters())  # ep = 1: reduced with the dense parameters
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.slow
def test_matches_sequential_mlp_through_the_spec():
    spawn(_cpu_cases, 1, timeout_s=120)


def test_with_moesys_experts_replaces_only_the_experts():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    from moesys.integrations.megatron import MoesysExperts, with_moesys_experts
    layer = get_gpt_layer_local_spec(num_experts=4)
    swapped = with_moesys_experts(layer, backend="triton")
    experts = swapped.submodules.mlp.submodules.experts
    assert experts.module is MoesysExperts and experts.params == {"backend": "triton"}
    assert layer.submodules.mlp.submodules.experts.module is not MoesysExperts  # the input is left alone
    assert swapped.submodules.mlp.submodules.shared_experts == layer.submodules.mlp.submodules.shared_experts
    moe = get_moe_module_spec(use_te=False, num_experts=4)
    assert with_moesys_experts(moe).submodules.experts.module is MoesysExperts
    with pytest.raises(ValueError, match="neither a MoE spec"):
        with_moesys_experts(get_gpt_layer_local_spec())


def test_refuses_configs_it_does_not_reproduce():
    from moesys.integrations.megatron import MoesysExperts
    with pytest.raises(ValueError, match="add_bias_linear"):
        MoesysExperts(L, _config(add_bias_linear=True))
    with pytest.raises(ValueError, match="gated_linear_unit=True"):
        MoesysExperts(L, _config(activation_func=F.gelu))
    with pytest.raises(ValueError, match="expert_tensor_parallel_size"):
        MoesysExperts(L, _config(expert_tensor_parallel_size=2))


def test_router_gating_runs_without_transformer_engine():
    """Megatron-core 0.16.1's router gating linear raises NameError without Transformer Engine (it tests
    an unbound te_general_gemm); define_missing_te_gemm binds it, and the gating equals x @ W^T."""
    from megatron.core.transformer.moe import moe_utils

    from moesys.integrations.megatron import define_missing_te_gemm
    define_missing_te_gemm()
    x, w = torch.randn(5, 8, dtype=torch.float64).float(), torch.randn(3, 8)
    got = moe_utils.router_gating_linear(x, w, None, torch.float32)
    torch.testing.assert_close(got, x @ w.T)
    assert define_missing_te_gemm() is False  # bound once; a TE install's own gemm is never replaced


# ---- the whole MoELayer (GPU only: Megatron's router moves its weight to CUDA) --------------------

def _layer_cases(rank, world):
    from megatron.core import parallel_state
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module

    from moesys.integrations.megatron import define_missing_te_gemm, with_moesys_experts
    define_missing_te_gemm()
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
    try:
        for dispatcher in ("alltoall", "allgather"):
            config = _config(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type=dispatcher,
                             params_dtype=torch.float32)
            spec = get_moe_module_spec(use_te=False, num_experts=4, moe_grouped_gemm=False)
            theirs = build_module(spec, config=config).cuda()
            ours = build_module(with_moesys_experts(spec, backend="grouped_mm"), config=config).cuda()
            sd = theirs.state_dict()
            ours.router.load_state_dict({k[len("router."):]: v for k, v in sd.items() if k.startswith("router.")})
            ours.experts.load_megatron_state_dict({k[len("experts."):]: v for k, v in sd.items() if k.startswith("experts.")})
            x = torch.randn(11, 2, H, device="cuda")
            g = torch.randn(11, 2, H, device="cuda")
            outs = []
            for layer in (theirs, ours):
                xi = x.clone().requires_grad_(True)
                y, _ = layer(xi)
                (y * g).sum().backward()
                outs.append((y.detach(), xi.grad, layer.router.weight.grad))
            for name, a, b in zip(("output", "x grad", "router grad"), outs[1], outs[0]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{dispatcher}: {name}\n{m}")
    finally:
        parallel_state.destroy_model_parallel()


def _nccl_entry(rank, port):
    import torch.distributed as dist
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        _layer_cases(0, 1)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Megatron-core's MoELayer router needs CUDA")
def test_moe_layer_with_moesys_experts_matches_sequential_mlp_gpu():
    import torch.multiprocessing as mp

    from moesys.parallel.testing import free_port
    mp.spawn(_nccl_entry, args=(free_port(),), nprocs=1, join=True)

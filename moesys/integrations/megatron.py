"""moesys experts inside Megatron-core's MoELayer, through its module spec (the `experts` submodule).

    from moesys.integrations.megatron import with_moesys_experts
    spec = with_moesys_experts(get_gpt_layer_local_spec(num_experts=8))   # or a MoE ModuleSpec

Megatron-core keeps its router and token dispatcher (allgather / alltoall / flex, expert
parallelism included); `MoesysExperts` takes the place of SequentialMLP / GroupedMLP /
TEGroupedMLP: same constructor call (num_local_experts, config, submodules=..., pg_collection=...)
and forward contract (tokens sorted by local expert, tokens_per_expert, permuted_probs) ->
(output, None), and runs the local experts with `moe_mlp` (moesys's Triton / grouped GEMM backends).
The probabilities scale the expert output, as Megatron's experts apply them before the bias-free
second projection. `load_megatron_state_dict` takes a SequentialMLP or (legacy) GroupedMLP state dict.

Supported configs: gated SiLU (SwiGLU) or non-gated GELU / ReLU experts, no bias, expert tensor
parallel size 1, no fp8/fp4, no latent projection; anything else is refused with a ValueError.
Importing this module imports megatron.core (the optional extra `moesys[megatron]`).

Legend: N rows (tokens x top-k, sorted by local expert), H hidden, I expert intermediate, L local experts.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

from moesys.layers.experts import Experts

__all__ = ["MoesysExperts", "define_missing_te_gemm", "moesys_experts_spec", "with_moesys_experts"]


def _activation(config) -> str:
    gated, fn = config.gated_linear_unit, config.activation_func
    names = {(True, F.silu): "silu", (False, F.gelu): "gelu", (False, F.relu): "relu"}
    if (gated, fn) not in names:
        raise ValueError(f"MoesysExperts: activation_func={getattr(fn, '__name__', fn)} with "
                         f"gated_linear_unit={gated} is not supported; use F.silu gated (SwiGLU), or F.gelu / F.relu "
                         "not gated")
    if getattr(config, "glu_linear_offset", 0.0) or getattr(config, "activation_func_clamp_value", None) is not None:
        raise ValueError("MoesysExperts: glu_linear_offset / activation_func_clamp_value change the activation; "
                         "moesys's expert op does not apply them")
    return names[(gated, fn)]


def _check_config(config, pg_collection) -> None:
    if config.add_bias_linear:
        raise ValueError("MoesysExperts: add_bias_linear=True: Megatron scales the expert output by the router "
                         "probability but not the second bias; moesys scales both. Set add_bias_linear=False")
    if getattr(config, "fp8", None) or getattr(config, "fp4", None):
        raise ValueError("MoesysExperts: fp8/fp4 training is not supported by moesys's experts; use bf16")
    if getattr(config, "moe_latent_size", None) is not None:
        raise ValueError("MoesysExperts: moe_latent_size (latent expert projections) is not supported")
    tp = pg_collection.expt_tp.size() if pg_collection is not None and getattr(pg_collection, "expt_tp", None) else 1
    if tp != 1 or getattr(config, "expert_tensor_parallel_size", 1) not in (None, 1):
        raise ValueError(f"MoesysExperts: expert tensor parallelism ({tp} ranks) is not supported; set "
                         "expert_tensor_parallel_size=1 (expert parallelism through the dispatcher is fine)")


class MoesysExperts(MegatronModule):
    """Megatron-core's experts contract on moesys's expert op; parameters experts.gate_up_proj
    [L, 2I, H] (gate rows first) and experts.down_proj [L, H, I] (moesys's `Experts` layout)."""

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None, backend: str = "auto"):
        super().__init__(config=config)
        _check_config(config, pg_collection)
        self.num_local_experts = num_local_experts
        self.experts = Experts(num_local_experts, config.hidden_size, config.moe_ffn_hidden_size,
                               activation=_activation(config), backend=backend).to(config.params_dtype)
        if config.perform_initialization:
            with torch.no_grad():
                for e in range(num_local_experts):  # per expert, as each Megatron expert initialises its Linear
                    config.init_method(self.experts.gate_up_proj[e])
                    config.output_layer_init_method(self.experts.down_proj[e])
        ep = pg_collection.ep.size() if pg_collection is not None and getattr(pg_collection, "ep", None) else 1
        for p in self.experts.parameters():
            # Megatron's DDP reduces `allreduce=False` parameters over the expert-data-parallel group only.
            p.allreduce = ep == 1

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        x_NH, probs_N = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:  # Megatron's rule: scale the input, then weight 1
            x_NH = (probs_N.unsqueeze(-1) * x_NH).to(x_NH.dtype)
            probs_N = torch.ones_like(probs_N)
        counts_L = torch.as_tensor(tokens_per_expert, device=x_NH.device)
        ids_N = torch.repeat_interleave(torch.arange(self.num_local_experts, device=x_NH.device), counts_L,
                                        output_size=x_NH.shape[0])
        return self.experts(x_NH, ids_N.unsqueeze(1), probs_N.unsqueeze(1)), None

    @torch.no_grad()
    def load_megatron_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy the weights of a SequentialMLP (`local_experts.{i}.linear_fc{1,2}.weight`) or legacy
        GroupedMLP (`weight1` [H, L*F], `weight2` [L*I, H]) state dict of the same local experts."""
        L, H = self.num_local_experts, self.config.hidden_size
        up_LFH, down_LHI = self.experts.gate_up_proj, self.experts.down_proj
        if "weight1" in state_dict:
            up = state_dict["weight1"].view(L, H, -1).transpose(1, 2)
            down = state_dict["weight2"].view(L, -1, H).transpose(1, 2)
        else:
            keys = [f"local_experts.{i}.linear_fc{j}.weight" for i in range(L) for j in (1, 2)]
            missing = [k for k in keys if k not in state_dict]
            if missing:
                raise ValueError(f"MoesysExperts: not a SequentialMLP / GroupedMLP state dict of {L} experts; "
                                 f"missing {missing[:3]} (keys: {sorted(state_dict)[:4]}...)")
            up = torch.stack([state_dict[f"local_experts.{i}.linear_fc1.weight"] for i in range(L)])
            down = torch.stack([state_dict[f"local_experts.{i}.linear_fc2.weight"] for i in range(L)])
        for name, dst, src in (("fc1", up_LFH, up), ("fc2", down_LHI, down)):
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"MoesysExperts: {name} weights have shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(src)


def moesys_experts_spec(backend: str = "auto") -> ModuleSpec:
    """The `experts` submodule spec for Megatron-core's MoELayer."""
    return ModuleSpec(module=MoesysExperts, params={"backend": backend})


def with_moesys_experts(spec: ModuleSpec, backend: str = "auto") -> ModuleSpec:
    """A copy of a MoE ModuleSpec (MoESubmodules) or of a layer spec containing one (for example
    `get_gpt_layer_local_spec(num_experts=...)`, whose `mlp` is the MoE spec) with moesys experts."""
    out = copy.deepcopy(spec)
    target = out
    if not hasattr(getattr(target, "submodules", None), "experts"):
        target = getattr(getattr(out, "submodules", None), "mlp", None)
    if not hasattr(getattr(target, "submodules", None), "experts"):
        raise ValueError(f"with_moesys_experts: {spec!r} is neither a MoE spec (submodules.experts) nor a layer spec "
                         "whose submodules.mlp is one; build the spec with num_experts set")
    target.submodules.experts = moesys_experts_spec(backend)
    return out


def define_missing_te_gemm() -> bool:
    """Let Megatron-core's router run without Transformer Engine. In megatron-core 0.16.1 the router's
    gating linear (moe_utils.RouterGatingLinearFunction) tests `te_general_gemm is not None`, a name that
    moe_utils binds only when Transformer Engine imports, so without TE every MoELayer forward raises
    NameError before any expert runs. Binding the name to None selects Megatron's own torch.mm path.
    Nothing calls this implicitly (no patching on import); returns whether the name had to be bound."""
    from megatron.core.transformer.moe import moe_utils
    if hasattr(moe_utils, "te_general_gemm"):
        return False
    moe_utils.te_general_gemm = None
    return True


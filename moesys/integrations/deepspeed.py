"""`moesys.integrations.deepspeed.MoE`: a drop-in for `deepspeed.moe.layer.MoE` on moesys's kernels.

    from moesys.integrations.deepspeed import MoE     # was: from deepspeed.moe.layer import MoE
    moe = MoE(hidden_size, expert, num_experts=8, ep_size=2, k=2)
    output, l_aux, exp_counts = moe(hidden_states)

Same constructor arguments, call and returns as DeepSpeed's layer; DeepSpeed's gate rules are
reproduced exactly (`deepspeed_gate`), the experts run as moesys fused experts through `moe_mlp`
(its Triton / grouped GEMM backends) and, with ep_size > 1, moesys's expert-parallel dispatch
(`ExpertParallelExperts`: variable-size all-to-all, no [E, C, H] padding) over DeepSpeed's own
expert-parallel process groups. It is a subclass of DeepSpeed's MoE so `deepspeed.initialize` sees an
MoE layer (expert groups, expert gradient reduction, MoE optimizer groups); expert parameters carry
DeepSpeed's `allreduce=False` / `group_name` marks.

The expert is an `nn.Sequential(nn.Linear(H, I), nn.ReLU() | nn.GELU(), nn.Linear(I, H))` (what
DeepSpeed's examples pass), a moesys `DenseMLP` (gated SiLU and others), or sizes (`expert=None,
ffn_size=I, activation=...`). Like DeepSpeed, every expert starts as a copy of `expert`.
Arguments whose behaviour moesys does not reproduce are refused with a ValueError.

State dicts use DeepSpeed's keys (`deepspeed_moe.gate.wg.weight`,
`deepspeed_moe.experts.deepspeed_experts.{i}.<expert's names>`, one entry per local expert, views of
the fused tensors), so `engine.save_checkpoint` / `load_checkpoint` split and merge experts as for
DeepSpeed's layer, and a DeepSpeed MoE checkpoint loads with `load_state_dict`.

Importing this module imports DeepSpeed (the optional extra `moesys[deepspeed]`).

Legend: T tokens, H hidden, I expert intermediate, E experts, L local experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import deepspeed.moe.layer as ds_layer
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.utils import groups

from moesys.activations import ACTIVATIONS
from moesys.integrations.deepspeed_gate import DeepSpeedGate
from moesys.layers.experts import DenseMLP, Experts
from moesys.parallel.ep import ExpertParallelExperts
from moesys.parallel.mesh import DEFAULT_TIMEOUT_S, EPMesh

__all__ = ["MoE", "expert_mesh"]

_EXPERT_TENSORS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")
_DS_GATE = "deepspeed_moe.gate.wg.weight"
_DS_EXPERTS = "deepspeed_moe.experts.deepspeed_experts."


@dataclass
class _ExpertLayout:
    """How one expert module maps onto fused expert tensors: activation, sizes, submodule names."""
    activation: str
    ffn_size: int
    bias: bool
    up: str                   # submodule holding the [gate; up] (or up) projection, e.g. "0"
    down: str                 # submodule holding the down projection, e.g. "2"


_ACTIVATION_MODULES = {nn.ReLU: "relu"}


def _expert_layout(expert, hidden_size: int, ffn_size, activation: str) -> _ExpertLayout:
    if expert is None:
        if not isinstance(ffn_size, int) or ffn_size < 1:
            raise ValueError(f"deepspeed MoE: expert=None needs ffn_size=<int >= 1>, got {ffn_size!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"deepspeed MoE: activation={activation!r}; use one of {sorted(ACTIVATIONS)}")
        return _ExpertLayout(activation, ffn_size, False, "gate_up_proj", "down_proj")  # DenseMLP's names
    if ffn_size is not None:
        raise ValueError("deepspeed MoE: pass either an expert module or ffn_size=, not both")
    if isinstance(expert, DenseMLP):
        up, down = expert.gate_up_proj, expert.down_proj
        layout = _ExpertLayout(expert.activation, down.in_features, up.bias is not None, "gate_up_proj", "down_proj")
    elif isinstance(expert, nn.Sequential) and len(expert) == 3 and isinstance(expert[0], nn.Linear) \
            and isinstance(expert[2], nn.Linear) and _activation_name(expert[1]) is not None:
        up, down = expert[0], expert[2]
        layout = _ExpertLayout(_activation_name(expert[1]), up.out_features, up.bias is not None, "0", "2")
    else:
        raise TypeError(f"deepspeed MoE: moesys runs experts of the form nn.Sequential(nn.Linear(H, I), "
                        f"nn.ReLU() or nn.GELU(), nn.Linear(I, H)) or moesys.layers.experts.DenseMLP, or "
                        f"expert=None with ffn_size=; got {expert.__class__.__name__}: {expert}")
    if up.in_features != hidden_size or down.out_features != hidden_size:
        raise ValueError(f"deepspeed MoE: the expert maps {up.in_features} -> {down.out_features} features "
                         f"but hidden_size={hidden_size}")
    if (down.bias is not None) != layout.bias:
        raise ValueError("deepspeed MoE: the expert's two Linear layers must both have a bias or both not")
    return layout


def _activation_name(module: nn.Module) -> str | None:
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else None
    return _ACTIVATION_MODULES.get(type(module))


def expert_mesh(ep_size: int, use_data_before_expert_parallel_: bool = False, who: str = "deepspeed") -> EPMesh:
    """An `EPMesh` over DeepSpeed's expert-parallel and expert-data-parallel groups for `ep_size` (group
    name `ep_size_{ep_size}`, created on first use), checked to be moesys's layout: consecutive ranks
    per expert-parallel group, no model-parallel unit. ValueError, prefixed with `who`, otherwise."""
    if use_data_before_expert_parallel_:
        raise ValueError(f"{who}: use_data_before_expert_parallel_=True lays expert-parallel ranks out strided; "
                         "moesys needs consecutive ranks per expert-parallel group (the default)")
    if groups.mpu is not None:
        raise ValueError(f"{who}: a model-parallel unit (mpu) is set; moesys's experts support data and expert "
                         "parallelism only (no tensor-parallel non-expert layers)")
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    ep_group, edp_group = groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = EPMesh(world, rank, ep_size, rank % ep_size, rank // ep_size, ep_group, edp_group,
                  timedelta(seconds=DEFAULT_TIMEOUT_S))
    ranks = dist.get_process_group_ranks(ep_group)
    if ranks != mesh.ep_ranks():
        raise ValueError(f"{who}: DeepSpeed's expert-parallel group of rank {rank} is {ranks}; moesys expects "
                         f"consecutive ranks {mesh.ep_ranks()}")
    return mesh


class MoE(ds_layer.MoE):
    """deepspeed.moe.layer.MoE's arguments and call; see the module docstring. Extra keyword-only
    arguments: `ffn_size`/`activation` (experts by size), `backend` (moesys expert backend)."""

    def __init__(self, hidden_size: int, expert: nn.Module | None = None, num_experts: int = 1, ep_size: int = 1,
                 k: int = 1, capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 use_residual: bool = False, noisy_gate_policy: str | None = None, drop_tokens: bool = True,
                 use_rts: bool = True, use_tutel: bool = False, enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True, *, ffn_size: int | None = None, activation: str = "silu",
                 backend: str = "auto") -> None:
        nn.Module.__init__(self)  # DeepSpeed's __init__ would build its own gate and experts
        if use_tutel:
            raise ValueError("deepspeed MoE: use_tutel=True selects Tutel's dispatch kernels; moesys dispatches "
                             "with its own, so drop use_tutel")
        if enable_expert_tensor_parallelism:
            raise ValueError("deepspeed MoE: enable_expert_tensor_parallelism=True: moesys does not split experts "
                             "by tensor parallelism; use ep_size for expert parallelism instead")
        if not isinstance(ep_size, int) or ep_size < 1 or num_experts % ep_size:
            raise ValueError(f"deepspeed MoE: ep_size={ep_size!r} must be a positive integer dividing "
                             f"num_experts={num_experts}")
        layout = _expert_layout(expert, hidden_size, ffn_size, activation)
        self.hidden_size, self.num_experts, self.ep_size = hidden_size, num_experts, ep_size
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = f"ep_size_{ep_size}"  # DeepSpeed's name for the group
        self.use_residual, self.enable_expert_tensor_parallelism = use_residual, False
        self.layout = layout
        self.gate = DeepSpeedGate(hidden_size, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                                  noisy_gate_policy, drop_tokens, use_rts, top2_2nd_expert_sampling)
        self.experts = Experts(self.num_local_experts, hidden_size, layout.ffn_size, activation=layout.activation,
                               bias=layout.bias, backend=backend)
        if expert is not None:
            self._copy_expert_into_all(expert)
        for p in self.experts.parameters():
            # What deepspeed.moe.experts.Experts marks: ZeRO and the engine reduce these over the
            # expert-data-parallel group only, and split_params_into_different_moe_groups_for_optimizer finds them.
            p.allreduce, p.group_name = False, self.expert_group_name
        if use_residual:
            self.mlp = expert if expert is not None else DenseMLP(hidden_size, layout.ffn_size, activation=activation)
            self.coefficient = nn.Linear(hidden_size, 2)
        self.register_state_dict_post_hook(_to_deepspeed_keys)
        self.register_load_state_dict_pre_hook(_from_deepspeed_keys)

    def _key_map(self) -> list[tuple[str, str]]:
        """(our tensor, DeepSpeed's per-expert key with {i} for the local expert) for each expert tensor."""
        pairs = [("gate_up_proj", f"{self.layout.up}.weight"), ("down_proj", f"{self.layout.down}.weight")]
        if self.layout.bias:
            pairs += [("gate_up_proj_bias", f"{self.layout.up}.bias"), ("down_proj_bias", f"{self.layout.down}.bias")]
        return [(ours, _DS_EXPERTS + "{i}." + theirs) for ours, theirs in pairs]

    @torch.no_grad()
    def _copy_expert_into_all(self, expert: nn.Module) -> None:
        up, down = expert.get_submodule(self.layout.up), expert.get_submodule(self.layout.down)
        self.experts.gate_up_proj.copy_(up.weight.expand_as(self.experts.gate_up_proj))
        self.experts.down_proj.copy_(down.weight.expand_as(self.experts.down_proj))
        if self.layout.bias:
            self.experts.gate_up_proj_bias.copy_(up.bias.expand_as(self.experts.gate_up_proj_bias))
            self.experts.down_proj_bias.copy_(down.bias.expand_as(self.experts.down_proj_bias))

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by `deepspeed.initialize` (or by hand after `deepspeed.init_distributed`): create or
        reuse DeepSpeed's expert groups and, for ep_size > 1, dispatch over them."""
        mesh = expert_mesh(self.ep_size, use_data_before_expert_parallel_, "deepspeed MoE")
        if self.ep_size > 1 and not isinstance(self.experts, ExpertParallelExperts):
            self._dispatch_over(mesh)

    def _dispatch_over(self, mesh: EPMesh) -> None:
        """Swap the local experts for expert-parallel ones that hold the same Parameter objects (an
        optimizer built before deepspeed.initialize keeps pointing at them)."""
        local = self.experts
        with torch.device("meta"):  # only the layout: the weights are the local ones already built
            full = Experts(self.num_experts, local.hidden_size, local.ffn_size, activation=local.activation,
                           bias=local.gate_up_proj_bias is not None, backend=local.backend)
        # Zero-weight (dropped) assignments are not shipped; their gradient is zero in DeepSpeed too.
        ep_experts = ExpertParallelExperts(full, mesh, layer_name=f"deepspeed MoE ({self.expert_group_name})",
                                           drop_zero_weight=True)
        for name in _EXPERT_TENSORS:
            setattr(ep_experts, name, getattr(local, name))
        self.experts = ep_experts

    def forward(self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None):
        """Returns (output shaped like hidden_states, l_aux, exp_counts [E] int64), as DeepSpeed's MoE."""
        if self.ep_size > 1 and not isinstance(self.experts, ExpertParallelExperts):
            raise RuntimeError(f"deepspeed MoE: ep_size={self.ep_size} needs DeepSpeed's expert groups: run the model "
                               "through deepspeed.initialize, or call set_deepspeed_parallelism() after "
                               "deepspeed.init_distributed()")
        x_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        routed = self.gate(x_TH, None if used_token is None else used_token.reshape(-1))
        output = self.experts(x_TH, routed.topk_ids_TK, routed.topk_weights_TK).view(hidden_states.shape)
        if self.use_residual:
            output_mlp = self.mlp(hidden_states)
            if isinstance(output_mlp, tuple):
                output_mlp = output_mlp[0]
            coef = F.softmax(self.coefficient(hidden_states), dim=-1)
            output = output * coef[..., 0:1] + output_mlp * coef[..., 1:]
        return output, routed.l_aux, routed.exp_counts_E


def _to_deepspeed_keys(module: MoE, state_dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: our keys -> DeepSpeed's (one view per local expert)."""
    state_dict[prefix + _DS_GATE] = state_dict.pop(prefix + "gate.wg.weight")
    for ours, theirs in module._key_map():
        fused = state_dict.pop(prefix + "experts." + ours)
        for i in range(fused.shape[0]):
            state_dict[prefix + theirs.format(i=i)] = fused[i]


def _from_deepspeed_keys(module: MoE, state_dict, prefix: str, local_metadata, strict, missing_keys,
                         unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: DeepSpeed's keys -> ours (stacking the local experts); a state dict
    without them is left alone (load_state_dict then names what is missing)."""
    if prefix + _DS_GATE in state_dict:
        state_dict[prefix + "gate.wg.weight"] = state_dict.pop(prefix + _DS_GATE)
    for ours, theirs in module._key_map():
        keys = [prefix + theirs.format(i=i) for i in range(module.num_local_experts)]
        present = [k in state_dict for k in keys]
        if all(present):
            state_dict[prefix + "experts." + ours] = torch.stack([state_dict.pop(k) for k in keys])
        elif any(present):
            error_msgs.append(f"missing DeepSpeed expert key(s) {[k for k, p in zip(keys, present) if not p]} "
                              f"({module.num_local_experts} local experts expected)")

"""Routed experts as fused 3-D weights (transformers v5's in-memory layout) applied through `moe_mlp`.

Legend: T tokens, H hidden, I expert intermediate, E experts, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moesys.activations import ACTIVATIONS, Activation, apply_activation, is_gated
from moesys.backends import preload
from moesys.ops import moe_mlp


def autocast_expert_inputs(x_TH: torch.Tensor, *tensors):
    """Under autocast, cast the tokens and expert weights (None stays None) to the autocast dtype, as
    autocast casts a matmul's inputs: moe_mlp is not an autocast op, and without this fp32 master
    weights and the fp32 RMSNorm output would run the slow fp32 path. Otherwise unchanged."""
    if not torch.is_autocast_enabled(x_TH.device.type):
        return (x_TH, *tensors)
    dtype = torch.get_autocast_dtype(x_TH.device.type)
    return (x_TH.to(dtype), *(None if t is None else t.to(dtype) for t in tensors))


class Experts(nn.Module):
    """E expert MLPs: gate_up_proj [E, 2I, H] (gate rows first; [E, I, H] for non-gated activations),
    down_proj [E, H, I], optional biases [E, 2I] / [E, H]."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, *, activation: str | Activation = "silu",
                 bias: bool = False, backend: str = "auto", init_std: float = 0.02):
        super().__init__()
        if not isinstance(activation, Activation) and activation not in ACTIVATIONS:
            raise ValueError(f"Experts: activation={activation!r} is not supported; use one of {sorted(ACTIVATIONS)} "
                             "or a moesys.activations.Activation")
        self.num_experts, self.hidden_size, self.ffn_size = num_experts, hidden_size, ffn_size
        self.activation, self.backend = activation, backend
        preload(backend)  # imported now, not while torch.compile traces forward (a graph break there)
        rows = 2 * ffn_size if is_gated(activation) else ffn_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, rows, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, rows)) if bias else None
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size)) if bias else None
        nn.init.normal_(self.gate_up_proj, std=init_std)
        nn.init.normal_(self.down_proj, std=init_std)

    def forward(self, x_TH: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
        x_TH, w_gate_up, w_down, b_gate_up, b_down = autocast_expert_inputs(
            x_TH, self.gate_up_proj, self.down_proj, self.gate_up_proj_bias, self.down_proj_bias)
        return moe_mlp(x_TH, w_gate_up, w_down, topk_ids_TK, topk_weights_TK.to(x_TH.dtype),
                       activation=self.activation, backend=self.backend, b_gate_up=b_gate_up, b_down=b_down)


class DenseMLP(nn.Module):
    """One expert's MLP as a plain module (shared experts and dense layers): the same math as `moe_mlp`."""

    def __init__(self, hidden_size: int, ffn_size: int, *, activation: str = "silu", bias: bool = False):
        super().__init__()
        self.activation = activation
        rows = 2 * ffn_size if is_gated(activation) else ffn_size
        self.gate_up_proj = nn.Linear(hidden_size, rows, bias=bias)
        self.down_proj = nn.Linear(ffn_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(apply_activation(self.gate_up_proj(x), self.activation))

"""MoELayer: router + routed experts + optional shared experts (Qwen2-MoE's sigmoid-gated or DeepSeek's ungated).

Single-device code; expert parallelism and FSSDP rewrite it from outside (`moesys.parallel`).

Legend: T tokens, H hidden, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from moesys.layers.experts import DenseMLP, Experts
from moesys.layers.router import Router


@dataclass
class MoEStats:
    """What one MoE layer reports per forward: losses (unweighted) and load statistics."""
    aux_loss: torch.Tensor
    seq_aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor  # [E] int64, kept assignments
    dropped_fraction: torch.Tensor

    def weighted_loss(self, aux_coef: float, seq_aux_coef: float, z_coef: float) -> torch.Tensor:
        return aux_coef * self.aux_loss + seq_aux_coef * self.seq_aux_loss + z_coef * self.z_loss


class MoELayer(nn.Module):
    """y = sum_k w_k * expert_k(x) [+ gate(x) * shared(x)] for x of shape [..., H]; returns (y, MoEStats).

    `router_kwargs` go to `Router` (score_func, renormalize, n_groups, topk_groups, aux_free_bias,
    bias_update_rate, scale, jitter, capacity_factor)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, ffn_size: int, *,
                 activation: str = "silu", expert_bias: bool = False, shared_ffn_size: int = 0,
                 shared_gate: bool = False, backend: str = "auto", init_std: float = 0.02, **router_kwargs):
        # Built in this order (the random initialisation draws in it), then registered by _adopt.
        router = Router(hidden_size, num_experts, top_k, **router_kwargs)
        experts = Experts(num_experts, hidden_size, ffn_size, activation=activation, bias=expert_bias,
                          backend=backend, init_std=init_std)
        shared_expert = DenseMLP(hidden_size, shared_ffn_size, activation=activation) if shared_ffn_size else None
        shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared_ffn_size and shared_gate else None
        self._adopt(router, experts, shared_expert, shared_expert_gate)

    def _adopt(self, router: Router, experts: nn.Module, shared_expert: nn.Module | None,
               shared_expert_gate: nn.Module | None) -> None:
        """Initialise the module around built parts. Placements (moesys.parallel) build a layer from an
        existing one's router and shared expert and their own experts module, through this same path."""
        nn.Module.__init__(self)
        self.router = router
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        shape = x.shape
        x_TH = x.reshape(-1, shape[-1])
        num_sequences = shape[0] if x.dim() == 3 else 1
        routed = self.router(x_TH, num_sequences=num_sequences)
        y_TH = self.routed_and_shared(x_TH, routed.topk_ids_TK, routed.topk_weights_TK)
        stats = MoEStats(routed.aux_loss, routed.seq_aux_loss, routed.z_loss,
                         routed.tokens_per_expert_E, routed.dropped_fraction)
        return y_TH.view(shape), stats

    def routed_and_shared(self, x_TH: torch.Tensor, topk_ids_TK: torch.Tensor,
                          topk_weights_TK: torch.Tensor) -> torch.Tensor:
        """The routed experts' output plus the shared expert's. Expert parallelism overrides this to run
        the shared expert while the routed tokens travel."""
        y_TH = self.experts(x_TH, topk_ids_TK, topk_weights_TK)
        if self.shared_expert is not None:
            y_TH = y_TH + self.shared(x_TH)
        return y_TH

    def shared(self, x_TH: torch.Tensor) -> torch.Tensor:
        """The shared expert's output, sigmoid-gated when the layer has a gate (Qwen2-MoE)."""
        shared_TH = self.shared_expert(x_TH)
        if self.shared_expert_gate is not None:
            shared_TH = torch.sigmoid(self.shared_expert_gate(x_TH)) * shared_TH
        return shared_TH

"""Top-k router: one class for the routers people train today, chosen by configuration.

- softmax scores then top-k, renormalised (Mixtral, Qwen3) or not (Qwen2-MoE, OLMoE);
- sigmoid scores with DeepSeek-V3's aux-loss-free per-expert bias: the bias shifts only the
  *selection*, the combine weights stay the unbiased scores, and the bias is updated from observed
  load outside autograd (`update_bias`);
- optional group-limited top-k (DeepSeek): experts in `n_groups` groups, only the best `topk_groups`
  groups may be chosen;
- Switch load-balancing loss per micro-batch and per sequence, router z-loss, optional jitter;
- capacity: dropless by default; a capacity factor drops each expert's lowest-scored assignments.

The gate runs in fp32 whatever the input dtype (small logit differences decide the routing).

Legend: T tokens, H hidden, E experts, K top-k, N = T*K assignments, B sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SCORE_FUNCS = ("softmax", "sigmoid")


@dataclass
class RouterOutput:
    topk_ids_TK: torch.Tensor        # int64 expert ids
    topk_weights_TK: torch.Tensor    # fp32 combine weights (0 where an assignment was dropped)
    logits_TE: torch.Tensor          # fp32 router logits
    tokens_per_expert_E: torch.Tensor  # kept assignments per expert (int64)
    aux_loss: torch.Tensor           # Switch load-balancing loss over the micro-batch (1.0 when balanced)
    seq_aux_loss: torch.Tensor       # the same loss per sequence, averaged over sequences
    z_loss: torch.Tensor             # mean(logsumexp(logits)^2)
    dropped_fraction: torch.Tensor   # fraction of the T*K assignments dropped by capacity


class Router(nn.Module):
    """Scores tokens against experts and picks the top-k.

    Args:
        hidden_size, num_experts, top_k: sizes.
        score_func: "softmax" or "sigmoid".
        renormalize: divide the top-k weights by their sum (always sensible for sigmoid).
        n_groups, topk_groups: group-limited routing (both 1/None = off).
        aux_free_bias: keep a per-expert selection bias updated by `update_bias` (DeepSeek-V3).
        bias_update_rate: the bias step per update (DeepSeek-V3 uses 1e-3).
        scale: multiply the combine weights (DeepSeek's routed_scaling_factor).
        jitter: multiplicative input noise in [1-jitter, 1+jitter] during training (Switch).
        capacity_factor: None = dropless; else each expert keeps ceil(cf * T * K / E) assignments.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, score_func: str = "softmax",
                 renormalize: bool = True, n_groups: int = 1, topk_groups: int | None = None,
                 aux_free_bias: bool = False, bias_update_rate: float = 1e-3, scale: float = 1.0,
                 jitter: float = 0.0, capacity_factor: float | None = None):
        super().__init__()
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"Router: score_func={score_func!r} is not supported; use one of {SCORE_FUNCS}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"Router: top_k={top_k} must be between 1 and num_experts={num_experts}")
        if n_groups < 1 or num_experts % n_groups:
            raise ValueError(f"Router: n_groups={n_groups} must be >= 1 and divide num_experts={num_experts}")
        topk_groups = n_groups if topk_groups is None else topk_groups
        if not 1 <= topk_groups <= n_groups:
            raise ValueError(f"Router: topk_groups={topk_groups} must be between 1 and n_groups={n_groups}")
        if topk_groups * (num_experts // n_groups) < top_k:
            raise ValueError(f"Router: topk_groups={topk_groups} groups of {num_experts // n_groups} experts "
                             f"hold fewer than top_k={top_k} experts; raise topk_groups")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"Router: capacity_factor={capacity_factor} must be > 0, or None for dropless")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"Router: jitter={jitter} must be in [0, 1)")
        if not 0.0 < scale < math.inf:  # 0 would silently zero the layer's output, < 0 flip its sign
            raise ValueError(f"Router: scale={scale} must be a finite number > 0 (DeepSeek's routed_scaling_factor; "
                             "1.0 for no scaling)")
        if not 0.0 <= bias_update_rate < math.inf:
            raise ValueError(f"Router: bias_update_rate={bias_update_rate} must be a finite number >= 0")
        self.num_experts, self.top_k = num_experts, top_k
        self.score_func, self.renormalize, self.scale = score_func, renormalize, scale
        self.n_groups, self.topk_groups = n_groups, topk_groups
        self.aux_free_bias, self.bias_update_rate = aux_free_bias, bias_update_rate
        self.jitter, self.capacity_factor = jitter, capacity_factor
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=hidden_size ** -0.5)
        # The selection bias is state, not a parameter: the optimizer must never touch it.
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=aux_free_bias)
        # Load observed since the last update_bias() (training only), summed over micro-batches.
        self.register_buffer("load_since_update", torch.zeros(num_experts), persistent=False)

    def forward(self, x_TH: torch.Tensor, num_sequences: int = 1) -> RouterOutput:
        T = x_TH.shape[0]
        x32_TH = x_TH.float()
        if self.training and self.jitter > 0:
            x32_TH = x32_TH * torch.empty_like(x32_TH).uniform_(1 - self.jitter, 1 + self.jitter)
        logits_TE = F.linear(x32_TH, self.weight.float())
        if self.score_func == "softmax":
            scores_TE = logits_TE.softmax(-1)
        else:
            scores_TE = logits_TE.sigmoid()
        select_TE = scores_TE.detach()
        if self.aux_free_bias:
            select_TE = select_TE + self.expert_bias
        if self.topk_groups < self.n_groups:
            select_TE = self._limit_groups(select_TE)
        topk_ids_TK = select_TE.topk(self.top_k, dim=-1).indices
        topk_weights_TK = scores_TE.gather(1, topk_ids_TK)
        if self.renormalize:
            topk_weights_TK = topk_weights_TK / topk_weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        topk_weights_TK = topk_weights_TK * self.scale

        keep_TK = None
        if self.capacity_factor is not None:
            keep_TK = self._capacity_mask(topk_ids_TK, topk_weights_TK.detach(), T)
            topk_weights_TK = topk_weights_TK * keep_TK
        # Kept assignments per expert as a compare-and-sum (a reduction), not a scatter_add whose T*K
        # atomic adds contend on E counters.
        hits_NE = topk_ids_TK.reshape(-1, 1) == torch.arange(self.num_experts, device=x_TH.device)
        if keep_TK is not None:
            hits_NE = hits_NE & keep_TK.reshape(-1, 1)
        tokens_per_expert_E = hits_NE.sum(0)
        if self.training and self.aux_free_bias:
            self.load_since_update += tokens_per_expert_E.float()

        aux_loss = self._balance_loss(scores_TE, topk_ids_TK, 1)
        seq_aux_loss = self._balance_loss(scores_TE, topk_ids_TK, num_sequences)
        z_loss = torch.logsumexp(logits_TE, -1).square().mean() if T else logits_TE.sum()
        dropped = (1.0 - keep_TK.float().mean()) if keep_TK is not None and T else x_TH.new_zeros((), dtype=torch.float32)
        return RouterOutput(topk_ids_TK, topk_weights_TK, logits_TE, tokens_per_expert_E,
                            aux_loss, seq_aux_loss, z_loss, dropped)

    def _limit_groups(self, select_TE: torch.Tensor) -> torch.Tensor:
        T, E = select_TE.shape
        grouped_TGe = select_TE.view(T, self.n_groups, E // self.n_groups)
        if self.score_func == "sigmoid" and E // self.n_groups >= 2:
            group_score_TG = grouped_TGe.topk(2, dim=-1).values.sum(-1)  # DeepSeek-V3: sum of the top-2
        else:
            group_score_TG = grouped_TGe.amax(-1)                         # DeepSeek-V2: the best expert
        best_TG = group_score_TG.topk(self.topk_groups, dim=-1).indices
        allowed_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_TG, True)
        allowed_TE = allowed_TG.unsqueeze(-1).expand_as(grouped_TGe).reshape(T, E)
        return select_TE.masked_fill(~allowed_TE, float("-inf"))

    def capacity(self, num_tokens: int) -> int:
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def _capacity_mask(self, topk_ids_TK, topk_weights_TK, T) -> torch.Tensor:
        """Keep each expert's `capacity` highest-weighted assignments; ties go to the earlier token."""
        return keep_top_per_expert(topk_ids_TK, topk_weights_TK, self.num_experts, self.capacity(T))

    def _balance_loss(self, scores_TE, topk_ids_TK, num_sequences: int) -> torch.Tensor:
        """Switch loss E * sum_e f_e * P_e, averaged over `num_sequences` equal chunks of the tokens.

        f_e: fraction of the chunk's T*K assignments routed to e (before capacity dropping);
        P_e: mean over the chunk's tokens of e's score (sigmoid scores normalised per token first,
        as DeepSeek-V3's sequence-wise loss does). Equals 1 under perfectly balanced routing."""
        T, E = scores_TE.shape
        if T == 0:
            return scores_TE.sum()
        if T % num_sequences:
            raise ValueError(f"Router: {T} tokens do not split into {num_sequences} sequences of equal length")
        probs_TE = scores_TE if self.score_func == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
        probs_BSE = probs_TE.view(num_sequences, T // num_sequences, E)
        onehot_BSE = torch.zeros_like(probs_TE).scatter_add_(
            1, topk_ids_TK, torch.ones_like(topk_ids_TK, dtype=probs_TE.dtype)).view_as(probs_BSE)
        f_BE = onehot_BSE.mean(1) / self.top_k
        p_BE = probs_BSE.mean(1)
        return (E * (f_BE * p_BE).sum(-1)).mean()

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor | None = None) -> None:
        """DeepSeek-V3's aux-loss-free update: raise the bias of under-loaded experts, lower the
        over-loaded ones, by `bias_update_rate`. `load_E` defaults to the load observed in training
        forwards since the last update (sum it over data-parallel ranks before calling, if any)."""
        if not self.aux_free_bias:
            return
        load_E = self.load_since_update if load_E is None else load_E.float()
        aux_free_bias_step(self.expert_bias, load_E, self.bias_update_rate)
        self.load_since_update.zero_()


def keep_top_per_expert(topk_ids_TK: torch.Tensor, score_TK: torch.Tensor, num_experts: int,
                        capacity: int) -> torch.Tensor:
    """Bool [T, K]: for each expert, its `capacity` assignments with the highest score are kept; among
    equal scores the earlier assignment (row-major in [T, K]) wins. Capacity rules differ only in the score."""
    ids_N = topk_ids_TK.reshape(-1)
    score_N = score_TK.reshape(-1)
    by_score_N = torch.sort(score_N, descending=True, stable=True).indices
    order_N = by_score_N[torch.sort(ids_N[by_score_N], stable=True).indices]  # by expert, then score
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=ids_N.device)
    counts_E.scatter_add_(0, ids_N, torch.ones_like(ids_N))
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_N = torch.arange(ids_N.numel(), device=ids_N.device) - starts_E[ids_N[order_N]]
    keep_N = torch.empty_like(ids_N, dtype=torch.bool)
    keep_N[order_N] = rank_N < capacity
    return keep_N.view_as(topk_ids_TK)


@torch.no_grad()
def aux_free_bias_step(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's aux-loss-free bias step, in place: +rate for experts below the mean load, -rate above."""
    # No update without load; chosen on the device, since a Python `if` would sync every layer and step.
    sign_E = torch.where(load_E.sum() > 0, torch.sign(load_E.mean() - load_E), 0.0)
    bias_E += rate * sign_E.to(bias_E.dtype)

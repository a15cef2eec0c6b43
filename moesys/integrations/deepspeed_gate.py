"""DeepSpeed's MoE gate rules (deepspeed/moe/sharded_moe.py: top1gating, top2gating, topkgating) as
routing for moesys's expert op: same selection, capacity, drop order, combine weights, aux loss and
expert counts, expressed as top-k ids and weights instead of GShard's [T, E, C] dispatch tensors.

Plain torch, no DeepSpeed import: `moesys.integrations.deepspeed.MoE` uses it inside DeepSpeed jobs.

What each k does (DeepSpeed's behaviour, reproduced):
- k=1: the softmax's argmax (during training with noisy_gate_policy="RSample": argmax of logits plus
  Gumbel noise); weight = the unnormalised probability; capacity max(ceil(T/E * cf), min_capacity);
  with use_rts, an expert over capacity keeps a uniformly random subset (Random Token Selection).
- k=2: first choice = argmax; second = argmax of the other logits, plus Gumbel noise when
  top2_2nd_expert_sampling (in eval too, as DeepSpeed does); capacity max(ceil(T/E * 2cf), min_capacity)
  filled by all first choices in token order, then the second choices in token order; the two
  weights are renormalised over the kept ones.
- k>2: top-k of the softmax; capacity max(ceil(T/E * k cf), min_capacity) keeps each expert's
  highest-probability assignments; weights renormalised over the kept ones.
- drop_tokens=False: nothing is dropped (DeepSpeed's capacity then equals the largest expert load).
The random draws (uniform for RTS and Jitter, Gumbel) are the same torch calls in the same order, so
under the same RNG state the routing equals DeepSpeed's draw for draw.

Legend: T tokens, H hidden, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moesys.layers.router import keep_top_per_expert

NOISY_GATE_POLICIES = (None, "None", "Jitter", "RSample")


@dataclass
class GateOutput:
    topk_ids_TK: torch.Tensor      # int64 expert ids
    topk_weights_TK: torch.Tensor  # fp32 combine weights, 0 where an assignment was dropped
    kept_TK: torch.Tensor          # bool: the assignment fits its expert's capacity
    l_aux: torch.Tensor            # DeepSpeed's load-balancing loss
    exp_counts_E: torch.Tensor     # int64 assignments per expert before capacity (DeepSpeed's exp_counts)


def check_gate_args(num_experts: int, k: int, capacity_factor: float, eval_capacity_factor: float,
                    min_capacity: int, noisy_gate_policy, drop_tokens: bool, use_rts: bool) -> None:
    """ValueError for a gate configuration DeepSpeed rejects, or one whose result moesys cannot reproduce."""
    if not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"deepspeed MoE: k={k!r} must be an integer between 1 and num_experts={num_experts}")
    for name, cf in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
        if drop_tokens and not cf > 0:
            raise ValueError(f"deepspeed MoE: {name}={cf!r} must be > 0 when drop_tokens=True")
    if not isinstance(min_capacity, int) or min_capacity < 0:
        raise ValueError(f"deepspeed MoE: min_capacity={min_capacity!r} must be an integer >= 0")
    if noisy_gate_policy not in NOISY_GATE_POLICIES:
        raise ValueError(f"deepspeed MoE: noisy_gate_policy={noisy_gate_policy!r}; use one of {NOISY_GATE_POLICIES}")
    if noisy_gate_policy == "RSample" and k != 1:
        raise ValueError(f"deepspeed MoE: noisy_gate_policy='RSample' with k={k}: DeepSpeed applies RSample to "
                         "k=1 only and ignores it otherwise; use k=1, or noisy_gate_policy=None or 'Jitter'")
    if k == 1 and drop_tokens and not use_rts:
        raise ValueError("deepspeed MoE: k=1 with drop_tokens=True and use_rts=False: DeepSpeed then keeps an "
                         "unspecified subset of an over-full expert's tokens (torch.topk over tied 0/1 scores), "
                         "which moesys cannot reproduce; use use_rts=True or drop_tokens=False")


def _capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    # DeepSpeed's _capacity computes (T / E) * cf in fp32 before the ceil; the same ops give the same integer.
    capacity = torch.ceil((num_tokens / num_experts) * torch.tensor(capacity_factor)).to(torch.int64)
    return max(int(capacity), min_capacity)


class DeepSpeedGate(nn.Module):
    """DeepSpeed's TopKGate rules; the parameter keeps its name and layout (wg.weight [E, H])."""

    def __init__(self, hidden_size: int, num_experts: int, k: int = 1, capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0, min_capacity: int = 4, noisy_gate_policy: str | None = None,
                 drop_tokens: bool = True, use_rts: bool = True, top2_2nd_expert_sampling: bool = True):
        super().__init__()
        check_gate_args(num_experts, k, capacity_factor, eval_capacity_factor, min_capacity, noisy_gate_policy,
                        drop_tokens, use_rts)
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)
        self.num_experts, self.k = num_experts, k
        self.capacity_factor, self.eval_capacity_factor, self.min_capacity = capacity_factor, eval_capacity_factor, min_capacity
        self.noisy_gate_policy, self.drop_tokens, self.use_rts = noisy_gate_policy, drop_tokens, use_rts
        self.top2_2nd_expert_sampling = top2_2nd_expert_sampling

    def forward(self, x_TH: torch.Tensor, used_token_T: torch.Tensor | None = None) -> GateOutput:
        T, E = x_TH.shape[0], self.num_experts
        x32_TH = x_TH.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            eps = 1e-2  # DeepSpeed's multiplicative_jitter default
            x32_TH = x32_TH * torch.distributions.Uniform(x32_TH.new_tensor(1.0 - eps),
                                                          x32_TH.new_tensor(1.0 + eps)).rsample(x32_TH.shape)
        logits_TE = F.linear(x32_TH, self.wg.weight.float())
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        if used_token_T is not None and self.k != 1:
            raise ValueError(f"deepspeed MoE: used_token with k={self.k}: DeepSpeed honours it for k=1 only "
                             "(and ignores it otherwise); pass used_token=None")
        if self.k == 1:
            return self._top1(logits_TE, cf, used_token_T)
        gates_TE = logits_TE.softmax(-1)
        if self.k == 2:
            ids_TK = self._top2_ids(logits_TE, gates_TE)
            # First choices fill an expert before any second choice, each in token order.
            score_TK = torch.tensor([1.0, 0.0], device=ids_TK.device).expand(T, 2)
        else:
            score_TK, ids_TK = gates_TE.detach().topk(self.k, dim=-1)
        onehot_TE = torch.zeros_like(gates_TE).scatter_(1, ids_TK, 1.0)
        exp_counts_E = onehot_TE.sum(0).to(torch.int64)
        # DeepSpeed's expressions, term for term: top2 averages over first choices only, top-k over all.
        if self.k == 2:
            first_TE = torch.zeros_like(gates_TE).scatter_(1, ids_TK[:, :1], 1.0)
            l_aux = torch.mean(gates_TE.mean(0) * first_TE.mean(0)) * E * E
        else:
            l_aux = torch.mean(gates_TE.mean(0) * onehot_TE.mean(0)) * E * E / self.k
        kept_TK = self._kept(ids_TK, score_TK, T, cf * self.k)
        p_TK = gates_TE.gather(1, ids_TK) * kept_TK
        # The denominator summed over all E columns in expert order, as DeepSpeed sums it (the same bits).
        kept_TE = torch.zeros_like(gates_TE).scatter_(1, ids_TK, kept_TK.to(gates_TE.dtype))
        denom_T1 = (gates_TE * kept_TE).sum(-1, keepdim=True)
        weights_TK = p_TK / denom_T1.clamp(min=torch.finfo(p_TK.dtype).eps)
        return GateOutput(ids_TK, weights_TK, kept_TK, l_aux, exp_counts_E)

    def _top2_ids(self, logits_TE: torch.Tensor, gates_TE: torch.Tensor) -> torch.Tensor:
        first_T = gates_TE.argmax(-1)
        if self.top2_2nd_expert_sampling:
            logits_TE = logits_TE + _gumbel(logits_TE)
        second_T = logits_TE.masked_fill(F.one_hot(first_T, self.num_experts).bool(), float("-inf")).argmax(-1)
        return torch.stack([first_T, second_T], 1)

    def _top1(self, logits_TE: torch.Tensor, cf: float, used_token_T: torch.Tensor | None) -> GateOutput:
        T, E = logits_TE.shape
        rsample = self.noisy_gate_policy == "RSample" and self.training
        noisy_TE = logits_TE + _gumbel(logits_TE) if rsample else None
        gates_TE = logits_TE.softmax(-1)
        ids_T1 = (noisy_TE if rsample else gates_TE).argmax(-1, keepdim=True)
        used_T1 = torch.ones_like(ids_T1, dtype=torch.bool)
        if used_token_T is not None:
            if tuple(used_token_T.shape) != (T,):
                raise ValueError(f"deepspeed MoE: used_token has shape {tuple(used_token_T.shape)}; "
                                 f"it must hold one 0/1 value per token ({T})")
            used_T1 = (used_token_T != 0).view(T, 1)
        mask_TE = torch.zeros_like(gates_TE).scatter_(1, ids_T1, used_T1.to(gates_TE.dtype))
        exp_counts_E = mask_TE.sum(0).to(torch.int64)
        l_aux = torch.sum(gates_TE.mean(0) * mask_TE.mean(0)) * E
        if T < self.min_capacity:  # DeepSpeed asserts this for k=1, dropless or not
            raise ValueError(f"deepspeed MoE: {T} tokens < min_capacity={self.min_capacity} with k=1 (DeepSpeed "
                             "refuses it too); set min_capacity lower or send more tokens")
        score_T1 = torch.zeros_like(ids_T1, dtype=torch.float32)
        if self.use_rts:
            # DeepSpeed's Random Token Selection: one uniform per (token, expert); an expert keeps its
            # tokens with the largest draws. Drawn even when nothing is dropped, as DeepSpeed does.
            score_T1 = torch.rand(T, E, device=logits_TE.device).gather(1, ids_T1)
        # Unused tokens take no capacity: they rank last and are never kept.
        kept_T1 = self._kept(ids_T1, score_T1.masked_fill(~used_T1, -1.0), T, cf) & used_T1
        weights_T1 = gates_TE.gather(1, ids_T1) * kept_T1
        return GateOutput(ids_T1, weights_T1, kept_T1, l_aux, exp_counts_E)

    def _kept(self, ids_TK: torch.Tensor, score_TK: torch.Tensor, T: int, cf_times_k: float) -> torch.Tensor:
        if not self.drop_tokens:
            return torch.ones_like(ids_TK, dtype=torch.bool)
        capacity = _capacity(T, self.num_experts, cf_times_k, self.min_capacity)
        return keep_top_per_expert(ids_TK, score_TK, self.num_experts, capacity)


def _gumbel(like_TE: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise of like_TE's shape, drawn as DeepSpeed's gumbel_rsample draws it."""
    zero, one = like_TE.new_tensor(0.0), like_TE.new_tensor(1.0)
    return torch.distributions.gumbel.Gumbel(zero, one).rsample(like_TE.shape)

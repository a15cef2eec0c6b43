"""A float64 per-token oracle for moe_mlp (independent of every backend) and helpers to compare grads.

Legend: T tokens, H hidden, I expert intermediate, E experts, K top-k.
"""

from __future__ import annotations

import torch

from moesys.activations import apply_activation


def moe_mlp_oracle(x_TH, w_gate_up, w_down, topk_ids_TK, topk_weights_TK, activation="silu",
                   b_gate_up=None, b_down=None):
    """y[t] = sum_j w[t,j] * expert_{ids[t,j]}(x[t]), one token and one slot at a time, in float64."""
    d = torch.float64
    rows = []
    for t in range(x_TH.shape[0]):
        acc = torch.zeros(x_TH.shape[1], dtype=d)
        for j in range(topk_ids_TK.shape[1]):
            e = int(topk_ids_TK[t, j])
            h = w_gate_up[e].to(d) @ x_TH[t].to(d)
            if b_gate_up is not None:
                h = h + b_gate_up[e].to(d)
            out = w_down[e].to(d) @ apply_activation(h, activation)
            if b_down is not None:
                out = out + b_down[e].to(d)
            acc = acc + topk_weights_TK[t, j].to(d) * out
        rows.append(acc)
    return torch.stack(rows) if rows else torch.zeros(0, x_TH.shape[1], dtype=d)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))

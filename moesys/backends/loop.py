"""The readable reference backend: one dense MLP per expert over the tokens routed to it.

Legend: T tokens, H hidden, I expert intermediate, E experts, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moesys.activations import apply_activation


def moe_mlp_loop(x_TH, w_gate_up, w_down, topk_ids_TK, topk_weights_TK, *, activation, b_gate_up=None, b_down=None):
    T, H = x_TH.shape
    E = w_down.shape[0]
    acc_dtype = torch.promote_types(x_TH.dtype, torch.float32)
    y_TH = x_TH.new_zeros(T, H, dtype=acc_dtype)
    for e in range(E):
        # Experts without tokens still run (on zero rows): the result then stays in the autograd
        # graph of every input, so distributed callers run the same backward on every rank.
        token_idx, slot = (topk_ids_TK == e).nonzero(as_tuple=True)
        h = F.linear(x_TH[token_idx], w_gate_up[e], None if b_gate_up is None else b_gate_up[e])
        out_nH = F.linear(apply_activation(h, activation), w_down[e], None if b_down is None else b_down[e])
        weight_n1 = topk_weights_TK[token_idx, slot].unsqueeze(-1).to(acc_dtype)
        y_TH = y_TH.index_add(0, token_idx, out_nH.to(acc_dtype) * weight_n1)
    return y_TH.to(x_TH.dtype)

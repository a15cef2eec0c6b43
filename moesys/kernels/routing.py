"""Routing sorted once, on the device and without a host sync, into the index lists that every
expert kernel of a step reuses (forward and backward, both projections).

Legend: T tokens, K top-k, E experts, N = T*K routed rows. Routed row n = t*K + j is (token t, slot j).
"""

from __future__ import annotations

import torch


def sort_routing(topk_ids_TK: torch.Tensor, num_experts: int):
    """Returns (token_N, perm_N, offsets_E):
    perm_N[r]    the routed row (t*K + j) that is the r-th row in expert order (stable: token order
                 within an expert, so results are deterministic);
    token_N[r]   its token t (int32), the row the kernels gather from x and dy;
    offsets_E[e] cumulative row count of experts 0..e (int32): expert e owns rows offsets[e-1]:offsets[e].
    """
    K = topk_ids_TK.shape[1]
    ids_N = topk_ids_TK.reshape(-1).to(torch.int64)
    _, perm_N = torch.sort(ids_N, stable=True)
    token_N = torch.div(perm_N, K, rounding_mode="floor").to(torch.int32)
    # scatter_add, not bincount: bincount reads the maximum on the host to size its output.
    counts_E = torch.zeros(num_experts, dtype=torch.int32, device=ids_N.device)
    counts_E.scatter_add_(0, ids_N, torch.ones_like(ids_N, dtype=torch.int32))
    return token_N, perm_N, torch.cumsum(counts_E, 0, dtype=torch.int32)

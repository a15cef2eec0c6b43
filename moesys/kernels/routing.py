"""Routing sorted once, on the device and without a host sync, into the index lists that every
expert kernel of a step reuses (forward and backward, both projections): `sort_routing`, one Triton
launch, and `sort_routing_reference`, the same contract in plain torch (about 6 launches).

Legend: T tokens, K top-k, E experts, N = T*K routed rows. Routed row n = t*K + j is (token t, slot j).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moesys.kernels.launch import is_interpreted, unavailable_reason

# ids read per loop step. On a GPU a big block keeps each program's serial walk over N short (16 steps
# per pass for N = 65536); under the interpreter a small one makes the tests walk several blocks.
BLOCK_GPU, BLOCK_INTERPRETED = 4096, 128


def sort_routing(topk_ids_TK: torch.Tensor, num_experts: int):
    """Returns (token_N, perm_N, offsets_E):
    perm_N[r]    the routed row (t*K + j) that is the r-th row in expert order (stable: token order
                 within an expert, so results are deterministic);
    token_N[r]   its token t (int32), the row the kernels gather from x and dy;
    offsets_E[e] cumulative row count of experts 0..e (int32): expert e owns rows offsets[e-1]:offsets[e].

    Ids must lie in [0, num_experts) (`check_moe_mlp_inputs` checks that upstream). Runs the Triton
    kernel where moesys' kernels can run (CUDA, or the CPU under TRITON_INTERPRET=1), else the reference.
    """
    if unavailable_reason(topk_ids_TK.device) is not None:
        return sort_routing_reference(topk_ids_TK, num_experts)
    T, K = topk_ids_TK.shape
    N = T * K
    ids_N = topk_ids_TK.reshape(-1).contiguous()
    dev = ids_N.device
    token_N = torch.empty(N, dtype=torch.int32, device=dev)
    perm_N = torch.empty(N, dtype=torch.int64, device=dev)
    offsets_E = torch.empty(num_experts, dtype=torch.int32, device=dev)
    # N = 0 launches too: both loops run zero times and every offset is written as 0.
    if is_interpreted():
        meta = {"BLOCK": BLOCK_INTERPRETED}
    else:
        meta = {"BLOCK": BLOCK_GPU, "num_warps": 8}
    sort_routing_kernel[(num_experts,)](ids_N, token_N, perm_N, offsets_E, N, K, num_experts, **meta)
    return token_N, perm_N, offsets_E


@triton.jit
def sort_routing_kernel(ids_ptr, token_ptr, perm_ptr, offsets_ptr, N, K, E, BLOCK: tl.constexpr):
    """Program e writes expert e's slice of the sorted order and offsets[e], reading all N ids twice.

    Each program finds its own start (the count of ids < e), so no program waits for another and no
    atomics are needed: the output is a pure function of the ids (deterministic), in one launch."""
    e = tl.program_id(0)
    below = 0  # ids < e: where expert e's rows start
    mine = 0  # ids == e
    for n0 in range(0, N, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + n, mask=n < N, other=E)  # E: a lane past the end belongs to no expert
        below += tl.sum((ids < e).to(tl.int32), 0)
        mine += tl.sum((ids == e).to(tl.int32), 0)
    tl.store(offsets_ptr + e, below + mine)
    # Second walk in ascending n: a row's slot is the rows of e before it in earlier blocks (`slot`)
    # plus those before it in this block (an inclusive cumsum, minus itself), hence stable.
    slot = below
    for n0 in range(0, N, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        is_e = tl.load(ids_ptr + n, mask=n < N, other=E) == e
        is_e_i = is_e.to(tl.int32)
        dst = slot + tl.cumsum(is_e_i, 0) - 1
        tl.store(perm_ptr + dst, n.to(tl.int64), mask=is_e)
        tl.store(token_ptr + dst, n // K, mask=is_e)
        slot += tl.sum(is_e_i, 0)


def sort_routing_reference(topk_ids_TK: torch.Tensor, num_experts: int):
    """`sort_routing` in plain torch ops (a stable sort, a division, a scatter-add count, a cumsum)."""
    K = topk_ids_TK.shape[1]
    ids_N = topk_ids_TK.reshape(-1).to(torch.int64)
    _, perm_N = torch.sort(ids_N, stable=True)
    token_N = torch.div(perm_N, K, rounding_mode="floor").to(torch.int32)
    # scatter_add, not bincount: bincount reads the maximum on the host to size its output.
    counts_E = torch.zeros(num_experts, dtype=torch.int32, device=ids_N.device)
    counts_E.scatter_add_(0, ids_N, torch.ones_like(ids_N, dtype=torch.int32))
    return token_N, perm_N, torch.cumsum(counts_E, 0, dtype=torch.int32)

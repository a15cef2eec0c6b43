"""Backend "grouped_mm": sort the T*K routed rows by expert, run both projections as grouped GEMMs
(`torch.nn.functional.grouped_mm`), then weight and un-sort. No host synchronisation where
`grouped_mm` supports the dtype and strides; elsewhere (float64, rows not 16-byte aligned, fp32 on
CUDA) the same grouped product runs as one matmul per expert over host-read offsets.

Legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T*K routed rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moesys.activations import apply_activation


def sort_by_expert(topk_ids_TK: torch.Tensor, num_experts: int):
    """Returns (perm_N, sorted_ids_N, offsets_E): routed row perm[i] (= t*K + j) is the i-th row in
    expert order; offsets are the cumulative row counts per expert (int32), computed on the device."""
    ids_N = topk_ids_TK.reshape(-1).long()
    sorted_ids_N, perm_N = torch.sort(ids_N, stable=True)
    counts_E = torch.zeros(num_experts, dtype=torch.int32, device=ids_N.device)
    counts_E.scatter_add_(0, ids_N, torch.ones_like(ids_N, dtype=torch.int32))
    return perm_N, sorted_ids_N, torch.cumsum(counts_E, 0, dtype=torch.int32)


def _native_grouped_mm_ok(a: torch.Tensor, w: torch.Tensor) -> bool:
    if a.device.type == "cuda" or torch.compiler.is_compiling():
        # CUDA kernels and dynamo's grouped_mm meta function take bf16 only.
        dtypes = (torch.bfloat16,)
    else:
        dtypes = (torch.float32, torch.bfloat16, torch.float16)
    if a.dtype not in dtypes:
        return False
    size = a.element_size()
    return all((d * size) % 16 == 0 for d in (a.shape[-1], w.shape[-1], w.shape[-2]))


def grouped_linear(a_NK: torch.Tensor, w_EMK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """out[rows of expert e] = a[rows of expert e] @ w[e].T, rows grouped contiguously by `offsets_E`."""
    if _native_grouped_mm_ok(a_NK, w_EMK):
        return F.grouped_mm(a_NK, w_EMK.transpose(-2, -1), offs=offsets_E)
    outs, start = [], 0
    for e, end in enumerate(offsets_E.tolist()):
        outs.append(a_NK[start:end] @ w_EMK[e].transpose(0, 1))
        start = end
    return torch.cat(outs, 0) if outs else a_NK.new_zeros(0, w_EMK.shape[1])


def moe_mlp_grouped_mm(x_TH, w_gate_up, w_down, topk_ids_TK, topk_weights_TK, *, activation,
                       b_gate_up=None, b_down=None):
    T, H = x_TH.shape
    K = topk_ids_TK.shape[1]
    E = w_down.shape[0]
    perm_N, sorted_ids_N, offsets_E = sort_by_expert(topk_ids_TK, E)
    x_NH = x_TH[perm_N // K]
    h_NF = grouped_linear(x_NH, w_gate_up, offsets_E)
    if b_gate_up is not None:
        h_NF = h_NF + b_gate_up[sorted_ids_N]
    out_NH = grouped_linear(apply_activation(h_NF, activation), w_down, offsets_E)
    if b_down is not None:
        out_NH = out_NH + b_down[sorted_ids_N]
    acc_dtype = torch.promote_types(x_TH.dtype, torch.float32)
    weights_N1 = topk_weights_TK.reshape(-1)[perm_N].unsqueeze(-1).to(acc_dtype)
    weighted_NH = out_NH.to(acc_dtype) * weights_N1
    # Un-sort, then sum the K rows of each token: deterministic, unlike an atomic index_add.
    unsorted_NH = torch.empty_like(weighted_NH).index_copy(0, perm_N, weighted_NH)
    return unsorted_NH.view(T, K, H).sum(1).to(x_TH.dtype)

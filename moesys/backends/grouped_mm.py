"""Backend "grouped_mm": sort the T*K routed rows by expert, run both projections as grouped GEMMs
(`torch.nn.functional.grouped_mm`), then un-sort, weight and sum each token's K rows in one gather.
No host synchronisation where `grouped_mm` supports the dtype and strides; elsewhere (float64, rows
not 16-byte aligned, fp32 on CUDA) the same grouped product runs as one matmul per expert over
host-read offsets. Gathers through the inverse permutation replace autograd's atomic scatter-adds in
the backward: deterministic, and fewer passes over the [N, H] rows.

Legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T*K routed rows.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from moesys.activations import apply_activation


def sort_by_expert(topk_ids_TK: torch.Tensor, num_experts: int):
    """Returns (perm_N, sorted_ids_N, offsets_E): routed row perm[i] (= t*K + j) is the i-th row in
    expert order; offsets are the cumulative row counts per expert (int32), computed on the device."""
    ids_N = topk_ids_TK.reshape(-1)
    # A radix sort makes one pass per key byte: expert ids fit in one or two bytes, not eight.
    key_dtype = torch.uint8 if num_experts <= 256 else torch.int16 if num_experts <= 2**15 else torch.int32
    sorted_keys_N, perm_N = torch.sort(ids_N.to(key_dtype), stable=True)
    # Cumulative counts by binary search in the sorted keys: no atomic adds contending on E counters.
    experts_E = torch.arange(num_experts, device=ids_N.device, dtype=key_dtype)
    offsets_E = torch.searchsorted(sorted_keys_N, experts_E, right=True, out_int32=True)
    return perm_N, sorted_keys_N.long(), offsets_E


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


def inverse_permutation(perm_N: torch.Tensor) -> torch.Tensor:
    """inv[perm[i]] = i: where each routed row t*K + j sits in expert order (a scatter of unique indices)."""
    return torch.empty_like(perm_N).index_put_((perm_N,), torch.arange(perm_N.numel(), device=perm_N.device))


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


class _GatherRows(torch.autograd.Function):
    """x_NH = x_TH[token_N]: each token copied to its K routed rows in expert order. The backward sums a
    token's K row gradients through the inverse permutation (a gather-reduce in fp32), instead of the
    atomic index_put(accumulate=True) that autograd derives for indexing."""

    @staticmethod
    def forward(ctx, x_TH, token_N, inv_TK):
        ctx.save_for_backward(inv_TK)
        return x_TH[token_N]

    @staticmethod
    def backward(ctx, dx_NH):
        (inv_TK,) = ctx.saved_tensors
        return dx_NH[inv_TK].to(_acc_dtype(dx_NH)).sum(1).to(dx_NH.dtype), None, None


class _CombineRows(torch.autograd.Function):
    """y_TH[t] = sum_j w_TK[t, j] * out_NH[inv_TK[t, j]], accumulated in fp32: un-sorting, weighting and
    the top-k sum as one gather-reduce, with no [N, H] fp32 intermediate and no atomics (deterministic).
    The backward is gathers too: d_out[i] = w[perm[i]] * dy[perm[i] // K], d_w[t, j] = <dy[t], out[inv[t, j]]>."""

    @staticmethod
    def forward(ctx, out_NH, w_TK, inv_TK, perm_N):
        ctx.save_for_backward(out_NH, w_TK, inv_TK, perm_N)
        acc = _acc_dtype(out_NH)
        return (out_NH[inv_TK].to(acc) * w_TK.unsqueeze(-1).to(acc)).sum(1).to(out_NH.dtype)

    @staticmethod
    def backward(ctx, dy_TH):
        out_NH, w_TK, inv_TK, perm_N = ctx.saved_tensors
        acc, K = _acc_dtype(out_NH), w_TK.shape[1]
        d_out_NH = d_w_TK = None
        if ctx.needs_input_grad[0]:
            w_N1 = w_TK.reshape(-1)[perm_N].unsqueeze(-1).to(acc)
            d_out_NH = (dy_TH[perm_N // K].to(acc) * w_N1).to(out_NH.dtype)
        if ctx.needs_input_grad[1]:
            d_w_TK = (out_NH[inv_TK].to(acc) * dy_TH.unsqueeze(1).to(acc)).sum(-1).to(w_TK.dtype)
        return d_out_NH, d_w_TK, None, None


def grouped_experts(x_TH, w_gate_up, w_down, topk_ids_TK, topk_weights_TK, act_fn, *, b_gate_up=None, b_down=None,
                    post_fn=None):
    """The expert MLPs with any function between the two grouped GEMMs: `act_fn(h_NF) -> a_NI` on the routed
    rows' gate/up projection (in w_gate_up's row order), and `post_fn(out_NH)`, if given, on each routed row's
    down projection (plus bias) before the routing weight (a post-expert norm). Rows are independent, so
    any row-wise function may stand in either place. `moe_mlp_grouped_mm` is this with a moesys activation;
    the transformers integration runs experts with their own gate or norm through it."""
    T, H = x_TH.shape
    K = topk_ids_TK.shape[1]
    E = w_down.shape[0]
    perm_N, sorted_ids_N, offsets_E = sort_by_expert(topk_ids_TK, E)
    inv_TK = inverse_permutation(perm_N).view(T, K)
    x_NH = _GatherRows.apply(x_TH, perm_N // K, inv_TK)
    h_NF = grouped_linear(x_NH, w_gate_up, offsets_E)
    if b_gate_up is not None:
        h_NF = h_NF + b_gate_up[sorted_ids_N]
    out_NH = grouped_linear(act_fn(h_NF), w_down, offsets_E)
    if b_down is not None:
        out_NH = out_NH + b_down[sorted_ids_N]
    if post_fn is not None:
        out_NH = post_fn(out_NH)
    return _CombineRows.apply(out_NH, topk_weights_TK, inv_TK, perm_N)


def moe_mlp_grouped_mm(x_TH, w_gate_up, w_down, topk_ids_TK, topk_weights_TK, *, activation,
                       b_gate_up=None, b_down=None):
    return grouped_experts(x_TH, w_gate_up, w_down, topk_ids_TK, topk_weights_TK,
                           functools.partial(apply_activation, activation=activation),
                           b_gate_up=b_gate_up, b_down=b_down)

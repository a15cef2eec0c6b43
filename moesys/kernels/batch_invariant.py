"""Batch-invariant matmul and last-dimension sums: a row's result does not depend on the rows beside it.

cuBLAS (and oneDNN on the CPU) pick their algorithm, tile shape and split of the reduction by the shape of
the whole call, so the same row multiplied as part of 1 row or of 128 rows rounds differently, and torch's
reduction kernels split a row's sum across threads by how many rows there are. Greedy decoding of a batch
then parts from each sequence decoded alone wherever two logits are a rounding apart. These kernels fix one
tile shape and one reduction order for every call (no autotuning, no split-K), so each output element is
computed by the same instructions in the same order whatever M is (the idea of Thinking Machines' "Defeating
Nondeterminism in LLM Inference", 2025, and its batch_invariant_ops).

`BatchInvariantMode` routes aten's mm, addmm, bmm and last-dimension sum/mean to them inside a `with`
block (a TorchDispatchMode: only the calls made inside it, on any device; under TRITON_INTERPRET=1 on the
CPU). It refuses scaled_dot_product_attention, which no mode can make batch-invariant: attention goes through
`moesys.kernels.exact_attention` instead. moesys.offload's `exact=True` uses both.

Legend: M rows, K reduction, N columns; Bt the batch of a bmm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import TorchDispatchMode

from moesys.kernels.launch import is_interpreted

# one tile shape for every call: what makes a row's result independent of M (never autotune these)
MM_BLOCK_M, MM_BLOCK_N, MM_BLOCK_K = 64, 64, 32
SUM_BLOCK_MAX = 1024
FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _bmm_kernel(a_ptr, b_ptr, bias_ptr, c_ptr, M, N, K,
                s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cb, s_cm, s_cn,
                HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m, pid_n, bt = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = (k0 + rk).to(tl.int64)
        a = tl.load(a_ptr + bt * s_ab + rm[:, None] * s_am + kk[None, :] * s_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + bt * s_bb + kk[:, None] * s_bk + rn[None, :] * s_bn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if UPCAST:  # the Triton interpreter's bf16 dot reads raw bits (docs/ARCHITECTURE.md, traps)
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:  # float32 stays float32 (torch's default: no TF32 in matmuls)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + bt * s_cb + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def bmm(a_BMK: torch.Tensor, b_BKN: torch.Tensor, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b (+ bias) per batch, accumulated in float32 over K in fixed tiles, in the inputs' dtype."""
    Bt, M, K = a_BMK.shape
    N = b_BKN.shape[2]
    c = torch.empty(Bt, M, N, dtype=a_BMK.dtype, device=a_BMK.device)
    if c.numel() == 0:
        return c
    if K == 0:
        return c.zero_() if bias_N is None else c.copy_(bias_N.expand_as(c))
    grid = (triton.cdiv(M, MM_BLOCK_M), triton.cdiv(N, MM_BLOCK_N), Bt)
    _bmm_kernel[grid](a_BMK, b_BKN, bias_N if bias_N is not None else c, c, M, N, K,
                      *a_BMK.stride(), *b_BKN.stride(), *c.stride(),
                      HAS_BIAS=bias_N is not None, IEEE=a_BMK.dtype == torch.float32,
                      UPCAST=is_interpreted() and a_BMK.dtype == torch.bfloat16,
                      BM=MM_BLOCK_M, BN=MM_BLOCK_N, BK=MM_BLOCK_K)
    return c


def mm(a_MK: torch.Tensor, b_KN: torch.Tensor, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    return bmm(a_MK.unsqueeze(0), b_KN.unsqueeze(0), bias_N).squeeze(0)


@triton.jit
def _row_sum_kernel(x_ptr, out_ptr, N, s_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, N, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + row * s_x + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


def row_sum(x_RN: torch.Tensor) -> torch.Tensor:
    """float32 [R]: each row's sum, in one order fixed by N alone (lanes of BLOCK columns, then a tree)."""
    R, N = x_RN.shape
    x_RN = x_RN if x_RN.stride(1) == 1 else x_RN.contiguous()
    out = torch.empty(R, dtype=torch.float32, device=x_RN.device)
    if R:
        block = min(SUM_BLOCK_MAX, triton.next_power_of_2(max(N, 1)))
        _row_sum_kernel[(R,)](x_RN, out, N, x_RN.stride(0), BLOCK=block)
    return out


# ------------------------------------------------------------------ the references (torch, batch-dependent)
def mm_reference(a_MK, b_KN, bias_N=None):
    out = a_MK.float() @ b_KN.float()
    return (out if bias_N is None else out + bias_N.float()).to(a_MK.dtype)


def row_sum_reference(x_RN):
    return x_RN.float().sum(-1)


# ------------------------------------------------------------------ the dispatch mode
def _floating(*ts) -> bool:
    return all(isinstance(t, torch.Tensor) and t.dtype in FLOAT_TYPES and t.dtype == ts[0].dtype for t in ts)


def _mm(a, b):
    return mm(a, b) if _floating(a, b) else NotImplemented


def _addmm(bias, a, b, *, beta=1, alpha=1):
    if not _floating(bias, a, b) or bias.dim() != 1 or beta != 1 or alpha != 1:
        return NotImplemented
    return mm(a, b, bias)


def _bmm(a, b):
    return bmm(a, b) if _floating(a, b) else NotImplemented


def _last_dim(x, dims) -> bool:
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    return x.dim() >= 1 and len(dims) == 1 and dims[0] % x.dim() == x.dim() - 1


def _reduce_last(x, dims, keepdim, dtype, mean: bool):
    if not (isinstance(x, torch.Tensor) and x.dtype in FLOAT_TYPES and _last_dim(x, dims)):
        return NotImplemented
    N = x.shape[-1]
    s = row_sum(x.reshape(-1, N))
    if mean:
        s = s / N
    s = s.to(dtype or x.dtype).reshape(x.shape[:-1])
    return s.unsqueeze(-1) if keepdim else s


def _sum(x, dims=None, keepdim=False, *, dtype=None):
    return _reduce_last(x, dims, keepdim, dtype, mean=False)


def _mean(x, dims=None, keepdim=False, *, dtype=None):
    return _reduce_last(x, dims, keepdim, dtype, mean=True)


_aten = torch.ops.aten
HANDLERS = {_aten.mm.default: _mm, _aten.addmm.default: _addmm, _aten.bmm.default: _bmm,
            _aten.sum.dim_IntList: _sum, _aten.mean.dim: _mean}
# attention kernels whose reduction over keys follows the key count (a batch's padded rows change it), and
# cuBLAS's grouped GEMM (its algorithm follows each group's row count)
REFUSED = ("scaled_dot_product", "_flash_attention", "_efficient_attention", "_cudnn_attention", "_grouped_mm")


class BatchInvariantMode(TorchDispatchMode):
    """Inside it, floating mm / addmm / bmm and sums or means over the last dimension run the kernels above;
    every other op runs as usual. `calls` counts the calls it took over (a test can see it did)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = HANDLERS.get(func)
        if handler is not None:
            out = handler(*args, **kwargs)
            if out is not NotImplemented:
                self.calls += 1
                return out
        elif any(name in func.name() for name in REFUSED):
            raise RuntimeError(
                f"batch-invariant mode: {func.name()} sums in an order that follows the batch's shape; run attention "
                "through moesys.kernels.exact_attention (moesys.offload's exact=True registers it with transformers "
                "as attn_implementation='moesys_exact') and experts through their per-expert loop "
                "(experts_implementation='eager')")
        return func(*args, **kwargs)

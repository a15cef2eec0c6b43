"""Sum each token's K routed rows, stored in expert order, back into token order: out[t] = sum_j
rows[inv[t*K + j]], accumulated in fp32 (a gather-reduce: no atomics, deterministic).

Used by the input-gradient path that runs cuBLAS's grouped GEMM (`launch.dgrad_impl`): the GEMM writes
each routed row's dx in expert order, this pass folds the K rows of every token. The Triton GEMM path
instead scatter-adds inside its epilogue into an fp32 [T, H] buffer.

Legend: T tokens, K top-k, N = T*K routed rows, H the row width; inv[t*K + j] is where routed row
(t, j) sits in expert order (the inverse of sort_routing's perm_N).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def token_sum_kernel(rows_ptr, stride_r, inv_ptr, out_ptr, stride_o, H, K, BH: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    mask = cols < H
    acc = tl.zeros((BH,), dtype=tl.float32)
    for j in range(K):
        r = tl.load(inv_ptr + t * K + j).to(tl.int64)
        acc += tl.load(rows_ptr + r * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

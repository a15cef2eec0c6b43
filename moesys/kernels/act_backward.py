"""Activation backward of the expert MLP as its own bandwidth-bound kernel, run after the plain GEMM
g = dy[token] W_down (EPI_STORE).

Why not fused into that GEMM's epilogue (it was, until an H100 profile): the epilogue needs two more
[BM, BN] tiles of h loaded and three stored after the main loop, which nothing overlaps; the fused kernel
ran at 2.3x (Mixtral) to 3x (Qwen3, OLMoE) the time of the same GEMM without it. Split, the GEMM runs at
full speed and this pass streams h, g and dh once at memory bandwidth; g is overwritten in place, so the
split costs no memory.

Legend: N sorted rows, I expert intermediate, F = 2I (gated) or I. Per row r with routing weight w:
  a = act(gate) * up (gated) or act(h);  drw[r] = a . g;  dh = w g * d a / d h;  g <- w * a (dW_down's P).
"""

from __future__ import annotations

import triton
import triton.language as tl

from moesys.kernels.act import act_fwd, act_grad


@triton.jit
def act_backward_kernel(h_ptr, stride_h, g_ptr, stride_g, dh_ptr, stride_dh, rw_ptr, drw_ptr, N, I, rows_bucket,
                        GATED: tl.constexpr, ACT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    # rows_bucket only keys the autotuner (a power-of-two band of N); dh may be h itself (in place: each
    # program reads a column block of its rows before it writes it)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    w = tl.load(rw_ptr + rows, mask=row_mask, other=0.0)[:, None]
    drw = tl.zeros((BR,), dtype=tl.float32)
    for c0 in range(0, I, BC):
        cols = c0 + tl.arange(0, BC)
        mask = row_mask[:, None] & (cols < I)[None, :]
        h_ptrs = h_ptr + rows64[:, None] * stride_h + cols[None, :]
        g_ptrs = g_ptr + rows64[:, None] * stride_g + cols[None, :]
        dh_ptrs = dh_ptr + rows64[:, None] * stride_dh + cols[None, :]
        io_dtype = g_ptr.dtype.element_ty
        gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        f = act_fwd(gate, ACT)
        if GATED:
            up = tl.load(h_ptrs + I, mask=mask, other=0.0).to(tl.float32)
            a = (f * up).to(io_dtype).to(tl.float32)  # rounded as the forward stored it
        else:
            a = f.to(io_dtype).to(tl.float32)
        drw += tl.sum(a * g, 1)
        da = g * w
        tl.store(g_ptrs, (w * a).to(io_dtype), mask=mask)
        if GATED:
            tl.store(dh_ptrs, (da * up * act_grad(gate, ACT)).to(io_dtype), mask=mask)
            tl.store(dh_ptrs + I, (da * f).to(io_dtype), mask=mask)
        else:
            tl.store(dh_ptrs, (da * act_grad(gate, ACT)).to(io_dtype), mask=mask)
    tl.store(drw_ptr + rows, drw, mask=row_mask)

"""Activation backward of the expert MLP as its own bandwidth-bound kernel, run after the plain GEMM
g = dy[token] W_down (EPI_STORE).

Why not fused into that GEMM's epilogue (it was, until an H100 profile): the epilogue needs two more
[BM, BN] tiles of h loaded and three stored after the main loop, which nothing overlaps; the fused kernel
ran at 2.3x (Mixtral) to 3x (Qwen3, OLMoE) the time of the same GEMM without it. Split, the GEMM runs at
full speed and this pass streams h, g and dh once at memory bandwidth; g is overwritten in place, so the
split costs no memory.

Legend: N sorted rows, I expert intermediate, F = 2I (gated) or I. Per row r with routing weight w:
  a = glu(gate, up) (gated) or act(h);  drw[r] = a . g;  dh = w g * d a / d h;  g <- w * a (dW_down's P).
A gated h holds gate then up columns, or gate and up alternating (INTERLEAVED); dh is written likewise.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moesys.kernels.act import act_fwd, act_grad, glu_bwd, glu_fwd


@triton.jit
def act_backward_kernel(h_ptr, stride_h, g_ptr, stride_g, dh_ptr, stride_dh, rw_ptr, drw_ptr, N, I, rows_bucket,
                        GATED: tl.constexpr, ACT: tl.constexpr, ALPHA: tl.constexpr, CLAMP: tl.constexpr,
                        LIMIT: tl.constexpr, UP_SHIFT: tl.constexpr, INTERLEAVED: tl.constexpr,
                        BR: tl.constexpr, BC: tl.constexpr):
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
        if INTERLEAVED:
            gate_cols = 2 * cols
            up_delta = 1
        else:
            gate_cols = cols
            up_delta = I
        h_ptrs = h_ptr + rows64[:, None] * stride_h + gate_cols[None, :]
        g_ptrs = g_ptr + rows64[:, None] * stride_g + cols[None, :]
        dh_ptrs = dh_ptr + rows64[:, None] * stride_dh + gate_cols[None, :]
        io_dtype = g_ptr.dtype.element_ty
        gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            up = tl.load(h_ptrs + up_delta, mask=mask, other=0.0).to(tl.float32)
            a = glu_fwd(gate, up, ACT, ALPHA, CLAMP, LIMIT, UP_SHIFT).to(io_dtype).to(tl.float32)  # as stored
        else:
            a = act_fwd(gate, ACT, ALPHA).to(io_dtype).to(tl.float32)
        drw += tl.sum(a * g, 1)
        da = g * w
        tl.store(g_ptrs, (w * a).to(io_dtype), mask=mask)
        if GATED:
            d_gate, d_up = glu_bwd(gate, up, da, ACT, ALPHA, CLAMP, LIMIT, UP_SHIFT)
            tl.store(dh_ptrs, d_gate.to(io_dtype), mask=mask)
            tl.store(dh_ptrs + up_delta, d_up.to(io_dtype), mask=mask)
        else:
            tl.store(dh_ptrs, (da * act_grad(gate, ACT, ALPHA)).to(io_dtype), mask=mask)
    tl.store(drw_ptr + rows, drw, mask=row_mask)

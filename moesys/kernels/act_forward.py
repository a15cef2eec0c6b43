"""Activation forward of the expert MLP as its own bandwidth-bound pass, a = glu(gate, up) (gated) or
act(h), for the training forward that runs the gate/up projection as cuBLAS's grouped GEMM
(`launch.fwd_impl`): that GEMM writes h, which backward needs anyway, and this pass reads it back once.
The Triton GEMM instead applies the activation in its epilogue and writes h only when it is saved.

Legend: N sorted rows, I expert intermediate; h is [N, 2I] (gate then up, or gate and up columns
alternating when INTERLEAVED) or [N, I].
"""

from __future__ import annotations

import triton
import triton.language as tl

from moesys.kernels.act import act_fwd, glu_fwd


@triton.jit
def act_forward_kernel(h_ptr, stride_h, a_ptr, stride_a, N, I, GATED: tl.constexpr, ACT: tl.constexpr,
                       ALPHA: tl.constexpr, CLAMP: tl.constexpr, LIMIT: tl.constexpr, UP_SHIFT: tl.constexpr,
                       INTERLEAVED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows < N)[:, None] & (cols < I)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    if GATED:
        if INTERLEAVED:
            gate_ptrs = h_ptr + rows64 * stride_h + 2 * cols[None, :]
            up_ptrs = gate_ptrs + 1
        else:
            gate_ptrs = h_ptr + rows64 * stride_h + cols[None, :]
            up_ptrs = gate_ptrs + I
        gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(up_ptrs, mask=mask, other=0.0).to(tl.float32)
        a = glu_fwd(gate, up, ACT, ALPHA, CLAMP, LIMIT, UP_SHIFT)
    else:
        a = act_fwd(tl.load(h_ptr + rows64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32), ACT, ALPHA)
    tl.store(a_ptr + rows64 * stride_a + cols[None, :], a.to(a_ptr.dtype.element_ty), mask=mask)

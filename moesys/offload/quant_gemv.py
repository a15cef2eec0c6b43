"""Decode-time matrix-vector products straight from int8 / int4 expert weights.

Batch-1 decode multiplies each routed row by its own expert. Dequantizing those experts first writes
every weight out in bf16 and reads it back (for int4 that is 4x the bytes the weights hold, plus the
unpacking): on the H200 the int4 graph decode of the OLMoE shape ran at 73 tok/s against bf16's 136
(bench/results/offload_graph_08c2fe4.json). This kernel reads the packed weights and their group scales
once and accumulates in fp32, so quantized decode moves fewer bytes than bf16 instead of more.

    y_NR[n] = dequantize(q[slots_N[n]], scale[slots_N[n]]) @ x_NC[n]

`quant_gemv_reference` is the definition (and the CPU path); the kernel agrees with it to fp32 rounding
(it multiplies in fp32 without rounding the dequantized weight to the activation dtype first).

Legend: N routed rows, S cache slots, R output rows, C input columns, G groups per row.
"""

from __future__ import annotations

import os

import torch

from moesys.offload import quant

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def quant_gemv_reference(x_NC, q_S, scale_SRG, slots_N, mode: str) -> torch.Tensor:
    w_NRC = quant.dequantize(q_S[slots_N], scale_SRG[slots_N], mode, x_NC.dtype)
    return torch.bmm(w_NRC, x_NC.unsqueeze(-1)).squeeze(-1)


if triton is not None:
    # Batch-1 decode runs a handful of rows over 2-16 MB of packed weights per call, so the kernel is
    # bandwidth- and latency-bound; the best row block and width depend on R and C (gate_up vs down, int4
    # vs int8). Tuned on the first call of each shape (the decode graph's eager warm-up step, never while
    # a graph is being captured); the interpreter (CPU tests) takes one config.
    _CONFIGS = [triton.Config({"BLOCK_R": r, "BLOCK_C": c}, num_warps=w)
                for r, c, w in ((16, 256, 4), (32, 256, 4), (8, 512, 4), (16, 512, 8), (32, 128, 4),
                                (64, 128, 8), (4, 1024, 4))]
    if os.environ.get("TRITON_INTERPRET") == "1":
        _CONFIGS = _CONFIGS[:1]

    def _bench_in_place(fn, quantiles):
        """Times `fn` with CUDA events and no allocation: triton's default benchmark allocates a 256 MB
        buffer to flush the L2 cache, which would break the offload GPU budget (max_memory_allocated)
        on the first decode step. Repeating one call keeps its 2-16 MB of weights warm in L2, faster than a
        real step sees them; only the configs' ranking is used."""
        for _ in range(3):
            fn()
        times = []
        for _ in range(15):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        return [times[min(len(times) - 1, int(q * len(times)))] for q in quantiles]

    @triton.autotune(configs=_CONFIGS, key=["R", "C", "INT4"], do_bench=_bench_in_place)
    @triton.jit
    def _quant_gemv_kernel(x_ptr, q_ptr, s_ptr, slot_ptr, y_ptr, R, C, G, q_slot_stride, q_row_stride,
                           s_slot_stride, GROUP: tl.constexpr, INT4: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_C: tl.constexpr):
        """BLOCK_C weight bytes per row per iteration: int8, one column each; int4, columns 2j (low nibble)
        and 2j + 1 (high nibble) of byte j, both offset by 8 and in one group (groups are even). The
        products accumulate element-wise in fp32 and are reduced across the row once, at the end."""
        n = tl.program_id(0)
        slot = tl.load(slot_ptr + n).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        q_base = q_ptr + slot * q_slot_stride + rows[:, None].to(tl.int64) * q_row_stride
        s_base = s_ptr + slot * s_slot_stride + rows[:, None].to(tl.int64) * G
        x_base = x_ptr + n * C
        n_bytes = C // 2 if INT4 else C
        for j0 in range(0, n_bytes, BLOCK_C):
            j = j0 + tl.arange(0, BLOCK_C)
            j_ok = j < n_bytes
            m = row_ok[:, None] & j_ok[None, :]
            if INT4:
                byte = tl.load(q_base + j[None, :], mask=m, other=0).to(tl.int32)
                x_lo = tl.load(x_base + 2 * j, mask=j_ok, other=0.0).to(tl.float32)
                x_hi = tl.load(x_base + 2 * j + 1, mask=j_ok, other=0.0).to(tl.float32)
                scale = tl.load(s_base + (2 * j[None, :]) // GROUP, mask=m, other=0.0)
                lo = ((byte & 0xF) - 8).to(tl.float32)
                hi = ((byte >> 4) - 8).to(tl.float32)
                acc += (lo * x_lo[None, :] + hi * x_hi[None, :]) * scale
            else:
                v = tl.load(q_base + j[None, :], mask=m, other=0).to(tl.float32)
                x = tl.load(x_base + j, mask=j_ok, other=0.0).to(tl.float32)
                scale = tl.load(s_base + j[None, :] // GROUP, mask=m, other=0.0)
                acc += v * scale * x[None, :]
        tl.store(y_ptr + n * R + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok)


def quant_gemv(x_NC, q_S, scale_SRG, slots_N, mode: str, use_kernel: bool | None = None) -> torch.Tensor:
    """[N, R] in x's dtype. q_S: [S, R, C] int8, or [S, R, C/2] uint8 (int4, two columns per byte);
    scale_SRG: [S, R, G] fp32 per-group scales (C/G columns per group). use_kernel: None = the Triton kernel
    for CUDA tensors, the reference otherwise."""
    if mode not in ("int8", "int4"):
        raise ValueError(f"quant_gemv: mode={mode!r}; use 'int8' or 'int4'")
    N, C = x_NC.shape
    S, R, G = scale_SRG.shape
    if use_kernel is None:
        use_kernel = x_NC.is_cuda and triton is not None
    if not use_kernel:
        return quant_gemv_reference(x_NC, q_S, scale_SRG, slots_N, mode)
    x_NC, q_S, scale_SRG = x_NC.contiguous(), q_S.contiguous(), scale_SRG.contiguous()
    y_NR = torch.empty(N, R, dtype=x_NC.dtype, device=x_NC.device)
    grid = lambda meta: (N, triton.cdiv(R, meta["BLOCK_R"]))  # noqa: E731
    _quant_gemv_kernel[grid](
        x_NC, q_S, scale_SRG, slots_N, y_NR, R, C, G, q_S.stride(0), q_S.stride(1), scale_SRG.stride(0),
        GROUP=C // G, INT4=mode == "int4")
    return y_NR

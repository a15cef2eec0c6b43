"""Decode-time matrix-vector products straight from int8 / int4 expert weights.

Batch-1 decode multiplies each routed row by its own expert. Dequantizing those experts first writes
every weight out in bf16 and reads it back (for int4 that is 4x the bytes the weights hold, plus the
unpacking): on the H200 the int4 graph decode of the OLMoE shape ran at 73 tok/s against bf16's 136
(bench/results/offload_graph_08c2fe4.json). This kernel reads the packed weights and their group scales
once and accumulates in fp32, so quantized decode moves fewer bytes than bf16 instead of more.

    y_NR[n] = dequantize(q[slots_N[n]], scale[slots_N[n]]) @ x_TC[n // K]   (times weight_N[n], if given)

Routed row n = t*K + j is token t's j-th expert, so the gate/up call reads each token once (no [T*K, C]
copy of x) and the down call can return the top-k combine's weighted terms. `quant_gemv_reference` is the
definition (and the CPU path); the kernel agrees with it to fp32 rounding (it multiplies in fp32 without
rounding the dequantized weight, or the product before the routing weight, to the activation dtype).

Legend: T tokens, K rows per token, N = T*K routed rows, S cache slots, R output rows, C input columns,
G groups per row.
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


def quant_gemv_reference(x_TC, q_S, scale_SRG, slots_N, mode: str, weight_N=None) -> torch.Tensor:
    x_NC = x_TC.repeat_interleave(slots_N.shape[0] // x_TC.shape[0], dim=0)
    w_NRC = quant.dequantize(q_S[slots_N], scale_SRG[slots_N], mode, x_NC.dtype)
    y_NR = torch.bmm(w_NRC, x_NC.unsqueeze(-1)).squeeze(-1)
    if weight_N is None:
        return y_NR
    acc = torch.promote_types(x_TC.dtype, torch.float32)
    return y_NR.to(acc) * weight_N.to(acc)[:, None]


if triton is not None:
    # Batch-1 decode runs a handful of rows over 2-16 MB of packed weights per call, so the kernel is
    # bandwidth- and latency-bound: what pays is many bytes in flight per program and little work per
    # weight byte. Tuned on the first call of each shape (the decode graph's eager warm-up step, never while
    # a graph is being captured); the interpreter (CPU tests) takes one config.
    # (BLOCK_R rows, GROUPS scale groups per iteration, warps)
    _CONFIGS = [triton.Config({"BLOCK_R": r, "GROUPS": g}, num_warps=w)
                for r, g, w in ((16, 4, 4), (8, 8, 4), (32, 2, 4), (4, 16, 4), (16, 8, 8), (32, 4, 8),
                                (64, 1, 4), (8, 16, 8), (2, 16, 4), (64, 2, 8))]
    if os.environ.get("TRITON_INTERPRET") == "1":
        _CONFIGS = [triton.Config({"BLOCK_R": 16, "GROUPS": 2}, num_warps=4)]

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

    @triton.autotune(configs=_CONFIGS, key=["R", "C", "INT4", "HAS_W"], do_bench=_bench_in_place)
    @triton.jit
    def _quant_gemv_kernel(x_ptr, q_ptr, s_ptr, slot_ptr, w_ptr, y_ptr, R, C, G, rows_per_x, q_slot_stride,
                           q_row_stride, s_slot_stride, GROUP: tl.constexpr, GROUP_BYTES: tl.constexpr,
                           INT4: tl.constexpr, HAS_W: tl.constexpr, BLOCK_R: tl.constexpr,
                           GROUPS: tl.constexpr):
        """Program (n, r): rows r*BLOCK_R.. of routed row n's expert, GROUPS whole scale groups per
        iteration as a [BLOCK_R, GROUPS, GROUP_BYTES] tile (GROUP_BYTES: the group's weight bytes, rounded
        up to a power of two and masked). Each group's scale is loaded once and broadcast over its bytes;
        products accumulate element-wise in fp32 and are reduced once, at the end. int4: byte b of a group
        holds its columns 2b (low nibble) and 2b + 1 (high nibble), both offset by 8."""
        n = tl.program_id(0)
        slot = tl.load(slot_ptr + n).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        b = tl.arange(0, GROUP_BYTES)
        b_ok = b < (GROUP // 2 if INT4 else GROUP)
        acc = tl.zeros([BLOCK_R, GROUPS, GROUP_BYTES], dtype=tl.float32)
        q_base = q_ptr + slot * q_slot_stride + rows.to(tl.int64)[:, None, None] * q_row_stride
        s_base = s_ptr + slot * s_slot_stride + rows.to(tl.int64)[:, None] * G
        x_base = x_ptr + (n // rows_per_x).to(tl.int64) * C
        for g0 in range(0, G, GROUPS):
            g = g0 + tl.arange(0, GROUPS)
            gb_ok = (g < G)[:, None] & b_ok[None, :]  # [GROUPS, GROUP_BYTES]
            m = row_ok[:, None, None] & gb_ok[None]
            scale = tl.load(s_base + g[None, :], mask=row_ok[:, None] & (g < G)[None, :], other=0.0)
            # integer -> float without the (slow, 16 per clock per SM) conversion instruction: a value
            # 0 <= u < 2^23 ORed into the bits of 2^23 is the float 2^23 + u; one subtraction then gives u
            # minus the quantization offset, exactly
            if INT4:
                byte = tl.load(q_base + (g[:, None] * (GROUP // 2) + b[None, :])[None], mask=m, other=0)
                byte = byte.to(tl.int32)
                col = g[:, None] * GROUP + 2 * b[None, :]
                x_lo = tl.load(x_base + col, mask=gb_ok, other=0.0).to(tl.float32)
                x_hi = tl.load(x_base + col + 1, mask=gb_ok, other=0.0).to(tl.float32)
                lo = ((byte & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # 2^23 + 8
                hi = ((byte >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
                prod = lo * x_lo[None] + hi * x_hi[None]
            else:
                col = g[:, None] * GROUP + b[None, :]
                v = tl.load(q_base + col[None], mask=m, other=0).to(tl.int32)  # -128..127
                v = (((v & 0xFF) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0  # 2^23 + 128
                prod = v * tl.load(x_base + col, mask=gb_ok, other=0.0).to(tl.float32)[None]
            acc += prod * scale[:, :, None]
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
        if HAS_W:
            y *= tl.load(w_ptr + n).to(tl.float32)
        tl.store(y_ptr + n * R + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def quant_gemv(x_TC, q_S, scale_SRG, slots_N, mode: str, weight_N=None, use_kernel: bool | None = None):
    """[N, R]: routed row n of N = T*K multiplies token n // K of x_TC (K = N // T: a token's rows are
    consecutive) by the quantized expert in slot slots_N[n]. Without weight_N, in x's dtype; with it, each
    row scaled by weight_N[n] and in fp32 or wider (the top-k combine's terms: sum them over a token's K
    rows).
    q_S: [S, R, C] int8, or [S, R, C/2] uint8 (int4, two columns per byte); scale_SRG: [S, R, G] fp32
    per-group scales (C/G columns per group). use_kernel: None = the Triton kernel for CUDA tensors, the
    reference otherwise."""
    if mode not in ("int8", "int4"):
        raise ValueError(f"quant_gemv: mode={mode!r}; use 'int8' or 'int4'")
    T, C = x_TC.shape
    N = slots_N.shape[0]
    S, R, G = scale_SRG.shape
    if N % T:
        raise ValueError(f"quant_gemv: {N} routed rows for {T} tokens; each token needs the same number of rows")
    if use_kernel is None:
        use_kernel = x_TC.is_cuda and triton is not None
    if not use_kernel:
        return quant_gemv_reference(x_TC, q_S, scale_SRG, slots_N, mode, weight_N)
    x_TC, q_S, scale_SRG = x_TC.contiguous(), q_S.contiguous(), scale_SRG.contiguous()
    out_dtype = x_TC.dtype if weight_N is None else torch.promote_types(x_TC.dtype, torch.float32)
    y_NR = torch.empty(N, R, dtype=out_dtype, device=x_TC.device)
    group = C // G
    grid = lambda meta: (N, triton.cdiv(R, meta["BLOCK_R"]))  # noqa: E731
    _quant_gemv_kernel[grid](
        x_TC, q_S, scale_SRG, slots_N, slots_N if weight_N is None else weight_N, y_NR, R, C, G, N // T,
        q_S.stride(0), q_S.stride(1), scale_SRG.stride(0), GROUP=group,
        GROUP_BYTES=triton.next_power_of_2(group // 2 if mode == "int4" else group), INT4=mode == "int4",
        HAS_W=weight_N is not None)
    return y_NR

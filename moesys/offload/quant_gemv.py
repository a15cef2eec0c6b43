"""Decode-time matrix-vector products straight from int8 / int4 expert weights.

Batch-1 decode multiplies each routed row by its own expert. Dequantizing those experts first writes
every weight out in bf16 and reads it back (for int4 that is 4x the bytes the weights hold, plus the
unpacking): on the H200 the int4 graph decode of the OLMoE shape ran at 73 tok/s against bf16's 136
(bench/results/offload_graph_08c2fe4.json). This kernel reads the packed weights and their group scales
once and accumulates in fp32, so quantized decode moves fewer bytes than bf16 instead of more.

    a_n = x[n // (N / X)]                       or, with a gated activation, act(x[.., :C]) * x[.., C:]
    y[n] = dequantize(q[slots[n]], scale[slots[n]]) @ a_n                                  -> [N, R]
    y[t] = sum_j weight[t, j] * (dequantize(q[slots[t*K + j]], ...) @ a_(t*K + j))      -> [T, R], with weight

Routed row n = t*K + j is token t's j-th expert, so one layer is two calls: gate/up reads each token's
row in place (no [T*K, C] copy of x), and down applies the activation to what gate/up returned and sums
the top-k combine itself; no other kernel touches the experts' data or their outputs. Everything is
computed in fp32 and rounded once, to x's dtype. `quant_gemv_reference` is the definition (and the CPU
path); the kernel agrees with it to fp32 summation order.

Legend: X rows of x, T tokens, K rows per token, N = T*K routed rows, S cache slots, R output rows,
C input columns (of the activation), G groups per row.
"""

from __future__ import annotations

import torch

from moesys.activations import apply_activation, is_gated
from moesys.offload import quant

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def quant_gemv_reference(x_XC, q_S, scale_SRG, slots_N, mode: str, activation: str | None = None,
                         weight_TK=None) -> torch.Tensor:
    acc = torch.promote_types(x_XC.dtype, torch.float32)
    N = slots_N.shape[0]
    a_NC = x_XC.to(acc).repeat_interleave(N // x_XC.shape[0], dim=0)
    if activation is not None:
        a_NC = apply_activation(a_NC, activation)
    w_NRC = quant.dequantize(q_S[slots_N], scale_SRG[slots_N], mode, acc)
    y_NR = torch.bmm(w_NRC, a_NC.unsqueeze(-1)).squeeze(-1)
    if weight_TK is not None:
        T, K = weight_TK.shape
        y_NR = (y_NR.view(T, K, -1) * weight_TK.to(acc).unsqueeze(-1)).sum(1)
    return y_NR.to(x_XC.dtype)


if triton is not None:
    from moesys.kernels.act import ACT_CODES, act_fwd

    # Batch-1 decode runs a handful of rows over 2-16 MB of packed weights per call, so the kernel is
    # bandwidth- and latency-bound: what pays is many bytes in flight per program and little work per
    # weight byte. The loops over a program's experts and groups are unrolled (static_range), so all of its
    # loads can be in flight at once instead of one round per iteration. Fixed block shapes from a cold
    # sweep of the unrolled kernel (bench/quant_gemv.py on the H200, OLMoE shape,
    # bench/results/quant_gemv_a5bf44f.json): one routed row per program, 8 rows x 4 groups; the combining
    # call has one program per token and row block (not per routed row), so small row blocks keep enough
    # programs in flight. Not autotuned: triton's autotuner ranks configs on warm repeats of one call, and
    # a combining call's 9 MB of int8 weights stay in L2 there, which picked a config 2.4x slower than the
    # best on cold weights (the ones a real step reads).
    ROW_CONFIG = dict(BLOCK_R=8, GROUPS=4, num_warps=4)
    COMBINE_CONFIG = dict(BLOCK_R=8, GROUPS=8, num_warps=4)
    # what bench/quant_gemv.py sweeps
    SWEEP_CONFIGS = [dict(BLOCK_R=r, GROUPS=g, num_warps=w)
                     for r, g, w in ((32, 2, 4), (16, 4, 4), (32, 4, 8), (64, 2, 8), (8, 8, 4), (8, 4, 4),
                                     (4, 4, 4), (4, 8, 4), (2, 8, 4), (2, 4, 2), (1, 8, 2))]

    @triton.jit
    def _quant_gemv_kernel(x_ptr, q_ptr, s_ptr, slot_ptr, w_ptr, y_ptr, R, C, rows_per_x, x_stride,
                           q_slot_stride, q_row_stride, s_slot_stride, G: tl.constexpr, GROUP: tl.constexpr,
                           GROUP_BYTES: tl.constexpr, INT4: tl.constexpr, ACT: tl.constexpr, KC: tl.constexpr,
                           HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, GROUPS: tl.constexpr):
        """Program (p, r): rows r*BLOCK_R.. of output row p, the sum over routed rows p*KC.. p*KC + KC - 1
        (KC = 1: one routed row), each weighted by w[n] when HAS_W. GROUPS whole scale groups per iteration
        as a [BLOCK_R, GROUPS, GROUP_BYTES] tile (GROUP_BYTES: the group's weight bytes, rounded up to a
        power of two and masked); each group's scale, times the routing weight, is loaded once and
        broadcast over its bytes; products accumulate element-wise in fp32 and are reduced once, at the end.
        int4: byte b of a group holds its columns 2b (low nibble) and 2b + 1 (high nibble), both offset by 8.
        ACT >= 0: the input is act(x[c]) * x[C + c] (ACT_CODES), computed here in fp32."""
        p = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        b = tl.arange(0, GROUP_BYTES)
        b_ok = b < (GROUP // 2 if INT4 else GROUP)
        acc = tl.zeros([BLOCK_R, GROUPS, GROUP_BYTES], dtype=tl.float32)
        for k in tl.static_range(KC):
            n = p * KC + k
            slot = tl.load(slot_ptr + n).to(tl.int64)
            q_base = q_ptr + slot * q_slot_stride + rows.to(tl.int64)[:, None, None] * q_row_stride
            s_base = s_ptr + slot * s_slot_stride + rows.to(tl.int64)[:, None] * G
            x_base = x_ptr + (n // rows_per_x).to(tl.int64) * x_stride
            w = 1.0
            if HAS_W:
                w = tl.load(w_ptr + n).to(tl.float32)
            for g0 in tl.static_range(0, G, GROUPS):
                g = g0 + tl.arange(0, GROUPS)
                gb_ok = (g < G)[:, None] & b_ok[None, :]  # [GROUPS, GROUP_BYTES]
                m = row_ok[:, None, None] & gb_ok[None]
                scale = tl.load(s_base + g[None, :], mask=row_ok[:, None] & (g < G)[None, :], other=0.0) * w
                # integer -> float without the (slow, 16 per clock per SM) conversion instruction: a value
                # 0 <= u < 2^23 ORed into the bits of 2^23 is the float 2^23 + u; one subtraction then gives
                # u minus the quantization offset, exactly
                if INT4:
                    byte = tl.load(q_base + (g[:, None] * (GROUP // 2) + b[None, :])[None], mask=m, other=0)
                    byte = byte.to(tl.int32)
                    col = g[:, None] * GROUP + 2 * b[None, :]
                    x_lo = _input(x_base, col, C, gb_ok, ACT)
                    x_hi = _input(x_base, col + 1, C, gb_ok, ACT)
                    lo = ((byte & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # 2^23 + 8
                    hi = ((byte >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
                    prod = lo * x_lo[None] + hi * x_hi[None]
                else:
                    col = g[:, None] * GROUP + b[None, :]
                    v = tl.load(q_base + col[None], mask=m, other=0).to(tl.int32)  # -128..127
                    v = (((v & 0xFF) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0  # 2^23+128
                    prod = v * _input(x_base, col, C, gb_ok, ACT)[None]
                acc += prod * scale[:, :, None]
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(y_ptr + p * R + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _input(x_base, col, C, ok, ACT: tl.constexpr):
        """Input columns `col` in fp32: x's, or act(gate) * up of x's two halves."""
        if ACT >= 0:
            gate = tl.load(x_base + col, mask=ok, other=0.0).to(tl.float32)
            up = tl.load(x_base + C + col, mask=ok, other=0.0).to(tl.float32)
            return act_fwd(gate, ACT) * up
        return tl.load(x_base + col, mask=ok, other=0.0).to(tl.float32)


def quant_gemv(x_XC, q_S, scale_SRG, slots_N, mode: str, activation: str | None = None, weight_TK=None,
               use_kernel: bool | None = None, config: dict | None = None) -> torch.Tensor:
    """Routed rows through quantized experts (the formulas above): [N, R], or [T, R] with weight_TK [T, K]
    (N = T*K), in x's dtype. x_XC: [X, C] with X dividing N (X = T: a token's K rows read its row), or
    [X, 2C] ([gate | up]) with a gated `activation` ("silu", "gelu_tanh"). q_S: [S, R, C] int8, or
    [S, R, C/2] uint8 (int4, two columns per byte); scale_SRG: [S, R, G] fp32 per-group scales (C/G columns
    per group). use_kernel: None = the Triton kernel for CUDA tensors, the reference otherwise. config:
    the kernel's block shape ({"BLOCK_R", "GROUPS", "num_warps"}) instead of ROW_CONFIG / COMBINE_CONFIG
    (benchmarks)."""
    if mode not in ("int8", "int4"):
        raise ValueError(f"quant_gemv: mode={mode!r}; use 'int8' or 'int4'")
    X = x_XC.shape[0]
    N = slots_N.shape[0]
    R, G = scale_SRG.shape[1:]
    if N % X:
        raise ValueError(f"quant_gemv: {N} routed rows over {X} rows of x; each row of x needs the same number "
                         "of routed rows")
    if activation is not None and not is_gated(activation):
        raise ValueError(f"quant_gemv: activation={activation!r} is not gated; pass its output as x instead")
    C = x_XC.shape[1] // (2 if activation is not None else 1)
    if weight_TK is not None and weight_TK.numel() != N:
        raise ValueError(f"quant_gemv: weight_TK of shape {tuple(weight_TK.shape)} for {N} routed rows")
    if use_kernel is None:
        use_kernel = x_XC.is_cuda and triton is not None
    if not use_kernel:
        return quant_gemv_reference(x_XC, q_S, scale_SRG, slots_N, mode, activation, weight_TK)
    x_XC, q_S, scale_SRG = x_XC.contiguous(), q_S.contiguous(), scale_SRG.contiguous()
    KC = 1 if weight_TK is None else weight_TK.shape[1]
    y = torch.empty(N // KC, R, dtype=x_XC.dtype, device=x_XC.device)
    group = C // G
    args = (x_XC, q_S, scale_SRG, slots_N, slots_N if weight_TK is None else weight_TK.reshape(-1), y, R, C,
            N // X, x_XC.stride(0), q_S.stride(0), q_S.stride(1), scale_SRG.stride(0))
    meta = dict(G=G, GROUP=group, GROUP_BYTES=triton.next_power_of_2(group // 2 if mode == "int4" else group),
                INT4=mode == "int4", ACT=-1 if activation is None else ACT_CODES[activation], KC=KC,
                HAS_W=weight_TK is not None)
    config = dict(config or (ROW_CONFIG if KC == 1 else COMBINE_CONFIG))
    _quant_gemv_kernel[(N // KC, triton.cdiv(R, config["BLOCK_R"]))](*args, **meta, **config)
    return y

"""Dequantize cache slots of int8 / int4 experts in one kernel, straight from the slot pool.

A batch step whose layer needs more experts than one token's runs them in dequantized waves: the wave's
slots become bf16 weights in a compact workspace, then one grouped GEMM. Written with torch ops
(`dequantize_slots_reference`) that is a gather of the packed slots (uint8 indexing, one byte per thread:
81 us per 8 int4 OLMoE experts on an H100), a widening to int32, a table gather and a scale multiply, each
a pass over the workspace; together 75% of an int4 B=128 decode step's device time
(bench/results/offload_batch_profile_int4_u128_h100_11a61c9.txt). This kernel reads each packed byte and
its group scale once and writes the weights once.

Exact: the scale is rounded to the output dtype before the product, as `quant.dequantize` does, and an
int4 / int8 value times it rounds once, so the kernel and the reference agree bit for bit.

Legend: S cache slots, N slots to dequantize, R rows, C columns, B packed bytes per row (C/2 for int4,
C for int8), G scale groups per row.
"""

from __future__ import annotations

import torch

from moesys.offload import quant

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference covers CPU tensors
    triton = None


def dequantize_slots_reference(q_SRB: torch.Tensor, scale_SRG: torch.Tensor, slots_N: torch.Tensor, mode: str,
                               dtype: torch.dtype) -> torch.Tensor:
    """[N, R, C] in `dtype`: the experts in cache slots `slots_N`, dequantized."""
    return quant.dequantize(q_SRB[slots_N], scale_SRG[slots_N], mode, dtype)


def workspace_bytes(top_k: int, weights_per_expert: int, elsize: int) -> int:
    """The dequantization workspace the memory plan reserves: top_k experts in the torch form, whose passes
    hold the result, the integer widening and the int4 unpacking at once (2 x elsize + 4 bytes a weight)."""
    return top_k * weights_per_expert * (2 * elsize + 4)


def workspace_experts(top_k: int, dtype: torch.dtype, kernel: bool) -> int:
    """Experts dequantized at once in that workspace: top_k in the torch form; the kernel writes only the
    result (elsize bytes a weight), so the same bytes hold (2 x elsize + 4) / elsize times as many (4 x for
    bf16), and a batch's wave takes that many times fewer dequant chunks, each a dozen launches."""
    elsize = torch.empty((), dtype=dtype).element_size()
    return top_k * ((2 * elsize + 4) // elsize if kernel else 1)


def kernel_available(device: torch.device) -> bool:
    """Whether dequantize_slots runs its kernel for tensors on `device` (its default choice)."""
    return device.type == "cuda" and triton is not None


_BLOCK_R = 16
_BLOCK_B = 128  # packed bytes per program row: 256 int4 columns (512 B of bf16 written per row)

if triton is not None:
    @triton.jit
    def _dequant_slots_kernel(q_ptr, s_ptr, slot_ptr, out_ptr, R, B, q_slot_stride, s_slot_stride,
                              G: tl.constexpr, GROUP_BYTES: tl.constexpr, INT4: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
        """Program (n, r, b): rows r*BLOCK_R.. and packed bytes b*BLOCK_B.. of slot slots[n] -> out[n]. int4:
        byte j of a row holds columns 2j (low nibble) and 2j + 1 (high nibble), both offset by 8; a group
        spans GROUP_BYTES bytes (its columns are whole bytes: group sizes are even)."""
        n = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        byts = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
        m = (rows < R)[:, None] & (byts < B)[None, :]
        slot = tl.load(slot_ptr + n).to(tl.int64)
        r64 = rows.to(tl.int64)[:, None]
        q = tl.load(q_ptr + slot * q_slot_stride + r64 * B + byts[None, :], mask=m, other=0).to(tl.int32)
        scale = tl.load(s_ptr + slot * s_slot_stride + r64 * G + (byts // GROUP_BYTES)[None, :], mask=m, other=0.0)
        scale = scale.to(out_ptr.dtype.element_ty).to(tl.float32)  # rounded first, as the reference does
        out = out_ptr + n.to(tl.int64) * R * (2 * B if INT4 else B) + r64 * (2 * B if INT4 else B)
        if INT4:
            lo = ((q & 0xF) - 8).to(tl.float32) * scale
            hi = (((q >> 4) & 0xF) - 8).to(tl.float32) * scale
            # columns 2j and 2j + 1 side by side: [BLOCK_R, BLOCK_B, 2] -> [BLOCK_R, 2 * BLOCK_B], row-major
            w = tl.reshape(tl.join(lo, hi), (BLOCK_R, 2 * BLOCK_B))
            cols = tl.program_id(2) * (2 * BLOCK_B) + tl.arange(0, 2 * BLOCK_B)
            mw = (rows < R)[:, None] & (cols < 2 * B)[None, :]
            tl.store(out + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mw)
        else:
            tl.store(out + byts[None, :], (q.to(tl.float32) * scale).to(out_ptr.dtype.element_ty), mask=m)


def dequantize_slots(q_SRB: torch.Tensor, scale_SRG: torch.Tensor, slots_N: torch.Tensor, mode: str,
                     dtype: torch.dtype, use_kernel: bool | None = None) -> torch.Tensor:
    """[N, R, C] in `dtype`: the experts in cache slots `slots_N` (a device index), dequantized. q_SRB: [S, R, C]
    int8 or [S, R, C/2] uint8 (int4); scale_SRG: [S, R, G] fp32. use_kernel: None = the Triton kernel for
    CUDA tensors, the reference otherwise (the kernel runs anywhere triton does: TRITON_INTERPRET=1 tests)."""
    if mode not in ("int8", "int4"):
        raise ValueError(f"dequantize_slots: mode={mode!r}; use 'int8' or 'int4'")
    if use_kernel is None:
        use_kernel = kernel_available(q_SRB.device)
    if not use_kernel:
        return dequantize_slots_reference(q_SRB, scale_SRG, slots_N, mode, dtype)
    S, R, B = q_SRB.shape
    G = scale_SRG.shape[-1]
    C = 2 * B if mode == "int4" else B
    if C % G or (mode == "int4" and (C // G) % 2):
        raise ValueError(f"dequantize_slots: {C} columns in {G} groups; int4 groups must be whole bytes")
    q_SRB, scale_SRG = q_SRB.contiguous(), scale_SRG.contiguous()
    N = slots_N.numel()
    out = torch.empty(N, R, C, dtype=dtype, device=q_SRB.device)
    if N == 0:
        return out
    grid = (N, triton.cdiv(R, _BLOCK_R), triton.cdiv(B, _BLOCK_B))
    _dequant_slots_kernel[grid](q_SRB, scale_SRG, slots_N, out, R, B, q_SRB.stride(0), scale_SRG.stride(0),
                                G=G, GROUP_BYTES=(C // G) // 2 if mode == "int4" else C // G, INT4=mode == "int4",
                                BLOCK_R=_BLOCK_R, BLOCK_B=_BLOCK_B, num_warps=4)
    return out

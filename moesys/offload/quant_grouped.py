"""Batch decode straight from int8 / int4 expert weights: a grouped GEMM over the routed rows sorted by expert
(sort_routing, the training kernels' one-launch sort), each block reading the weights in its expert's cache
slot with every tile dequantized in registers (W4A16 / W8A16), so a slot's packed weights are read once per
block of its rows, never written out in bf16.

quant_gemv (one routed row per program) reads an expert's packed weights once per routed row: at batch 128
(1024 rows of OLMoE's top-8 over 64 experts) that is 16 reads of each expert per layer, and the eager device
path's int4 step spent 65.9 ms of GPU compute against the host path's 40.5 ms, whose dequantized waves run a
grouped GEMM (bench/results/offload_batch_int4_bookkeeping_h200_b812281.json, timeline). This op keeps the
device path's property (no host sync: the rows are sorted on the device, and each block finds its expert
and rows from the sorted offsets as the training kernels' blocks do) and reads each packed weight once per
BM rows of its slot.

    up:    a[r] = act(x[t(r)] @ deq(gate[s(r)])^T , x[t(r)] @ deq(up[s(r)])^T)   sorted row r, in x's dtype
    down:  y[n] = w[n] * (a[r(n)] @ deq(down[s(n)])^T)                             fp32, routed-row order
    out[t] = sum over j ascending of y[t*K + j]                       fp32, rounded once (kernels.token_sum)

deq() is `quant.dequantize` in x's dtype: the integer times the scale rounded to x's dtype, one rounding, so
the weights the products see are bit for bit the host path's dequantized ones. Each product accumulates in
fp32 over fixed BK-column steps; the block shape is fixed (not autotuned) and a routed row's output depends
on its own row alone, so a sequence decodes the same tokens in a batch as alone (the combine sums in a fixed
order, no atomics). `quant_moe_mlp_reference` is the definition (and the CPU path); the kernel agrees with it
to fp32 summation order.

Legend: T tokens, K top-k, N = T*K routed rows (n = t*K + j), H hidden, I expert intermediate, S cache slots,
E experts per layer, G scale groups per weight row, BM rows per block (all of one expert, so one slot).
"""

from __future__ import annotations

import torch

from moesys.activations import apply_activation, resolve_activation
from moesys.offload import quant

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference covers CPU tensors
    triton = None

# Fixed block shape (a row's result must not depend on its batch, so no autotuning by T): decode batches give
# each slot a few to a few dozen rows (OLMoE B=128: 16 on average), so BM = 16 (the smallest MMA tile) wastes
# little; BK = 128 is one scale group of 128 columns. Of the six shapes swept on one H200 (bench/quant_grouped.py
# --sweep: OLMoE and Qwen3-30B-A3B, T = 1, 8, 32, 128; bench/results/quant_grouped_h200_6f15fcb.json) this one
# is within 9% of each point's best; BK = 64 (the first choice) was up to 19% off.
CONFIG = dict(BM=16, BN=64, BK=128, num_warps=4, num_stages=3)
INTERPRETED_CONFIG = dict(BM=16, BN=16, BK=16, num_warps=1, num_stages=1)


def quant_moe_mlp_reference(x_TH, pools: dict, slots_TK, w_TK, mode: str, activation: str) -> torch.Tensor:
    """The formulas above in torch: y_TH in x's dtype. pools: "gate_up.q" [S, 2I, H or H/2], "gate_up.scale"
    [S, 2I, G], "down.q" [S, H, I or I/2], "down.scale" [S, H, G'] (the offload cache's slot pools)."""
    T, K = slots_TK.shape
    slots_N = slots_TK.reshape(-1).long()
    dtype = x_TH.dtype
    x_NH = x_TH.float().repeat_interleave(K, dim=0)
    w_gu = quant.dequantize(pools["gate_up.q"][slots_N], pools["gate_up.scale"][slots_N], mode, dtype)
    h_NF = torch.bmm(w_gu.float(), x_NH.unsqueeze(-1)).squeeze(-1).to(dtype)  # rounded as the kernel stores it
    a_NI = apply_activation(h_NF.float(), activation).to(dtype)
    w_d = quant.dequantize(pools["down.q"][slots_N], pools["down.scale"][slots_N], mode, dtype)
    y_NH = torch.bmm(w_d.float(), a_NI.float().unsqueeze(-1)).squeeze(-1) * w_TK.reshape(-1, 1).float()
    out = y_NH.new_zeros(T, y_NH.shape[1])
    for j, y in enumerate(y_NH.view(T, K, -1).unbind(1)):  # j ascending, as the kernel path sums
        out += y
    return out.to(dtype)


if triton is not None:
    from moesys.kernels.act import glu_fwd
    from moesys.kernels.grouped_gemm import _block_of_expert

    @triton.jit
    def _dequant_tile(q_ptrs, s_ptrs, k0, Kd, col_ok, like_ptr, GROUP: tl.constexpr, INT4: tl.constexpr,
                      BN: tl.constexpr, BK: tl.constexpr):
        """The [BN, BK] tile of weight rows (q_ptrs, s_ptrs: [BN] row starts) at columns k0.., in like_ptr's
        dtype (the integer times the scale rounded to it: quant.dequantize's rounding). Out-of-range reads
        are 0."""
        dtype = like_ptr.dtype.element_ty
        offs_k = k0 + tl.arange(0, BK)
        if GROUP % BK == 0:  # the tile sits in one scale group: a scale per row
            scale = tl.load(s_ptrs + k0 // GROUP, mask=col_ok, other=0.0).to(dtype).to(tl.float32)[:, None]
        else:
            scale = tl.load(s_ptrs[:, None] + (offs_k // GROUP)[None, :], mask=col_ok[:, None] & (offs_k < Kd)[None, :],
                            other=0.0).to(dtype).to(tl.float32)
        if INT4:  # byte j of a row holds columns 2j (low nibble) and 2j + 1 (high nibble), both offset by 8
            offs_b = k0 // 2 + tl.arange(0, BK // 2)
            byte = tl.load(q_ptrs[:, None] + offs_b[None, :], mask=col_ok[:, None] & (offs_b < Kd // 2)[None, :],
                           other=0).to(tl.int32)
            lo = ((byte & 0xF) - 8).to(tl.float32)
            hi = (((byte >> 4) & 0xF) - 8).to(tl.float32)
            v = tl.reshape(tl.join(lo, hi), (BN, BK))
        else:
            v = tl.load(q_ptrs[:, None] + offs_k[None, :], mask=col_ok[:, None] & (offs_k < Kd)[None, :],
                        other=0).to(tl.float32)
        return (v * scale).to(dtype)

    @triton.jit
    def _quant_grouped_kernel(a_ptr, stride_a, q_ptr, s_ptr, slots_ptr, perm_ptr, offsets_ptr, w_ptr, out_ptr,
                              stride_o, Nd, Kd, K, E, q_slot_stride, q_row_stride, s_slot_stride, s_row_stride,
                              E_P2: tl.constexpr, GROUP: tl.constexpr, INT4: tl.constexpr, UP: tl.constexpr,
                              ACT: tl.constexpr, ALPHA: tl.constexpr, CLAMP: tl.constexpr, LIMIT: tl.constexpr,
                              UP_SHIFT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """Program (b, c): row block b of the expert-sorted rows (sort_routing's perm and offsets; a block is
        BM rows of one expert, found from the offsets on the device as the training kernels do) times output
        columns c*BN.. of the weight in that expert's cache slot (the slot of the block's first routed row).
        UP: A rows are x[t(n)], the weight is gate_up (gate rows c.., up rows Nd + c..), the gated activation
        is stored at sorted row r. Else: A rows are a[r] (sorted), the down product times the routing weight
        is stored in fp32 at routed row n(r)."""
        e, row_start, row_end = _block_of_expert(offsets_ptr, tl.program_id(0), E, E_P2, BM)
        if e >= E:  # one of the grid's spare blocks
            return
        rows = row_start + tl.arange(0, BM)
        row_ok = rows < row_end
        n = tl.load(perm_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        slot = tl.load(slots_ptr + tl.load(perm_ptr + row_start))
        if UP:  # x's row: the routed row's token
            a_rows = n // K
        else:  # a's row: the sorted row
            a_rows = rows.to(tl.int64)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        col_ok = cols < Nd
        slot64 = slot.to(tl.int64)
        q_rows = q_ptr + slot64 * q_slot_stride + cols.to(tl.int64) * q_row_stride
        s_rows = s_ptr + slot64 * s_slot_stride + cols.to(tl.int64) * s_row_stride
        dtype = a_ptr.dtype.element_ty
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc_up = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, Kd, BK):
            offs_k = k0 + tl.arange(0, BK)
            a = tl.load(a_ptr + a_rows[:, None] * stride_a + offs_k[None, :],
                        mask=row_ok[:, None] & (offs_k < Kd)[None, :], other=0.0)
            w = _dequant_tile(q_rows, s_rows, k0, Kd, col_ok, a_ptr, GROUP, INT4, BN, BK)
            if UPCAST:  # Triton-interpreter bf16 dot trap (docs/ARCHITECTURE.md, traps)
                acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision=DOT_PREC)
            else:
                acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PREC)
            if UP:
                w_up = _dequant_tile(q_rows + Nd * q_row_stride, s_rows + Nd * s_row_stride, k0, Kd, col_ok, a_ptr,
                                     GROUP, INT4, BN, BK)
                if UPCAST:
                    acc_up = tl.dot(a.to(tl.float32), tl.trans(w_up.to(tl.float32)), acc_up, input_precision=DOT_PREC)
                else:
                    acc_up = tl.dot(a, tl.trans(w_up), acc_up, input_precision=DOT_PREC)
        mask = row_ok[:, None] & col_ok[None, :]
        if UP:
            # h rounded to x's dtype first, as a stored h would be (the reference does the same)
            gate = acc.to(dtype).to(tl.float32)
            up = acc_up.to(dtype).to(tl.float32)
            act = glu_fwd(gate, up, ACT, ALPHA, CLAMP, LIMIT, UP_SHIFT)
            tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :], act.to(dtype), mask=mask)
        else:
            rw = tl.load(w_ptr + n, mask=row_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + n.to(tl.int64)[:, None] * stride_o + cols[None, :], acc * rw[:, None], mask=mask)


def _group(scale_SRG: torch.Tensor, cols: int) -> int:
    G = scale_SRG.shape[-1]
    if cols % G:
        raise ValueError(f"quant_moe_mlp: {cols} columns in {G} scale groups")
    return cols // G


def _project(a, q, s, routing, slots_N, w_N, out, K: int, up: bool, consts: dict,
             blocks: int | None = None) -> torch.Tensor:
    """One projection of the expert-sorted rows (routing: sort_routing's perm_N, offsets_E) into `out`:
    gate/up with the activation (`up`: out [N, I] at sorted rows, a = x) or down times the routing weights
    (out [N, H] fp32 at routed rows, a = the activation at sorted rows). A block writes its own expert's rows
    only. blocks: launch only the first row blocks (tests); default, the grid's upper bound."""
    perm_N, offsets_E = routing
    E = offsets_E.numel()
    Kd, Nd = a.shape[1], out.shape[1]
    grid_m = blocks if blocks is not None else triton.cdiv(perm_N.numel(), consts["BM"]) + E
    _quant_grouped_kernel[(grid_m, triton.cdiv(Nd, consts["BN"]))](
        a, a.stride(0), q, s, slots_N, perm_N, offsets_E, w_N, out, out.stride(0), Nd, Kd, K, E,
        q.stride(0), q.stride(1), s.stride(0), s.stride(1), E_P2=triton.next_power_of_2(E), GROUP=_group(s, Kd),
        UP=up, **consts)
    return out


def kernel_consts(mode: str, activation: str, dtype: torch.dtype, config: dict | None = None) -> dict:
    """The kernel's constexprs and launch options for `mode`, a gated `activation` and x's dtype."""
    from moesys.kernels.act import act_constexprs
    from moesys.kernels.launch import is_interpreted

    consts = dict(INT4=mode == "int4", UPCAST=is_interpreted() and dtype == torch.bfloat16,
                  DOT_PREC="ieee" if dtype == torch.float32 else "tf32",
                  **act_constexprs(resolve_activation(activation)),
                  **(config or (INTERPRETED_CONFIG if is_interpreted() else CONFIG)))
    del consts["INTERLEAVED"]  # quant_moe_mlp refuses interleaved gate/up rows
    return consts


def quant_moe_mlp(x_TH, pools: dict, ids_TK, slots_TK, w_TK, mode: str, activation: str, num_experts: int,
                  use_kernel: bool | None = None, config: dict | None = None) -> torch.Tensor:
    """The routed rows of (ids_TK, w_TK) through the quantized experts in cache slots slots_TK of `pools` (see
    quant_moe_mlp_reference), a gated `activation`: y_TH in x's dtype, with no host sync. Rows are grouped by
    expert id (ids in [0, num_experts)); rows of one expert must sit in one slot (the cache's lookup gives
    that). use_kernel: None = the Triton kernel for CUDA tensors, the reference otherwise (the kernel runs
    wherever triton does: TRITON_INTERPRET=1 tests). config: the block shape ({"BM", "BN", "BK",
    "num_warps", "num_stages"}; benchmarks)."""
    if mode not in ("int8", "int4"):
        raise ValueError(f"quant_moe_mlp: mode={mode!r}; use 'int8' or 'int4'")
    spec = resolve_activation(activation)
    if not spec.gated or spec.interleaved:
        raise ValueError(f"quant_moe_mlp: activation={activation!r} is not a gated one over [gate | up] rows, which "
                         "is what the slot pools hold")
    if use_kernel is None:
        use_kernel = x_TH.is_cuda and triton is not None
    if not use_kernel:
        return quant_moe_mlp_reference(x_TH, pools, slots_TK, w_TK, mode, activation)
    from moesys.kernels.launch import token_sum
    from moesys.kernels.routing import sort_routing

    T, K = ids_TK.shape
    H = x_TH.shape[1]
    q_gu, s_gu, q_d, s_d = (pools[n].contiguous() for n in ("gate_up.q", "gate_up.scale", "down.q", "down.scale"))
    I = q_gu.shape[1] // 2
    N = T * K
    if N == 0:  # no routed rows: nothing is added to any token
        return x_TH.new_zeros(T, H)
    _, perm_N, offsets_E = sort_routing(ids_TK, num_experts)  # one launch, stable: routed-row order per expert
    consts = kernel_consts(mode, activation, x_TH.dtype, config)
    x_TH = x_TH.contiguous()
    slots_N, w_N = slots_TK.reshape(-1).contiguous(), w_TK.reshape(-1).contiguous()
    routing = (perm_N, offsets_E)
    a_NI = _project(x_TH, q_gu, s_gu, routing, slots_N, w_N, x_TH.new_empty(N, I), K, True, consts)
    y_NH = _project(a_NI, q_d, s_d, routing, slots_N, w_N,
                    torch.empty(N, H, dtype=torch.float32, device=x_TH.device), K, False, consts)
    # The routed rows are already in token order (n = t*K + j): token_sum's gather through the identity.
    return token_sum(y_NH, torch.arange(N, dtype=torch.int32, device=x_TH.device), T, K, dtype=x_TH.dtype)

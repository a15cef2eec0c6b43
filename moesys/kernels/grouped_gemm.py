"""Triton kernels of the expert MLP (ScatterMoE-style): a grouped GEMM over expert-sorted rows that
gathers token rows by index inside the kernel, with three fused epilogues, and a grouped X^T.dY
weight-gradient kernel. The plain-torch reference of the whole op is `moesys.backends.loop`.

Legend: T tokens, H hidden, I expert intermediate, F = 2I (gated) or I, E experts, K top-k,
N = T*K routed rows in expert order (rows of expert e are offsets[e-1]:offsets[e]).

Grouped GEMM (`grouped_gemm_kernel`): out rows r of expert e = A[row r] @ B[e], B[e] read as [Kd, Nd]
through strides (so W and W^T need no copy). A row r is `a[token[r]]` when GATHER_A (no padded or
gathered copy of x / dy is ever made). Epilogues:
  EPI_ACT_FWD  h = A W^T (+b); stores h (for backward, optional) and act(h) [gated: two accumulators,
               gate columns n and up columns I+n (or 2n and 2n+1 when INTERLEAVED: weight rows, bias and
               h alike), the gated activation (`act.glu_fwd`) in registers].
  EPI_SCATTER  y[token[r]] += w[r] * (A W^T + b) with fp32 atomics: the top-k combine is fused, no
               [N, H] intermediate is written.
  EPI_STORE    out[r] = A W (+ nothing): g = dY[token] W_down in backward, in sorted row order.
B (the expert weights) is read through a Hopper tensor descriptor (TMA: one bulk copy per tile, no address
arithmetic or masks in registers) when B_DESC, else through pointers; A stays pointer-based because its
rows are gathered, which TMA cannot do on Hopper.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moesys.kernels.act import act_fwd, glu_fwd

EPI_ACT_FWD, EPI_SCATTER, EPI_STORE = 0, 1, 2


@triton.jit
def _block_of_expert(offsets_ptr, pid_m, E, E_P2: tl.constexpr, BM: tl.constexpr):
    """Maps row-block pid_m to (expert, first row, end row); expert >= E means no work.

    Each expert's rows are cut into ceil(count/BM) blocks; computing that on the device from the
    offsets keeps the host out of it (no sync) and lets the autotuner pick BM."""
    offs_e = tl.arange(0, E_P2)
    ends = tl.load(offsets_ptr + offs_e, mask=offs_e < E, other=0)
    starts = tl.load(offsets_ptr + offs_e - 1, mask=(offs_e > 0) & (offs_e < E), other=0)
    blocks = (ends - starts + BM - 1) // BM
    block_ends = tl.cumsum(blocks, 0)
    e = tl.sum((block_ends <= pid_m).to(tl.int32), 0)
    sel = offs_e == e
    first_block = tl.sum(tl.where(sel, block_ends - blocks, 0), 0)
    row_start = tl.sum(tl.where(sel, starts, 0), 0) + (pid_m - first_block) * BM
    row_end = tl.sum(tl.where(sel, ends, 0), 0)
    return e, row_start, row_end


@triton.jit
def _load_b_tile(b_desc, e, n0, k0, BN: tl.constexpr, BK: tl.constexpr, B_KCONTIG: tl.constexpr):
    """The [BK, BN] tile of B[e] at (k0, n0) through a descriptor over the weight tensor as stored: [E, Nd, Kd]
    when its k axis is contiguous (then transposed in registers' layout, free for the dot), else [E, Kd, Nd].
    Out-of-range rows and columns read as zeros."""
    if B_KCONTIG:
        return tl.trans(b_desc.load([e, n0, k0]).reshape(BN, BK))
    return b_desc.load([e, k0, n0]).reshape(BK, BN)


@triton.jit
def grouped_gemm_kernel(
    a_ptr, stride_am, stride_ak,
    b_ptr, stride_be, stride_bk, stride_bn, b_desc,
    token_ptr, offsets_ptr, rw_ptr,
    out_ptr, stride_om, stride_on,
    h_ptr, stride_hm, stride_hn,
    bias_ptr, stride_biase,
    num_rows, Kd, Nd, E, I, rows_bucket,
    E_P2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE: tl.constexpr, GATHER_A: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    SAVE_H: tl.constexpr, SCALE: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr, B_DESC: tl.constexpr, B_KCONTIG: tl.constexpr,
    ALPHA: tl.constexpr = 1.0, CLAMP: tl.constexpr = False, LIMIT: tl.constexpr = 0.0, UP_SHIFT: tl.constexpr = 0.0,
    INTERLEAVED: tl.constexpr = False,
):
    # Grid is an upper bound on row blocks (N/BM + E), known without reading the offsets.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows, BM) + E
    num_pid_n = tl.cdiv(Nd, BN)
    # Grouped ordering: neighbouring programs share weight column blocks, which stay in L2.
    num_in_group = GROUP_M * num_pid_n
    first_m = (pid // num_in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_m
    pid_n = (pid % num_in_group) // group_m

    e, row_start, row_end = _block_of_expert(offsets_ptr, pid_m, E, E_P2, BM)
    if e >= E:  # one of the grid's spare blocks
        return
    rows = row_start + tl.arange(0, BM)
    row_mask = rows < row_end
    if GATHER_A or EPILOGUE == 1:
        tokens = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    if GATHER_A:
        a_rows = tokens
    else:
        a_rows = rows.to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    col_mask = cols < Nd
    offs_k = tl.arange(0, BK)
    # where a gated epilogue's gate and up columns sit (in the weight's rows, the bias and h)
    if GATED and EPILOGUE == 0 and INTERLEAVED:
        gate_cols = 2 * cols
        up_delta = 1
    else:
        gate_cols = cols
        up_delta = I

    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + offs_k[:, None] * stride_bk + gate_cols[None, :] * stride_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_up = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, Kd, BK):
        k_mask = offs_k < Kd - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if B_DESC:
            b = _load_b_tile(b_desc, e, pid_n * BN, k0, BN, BK, B_KCONTIG)
        else:
            b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:  # Triton-interpreter bf16 dot trap (DESIGN.md section 6)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        if GATED and EPILOGUE == 0:
            # up rows I + n; with a descriptor, gate columns n >= I read up rows, which the store masks
            if B_DESC:
                b_up = _load_b_tile(b_desc, e, I + pid_n * BN, k0, BN, BK, B_KCONTIG)
            else:
                b_up = tl.load(b_ptrs + up_delta * stride_bn, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if UPCAST:
                b_up = b_up.to(tl.float32)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PREC)
        a_ptrs += BK * stride_ak
        b_ptrs += BK * stride_bk

    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    if EPILOGUE == 0:
        io_dtype = out_ptr.dtype.element_ty
        if HAS_BIAS:
            bias_row = bias_ptr + e.to(tl.int64) * stride_biase
            acc += tl.load(bias_row + gate_cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_up += tl.load(bias_row + up_delta + gate_cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        # Round h as it is stored, so backward's recomputed activation equals this one.
        gate = acc.to(io_dtype)
        h_ptrs = h_ptr + rows64[:, None] * stride_hm + gate_cols[None, :] * stride_hn
        if SAVE_H:
            tl.store(h_ptrs, gate, mask=mask)
        if GATED:
            up = acc_up.to(io_dtype)
            if SAVE_H:
                tl.store(h_ptrs + up_delta * stride_hn, up, mask=mask)
            act = glu_fwd(gate.to(tl.float32), up.to(tl.float32), ACT, ALPHA, CLAMP, LIMIT, UP_SHIFT)
        else:
            act = act_fwd(gate.to(tl.float32), ACT, ALPHA)
        tl.store(out_ptr + rows64[:, None] * stride_om + cols[None, :] * stride_on, act.to(io_dtype), mask=mask)
    elif EPILOGUE == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + e.to(tl.int64) * stride_biase + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if SCALE:
            acc = acc * tl.load(rw_ptr + rows, mask=row_mask, other=0.0)[:, None]
        tl.atomic_add(out_ptr + tokens[:, None] * stride_om + cols[None, :] * stride_on, acc, mask=mask,
                      sem="relaxed")
    else:
        # EPI_STORE: the plain product, in the input dtype, at the sorted row (activation backward runs
        # after, as a separate bandwidth-bound kernel: see act_backward.py for why).
        out_ptrs = out_ptr + rows64[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def expert_wgrad_kernel(
    p_ptr, stride_pr, stride_pm,
    q_ptr, stride_qr, stride_qn,
    token_ptr, offsets_ptr,
    out_ptr, stride_oe, stride_om, stride_on,
    s_desc, desc_ok,
    Md, Nd, E, rows_bucket,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    GATHER_P: tl.constexpr, GATHER_Q: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    S_DESC: tl.constexpr,
):
    """dW[e] = sum over rows r of expert e of P[row r]^T Q[row r] (grouped X^T.dY over each expert's
    contiguous rows), with P row r = p[token[r]] when GATHER_P, likewise Q. No scaling in the loop: the
    operands go from memory to the tensor cores untouched (the routing weight is folded in upstream).

    S_DESC: the operand that is not gathered (exactly one is, in both uses) is read through a 2-D tensor
    descriptor `s_desc` over its [N, cols] rows. A tile may then run past the expert's last row into the
    next expert's; the gathered operand's rows there are masked to zero, so they add nothing (for finite
    values: an inf there makes the next expert's gradient non-finite anyway). `desc_ok` (1 when s_desc
    exists) is unused in the body: it keys the autotuner, whose choice of S_DESC depends on it."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(Md, BM)
    num_n = tl.cdiv(Nd, BN)
    e = pid // (num_m * num_n)
    tile = pid % (num_m * num_n)
    # Grouped ordering within the expert: programs in flight share GROUP_M row slabs of P and sweep
    # Q's columns together, so an expert's Q (e.g. a_NI, 58 MB for Mixtral) is not re-read per slab.
    num_in_group = GROUP_M * num_n
    first_m = (tile // num_in_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % num_in_group) % group_m
    pid_n = (tile % num_in_group) // group_m
    start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(offsets_ptr + e)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_mask = offs_m < Md
    n_mask = offs_n < Nd
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(start, end, BK):
        rows = r0 + tl.arange(0, BK)
        r_mask = rows < end
        if GATHER_P or GATHER_Q:
            tokens = tl.load(token_ptr + rows, mask=r_mask, other=0).to(tl.int64)
        p_rows = rows.to(tl.int64)
        q_rows = rows.to(tl.int64)
        if GATHER_P:
            p_rows = tokens
        if GATHER_Q:
            q_rows = tokens
        if S_DESC and not GATHER_P:
            p = s_desc.load([r0, pid_m * BM])
        else:
            p = tl.load(p_ptr + p_rows[:, None] * stride_pr + offs_m[None, :] * stride_pm,
                        mask=r_mask[:, None] & m_mask[None, :], other=0.0)
        if S_DESC and not GATHER_Q:
            q = s_desc.load([r0, pid_n * BN])
        else:
            q = tl.load(q_ptr + q_rows[:, None] * stride_qr + offs_n[None, :] * stride_qn,
                        mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        acc = tl.dot(tl.trans(p), q, acc, input_precision=DOT_PREC)
    out_ptrs = out_ptr + e.to(tl.int64) * stride_oe + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

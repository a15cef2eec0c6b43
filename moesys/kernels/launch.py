"""Launchers for the expert kernels: pick a tile config (autotuned per shape family on CUDA, cached by
Triton per key; one fixed small config under the interpreter), compute grids, pass strides. Also says
where the kernels can run at all (`unavailable_reason`), for every kernel module of this package.

Legend: N routed rows in expert order, E experts; A [rows, Kd], B[e] read as [Kd, Nd].
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from moesys.kernels.act_backward import act_backward_kernel
from moesys.kernels.act_forward import act_forward_kernel
from moesys.kernels.grouped_gemm import EPI_ACT_FWD, expert_wgrad_kernel, grouped_gemm_kernel
from moesys.kernels.token_sum import token_sum_kernel


def is_interpreted() -> bool:
    """True when Triton decorated our kernels for its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(grouped_gemm_kernel, InterpretedFunction)


def unavailable_reason(device) -> str | None:
    """None when these kernels can run on `device`, else a sentence saying why not."""
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available in this PyTorch build or machine"
    if device.type == "cpu":
        if is_interpreted():
            return None
        return ("the Triton kernels need a CUDA device; on the CPU they run only under Triton's interpreter "
                "(set TRITON_INTERPRET=1 before moesys.kernels is imported; slow, meant for tests)")
    return f"device type {device.type!r} is not supported (use a CUDA device, or the CPU under TRITON_INTERPRET=1)"


def _rows_bucket(n: int) -> int:
    # Autotune key: one tuning per power-of-two band of routed rows, so decode steps with slightly
    # different T reuse a config instead of retuning.
    return 1 << max(0, int(n - 1).bit_length()) if n > 0 else 0


def _set_desc_blocks(nargs: dict) -> None:
    """Give the launch's tensor descriptors, if any, the tile shape of the config being launched."""
    bm, bn, bk = nargs["BM"], nargs["BN"], nargs["BK"]
    if nargs.get("b_desc") is not None:  # grouped GEMM: the weights
        nargs["b_desc"].block_shape = [1, bn, bk] if nargs["B_KCONTIG"] else [1, bk, bn]
    if nargs.get("s_desc") is not None:  # weight gradient: the sorted operand, P ([rows, Md]) or Q
        nargs["s_desc"].block_shape = [bk, bn] if nargs["GATHER_P"] else [bk, bm]


def _cfg(bm, bn, bk, warps, stages, group_m=8, **flags):
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": group_m, **flags}, num_warps=warps,
                         num_stages=stages, pre_hook=_set_desc_blocks)


# Training-size tiles (many rows per expert) and decode tiles (a few rows per expert: BM=16 so each
# touched expert's weight columns are read by exactly one row block, i.e. once). The training lists are
# the winners of an H100 sweep over 11 tile shapes per kernel (bench/moe_stages.py --sweep): 4-stage
# pipelines of 128x256 tiles for the plain and scatter GEMMs, 128x128 for the gated epilogue (its two
# accumulators spill at 128x256), plus small tiles for experts with few rows.
_GEMM_TRAIN = [_cfg(128, 256, 64, 8, 4), _cfg(128, 128, 64, 8, 4), _cfg(128, 256, 64, 8, 3),
               _cfg(64, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 4)]
_GEMM_TRAIN_GATED = [_cfg(128, 128, 64, 8, 4), _cfg(128, 128, 64, 8, 3), _cfg(128, 64, 64, 4, 4),
                     _cfg(64, 128, 64, 4, 4)]
_GEMM_DECODE = [_cfg(16, 64, 128, 4, 4, 1), _cfg(16, 128, 128, 4, 4, 1), _cfg(16, 64, 256, 4, 3, 1),
                _cfg(32, 64, 128, 4, 4, 1)]
_WGRAD_TILES = [(128, 256, 32, 8, 5), (128, 128, 32, 4, 5), (128, 128, 64, 8, 4), (128, 128, 64, 8, 3),
                (64, 128, 64, 4, 4)]
# Each tile with the sorted operand through pointers and through TMA: which wins is measured per shape.
_WGRAD = [_cfg(*t, S_DESC=False) for t in _WGRAD_TILES] + [_cfg(*t, S_DESC=True) for t in _WGRAD_TILES]


def _dedup(configs):
    seen, out = set(), []
    for c in configs:
        key = (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _prune_gemm(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}  # we launch with keywords only, which Triton passes as kwargs
    rows_per_expert = args["rows_bucket"] / max(1, args["E"])
    if rows_per_expert <= 64:
        return _fitting_all(_GEMM_DECODE, args)
    gated_fwd = args["GATED"] and args["EPILOGUE"] == EPI_ACT_FWD
    return _fitting_all(_GEMM_TRAIN_GATED if gated_fwd else _GEMM_TRAIN, args)


# Tuned configs are cached on disk (Triton's cache dir) where this Triton can, so each shape family is
# tuned once per machine rather than once per process.
_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}

_gemm_tuned = triton.autotune(
    configs=_dedup(_GEMM_TRAIN + _GEMM_TRAIN_GATED + _GEMM_DECODE),
    key=["rows_bucket", "Kd", "Nd", "E", "EPILOGUE", "GATED", "GATHER_A", "B_DESC"],
    prune_configs_by={"early_config_prune": _prune_gemm},
    reset_to_zero=["out_ptr"],  # the scatter epilogue accumulates atomically
    **_CACHE,
)(grouped_gemm_kernel)

def _prune_wgrad(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    return _fitting_all([c for c in configs if args["desc_ok"] or not c.kwargs["S_DESC"]], args)


_wgrad_tuned = triton.autotune(configs=_WGRAD, key=["rows_bucket", "Md", "Nd", "E", "GATHER_P", "desc_ok"],
                               prune_configs_by={"early_config_prune": _prune_wgrad}, **_CACHE)(expert_wgrad_kernel)

# The activation pass streams ~6 values per routed row and column at memory bandwidth; how many rows and
# columns a program takes decides how many loads are in flight (one fixed shape ran at ~55% of copy speed
# on an H200). It overwrites g and h in place, so tuning runs restore both between trials. A 2D grid of one
# tile per program (d topk_weights by atomic adds) was 1.02-1.06x this loop's time at its best config on the
# three training shapes (H200, bench/results/act_backward_ab_76b7b4f.json), so each program keeps its loop.
_act_backward_tuned = triton.autotune(
    configs=[triton.Config({"BR": br, "BC": bc}, num_warps=w) for br, bc, w in
             [(16, 256, 4), (32, 256, 8), (8, 512, 4), (16, 512, 8), (64, 128, 8), (32, 128, 4), (4, 1024, 4)]],
    key=["rows_bucket", "I", "GATED", "ACT"], restore_value=["h_ptr", "g_ptr"], **_CACHE)(act_backward_kernel)

# The forward activation pass (h -> a) streams 3 values per row and column of a; a 2D grid over rows and
# columns, so the tile only decides the loads in flight per program.
_act_forward_tuned = triton.autotune(
    configs=[triton.Config({"BR": br, "BC": bc}, num_warps=w) for br, bc, w in
             [(16, 256, 4), (8, 512, 4), (32, 256, 8), (16, 512, 8)]],
    key=["I", "GATED", "ACT"], **_CACHE)(act_forward_kernel)

_INTERP = {"BM": 16, "BN": 16, "BK": 16}


@dataclasses.dataclass(frozen=True)
class TritonSwitches:
    """The MOESYS_TRITON_* environment switches.

    autotune: MOESYS_TRITON_AUTOTUNE=0 launches the first fitting config of the shape family instead
        of tuning (tests, where compiling every config of every kernel variant costs more than the checks).
    tma: MOESYS_TRITON_TMA=0 reads the weights through pointers everywhere (benchmarks compare the paths).
    wgrad, dgrad, fwd: MOESYS_TRITON_WGRAD / _DGRAD / _FWD, one of GEMM_IMPLS (see wgrad_impl, dgrad_impl,
        fwd_impl)."""
    autotune: bool = True
    tma: bool = True
    wgrad: str = "auto"
    dgrad: str = "auto"
    fwd: str = "auto"

    @classmethod
    def from_env(cls, env=os.environ) -> "TritonSwitches":
        gemm = {}
        for field in ("wgrad", "dgrad", "fwd"):
            var = f"MOESYS_TRITON_{field.upper()}"
            gemm[field] = env.get(var, "auto")
            if gemm[field] not in GEMM_IMPLS:
                raise ValueError(f"{var}={gemm[field]!r} is unknown; use one of {list(GEMM_IMPLS)}")
        return cls(autotune=env.get("MOESYS_TRITON_AUTOTUNE", "1") != "0",
                   tma=env.get("MOESYS_TRITON_TMA", "1") != "0", **gemm)


@functools.cache
def switches() -> TritonSwitches:
    """The switches, read from the environment at the first kernel launch and kept: launches never read
    os.environ. A bad value raises ValueError here (and again at each launch until it is fixed)."""
    return TritonSwitches.from_env()


def reload_switches() -> TritonSwitches:
    """Read the environment again: for tests and benchmarks that change a switch within one process."""
    switches.cache_clear()
    return switches()


def _autotune() -> bool:
    return switches().autotune


_SMEM_BYTES = 200 * 1024  # below the H100/H200 limit of 227 KiB per block: epilogues take some too
_SMALL = _cfg(32, 32, 32, 4, 2)  # fits every dtype and epilogue


def _fits(c: triton.Config, args, smem_bytes: int = _SMEM_BYTES) -> bool:
    """Whether a config's pipelined tiles fit in shared memory (fp32 tiles take twice a bf16's; the gated
    forward epilogue reads two weight tiles)."""
    elem = 4 if not args["UPCAST"] and args["DOT_PREC"] == "ieee" else 2
    b_tiles = 2 if args.get("GATED") and args.get("EPILOGUE") == EPI_ACT_FWD else 1
    k = c.kwargs
    return c.num_stages * (k["BM"] * k["BK"] + b_tiles * k["BK"] * k["BN"]) * elem <= smem_bytes


def _fitting_all(configs, args) -> list:
    """The configs that fit, or the one small config: the autotuner raises OutOfResources when every
    config it may try is too big (the bf16-tuned tiles in fp32, as an fp32 model's forward launches)."""
    return [c for c in configs if _fits(c, args)] or [_SMALL]


def _fitting(configs, args):
    """The first config that fits (the launch without autotuning)."""
    return _fitting_all(configs, args)[0]


_forced: triton.Config | None = None


@contextlib.contextmanager
def forced_config(cfg: triton.Config):
    """Launch every kernel with `cfg` instead of tuning (benchmarks sweep tile configs with this)."""
    global _forced
    old, _forced = _forced, cfg
    try:
        yield
    finally:
        _forced = old


def _launch(tuned, kernel, grid, args, configs):
    if _forced is not None or is_interpreted() or not _autotune():
        if _forced is not None:
            cfg = _forced
        elif is_interpreted():
            cfg = triton.Config({**_INTERP, "GROUP_M": 4})
        else:
            cfg = _fitting(configs, args)
        meta = dict(cfg.kwargs)
        if "s_desc" in args:  # weight gradient: TMA when the launch has a descriptor, unless the config says not
            meta["S_DESC"] = args["s_desc"] is not None and meta.get("S_DESC", True)
        _set_desc_blocks({**args, **meta})
        kernel[grid(meta)](**args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        tuned[grid](**args)  # each config's pre_hook shapes the descriptor


def _common(x: torch.Tensor) -> dict:
    return {
        "UPCAST": is_interpreted() and x.dtype == torch.bfloat16,
        "DOT_PREC": "ieee" if x.dtype == torch.float32 else "tf32",
    }


def _tma_enabled() -> bool:
    return switches().tma


def tensor_descriptor(t: torch.Tensor) -> TensorDescriptor | None:
    """A tensor descriptor over `t` as stored, or None when TMA cannot read it: the last axis contiguous, the
    base and the other strides 16-byte aligned, rows of at least 16 bytes (the hardware's rules)."""
    if not _tma_enabled() or t.stride(-1) != 1:
        return None
    es = t.element_size()
    if t.data_ptr() % 16 or any((st * es) % 16 for st in t.stride()[:-1]) or t.shape[-1] * es < 16:
        return None
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [16] * t.dim())  # block set per launched config


def _act_args(act) -> dict:
    """The activation constexprs of a launch: a dict from `act.act_constexprs`, or a bare function code (the
    plain function, no parameters: what benchmarks pass), or None (an epilogue without activation)."""
    if act is None:
        return {"ACT": 0}
    return act if isinstance(act, dict) else {"ACT": int(act)}


def grouped_gemm(a, w, w_strides, Kd, Nd, token_N, offsets_E, *, epilogue, out, gather_a, gated=False, I=0,
                 h=None, bias=None, rw_N=None, save_h=False, act=None):
    """One launch of `grouped_gemm_kernel` over the N = token_N.numel() expert-sorted rows.

    `w_strides` = (stride_e, stride_k, stride_n) reading w[e] as a [Kd, Nd] matrix (w is [E, Nd, Kd] or
    [E, Kd, Nd] in memory; which one is read off the strides). `act`: the activation epilogue's
    constexprs (`act.act_constexprs`, or a function code)."""
    N = token_N.numel()
    act = _act_args(act)
    # TMA for k-contiguous weights only (forward): on the n-contiguous layout of the backward GEMMs it was
    # slower than pointer loads in an H200 A/B (bwd_dx Mixtral 6.20 vs 5.98 ms; bench/results/moe_stages*).
    # Interleaved gate/up rows (every other row) go through pointers too.
    interleaved = gated and epilogue == EPI_ACT_FWD and act.get("INTERLEAVED", False)
    b_desc = tensor_descriptor(w) if w_strides[1] == 1 and not interleaved else None
    E = offsets_E.numel()
    dummy = out
    h_ = h if h is not None else dummy
    args = dict(
        a_ptr=a, stride_am=a.stride(0), stride_ak=a.stride(1),
        b_ptr=w, stride_be=w_strides[0], stride_bk=w_strides[1], stride_bn=w_strides[2], b_desc=b_desc,
        token_ptr=token_N, offsets_ptr=offsets_E, rw_ptr=rw_N if rw_N is not None else offsets_E,
        out_ptr=out, stride_om=out.stride(0), stride_on=out.stride(1),
        h_ptr=h_, stride_hm=h_.stride(0), stride_hn=h_.stride(1),
        bias_ptr=bias if bias is not None else dummy, stride_biase=bias.stride(0) if bias is not None else 0,
        num_rows=N, Kd=Kd, Nd=Nd, E=E, I=I, rows_bucket=_rows_bucket(N),
        E_P2=triton.next_power_of_2(E), EPILOGUE=epilogue, GATHER_A=gather_a, GATED=gated,
        HAS_BIAS=bias is not None, SAVE_H=save_h, SCALE=rw_N is not None, **act, **_common(a),
        B_DESC=b_desc is not None, B_KCONTIG=w_strides[1] == 1,
    )

    def grid(meta):
        return ((triton.cdiv(N, meta["BM"]) + E) * triton.cdiv(Nd, meta["BN"]),)

    _launch(_gemm_tuned, grouped_gemm_kernel, grid, args, _prune_gemm(None, {}, **args))


def expert_wgrad(p, q, token_N, offsets_E, out, *, gather_p, gather_q):
    """out[e] = sum over rows r of expert e of P[r]^T Q[r]; out is [E, Md, Nd] (a weight's layout)."""
    E, Md, Nd = out.shape
    assert gather_p != gather_q, "exactly one operand is gathered in both uses"
    s_desc = tensor_descriptor(q if gather_p else p) if token_N.numel() else None
    args = dict(
        p_ptr=p, stride_pr=p.stride(0), stride_pm=p.stride(1),
        q_ptr=q, stride_qr=q.stride(0), stride_qn=q.stride(1),
        token_ptr=token_N, offsets_ptr=offsets_E,
        out_ptr=out, stride_oe=out.stride(0), stride_om=out.stride(1), stride_on=out.stride(2),
        s_desc=s_desc, desc_ok=int(s_desc is not None),
        Md=Md, Nd=Nd, E=E, rows_bucket=_rows_bucket(token_N.numel()),
        GATHER_P=gather_p, GATHER_Q=gather_q, **_common(p),
    )

    def grid(meta):
        return (E * triton.cdiv(Md, meta["BM"]) * triton.cdiv(Nd, meta["BN"]),)

    _launch(_wgrad_tuned, expert_wgrad_kernel, grid, args, _WGRAD)


GEMM_IMPLS = ("auto", "triton", "grouped_mm")


def _cublas_grouped_ok(*operands: torch.Tensor) -> bool:
    """Whether torch's CUDA grouped GEMM takes these operands: bf16, sm90+, every size but the leading one
    (routed rows of [N, C] operands, experts of [E, R, C] weights) a multiple of 16 bytes."""
    a = operands[0]
    return (a.device.type == "cuda" and all(t.dtype == torch.bfloat16 for t in operands)
            and torch.cuda.get_device_capability(a.device) >= (9, 0)
            and all((d * t.element_size()) % 16 == 0 for t in operands for d in t.shape[1:]))


def _rows_contiguous(w: torch.Tensor) -> bool:
    """Whether each expert's matrix of w [E, R, C] is stored with contiguous rows and 16-byte aligned strides,
    as cuBLAS reads a weight (the dgrad GEMMs read it as stored, the forward as its transpose)."""
    return w.stride(-1) == 1 and all((st * w.element_size()) % 16 == 0 for st in w.stride()[:-1])


def _gemm_impl(choice: str, cublas_ok: bool) -> str:
    """A switch's choice (TritonSwitches), or for "auto" (the default) cuBLAS where it can run."""
    if choice != "auto":
        return choice
    return "grouped_mm" if cublas_ok else "triton"


def wgrad_impl(p: torch.Tensor, q: torch.Tensor) -> str:
    """Which weight-gradient GEMM runs: "grouped_mm" (gather the token-ordered operand into expert order,
    then cuBLAS's grouped GEMM over the contiguous rows, as ScatterMoE's backward groups X) or "triton"
    (`expert_wgrad_kernel`, gathering inside the GEMM). "auto" takes grouped_mm where torch's CUDA kernel
    exists (bf16, sm90+, 16-byte strides): in an H200 A/B, copy included, it took 0.74-0.99x the Triton
    kernel's time on the Mixtral / Qwen3 / OLMoE shapes (bench/results/moe_stages.json; dW_down of the
    small training config, 2048 rows per expert, was the one loss: 1.15x). The copy is freed at once.
    MOESYS_TRITON_WGRAD picks."""
    return _gemm_impl(switches().wgrad, _cublas_grouped_ok(p, q))


def dgrad_impl(a: torch.Tensor, w: torch.Tensor) -> str:
    """Which GEMM computes the two data gradients of the backward (g = dy[token] W_down, and dx): "triton"
    (`grouped_gemm_kernel`: dy gathered inside the GEMM; dx scatter-added into an fp32 [T, H] buffer by its
    epilogue) or "grouped_mm" (cuBLAS's grouped GEMM over expert-ordered rows: dy gathered into a copy that
    dW_down reuses, dx written per routed row and folded per token by `token_sum`). "auto" takes grouped_mm
    where torch's CUDA kernel takes the operands (bf16, sm90+, 16-byte rows). On an H200
    (bench/results/moe_stages_6e28313.json, copies included) cuBLAS's dx took 0.89-1.0x the Triton kernel's
    time on the Mixtral, Qwen3-30B-A3B and OLMoE shapes; its g 0.97x on Mixtral and 1.2-1.3x on the other
    two, which its copy of dy then saves in dW_down (the two together about even there).
    MOESYS_TRITON_DGRAD picks."""
    return _gemm_impl(switches().dgrad, _rows_contiguous(w) and _cublas_grouped_ok(a, w))


def fwd_impl(x: torch.Tensor, w_gate_up: torch.Tensor, *, save_h: bool, has_bias: bool) -> str:
    """Which GEMM runs the gate/up projection of a training forward: "triton" (x gathered inside the GEMM,
    the activation in its epilogue, h stored beside a) or "grouped_mm" (x gathered into expert order, cuBLAS's
    grouped GEMM writes h, `act_forward` reads it back into a). Only when h is saved (training) and there
    is no bias: otherwise the fused kernel skips writing h and cuBLAS has nothing to gain. "auto" takes
    cuBLAS for H >= 4096 where torch's CUDA kernel takes the operands: the extra pass moves ~3 values per
    row and column of a, against H multiply-adds each in the GEMM, so it pays only for deep GEMMs. On an
    H200 (bench/results/moe_stages_6e28313.json, copies and the pass included) cuBLAS took 0.92x the fused
    kernel's time on Mixtral (H 4096), 1.10x on Qwen3-30B-A3B and 1.06x on OLMoE (H 2048).
    MOESYS_TRITON_FWD picks."""
    choice = _gemm_impl(switches().fwd, x.shape[1] >= 4096 and _rows_contiguous(w_gate_up)
                        and _cublas_grouped_ok(x, w_gate_up))
    if choice == "grouped_mm" and not (save_h and not has_bias):
        return "triton"
    return choice


def weight_grad(p, q, token_N, offsets_E, *, gather_p, gathered=None):
    """[E, Md, Nd]: for each expert e, the sum over its rows r of P[r]^T Q[r], where P is [N, Md] and Q is
    [N, Nd] in expert order except the gathered one (`gather_p`: P; else Q), which is in token order and
    read through token_N. `gathered`, when given, is that operand already gathered into expert order (the
    grouped_mm path then skips its own copy). One of the two implementations of `wgrad_impl`."""
    E, Md, Nd = offsets_E.numel(), p.shape[1], q.shape[1]
    if wgrad_impl(p, q) == "grouped_mm":
        if gathered is None:
            gathered = (p if gather_p else q).index_select(0, token_N)
        if gather_p:
            p = gathered
        else:
            q = gathered
        return torch._grouped_mm(p.t(), q, offs=offsets_E)
    out = torch.empty(E, Md, Nd, dtype=p.dtype, device=p.device)
    expert_wgrad(p, q, token_N, offsets_E, out, gather_p=gather_p, gather_q=not gather_p)
    return out


def token_sum(rows_NH: torch.Tensor, inv_N: torch.Tensor, T: int, K: int,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """[T, H]: out[t] = sum over j ascending of rows_NH[inv_N[t*K + j]] (expert-ordered rows folded per token),
    in fp32, rounded once to `dtype` (default: the rows')."""
    H = rows_NH.shape[1]
    out = rows_NH.new_empty(T, H, dtype=dtype)
    if T == 0 or H == 0:
        return out
    BH = 16 if is_interpreted() else min(1024, triton.next_power_of_2(H))
    token_sum_kernel[(T, triton.cdiv(H, BH))](rows_NH, rows_NH.stride(0), inv_N, out, out.stride(0), H, K, BH=BH,
                                              num_warps=1 if is_interpreted() else 4)
    return out


def act_forward(h, a, *, gated, I, act):
    """a = glu(gate, up) (gated: h is [N, 2I]) or act(h), over the N sorted rows, into `a` [N, I]; `act` is
    the activation's constexprs (`act.act_constexprs`)."""
    N = h.shape[0]
    if N == 0:
        return
    act = _act_args(act)
    args = (h, h.stride(0), a, a.stride(0), N, I)
    if is_interpreted() or not _autotune():
        meta = {"BR": 4, "BC": 16} if is_interpreted() else {"BR": 16, "BC": 256, "num_warps": 4}
        act_forward_kernel[(triton.cdiv(N, meta["BR"]), triton.cdiv(I, meta["BC"]))](*args, GATED=gated, **act,
                                                                                      **meta)
    else:
        _act_forward_tuned[lambda meta: (triton.cdiv(N, meta["BR"]), triton.cdiv(I, meta["BC"]))](
            *args, GATED=gated, **act)


def act_backward(h, g, dh, rw_N, drw_N, *, gated, I, act):
    """Activation backward over the N sorted rows, after g = dy[token] W_down is in `g`: writes
    dh = d act * (w g) (both halves when gated), replaces g by w * act(h) in place, and stores
    drw[r] = act(h[r]) . g[r]; `act` is the activation's constexprs (`act.act_constexprs`)."""
    N = g.shape[0]
    act = _act_args(act)
    args = (h, h.stride(0), g, g.stride(0), dh, dh.stride(0), rw_N, drw_N, N, I, _rows_bucket(N))
    if is_interpreted() or not _autotune():
        meta = {"BR": 4, "BC": 16} if is_interpreted() else {"BR": 16, "BC": 256, "num_warps": 4}
        act_backward_kernel[(triton.cdiv(N, meta["BR"]),)](*args, GATED=gated, **act, **meta)
    else:
        _act_backward_tuned[lambda meta: (triton.cdiv(N, meta["BR"]),)](*args, GATED=gated, **act)

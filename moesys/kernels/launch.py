"""Launchers for the expert kernels: pick a tile config (autotuned per shape family on CUDA, cached by
Triton per key; one fixed small config under the interpreter), compute grids, pass strides.

Legend: N routed rows in expert order, E experts; A [rows, Kd], B[e] read as [Kd, Nd].
"""

from __future__ import annotations

import os

import torch
import triton

from moesys.kernels.grouped_gemm import expert_wgrad_kernel, grouped_gemm_kernel


def is_interpreted() -> bool:
    """True when Triton decorated our kernels for its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(grouped_gemm_kernel, InterpretedFunction)


def _rows_bucket(n: int) -> int:
    # Autotune key: one tuning per power-of-two band of routed rows, so decode steps with slightly
    # different T reuse a config instead of retuning.
    return 1 << max(0, int(n - 1).bit_length()) if n > 0 else 0


def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": group_m}, num_warps=warps, num_stages=stages)


# Training-size tiles (many rows per expert) and decode tiles (a few rows per expert: BM=16 so each
# touched expert's weight columns are read by exactly one row block, i.e. once).
_GEMM_TRAIN = [_cfg(128, 128, 64, 8, 3), _cfg(128, 128, 64, 4, 4), _cfg(128, 256, 64, 8, 3),
               _cfg(64, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 4)]
_GEMM_TRAIN_GATED = [_cfg(128, 128, 64, 8, 3), _cfg(128, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4),
                     _cfg(128, 128, 32, 8, 4)]
_GEMM_DECODE = [_cfg(16, 64, 128, 4, 4, 1), _cfg(16, 128, 128, 4, 4, 1), _cfg(16, 64, 256, 4, 3, 1),
                _cfg(32, 64, 128, 4, 4, 1)]
_WGRAD = [_cfg(128, 128, 64, 8, 3), _cfg(128, 128, 64, 4, 4), _cfg(128, 256, 64, 8, 3), _cfg(64, 128, 64, 4, 4),
          _cfg(128, 128, 32, 4, 5)]


def _prune_gemm(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}  # we launch with keywords only, which Triton passes as kwargs
    rows_per_expert = args["rows_bucket"] / max(1, args["E"])
    gated_fwd = args["GATED"] and args["EPILOGUE"] == 0
    if rows_per_expert <= 64:
        return _GEMM_DECODE
    return _GEMM_TRAIN_GATED if gated_fwd else _GEMM_TRAIN


_gemm_tuned = triton.autotune(
    configs=_GEMM_TRAIN + _GEMM_TRAIN_GATED + _GEMM_DECODE,
    key=["rows_bucket", "Kd", "Nd", "E", "EPILOGUE", "GATED", "GATHER_A"],
    prune_configs_by={"early_config_prune": _prune_gemm},
    reset_to_zero=["out_ptr", "drw_ptr"],  # the scatter and act-backward epilogues accumulate atomically
)(grouped_gemm_kernel)

_wgrad_tuned = triton.autotune(configs=_WGRAD, key=["rows_bucket", "Md", "Nd", "E", "GATHER_P"])(expert_wgrad_kernel)

_INTERP = {"BM": 16, "BN": 16, "BK": 16}


def _autotune() -> bool:
    # MOESYS_TRITON_AUTOTUNE=0 launches the first config of the shape family instead of tuning: for tests,
    # where compiling every config of every kernel variant costs more than the checks themselves.
    return os.environ.get("MOESYS_TRITON_AUTOTUNE", "1") != "0"


def _launch(tuned, kernel, grid, args, configs):
    if is_interpreted():
        kernel[grid(_INTERP)](**args, **_INTERP, GROUP_M=4)
    elif _autotune():
        tuned[grid](**args)
    else:
        cfg = configs[0]
        kernel[grid(cfg.kwargs)](**args, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _common(x: torch.Tensor) -> dict:
    return {
        "UPCAST": is_interpreted() and x.dtype == torch.bfloat16,
        "DOT_PREC": "ieee" if x.dtype == torch.float32 else "tf32",
    }


def grouped_gemm(a, w, w_strides, Kd, Nd, token_N, offsets_E, *, epilogue, out, gather_a, gated=False, I=0,
                 h=None, dh=None, bias=None, rw_N=None, drw_N=None, save_h=False, act=0):
    """One launch of `grouped_gemm_kernel` over the N = token_N.numel() expert-sorted rows.

    `w_strides` = (stride_e, stride_k, stride_n) reading w[e] as a [Kd, Nd] matrix."""
    N = token_N.numel()
    E = offsets_E.numel()
    dummy = out
    h_ = h if h is not None else dummy
    dh_ = dh if dh is not None else dummy
    args = dict(
        a_ptr=a, stride_am=a.stride(0), stride_ak=a.stride(1),
        b_ptr=w, stride_be=w_strides[0], stride_bk=w_strides[1], stride_bn=w_strides[2],
        token_ptr=token_N, offsets_ptr=offsets_E, rw_ptr=rw_N if rw_N is not None else offsets_E,
        out_ptr=out, stride_om=out.stride(0), stride_on=out.stride(1),
        h_ptr=h_, stride_hm=h_.stride(0), stride_hn=h_.stride(1),
        dh_ptr=dh_, stride_dm=dh_.stride(0), stride_dn=dh_.stride(1),
        bias_ptr=bias if bias is not None else dummy, stride_biase=bias.stride(0) if bias is not None else 0,
        drw_ptr=drw_N if drw_N is not None else out,
        num_rows=N, Kd=Kd, Nd=Nd, E=E, I=I, rows_bucket=_rows_bucket(N),
        E_P2=triton.next_power_of_2(E), EPILOGUE=epilogue, GATHER_A=gather_a, GATED=gated,
        HAS_BIAS=bias is not None, SAVE_H=save_h, SCALE=rw_N is not None, ACT=act, **_common(a),
    )

    def grid(meta):
        return ((triton.cdiv(N, meta["BM"]) + E) * triton.cdiv(Nd, meta["BN"]),)

    _launch(_gemm_tuned, grouped_gemm_kernel, grid, args, _prune_gemm(None, {}, **args))


def expert_wgrad(p, q, token_N, offsets_E, out, *, gather_p, gather_q, rw_N=None):
    """out[e] = sum over rows r of expert e of P[r]^T Q[r]; out is [E, Md, Nd] (a weight's layout)."""
    E, Md, Nd = out.shape
    args = dict(
        p_ptr=p, stride_pr=p.stride(0), stride_pm=p.stride(1),
        q_ptr=q, stride_qr=q.stride(0), stride_qn=q.stride(1),
        token_ptr=token_N, offsets_ptr=offsets_E, rw_ptr=rw_N if rw_N is not None else offsets_E,
        out_ptr=out, stride_oe=out.stride(0), stride_om=out.stride(1), stride_on=out.stride(2),
        Md=Md, Nd=Nd, E=E, rows_bucket=_rows_bucket(token_N.numel()),
        GATHER_P=gather_p, GATHER_Q=gather_q, SCALE_P=rw_N is not None, **_common(p),
    )

    def grid(meta):
        return (E * triton.cdiv(Md, meta["BM"]) * triton.cdiv(Nd, meta["BN"]),)

    _launch(_wgrad_tuned, expert_wgrad_kernel, grid, args, _WGRAD)

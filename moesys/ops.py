"""The functional expert op `moe_mlp` (docs/ARCHITECTURE.md, contracts): input checks and backend dispatch.

Legend: T tokens, H hidden, I expert intermediate, E experts, K top-k.

    y[t] = sum_j topk_weights[t, j] * (W_down[e] @ act(x[t]) + b_down[e]),   e = topk_ids[t, j]

where, for gated activations, act(x) = f(W_gate[e] x + b_gate) * (W_up[e] x + b_up) with
`w_gate_up[e] = [W_gate; W_up]` (gate rows first, transformers v5's fused layout; or gate and up rows
alternating, for an interleaved activation), and for non-gated ones act(x) = f(W_up[e] x + b_up) with
`w_gate_up[e] = W_up`. `moesys.activations` defines the activations (any of its functions, gated or not,
with GPT-OSS's clamp, alpha and up shift) and their names.
"""

from __future__ import annotations

import torch

from moesys.activations import resolve_activation
from moesys import backends

__all__ = ["moe_mlp", "check_moe_mlp_inputs"]


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_moe_mlp_inputs(x_TH, w_gate_up, w_down, topk_ids_TK, topk_weights_TK, activation, b_gate_up, b_down):
    """Raise ValueError/TypeError naming the bad input; returns (E, I, the resolved Activation)."""
    for name, t in (("x", x_TH), ("w_gate_up", w_gate_up), ("w_down", w_down),
                    ("topk_ids", topk_ids_TK), ("topk_weights", topk_weights_TK)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"moe_mlp: {name} must be a torch.Tensor, got {type(t).__name__}")
    try:
        spec = resolve_activation(activation)
    except (ValueError, TypeError) as e:
        raise type(e)(f"moe_mlp: {e}") from None
    if x_TH.dim() != 2:
        raise ValueError(f"moe_mlp: x must be 2-D [T, H], got shape {_shape(x_TH)}; flatten batch and sequence first")
    if not x_TH.is_floating_point():
        raise TypeError(f"moe_mlp: x must be a floating-point tensor, got {x_TH.dtype}")
    T, H = x_TH.shape
    if w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError(f"moe_mlp: w_gate_up and w_down must be 3-D [E, 2I, H] and [E, H, I], "
                         f"got {_shape(w_gate_up)} and {_shape(w_down)}")
    E, H_down, I = w_down.shape
    rows = 2 * I if spec.gated else I
    if tuple(w_gate_up.shape) != (E, rows, H) or H_down != H:
        want = f"[{E}, {'2*' if spec.gated else ''}{I}, {H}]"
        raise ValueError(f"moe_mlp: w_gate_up has shape {_shape(w_gate_up)} but x [T, H={H}] and w_down "
                         f"{_shape(w_down)} [E, H, I] need w_gate_up {want} for activation={activation!r}"
                         + (" (gated: gate rows then up rows)" if spec.gated else ""))
    if E < 1:
        raise ValueError("moe_mlp: need at least one expert (E >= 1)")
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if w.dtype != x_TH.dtype:
            raise TypeError(f"moe_mlp: {name} has dtype {w.dtype} but x has {x_TH.dtype}; cast them to one dtype")
    if topk_ids_TK.dim() != 2 or topk_ids_TK.shape[0] != T:
        raise ValueError(f"moe_mlp: topk_ids must be [T={T}, K], got {_shape(topk_ids_TK)}")
    if topk_ids_TK.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
        raise TypeError(f"moe_mlp: topk_ids must be an integer tensor (int32 or int64), got {topk_ids_TK.dtype}")
    if tuple(topk_weights_TK.shape) != tuple(topk_ids_TK.shape):
        raise ValueError(f"moe_mlp: topk_weights {_shape(topk_weights_TK)} must have the shape of topk_ids "
                         f"{_shape(topk_ids_TK)}")
    if not topk_weights_TK.is_floating_point():
        raise TypeError(f"moe_mlp: topk_weights must be floating point, got {topk_weights_TK.dtype}")
    for name, b, want in (("b_gate_up", b_gate_up, (E, rows)), ("b_down", b_down, (E, H))):
        if b is None:
            continue
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"moe_mlp: {name} must be a tensor or None, got {type(b).__name__}")
        if tuple(b.shape) != want:
            raise ValueError(f"moe_mlp: {name} must have shape [{', '.join(map(str, want))}], got {_shape(b)}")
        if b.dtype != x_TH.dtype:
            raise TypeError(f"moe_mlp: {name} has dtype {b.dtype} but x has {x_TH.dtype}")
    tensors = [x_TH, w_gate_up, w_down, topk_ids_TK, topk_weights_TK] + [b for b in (b_gate_up, b_down) if b is not None]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"moe_mlp: all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    _check_ids_in_range(topk_ids_TK, E)
    return E, I, spec


def _check_ids_in_range(topk_ids_TK: torch.Tensor, E: int) -> None:
    if topk_ids_TK.numel() == 0:
        return
    if topk_ids_TK.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = int(topk_ids_TK.min()), int(topk_ids_TK.max())
        if lo < 0 or hi >= E:
            bad = lo if lo < 0 else hi
            raise ValueError(f"moe_mlp: topk_ids contains expert id {bad}, outside [0, {E - 1}] for E={E} experts")
    elif not torch.compiler.is_compiling():
        # On accelerators a host-side check would synchronise every call (and break CUDA graphs);
        # a device-side assert fails the next synchronising call instead.
        torch._assert_async(((topk_ids_TK >= 0) & (topk_ids_TK < E)).all(),
                            f"moe_mlp: topk_ids outside [0, {E - 1}]")


def moe_mlp(x, w_gate_up, w_down, topk_ids, topk_weights, *, activation="silu", backend="auto",
            b_gate_up=None, b_down=None):
    """Apply top-k routed expert MLPs to tokens; see the module docstring for the exact math.

    Args:
        x: [T, H] tokens.  w_gate_up: [E, 2I, H] (gated) or [E, I, H] (non-gated).  w_down: [E, H, I].
        topk_ids: [T, K] integer expert ids.  topk_weights: [T, K] combine weights.
        activation: a name in `moesys.activations.ACTIVATIONS` ("silu", "gelu_tanh" gated; "gelu", "relu" plain;
            "gated_<f>" / "plain_<f>" for any function) or a `moesys.activations.Activation`.
        backend: "auto" | "loop" | "grouped_mm" | "triton" (see `moesys.backends.available_backends()`).
        b_gate_up: optional [E, 2I] (or [E, I]).  b_down: optional [E, H].
    Returns:
        y: [T, H] in x's dtype, differentiable in x, the weights, the biases and topk_weights.
    """
    _, _, spec = check_moe_mlp_inputs(x, w_gate_up, w_down, topk_ids, topk_weights, activation, b_gate_up, b_down)
    if not isinstance(backend, str):
        raise TypeError(f"moe_mlp: backend must be a string, got {type(backend).__name__}")
    T, K = topk_ids.shape
    E = w_gate_up.shape[0]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w_gate_up, w_down, topk_weights, b_gate_up, b_down))
    rows_per_expert = T * K / E
    args = (x, w_gate_up, w_down, topk_ids, topk_weights)
    kwargs = dict(activation=spec, b_gate_up=b_gate_up, b_down=b_down)
    # A no-grad call on CUDA outside torch.compile's tracing remembers whether its Triton kernels have run,
    # so that "auto" may take them when the same call is captured into a CUDA graph (moesys.backends). The
    # signature is built only where it is read: under capture, in a capture warm-up, after a Triton call.
    remember = backend in ("auto", "triton") and not needs_grad and backends.remembers_triton(x)
    capturing = backends._capturing(x) if remember else None  # None: resolve_backend asks where it needs to
    warming = remember and not capturing and backend == "auto" and backends.warming_for_capture()

    def signature():
        return backends.triton_signature(args + (b_gate_up, b_down), spec.key)

    sig = signature() if capturing or warming else None
    name = backends.resolve_backend(backend, x, rows_per_expert=rows_per_expert, needs_grad=needs_grad,
                                    signature=sig, capturing=capturing)
    if (warming and name != "triton" and not backends.triton_ran(sig)
            and backends.would_capture_triton(x, rows_per_expert)):
        backends.backend_impl("triton")(*args, **kwargs)  # compile, load and tune for the capture; dropped
        backends.note_triton_ran(sig)
    y = backends.backend_impl(name)(*args, **kwargs)
    if remember and not capturing and name == "triton":
        backends.note_triton_ran(sig or signature())
    return y


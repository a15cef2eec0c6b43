"""A float64 per-token oracle for moe_mlp and a helper to compare results. It shares no code with moesys:
its activation formulas, its reading of activation names and its gate/up split are written out here, so
a bug in `moesys.activations` (a gate/up swap, a wrong constant) cannot cancel out in a comparison.

Legend: T tokens, H hidden, I expert intermediate, E experts, K top-k.
"""

from __future__ import annotations

import math

import torch

# elementwise functions, written from their definitions (float64 in, float64 out)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _silu(x, alpha=1.0):
    return x / (1.0 + torch.exp(-alpha * x))


FUNCTIONS = {
    "silu": _silu,
    "quick_gelu": lambda x: _silu(x, 1.702),
    "gelu": lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))),
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "relu2": lambda x: torch.where(x > 0, x * x, torch.zeros_like(x)),
    "sigmoid": lambda x: 1.0 / (1.0 + torch.exp(-x)),
    "mish": lambda x: x * torch.tanh(torch.log1p(torch.exp(x))),
}
# moe_mlp's historical names: gated SiLU and tanh-GELU, plain (non-gated) exact GELU and ReLU
_LEGACY = {"silu": ("silu", True), "gelu_tanh": ("gelu_tanh", True), "gelu": ("gelu", False), "relu": ("relu", False)}


def _describe(activation):
    """(function, gated, alpha, limit, up_shift, interleaved) for a name ("silu", "gated_gelu",
    "plain_relu2", ...) or for any object with those attributes (e.g. moesys.activations.Activation)."""
    if isinstance(activation, str):
        if activation in _LEGACY:
            fn, gated = _LEGACY[activation]
        elif activation.startswith(("gated_", "plain_")):
            fn, gated = activation[6:], activation.startswith("gated_")
        else:
            raise ValueError(f"oracle: unknown activation {activation!r}")
        return fn, gated, 1.0, None, 0.0, False
    a = activation
    return a.fn, a.gated, a.alpha, a.limit, a.up_shift, a.interleaved


def act_oracle(h, activation):
    """The activation of one routed row's gate/up projection h ([2I] gated, [I] plain), float64."""
    fn, gated, alpha, limit, up_shift, interleaved = _describe(activation)
    f = (lambda v: _silu(v, alpha)) if fn == "silu" else FUNCTIONS[fn]
    if not gated:
        return f(h)
    i = h.shape[-1] // 2
    gate, up = (h[..., 0::2], h[..., 1::2]) if interleaved else (h[..., :i], h[..., i:])
    if limit is not None:
        gate = torch.clamp(gate, max=limit)
        up = torch.clamp(up, min=-limit, max=limit)
    return f(gate) * (up + up_shift)


def moe_mlp_oracle(x_TH, w_gate_up, w_down, topk_ids_TK, topk_weights_TK, activation="silu",
                   b_gate_up=None, b_down=None):
    """y[t] = sum_j w[t,j] * expert_{ids[t,j]}(x[t]), one token and one slot at a time, in float64."""
    d = torch.float64
    rows = []
    for t in range(x_TH.shape[0]):
        acc = torch.zeros(x_TH.shape[1], dtype=d)
        for j in range(topk_ids_TK.shape[1]):
            e = int(topk_ids_TK[t, j])
            h = w_gate_up[e].to(d) @ x_TH[t].to(d)
            if b_gate_up is not None:
                h = h + b_gate_up[e].to(d)
            out = w_down[e].to(d) @ act_oracle(h, activation)
            if b_down is not None:
                out = out + b_down[e].to(d)
            acc = acc + topk_weights_TK[t, j].to(d) * out
        rows.append(acc)
    return torch.stack(rows) if rows else torch.zeros(0, x_TH.shape[1], dtype=d)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))

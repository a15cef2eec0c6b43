"""Triton device functions for the expert activations and their derivatives, computed in fp32.

`act_fwd` / `act_grad` are the elementwise functions f (codes `ACT_CODES`, keyed by
`moesys.activations.FUNCTIONS`); `glu_fwd` / `glu_bwd` the gated combination with GPT-OSS's clamp and up
shift. Their parameters come in as constexprs (`act_constexprs`): compiled Triton refuses Python float
globals. The plain-torch reference is `moesys.activations` (the loop backend uses it).
"""

from __future__ import annotations

import triton
import triton.language as tl

from moesys.activations import Activation

# elementwise function -> code passed to the kernels as a constexpr
ACT_CODES = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3, "relu2": 4, "sigmoid": 5, "mish": 6}

# Constants are written as literals inside the kernels: compiled Triton refuses plain Python globals,
# and its interpreter fails on tl.constexpr globals in arithmetic. sqrt(2/pi) = 0.7978845608028654,
# 1/sqrt(2) = 0.7071067811865476, 1/sqrt(2 pi) = 0.3989422804014327.


def act_constexprs(spec: Activation) -> dict:
    """The kernels' activation constexprs for `spec`: ACT (the function's code), ALPHA (silu's sigmoid
    scale), CLAMP and LIMIT (the gated clamp), UP_SHIFT (added to up) and INTERLEAVED (gate/up columns
    alternate); GATED is passed beside them (the kernels use it for their layout too)."""
    return dict(ACT=ACT_CODES[spec.fn], ALPHA=float(spec.alpha), CLAMP=spec.limit is not None,
                LIMIT=float(spec.limit) if spec.limit is not None else 0.0, UP_SHIFT=float(spec.up_shift),
                INTERLEAVED=spec.interleaved)


@triton.jit
def _tanh(x):
    # 2*sigmoid(2x) - 1: exact in fp32 for our use, and avoids depending on a libdevice tanh name.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _softplus(x):
    # log(1 + e^x) without overflow: max(x, 0) + log(1 + e^-|x|)
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def act_fwd(x, ACT: tl.constexpr, ALPHA: tl.constexpr = 1.0):
    if ACT == 0:
        return x * tl.sigmoid(ALPHA * x)
    elif ACT == 1:
        return 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACT == 2:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 3:
        return tl.maximum(x, 0.0)
    elif ACT == 4:
        r = tl.maximum(x, 0.0)
        return r * r
    elif ACT == 5:
        return tl.sigmoid(x)
    else:
        return x * _tanh(_softplus(x))


@triton.jit
def act_grad(x, ACT: tl.constexpr, ALPHA: tl.constexpr = 1.0):
    """d act(x) / dx."""
    if ACT == 0:
        s = tl.sigmoid(ALPHA * x)
        return s + ALPHA * x * s * (1.0 - s)
    elif ACT == 1:
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    elif ACT == 2:
        return 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACT == 3:
        return tl.where(x > 0.0, 1.0, 0.0)
    elif ACT == 4:
        return 2.0 * tl.maximum(x, 0.0)
    elif ACT == 5:
        s = tl.sigmoid(x)
        return s * (1.0 - s)
    else:
        t = _tanh(_softplus(x))
        return t + x * (1.0 - t * t) * tl.sigmoid(x)


@triton.jit
def _clamp_gate_up(gate, up, CLAMP: tl.constexpr, LIMIT: tl.constexpr, UP_SHIFT: tl.constexpr):
    if CLAMP:
        gate = tl.minimum(gate, LIMIT)
        up = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
    if UP_SHIFT != 0.0:
        up = up + UP_SHIFT
    return gate, up


@triton.jit
def glu_fwd(gate, up, ACT: tl.constexpr, ALPHA: tl.constexpr, CLAMP: tl.constexpr, LIMIT: tl.constexpr,
            UP_SHIFT: tl.constexpr):
    """f(min(gate, limit)) * (clamp(up, -limit, limit) + up_shift), or f(gate) * up without clamp and shift."""
    g, u = _clamp_gate_up(gate, up, CLAMP, LIMIT, UP_SHIFT)
    return act_fwd(g, ACT, ALPHA) * u


@triton.jit
def glu_bwd(gate, up, da, ACT: tl.constexpr, ALPHA: tl.constexpr, CLAMP: tl.constexpr, LIMIT: tl.constexpr,
            UP_SHIFT: tl.constexpr):
    """(d gate, d up) of glu_fwd given its output gradient da; a clamped side passes no gradient (where
    it clamps strictly, as torch.clamp)."""
    g, u = _clamp_gate_up(gate, up, CLAMP, LIMIT, UP_SHIFT)
    d_gate = da * u * act_grad(g, ACT, ALPHA)
    d_up = da * act_fwd(g, ACT, ALPHA)
    if CLAMP:
        d_gate = tl.where(gate <= LIMIT, d_gate, 0.0)
        d_up = tl.where((up >= -LIMIT) & (up <= LIMIT), d_up, 0.0)
    return d_gate, d_up

"""Triton device functions for the expert activations and their derivatives, computed in fp32.

The codes match `ACT_CODES`; the plain-torch reference is `moesys.activations` (the loop backend uses it).
"""

from __future__ import annotations

import triton
import triton.language as tl

# activation name -> code passed to the kernels as a constexpr
ACT_CODES = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}

# Constants are written as literals inside the kernels: compiled Triton refuses plain Python globals,
# and its interpreter fails on tl.constexpr globals in arithmetic. sqrt(2/pi) = 0.7978845608028654,
# 1/sqrt(2) = 0.7071067811865476, 1/sqrt(2 pi) = 0.3989422804014327.


@triton.jit
def _tanh(x):
    # 2*sigmoid(2x) - 1: exact in fp32 for our use, and avoids depending on a libdevice tanh name.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def act_fwd(x, ACT: tl.constexpr):
    if ACT == 0:
        return x * tl.sigmoid(x)
    elif ACT == 1:
        return 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACT == 2:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    else:
        return tl.maximum(x, 0.0)


@triton.jit
def act_grad(x, ACT: tl.constexpr):
    """d act(x) / dx."""
    if ACT == 0:
        s = tl.sigmoid(x)
        return s + x * s * (1.0 - s)
    elif ACT == 1:
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    elif ACT == 2:
        return 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    else:
        return tl.where(x > 0.0, 1.0, 0.0)

"""Expert activations by name: which are gated (SwiGLU-style, [gate; up] rows) and their functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# name -> (function, gated)
ACTIVATIONS = {
    "silu": (F.silu, True),
    "gelu_tanh": (_gelu_tanh, True),
    "gelu": (F.gelu, False),
    "relu": (F.relu, False),
}


def is_gated(activation: str) -> bool:
    return ACTIVATIONS[activation][1]


def activation_fn(activation: str):
    return ACTIVATIONS[activation][0]


def apply_activation(h_NF: torch.Tensor, activation: str) -> torch.Tensor:
    """h_NF holds [gate | up] columns for gated activations (F = 2I), the up projection otherwise (F = I)."""
    fn, gated = ACTIVATIONS[activation]
    if gated:
        gate, up = h_NF.chunk(2, dim=-1)
        return fn(gate) * up
    return fn(h_NF)

"""How one expert's tensors are laid out, read off a transformers v5 experts module: the plain layout
(gate_up_proj [E, 2I, H] with gate then up, down_proj [E, H, I]), GPT-OSS's (transposed: gate_up_proj
[E, H, 2I] with gate and up interleaved, down_proj [E, I, H], plus gate_up_proj_bias [E, 2I] and
down_proj_bias [E, H]) or non-gated experts (Nemotron-H: up_proj [E, I, H], down_proj [E, H, I]). The host store and the cache keep every expert in its module's own layout, so the
model's experts implementation runs over the cache slots unchanged.
Legend: E experts, I expert intermediate, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

# cache part name -> the experts module's parameter
PARAM_OF_PART = {"gate_up": "gate_up_proj", "up": "up_proj", "down": "down_proj",
                 "gate_up_bias": "gate_up_proj_bias", "down_bias": "down_proj_bias"}


@dataclass(frozen=True)
class ExpertLayout:
    transposed: bool = False  # weights [in, out] (x @ w) instead of [out, in] (F.linear)
    bias: bool = False  # gate_up_proj_bias and down_proj_bias
    gated: bool = True  # False: up_proj [E, I, H] and an activation, no gate (Nemotron-H)

    def shapes(self, I: int, H: int) -> list[tuple[str, tuple[int, ...]]]:
        """[(cache part name, per-expert shape)] of one unquantized expert."""
        if not self.gated:
            if self.transposed or self.bias:
                raise ValueError(f"non-gated experts with transposed weights or biases are not held yet: {self}")
            return [("up", (I, H)), ("down", (H, I))]
        gate_up, down = ((H, 2 * I), (I, H)) if self.transposed else ((2 * I, H), (H, I))
        parts = [("gate_up", gate_up), ("down", down)]
        if self.bias:
            parts += [("gate_up_bias", (2 * I,)), ("down_bias", (H,))]
        return parts


def is_experts_module(module: nn.Module) -> bool:
    """A v5 experts module: a 3-d gate_up_proj, or (non-gated) a 3-d up_proj; not a dense MLP's nn.Linear."""
    w = getattr(module, "gate_up_proj", None)
    w = getattr(module, "up_proj", None) if w is None else w
    return isinstance(w, torch.Tensor) and w.dim() == 3


def expert_dims(experts: nn.Module) -> tuple[int, int, int, ExpertLayout]:
    """(E, I, H, layout) of a v5 experts module."""
    layout = ExpertLayout(transposed=bool(getattr(experts, "is_transposed", False)),
                          bias=bool(getattr(experts, "has_bias", False)),
                          gated=getattr(experts, "gate_up_proj", None) is not None)
    if not layout.gated:
        E, I, H = experts.up_proj.shape
        layout.shapes(I, H)  # refuses what is not held
        return E, I, H, layout
    E, a, b = experts.gate_up_proj.shape
    two_I, H = (b, a) if layout.transposed else (a, b)
    return E, two_I // 2, H, layout

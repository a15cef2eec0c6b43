"""How one expert's tensors are laid out, read off a transformers v5 experts module: the plain layout
(gate_up_proj [E, 2I, H] with gate then up, down_proj [E, H, I]) or GPT-OSS's (transposed: gate_up_proj
[E, H, 2I] with gate and up interleaved, down_proj [E, I, H], plus gate_up_proj_bias [E, 2I] and
down_proj_bias [E, H]). The host store and the cache keep every expert in its module's own layout, so the
model's experts implementation runs over the cache slots unchanged.
Legend: E experts, I expert intermediate, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

# cache part name -> the experts module's parameter
PARAM_OF_PART = {"gate_up": "gate_up_proj", "down": "down_proj", "gate_up_bias": "gate_up_proj_bias",
                 "down_bias": "down_proj_bias"}


@dataclass(frozen=True)
class ExpertLayout:
    transposed: bool = False  # weights [in, out] (x @ w) instead of [out, in] (F.linear)
    bias: bool = False  # gate_up_proj_bias and down_proj_bias

    def shapes(self, I: int, H: int) -> list[tuple[str, tuple[int, ...]]]:
        """[(cache part name, per-expert shape)] of one unquantized expert."""
        gate_up, down = ((H, 2 * I), (I, H)) if self.transposed else ((2 * I, H), (H, I))
        parts = [("gate_up", gate_up), ("down", down)]
        if self.bias:
            parts += [("gate_up_bias", (2 * I,)), ("down_bias", (H,))]
        return parts


def expert_dims(experts: nn.Module) -> tuple[int, int, int, ExpertLayout]:
    """(E, I, H, layout) of a v5 experts module."""
    if not getattr(experts, "has_gate", True):
        raise ValueError(f"{type(experts).__name__} has non-gated experts (up_proj/down_proj, no gate), which the "
                         "offload store does not hold yet; run it with transformers and "
                         "experts_implementation='moesys' instead")
    layout = ExpertLayout(transposed=bool(getattr(experts, "is_transposed", False)),
                          bias=bool(getattr(experts, "has_bias", False)))
    E, a, b = experts.gate_up_proj.shape
    two_I, H = (b, a) if layout.transposed else (a, b)
    return E, two_I // 2, H, layout

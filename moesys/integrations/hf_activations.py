"""Map a transformers activation module (ACT2FN[...]) to moe_mlp's activation names."""

from __future__ import annotations

import torch.nn as nn
from transformers.activations import GELUActivation, GELUTanh, NewGELUActivation, PytorchGELUTanh, SiLUActivation

# (activation class, gated) -> moe_mlp activation
_GATED = {SiLUActivation: "silu", nn.SiLU: "silu", GELUTanh: "gelu_tanh", PytorchGELUTanh: "gelu_tanh",
          NewGELUActivation: "gelu_tanh"}
_PLAIN = {GELUActivation: "gelu", nn.GELU: "gelu", nn.ReLU: "relu"}


def moesys_activation(act_fn, gated: bool, owner: str) -> str:
    table = _GATED if gated else _PLAIN
    for cls, name in table.items():
        if type(act_fn) is cls:
            if isinstance(act_fn, nn.GELU) and act_fn.approximate != "none":
                break
            return name
    kind = "gated" if gated else "non-gated"
    raise NotImplementedError(f"{owner}: activation {type(act_fn).__name__} in {kind} experts is not supported by "
                              f"the 'moesys' experts implementation (supported: {sorted(set(table.values()))})")

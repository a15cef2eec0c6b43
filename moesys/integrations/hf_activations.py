"""Map a transformers activation module (ACT2FN[...], an experts module's `act_fn`) to moesys's
elementwise function, so `hidden_act="gelu"` etc. run fused in every moe_mlp backend.

transformers' names -> class -> function here:
  silu, swish -> SiLUActivation, nn.SiLU -> "silu";  quick_gelu -> QuickGELUActivation -> silu, alpha 1.702
  gelu, gelu_python -> GELUActivation, nn.GELU -> "gelu" (exact, erf)
  gelu_pytorch_tanh, gelu_python_tanh, gelu_new, gelu_fast, gelu_accurate -> "gelu_tanh" (the same function:
      gelu_fast writes sqrt(2/pi) as 0.7978845608, 3e-11 from the others)
  relu -> "relu";  relu2 -> "relu2";  sigmoid -> "sigmoid";  mish -> "mish"
Anything else (tanh, gelu_10, leaky_relu, xielu, ...) maps to None: the integration then runs the module's
own function between grouped GEMMs.
"""

from __future__ import annotations

import torch.nn as nn
from transformers import activations as hf

from moesys.activations import Activation

# activation class -> (function, alpha)
_CLASSES = {
    hf.SiLUActivation: ("silu", 1.0), nn.SiLU: ("silu", 1.0), hf.QuickGELUActivation: ("silu", 1.702),
    hf.GELUActivation: ("gelu", 1.0),
    hf.GELUTanh: ("gelu_tanh", 1.0), hf.NewGELUActivation: ("gelu_tanh", 1.0),
    hf.FastGELUActivation: ("gelu_tanh", 1.0), hf.AccurateGELUActivation: ("gelu_tanh", 1.0),
    nn.ReLU: ("relu", 1.0), hf.ReLUSquaredActivation: ("relu2", 1.0), nn.Sigmoid: ("sigmoid", 1.0),
    hf.MishActivation: ("mish", 1.0), nn.Mish: ("mish", 1.0),
}


def hf_function(act_fn) -> tuple[str, float] | None:
    """(moesys function, silu's alpha) computing `act_fn`, or None when moesys has no kernel for it."""
    if isinstance(act_fn, nn.GELU):  # torch's module: exact or tanh by its `approximate`
        return {"none": ("gelu", 1.0), "tanh": ("gelu_tanh", 1.0)}.get(act_fn.approximate)
    return _CLASSES.get(type(act_fn))


def moesys_activation(act_fn, gated: bool) -> Activation | None:
    """The Activation of experts computing act_fn(gate) * up (gated) or act_fn(up); None if unknown."""
    found = hf_function(act_fn)
    if found is None:
        return None
    fn, alpha = found
    return Activation(fn, gated, alpha=alpha)

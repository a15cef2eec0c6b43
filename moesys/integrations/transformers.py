"""Run transformers' MoE models through moesys: an experts implementation named "moesys".

    import moesys.integrations.transformers as mt
    mt.register()   # explicit: importing moesys never touches transformers
    model = AutoModelForCausalLM.from_pretrained(d, experts_implementation="moesys")

Registration goes through transformers' public extension point (`ExpertsInterface.register`). Any
`@use_experts_implementation` class runs, in every layout the decorator declares: gate/up concatenated or
interleaved, weights transposed or not, with or without biases, with or without a gate. The weights are
read as views (no copy per call, when they are already in the tokens' dtype).

Two paths:
- fused: the activation is one moesys knows (`experts_activation`): the default gate with an act_fn of
  `hf_activations`, or a custom `_apply_gate` listed in `_KNOWN_GATES` (GPT-OSS's clamped SwiGLU and the
  clamped SiLU gates). `moesys.ops.moe_mlp` then runs it in the chosen backend (Triton kernels on a GPU).
- generic: anything else (another custom `_apply_gate`, an unknown act_fn, a post-expert norm) runs as
  the grouped GEMMs of `moesys.backends.grouped_mm.grouped_experts` with the class's own gate (or act_fn)
  between them and its norm after the down projection, in PyTorch.

Legend: T tokens, H hidden, I expert intermediate, E experts, K top-k.
"""

from __future__ import annotations

import logging

import torch
from transformers.integrations.moe import _default_apply_gate

from moesys.activations import Activation, clamped_swiglu
from moesys.backends import preload
from moesys.backends.grouped_mm import grouped_experts
from moesys.integrations.hf_activations import hf_function, moesys_activation
from moesys.ops import moe_mlp

NAME = "moesys"
logger = logging.getLogger(__name__)


def _clamped(found: tuple[str, float] | None, limit) -> Activation | None:
    """f(min(gate, limit)) * clamp(up, -limit, limit) for `found` = (function, alpha) of `hf_function`:
    DeepSeek-V4's gate (its act_fn), HY-V4's and GLM-5-Next's (SiLU)."""
    if found is None or not isinstance(limit, (int, float)) or not limit > 0:
        return None
    return Activation(found[0], True, alpha=found[1], limit=float(limit))


def _swiglu(alpha, limit, interleaved: bool) -> Activation | None:
    if not isinstance(limit, (int, float)) or not limit > 0 or not isinstance(alpha, (int, float)):
        return None
    return clamped_swiglu(alpha=float(alpha), limit=float(limit), interleaved=interleaved)


# Custom gates whose math moesys's activations express, by the gate function's qualified name; each reads
# its parameters off the experts module. tests/test_transformers_integration.py checks every entry against
# the class's own _apply_gate, so a changed formula in transformers fails there instead of here.
_KNOWN_GATES = {
    "GptOssExperts._apply_gate": lambda m: _swiglu(m.alpha, m.limit, interleaved=True),
    "OpenAIPrivacyFilterExperts._apply_gate": lambda m: _swiglu(m.alpha, m.limit, interleaved=False),
    "MiniMaxM3VLExperts._apply_gate": lambda m: _swiglu(m.swiglu_alpha, m.swiglu_limit, interleaved=False),
    "DeepseekV4Experts._apply_gate": lambda m: _clamped(hf_function(m.act_fn), m.limit),
    "HYV4Experts._apply_gate": lambda m: _clamped(("silu", 1.0), m.swiglu_limit),
    "HYV4VLExperts._apply_gate": lambda m: _clamped(("silu", 1.0), m.swiglu_limit),
    "Glm5NextTextExperts._apply_gate": lambda m: _clamped(("silu", 1.0), m.swiglu_limit),
}


def experts_activation(experts) -> Activation | None:
    """The moesys Activation computing this experts module's gate (or act_fn), or None when the generic
    path must run its own functions (an unknown gate or act_fn, a post-expert norm)."""
    if getattr(experts, "has_post_expert_norm", False):
        return None
    if not getattr(experts, "has_gate", True):
        return moesys_activation(experts.act_fn, gated=False)
    gate_fn = type(experts)._apply_gate
    if gate_fn is _default_apply_gate:
        return moesys_activation(experts.act_fn, gated=True)
    known = _KNOWN_GATES.get(getattr(gate_fn, "__qualname__", ""))
    return known(experts) if known is not None else None


def experts_tensors(experts, dtype: torch.dtype):
    """(w_gate_up [E, F, H], w_down [E, H, I], b_gate_up [E, F] or None, b_down [E, H] or None) of an experts
    module as moe_mlp reads them: transposed storage as transposed views, rows in the stored order (gate/up
    interleaved stays interleaved; the activation says so), cast to `dtype` (a no-op when it matches)."""
    gated = getattr(experts, "has_gate", True)
    w_gate_up = experts.gate_up_proj if gated else experts.up_proj
    w_down = experts.down_proj
    b_gate_up = b_down = None
    if getattr(experts, "has_bias", False):
        b_gate_up = experts.gate_up_proj_bias if gated else experts.up_proj_bias
        b_down = experts.down_proj_bias
    if getattr(experts, "is_transposed", False):  # stored [E, H, F] / [E, I, H]
        w_gate_up, w_down = w_gate_up.transpose(1, 2), w_down.transpose(1, 2)
    return tuple(None if t is None else t.to(dtype) for t in (w_gate_up, w_down, b_gate_up, b_down))


def make_experts_forward(backend: str = "auto"):
    """The function transformers calls as `forward(self, hidden_states, top_k_index, top_k_weights)`.

    The first call of each experts class on the generic (unfused) path logs one warning, so a user learns
    their model runs without the fused kernels; the set of classes already named lives in this closure (one
    per registration), not in a global. Under torch.compile the warning is skipped (dynamo cannot trace the
    logger); the first eager call says it."""
    warned_classes: set[type] = set()

    def warn_generic_once(experts) -> None:
        cls = type(experts)
        if cls in warned_classes or torch.compiler.is_compiling():
            return
        warned_classes.add(cls)
        logger.warning("%s runs on moesys's generic (unfused) experts path: its gate/act_fn or post-expert norm "
                       "has no fused moesys activation, so the grouped GEMMs run with the class's own function "
                       "between them in PyTorch (correct, slower than the fused kernels)", cls.__name__)

    def moesys_experts_forward(self, hidden_states_TH: torch.Tensor, top_k_index_TK: torch.Tensor,
                               top_k_weights_TK: torch.Tensor) -> torch.Tensor:
        if getattr(self, "_is_expert_parallel", False):
            raise NotImplementedError(f"{type(self).__name__}: transformers' own expert parallelism is not supported "
                                      "by the 'moesys' experts implementation; use moesys.parallel instead")
        x_TH = hidden_states_TH
        w_gate_up, w_down, b_gate_up, b_down = experts_tensors(self, x_TH.dtype)
        weights_TK = top_k_weights_TK.to(x_TH.dtype)
        activation = experts_activation(self)
        if activation is not None:
            return moe_mlp(x_TH, w_gate_up, w_down, top_k_index_TK, weights_TK, activation=activation,
                           backend=backend, b_gate_up=b_gate_up, b_down=b_down)
        warn_generic_once(self)
        act_fn = self._apply_gate if getattr(self, "has_gate", True) else self.act_fn
        post_fn = self.post_expert_norm if getattr(self, "has_post_expert_norm", False) else None
        y_TH = grouped_experts(x_TH, w_gate_up, w_down, top_k_index_TK, weights_TK, act_fn, b_gate_up=b_gate_up,
                               b_down=b_down, post_fn=post_fn)
        return y_TH.to(x_TH.dtype)

    return moesys_experts_forward


def register(backend: str = "auto", name: str = NAME) -> str:
    """Register moesys's experts forward in transformers' ExpertsInterface under `name`; returns the name.

    Imports the backends the forward may dispatch to now, so that the first call may come under
    torch.compile(fullgraph=True) (dynamo cannot trace the lazy import). Calling it again replaces the
    registration (e.g. to change the backend)."""
    from transformers.integrations.moe import ExpertsInterface

    preload(backend)
    preload("grouped_mm")  # the generic path
    ExpertsInterface.register(name, make_experts_forward(backend))
    return name

"""Run transformers' MoE models through `moesys.moe_mlp`: an experts implementation named "moesys".

    import moesys.integrations.transformers as mt
    mt.register()   # explicit: importing moesys never touches transformers
    model = AutoModelForCausalLM.from_pretrained(d, experts_implementation="moesys")

Registration goes through transformers' public extension point (`ExpertsInterface.register`). The
experts modules of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE (and any `@use_experts_implementation` class
with the standard layout) hold `gate_up_proj [E, 2I, H]` (gate rows first) and `down_proj [E, H, I]`,
which is exactly moe_mlp's contract.

Legend: T tokens, H hidden, I expert intermediate, E experts, K top-k.
"""

from __future__ import annotations

import torch

from moesys.integrations.hf_activations import moesys_activation
from moesys.ops import moe_mlp

NAME = "moesys"


def make_experts_forward(backend: str = "auto"):
    """The function transformers calls as `forward(self, hidden_states, top_k_index, top_k_weights)`."""

    def moesys_experts_forward(self, hidden_states_TH: torch.Tensor, top_k_index_TK: torch.Tensor,
                               top_k_weights_TK: torch.Tensor) -> torch.Tensor:
        cls = type(self).__name__
        if getattr(self, "_is_expert_parallel", False):
            raise NotImplementedError(f"{cls}: transformers' own expert parallelism is not supported by the "
                                      "'moesys' experts implementation; use moesys.parallel instead")
        if getattr(self, "has_post_expert_norm", False):
            raise NotImplementedError(f"{cls}: experts with a post-expert norm are not supported by 'moesys'")
        if type(self)._apply_gate.__name__ != "_default_apply_gate":
            raise NotImplementedError(f"{cls}: a custom gating function (_apply_gate) is not supported by 'moesys'")
        gated = getattr(self, "has_gate", True)
        activation = moesys_activation(self.act_fn, gated, cls)
        w_gate_up = self.gate_up_proj if gated else self.up_proj
        w_down = self.down_proj
        b_gate_up = b_down = None
        if getattr(self, "has_bias", False):
            b_gate_up = self.gate_up_proj_bias if gated else self.up_proj_bias
            b_down = self.down_proj_bias
        if getattr(self, "is_transposed", False):  # stored [E, H, 2I] / [E, I, H]
            w_gate_up, w_down = w_gate_up.transpose(1, 2), w_down.transpose(1, 2)
        if gated and not getattr(self, "is_concatenated", True):
            # Interleaved [g0, u0, g1, u1, ...] rows -> [gate; up]; a copy per call, so slower.
            w_gate_up = torch.cat((w_gate_up[:, 0::2], w_gate_up[:, 1::2]), dim=1)
            if b_gate_up is not None:
                b_gate_up = torch.cat((b_gate_up[:, 0::2], b_gate_up[:, 1::2]), dim=1)
        x_TH = hidden_states_TH
        return moe_mlp(x_TH, w_gate_up.to(x_TH.dtype), w_down.to(x_TH.dtype), top_k_index_TK,
                       top_k_weights_TK.to(x_TH.dtype), activation=activation, backend=backend,
                       b_gate_up=None if b_gate_up is None else b_gate_up.to(x_TH.dtype),
                       b_down=None if b_down is None else b_down.to(x_TH.dtype))

    return moesys_experts_forward


def register(backend: str = "auto", name: str = NAME) -> str:
    """Register moe_mlp in transformers' ExpertsInterface under `name`; returns the name.

    Calling it again replaces the registration (e.g. to change the backend)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(name, make_experts_forward(backend))
    return name

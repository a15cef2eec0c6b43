"""moesys `Experts` made from transformers experts modules of every declared layout against transformers' own
batched_mm experts forward on the same module; the layout conversion round-trips exactly."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from moesys.models.hf_experts_layout import ExpertsLayout, moesys_experts, to_hf, to_moesys

E, H, I, T, K = 4, 12, 6, 9, 2


def _experts_module(is_transposed: bool, has_bias: bool, has_gate: bool, act: str):
    from transformers.activations import ACT2FN
    from transformers.integrations.moe import use_experts_implementation

    @use_experts_implementation(is_transposed=is_transposed, has_bias=has_bias, has_gate=has_gate)
    class TinyExperts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = E
            rows = 2 * I if has_gate else I
            up = "gate_up_proj" if has_gate else "up_proj"
            shape_up, shape_down = ((E, H, rows), (E, I, H)) if is_transposed else ((E, rows, H), (E, H, I))
            setattr(self, up, nn.Parameter(torch.randn(shape_up) * 0.3))
            self.down_proj = nn.Parameter(torch.randn(shape_down) * 0.3)
            if has_bias:
                setattr(self, up + "_bias", nn.Parameter(torch.randn(E, rows) * 0.3))
                self.down_proj_bias = nn.Parameter(torch.randn(E, H) * 0.3)
            self.act_fn = ACT2FN[act]

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("the test calls transformers' batched_mm implementation directly")

    from transformers import PretrainedConfig
    config = PretrainedConfig()
    config._experts_implementation = "batched_mm"
    return TinyExperts(config)


@pytest.mark.parametrize("is_transposed,has_bias,gated", list(itertools.product([False, True], repeat=3)))
def test_moesys_experts_compute_what_transformers_computes(is_transposed, has_bias, gated):
    from transformers.integrations.moe import batched_mm_experts_forward
    torch.manual_seed(0)
    module = _experts_module(is_transposed, has_bias, gated, "silu" if gated else "relu")
    experts, _ = moesys_experts(module, backend="loop")
    x_TH = torch.randn(T, H)
    ids_TK = torch.randint(0, E, (T, K))
    weights_TK = torch.rand(T, K)
    torch.testing.assert_close(experts(x_TH, ids_TK, weights_TK),
                               batched_mm_experts_forward(module, x_TH, ids_TK, weights_TK), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("concat,transposed,bias,gated", list(itertools.product([False, True], repeat=4)))
def test_layout_round_trip_is_exact(concat, transposed, bias, gated):
    layout = ExpertsLayout(gated and not concat, transposed, bias, gated)
    rows = 2 * I if gated else I
    up = layout.up_name
    hf = {up: torch.randn((E, H, rows) if transposed else (E, rows, H)),
          "down_proj": torch.randn((E, I, H) if transposed else (E, H, I))}
    if bias:
        hf |= {up + "_bias": torch.randn(E, rows), "down_proj_bias": torch.randn(E, H)}
    ours = to_moesys(hf, layout)
    assert ours["gate_up_proj"].shape == (E, rows, H) and ours["down_proj"].shape == (E, H, I)
    if gated and not concat:  # interleaved [g0, u0, g1, ...] rows become [gate; up]
        first_up = hf[up][:, :, 1] if transposed else hf[up][:, 1]
        assert torch.equal(ours["gate_up_proj"][:, I], first_up)
    back = to_hf(ours, layout)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)


def test_a_custom_gate_is_taken_only_when_an_activation_computes_it_exactly():
    """GPT-OSS's clamped SwiGLU is recognised by probing; the same class with another gate is refused."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from moesys.activations import clamped_swiglu
    cfg = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E)
    module = GptOssExperts(cfg)
    for p in module.parameters():
        nn.init.normal_(p, std=0.3)
    experts, _ = moesys_experts(module, backend="loop")
    assert experts.activation == clamped_swiglu(interleaved=False)

    class WithoutUpShift(GptOssExperts):
        def _apply_gate(self, gate_up):
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
            return up * gate * torch.sigmoid(gate * self.alpha)

    with pytest.raises(ValueError, match="gate function .* matches none of moesys' activations"):
        moesys_experts(WithoutUpShift(cfg), backend="loop")

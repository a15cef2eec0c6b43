"""The "moesys" experts implementation in transformers gives the same logits and gradients as
transformers' own experts: tiny random Mixtral, Qwen2-MoE (shared expert), Qwen3-MoE, OLMoE and GPT-OSS
against eager; every hidden_act transformers' MoE models use; and experts modules of every layout the
experts interface declares (concatenated or interleaved, transposed, biases, no gate, a custom gate, a
post-expert norm) against transformers' own batched_mm implementation."""

import subprocess
import sys

import pytest
import torch
from transformers import (AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig,
                          Qwen3MoeConfig)

from moesys.integrations import transformers as moesys_hf

COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)
CONFIGS = {
    "mixtral": MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=5, num_experts_per_tok=2),
    "qwen2_moe": Qwen2MoeConfig(**COMMON, intermediate_size=40, moe_intermediate_size=24, num_experts=6,
                                num_experts_per_tok=2, shared_expert_intermediate_size=16, norm_topk_prob=False),
    "qwen3_moe": Qwen3MoeConfig(**COMMON, intermediate_size=40, moe_intermediate_size=20, num_experts=6,
                                num_experts_per_tok=3, norm_topk_prob=True, head_dim=8),
    "olmoe": OlmoeConfig(**COMMON, intermediate_size=20, num_experts=8, num_experts_per_tok=2),
}


@pytest.fixture(scope="module", autouse=True)
def registered():
    moesys_hf.register(backend="grouped_mm")


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_same_logits_and_grads_as_eager(arch, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch], experts_implementation="eager").float()
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 97, (2, 11))
    ref = model(ids, labels=ids)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="moesys", dtype=torch.float32)
    assert ours.config._experts_implementation == "moesys"
    out = ours(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    for n, p in ours.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_loop_backend_and_generation_match():
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(CONFIGS["mixtral"], experts_implementation="eager")
    ids = torch.randint(0, 97, (1, 5))
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    moesys_hf.register(backend="loop")
    try:
        model.set_experts_implementation("moesys")
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), ref)
    finally:
        moesys_hf.register(backend="grouped_mm")


@pytest.mark.slow
def test_import_moesys_registers_nothing():
    code = ("import moesys, moesys.layers, moesys.models\n"
            "from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS\n"
            "assert 'moesys' not in ALL_EXPERTS_FUNCTIONS, list(ALL_EXPERTS_FUNCTIONS)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def _tiny_mixtral(hidden_act, seed):
    torch.manual_seed(seed)
    cfg = MixtralConfig(**{**COMMON, "num_hidden_layers": 1}, intermediate_size=12, num_local_experts=4,
                        num_experts_per_tok=2, hidden_act=hidden_act)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").float()
    with torch.no_grad():  # gate/up projections of order 1, where close functions (gelu, gelu_tanh) differ
        model.model.layers[0].mlp.experts.gate_up_proj.mul_(40)
    return model


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_fast", "gelu_accurate", "gelu_new", "quick_gelu", "relu", "relu2",
                                        "mish", "sigmoid", "swish", "gelu_pytorch_tanh"])
def test_every_hidden_act_runs_fused_and_matches_eager(hidden_act):
    """The activations of transformers' MoE test configs (gelu first) run through moe_mlp's fused path and
    give eager's logits and expert gradients."""
    model = _tiny_mixtral(hidden_act, seed=2)
    experts = model.model.layers[0].mlp.experts
    assert moesys_hf.experts_activation(experts) is not None, hidden_act
    ids = torch.randint(0, 97, (2, 7))
    ref = model(ids, labels=ids)
    ref.loss.backward()
    ref_grad = experts.gate_up_proj.grad.clone()
    experts.gate_up_proj.grad = None
    model.set_experts_implementation("moesys")
    out = model(ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(experts.gate_up_proj.grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_unknown_activation_runs_its_own_function():
    """An act_fn moesys has no kernel for (tanh) runs through the generic path with the module's own act_fn."""
    model = _tiny_mixtral("tanh", seed=3)
    assert moesys_hf.experts_activation(model.model.layers[0].mlp.experts) is None
    ids = torch.randint(0, 97, (1, 6))
    ref = model(ids).logits
    model.set_experts_implementation("moesys")
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_generic_path_warns_once_per_class(caplog):
    """Falling back to the generic (unfused) path is said once per experts class, not once per call."""
    import logging
    model = _tiny_mixtral("tanh", seed=3)
    moesys_hf.register(backend="grouped_mm")  # a fresh registration: nothing warned yet
    model.set_experts_implementation("moesys")
    ids = torch.randint(0, 97, (1, 6))
    with caplog.at_level(logging.WARNING, logger=moesys_hf.__name__):
        for _ in range(3):
            model(ids)
    generic = [r for r in caplog.records if "generic (unfused)" in r.getMessage()]
    assert len(generic) == 1, [r.getMessage() for r in caplog.records]
    assert "MixtralExperts" in generic[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=moesys_hf.__name__):  # a fused activation says nothing
        fused = _tiny_mixtral("silu", seed=3)
        fused.set_experts_implementation("moesys")
        fused(ids)
    assert not [r for r in caplog.records if "generic (unfused)" in r.getMessage()]


def _known_gate_classes():
    import importlib
    names = {"GptOssExperts": "gpt_oss", "OpenAIPrivacyFilterExperts": "openai_privacy_filter",
             "MiniMaxM3VLExperts": "minimax_m3_vl", "DeepseekV4Experts": "deepseek_v4", "HYV4Experts": "hy_v4",
             "HYV4VLExperts": "hy_v4_vl", "Glm5NextTextExperts": "glm5_next"}
    assert set(names) == {k.split(".")[0] for k in moesys_hf._KNOWN_GATES}
    return [getattr(importlib.import_module(f"transformers.models.{m}.modeling_{m}"), c) for c, m in names.items()]


@pytest.mark.parametrize("cls", _known_gate_classes(), ids=lambda c: c.__name__)
def test_known_gates_equal_the_class_gate(cls):
    """Each custom _apply_gate moesys runs fused computes what the class's own does, with a limit that clamps
    both halves: the class's gate, called on a stand-in module holding its parameters, against
    moesys.activations.apply_activation with the Activation moesys picks."""
    from types import SimpleNamespace

    from transformers.activations import ACT2FN

    from moesys.activations import apply_activation
    stand_in = SimpleNamespace(alpha=1.3, limit=0.7, swiglu_alpha=1.3, swiglu_limit=0.7, act_fn=ACT2FN["silu"])
    stand_in._apply_gate = cls._apply_gate.__get__(stand_in)
    spec = moesys_hf._KNOWN_GATES[cls._apply_gate.__qualname__](stand_in)
    h = torch.randn(13, 2 * 9, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 2
    torch.testing.assert_close(apply_activation(h, spec), stand_in._apply_gate(h), rtol=0, atol=0)


def test_gpt_oss_matches_eager_fused(tmp_path):
    """GPT-OSS (clamped SwiGLU, gate/up interleaved, transposed weights, biases, attention sinks, sliding
    windows) runs the fused path and gives eager's logits and gradients."""
    from transformers import GptOssConfig
    torch.manual_seed(4)
    cfg = GptOssConfig(vocab_size=97, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                       sliding_window=4, max_position_embeddings=64, swiglu_limit=0.5)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").float()
    with torch.no_grad():  # biases are initialised to zero: make them count
        for n, p in model.named_parameters():
            if n.endswith("_bias"):
                p.normal_(0, 0.5)
    experts = model.model.layers[0].mlp.experts
    assert moesys_hf.experts_activation(experts) == moesys_hf.clamped_swiglu(alpha=cfg.swiglu_alpha, limit=0.5)
    ids = torch.randint(0, 97, (2, 9))
    ref = model(ids, labels=ids)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_experts_implementation("moesys")
    out = model(ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


_FIRST_CALL_COMPILED = """
import torch
from transformers import AutoModelForCausalLM, MixtralConfig
import moesys.integrations.transformers as mt
mt.register(backend="triton")  # on a CPU, Triton's interpreter (TRITON_INTERPRET=1, inherited from conftest)
cfg = MixtralConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, experts_implementation="moesys")
ids = torch.randint(0, 97, (1, 8))
run = torch.compile(lambda ids: model(ids, use_cache=False).logits, fullgraph=True, backend="eager")
with torch.no_grad():
    logits = run(ids)  # the first moesys call of this process, traced
    model.set_experts_implementation("eager")
    ref = model(ids, use_cache=False).logits
torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)
assert "moesys.kernels" in __import__("sys").modules
print("compiled-first-call-ok")
"""


@pytest.mark.slow
def test_first_moesys_call_may_be_compiled():
    """A fresh process whose first moesys call is under torch.compile(fullgraph=True), with the Triton backend
    (its module is imported only on demand): register() imported it beforehand, so dynamo never meets the
    lazy import (a graph break, an error under fullgraph)."""
    proc = subprocess.run([sys.executable, "-c", _FIRST_CALL_COMPILED], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "compiled-first-call-ok" in proc.stdout, proc.stderr[-3000:]


def _clamp_after_act_gate(self, gate_up):
    """Step3p7's gate (clamp after the activation), on interleaved gate/up columns: no moesys kernel has it."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    return self.act_fn(gate).clamp(max=0.3) * up.clamp(min=-0.3, max=0.3)


def _toy_experts(act="silu", gate=None, norm=False, **flags):
    """An experts module of transformers' experts interface with the given layout flags, random weights (and
    biases) in the layout the flags declare; its eager forward is transformers' own batched_mm."""
    from types import SimpleNamespace

    from transformers.activations import ACT2FN
    from transformers.integrations.moe import batched_mm_experts_forward, use_experts_implementation

    E, H, I = 4, 12, 7
    gated, transposed = flags.get("has_gate", True), flags.get("is_transposed", False)
    F = 2 * I if gated else I
    g = torch.Generator().manual_seed(7)

    def param(*shape):
        return torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64) / 2)

    class ToyExperts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts, self.act_fn = E, ACT2FN[act]
            up = "gate_up_proj" if gated else "up_proj"
            setattr(self, up, param(*((E, H, F) if transposed else (E, F, H))))
            self.down_proj = param(*((E, I, H) if transposed else (E, H, I)))
            if flags.get("has_bias", False):
                setattr(self, up + "_bias", param(E, F))
                self.down_proj_bias = param(E, H)
            if norm:
                self.post_expert_norm = torch.nn.LayerNorm(H, dtype=torch.float64)
                self.post_expert_norm.weight.data.normal_(1.0, 0.3, generator=g)

        def forward(self, hidden_states, top_k_index, top_k_weights):
            return batched_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)

    if gate is not None:
        ToyExperts._apply_gate = gate
    cls = use_experts_implementation(**flags, has_post_expert_norm=norm)(ToyExperts)
    return cls(SimpleNamespace(_experts_implementation="eager"))


LAYOUTS = {
    "concatenated": dict(),
    "transposed-bias-gelu": dict(act="gelu", is_transposed=True, has_bias=True),
    "no-gate-transposed-relu2": dict(act="relu2", has_gate=False, is_transposed=True),
    "no-gate-tanh": dict(act="tanh", has_gate=False, has_bias=True),
    "custom-gate-interleaved": dict(gate=_clamp_after_act_gate, is_concatenated=False, has_bias=True),
    "custom-gate-transposed": dict(act="gelu", gate=_clamp_after_act_gate, is_concatenated=False, is_transposed=True),
    "post-expert-norm": dict(norm=True, has_bias=True),
}


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_matches_transformers_batched_mm(layout, backend):
    """Forward and every gradient (tokens, weights, biases, norm, routing weights) of moesys against
    transformers' batched_mm, float64; known activations take the fused path on views of the parameters
    (no copy), the rest the generic one with the module's own gate, act_fn and norm."""
    kw = LAYOUTS[layout]
    experts = _toy_experts(**kw)
    fused = kw.get("gate") is None and not kw.get("norm") and kw.get("act", "silu") != "tanh"
    assert (moesys_hf.experts_activation(experts) is not None) == fused
    if fused:
        params = {p.untyped_storage().data_ptr() for p in experts.parameters()}
        tensors = moesys_hf.experts_tensors(experts, torch.float64)
        assert all(t is None or t.untyped_storage().data_ptr() in params for t in tensors)
    moesys_hf.register(backend=backend)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(9, 12, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(9)])
    w = torch.rand(9, 2, generator=g, dtype=torch.float64)
    results = []
    try:
        for impl in ("eager", "moesys"):
            experts.config._experts_implementation = impl
            experts.zero_grad()
            xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = experts(xl, ids, wl)
            (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum().backward()
            results.append([y.detach(), xl.grad, wl.grad] + [p.grad.clone() for p in experts.parameters()])
    finally:
        moesys_hf.register(backend="grouped_mm")
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)

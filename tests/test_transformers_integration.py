"""The "moesys" experts implementation in transformers gives the same logits and gradients as
transformers' own eager experts on tiny random Mixtral, Qwen2-MoE (shared expert), Qwen3-MoE and OLMoE."""

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


def test_unsupported_activation_is_a_clear_error():
    cfg = MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, hidden_act="tanh")
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="moesys")
    with pytest.raises(NotImplementedError, match="activation Tanh"):
        model(torch.randint(0, 97, (1, 4)))

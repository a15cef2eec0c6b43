"""Checks that what `moesys upcycle` writes from tiny Llama-3.x (llama3 RoPE scaling, tied embeddings),
Mistral (sliding window, head_dim != hidden/heads), Qwen2 (q/k/v biases, shared expert, some dense
layers) and Qwen3 (q/k norms) sources loads through `model.init_from` with transformers' fp32 logits."""

import pytest
import torch

from moesys.upcycling import upcycle
from tests._init_from_helpers import hf_logits, moesys_model

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)


def _dense(kind: str):
    import transformers as T
    if kind == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        return T.LlamaForCausalLM(T.LlamaConfig(**COMMON, tie_word_embeddings=True, rope_parameters=rope))
    if kind == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**COMMON, sliding_window=5, head_dim=16))
    if kind == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**COMMON, rms_norm_eps=1e-5))
    return T.Qwen3ForCausalLM(T.Qwen3Config(**COMMON, head_dim=16))


# upcycle options per source: Qwen2 keeps layer 1 dense (mlp_only_layers) and gets a shared expert
OPTIONS = {"llama": {}, "mistral": {"granularity": 2, "top_k": 2}, "qwen2": {"moe_layers": [0, 2]}, "qwen3": {}}


@pytest.mark.parametrize("kind", list(OPTIONS))
def test_upcycled_checkpoint_loads_with_transformers_logits(tmp_path, kind):
    torch.manual_seed(0)
    dense = _dense(kind)
    with torch.no_grad():  # large enough weights that a wrong tensor shows
        for name, p in dense.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    dense.save_pretrained(tmp_path / "dense")
    opts = {"num_experts": 4, "top_k": 2, **OPTIONS[kind]}
    upcycle(tmp_path / "dense", tmp_path / "moe", progress=False, **opts)
    model, config = moesys_model(tmp_path / "moe")
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, hf_logits(tmp_path / "moe", ids), rtol=1e-5, atol=1e-5)
    if kind == "llama":
        assert config.model.rope_scaling.rope_type == "llama3" and config.model.tie_embeddings
    if kind == "mistral":
        assert config.model.sliding_window == 5

"""Tiny random transformers MoE checkpoints and `model.hf_model` training configs for the hf_model tests."""

from __future__ import annotations

from pathlib import Path

import torch

from tests._train_helpers import REPO

VOCAB = 300  # above the 256 byte tokens the data pipeline makes


def _save(cfg, path: Path, seed: int) -> Path:
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # HF initialises routers to zero; random ones route unevenly, as trained ones do
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
    model.save_pretrained(path)
    return path


def deepseek_v3(path: Path, seed: int = 0) -> Path:
    """MLA attention, a dense first layer, sigmoid group-limited routing, a shared expert, 8 experts."""
    from transformers import DeepseekV3Config
    cfg = DeepseekV3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                           num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                           first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                           qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=128,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return _save(cfg, path, seed)


def qwen3_moe(path: Path, seed: int = 0) -> Path:
    """Softmax top-k routing with its own load-balancing loss (output_router_logits), q/k norms."""
    from transformers import Qwen3MoeConfig
    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=4, num_experts_per_tok=2, max_position_embeddings=128)
    return _save(cfg, path, seed)


def gpt_oss(path: Path, seed: int = 0) -> Path:
    """Biases, transposed interleaved gate/up weights, clamped SwiGLU, attention sinks, sliding windows."""
    from transformers import GptOssConfig
    cfg = GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                       num_experts_per_tok=2, sliding_window=8, max_position_embeddings=128,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return _save(cfg, path, seed)


def write_config(path: Path, hf_dir: Path, *extra: str) -> Path:
    """A training config naming only the checkpoint and the run (the checkpoint decides the model)."""
    lines = ["model:", f"  hf_model: {hf_dir}", "moe:", "  backend: loop", "data:", f"  source: {REPO / 'moesys'}",
             "  seq_len: 16", "  batch_size: 4", "  max_tokens: 60000", "train:", "  lr: 3.0e-3",
             "  warmup_steps: 1", "log:", "  every: 1", "  val_every: 0", "  progress_bar: false",
             "  tensorboard: false", *extra]
    path.write_text("\n".join(lines) + "\n")
    return path


def _other_configs() -> dict:
    """More families whose experts use transformers' experts interface (shared experts with a sigmoid gate,
    hybrid linear attention, group-limited sigmoid routing, ...)."""
    from transformers import Glm4MoeConfig, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3NextConfig
    common = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    return {
        "glm4_moe": lambda: Glm4MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                                          head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                                          topk_group=1, n_shared_experts=1, first_k_dense_replace=1, **common),
        "qwen3_next": lambda: Qwen3NextConfig(intermediate_size=64, moe_intermediate_size=16,
                                              shared_expert_intermediate_size=16, num_hidden_layers=4, head_dim=8,
                                              num_experts=4, num_experts_per_tok=2, linear_num_value_heads=4,
                                              linear_num_key_heads=2, linear_key_head_dim=8,
                                              linear_value_head_dim=8, **common),
        "mixtral": lambda: MixtralConfig(intermediate_size=16, num_hidden_layers=2, num_local_experts=4, **common),
        "qwen2_moe": lambda: Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=16,
                                            shared_expert_intermediate_size=16, num_hidden_layers=2, num_experts=4,
                                            num_experts_per_tok=2, **common),
        "olmoe": lambda: OlmoeConfig(intermediate_size=16, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                     **common),
    }


OTHER_FAMILIES = ("glm4_moe", "qwen3_next", "mixtral", "qwen2_moe", "olmoe")


def other_family(name: str, path: Path, seed: int = 0) -> Path:
    return _save(_other_configs()[name](), path, seed)

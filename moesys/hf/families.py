"""Hugging Face MoE families -> the moesys model config: what each config.json means for our model.

`read_hf_config(dir)` reads config.json (never a weight), refuses any feature our model cannot
reproduce (naming the config key), and `derive(hf_config)` returns the moesys config values it
implies, each with the config.json key it came from, so a contradiction names both sides.

Families: Mixtral, Qwen2-MoE (sigmoid-gated shared expert, q/k/v biases, sliding-window layer types),
Qwen3-MoE (per-head q/k norm) and OLMoE (q/k norm over all heads). These are also what
`moesys upcycle` writes from Llama-3.x, Mistral, Qwen2 and Qwen3 sources.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # HF hidden_act -> moe.activation
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def read_hf_config(model_dir: str | Path, key: str = "model.init_from"):
    """The transformers config of a checkpoint directory, after checking every feature is supported.
    Reads config.json only; raises ValueError naming the directory or the unsupported config key."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"{key}={str(model_dir)!r} is not a directory; give a transformers checkpoint "
                         "directory (config.json + *.safetensors)")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{key}={str(model_dir)!r} has no config.json; give a transformers checkpoint directory")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{path}: model_type={model_type!r} is not supported by {key}; supported: "
                         f"{list(FAMILIES)} (moesys upcycle turns llama/mistral/qwen2/qwen3 into one of them)")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    problems = unsupported(config)
    if problems:
        raise ValueError(f"{path}: unsupported by moesys: " + "; ".join(problems))
    return config


def rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_type" not in params and params and all(isinstance(v, dict) for v in params.values()):
        return {"rope_type": "per-layer-type " + ",".join(sorted(params))}
    return params


def unsupported(config) -> list[str]:
    """Each config.json feature our model cannot compute, as 'key=value (why)'."""
    mt, bad = config.model_type, []
    rope = rope_parameters(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        bad.append(f"rope_parameters.rope_type={rope_type!r} (supported: {list(ROPE_TYPES)})")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        bad.append(f"rope_parameters.partial_rotary_factor={rope['partial_rotary_factor']} (RoPE on all dims only)")
    if config.hidden_act not in ACTIVATIONS:
        bad.append(f"hidden_act={config.hidden_act!r} (supported: {sorted(ACTIVATIONS)})")
    if getattr(config, "attention_dropout", 0.0):
        bad.append(f"attention_dropout={config.attention_dropout} (moesys attention has no dropout)")
    if getattr(config, "quantization_config", None):
        bad.append("quantization_config (quantized checkpoints)")
    if mt == "mixtral" and config.router_jitter_noise:
        bad.append(f"router_jitter_noise={config.router_jitter_noise} (Mixtral jitters the experts' input too)")
    if mt == "olmoe" and config.clip_qkv is not None:
        bad.append(f"clip_qkv={config.clip_qkv} (q/k/v clipping)")
    if mt == "qwen2_moe":
        if not config.num_experts:
            bad.append("num_experts=0 (a dense model: no MoE layer)")
        if not config.shared_expert_intermediate_size:
            bad.append("shared_expert_intermediate_size=0 (Qwen2-MoE without its shared expert)")
    types = set(getattr(config, "layer_types", None) or []) - {"full_attention", "sliding_attention"}
    if types:
        bad.append(f"layer_types {sorted(types)} (only full_attention and sliding_attention)")
    return bad


def _head_dim(config) -> int:
    if config.model_type == "olmoe":  # OLMoE's q_norm spans hidden_size: heads are always H / N
        return config.hidden_size // config.num_attention_heads
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _moe_pattern(config) -> dict[str, tuple[Any, str]]:
    """Which layers are MoE: Qwen's (layer + 1) % decoder_sparse_step == 0 outside mlp_only_layers is
    first_dense = step - 1, every = step, dense_layers = mlp_only_layers."""
    if config.model_type not in ("qwen2_moe", "qwen3_moe"):  # every layer is MoE
        return {"moe.first_dense": (0, "model_type"), "moe.every": (1, "model_type"),
                "moe.dense_layers": ([], "model_type")}
    step = config.decoder_sparse_step
    return {"moe.first_dense": (step - 1, "decoder_sparse_step"), "moe.every": (step, "decoder_sparse_step"),
            "moe.dense_layers": (sorted(config.mlp_only_layers or []), "mlp_only_layers")}


def _window(config) -> dict[str, tuple[Any, str]]:
    window = getattr(config, "sliding_window", None) or None
    types = getattr(config, "layer_types", None)
    if config.model_type == "qwen2_moe":
        layers = [i for i, t in enumerate(types or []) if t == "sliding_attention"]
        if not layers:
            return {"model.sliding_window": (None, "layer_types")}
        return {"model.sliding_window": (window, "sliding_window"), "model.sliding_layers": (layers, "layer_types")}
    if config.model_type in ("mixtral", "qwen3_moe"):  # one window for every layer
        return {"model.sliding_window": (window, "sliding_window"), "model.sliding_layers": (None, "sliding_window")}
    return {"model.sliding_window": (None, "sliding_window")}


def _rope_scaling(rope: dict) -> dict:
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return {"rope_type": "default"}
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(rope["factor"])}
    return {"rope_type": "llama3", "factor": float(rope["factor"]), "low_freq_factor": float(rope["low_freq_factor"]),
            "high_freq_factor": float(rope["high_freq_factor"]),
            "original_max_position_embeddings": int(rope["original_max_position_embeddings"])}


def derive(config) -> dict[str, tuple[Any, str]]:
    """Dotted moesys config key -> (value, the config.json key it comes from), for a supported config."""
    mt = config.model_type
    rope = rope_parameters(config)
    heads = config.num_attention_heads
    attention_bias = bool(getattr(config, "attention_bias", False))
    out: dict[str, tuple[Any, str]] = {
        "model.vocab_size": (config.vocab_size, "vocab_size"),
        "model.hidden_size": (config.hidden_size, "hidden_size"),
        "model.num_layers": (config.num_hidden_layers, "num_hidden_layers"),
        "model.num_heads": (heads, "num_attention_heads"),
        "model.num_kv_heads": (getattr(config, "num_key_value_heads", None) or heads, "num_key_value_heads"),
        "model.head_dim": (_head_dim(config), "head_dim"),
        "model.max_seq_len": (config.max_position_embeddings, "max_position_embeddings"),
        "model.rope_theta": (float(rope.get("rope_theta", 10000.0)), "rope_parameters.rope_theta"),
        "model.rope_scaling": (_rope_scaling(rope), "rope_parameters"),
        "model.norm_eps": (config.rms_norm_eps, "rms_norm_eps"),
        "model.tie_embeddings": (bool(config.tie_word_embeddings), "tie_word_embeddings"),
        "model.init_std": (config.initializer_range, "initializer_range"),
        "model.qk_norm": (mt in ("qwen3_moe", "olmoe"), "model_type"),
        "model.qk_norm_span": ("all" if mt == "olmoe" else "head", "model_type"),
        "model.qkv_bias": (bool(config.qkv_bias) if mt == "qwen2_moe" else attention_bias,
                           "qkv_bias" if mt == "qwen2_moe" else "attention_bias"),
        "model.o_bias": (attention_bias if mt in ("qwen3_moe", "olmoe") else False, "attention_bias"),
        "moe.top_k": (config.num_experts_per_tok, "num_experts_per_tok"),
        "moe.activation": (ACTIVATIONS[config.hidden_act], "hidden_act"),
        "moe.expert_bias": (False, "model_type"),
        "moe.router.score_func": ("softmax", "model_type"),
        "moe.router.n_groups": (1, "model_type"),
        "moe.router.scale": (1.0, "model_type"),
        "moe.router.aux_free_bias": (False, "model_type"),
        "moe.router.renormalize": ((True, "model_type") if mt == "mixtral" else
                                   (bool(config.norm_topk_prob), "norm_topk_prob")),
    }
    if mt == "mixtral":
        out.update({"moe.num_experts": (config.num_local_experts, "num_local_experts"),
                    "moe.ffn_size": (config.intermediate_size, "intermediate_size"),
                    "model.ffn_size": (config.intermediate_size, "intermediate_size")})
    elif mt == "olmoe":
        out.update({"moe.num_experts": (config.num_experts, "num_experts"),
                    "moe.ffn_size": (config.intermediate_size, "intermediate_size"),
                    "model.ffn_size": (config.intermediate_size, "intermediate_size")})
    else:
        out.update({"moe.num_experts": (config.num_experts, "num_experts"),
                    "moe.ffn_size": (config.moe_intermediate_size, "moe_intermediate_size"),
                    "model.ffn_size": (config.intermediate_size, "intermediate_size")})
    shared = getattr(config, "shared_expert_intermediate_size", 0) if mt == "qwen2_moe" else 0
    out["moe.shared_ffn_size"] = (shared, "shared_expert_intermediate_size")
    out["moe.shared_gate"] = (mt == "qwen2_moe", "model_type")
    out.update(_moe_pattern(config))
    out.update(_window(config))
    return out

"""Tiny random Hugging Face MoE checkpoints for the init_from / export tests (built here, never downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests._train_helpers import REPO, env, sets

FINETUNE = str(REPO / "configs" / "finetune.yaml")

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)

# Each family with the features it has that the moesys model had to learn: sliding windows,
# attention biases, shared experts, dense/MoE layer patterns, q/k norms over all heads.
FAMILIES = {
    "mixtral": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, sliding_window=5),
    "qwen2_moe": dict(intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=20,
                      num_experts=4, num_experts_per_tok=2, qkv_bias=True, norm_topk_prob=False,
                      use_sliding_window=True, sliding_window=4, max_window_layers=2, decoder_sparse_step=1,
                      mlp_only_layers=[1]),
    "qwen3_moe": dict(intermediate_size=40, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                      norm_topk_prob=True, attention_bias=True, head_dim=16, decoder_sparse_step=2,
                      mlp_only_layers=[], tie_word_embeddings=True),
    "olmoe": dict(intermediate_size=24, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                  attention_bias=True),
}


def hf_config(family: str, **overrides):
    from transformers import AutoConfig
    return AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **overrides})


def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Add noise to every parameter, so norms (ones), biases and routers (zeros) differ tensor by
    tensor and a swapped or misnamed tensor shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def save_hf_model(family: str, out: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """A random `family` model saved with save_pretrained (safetensors, in `dtype`); returns the directory."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides), dtype=torch.float32)
    perturb(model, seed)
    model.to(dtype).save_pretrained(out)
    return Path(out)


def hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


def moesys_model(model_dir: Path, *overrides: str):
    """The moesys model of `model_dir` with its weights, as the trainer builds it (single process)."""
    from moesys.config import load_config
    from moesys.hf.load import load_init_weights
    from moesys.hf.resolve import resolve_init_from
    from moesys.models.transformer import MoETransformer
    config = resolve_init_from(load_config(None, [f"model.init_from={model_dir}", *overrides]))
    model = MoETransformer.from_config(config)
    load_init_weights(model, config)
    return model.eval(), config


def train_from(run_dir: Path, model_dir: Path, *items: str, resume: bool = False) -> int:
    """The trainer in-process on configs/finetune.yaml (no model keys) starting from `model_dir`."""
    from moesys.train import main
    return main(["--config", FINETUNE, "--run-dir", str(run_dir),
                 *sets(f"model.init_from={model_dir}", *items)] + (["--resume"] if resume else []))


def torchrun_from(nproc: int, run_dir: Path, model_dir: Path, *items: str, timeout: float = 300):
    """The trainer under torchrun (gloo on the CPU) on configs/finetune.yaml starting from `model_dir`."""
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "moesys.train", "--config", FINETUNE, "--run-dir", str(run_dir),
           *sets(f"model.init_from={model_dir}", *items)]
    return subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)

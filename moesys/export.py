"""`moesys export RUN_DIR OUT_DIR`: a training checkpoint as a Hugging Face model directory.

The layout is Mixtral's (`MixtralForCausalLM`) or Qwen3-MoE's (`Qwen3MoeForCausalLM`), whichever the
architecture matches; a feature neither has (sigmoid routing, the aux-loss-free bias, shared experts,
capacity dropping, ...) is a ValueError naming it. Tensors are written under the on-disk per-expert
names transformers reads (DESIGN.md, traps), e.g. Mixtral `block_sparse_moe.experts.{e}.w1/w2/w3`
(gate, down, up) and Qwen3-MoE `mlp.experts.{e}.gate_proj/up_proj/down_proj`. Our RoPE is transformers'
rotate-half convention and our qk_norm is Qwen3's per-head RMSNorm, so the logits match.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moesys import checkpoint as ckpt
from moesys.config import Config, config_from_dict

ARCHS = ("auto", "mixtral", "qwen3_moe")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a training run directory (its latest checkpoint) or a ckpt/step_N directory")
    parser.add_argument("out_dir", help="the Hugging Face model directory to write")
    parser.add_argument("--arch", choices=ARCHS, default="auto",
                        help="HF architecture; auto: Qwen3-MoE when model.qk_norm is set, else Mixtral")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--force", action="store_true", help="replace out_dir if it exists")


def resolve_checkpoint(path: Path) -> Path:
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    latest = ckpt.latest_checkpoint(path / "ckpt")
    if latest is None:
        raise ValueError(f"{path} is neither a checkpoint directory (with manifest.json) nor a run directory "
                         "with checkpoints in ckpt/; train first or give ckpt/step_N")
    return latest


def _unsupported(config: Config, arch: str) -> list[str]:
    """Features of `config` the HF architecture `arch` cannot express."""
    m, moe, r = config.model, config.moe, config.moe.router
    bad = []
    if r.score_func != "softmax":
        bad.append(f"moe.router.score_func={r.score_func!r} (HF {arch} routes by softmax)")
    if r.aux_free_bias:
        bad.append("moe.router.aux_free_bias=true (the selection bias has no HF equivalent here)")
    if r.n_groups != 1:
        bad.append(f"moe.router.n_groups={r.n_groups} (group-limited routing)")
    if r.scale != 1.0:
        bad.append(f"moe.router.scale={r.scale} (a routed scaling factor)")
    if moe.shared_ffn_size:
        bad.append(f"moe.shared_ffn_size={moe.shared_ffn_size} (shared experts)")
    if moe.expert_bias:
        bad.append("moe.expert_bias=true (expert biases)")
    if moe.capacity_factor is not None:
        bad.append(f"moe.capacity_factor={moe.capacity_factor} (HF routing is dropless)")
    if moe.activation not in ("silu", "gelu_tanh"):
        bad.append(f"moe.activation={moe.activation!r} (HF experts are gated: silu or gelu_tanh)")
    if arch == "mixtral":
        if m.qk_norm:
            bad.append("model.qk_norm=true (Mixtral has no q/k norm; use --arch qwen3_moe)")
        if not r.renormalize:
            bad.append("moe.router.renormalize=false (Mixtral renormalises the top-k weights; use --arch qwen3_moe)")
        dense = [layer for layer in range(m.num_layers) if not moe.is_moe_layer(layer)]
        if dense:
            bad.append(f"dense layers {dense} (every Mixtral layer is MoE; use --arch qwen3_moe)")
    elif arch == "qwen3_moe" and not m.qk_norm:
        bad.append("model.qk_norm=false (Qwen3-MoE always normalises q and k; use --arch mixtral)")
    return bad


def pick_arch(config: Config, arch: str = "auto") -> str:
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r} is unknown; use one of {ARCHS}")
    if arch == "auto":
        arch = "qwen3_moe" if config.model.qk_norm else "mixtral"
    bad = _unsupported(config, arch)
    if bad:
        raise ValueError(f"cannot export to HF {arch}: " + "; ".join(bad))
    return arch


def hf_config(config: Config, arch: str):
    m, moe = config.model, config.moe
    head_dim = m.head_dim or m.hidden_size // m.num_heads
    hidden_act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[moe.activation]
    common = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                  num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads, head_dim=head_dim,
                  hidden_act=hidden_act, max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
                  tie_word_embeddings=m.tie_embeddings, initializer_range=m.init_std,
                  rope_parameters={"rope_theta": m.rope_theta, "rope_type": "default"},
                  num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.aux_loss_coef)
    if arch == "mixtral":
        from transformers import MixtralConfig
        return MixtralConfig(intermediate_size=moe.ffn_size, num_local_experts=moe.num_experts,
                             router_jitter_noise=0.0, sliding_window=None, **common)
    from transformers import Qwen3MoeConfig
    dense = [layer for layer in range(m.num_layers) if not moe.is_moe_layer(layer)]
    return Qwen3MoeConfig(intermediate_size=m.ffn_size, moe_intermediate_size=moe.ffn_size,
                          num_experts=moe.num_experts, norm_topk_prob=moe.router.renormalize,
                          decoder_sparse_step=1, mlp_only_layers=dense, attention_bias=False, **common)


_ATTN = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
         "attn.q_proj.weight": "self_attn.q_proj.weight", "attn.k_proj.weight": "self_attn.k_proj.weight",
         "attn.v_proj.weight": "self_attn.v_proj.weight", "attn.o_proj.weight": "self_attn.o_proj.weight",
         "attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(gate_up_proj|down_proj)$")


def hf_state_dict(flat: dict[str, torch.Tensor], config: Config, arch: str) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (experts by global id) -> HF on-disk names; every tensor must be used once."""
    moe_prefix, router = ("block_sparse_moe", "gate") if arch == "mixtral" else ("mlp", "gate")
    names = {"gate": "w1", "up": "w3", "down": "w2"} if arch == "mixtral" else \
        {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    I = config.moe.ffn_size
    out: dict[str, torch.Tensor] = {}
    for key, t in flat.items():
        if key == "embed.weight":
            out["model.embed_tokens.weight"] = t
        elif key == "norm.weight":
            out["model.norm.weight"] = t
        elif key == "lm_head.weight":
            if not config.model.tie_embeddings:
                out["lm_head.weight"] = t
        elif (m := _BLOCK.match(key)) is not None:
            layer, rest = m.group(1), m.group(2)
            pre = f"model.layers.{layer}."
            if rest in _ATTN:
                out[pre + _ATTN[rest]] = t
            elif rest == "ffn.router.weight":
                out[f"{pre}{moe_prefix}.{router}.weight"] = t
            elif (e := _EXPERT.match(rest)) is not None:
                ex = f"{pre}{moe_prefix}.experts.{e.group(1)}."
                if e.group(2) == "gate_up_proj":
                    if t.shape[0] != 2 * I:
                        raise ValueError(f"{key} has {t.shape[0]} rows; expected 2 * moe.ffn_size = {2 * I}")
                    out[ex + names["gate"] + ".weight"], out[ex + names["up"] + ".weight"] = t[:I], t[I:]
                else:
                    out[ex + names["down"] + ".weight"] = t
            elif rest == "ffn.gate_up_proj.weight":
                F = t.shape[0] // 2
                out[pre + "mlp.gate_proj.weight"], out[pre + "mlp.up_proj.weight"] = t[:F], t[F:]
            elif rest == "ffn.down_proj.weight":
                out[pre + "mlp.down_proj.weight"] = t
            elif rest.startswith("ffn.router.") and rest.endswith(("expert_bias", "load_since_update")):
                continue  # router state used only by the aux-loss-free update (refused above when used)
            else:
                raise ValueError(f"checkpoint tensor {key} has no HF {arch} equivalent")
        else:
            raise ValueError(f"checkpoint tensor {key} has no HF {arch} equivalent")
    return {k: v.contiguous() for k, v in out.items()}


def export(run_dir: Path, out_dir: Path, *, arch: str = "auto", dtype: str = "float32", force: bool = False) -> Path:
    """Write the latest checkpoint of `run_dir` (or the checkpoint `run_dir`) as an HF directory."""
    step_dir = resolve_checkpoint(Path(run_dir))
    manifest = ckpt.read_manifest(step_dir)
    config = config_from_dict(manifest["config"], f"{step_dir}/manifest.json")
    if config.model.hf_model is not None:  # transformers' own class: written back as the source's family
        if arch != "auto":
            raise ValueError(f"--arch {arch}: a model.hf_model run exports as its source's class; leave --arch out")
        from moesys.hf_export import export_hf_model
        return export_hf_model(step_dir, config, out_dir, dtype=dtype, force=force)
    arch = pick_arch(config, arch)
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ValueError(f"{out_dir} exists; pass --force to replace it")
    tensors = hf_state_dict(load_file(str(step_dir / "model.safetensors")), config, arch)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tensors = {k: v.to(torch_dtype).contiguous() for k, v in tensors.items()}
    tmp = out_dir.with_name(out_dir.name + ".tmp-export")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    cfg = hf_config(config, arch)
    cfg.architectures = ["MixtralForCausalLM" if arch == "mixtral" else "Qwen3MoeForCausalLM"]
    cfg.dtype = dtype
    cfg.save_pretrained(tmp)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if config.data.tokenizer is not None:
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(config.data.tokenizer).save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def run(args: argparse.Namespace) -> int:
    try:
        out = export(Path(args.run_dir), Path(args.out_dir), arch=args.arch, dtype=args.dtype, force=args.force)
    except ValueError as e:
        print(f"moesys export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0

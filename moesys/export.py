"""`moesys export RUN_DIR OUT_DIR`: a training checkpoint as a Hugging Face model directory.

A run started from a checkpoint (`model.init_from`) is written in its source's family (Mixtral,
Qwen2-MoE, Qwen3-MoE or OLMoE) with the source's config.json, generation config and tokenizer,
kept in RUN_DIR/hf_source when training started; the tensors are the inverse of what init_from read
(moesys.hf.names), in the source's dtype by default, so importing and exporting without a training
step gives back every tensor bit for bit. A run moesys initialised is written in its `train.param_dtype`
by default (bf16 weights stay bf16, fp32 masters stay fp32).

A run moesys initialised itself is written as Mixtral (`MixtralForCausalLM`) or Qwen3-MoE
(`Qwen3MoeForCausalLM`), whichever the architecture matches; a feature neither has (sigmoid routing,
the aux-loss-free bias, shared experts, capacity dropping, ...) is a ValueError naming it. Its
tokenizer is the run's `data.tokenizer`, or for byte-level runs a byte tokenizer (moesys.hf.tokenizer)
that AutoTokenizer loads. Tensors go under the on-disk per-expert names transformers reads (docs/ARCHITECTURE.md,
traps). Our RoPE is transformers' rotate-half convention and our qk_norm is Qwen3's, so the logits match.

Before anything is read, the checkpoint's model.safetensors is verified as `train --resume` verifies it
(size and SHA-256 against the manifest), then its header is checked (upcycling.io.read_header): a damaged
checkpoint is one line naming the file, not safetensors' traceback.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moesys import checkpoint as ckpt
from moesys import owned_tmp
from moesys.checkpoint_integrity import verify_checkpoint
from moesys.config import Config, config_from_dict
from moesys.hf.families import ARCHITECTURES
from moesys.hf.names import tensor_map
from moesys.hf.source import CONFIG_FILES, TOKENIZER_FILES, copy_files, source_of
from moesys.hf.tokenizer import save_byte_tokenizer
from moesys.upcycling.io import read_header

ARCHS = ("auto", "mixtral", "qwen3_moe")
MODEL_FILE = "model.safetensors"  # the one file of a checkpoint export reads, besides manifest.json
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ROUTER_STATE = ("expert_bias", "load_since_update")
_ROPE_KEYS = {"default": {"rope_type"}, "linear": {"rope_type", "factor"},
              "llama3": {"rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a training run directory (its latest checkpoint) or a ckpt/step_N directory")
    parser.add_argument("out_dir", help="the Hugging Face model directory to write")
    parser.add_argument("--arch", choices=ARCHS, default="auto",
                        help="HF architecture; auto: the source's family for a run started with model.init_from, "
                             "else Qwen3-MoE when model.qk_norm is set, else Mixtral")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="dtype of the written tensors; auto: the source checkpoint's for a run started "
                             "with model.init_from or model.hf_model, else the run's train.param_dtype")
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


def check_intact(step_dir: Path) -> None:
    """What `train --resume` verifies (the manifest's sizes and SHA-256, checkpoint_integrity), for the
    file export reads, then its safetensors header: a damaged checkpoint is a ValueError naming the file.
    A manifest that lists no files (written by hand or by a tool, not by the trainer) has nothing to
    verify against: the header check alone applies."""
    remedy = f"export an intact checkpoint instead ({step_dir.parent}/step_N)"
    try:
        manifest = ckpt.read_manifest(step_dir)
        lists_files = not isinstance(manifest, dict) or "files" in manifest
    except (OSError, ValueError, TypeError):
        lists_files = True  # missing or unreadable: verify_checkpoint says which, in its words
    problem = verify_checkpoint(step_dir, only=(MODEL_FILE,)) if lists_files else None
    if problem is not None:
        raise ValueError(f"{problem}; {remedy}")
    read_header(step_dir / MODEL_FILE, remedy)  # manifests from before checksums record no digest


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
    if m.qk_norm and m.qk_norm_span != "head":
        bad.append("model.qk_norm_span='all' (OLMoE's norm; neither Mixtral nor Qwen3-MoE has it)")
    if m.sliding_layers is not None and m.sliding_window is not None:
        bad.append(f"model.sliding_layers={m.sliding_layers} (HF {arch} applies one window to every layer)")
    if arch == "mixtral" and (m.qkv_bias or m.o_bias):
        bad.append("model.qkv_bias/o_bias (Mixtral attention has no biases)")
    if arch == "qwen3_moe" and m.qkv_bias != m.o_bias:
        bad.append(f"model.qkv_bias={m.qkv_bias} with o_bias={m.o_bias} (Qwen3-MoE's attention_bias sets all four)")
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
    """The transformers config of a run moesys initialised itself, as `arch` (mixtral or qwen3_moe)."""
    m, moe = config.model, config.moe
    head_dim = m.head_dim or m.hidden_size // m.num_heads
    hidden_act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[moe.activation]
    common = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                  num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads, head_dim=head_dim,
                  hidden_act=hidden_act, max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
                  tie_word_embeddings=m.tie_embeddings, initializer_range=m.init_std,
                  rope_parameters={**m.rope_scaling.model_dump(include=_ROPE_KEYS[m.rope_scaling.rope_type]),
                                   "rope_theta": m.rope_theta},
                  num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.aux_loss_coef)
    if arch == "mixtral":
        from transformers import MixtralConfig
        return MixtralConfig(intermediate_size=moe.ffn_size, num_local_experts=moe.num_experts,
                             router_jitter_noise=0.0, sliding_window=m.sliding_window, **common)
    from transformers import Qwen3MoeConfig
    dense = [layer for layer in range(m.num_layers) if not moe.is_moe_layer(layer)]
    return Qwen3MoeConfig(intermediate_size=m.ffn_size, moe_intermediate_size=moe.ffn_size,
                          num_experts=moe.num_experts, norm_topk_prob=moe.router.renormalize,
                          decoder_sparse_step=1, mlp_only_layers=dense, attention_bias=m.qkv_bias,
                          use_sliding_window=m.sliding_window is not None, sliding_window=m.sliding_window, **common)


def hf_state_dict(flat: dict[str, torch.Tensor], config: Config, family: str) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (experts by global id) -> HF on-disk names (moesys.hf.names, inverted); every
    tensor must be used once. Fused gate/up rows are split in half; tied lm_head is not written."""
    names = tensor_map(config, family)
    state = {k: v for k, v in flat.items() if not k.endswith(_ROUTER_STATE)}  # refused above when used
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise ValueError(f"checkpoint tensor {unknown[0]} has no HF {family} equivalent")
    missing = sorted(set(names) - set(state))
    if missing:
        raise ValueError(f"the checkpoint lacks {missing[0]}, which a {family} model of its config has")
    out: dict[str, torch.Tensor] = {}
    for ours, hf in names.items():
        t = state[ours]
        if ours == "lm_head.weight" and config.model.tie_embeddings:
            continue
        if len(hf) == 2:
            if t.shape[0] % 2:
                raise ValueError(f"{ours} has {t.shape[0]} rows; a fused gate/up projection has an even number")
            rows = t.shape[0] // 2
            out[hf[0]], out[hf[1]] = t[:rows], t[rows:]
        else:
            out[hf[0]] = t
    return {k: v.contiguous() for k, v in out.items()}


def source_dtype(hf_config: dict) -> str:
    dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    return dtype if dtype in DTYPES else "float32"


def _write_tokenizer(config: Config, source: Path | None, out: Path) -> None:
    """The run's tokenizer: the source checkpoint's (kept in hf_source), `data.tokenizer`, or bytes."""
    tokenizer = config.data.tokenizer
    if source is not None and (tokenizer is None or tokenizer == config.model.init_from):
        if copy_files(source, out, TOKENIZER_FILES):
            return
    if tokenizer is not None:
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
        return
    save_byte_tokenizer(out, config.model.max_seq_len)


def export(run_dir: Path, out_dir: Path, *, arch: str = "auto", dtype: str = "auto", force: bool = False) -> Path:
    """Write the latest checkpoint of `run_dir` (or the checkpoint `run_dir`) as an HF directory."""
    step_dir = resolve_checkpoint(Path(run_dir))
    check_intact(step_dir)
    manifest = ckpt.read_manifest(step_dir)
    config = config_from_dict(manifest["config"], f"{step_dir}/manifest.json")
    if config.model.hf_model is not None:  # transformers' own class: written back as the source's family
        if arch != "auto":
            raise ValueError(f"--arch {arch}: a model.hf_model run exports as its source's class; leave --arch out")
        from moesys.hf_export import export_hf_model
        return export_hf_model(step_dir, config, out_dir, dtype=dtype, force=force)
    source = source_of(step_dir) if config.model.init_from is not None else None
    if config.model.init_from is not None and source is None:
        raise ValueError(f"{step_dir} belongs to a run started from {config.model.init_from} but its run "
                         "directory has no hf_source/config.json (written when training starts); export the "
                         "run directory the trainer wrote")
    if source is not None:
        source_config = json.loads((source / "config.json").read_text())
        family = source_config["model_type"]
        if arch not in ("auto", family):
            raise ValueError(f"--arch {arch}: this run started from a {family} checkpoint and is written as one; "
                             "leave --arch at auto")
    else:
        family = pick_arch(config, arch)
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"--dtype {dtype!r} is unknown; use auto or one of {list(DTYPES)}")
    if dtype == "auto":
        dtype = source_dtype(source_config) if source is not None else config.train.param_dtype
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ValueError(f"{out_dir} exists; pass --force to replace it")
    tensors = hf_state_dict(load_file(str(step_dir / MODEL_FILE)), config, family)
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    with owned_tmp.atomic_output_dir(out_dir, overwrite=force, kind="export") as tmp:
        if source is not None:
            copy_files(source, tmp, CONFIG_FILES)
            if dtype != source_dtype(source_config):
                (tmp / "config.json").write_text(json.dumps({**source_config, "dtype": dtype}, indent=2) + "\n")
        else:
            cfg = hf_config(config, family)
            cfg.architectures = [ARCHITECTURES[family]]
            cfg.dtype = dtype
            cfg.save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_tokenizer(config, source, tmp)
    return out_dir


def run(args: argparse.Namespace) -> int:
    """A ValueError is reported by cli.guarded: one line, exit code 2."""
    out = export(Path(args.run_dir), Path(args.out_dir), arch=args.arch, dtype=args.dtype, force=args.force)
    print(f"wrote {out}")
    return 0

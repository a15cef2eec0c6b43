"""`moesys export` for a `model.hf_model` run: the checkpoint written back as the source's transformers class.

The training checkpoint holds the wrapped model's state (`hf.` + transformers' names, experts split
per global id in moe_mlp's layout). Export stacks each block's experts, converts them back to the
experts class's own layout (`hf_experts_layout.to_hf`), loads everything into the class built from
the source's config.json (strictly: every tensor used once, none missing) and writes it with
`save_pretrained`, which splits the experts into the on-disk per-expert names transformers reads.
The source's tokenizer and generation-config files are copied beside it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from moesys import owned_tmp
from moesys.config import Config
from moesys.export import DTYPES, source_dtype
from moesys.models.hf_experts_layout import experts_spec, find_hf_experts, to_hf
from moesys.models.hf_source import check_hf_dir, fp32_strict_names, hf_config
from moesys.train_precision import kept_in_fp32

PREFIX = "hf."
_COPIED = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
           "merges.txt", "chat_template.jinja", "generation_config.json")


def hf_state_from_checkpoint(flat: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> `model`'s (a transformers class) state dict names and layouts."""
    state = {k[len(PREFIX):]: v for k, v in flat.items() if k.startswith(PREFIX)}
    stray = sorted(k for k in flat if not k.startswith(PREFIX))
    if stray:
        raise ValueError(f"checkpoint tensor {stray[0]} is not part of an hf_model run's model (no '{PREFIX}' prefix)")
    for holder_name, _, module in find_hf_experts(model):
        layout, _ = experts_spec(module)
        E = module.down_proj.shape[0]
        prefix = f"{holder_name}.experts."
        fused = {}
        for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            keys = [f"{prefix}{e}.{name}" for e in range(E)]
            present = [k in state for k in keys]
            if any(present) and not all(present):
                raise ValueError(f"checkpoint lacks {keys[present.index(False)]} (it has other experts of {prefix}{name})")
            if all(present):
                fused[name] = torch.stack([state.pop(k) for k in keys])
        state.update({prefix + k: v for k, v in to_hf(fused, layout).items()})
    return state


def export_hf_model(step_dir: Path, config: Config, out_dir: Path, *, dtype: str = "auto",
                    force: bool = False) -> Path:
    from transformers import AutoModelForCausalLM

    source = check_hf_dir(config.model.hf_model)
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ValueError(f"{out_dir} exists; pass --force to replace it")
    cfg = hf_config(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    state = hf_state_from_checkpoint(load_file(str(Path(step_dir) / "model.safetensors")), model)
    if dtype == "auto":  # the source checkpoint's dtype, as for an init_from run
        dtype = source_dtype(json.loads((source / "config.json").read_text()))
    torch_dtype = DTYPES[dtype]
    # Kept in fp32 where the class keeps them so (DeepSeek-V3's router weight and selection bias).
    keep_fp32 = fp32_strict_names(model)
    state = {k: v if kept_in_fp32(k, keep_fp32) else v.to(torch_dtype) for k, v in state.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        bad = (result.missing_keys or result.unexpected_keys)[0]
        kind = "lacks" if result.missing_keys else "has an extra"
        raise ValueError(f"checkpoint {kind} tensor {bad} for {type(model).__name__}; it was written for another model")
    model.tie_weights()
    model.config.dtype = dtype
    with owned_tmp.atomic_output_dir(out_dir, overwrite=force, kind="export") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in _COPIED:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
    return out_dir

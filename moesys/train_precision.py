"""`train.param_dtype`: fp32 master weights under bf16 autocast (the default), or pure bf16: parameters,
gradients and AdamW state in bf16, as transformers' Trainer trains a bf16 model.

- `cast_parameters` runs in `train.build_model` right after the model is built, before `parallelize`,
  the init_from weights and the optimizer: parallelize's expert copies, the checkpoint's tensors (a bf16
  checkpoint is copied as it is, never through fp32) and AdamW's state (allocated like each parameter
  at its first step) then all start in bf16. Buffers keep their dtype (see `cast_parameters`).
- `autocast_dtype`: what `train.dtype` means for the forward.
- `check_resume`: a run resumes only with the param_dtype it was saved with.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from moesys.config import Config

def param_dtype(config: Config) -> torch.dtype:
    return getattr(torch, config.train.param_dtype)  # the config allows "float32" and "bfloat16" only


def autocast_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    """The forward's autocast dtype, None for none. `train.dtype: auto` is bf16 on the GPU, and on the CPU
    too when the parameters are bf16 (their compute is bf16 either way; autocast keeps the ops it lists
    as fp32-sensitive, softmax and the losses, in fp32 as on the GPU)."""
    dtype = config.train.dtype
    if dtype == "bfloat16" or (dtype == "auto" and (device.type == "cuda" or config.train.param_dtype == "bfloat16")):
        return torch.bfloat16
    return None


def precision_label(config: Config, device: torch.device) -> str:
    """For the start-up block: 'float32', 'bfloat16 autocast' or 'bfloat16 autocast, bfloat16 parameters'."""
    compute = "bfloat16 autocast" if autocast_dtype(config, device) is not None else "float32"
    return compute if config.train.param_dtype == "float32" else f"{compute}, bfloat16 parameters"


@torch.no_grad()
def cast_parameters(model: nn.Module, dtype: torch.dtype, keep_fp32: tuple[str, ...] = ()) -> None:
    """Floating-point parameters to `dtype` in place: the same Parameter objects (tied weights stay tied,
    handles that hold them stay valid), meta ones included. Parameters whose name contains one of
    `keep_fp32` stay as they are (transformers' `_keep_in_fp32_modules_strict`, which a bf16
    `from_pretrained` keeps in fp32 too: DeepSeek-V3's router weight).

    Buffers are not cast. Each one moesys keeps is fp32 state on purpose: the router's aux-loss-free
    `expert_bias` (a step of `bias_update_rate`, 1e-3 by default, rounds away in bf16 once a bias
    passes 0.5, where bf16's spacing is 0.0039) and its `load_since_update` token counts (bf16 holds
    integers exactly only up to 256); RoPE's `inv_freq` (bf16's relative error of 2^-9 moves the angle
    at position 2048 by up to 4 radians); transformers' `e_score_correction_bias` and `inv_freq` under
    `model.hf_model` (fp32 in a bf16 from_pretrained too)."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != dtype and not kept_in_fp32(name, keep_fp32):
            p.data = p.data.to(dtype)


def kept_in_fp32(name: str, keep_fp32: tuple[str, ...]) -> bool:
    """Whether a tensor name falls under a `_keep_in_fp32_modules_strict` entry (matched as transformers'
    loader matches such plain names: anywhere in the name)."""
    return any(k in name for k in keep_fp32)


def checkpoint_param_dtype(manifest: dict) -> str:
    """The param_dtype a checkpoint was trained with (checkpoints from before the option: float32)."""
    return manifest.get("config", {}).get("train", {}).get("param_dtype", "float32")


def check_resume(config: Config, manifest: dict, ckpt_dir: Path) -> None:
    """ValueError when the checkpoint was trained with another param_dtype. Loading would cast silently:
    fp32 masters and moments rounded to bf16 (the run's precision lost), or bf16 ones widened (a run that
    is not the one saved). A change of precision is a new run from the weights."""
    saved = checkpoint_param_dtype(manifest)
    if saved != config.train.param_dtype:
        raise ValueError(f"--resume: {ckpt_dir} was trained with train.param_dtype={saved} but this run sets "
                         f"train.param_dtype={config.train.param_dtype}; resume with train.param_dtype={saved}, or "
                         "start a new run from its weights (moesys export RUN_DIR OUT_DIR, then model.init_from "
                         "or model.hf_model=OUT_DIR, as the run was started)")

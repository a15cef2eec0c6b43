"""Finishing a transformers model built on the meta device once its checkpoint tensors are in place.

Non-persistent buffers (RoPE's `inv_freq`) are in no checkpoint: each module holding one on the meta
device is rebuilt on the CPU from its config, computing them exactly as a normal load does, then moved.
Used by the offload loader and by `model.hf_model` loading.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def materialize_meta_buffers(model: nn.Module, device) -> None:
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and hasattr(module, "config"):
            parent_name, _, child = name.rpartition(".")
            with torch.device("cpu"):
                fresh = type(module)(module.config)
            setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh.to(device))


def still_meta(model: nn.Module, skip: set[int] = frozenset()) -> list[str]:
    """Names of the parameters (other than those whose id is in `skip`) and buffers left on the meta device."""
    left = [n for n, p in model.named_parameters() if p.is_meta and id(p) not in skip]
    return left + [n for n, b in model.named_buffers() if b.is_meta]

"""KV cache in host memory with attention on the CPU (MoE-Lens): for a batch whose KV cache would take the
device memory the expert cache needs, the keys and values stay in host RAM and each layer's attention runs
there; only the queries go down and the attention output comes back (B x heads x D per layer and step).

Two transformers extension points, nothing patched: a cache layer (HostKVLayer, a DynamicLayer whose
update moves the new keys/values to the host first) and an attention function registered in
transformers' AttentionInterface (and its mask interface, sdpa's masks) under HOST_ATTENTION, which runs
transformers' own sdpa attention on the host tensors. `host_attention(model)` switches a model to it for
a block of code and back.

Legend: B rows, N heads, L cached columns, D head dim.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

HOST_ATTENTION = "moesys_host_kv"
HOST = torch.device("cpu")


class HostKVLayer(DynamicLayer):
    """A DynamicLayer that keeps its keys and values in host memory."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return super().update(key_states.to(HOST), value_states.to(HOST), *args, **kwargs)


def host_sdpa(module, query_BNTD, key_BNLD, value_BNLD, attention_mask, **kwargs):
    """transformers' sdpa attention on the host: keys/values are there already (HostKVLayer), the queries
    and mask go down, the output [B, T, N, D] comes back to the queries' device."""
    device = query_BNTD.device
    mask = attention_mask.to(HOST) if isinstance(attention_mask, torch.Tensor) else attention_mask
    out, _ = sdpa_attention_forward(module, query_BNTD.to(HOST), key_BNLD, value_BNLD, mask, **kwargs)
    return out.to(device), None


@contextlib.contextmanager
def host_attention(model):
    """Run `model`'s attention through host_sdpa inside the block (its implementation is restored after)."""
    AttentionInterface.register(HOST_ATTENTION, host_sdpa)
    AttentionMaskInterface.register(HOST_ATTENTION, sdpa_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation(HOST_ATTENTION)
    if model.config._attn_implementation != HOST_ATTENTION:
        raise ValueError(f"{type(model).__name__} cannot switch its attention implementation (it does not use "
                         "transformers' AttentionInterface), so its KV cache cannot live in host memory; use kv='device'")
    try:
        yield
    finally:
        model.set_attn_implementation(before)

"""exact=True: an offloaded model whose greedy tokens in a batch equal each sequence's tokens alone, bit for
bit, in bf16 and fp16 as in fp32, on the GPU as on the CPU.

In a batch, the same sequence meets other shapes than alone: more rows in every matmul, more (padded) key
columns in attention, more routed rows per expert, and the experts a step needs arrive in other waves. cuBLAS
and SDPA pick their reduction order by shape, so logits round differently, and greedy decoding parts at the
near-ties that bf16 leaves (BENCHMARKS.md, "Batch equals alone, explained"). Exact mode removes every such
dependence:

- matmuls (every nn.Linear: attention projections, routers, experts, the LM head) and last-dimension sums and
  means (RMSNorm) run `moesys.kernels.batch_invariant`'s fixed-tile kernels, through its dispatch mode around
  the model's forward;
- attention runs `moesys.kernels.exact_attention` (transformers' attn_implementation "moesys_exact", with
  transformers' boolean SDPA mask), whose sums are anchored at each query, so left padding adds nothing;
- the experts run the engine's per-expert loop (experts_implementation="eager"): each routed row's experts
  summed in ascending expert id into the row, the same order in any batch and any wave plan;
- no CUDA-graph decode step (the graph's grouped call sums otherwise), no CPU experts, no quantized experts.

The price is speed: fixed tiles, a Python dispatch per aten op and an expert loop. It is for evaluations and
reproducible generation, not throughput. Models with recurrent layers (Mamba, linear attention) are refused:
their scans are not covered.
"""

from __future__ import annotations

import functools

import torch.nn as nn

from moesys.kernels.batch_invariant import BatchInvariantMode
from moesys.kernels.exact_attention import transformers_forward

ATTN_IMPLEMENTATION = "moesys_exact"
# what exact=True fixes among moesys.offload.load's options (the user may not ask for another value)
FIXED_OPTIONS = {"experts_implementation": "eager", "quantize_experts": "none", "cpu_experts": "off"}


def check_options(opts: dict, explicit: dict) -> dict:
    """The load options with exact mode's fixed ones; a conflicting explicit option is an error."""
    for key, want in FIXED_OPTIONS.items():
        given = explicit.get(key)
        if given is not None and given != want:
            raise ValueError(f"exact=True needs {key}={want!r} (batch-invariant experts), got {given!r}; "
                             f"drop {key} or exact")
    if explicit.get("cuda_graph") or explicit.get("compile"):
        raise ValueError("exact=True decodes without the CUDA-graph step (its grouped experts call sums in another "
                         "order) and without compiling it; drop cuda_graph=True / compile=True or exact")
    return {**opts, **FIXED_OPTIONS, "cuda_graph": False, "compile": False}


def register() -> None:
    """transformers' attention function and mask maker for ATTN_IMPLEMENTATION (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, transformers_forward)
    # always a boolean mask: SDPA's maker returns None for an unpadded causal batch (is_causal instead)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, functools.partial(sdpa_mask, allow_is_causal_skip=False))


def unsupported(model: nn.Module) -> str | None:
    """Why exact mode cannot cover this model, or None."""
    from transformers import DynamicCache

    from moesys.offload.batch_kv import layer_kind

    config = model.config
    kinds = {type(layer).__name__: layer_kind(layer) for layer in DynamicCache(config=config).layers}
    other = sorted(name for name, kind in kinds.items() if kind not in ("full", "sliding"))
    if other:
        return (f"{config.model_type} keeps cache layers {other}: recurrent (Mamba or linear-attention) layers, "
                "whose scans exact mode does not make batch-invariant; load it without exact=True")
    return None


def enable(model: nn.Module) -> nn.Module:
    """Exact mode on a built offloaded model (moesys.offload.load(..., exact=True) calls this)."""
    from moesys.kernels.launch import unavailable_reason

    why = unsupported(model) or unavailable_reason(model.moesys_offload.device)
    if why is not None:
        raise ValueError(f"exact=True: {why}")
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    forward = model.forward  # the bound method; the wrapper keeps its signature (batch_kv.cache_kwarg reads it)

    @functools.wraps(forward)
    def exact_forward(*args, **kwargs):
        with BatchInvariantMode() as mode:
            out = forward(*args, **kwargs)
        model.moesys_exact_calls += mode.calls
        return out

    model.forward = exact_forward
    model.moesys_exact = True
    model.moesys_exact_calls = 0  # ops the batch-invariant kernels took over (a test sees they ran)
    return model

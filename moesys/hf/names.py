"""The tensor-name map between moesys checkpoint names and Hugging Face on-disk names, per family.

moesys names are those of `moesys.checkpoint` (experts split by global id:
`blocks.{i}.ffn.experts.{e}.gate_up_proj [2I, H]`); HF names are those transformers reads from disk
(per-expert `w1/w3/w2` for Mixtral, `gate_proj/up_proj/down_proj` otherwise; docs/ARCHITECTURE.md,
section 6, traps). Each moesys tensor is one HF tensor, or the row concatenation of a gate and an up
projection. The map is templated per layer and expert (torchtitan's state-dict adapters) from the moesys config, so it
names exactly the tensors a model of that config has; the expert names come from the offload
adapters (one table of on-disk expert names for the whole project).

Legend: H hidden, I expert intermediate, F dense intermediate, E experts.
"""

from __future__ import annotations

from moesys.config import Config
from moesys.offload.adapters import ADAPTERS

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def tensor_map(config: Config, family: str) -> dict[str, tuple[str, ...]]:
    """moesys checkpoint name -> the HF names it is made of (two names: gate rows, then up rows)."""
    m, moe = config.model, config.moe
    adapter = ADAPTERS[family]
    out: dict[str, tuple[str, ...]] = {"embed.weight": ("model.embed_tokens.weight",),
                                       "norm.weight": ("model.norm.weight",),
                                       "lm_head.weight": ("model.embed_tokens.weight",) if m.tie_embeddings
                                       else ("lm_head.weight",)}
    for i in range(m.num_layers):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        out[ours + "attn_norm.weight"] = (hf + "input_layernorm.weight",)
        out[ours + "ffn_norm.weight"] = (hf + "post_attention_layernorm.weight",)
        for proj in _ATTN:
            out[f"{ours}attn.{proj}.weight"] = (f"{hf}self_attn.{proj}.weight",)
            if (m.qkv_bias and proj != "o_proj") or (m.o_bias and proj == "o_proj"):
                out[f"{ours}attn.{proj}.bias"] = (f"{hf}self_attn.{proj}.bias",)
        if m.qk_norm:
            for norm in ("q_norm", "k_norm"):
                out[f"{ours}attn.{norm}.weight"] = (f"{hf}self_attn.{norm}.weight",)
        if not moe.is_moe_layer(i):
            out.update(_mlp(ours + "ffn.", hf + "mlp."))
            continue
        block = adapter.disk_block.format(i=i)
        out[ours + "ffn.router.weight"] = (f"{block}.gate.weight",)
        for e in range(moe.num_experts):
            out[f"{ours}ffn.experts.{e}.gate_up_proj"] = (adapter.expert_key(i, e, 0), adapter.expert_key(i, e, 1))
            out[f"{ours}ffn.experts.{e}.down_proj"] = (adapter.expert_key(i, e, 2),)
        if moe.shared_ffn_size:
            out.update(_mlp(ours + "ffn.shared_expert.", f"{block}.shared_expert."))
            if moe.shared_gate:
                out[ours + "ffn.shared_expert_gate.weight"] = (f"{block}.shared_expert_gate.weight",)
    return out


def _mlp(ours: str, hf: str) -> dict[str, tuple[str, ...]]:
    """A dense gated MLP: our fused gate_up_proj [2F, H] is HF's gate_proj and up_proj rows."""
    return {ours + "gate_up_proj.weight": (hf + "gate_proj.weight", hf + "up_proj.weight"),
            ours + "down_proj.weight": (hf + "down_proj.weight",)}


def hf_shapes(shapes: dict[str, tuple[int, ...]], names: dict[str, tuple[str, ...]]) -> dict[str, tuple[int, ...]]:
    """HF name -> the shape a moesys model with these tensor `shapes` (moesys names) implies."""
    out = {}
    for ours, hf in names.items():
        shape = tuple(shapes[ours])
        if len(hf) == 2:
            shape = (shape[0] // 2, *shape[1:])
        for name in hf:
            out[name] = shape
    return out

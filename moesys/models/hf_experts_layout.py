"""transformers experts modules <-> moesys `Experts`: find them in a model, convert their weights once.

transformers v5 marks an experts class with `@use_experts_implementation(is_concatenated=...,
is_transposed=..., has_bias=..., has_gate=..., has_post_expert_norm=...)`; each instance carries
those flags. moesys' `Experts` holds one layout only (gate_up_proj [E, 2I, H] with the gate rows
first, down_proj [E, H, I], biases [E, 2I] / [E, H]), so an HF model trained by moesys gets its
experts converted to that layout once at load (no per-call copies) and back at export. The gate is
the one the transformers integration recognises (`integrations.transformers.experts_activation`: the
default gate with a known act_fn, or a known custom `_apply_gate` such as GPT-OSS's clamped SwiGLU);
its `interleaved` says how the gate reads the rows, so that is how they are reordered. A gate or norm
moesys has no activation for is refused: expert parallelism and FSSDP run `moe_mlp` with an activation.
The parameter names are the same (`experts.gate_up_proj`, ...), so state dicts keep transformers' names.

Legend: E experts, H hidden, I expert intermediate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from moesys.activations import Activation
from moesys.layers.experts import Experts


@dataclass(frozen=True)
class ExpertsLayout:
    """How one transformers experts module stores its weights: gate/up rows interleaved ([g0, u0, g1, ...],
    as its gate reads them), transposed ([E, H, 2I] / [E, I, H]), with biases, gated (else `up_proj`)."""
    interleaved: bool
    is_transposed: bool
    has_bias: bool
    has_gate: bool

    @property
    def up_name(self) -> str:
        return "gate_up_proj" if self.has_gate else "up_proj"


def is_hf_experts(module: nn.Module) -> bool:
    """An experts module of transformers' experts interface (or one with its weights and forward)."""
    return hasattr(module, "is_concatenated") and hasattr(module, "down_proj") and \
        (hasattr(module, "gate_up_proj") or hasattr(module, "up_proj"))


def find_hf_experts(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(holder name, holder, experts) for every transformers experts module, in model order. The
    holder is the MoE block whose `experts` child it is; another child name is refused, because
    checkpoints find experts by the `.experts.` in their names."""
    found = []
    for name, module in model.named_modules():
        if not is_hf_experts(module):
            continue
        holder_name, _, child = name.rpartition(".")
        if child != "experts":
            raise ValueError(f"hf_model: the experts module {name} ({type(module).__name__}) is not a child named "
                             "'experts' of its MoE block; moesys finds experts by that name")
        found.append((holder_name, model.get_submodule(holder_name), module))
    return found


def experts_spec(module: nn.Module) -> tuple[ExpertsLayout, Activation]:
    """The module's storage layout and the activation moe_mlp applies to the converted (concatenated)
    rows; a ValueError naming what moesys cannot compute."""
    from moesys.integrations.transformers import experts_activation

    cls = type(module).__name__
    if getattr(module, "has_post_expert_norm", False):
        raise ValueError(f"hf_model: {cls} applies a norm after each expert, which moe_mlp does not compute; this "
                         "architecture cannot be trained with model.hf_model yet")
    spec = experts_activation(module)
    if spec is None:
        what = "gate function (_apply_gate)" if getattr(module, "has_gate", True) else "activation"
        raise ValueError(f"hf_model: {cls}'s {what} matches none of moesys' activations; it runs only through the "
                         "generic path of experts_implementation='moesys', which moesys.parallel does not shard, so "
                         "this architecture cannot be trained with model.hf_model yet")
    layout = ExpertsLayout(spec.interleaved, getattr(module, "is_transposed", False), getattr(module, "has_bias", False),
                           getattr(module, "has_gate", True))
    return layout, dataclasses.replace(spec, interleaved=False)  # the rows are de-interleaved at load


def _deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[g0, u0, g1, u1, ...] along `dim` -> [g0, g1, ..., u0, u1, ...]."""
    idx = torch.arange(t.shape[dim], device=t.device)
    return torch.cat((t.index_select(dim, idx[0::2]), t.index_select(dim, idx[1::2])), dim=dim)


def _interleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of `_deinterleave`."""
    gate, up = t.chunk(2, dim=dim)
    return torch.stack((gate, up), dim=dim + 1).flatten(dim, dim + 1)


def to_moesys(weights: dict[str, torch.Tensor], layout: ExpertsLayout) -> dict[str, torch.Tensor]:
    """transformers in-memory expert tensors -> moesys `Experts` tensors (gate_up_proj, down_proj, biases)."""
    w_up = weights[layout.up_name]
    w_down = weights["down_proj"]
    if layout.is_transposed:  # [E, H, 2I] / [E, I, H]
        w_up, w_down = w_up.transpose(1, 2), w_down.transpose(1, 2)
    out = {"gate_up_proj": w_up, "down_proj": w_down}
    if layout.has_bias:
        out["gate_up_proj_bias"] = weights[layout.up_name + "_bias"]
        out["down_proj_bias"] = weights["down_proj_bias"]
    if layout.interleaved:
        out["gate_up_proj"] = _deinterleave(out["gate_up_proj"], 1)
        if layout.has_bias:
            out["gate_up_proj_bias"] = _deinterleave(out["gate_up_proj_bias"], 1)
    return {k: v.contiguous() for k, v in out.items()}


def to_hf(weights: dict[str, torch.Tensor], layout: ExpertsLayout) -> dict[str, torch.Tensor]:
    """The inverse of `to_moesys`: moesys tensors (keys gate_up_proj, ...) -> transformers' in-memory names."""
    w_up, w_down = weights["gate_up_proj"], weights["down_proj"]
    b_up = weights.get("gate_up_proj_bias")
    if layout.interleaved:
        w_up = _interleave(w_up, 1)
        b_up = None if b_up is None else _interleave(b_up, 1)
    if layout.is_transposed:
        w_up, w_down = w_up.transpose(1, 2), w_down.transpose(1, 2)
    out = {layout.up_name: w_up, "down_proj": w_down}
    if layout.has_bias:
        out[layout.up_name + "_bias"] = b_up
        out["down_proj_bias"] = weights["down_proj_bias"]
    return {k: v.contiguous() for k, v in out.items()}


def moesys_experts(module: nn.Module, backend: str) -> tuple[Experts, ExpertsLayout]:
    """A moesys `Experts` computing what the transformers experts `module` computes, with its weights."""
    layout, activation = experts_spec(module)
    hf = {n: p for n, p in module.named_parameters(recurse=False)}
    converted = to_moesys(hf, layout)
    E, rows, H = converted["gate_up_proj"].shape
    ffn = converted["down_proj"].shape[2]
    with torch.device(converted["down_proj"].device):  # meta stays meta: sharded loading fills it later
        experts = Experts(E, H, ffn, activation=activation, bias=layout.has_bias, backend=backend)
    if experts.gate_up_proj.shape[1] != rows:
        raise ValueError(f"hf_model: {type(module).__name__}.{layout.up_name} has {rows} rows per expert; a "
                         f"{'gated' if layout.has_gate else 'non-gated'} expert of intermediate size {ffn} needs "
                         f"{experts.gate_up_proj.shape[1]}")
    with torch.no_grad():
        for name, t in converted.items():
            param = getattr(experts, name)
            param.data = t.detach().clone().to(param.device)
            param.requires_grad_(hf[_hf_name(name, layout)].requires_grad)
    return experts, layout


def _hf_name(moesys_name: str, layout: ExpertsLayout) -> str:
    return moesys_name.replace("gate_up_proj", layout.up_name)

"""Per-architecture knowledge: how a model type's experts are named on disk.

The in-memory side is found generically (a sparse MoE block is a module with a `gate` (or `router`)
holding `weight [E, H]` and an `experts` module holding `gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]`,
the transformers v5 layout, or GPT-OSS's transposed one with biases, see moesys.offload.layout); only the
on-disk names differ. ADAPTERS spells them out for four families; any other model type gets an adapter read
off transformers' own checkpoint conversion mapping (the per-expert names its loader merges into gate_up_proj
/ down_proj, and its renamings), `from_conversion_mapping`, or, when that mapping converts no experts at all,
the in-memory names with the experts fused per layer on disk (`fused_on_disk`, GPT-OSS). Quantized checkpoints
(config.quantization_config, e.g. MXFP4) are refused: dequantize them first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn

from moesys.offload.layout import is_experts_module


@dataclass(frozen=True)
class Adapter:
    model_type: str
    # on-disk name of a sparse block, "{i}" = layer index; and the in-memory module name
    disk_block: str
    module_block: str
    # per-expert on-disk projection names: gate (None: non-gated experts), up, down
    proj_names: tuple[str | None, str, str]
    # further (regex, replacement) renamings from disk to module names, applied in order (PhiMoE's router)
    renames: tuple[tuple[str, str], ...] = ()

    def expert_key(self, layer: int, expert: int, part: int) -> str:
        """On-disk tensor name of projection `part` (0 gate, 1 up, 2 down) of one expert."""
        return f"{self.disk_block.format(i=layer)}.experts.{expert}.{self.proj_names[part]}.weight"

    def fused_keys(self, layer: int) -> tuple[str, str]:
        """Names of the fused v5 tensors (gate_up_proj [E, 2I, H], down_proj [E, H, I]) when a file keeps those."""
        base = f"{self.disk_block.format(i=layer)}.experts"
        return f"{base}.gate_up_proj", f"{base}.down_proj"

    def is_expert_key(self, name: str) -> bool:
        return re.search(r"\.experts\.(\d+\.|gate_up_proj|down_proj)", name) is not None

    def module_name(self, disk_name: str) -> str:
        """In-memory parameter name of a non-expert on-disk tensor."""
        disk = self.disk_block.split("{i}")
        mod = self.module_block.split("{i}")
        if disk != mod:
            pattern = re.escape(disk[0]) + r"(\d+)" + re.escape(disk[1]) + r"\."
            disk_name = re.sub(pattern, lambda m: f"{mod[0]}{m.group(1)}{mod[1]}.", disk_name)
        for source, target in self.renames:
            disk_name = re.sub(source, target, disk_name)
        return disk_name


_QWEN_LIKE = ("gate_proj", "up_proj", "down_proj")
ADAPTERS = {
    "mixtral": Adapter("mixtral", "model.layers.{i}.block_sparse_moe", "model.layers.{i}.mlp", ("w1", "w3", "w2")),
    "qwen2_moe": Adapter("qwen2_moe", "model.layers.{i}.mlp", "model.layers.{i}.mlp", _QWEN_LIKE),
    "qwen3_moe": Adapter("qwen3_moe", "model.layers.{i}.mlp", "model.layers.{i}.mlp", _QWEN_LIKE),
    "olmoe": Adapter("olmoe", "model.layers.{i}.mlp", "model.layers.{i}.mlp", _QWEN_LIKE),
}


_EXPERT_SOURCE = re.compile(r"^\.?(?:(?P<block>[\w.]*)\.)?experts\.\*\.(?P<proj>\w+)\.weight$")


def from_conversion_mapping(model_type: str) -> Adapter | None:
    """An adapter for a model whose checkpoints keep per-expert tensors under `model.layers.{i}.<block>`,
    read off transformers' checkpoint conversion mapping: the converter merging `<block>.experts.*.<gate>` and
    `.<up>` into gate_up_proj and `.<down>` into down_proj gives the projection names; a renaming `.<disk>.`
    -> `.<module>.` the block's two names (Mixtral's block_sparse_moe -> mlp); the other renamings apply to
    the non-expert names. Non-gated experts (a converter into experts.up_proj, no gate) get gate None. None
    when the mapping has no such converters."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    gate_up = up = down = None
    renames = []
    for entry in get_checkpoint_conversion_mapping(model_type) or []:
        sources, targets = list(entry.source_patterns), list(entry.target_patterns)
        if type(entry).__name__ == "WeightRenaming":
            renames.extend(zip(sources, targets))
        elif targets and targets[0].endswith("experts.gate_up_proj"):
            gate_up = sources
        elif targets and targets[0].endswith("experts.up_proj"):  # non-gated experts (Nemotron-H)
            up = sources
        elif targets and targets[0].endswith("experts.down_proj"):
            down = sources
    if gate_up is None and up is not None and len(up) == 1:
        gate_up = [None] + up
    if gate_up is None or down is None or len(gate_up) != 2 or len(down) != 1:
        return None
    found = [s if s is None else _EXPERT_SOURCE.match(s) for s in gate_up + down]
    named = [m for m in found if m is not None]
    if not all(found[1:]) or len({m.group("block") for m in named}) != 1:
        return None
    block = named[0].group("block") or ""
    disk_block = module_block = "model.layers.{i}." + block if block else None
    rest = []
    for source, target in renames:
        literal = re.fullmatch(r"\.(\w+)\.", source) and re.fullmatch(r"\.(\w+)\.", target)
        if module_block is None and literal:  # the block's renaming: .block_sparse_moe. -> .mlp.
            disk_block, module_block = "model.layers.{i}." + source.strip("."), "model.layers.{i}." + target.strip(".")
        else:
            rest.append((source if not literal else re.escape(source), target))
    if module_block is None:
        return None
    for source, target in rest:  # a prefix renaming (Nemotron-H's backbone. -> model.) names the disk block too
        if re.fullmatch(r"\^?\w+\.", source) and re.fullmatch(r"\w+\.", target) and disk_block.startswith(target):
            disk_block = source.lstrip("^") + disk_block[len(target):]
    return Adapter(model_type, disk_block, module_block, tuple(m and m.group("proj") for m in found), tuple(rest))


def fused_on_disk(model_type: str) -> Adapter | None:
    """An adapter for a model whose checkpoints keep the experts fused per layer under the in-memory names
    (GPT-OSS: model.layers.{i}.mlp.experts.gate_up_proj [E, H, 2I] and its biases): transformers' conversion
    mapping has no converter for its experts at all, so the file names are the module names. None when the
    mapping does convert its experts (those are per-expert on disk: from_conversion_mapping reads them)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    if any(type(e).__name__ != "WeightRenaming" for e in get_checkpoint_conversion_mapping(model_type) or []):
        return None
    # the per-expert names are the v5 ones: only read if a file of this model did store experts one by one
    return Adapter(model_type, "model.layers.{i}.mlp", "model.layers.{i}.mlp", ("gate_proj", "up_proj", "down_proj"))


def adapter_for(config) -> Adapter:
    model_type = getattr(config, "model_type", None)
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = (quantization.get("quant_method") if isinstance(quantization, dict)
                  else getattr(quantization, "quant_method", quantization))
        raise ValueError(f"this {model_type} checkpoint is quantized (quantization_config quant_method={method!r}, "
                         "e.g. GPT-OSS's MXFP4 experts), which offloaded inference does not read; dequantize it "
                         "first: load it with transformers (for MXFP4: quantization_config=Mxfp4Config("
                         "dequantize=True)), save_pretrained the bf16 model, and load that directory")
    adapter = ADAPTERS.get(model_type) or (from_conversion_mapping(model_type) if model_type else None)
    if adapter is None and model_type:
        adapter = fused_on_disk(model_type)
    if adapter is None:
        raise ValueError(f"model_type={model_type!r} is not supported for offloaded inference: "
                         "transformers' checkpoint conversion mapping converts its experts, but not from per-expert "
                         "gate/up/down (or up/down) names under model.layers.{i}; these have explicit entries: "
                         f"{sorted(ADAPTERS)}")
    return adapter


def router_of(block: nn.Module) -> nn.Module:
    """A sparse MoE block's router (its `gate`, or `router` as PhiMoE names it)."""
    return block.gate if hasattr(block, "gate") else block.router


def find_moe_blocks(model: nn.Module, adapter: Adapter) -> dict[int, nn.Module]:
    """layer index -> sparse MoE block, found by the in-memory name pattern and the v5 experts layout."""
    pattern = re.compile(re.escape(adapter.module_block).replace(r"\{i\}", r"(\d+)") + "$")
    blocks = {}
    for name, module in model.named_modules():
        m = pattern.match(name)
        experts = getattr(module, "experts", None)
        if m and experts is not None and is_experts_module(experts) and (hasattr(module, "gate")
                                                                         or hasattr(module, "router")):
            blocks[int(m.group(1))] = module
    if not blocks:
        raise ValueError(f"no sparse MoE blocks named like {adapter.module_block!r} with experts.gate_up_proj "
                         f"(or up_proj) were found in {type(model).__name__}; is this transformers >= 5?")
    return dict(sorted(blocks.items()))

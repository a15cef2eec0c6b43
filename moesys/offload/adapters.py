"""Per-architecture knowledge: which model types are supported and how their experts are named on disk.

The in-memory side is found generically (a sparse MoE block is a module with a `gate` router holding
`weight [E, H]` and an `experts` module holding `gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]`, the
transformers v5 layout); only the on-disk names differ. A new architecture is one entry in ADAPTERS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class Adapter:
    model_type: str
    # on-disk name of a sparse block, "{i}" = layer index; and the in-memory module name
    disk_block: str
    module_block: str
    # per-expert on-disk projection names: gate, up, down
    proj_names: tuple[str, str, str]

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
        if disk == mod:
            return disk_name
        pattern = re.escape(disk[0]) + r"(\d+)" + re.escape(disk[1]) + r"\."
        return re.sub(pattern, lambda m: f"{mod[0]}{m.group(1)}{mod[1]}.", disk_name)


_QWEN_LIKE = ("gate_proj", "up_proj", "down_proj")
ADAPTERS = {
    "mixtral": Adapter("mixtral", "model.layers.{i}.block_sparse_moe", "model.layers.{i}.mlp", ("w1", "w3", "w2")),
    "qwen2_moe": Adapter("qwen2_moe", "model.layers.{i}.mlp", "model.layers.{i}.mlp", _QWEN_LIKE),
    "qwen3_moe": Adapter("qwen3_moe", "model.layers.{i}.mlp", "model.layers.{i}.mlp", _QWEN_LIKE),
    "olmoe": Adapter("olmoe", "model.layers.{i}.mlp", "model.layers.{i}.mlp", _QWEN_LIKE),
}


def adapter_for(config) -> Adapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"model_type={model_type!r} is not supported for offloaded inference; supported: "
                         f"{sorted(ADAPTERS)} (a new architecture is one entry in moesys/offload/adapters.py)")
    return ADAPTERS[model_type]


def find_moe_blocks(model: nn.Module, adapter: Adapter) -> dict[int, nn.Module]:
    """layer index -> sparse MoE block, found by the in-memory name pattern and the v5 experts layout."""
    pattern = re.compile(re.escape(adapter.module_block).replace(r"\{i\}", r"(\d+)") + "$")
    blocks = {}
    for name, module in model.named_modules():
        m = pattern.match(name)
        experts = getattr(module, "experts", None)
        if m and experts is not None and hasattr(experts, "gate_up_proj") and hasattr(module, "gate"):
            blocks[int(m.group(1))] = module
    if not blocks:
        raise ValueError(f"no sparse MoE blocks named like {adapter.module_block!r} with experts.gate_up_proj "
                         f"were found in {type(model).__name__}; is this transformers >= 5?")
    return dict(sorted(blocks.items()))

"""Where `parallelize` finds routed experts besides `MoELayer`: any module whose `experts` child is a
moesys `Experts` (the MoE blocks of a transformers model loaded with `model.hf_model`, whose routing,
shared experts and the rest stay transformers' code).

Such a block calls `self.experts(x_TH, topk_ids_TK, topk_weights_TK)`, the signature of
`Experts`, `ExpertParallelExperts` and `FSSDPExperts` alike, so expert parallelism and FSSDP replace
that one child and leave the block alone. Its routing is dropless (transformers has no capacity
factor), so no assignment carries a zero weight to skip.
"""

from __future__ import annotations

import torch.nn as nn

from moesys.layers.experts import Experts
from moesys.layers.moe import MoELayer
from moesys.parallel.ep import ExpertParallelExperts
from moesys.parallel.mesh import EPMesh, check_ep

__all__ = ["experts_holders", "moe_sites", "drops_zero_weight", "shard_holder_experts"]


def experts_holders(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module other than a `MoELayer` whose `experts` is a single-device `Experts`."""
    return [(name, m) for name, m in model.named_modules()
            if not isinstance(m, MoELayer) and isinstance(getattr(m, "experts", None), Experts)]


def moe_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module holding routed experts in `.experts` (MoELayers and experts holders), in model order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, MoELayer) or (isinstance(getattr(m, "experts", None), Experts))]


def drops_zero_weight(site: nn.Module) -> bool:
    """Whether the site's router zeroes the weight of dropped assignments (capacity mode)."""
    return getattr(getattr(site, "router", None), "capacity_factor", None) is not None


def shard_holder_experts(model: nn.Module, mesh: EPMesh, *, overlap: bool) -> None:
    """Replace the `Experts` of every experts holder by its `ExpertParallelExperts` (this rank's E/ep)."""
    holders = experts_holders(model)
    for _, holder in holders:
        check_ep(mesh.ep, mesh.world_size, holder.experts.num_experts)
    for name, holder in holders:
        holder.experts = ExpertParallelExperts(holder.experts, mesh, layer_name=name, overlap=overlap,
                                               drop_zero_weight=drops_zero_weight(holder))

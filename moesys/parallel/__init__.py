"""moesys.parallel: apply parallelism to a model built by single-device code.

    handle = parallelize(model, config)          # after init_process_group (or alone: world size 1)
    loss.backward(); handle.reduce_gradients(); handle.clip_grad_norm_(1.0); optimizer.step()

`parallelize` lays the ranks out as a (dp, ep) mesh (`moesys.parallel.mesh`) and, when
`parallel.ep > 1`, swaps every `MoELayer` for an `ExpertParallelMoELayer` holding only its
E / ep local experts (global ids ep_rank * E/ep ...), and the `Experts` of any other MoE block (a
transformers model's, `moesys.parallel.hf_experts`) for `ExpertParallelExperts`. Dense parameters stay replicated (data
parallel over all ranks); expert gradients reduce only over the replicas of the same experts.
Every rank must have built the same model (same seed) before calling it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moesys.layers.moe import MoELayer
from moesys.parallel.comm import CollectiveError
from moesys.parallel.ep import ExpertParallelExperts, ExpertParallelMoELayer
from moesys.parallel.fssdp_runtime import FSSDPHandle, fssdp_parallelize
from moesys.parallel.handle import ParallelHandle
from moesys.parallel.handle_api import PlacementHandle
from moesys.parallel.hf_experts import shard_holder_experts
from moesys.parallel.mesh import EPMesh, build_mesh, check_ep, mesh_from_device_mesh

__all__ = ["parallelize", "PlacementHandle", "ParallelHandle", "FSSDPHandle", "fssdp_parallelize", "EPMesh", "build_mesh", "CollectiveError",
           "ExpertParallelExperts", "ExpertParallelMoELayer"]


def _parallel_section(config):
    """Accept the whole Config or its `parallel` section."""
    return getattr(config, "parallel", config)


def parallelize(model: nn.Module, config, mesh=None) -> PlacementHandle:
    """Make `model` expert parallel in place according to `config.parallel`; returns the handle
    (a `ParallelHandle` or an `FSSDPHandle`, both `PlacementHandle`s: moesys.parallel.handle_api).

    Args:
        model: a built model containing `MoELayer`s (e.g. `MoETransformer`), identical on every rank.
        config: a `moesys.config.Config` (or its `ParallelConfig`): `ep`, `expert_sharding`,
            `ep_overlap`, `timeout_s`.
        mesh: None (build it from the default process group), an `EPMesh`, or a torch `DeviceMesh`
            with dims ("dp", "ep").
    """
    p = _parallel_section(config)
    sharding = getattr(p, "expert_sharding", "ep")
    if sharding in ("fssdp", "fsdp"):
        if p.ep != 1:
            raise ValueError(f"parallelize: parallel.expert_sharding={sharding!r} shards experts over all ranks; "
                             f"leave parallel.ep at 1 (got {p.ep})")
        f = p.fssdp
        return fssdp_parallelize(model, policy=sharding, rematerialize=f.rematerialize,
                                 reshard_every=f.reshard_every, window=f.window, gather_budget=f.gather_budget,
                                 memory_cap=f.memory_cap, bandwidth_gbs=f.bandwidth_gbs, prefetch=f.prefetch,
                                 timeout_s=getattr(p, "timeout_s", 600.0))
    if sharding != "ep":
        raise ValueError(f"parallelize: parallel.expert_sharding={sharding!r}; use 'ep', 'fssdp' or 'fsdp'")
    timeout_s = getattr(p, "timeout_s", None)
    if mesh is None:
        device = next(model.parameters(), torch.empty(0)).device
        mesh = build_mesh(p.ep, device_type=device.type, timeout_s=timeout_s)
    elif not isinstance(mesh, EPMesh):
        mesh = mesh_from_device_mesh(mesh, timeout_s=timeout_s)
    if mesh.ep != p.ep:
        raise ValueError(f"parallelize: parallel.ep={p.ep} but the mesh has ep={mesh.ep}")
    if mesh.ep > 1:
        overlap = getattr(p, "ep_overlap", True)
        layers = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, MoELayer) and not isinstance(m, ExpertParallelMoELayer)]
        for name, layer in layers:
            if not name:
                raise ValueError("parallelize: pass a model that contains MoELayers, not a bare MoELayer "
                                 "(it is replaced inside its parent); wrap it in a module")
            check_ep(mesh.ep, mesh.world_size, layer.experts.num_experts)
        for name, layer in layers:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, ExpertParallelMoELayer(layer, mesh, layer_name=name, overlap=overlap))
        shard_holder_experts(model, mesh, overlap=overlap)  # experts inside other MoE blocks (hf_model)
    return ParallelHandle(model, mesh)

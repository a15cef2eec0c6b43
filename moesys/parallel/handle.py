"""What `parallelize` returns: the mesh plus the gradient reduction and clipping that EP needs.

Gradient math. Each rank's loss is the mean over its own micro-batch (equal sizes on all ranks); the
global loss is the mean of those over the world. Then
- a dense parameter's gradient is the world mean of the per-rank gradients (all-reduce over all ranks);
- an expert's gradient on its holder already sums the contributions of every source rank of its ep
  group (they came back through the reverse all-to-all), so the holders of the same experts (the
  expert-dp group) sum theirs and everybody divides by the world size, not by dp.
Missing gradients count as zeros so that every rank issues the same collectives with the same sizes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from moesys.parallel.comm import CommContext, guarded
from moesys.parallel.data_parallel import unflatten_into_grads
from moesys.parallel.ep import ExpertParallelExperts
from moesys.parallel.mesh import EPMesh

__all__ = ["ParallelHandle"]

_BUCKET_BYTES = 64 << 20


class ParallelHandle:
    """Returned by `moesys.parallel.parallelize`; call `reduce_gradients()` after backward."""

    def __init__(self, model: nn.Module, mesh: EPMesh):
        self.model, self.mesh = model, mesh
        expert_ids = set()
        for m in model.modules():
            if isinstance(m, ExpertParallelExperts):
                expert_ids.update(id(p) for p in m.parameters())
        params = [p for p in model.parameters() if p.requires_grad]
        self._expert = [p for p in params if id(p) in expert_ids]
        self._dense = [p for p in params if id(p) not in expert_ids]

    def expert_parameters(self) -> list[nn.Parameter]:
        """Parameters sharded by ep (different on each ep rank; replicated over the expert-dp group)."""
        return list(self._expert)

    def dense_parameters(self) -> list[nn.Parameter]:
        """Parameters replicated on every rank (data parallel over the whole world)."""
        return list(self._dense)

    def ep_experts(self) -> dict[str, ExpertParallelExperts]:
        """Module name -> EP experts module (its `global_expert_ids` map local index -> global id)."""
        return {n: m for n, m in self.model.named_modules() if isinstance(m, ExpertParallelExperts)}

    @property
    def expert_offset(self) -> int:
        """Global id of this rank's first local expert (the same in every MoE layer)."""
        return self.mesh.ep_rank * next((m.num_local_experts for m in self.ep_experts().values()), 0)

    @property
    def shards_experts(self) -> bool:
        """Whether ranks hold different experts (then expert gradients need `reduce_expert_gradients`)."""
        return self.mesh.ep > 1

    def begin_step(self) -> None:
        """Nothing to plan for EP (FSSDP's handle plans materialisation here)."""

    def end_step(self, optimizer=None) -> bool:
        """Nothing to observe for EP (FSSDP's handle re-shards here); returns whether anything moved."""
        return False

    def local_expert_ids(self, name: str) -> list[int] | None:
        """Global ids of this rank's experts for parameter `name` (None: not an expert tensor)."""
        module_name = name.rpartition(".")[0]
        module = self.ep_experts().get(module_name)
        return None if module is None else list(module.global_expert_ids)

    def expert_parameter_names(self) -> set[str]:
        ids = {id(p) for p in self._expert}
        return {n for n, p in self.model.named_parameters() if id(p) in ids}

    @torch.no_grad()
    def gather_expert_state(self, state: dict[str, torch.Tensor],
                            param_name=lambda key: key) -> dict[str, torch.Tensor]:
        """Replace each EP expert tensor [E_local, ...] in `state` (a state dict, or optimizer state
        keyed so that `param_name(key)` is the parameter name) by the full [E, ...] tensor, all-gathered
        over the ep group in global-id order. A collective: every rank calls it with the same keys."""
        names = self.expert_parameter_names()
        out = dict(state)
        if self.mesh.ep == 1:
            return out
        ctx = CommContext(self.mesh.ep_group, rank=self.mesh.rank, group_size=self.mesh.ep,
                          layer="(checkpoint)", timeout=self.mesh.timeout)
        for key in sorted(k for k, v in state.items() if param_name(k) in names and v.dim() > 0):
            t = state[key].detach().contiguous()
            parts = [torch.empty_like(t) for _ in range(self.mesh.ep)]
            with guarded(ctx, f"all-gather of {key}"):
                dist.all_gather(parts, t, group=self.mesh.ep_group)
            out[key] = torch.cat(parts)
        return out

    def local_expert_state(self, state: dict[str, torch.Tensor], param_name=lambda key: key) -> dict[str, torch.Tensor]:
        """The inverse of `gather_expert_state`, without communication: slice this rank's experts."""
        names = self.expert_parameter_names()
        out = dict(state)
        if self.mesh.ep == 1:
            return out
        for key, v in state.items():
            if param_name(key) in names and v.dim() > 0:
                local = v.shape[0] // self.mesh.ep
                out[key] = v[self.mesh.ep_rank * local:(self.mesh.ep_rank + 1) * local]
        return out

    @torch.no_grad()
    def reduce_gradients(self, dense: bool = True) -> None:
        """Average gradients as if one process had trained on the global batch (module docstring).
        `dense=False` leaves dense gradients to another data-parallel implementation."""
        if not self.mesh.distributed:
            return
        if dense:
            self._sum_then_divide(self._dense, None, self.mesh.world_size, "dense gradient all-reduce")
        self.reduce_expert_gradients()

    @torch.no_grad()
    def reduce_expert_gradients(self) -> None:
        """Sum expert gradients over the expert-dp group, divide by the world size (module docstring)."""
        if not self.mesh.distributed:
            return
        self._sum_then_divide(self._expert, self.mesh.expert_dp_group, self.mesh.dp, "expert gradient all-reduce")

    def _sum_then_divide(self, params, group, group_size: int, what: str) -> None:
        """All-reduce (sum) over `group` when it has more than one rank, then divide by the world size."""
        world = self.mesh.world_size
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        ctx = CommContext(group, rank=self.mesh.rank, group_size=group_size, layer="(all layers)",
                          timeout=self.mesh.timeout)
        for bucket in _buckets(params):
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            if group_size > 1:
                with guarded(ctx, what):
                    work = dist.all_reduce(flat, group=group, async_op=True)
                    if flat.is_cuda:  # a host-side timeout would add a synchronisation per bucket
                        work.wait()
                    else:
                        work.wait(self.mesh.timeout)
            flat.div_(world)
            unflatten_into_grads(flat, bucket)

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradients of the whole (unsharded) model; call after reduce_gradients."""
        dense_sq = sum((p.grad.float().pow(2).sum() for p in self._dense if p.grad is not None),
                       torch.zeros((), dtype=torch.float32, device=_device(self.model)))
        expert_sq = sum((p.grad.float().pow(2).sum() for p in self._expert if p.grad is not None),
                        torch.zeros((), dtype=torch.float32, device=dense_sq.device))
        if self.mesh.distributed and self.mesh.ep > 1:
            # Each ep rank holds different experts: sum their squares over the ep group.
            ctx = CommContext(self.mesh.ep_group, rank=self.mesh.rank, group_size=self.mesh.ep,
                              layer="(all layers)", timeout=self.mesh.timeout)
            with guarded(ctx, "gradient-norm all-reduce"):
                dist.all_reduce(expert_sq, group=self.mesh.ep_group)
        return (dense_sq + expert_sq).sqrt()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` with the norm of the whole model; returns the norm."""
        return clip_to_norm(self._dense + self._expert, self.grad_norm(), max_norm)


@torch.no_grad()
def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of `grads` taken as one vector, in fp32 whatever their dtype. torch's get_total_norm
    returns bf16 gradients' norm in bf16 (about 3 significant digits), which the clip factor and the
    logged grad_norm would inherit; fp32 gradients still go through it (the same bits as always)."""
    if all(g.dtype == torch.float32 for g in grads):
        return torch.nn.utils.get_total_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)), 2.0)


@torch.no_grad()
def clip_to_norm(params, norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale the gradients of `params` so that a global gradient norm `norm` becomes at most
    `max_norm` (as clip_grad_norm_ does, with the norm computed over sharded parameters); returns it."""
    # On the device, no sync: the factor is min(1, max_norm / (norm + 1e-6)); a NaN norm leaves the
    # gradients alone (the trainer stops on it), an infinite one zeroes them, as clip_grad_norm_ does.
    scale = (max_norm / (norm.float() + 1e-6)).clamp(max=1.0)
    scale = torch.where(torch.isnan(scale), torch.ones_like(scale), scale)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, scale)
    return norm


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _buckets(params):
    """Consecutive parameters of one dtype and device, up to _BUCKET_BYTES each (same on every rank)."""
    bucket, size, key = [], 0, None
    for p in params:
        k = (p.dtype, p.device)
        if bucket and (k != key or size + p.numel() * p.element_size() > _BUCKET_BYTES):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel() * p.element_size()
        key = k
    if bucket:
        yield bucket

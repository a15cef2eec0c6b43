"""Data parallelism for the dense parameters: one bucketed all-reduce of the gradients per optimizer step.

Why our own all-reduce rather than DDP or FSDP2:
- expert parallelism (moesys.parallel.ep) reduces expert gradients over a different group than the
  dense ones; `sync_gradients(params, group)` takes the parameter list and the group explicitly, so
  `parallelize()` can hand the trainer one (params, group) pair per reduction;
- it runs once per optimizer step after all micro-batches, so gradient accumulation adds no traffic
  (DDP would need no_sync bookkeeping), and the summation order is fixed, which keeps runs reproducible;
- dense parameters of an MoE model are a small share of the bytes, so overlapping the reduction with
  the backward (DDP's advantage) matters little, and replicating them (unlike FSDP2's sharding)
  costs little memory.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist

from moesys.parallel.comm import CommContext, guarded, wait_work

DEFAULT_BUCKET_BYTES = 32 * 1024 * 1024


def _buckets(params: list[torch.nn.Parameter], bucket_bytes: int):
    """Group parameters by (device, dtype) into buckets of at most bucket_bytes (one tensor may exceed it)."""
    current: dict[tuple, list] = {}
    sizes: dict[tuple, int] = {}
    for p in params:
        key = (p.device, p.dtype)
        bucket = current.setdefault(key, [])
        nbytes = p.numel() * p.element_size()
        if bucket and sizes.get(key, 0) + nbytes > bucket_bytes:
            yield bucket
            bucket = current[key] = []
            sizes[key] = 0
        bucket.append(p)
        sizes[key] = sizes.get(key, 0) + nbytes
    yield from (b for b in current.values() if b)


def _comm(group, timeout) -> CommContext:
    return CommContext(group, rank=dist.get_rank(), group_size=dist.get_world_size(group), layer=None,
                       timeout=timeout)


def _all_reduce(t: torch.Tensor, ctx: CommContext, what: str) -> None:
    """A sum all-reduce that fails with CollectiveError (naming `what`) after ctx.timeout instead of
    hanging; on CUDA the host does not wait (NCCL's watchdog and the group's timeout apply)."""
    with guarded(ctx, what):
        work = dist.all_reduce(t, group=ctx.group, async_op=True)
    wait_work(work, ctx, what, host_sync=not t.is_cuda)


@torch.no_grad()
def sync_gradients(params: Iterable[torch.nn.Parameter], group=None, *, average: bool = True,
                   bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout: timedelta | None = None) -> None:
    """All-reduce the gradients of `params` over `group` (default: the world), averaging by default.

    Every rank must pass the same parameters in the same order. A parameter without a gradient on
    this rank (say, an expert no token reached) reduces as zeros, so collectives stay aligned.
    A dead or stuck peer raises CollectiveError (after `timeout`, default the group's own)."""
    if not dist.is_initialized():
        return
    world = dist.get_world_size(group)
    if world == 1:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    ctx = _comm(group, timeout)
    for bucket in _buckets(params, bucket_bytes):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        _all_reduce(flat, ctx, "data-parallel gradient all-reduce")
        if average:
            flat.div_(world)
        unflatten_into_grads(flat, bucket)


def unflatten_into_grads(flat: torch.Tensor, params) -> None:
    """Copy consecutive slices of a flat reduced buffer back into each parameter's .grad."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def all_reduce_sum(t: torch.Tensor, group=None, *, what: str = "all-reduce",
                   timeout: timedelta | None = None) -> torch.Tensor:
    """Sum a tensor over ranks in place (a no-op without a process group) and return it; a dead or
    stuck peer raises CollectiveError naming `what`."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        _all_reduce(t, _comm(group, timeout), what)
    return t

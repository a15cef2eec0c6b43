"""The expert-parallel mesh: the default process group's ranks laid out as a 2-D (dp, ep) grid.

rank = dp_rank * ep + ep_rank, so the ranks of one expert-parallel group are consecutive (on GPU
machines the all-to-all then stays inside a node whenever ep <= GPUs per node). Two kinds of
sub-groups come out of it:

- the **ep group** of a rank: the `ep` ranks with the same dp_rank; together they hold all experts
  and exchange tokens by all-to-all;
- the **expert-dp group**: the `dp` ranks with the same ep_rank, i.e. the replicas of the same
  experts; expert gradients are reduced only over it (dense gradients over the whole world).

Only the default process group is used to build it, so a job launched by torchrun, mpirun or alone
(world size 1) gets the same mesh. Sub-groups are created with an explicit timeout because
`new_group` otherwise falls back to 30 minutes, whatever the default group was given.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["EPMesh", "build_mesh", "mesh_from_device_mesh"]

DEFAULT_TIMEOUT_S = 600.0


@dataclass
class EPMesh:
    """Where this rank sits in the (dp, ep) grid and the process groups that go with it.

    Groups are None when dist is not initialised (one process); `ep_group`/`expert_dp_group`
    collectives are skipped by callers when the group's size is 1."""
    world_size: int
    rank: int
    ep: int
    ep_rank: int
    dp_rank: int
    ep_group: dist.ProcessGroup | None
    expert_dp_group: dist.ProcessGroup | None
    timeout: timedelta
    device_mesh: object | None = None      # torch DeviceMesh with dims ("dp", "ep") when available

    @property
    def dp(self) -> int:
        return self.world_size // self.ep

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def ep_ranks(self) -> list[int]:
        """Global ranks of this rank's ep group, ordered by ep_rank (moesys.integrations.deepspeed checks that
        DeepSpeed's expert-parallel group is this one)."""
        return [self.dp_rank * self.ep + i for i in range(self.ep)]

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} (dp_rank {self.dp_rank}/{self.dp}, "
                f"ep_rank {self.ep_rank}/{self.ep})")


def check_ep(ep: int, world_size: int, num_experts: int | None = None) -> None:
    """ValueError naming the bad value when `ep` cannot split the world or the experts."""
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise ValueError(f"parallel.ep={ep!r} must be a positive integer")
    if world_size % ep:
        raise ValueError(f"parallel.ep={ep} does not divide the world size {world_size}; "
                         f"use one of {[d for d in range(1, world_size + 1) if world_size % d == 0]}")
    if num_experts is not None and num_experts % ep:
        fits = [d for d in range(1, num_experts + 1) if num_experts % d == 0 and world_size % d == 0]
        raise ValueError(f"parallel.ep={ep} does not divide moe.num_experts={num_experts}; use one of {fits}")


def build_mesh(ep: int, *, device_type: str = "cpu", timeout_s: float | None = None) -> EPMesh:
    """Build the (dp, ep) mesh over the default process group (or a trivial one without dist).

    Every rank must call this, in the same order relative to other group creations: `new_group` is
    itself a collective over the default group."""
    timeout = timedelta(seconds=DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
    if not (dist.is_available() and dist.is_initialized()):
        check_ep(ep, 1)
        return EPMesh(1, 0, 1, 0, 0, None, None, timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    check_ep(ep, world)
    dp = world // ep
    ep_group = expert_dp_group = None
    # Every rank creates every group, in one fixed order: new_group needs all ranks to take part.
    for d in range(dp):
        g = dist.new_group([d * ep + i for i in range(ep)], timeout=timeout)
        if rank // ep == d:
            ep_group = g
    for e in range(ep):
        g = dist.new_group([d * ep + e for d in range(dp)], timeout=timeout)
        if rank % ep == e:
            expert_dp_group = g
    mesh = EPMesh(world, rank, ep, rank % ep, rank // ep, ep_group, expert_dp_group, timeout)
    mesh.device_mesh = _device_mesh(mesh, device_type)
    return mesh


def _device_mesh(mesh: EPMesh, device_type: str):
    """A torch DeviceMesh over the same groups, for code (FSDP, DTensor) that wants one."""
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:
        return None
    grid = torch.arange(mesh.world_size, dtype=torch.int).view(mesh.dp, mesh.ep)
    return DeviceMesh.from_group([mesh.expert_dp_group, mesh.ep_group], device_type, mesh=grid,
                                 mesh_dim_names=("dp", "ep"))


def mesh_from_device_mesh(device_mesh, *, timeout_s: float | None = None) -> EPMesh:
    """Wrap a torch DeviceMesh with dims named ("dp", "ep") (rank = dp_rank * ep + ep_rank)."""
    names = tuple(device_mesh.mesh_dim_names or ())
    if names != ("dp", "ep"):
        raise ValueError(f"parallelize: the DeviceMesh must have dims named ('dp', 'ep'), got {names}")
    dp, ep = device_mesh.mesh.shape
    world, rank = dist.get_world_size(), dist.get_rank()
    if dp * ep != world:
        raise ValueError(f"parallelize: the DeviceMesh has {dp}x{ep} ranks but the world size is {world}")
    timeout = timedelta(seconds=DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
    return EPMesh(world, rank, ep, device_mesh.get_local_rank("ep"), device_mesh.get_local_rank("dp"),
                  device_mesh.get_group("ep"), device_mesh.get_group("dp"), timeout, device_mesh)

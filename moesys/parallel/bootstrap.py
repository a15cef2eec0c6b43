"""Process-group bootstrap: who am I (rank, world size, local rank), which device, and the default
process group, from torchrun's environment, from MPI (mpi4py, under mpirun/srun), or alone.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Under mpirun none of these
exist: mpi4py gives the rank and size, a node-local communicator gives the local rank, and rank 0
broadcasts its host name and a free port as the rendezvous address (unless MASTER_ADDR/MASTER_PORT are
already set). One process without any launcher runs with world size 1 and no process group.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from moesys.config import Config
from moesys.parallel.comm import CommContext, guarded
from moesys.parallel.peers import PeerMonitor

# Environment variables by which MPI launchers announce themselves (Open MPI, MPICH/Hydra, PMIx/Slurm).
_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


@dataclass
class DistContext:
    """What the trainer needs to know about the processes; `group` None means the default group."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    launcher: str = "single"                 # "torchrun" | "mpi" | "single"
    group: object = None
    timeout: timedelta | None = None         # every collective's timeout (parallel.timeout_s)
    peers: PeerMonitor | None = None         # the ranks' heartbeats, to name the ones a failure waited for

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()


def detect_launcher(env=os.environ) -> str:
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if any(k in env for k in _MPI_ENV):
        return "mpi"
    return "single"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_rendezvous() -> tuple[int, int, int, str, str]:
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError("this process was started by an MPI launcher but mpi4py is not installed; "
                           "pip install 'moesys[mpi]' or launch with torchrun") from None
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr is None or port is None:
        mine = (socket.gethostname(), str(_free_port())) if rank == 0 else None
        addr, port = comm.bcast(mine, root=0)
    return rank, size, local_rank, addr, port


def pick_device(config: Config, local_rank: int) -> torch.device:
    want = config.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but CUDA is not available here; use train.device=cpu or auto")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def init_distributed(config: Config) -> DistContext:
    """Create the default process group (NCCL on GPUs, gloo on CPUs) when there is more than one
    process, set the CUDA device, and return the context. Call after the config and data are checked.
    The group's timeout is `parallel.timeout_s`, so plain data parallelism fails on a stuck rank as
    expert parallelism does (torch's default would wait 30 minutes)."""
    timeout = timedelta(seconds=config.parallel.timeout_s)
    launcher = detect_launcher()
    if launcher == "torchrun":
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        init_method = "env://"
    elif launcher == "mpi":
        rank, size, local_rank, addr, port = _mpi_rendezvous()
        init_method = f"tcp://{addr}:{port}"
    else:
        rank, size, local_rank, init_method = 0, 1, 0, None
    device = pick_device(config, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                                timeout=timeout, **kwargs)
    peers = None
    if size > 1:
        peers = PeerMonitor(dist.distributed_c10d._get_default_store(), rank, size).start()
    return DistContext(rank, size, local_rank, device, launcher, timeout=timeout, peers=peers)


def _comm(ctx: DistContext) -> CommContext:
    return CommContext(ctx.group, rank=ctx.rank, group_size=ctx.world_size, layer=None, timeout=ctx.timeout)


def barrier(ctx: DistContext, what: str = "barrier") -> None:
    """Wait for every rank. A dead or stuck peer raises CollectiveError (as every other collective of
    the trainer does), so the trainer reports it in one line and skips the teardown barrier."""
    if ctx.distributed:
        with guarded(_comm(ctx), what):
            dist.barrier(group=ctx.group)


def max_over_ranks(ctx: DistContext, value: float) -> float:
    """The largest `value` over ranks (a collective: every rank calls it; also a barrier)."""
    if not ctx.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=ctx.device)
    with guarded(_comm(ctx), "max all-reduce"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.group)
    return t.item()


def teardown(ctx: DistContext) -> None:
    """Destroy the process group; the barrier first avoids gloo aborts at exit (docs/ARCHITECTURE.md, traps)."""
    if ctx.peers is not None:
        ctx.peers.stop()
    if ctx.distributed:
        dist.barrier()
        dist.destroy_process_group()


def exit_skipping_shutdown(code: int) -> None:
    """Leave the process now, after everything is written and the process group destroyed: gloo's
    transport threads occasionally abort during interpreter shutdown ("terminate called without an
    active exception", seen in about 1 of 4 two-rank CPU runs), which would fail a finished job."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

"""Multi-process helpers for CPU tests and benchmarks: spawn N gloo processes on a free port, or run
under torchrun (one process per GPU on NCCL).

Not imported by the library itself; tests (tests/test_ep*.py) and bench/ep_bench.py use it.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from moesys.parallel.bootstrap import exit_skipping_shutdown


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, timeout_s):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, world, *args)
        dist.barrier()  # gloo teardown trap (docs/ARCHITECTURE.md, traps)
    finally:
        dist.destroy_process_group()
    exit_skipping_shutdown(0)  # the worker passed and its group is gone


def spawn(fn, world: int, *args, timeout_s: float = 60.0) -> None:
    """Run fn(rank, world, *args) in `world` gloo processes; re-raises a worker's exception."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_entry, args=(world, free_port(), fn, args, timeout_s), nprocs=world, join=True)


class Holder(nn.Module):
    """parallelize() replaces MoELayers inside a parent; this is the smallest parent."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.moe = layer


def run_workers(worker, args, script: str) -> None:
    """Run worker(rank, world, args): under torchrun in this process (NCCL on `--device cuda`, with
    NVLink multicast off as the GPU machines require), otherwise as `args.nproc` spawned gloo processes."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        kwargs = {}
        if args.device == "cuda":
            kwargs["device_id"] = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(kwargs["device_id"])
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=600), **kwargs)
        try:
            worker(rank, world, args)
            dist.barrier()
        finally:
            dist.destroy_process_group()
    else:
        if args.device == "cuda":
            raise SystemExit(f"{script}: --device cuda runs under torchrun (one process per GPU)")
        spawn(worker, args.nproc, args, timeout_s=600)

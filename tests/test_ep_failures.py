"""A stuck or dead peer makes the expert-parallel layer (and FSSDP's expert gather) raise CollectiveError
naming the rank and the layer (2 gloo processes, short timeouts) instead of hanging."""

from __future__ import annotations

import datetime
import functools
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moesys.config import ParallelConfig
from moesys.layers.moe import MoELayer
from moesys.parallel import CollectiveError, bootstrap, parallelize
from moesys.parallel.fssdp import start_gather
from moesys.parallel.fssdp_runtime import fssdp_parallelize
from moesys.parallel.testing import Holder, free_port


def _worker(rank, world, port, mode, out_dir):
    torch.set_num_threads(1)
    # "stuck gradients", "stuck fssdp gather": the default group would wait 60 s, so only the handle's
    # own 2 s (parallel.timeout_s) can end the wait in time; otherwise the group's timeout is 2 s as well.
    group_timeout = 60 if mode in ("stuck gradients", "stuck fssdp gather") else 2
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=group_timeout))
    torch.manual_seed(0)
    model = Holder(MoELayer(8, 4, 2, 8, backend="grouped_mm"))
    if mode == "stuck fssdp gather":
        handle = fssdp_parallelize(model, policy="fsdp", timeout_s=2.0)  # every expert gathered everywhere
    else:
        handle = parallelize(model, ParallelConfig(ep=2, timeout_s=2.0))
    if rank == 1:
        # The peer never joins rank 0's collectives: stuck (sleeps past the timeout) or dead (exits).
        if not mode.startswith("dead"):
            time.sleep(6)
        os._exit(0)
    if mode == "stuck gradients":  # the gradient all-reduce after backward, not the layer's all-to-alls
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        call = handle.reduce_gradients
    elif mode == "stuck fssdp gather":  # the point-to-point receives of rank 1's experts
        handle.begin_step()
        ex = model.moe.experts
        owned = [getattr(ex, n) for n in ex.weight_names()]
        call = lambda: start_gather(ex, ex.plan, torch.float32, owned).wait(ex.comm)
    elif mode.endswith("barrier"):  # the trainer's own barriers (save_checkpoint waits in them)
        ctx = bootstrap.DistContext(rank=0, world_size=2, timeout=datetime.timedelta(seconds=2))
        call = functools.partial(bootstrap.barrier, ctx, "checkpoint barrier")
    else:
        call = functools.partial(model.moe, torch.randn(5, 8))
    message = "no error"
    start = time.perf_counter()
    try:
        call()
    except CollectiveError as e:
        message = str(e)
    with open(os.path.join(out_dir, "message.txt"), "w") as f:
        f.write(f"{time.perf_counter() - start:.1f}\n{message}")
    os._exit(0)  # no teardown: the peer is gone or stuck


def _run(mode, tmp_path):
    mp.spawn(_worker, args=(2, free_port(), mode, str(tmp_path)), nprocs=2, join=True)
    seconds, message = (tmp_path / "message.txt").read_text().split("\n", 1)
    return float(seconds), message


# (mode, what rank 0's CollectiveError starts with, the most seconds it may take). "stuck gradients" and "stuck
# fssdp gather": the default group waits 60 s, so only the handle's / executor's own timeout_s (2 s) can end
# the wait this soon. The barriers: a rank lost while rank 0 waits in a checkpoint barrier ends in the
# trainer's one-line report with no teardown barrier, not gloo's bare RuntimeError (a CI run's traceback).
CASES = [
    ("stuck", "rank 0: token-count all-to-all in layer 'moe' failed (timeout 2s)", 7),
    ("dead", "rank 0: token-count all-to-all in layer 'moe' failed", 7),
    ("stuck gradients", "rank 0: dense gradient all-reduce in layer '(all layers)' failed (timeout 2s)", 5),
    ("stuck fssdp gather", "rank 0: SparseAllGather in layer 'moe' failed (timeout 2s)", 5),
    ("dead barrier", "rank 0: checkpoint barrier failed", 7),
    ("stuck barrier", "rank 0: checkpoint barrier failed", 7),
]


@pytest.mark.slow
@pytest.mark.parametrize("mode,prefix,max_seconds", CASES, ids=[c[0].replace(" ", "-") for c in CASES])
def test_lost_peer_raises_collective_error_naming_where_rank_0_waited(tmp_path, mode, prefix, max_seconds):
    seconds, message = _run(mode, tmp_path)
    assert message.startswith(prefix), message
    assert seconds < max_seconds, f"the error took {seconds}s for a 2s timeout"

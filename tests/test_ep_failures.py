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


@pytest.mark.slow
def test_stuck_peer_raises_with_rank_and_layer(tmp_path):
    seconds, message = _run("stuck", tmp_path)
    assert message.startswith("rank 0: token-count all-to-all in layer 'moe' failed (timeout 2s)"), message
    assert seconds < 7, f"the error took {seconds}s for a 2s timeout"


@pytest.mark.slow
def test_dead_peer_raises_with_rank_and_layer(tmp_path):
    seconds, message = _run("dead", tmp_path)
    assert message.startswith("rank 0: token-count all-to-all in layer 'moe' failed"), message
    assert seconds < 7, f"the error took {seconds}s for a 2s timeout"


@pytest.mark.slow
def test_stuck_peer_in_the_gradient_all_reduce_raises_after_the_handles_timeout(tmp_path):
    """On gloo the gradient all-reduce waits parallel.timeout_s (2 s), not the default group's 60 s
    (nor until the stuck peer gives up)."""
    seconds, message = _run("stuck gradients", tmp_path)
    assert message.startswith("rank 0: dense gradient all-reduce in layer '(all layers)' failed (timeout 2s)"), message
    assert seconds < 5, f"the error took {seconds}s for a 2s timeout"


@pytest.mark.slow
def test_stuck_peer_in_the_fssdp_gather_raises_after_the_executors_timeout(tmp_path):
    """FSSDP's SparseAllGather waits its executor's timeout (timeout_s, 2 s), not the default group's 60 s."""
    seconds, message = _run("stuck fssdp gather", tmp_path)
    assert message.startswith("rank 0: SparseAllGather in layer 'moe' failed (timeout 2s)"), message
    assert seconds < 5, f"the error took {seconds}s for a 2s timeout"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dead barrier", "stuck barrier"])
def test_peer_lost_in_the_trainers_barrier_raises_collective_error(tmp_path, mode):
    """A rank killed while rank 0 waits in a checkpoint barrier: CollectiveError (the trainer's one-line
    report, no teardown barrier), not gloo's bare RuntimeError (a CI run ended in a traceback)."""
    seconds, message = _run(mode, tmp_path)
    assert message.startswith("rank 0: checkpoint barrier failed"), message
    assert seconds < 7, f"the error took {seconds}s for a 2s timeout"

"""The training job under a stopped or killed rank (2 gloo processes started with torchrun's
environment, no agent in between): plain data parallelism (ep=1) fails after parallel.timeout_s
naming the operation and the rank that did not arrive, a killed peer is called a reset and named,
and SIGTERM during a hang ends the survivor within seconds; expert parallelism names the dead rank."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from moesys.parallel.testing import free_port
from tests._train_helpers import REPO, TINY, env, sets

pytestmark = pytest.mark.slow


def _launch(run_dir, *items, resume=False):
    """Two ranks of the training job with torchrun's environment (no agent that would stop rank 0)."""
    port = free_port()
    procs = []
    for rank in range(2):
        e = env()
        e.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port))
        cmd = [sys.executable, "-m", "moesys.train", "--config", TINY, "--run-dir", str(run_dir),
               *sets(*items)] + (["--resume"] if resume else [])
        procs.append(subprocess.Popen(cmd, env=e, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _wait_for(procs, ready, timeout=120):
    deadline = time.time() + timeout
    while not ready():
        assert all(p.poll() is None for p in procs) and time.time() < deadline, \
            [p.communicate() for p in procs]
        time.sleep(0.05)


def _start(run_dir, *items):
    procs = _launch(run_dir, "train.steps=100000", "log.every=1", "log.val_every=0", "data.batch_size=2", *items)
    metrics = run_dir / "metrics.jsonl"
    _wait_for(procs, lambda: metrics.is_file() and metrics.read_text().count("\n") >= 2)
    return procs


def _finish(proc, timeout):
    start = time.time()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"still running {timeout}s later: {err[-2000:]}")
    return proc.returncode, err, time.time() - start


def _cleanup(proc):
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
    proc.communicate()


@pytest.mark.parametrize("items", [(), ("parallel.ep=2",)], ids=["dp", "ep2"])
def test_stopped_rank_fails_after_the_timeout_naming_it(tmp_path, items):
    r0, r1 = _start(tmp_path, "parallel.timeout_s=3", *items)
    try:
        os.kill(r1.pid, signal.SIGSTOP)
        rc, err, took = _finish(r0, 30)
    finally:
        _cleanup(r1)
    assert rc == 1 and took < 15, (rc, took, err[-3000:])
    assert "moesys train: error: rank 0: " in err and "failed (timeout 3s): timed out after 3s" in err, err[-3000:]
    assert f"ranks that did not arrive: rank 1 (pid {r1.pid} on {socket.gethostname()}: stopped or hung" in err, \
        err[-3000:]
    assert "Traceback" not in err, err[-3000:]


@pytest.mark.parametrize("items", [(), ("parallel.ep=2",)], ids=["dp", "ep2"])
def test_killed_rank_is_a_reset_naming_the_dead_rank(tmp_path, items):
    r0, r1 = _start(tmp_path, "parallel.timeout_s=60", *items)
    os.kill(r1.pid, signal.SIGKILL)
    r1.communicate()
    rc, err, took = _finish(r0, 30)
    assert rc == 1 and took < 15, (rc, took, err[-3000:])
    assert "the connection to a peer was reset: a peer process died" in err, err[-3000:]
    assert f"ranks that did not arrive: rank 1 (pid {r1.pid} on {socket.gethostname()}: exited)" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def test_sigterm_during_a_hang_exits_within_seconds(tmp_path):
    r0, r1 = _start(tmp_path, "parallel.timeout_s=120")
    try:
        os.kill(r1.pid, signal.SIGSTOP)
        time.sleep(1.0)  # rank 0 is now waiting for rank 1 in a collective
        os.kill(r0.pid, signal.SIGTERM)
        rc, err, took = _finish(r0, 30)
    finally:
        _cleanup(r1)
    assert rc == 143 and took < 10, (rc, took, err[-3000:])
    assert "SIGTERM, but the main thread has been blocked for 5s" in err, err[-3000:]

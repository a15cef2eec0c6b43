"""A requeued job (the same command with --resume after a rank was killed) against the uninterrupted
run: the same losses and bit-identical final weights, for ep=2 and for FSSDP with re-shards."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from moesys.checkpoint import read_manifest
from tests._train_helpers import metrics
from tests.test_faults_hang import _finish, _launch, _wait_for

pytestmark = pytest.mark.slow

COMMON = ("train.steps=8", "log.every=1", "log.val_every=0", "data.batch_size=2", "checkpoint.every=2",
          "checkpoint.keep=4", "parallel.timeout_s=20")


def _run_to_end(run_dir, *items, resume=False):
    procs = _launch(run_dir, *COMMON, *items, resume=resume)
    for p in procs:
        rc, err, _ = _finish(p, 300)
        assert rc == 0, err[-3000:]


@pytest.mark.parametrize("items", [("parallel.ep=2",),
                                   ("parallel.expert_sharding=fssdp", "parallel.fssdp.reshard_every=3")],
                         ids=["ep2", "fssdp"])
def test_killed_then_requeued_job_ends_like_the_uninterrupted_one(tmp_path, items):
    _run_to_end(tmp_path / "full", *items)
    run = tmp_path / "requeued"
    r0, r1 = _launch(run, *COMMON, *items)
    # Stop rank 1 once the first checkpoint exists (it may be a few steps further), then kill it.
    _wait_for([r0, r1], lambda: (run / "ckpt" / "step_2").is_dir())
    os.kill(r1.pid, signal.SIGSTOP)
    os.kill(r1.pid, signal.SIGKILL)
    r1.communicate()
    rc, err, _ = _finish(r0, 60)
    assert rc != 0 and "moesys train: error: rank 0" in err, err[-3000:]
    assert not (run / "ckpt" / "step_8").exists()
    _run_to_end(run, *items, resume=True)
    full, requeued = metrics(tmp_path / "full"), metrics(run)
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in requeued] == \
        [(r["step"], r["loss"], r["grad_norm"]) for r in full]
    if "fssdp" in items[0]:  # ownership did move during the run (FSSDPHandle.state_dict counts re-shards)
        assert read_manifest(tmp_path / "full" / "ckpt" / "step_8")["fssdp"]["reshards"] >= 1
    a = load_file(str(tmp_path / "full" / "ckpt" / "step_8" / "model.safetensors"))
    b = load_file(str(run / "ckpt" / "step_8" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

"""The training job with parallel.expert_sharding=fssdp and =fsdp (torchrun, 2 gloo ranks) against
plain data parallelism on the same ranks: the same losses and gradient norms, with re-sharding during
the run; a checkpoint saved under FSSDP resumes under EP (experts are stored by global id)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests._train_helpers import REPO, env, metrics, run_torchrun, torchrun_cmd
from tests.test_ep_train_job import COMMON, _run, _same


@pytest.mark.slow
def test_fssdp_and_fsdp_jobs_match_data_parallel_and_resume_under_ep(tmp_path):
    ref = _run(tmp_path / "dp", "parallel.ep=1")
    fssdp = _run(tmp_path / "fssdp", "parallel.expert_sharding=fssdp", "parallel.fssdp.reshard_every=2",
                 "parallel.fssdp.gather_budget=2")
    _same(fssdp, ref, "fssdp vs data parallel")
    fsdp = _run(tmp_path / "fsdp", "parallel.expert_sharding=fsdp", "parallel.fssdp.rematerialize=true")
    _same(fsdp, ref, "fsdp over experts (rematerialised) vs data parallel")
    dst = tmp_path / "fssdp_as_ep2"
    shutil.copytree(tmp_path / "fssdp", dst)
    for d in (dst / "ckpt").iterdir():
        if d.name != "step_3":
            shutil.rmtree(d)
    cmd = torchrun_cmd(2, dst, *COMMON, "parallel.ep=2") + ["--resume"]
    proc = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same(metrics(dst)[3:], ref[3:], "fssdp checkpoint resumed under ep=2")


@pytest.mark.slow
def test_fssdp_rejects_ep_above_one(tmp_path):
    proc = run_torchrun(2, tmp_path / "bad", *COMMON, "parallel.expert_sharding=fssdp", "parallel.ep=2")
    assert proc.returncode != 0 and "leave parallel.ep at 1" in proc.stderr


@pytest.mark.slow
def test_fssdp_reshards_with_validation_checkpointing_and_resume(tmp_path):
    """Validation right after a re-shard used the plan of the old owners (KeyError in start_gather,
    then a hang): re-shards at steps 2, 4 and 6 with a validation pass after each, activation
    checkpointing, and a resume from step 3 in between that ends where the uninterrupted run does."""
    items = ("train.steps=6", "log.every=1", "log.val_every=1", "data.val_batches=1", "data.batch_size=4",
             "checkpoint.every=3", "checkpoint.keep=3", "train.activation_checkpointing=true",
             "parallel.expert_sharding=fssdp", "parallel.fssdp.reshard_every=2", "parallel.timeout_s=30")
    proc = run_torchrun(2, tmp_path / "full", *items)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = metrics(tmp_path / "full")
    assert [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]
    assert all(r["val_loss"] is not None for r in full)
    dst = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", dst)
    for d in (dst / "ckpt").iterdir():
        if d.name != "step_3":
            shutil.rmtree(d)
    proc = subprocess.run(torchrun_cmd(2, dst, *items) + ["--resume"], env=env(), cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Exact: the checkpoint holds the owners and the re-shard schedule (FSSDPHandle.state_dict).
    keys = ("step", "loss", "grad_norm", "val_loss", "expert_load_fraction")
    assert [[r[k] for k in keys] for r in metrics(dst)] == [[r[k] for k in keys] for r in full]

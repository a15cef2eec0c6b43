"""The training job with parallel.ep=2 (torchrun, 2 gloo ranks) against ep=1 on the same ranks: the same
losses and gradient norms; checkpoints reshard: ep=1 -> ep=2 on 2 ranks, and ep=2 with dp=2 (4 ranks) -> one process."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests._train_helpers import REPO, env, metrics, run_torchrun, torchrun_cmd, train_inproc

COMMON = ("train.steps=5", "log.every=1", "log.val_every=0", "data.batch_size=4", "checkpoint.every=3",
          "checkpoint.keep=3", "moe.shared_ffn_size=32")


def _run(run_dir, *items):
    proc = run_torchrun(2, run_dir, *COMMON, *items)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return metrics(run_dir)


def _same(a, b, what):
    assert [r["step"] for r in a] == [r["step"] for r in b], what
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-5), (what, x["step"])
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4), (what, x["step"])
        flat = [f for layer in x["expert_load_fraction"] for f in layer]
        assert flat == pytest.approx([f for layer in y["expert_load_fraction"] for f in layer], abs=1e-6), what


def _resume_from_step3(src, dst, ep):
    shutil.copytree(src, dst)
    for d in (dst / "ckpt").iterdir():
        if d.name != "step_3":
            shutil.rmtree(d)
    cmd = torchrun_cmd(2, dst, *COMMON, f"parallel.ep={ep}") + ["--resume"]
    return subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_ep2_job_matches_ep1_and_checkpoints_reshard(tmp_path):
    ep2 = _run(tmp_path / "ep2", "parallel.ep=2")
    ep1 = _run(tmp_path / "ep1", "parallel.ep=1")
    _same(ep2, ep1, "ep=2 vs ep=1")
    # A run saved without EP continues with ep=2 (each rank loads its experts and their AdamW state);
    # the other direction (EP -> none) is test_ep2_dp2_job_resumes_in_one_process.
    dst = tmp_path / "resume_ep1_as_ep2"
    proc = _resume_from_step3(tmp_path / "ep1", dst, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same(metrics(dst)[3:], ep1[3:], "ep=1 run resumed with ep=2")


@pytest.mark.slow
def test_ep2_dp2_job_resumes_in_one_process(tmp_path):
    """4 ranks with ep=2 (so dp=2: expert gradients reduce over 2 replicas, the norm over the ep group)
    save at step 2; one process with the same global batch (grad_accum=4) continues from there with
    the losses and gradient norms of the 4-rank run."""
    items = ("train.steps=4", "log.every=1", "log.val_every=0", "data.batch_size=2", "checkpoint.every=2",
             "checkpoint.keep=3")
    proc = run_torchrun(4, tmp_path / "ep4", *items, "parallel.ep=2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ep4 = metrics(tmp_path / "ep4")
    one = tmp_path / "one"
    shutil.copytree(tmp_path / "ep4", one)
    shutil.rmtree(one / "ckpt" / "step_4")
    assert train_inproc(one, *items, "train.grad_accum=4", resume=True) == 0
    _same(metrics(one)[2:], ep4[2:], "ep=2, dp=2 resumed in one process")

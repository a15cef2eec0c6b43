"""`model.hf_model` under torchrun (2 gloo ranks): parallel.ep=2 and FSSDP give the losses, gradient norms and
expert loads of ep=1, and an FSSDP checkpoint resumes under ep=2 (experts by global id)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests._hf_model_helpers import deepseek_v3, write_config
from tests._train_helpers import REPO, env, metrics

COMMON = ("train.steps=4", "checkpoint.every=2", "checkpoint.keep=3")


def _torchrun(cfg, run_dir, *items, resume=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "moesys.train",
           "--config", str(cfg), "--run-dir", str(run_dir)]
    for item in (*COMMON, *items):
        cmd += ["--set", item]
    proc = subprocess.run(cmd + (["--resume"] if resume else []), env=env(), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return metrics(run_dir)


def _same(a, b, what):
    assert [r["step"] for r in a] == [r["step"] for r in b], what
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-6), (what, x["step"])
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5), (what, x["step"])
        assert x["expert_load_fraction"] == y["expert_load_fraction"], (what, x["step"])


@pytest.mark.slow
def test_deepseek_v3_ep2_and_fssdp_equal_ep1(tmp_path):
    cfg = write_config(tmp_path / "hf.yaml", deepseek_v3(tmp_path / "src"))
    ep1 = _torchrun(cfg, tmp_path / "ep1", "parallel.ep=1")
    assert ep1[-1]["loss"] < ep1[0]["loss"]
    _same(_torchrun(cfg, tmp_path / "ep2", "parallel.ep=2"), ep1, "ep=2 vs ep=1")
    fssdp = _torchrun(cfg, tmp_path / "fssdp", "parallel.expert_sharding=fssdp", "parallel.fssdp.reshard_every=1",
                      "parallel.fssdp.gather_budget=2")
    _same(fssdp, ep1, "fssdp vs ep=1")
    dst = tmp_path / "fssdp_as_ep2"
    shutil.copytree(tmp_path / "fssdp", dst)
    shutil.rmtree(dst / "ckpt" / "step_4")
    _same(_torchrun(cfg, dst, "parallel.ep=2", resume=True), ep1, "fssdp checkpoint resumed under ep=2")

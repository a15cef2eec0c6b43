"""`model.hf_model` under torchrun (2 gloo ranks): parallel.ep=2 and FSSDP give the losses, gradient norms and
expert loads of ep=1, and an FSSDP checkpoint resumes under ep=2 (experts by global id)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from tests._hf_model_helpers import deepseek_v3, gpt_oss, write_config
from tests._train_helpers import REPO, env, metrics
from tests.test_ep_train_job import _same

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


def _ep_worker(rank, world, hf_dir):
    from moesys.config import load_config
    from moesys.models.hf_source import load_hf_causal_lm, resolve_config
    from moesys.parallel import ExpertParallelExperts, parallelize
    config = resolve_config(load_config(None, [f"model.hf_model={hf_dir}", "moe.backend=loop", "parallel.ep=2"]))
    torch.manual_seed(0)
    reference = load_hf_causal_lm(config)
    model = load_hf_causal_lm(config)
    handle = parallelize(model, config)
    experts = model.hf.model.layers[1].mlp.experts
    assert isinstance(experts, ExpertParallelExperts) and experts.global_expert_ids == [4 * rank + e for e in range(4)]
    assert experts.gate_up_proj.shape[0] == 4 and handle.shards_experts
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(rank))
    out, ref = model(ids, ids), reference(ids, ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.moe_stats[0].tokens_per_expert, ref.moe_stats[0].tokens_per_expert)
    # FSSDP shards the same experts module: each rank owns a part of the 8 experts.
    from moesys.parallel.fssdp import FSSDPExperts
    fssdp_config = config.model_copy(update={"parallel": config.parallel.model_copy(update={"ep": 1,
                                                                                          "expert_sharding": "fssdp"})})
    sharded = load_hf_causal_lm(fssdp_config)
    parallelize(sharded, fssdp_config)
    experts = sharded.hf.model.layers[1].mlp.experts
    assert isinstance(experts, FSSDPExperts) and experts.gate_up_proj.shape[0] == len(experts.owned_ids) < 8


@pytest.mark.slow
def test_gpt_oss_ep2_equals_ep1(tmp_path):
    """Expert biases and the clamped SwiGLU travel with the experts: ep=2 keeps ep=1's losses."""
    cfg = write_config(tmp_path / "hf.yaml", gpt_oss(tmp_path / "src"))  # with its own aux loss (coef 0.01)
    ep1 = _torchrun(cfg, tmp_path / "ep1", "parallel.ep=1")
    assert ep1[-1]["loss"] < ep1[0]["loss"]
    _same(_torchrun(cfg, tmp_path / "ep2", "parallel.ep=2"), ep1, "ep=2 vs ep=1")


@pytest.mark.slow
def test_parallelize_shards_the_experts_of_a_transformers_model(tmp_path):
    """EP and FSSDP replace the experts inside transformers' own MoE block; each rank holds a part (EP: its half,
    logits unchanged)."""
    from moesys.parallel.testing import spawn
    spawn(_ep_worker, 2, deepseek_v3(tmp_path / "src"))

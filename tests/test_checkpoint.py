"""Checks checkpoints against an uninterrupted run: resuming gives a bit-identical loss trajectory on the
CPU tiny config; experts are stored one tensor per global expert id; writes are atomic and pruned."""

import shutil

import pytest
import torch
from safetensors import safe_open

from moesys.checkpoint import list_checkpoints, merge_experts, merge_experts_optim, split_experts, split_experts_optim
from tests._train_helpers import metrics, train_inproc


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path):
    common = ("train.steps=8", "log.every=1", "log.val_every=3", "checkpoint.every=4", "checkpoint.keep=3",
              "moe.router.aux_free_bias=true", "moe.router.jitter=0.1", "train.grad_accum=2")
    assert train_inproc(tmp_path / "full", *common) == 0
    assert train_inproc(tmp_path / "cut", *common) == 0
    # Interrupt after step 4: throw away everything later, then continue from the checkpoint.
    shutil.rmtree(tmp_path / "cut" / "ckpt" / "step_8")
    assert train_inproc(tmp_path / "cut", *common, resume=True) == 0
    full, cut = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(1, 9))
    for a, b in zip(full, cut):
        assert (a["step"], a["loss"], a["grad_norm"], a.get("val_loss")) == \
               (b["step"], b["loss"], b["grad_norm"], b.get("val_loss"))
    with safe_open(str(tmp_path / "full" / "ckpt" / "step_8" / "model.safetensors"), "pt") as f:
        full_w = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(tmp_path / "cut" / "ckpt" / "step_8" / "model.safetensors"), "pt") as f:
        assert all(torch.equal(full_w[k], f.get_tensor(k)) for k in f.keys())


@pytest.mark.slow
def test_checkpoint_layout_names_experts_by_global_id(tmp_path):
    assert train_inproc(tmp_path, "train.steps=3", "checkpoint.every=1", "checkpoint.keep=2") == 0
    assert [s for s, _ in list_checkpoints(tmp_path / "ckpt")] == [2, 3]
    assert not list((tmp_path / "ckpt").glob(".tmp-*"))
    step = tmp_path / "ckpt" / "step_3"
    with safe_open(str(step / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert list(f.get_slice("blocks.1.ffn.experts.3.gate_up_proj").get_shape()) == [128, 64]
        assert list(f.get_slice("blocks.1.ffn.experts.3.down_proj").get_shape()) == [64, 64]
    assert "blocks.0.ffn.experts.gate_up_proj" not in keys
    with safe_open(str(step / "optimizer.safetensors"), "pt") as f:
        assert "exp_avg/blocks.0.ffn.experts.2.down_proj" in set(f.keys())
    assert {"manifest.json", "rng_rank0.safetensors"} <= {p.name for p in step.iterdir()}


def test_split_and_merge_round_trip():
    state = {"a.experts.gate_up_proj": torch.randn(3, 4, 2), "a.experts.down_proj": torch.randn(3, 2, 2),
             "a.router.weight": torch.randn(3, 2)}
    flat = split_experts(state, expert_offset=5)
    assert set(flat) == {"a.router.weight"} | {f"a.experts.{e}.{n}" for e in (5, 6, 7)
                                                for n in ("gate_up_proj", "down_proj")}
    back = merge_experts(flat, state, expert_ids=lambda name: list(range(5, 5 + state[name].shape[0])))
    assert all(torch.equal(back[k], state[k]) for k in state)
    # Another expert-parallel layout: a rank holding experts 6..7 only.
    half = merge_experts(flat, {"a.experts.down_proj": torch.empty(2, 2, 2)}, expert_ids=lambda name: [6, 7])
    assert torch.equal(half["a.experts.down_proj"], state["a.experts.down_proj"][1:])
    optim = {"exp_avg/a.experts.down_proj": state["a.experts.down_proj"], "step/a.experts.down_proj": torch.tensor(3.)}
    assert all(torch.equal(v, optim[k]) for k, v in merge_experts_optim(split_experts_optim(optim)).items())

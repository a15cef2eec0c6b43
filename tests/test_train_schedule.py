"""The trainer's learning-rate schedule (lr_at) and AdamW parameter groups (build_optimizer) against
values worked out by hand."""

import math

import pytest
import torch

from moesys.config import load_config
from moesys.models.transformer import MoETransformer
from moesys.train import build_optimizer, lr_at


def _config(*overrides):
    return load_config(None, list(overrides))


def test_warmup_is_linear_from_the_first_step():
    c = _config("train.lr=0.001", "train.warmup_steps=4", "train.steps=12", "train.min_lr_ratio=0.1")
    # Step 1 already trains (lr > 0) and the peak is reached at the last warmup step.
    assert [lr_at(s, c) for s in (1, 2, 3, 4)] == pytest.approx([0.00025, 0.0005, 0.00075, 0.001], rel=1e-12)


def test_cosine_decay_after_warmup_by_hand():
    c = _config("train.lr=0.001", "train.warmup_steps=4", "train.steps=12", "train.min_lr_ratio=0.1")
    # progress = (step - 4) / 8; lr = 0.001 * (0.1 + 0.9 * (1 + cos(pi * progress)) / 2)
    want = {5: 0.1 + 0.45 * (1 + math.cos(math.pi / 8)), 6: 0.1 + 0.45 * (1 + math.sqrt(0.5)), 8: 0.55,
            10: 0.1 + 0.45 * (1 - math.sqrt(0.5)), 12: 0.1, 20: 0.1}
    for step, factor in want.items():
        assert lr_at(step, c) == pytest.approx(0.001 * factor, rel=1e-12), step


def test_no_warmup_starts_on_the_cosine():
    c = _config("train.lr=0.002", "train.warmup_steps=0", "train.steps=4", "train.min_lr_ratio=0.0")
    assert [lr_at(s, c) for s in (1, 2, 4)] == pytest.approx(
        [0.002 * 0.5 * (1 + math.cos(math.pi / 4)), 0.001, 0.0], rel=1e-12, abs=1e-15)


def test_adamw_groups_decay_matrices_only():
    c = _config("train.weight_decay=0.25", "train.lr=0.003", "train.betas=[0.8,0.9]", "train.eps=1e-7",
                "model.vocab_size=32", "model.hidden_size=16", "model.num_layers=2", "model.num_heads=2",
                "model.num_kv_heads=1", "model.ffn_size=16", "moe.num_experts=4", "moe.top_k=2", "moe.ffn_size=8",
                "moe.expert_bias=true")
    torch.manual_seed(0)
    model = MoETransformer.from_config(c)
    model.blocks[0].attn.requires_grad_(False)  # frozen parameters stay out of both groups
    opt, impl = build_optimizer(model, c)
    assert impl in ("fused", "foreach") and opt.defaults[impl] is True  # the clip relies on the name
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.25 and no_decay["weight_decay"] == 0.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("blocks.0.attn.") for n in trainable)
    is_bias = {n for n in trainable if n.endswith("bias")}
    # Expert biases ([E, F]: matrices by shape) are biases: no decay.
    assert any(model.get_parameter(n).dim() == 2 for n in is_bias)
    want_no_decay = {n for n in trainable if model.get_parameter(n).dim() < 2} | is_bias
    assert {names[id(p)] for p in no_decay["params"]} == want_no_decay
    assert {names[id(p)] for p in decay["params"]} == trainable - want_no_decay
    assert {"embed.weight", "blocks.1.ffn.experts.gate_up_proj", "blocks.1.ffn.router.weight"} <= trainable - want_no_decay
    for g in opt.param_groups:
        assert g["lr"] == 0.003 and g["betas"] == (0.8, 0.9) and g["eps"] == 1e-7


def test_schedule_past_a_warmup_only_run_stays_at_the_floor():
    # steps == warmup_steps: no cosine span at all; a step past the end (a resumed, extended run) is at lr_min.
    c = _config("train.lr=0.001", "train.warmup_steps=4", "train.steps=4", "train.min_lr_ratio=0.1")
    assert lr_at(4, c) == pytest.approx(0.001) and lr_at(5, c) == pytest.approx(0.0001, rel=1e-12)
    c = _config("train.lr=0.001", "train.warmup_steps=4", "train.steps=5", "train.min_lr_ratio=0.1")
    assert lr_at(5, c) == pytest.approx(0.0001, rel=1e-12)  # a one-step cosine ends at the floor


@pytest.mark.parametrize("error", [RuntimeError, ValueError])
def test_adamw_falls_back_to_foreach_when_fused_refuses(monkeypatch, error):
    real = torch.optim.AdamW

    def no_fused(params, fused=None, **kw):
        if fused:
            raise error("fused=True requires all the params to be floating point Tensors")
        return real(params, **kw)
    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    c = _config("model.vocab_size=32", "model.hidden_size=16", "model.num_layers=1", "model.num_heads=2",
                "model.num_kv_heads=1", "model.ffn_size=16", "moe.num_experts=4", "moe.top_k=2", "moe.ffn_size=8")
    opt, impl = build_optimizer(MoETransformer.from_config(c), c)
    assert impl == "foreach" and opt.defaults["foreach"] is True

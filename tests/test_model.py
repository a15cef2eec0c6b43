"""MoETransformer: shapes, causality, layer layout from the sparse step, tied embeddings, a training step
on the tiny config in well under a second, and loss falling when overfitting one batch."""

from pathlib import Path

import pytest
import torch

from moesys.config import load_config
from moesys.models import MoETransformer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def tiny(**overrides):
    return load_config(TINY, [f"{k}={v}" for k, v in overrides.items()])


def test_forward_shapes_and_causality():
    torch.manual_seed(0)
    model = MoETransformer.from_config(tiny())
    ids = torch.randint(0, 256, (2, 12))
    out = model(ids, labels_BS=ids)
    assert out.logits.shape == (2, 12, 256) and out.loss.ndim == 0 and len(out.moe_stats) == 2
    ids2 = ids.clone()
    ids2[:, 8:] = (ids2[:, 8:] + 1) % 256
    torch.testing.assert_close(model(ids2).logits[:, :8], out.logits[:, :8])


def test_sparse_step_and_first_dense():
    model = MoETransformer.from_config(tiny(**{"model.num_layers": 5, "moe.every": 2, "moe.first_dense": 1}))
    assert [b.is_moe for b in model.blocks] == [False, True, False, True, False]


def test_tied_embeddings_and_active_params():
    model = MoETransformer.from_config(tiny(**{"model.tie_embeddings": True}))
    assert model.lm_head.weight is model.embed.weight
    m = model.moe_config
    expert = sum(p.numel() for p in model.moe_layers()[0].experts.parameters())
    assert model.num_params() - model.num_params(active=True) == 2 * (expert - expert * m.top_k // m.num_experts)


def test_qk_norm_and_gqa_run():
    model = MoETransformer.from_config(tiny(**{"model.qk_norm": True, "model.num_kv_heads": 1}))
    assert model(torch.randint(0, 256, (1, 5))).logits.isfinite().all()


@pytest.mark.slow
def test_tiny_config_overfits_one_batch():
    torch.manual_seed(0)
    cfg = tiny()
    model = MoETransformer.from_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 256, (cfg.data.batch_size, cfg.data.seq_len + 1))
    losses = []
    for _ in range(30):
        out = model(ids[:, :-1], labels_BS=ids[:, 1:])
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 1.0, losses

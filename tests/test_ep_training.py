"""A few AdamW steps of a tiny MoETransformer with parallel.ep=2 against ep=1 (plain data parallel) in the
same 2 gloo processes: the losses and the final weights agree within float32 reduction-order tolerance."""

from __future__ import annotations

import pytest
import torch

from moesys.config import ModelConfig, MoEConfig, ParallelConfig
from moesys.models.transformer import MoETransformer
from moesys.parallel import parallelize
from moesys.parallel.testing import spawn

STEPS = 4


def _model(capacity_factor) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(ModelConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                                      ffn_size=16, max_seq_len=16),
                          MoEConfig(num_experts=4, top_k=2, ffn_size=8, shared_ffn_size=8, shared_gate=True,
                                    capacity_factor=capacity_factor, backend="grouped_mm", aux_loss_coef=0.01))


def _train(rank, ep, capacity_factor):
    model = _model(capacity_factor)
    handle = parallelize(model, ParallelConfig(ep=ep))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own micro-batches, the same in both runs
    losses = []
    for _ in range(STEPS):
        tokens = torch.randint(0, 32, (2, 9), generator=g)
        out = model(tokens[:, :-1], tokens[:, 1:])
        (out.loss + out.aux_loss).backward()
        handle.reduce_gradients()
        handle.clip_grad_norm_(0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.detach().clone()
        torch.distributed.all_reduce(loss)
        losses.append(float(loss) / 2)
    return losses, handle.gather_expert_state(model.state_dict())


def _compare(rank, world):
    for capacity_factor in (None, 1.0):
        losses1, sd1 = _train(rank, 1, capacity_factor)
        losses2, sd2 = _train(rank, 2, capacity_factor)
        assert len(set(losses1)) == STEPS, "the loss should move"
        torch.testing.assert_close(torch.tensor(losses2), torch.tensor(losses1), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"cf={capacity_factor}: losses {losses1} vs {losses2}\n{m}")
        for k in sd1:
            torch.testing.assert_close(sd2[k], sd1[k], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"cf={capacity_factor}: {k}\n{m}")


@pytest.mark.slow
def test_ep2_training_matches_ep1():
    spawn(_compare, 2)

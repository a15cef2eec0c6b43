"""MoELayer: identical experts with renormalised top-k equal one dense MLP (upcycling relies on this),
the shared expert and its sigmoid gate against a hand-built sum, and the reported statistics."""

import pytest
import torch

from moesys.layers import DenseMLP, MoELayer


def copy_dense_into_experts(layer: MoELayer, dense: DenseMLP):
    with torch.no_grad():
        layer.experts.gate_up_proj.copy_(dense.gate_up_proj.weight.expand_as(layer.experts.gate_up_proj))
        layer.experts.down_proj.copy_(dense.down_proj.weight.expand_as(layer.experts.down_proj))


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_identical_experts_equal_dense_mlp(backend, score_func, activation):
    torch.manual_seed(0)
    H, F = 24, 40
    dense = DenseMLP(H, F, activation=activation)
    layer = MoELayer(H, 6, 3, F, activation=activation, backend=backend, score_func=score_func, renormalize=True)
    copy_dense_into_experts(layer, dense)
    x = torch.randn(2, 7, H)
    y, stats = layer(x)
    torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-6)
    assert stats.tokens_per_expert.sum() == 2 * 7 * 3


def test_shared_expert_with_sigmoid_gate():
    torch.manual_seed(1)
    layer = MoELayer(16, 4, 2, 8, shared_ffn_size=12, shared_gate=True, backend="loop")
    x = torch.randn(9, 16)
    y, _ = layer(x)
    routed = layer.router(x)
    expected = layer.experts(x, routed.topk_ids_TK, routed.topk_weights_TK) + \
        torch.sigmoid(layer.shared_expert_gate(x)) * layer.shared_expert(x)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name


def test_stats_and_dropping():
    torch.manual_seed(2)
    layer = MoELayer(8, 4, 2, 8, capacity_factor=0.5)
    y, stats = layer(torch.randn(3, 5, 8))
    assert stats.tokens_per_expert.shape == (4,)
    assert 0 < stats.dropped_fraction.item() <= 1
    assert stats.tokens_per_expert.sum().item() == round(30 * (1 - stats.dropped_fraction.item()))
    assert stats.weighted_loss(1.0, 0.0, 0.0) == stats.aux_loss


def test_zero_tokens():
    layer = MoELayer(8, 4, 2, 8)
    y, stats = layer(torch.randn(0, 8))
    assert y.shape == (0, 8) and stats.tokens_per_expert.sum() == 0

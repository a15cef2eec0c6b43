"""MoELayer against a float64 per-token reference written here from the formulas (no moesys code):
distinct experts, softmax and sigmoid routing, the sigmoid-gated shared expert, and the statistics;
identical experts with renormalised top-k equal one dense MLP (upcycling relies on this)."""

import math

import pytest
import torch

from moesys.layers import DenseMLP, MoELayer


def _act(h, activation):
    """[gate | up] rows for silu (SwiGLU), the up projection alone for gelu."""
    if activation == "silu":
        I = h.shape[-1] // 2
        gate, up = h[..., :I], h[..., I:]
        return gate / (1 + torch.exp(-gate)) * up
    return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))


def reference_moe(layer: MoELayer, x_TH: torch.Tensor, *, score_func: str, renormalize: bool, activation: str):
    """y[t] = sum over the top-k experts of w * W_down[e] act(W_gate_up[e] x[t]), one token at a time in float64."""
    W_r = layer.router.weight.detach().double()
    W1 = layer.experts.gate_up_proj.detach().double()
    W2 = layer.experts.down_proj.detach().double()
    K = layer.router.top_k
    ys = []
    for x in x_TH.double():
        logits = [float(W_r[e] @ x) for e in range(W_r.shape[0])]
        if score_func == "softmax":
            m = max(logits)
            z = sum(math.exp(v - m) for v in logits)
            scores = [math.exp(v - m) / z for v in logits]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in logits]
        chosen = sorted(range(len(scores)), key=lambda e: -scores[e])[:K]
        weights = [scores[e] for e in chosen]
        if renormalize:
            weights = [w / sum(weights) for w in weights]
        y = torch.zeros_like(x)
        for e, w in zip(chosen, weights):
            y += w * (W2[e] @ _act(W1[e] @ x, activation))
        ys.append(y)
    return torch.stack(ys)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("score_func,renormalize", [("softmax", True), ("softmax", False), ("sigmoid", True)])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_distinct_experts_match_the_per_token_reference(backend, score_func, renormalize, activation):
    torch.manual_seed(0)
    H, F_, E, K = 12, 10, 6, 2
    layer = MoELayer(H, E, K, F_, activation=activation, backend=backend, score_func=score_func,
                     renormalize=renormalize, init_std=0.3)
    with torch.no_grad():  # a router sharp enough that the choice matters, experts far apart
        layer.router.weight.normal_(0, 1.0)
    x = torch.randn(2, 7, H)
    y, stats = layer(x)
    want = reference_moe(layer, x.reshape(-1, H), score_func=score_func, renormalize=renormalize,
                         activation=activation)
    torch.testing.assert_close(y.reshape(-1, H).double(), want, rtol=1e-5, atol=1e-6)
    # The choice matters: the same experts under another expert order give another output.
    with torch.no_grad():
        layer.experts.gate_up_proj.copy_(layer.experts.gate_up_proj.roll(1, 0))
    assert not torch.allclose(layer(x)[0].reshape(-1, H).double(), want, rtol=1e-3, atol=1e-4)
    assert stats.tokens_per_expert.sum() == 2 * 7 * K


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_identical_experts_equal_dense_mlp(backend, score_func):
    torch.manual_seed(0)
    H, F_ = 24, 40
    dense = DenseMLP(H, F_)
    layer = MoELayer(H, 6, 3, F_, backend=backend, score_func=score_func, renormalize=True)
    with torch.no_grad():
        layer.experts.gate_up_proj.copy_(dense.gate_up_proj.weight.expand_as(layer.experts.gate_up_proj))
        layer.experts.down_proj.copy_(dense.down_proj.weight.expand_as(layer.experts.down_proj))
    x = torch.randn(2, 7, H)
    W1, W2 = dense.gate_up_proj.weight.detach().double(), dense.down_proj.weight.detach().double()
    want = _act(x.double() @ W1.T, "silu") @ W2.T
    torch.testing.assert_close(layer(x)[0].double(), want, rtol=1e-5, atol=1e-6)


def test_shared_expert_with_sigmoid_gate():
    torch.manual_seed(1)
    H = 16
    layer = MoELayer(H, 4, 2, 8, shared_ffn_size=12, shared_gate=True, backend="loop", init_std=0.3)
    x = torch.randn(9, H)
    y, _ = layer(x)
    routed = reference_moe(layer, x, score_func="softmax", renormalize=True, activation="silu")
    S1 = layer.shared_expert.gate_up_proj.weight.detach().double()
    S2 = layer.shared_expert.down_proj.weight.detach().double()
    g = layer.shared_expert_gate.weight.detach().double()
    xd = x.double()
    gate = 1 / (1 + torch.exp(-(xd @ g.T)))
    torch.testing.assert_close(y.double(), routed + gate * (_act(xd @ S1.T, "silu") @ S2.T), rtol=1e-5, atol=1e-6)
    y.sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name


def test_stats_and_dropping():
    # 6 tokens, 2 experts, top-1, capacity ceil(0.5 * 6 * 1 / 2) = 2: logits put 5 tokens on expert 0
    # and 1 on expert 1, so 3 of the 6 assignments are dropped.
    layer = MoELayer(2, 2, 1, 4, capacity_factor=0.5, renormalize=False)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [4.0, 0.0], [0.5, 0.0], [0.0, 1.0]])
    y, stats = layer(x)
    assert stats.tokens_per_expert.tolist() == [2, 1]
    torch.testing.assert_close(stats.dropped_fraction, torch.tensor(0.5))
    dropped = [1, 2, 4]  # expert 0 keeps its two best tokens (3 and 0)
    assert torch.equal(y[dropped], torch.zeros(3, 2))
    assert (y[[0, 3, 5]].abs().sum(-1) > 0).all()
    a, s, z = stats.aux_loss, stats.seq_aux_loss, stats.z_loss
    torch.testing.assert_close(stats.weighted_loss(2.0, 3.0, 5.0), 2 * a + 3 * s + 5 * z)


def test_zero_tokens():
    layer = MoELayer(8, 4, 2, 8)
    y, stats = layer(torch.randn(0, 8))
    assert y.shape == (0, 8) and stats.tokens_per_expert.sum() == 0

"""Router: routing choices, losses and capacity dropping against hand-computed values."""

import math

import pytest
import torch

from moesys.layers.router import Router


def router_with_logits(logits_TE, **kw):
    """A router whose logits for x = I (identity tokens) are exactly `logits_TE`."""
    T, E = logits_TE.shape
    r = Router(T, E, kw.pop("top_k", 2), **kw)
    with torch.no_grad():
        r.weight.copy_(logits_TE.T)
    return r, torch.eye(T)


def test_softmax_topk_renormalised_and_not():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.5]])
    r, x = router_with_logits(logits, top_k=2, renormalize=False)
    out = r(x)
    p = logits.softmax(-1)
    assert out.topk_ids_TK.tolist() == [[0, 1], [1, 2]]
    torch.testing.assert_close(out.topk_weights_TK, torch.stack([p[0, [0, 1]], p[1, [1, 2]]]))
    r.renormalize = True
    out = r(x)
    torch.testing.assert_close(out.topk_weights_TK.sum(-1), torch.ones(2))
    e = math.exp(1.0)
    torch.testing.assert_close(out.topk_weights_TK[0], torch.tensor([e / (e + 1), 1 / (e + 1)]))


def test_switch_aux_loss_and_z_loss_by_hand():
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.5], [1.0, 1.0, 3.0]])
    r, x = router_with_logits(logits, top_k=1)
    out = r(x)
    p = logits.softmax(-1)
    f = torch.tensor([1, 1, 2]) / 4.0           # ids 0, 1, 2, 2
    aux = 3 * (f * p.mean(0)).sum()
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.z_loss, torch.logsumexp(logits, -1).square().mean())
    assert out.tokens_per_expert_E.tolist() == [1, 1, 2]
    # per-sequence: two sequences of two tokens
    out2 = r(x, num_sequences=2)
    per_seq = [3 * ((torch.bincount(torch.tensor(ids), minlength=3) / 2.0) * p[s].mean(0)).sum()
               for s, ids in ((slice(0, 2), [0, 1]), (slice(2, 4), [2, 2]))]
    torch.testing.assert_close(out2.seq_aux_loss, torch.stack(per_seq).mean())


def test_balanced_routing_gives_aux_loss_one():
    r, x = router_with_logits(torch.zeros(4, 4), top_k=1)
    torch.testing.assert_close(r(x).aux_loss, torch.tensor(1.0))


def test_aux_loss_gradient_reaches_router_weight():
    r = Router(8, 4, 2)
    r(torch.randn(10, 8)).aux_loss.backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


def test_sigmoid_with_aux_free_bias_changes_selection_not_weights():
    logits = torch.tensor([[1.0, 0.9, -2.0, -3.0]])
    r, x = router_with_logits(logits, top_k=1, score_func="sigmoid", aux_free_bias=True, renormalize=False)
    assert r(x).topk_ids_TK.item() == 0
    r.expert_bias.copy_(torch.tensor([0.0, 0.5, 0.0, 0.0]))
    out = r(x)
    assert out.topk_ids_TK.item() == 1
    torch.testing.assert_close(out.topk_weights_TK, torch.sigmoid(torch.tensor([[0.9]])))  # unbiased score


def test_bias_update_moves_toward_balance():
    r = Router(4, 4, 1, score_func="sigmoid", aux_free_bias=True, bias_update_rate=0.01)
    r.train()
    r.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    # from observed training load: the over-loaded expert's bias goes down
    with torch.no_grad():
        r.weight.zero_()
        r.weight[2] = 1.0
    r(torch.ones(6, 4))
    assert r.load_since_update[2] == 6
    r.update_bias()
    assert r.expert_bias[2] < 0 and r.load_since_update.sum() == 0
    assert "expert_bias" in r.state_dict() and not any(n == "expert_bias" for n, _ in r.named_parameters())


def test_group_limited_topk():
    # 3 groups of 2 experts. Unlimited top-2 is {0, 2}; with one group allowed the group is chosen by
    # its best expert for softmax (DeepSeek-V2: group 0) and by its top-2 sum for sigmoid (V3: group 1).
    logits = torch.tensor([[3.0, 0.0, 2.9, 2.8, 2.85, 0.0]])
    r, x = router_with_logits(logits, top_k=2)
    assert set(r(x).topk_ids_TK[0].tolist()) == {0, 2}
    r, x = router_with_logits(logits, top_k=2, n_groups=3, topk_groups=1)
    assert set(r(x).topk_ids_TK[0].tolist()) == {0, 1}
    r, x = router_with_logits(logits, top_k=2, n_groups=3, topk_groups=1, score_func="sigmoid")
    assert set(r(x).topk_ids_TK[0].tolist()) == {2, 3}


def test_capacity_drops_lowest_scored_assignments():
    # 4 tokens all prefer expert 0 (top-1); capacity = ceil(0.5 * 4 * 1 / 2) = 1 keeps the best one.
    logits = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [0.5, 0.0]])
    r, x = router_with_logits(logits, top_k=1, capacity_factor=0.5, renormalize=False)
    out = r(x)
    assert r.capacity(4) == 1
    kept = (out.topk_weights_TK[:, 0] > 0).tolist()
    assert kept == [False, True, False, False]
    torch.testing.assert_close(out.dropped_fraction, torch.tensor(0.75))
    assert out.tokens_per_expert_E.tolist() == [1, 0]
    r.capacity_factor = None
    assert r(x).dropped_fraction.item() == 0.0


def test_jitter_only_in_training():
    r = Router(8, 4, 2, jitter=0.1)
    x = torch.randn(16, 8)
    r.eval()
    assert torch.equal(r(x).logits_TE, r(x).logits_TE)
    r.train()
    assert not torch.equal(r(x).logits_TE, r(x).logits_TE)
    # The noise multiplies each input by a factor in [0.9, 1.1]: with an identity gate, logits / x.
    r = Router(4, 4, 2, jitter=0.1)
    with torch.no_grad():
        r.weight.copy_(torch.eye(4))
    x = torch.rand(500, 4) + 1.0
    factor = r(x).logits_TE / x
    assert 0.9 <= factor.min() < 0.91 and 1.09 < factor.max() <= 1.1


def test_gate_runs_in_fp32():
    r = Router(8, 4, 2).to(torch.bfloat16)
    out = r(torch.randn(5, 8, dtype=torch.bfloat16))
    assert out.logits_TE.dtype == torch.float32 and out.topk_weights_TK.dtype == torch.float32


@pytest.mark.parametrize("kw,match", [
    (dict(top_k=5), "top_k=5 must be between 1 and num_experts=4"),
    (dict(score_func="tanh"), "score_func='tanh'"),
    (dict(n_groups=3), "n_groups=3 must be >= 1 and divide"),
    (dict(n_groups=4, topk_groups=1), "hold fewer than top_k"),
    (dict(capacity_factor=0.0), "capacity_factor=0.0"),
    (dict(scale=0.0), r"scale=0.0 must be a finite number > 0"),
    (dict(scale=-1.0), r"scale=-1.0 must be a finite number > 0"),
    (dict(scale=float("inf")), r"scale=inf must be"),
    (dict(bias_update_rate=-1e-3), r"bias_update_rate=-0.001 must be a finite number >= 0"),
    (dict(jitter=1.0), r"jitter=1.0 must be in \[0, 1\)"),
])
def test_bad_router_config(kw, match):
    args = dict(top_k=2)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        Router(8, 4, args.pop("top_k"), **args)


def test_sigmoid_balance_loss_normalises_scores_per_token_by_hand():
    # Sigmoid scores do not sum to 1 per token; the balance loss divides each token's scores by their
    # sum first (DeepSeek-V3). Top-1, 3 experts, 2 tokens of one sequence each in 2 sequences.
    logits = [[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [-1.0, 0.0, 3.0], [1.0, 1.5, 0.0]]
    r, x = router_with_logits(torch.tensor(logits), top_k=1, score_func="sigmoid")
    sig = [[1 / (1 + math.exp(-v)) for v in row] for row in logits]
    probs = [[s / sum(row) for s in row] for row in sig]
    chosen = [0, 1, 2, 1]

    def loss(tokens):
        f = [sum(chosen[t] == e for t in tokens) / len(tokens) for e in range(3)]
        p = [sum(probs[t][e] for t in tokens) / len(tokens) for e in range(3)]
        return 3 * sum(fe * pe for fe, pe in zip(f, p))

    out = r(x, num_sequences=2)
    assert out.topk_ids_TK[:, 0].tolist() == chosen
    assert out.aux_loss.item() == pytest.approx(loss([0, 1, 2, 3]), rel=1e-6)
    assert out.seq_aux_loss.item() == pytest.approx((loss([0, 1]) + loss([2, 3])) / 2, rel=1e-6)


def test_group_limited_sigmoid_with_one_expert_per_group():
    # 4 groups of 1 expert: a group's score is its only expert (no top-2 sum to take), so the 2 best
    # groups are the 2 best experts.
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0]])
    r, x = router_with_logits(logits, top_k=2, n_groups=4, topk_groups=2, score_func="sigmoid")
    assert sorted(r(x).topk_ids_TK[0].tolist()) == [1, 3]


def test_capacity_counts_tokens_not_hidden_size():
    # 6 tokens of hidden size 2, top-1 over 2 experts: capacity ceil(0.5 * 6 / 2) = 2 per expert.
    r = Router(2, 2, 1, capacity_factor=0.5, renormalize=False)
    with torch.no_grad():
        r.weight.copy_(torch.eye(2))
    x = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [4.0, 0.0], [0.5, 0.0], [0.0, 1.0]])
    out = r(x)
    assert (out.topk_weights_TK[:, 0] > 0).tolist() == [True, False, False, True, False, True]
    assert out.tokens_per_expert_E.tolist() == [2, 1]
    torch.testing.assert_close(out.dropped_fraction, torch.tensor(0.5))


def test_zero_groups_is_a_value_error():
    with pytest.raises(ValueError, match="n_groups=0 must be >= 1"):
        Router(8, 4, 2, n_groups=0)


def test_scale_multiplies_the_combine_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    r, x = router_with_logits(logits, top_k=2, scale=2.5)
    torch.testing.assert_close(r(x).topk_weights_TK.sum(), torch.tensor(2.5))


def test_balance_loss_with_top2_and_a_single_token_by_hand():
    # One token, top-2 of 3 experts: f = [1/2, 1/2, 0], P = softmax; loss = 3 * (P0 + P1) / 2.
    logits = torch.tensor([[1.0, 0.5, -1.0]])
    r, x = router_with_logits(logits, top_k=2)
    p = logits.softmax(-1)[0]
    torch.testing.assert_close(r(x).aux_loss, 3 * (p[0] + p[1]) / 2)


def test_bias_update_from_one_token_and_none_from_no_load():
    r = Router(4, 4, 1, score_func="sigmoid", aux_free_bias=True, bias_update_rate=0.01)
    r.update_bias(torch.zeros(4))
    assert torch.equal(r.expert_bias, torch.zeros(4))
    r.update_bias(torch.tensor([0.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(r.expert_bias, torch.tensor([0.01, -0.01, 0.01, 0.01]))


def test_sigmoid_groups_of_three_score_by_their_top2_sum():
    # Groups {0,1,2} and {3,4,5}: group 0 has the best expert (max 3.0), group 1 the best top-2 sum.
    logits = torch.tensor([[3.0, -3.0, -3.0, 2.0, 2.0, -3.0]])
    r, x = router_with_logits(logits, top_k=2, n_groups=2, topk_groups=1, score_func="sigmoid")
    assert sorted(r(x).topk_ids_TK[0].tolist()) == [3, 4]


def test_capacity_with_top2_counts_every_assignment():
    # 4 tokens, top-2 over 4 experts, each expert picked by exactly 2 tokens: capacity factor 1 gives
    # ceil(1 * 4 * 2 / 4) = 2 slots per expert, so perfectly balanced routing drops nothing; factor 0.5
    # gives 1 slot, and each expert keeps its higher-weighted assignment of the two.
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0], [0.0, 3.0, 2.0, 0.0], [0.0, 0.0, 3.0, 2.0], [2.0, 0.0, 0.0, 3.0]])
    r, x = router_with_logits(logits, top_k=2, capacity_factor=1.0, renormalize=False)
    assert r.capacity(4) == 2
    out = r(x)
    assert out.dropped_fraction.item() == 0.0 and out.tokens_per_expert_E.tolist() == [2, 2, 2, 2]
    r.capacity_factor = 0.5
    out = r(x)
    assert r.capacity(4) == 1
    assert ((out.topk_weights_TK > 0) == (out.topk_ids_TK == torch.tensor([[0], [1], [2], [3]]))).all()
    torch.testing.assert_close(out.dropped_fraction, torch.tensor(0.5))


def test_no_tokens_gives_zero_losses_and_empty_routing():
    # An empty micro-batch (or an empty rank's share): finite zero losses that still backpropagate.
    r = Router(4, 4, 2, capacity_factor=1.0)
    r.train()
    out = r(torch.zeros(0, 4))
    assert out.topk_ids_TK.shape == (0, 2) and out.tokens_per_expert_E.tolist() == [0, 0, 0, 0]
    for loss in (out.aux_loss, out.seq_aux_loss, out.z_loss, out.dropped_fraction):
        assert loss.item() == 0.0
    (out.aux_loss + out.z_loss).backward()
    assert torch.equal(r.weight.grad, torch.zeros(4, 4))


def test_evaluation_does_not_count_toward_the_bias_update():
    # The aux-loss-free bias follows the training load only: tokens routed in eval mode are not counted.
    r = Router(4, 4, 1, score_func="sigmoid", aux_free_bias=True)
    with torch.no_grad():
        r.weight.zero_()
        r.weight[2] = 1.0
    r.eval()
    r(torch.ones(6, 4))
    assert r.load_since_update.sum() == 0
    r.train()
    r(torch.ones(6, 4))
    assert r.load_since_update.tolist() == [0, 0, 6, 0]

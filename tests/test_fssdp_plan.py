"""FSSDP planning: sharding gives every rank the same slot count and balances cold experts;
materialisation respects the gather budget and memory cap, replicates the hottest experts everywhere
and cuts the busiest rank's predicted work; routing keeps every token and prefers local replicas."""

import dataclasses

import pytest
import torch

from moesys.parallel.fssdp_plan import (LoadPredictor, destinations, even_sharding, plan_materialization, plan_sharding,
                                        replica_rings, route_to_replicas, split_over_replicas, transfers)


def zipf(E, s=1.2):
    p = 1 / torch.arange(1, E + 1, dtype=torch.float64) ** s
    return p / p.sum()


def rank_work(counts_WE, replicas, W):
    return route_to_replicas(counts_WE, replicas).sum(0).sum(-1).double()


@pytest.mark.parametrize("W,L,E", [(4, 3, 8), (8, 2, 16), (3, 2, 6), (8, 1, 64)])
def test_sharding_equal_slots_every_expert_owned_once(W, L, E):
    load = torch.rand(L, E, generator=torch.Generator().manual_seed(W)) * 100
    plan = plan_sharding(load, W)
    assert [plan.slots(r) for r in range(W)] == [L * E // W] * W
    assert all(0 <= o < W for row in plan.owner_LE for o in row)
    assert plan == plan_sharding(load.clone(), W)  # deterministic


def test_sharding_can_be_heterogeneous_per_layer():
    # Balancing load puts the hot expert alone with layer 1's experts: 1 + 3 experts per layer, not 2 + 2.
    plan = plan_sharding(torch.tensor([[100.0, 90, 50, 1], [1, 1, 1, 1]]), 2, hot_fraction=0.0)
    assert plan.owner_LE == ((0, 1, 1, 1), (1, 0, 0, 0))
    assert [plan.slots(r) for r in range(2)] == [4, 4]


def test_sharding_places_hot_experts_by_free_slots_then_load_then_rank():
    # 4 equal experts, half of them hot: the cold 1 and 0 go to ranks 0 and 1; the hot 2 and 3 to the rank
    # with the most free slots, the lower rank on a tie: a plan every rank must compute the same
    plan = plan_sharding(torch.ones(1, 4), 2, hot_fraction=0.5)
    assert plan.owner_LE == ((1, 0, 0, 1),)
    # equal free slots: the less loaded rank takes the hot expert (3 to rank 1, which holds 1, not rank 0's 2)
    assert plan_sharding(torch.tensor([[4.0, 1, 2, 3]]), 2, hot_fraction=0.5).owner_LE == ((0, 1, 0, 1),)
    # by default a quarter is hot, rounded half to even: of 2 experts none, so the hotter goes first, to rank 0;
    # of 8, the hottest 2 (0 and 1) fill the free slots of ranks 0 and 1 after the cold ones balanced the load
    assert plan_sharding(torch.tensor([[2.0, 1.0]]), 2).owner_LE == ((0, 1),)
    assert plan_sharding(torch.tensor([[8.0, 7, 6, 5, 4, 3, 2, 1]]), 4).owner_LE == ((0, 1, 0, 1, 2, 3, 3, 2),)
    # all hot: ranks with no expert yet take them in turn
    plan = plan_sharding(torch.ones(1, 4), 2, hot_fraction=1.0)
    assert plan.owner_LE == ((0, 1, 0, 1),)
    with pytest.raises(dataclasses.FrozenInstanceError):  # every rank computed the same plan: it stays that
        plan.world_size = 3


def test_even_sharding_is_plain_eps_placement():
    plan = even_sharding(2, 8, 4)
    assert plan.owner_LE == ((0, 0, 1, 1, 2, 2, 3, 3),) * 2
    assert plan.owned(1, 0) == [2, 3] and plan.owned(3, 1) == [6, 7] and plan.slots(2) == 4


def test_sharding_balances_cold_load():
    load = torch.tensor([[8.0, 7, 6, 5, 4, 3, 2, 1]])
    plan = plan_sharding(load, 4, hot_fraction=0.0)
    per_rank = [sum(load[0, e].item() for e in plan.owned(r, 0)) for r in range(4)]
    assert max(per_rank) - min(per_rank) <= 1.0


def test_sharding_errors():
    with pytest.raises(ValueError, match="split evenly over world_size=3"):
        plan_sharding(torch.ones(1, 8), 3)
    with pytest.raises(ValueError, match="divide num_experts"):
        even_sharding(2, 6, 4)


def test_materialization_respects_budget_and_cap_and_balances():
    W, E = 8, 32
    p = zipf(E)
    g = torch.Generator().manual_seed(0)
    counts_WE = torch.stack([torch.bincount(torch.multinomial(p, 4096, True, generator=g), minlength=E)
                             for _ in range(W)])
    owner = even_sharding(1, E, W).owner_LE[0]
    load = counts_WE.sum(0).double()
    ep = tuple((o,) for o in owner)
    for budget, cap in [(0, 10), (3, 10), (10, 2), (6, 6)]:
        reps = plan_materialization(load, owner, W, gather_budget=budget, memory_cap=cap)
        received = [sum(1 for e in range(E) if r in reps[e] and owner[e] != r) for r in range(W)]
        assert max(received) <= min(budget, cap)
        assert all(owner[e] in reps[e] for e in range(E))
        if budget == 0:
            assert reps == ep
    reps = plan_materialization(load, owner, W, gather_budget=6, memory_cap=6)
    assert reps[0] == tuple(range(W))  # the hottest expert everywhere
    work_ep, work = rank_work(counts_WE, ep, W), rank_work(counts_WE, reps, W)
    assert work.max() < 0.6 * work_ep.max()
    assert work.sum() == work_ep.sum() == counts_WE.sum()


def _check_materialization(load, owner, W, budget, memory_cap, reps):
    """What plan_materialization promises, checked on its result with the work recomputed from scratch:
    owners kept, at most min(budget, cap) received per rank, experts with a rank's fair share everywhere the
    cap allows, and the greedy's stop: the busiest rank's largest share had no rank left to go to, or moving
    it to the least busy one would not have lowered the busiest rank's work."""
    E, cap = len(load), max(0, min(budget, memory_cap))
    assert all(owner[e] in reps[e] and list(reps[e]) == sorted(set(reps[e])) for e in range(E))
    received = [sum(1 for e in range(E) if r in reps[e] and owner[e] != r) for r in range(W)]
    assert max(received) <= cap
    if sum(load) <= 0 or cap == 0 or W == 1:
        assert reps == tuple((o,) for o in owner)
        return
    ideal = sum(load) / W
    assert all(r in reps[e] or received[r] == cap for e in range(E) if load[e] >= ideal for r in range(W))
    work = [sum(load[e] / len(reps[e]) for e in range(E) if r in reps[e]) for r in range(W)]
    busiest = max(range(W), key=lambda r: (work[r], -r))
    movable = [e for e in range(E) if busiest in reps[e] and load[e] > 0 and len(reps[e]) < W]
    if movable:
        e = max(movable, key=lambda e: (load[e] / len(reps[e]), -e))
        targets = [r for r in range(W) if r not in reps[e] and received[r] < cap]
        if targets:
            r = min(targets, key=lambda r: (work[r], r))
            assert work[r] + load[e] / (len(reps[e]) + 1) >= work[busiest], (e, r, busiest)


def test_materialization_stops_where_its_greedy_says():
    # 200 random small layers (a few of them catch a wrong choice of the share to split); loads are
    # multiples of 60, so every share of up to 6 replicas is exact and ties are real ties
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        W, E = int(torch.randint(2, 6, (), generator=g)), int(torch.randint(2, 9, (), generator=g))
        load = (torch.randint(0, 7, (E,), generator=g) * 60).double()
        owner = tuple(torch.randint(0, W, (E,), generator=g).tolist())
        budget, memory_cap = torch.randint(0, 5, (2,), generator=g).tolist()
        reps = plan_materialization(load, owner, W, gather_budget=budget, memory_cap=memory_cap)
        _check_materialization(load.tolist(), owner, W, budget, memory_cap, reps)


@pytest.mark.parametrize("load, owner, W, cap, want", [
    # no fair share; 0's half to rank 1 (tie with expert 1 broken by id), then 1's half would even the
    # ranks at 6 and 6: no gain, stop
    ([4, 4, 1, 1], (0, 0, 1, 1), 2, 2, ((0, 1), (0,), (1,), (1,))),
    ([6, 6, 4], (0, 0, 1), 2, 3, ((0, 1), (0,), (1,))),            # 1's half would make rank 1 the busiest
    # loads below one token still move; rank 1 then has received its one expert
    ([0.75, 0.75, 0.5], (0, 0, 1), 2, 1, ((0, 1), (0,), (1,))),
    ([0.5, 0.25, 0], (0, 0, 1), 2, 1, ((0, 1), (0,), (1,))),        # a total below one token too
    ([0, 0], (0, 1), 2, 2, ((0,), (1,))),                            # no load, nothing to spread
    ([6, 1, 1], (0, 1, 2), 3, 2, ((0, 1, 2), (0, 1), (2,))),         # the fair share everywhere first
    ([1, 1, 1], (0, 1, 2), 3, 2, ((0, 1, 2),) * 3),                  # exactly the fair share counts too
    ([8, 4], (2, 1), 3, 1, ((0, 1, 2), (1, 2))),                     # the hotter expert first
    ([4, 3, 1, 1], (0, 0, 1, 2), 3, 1, ((0, 1, 2), (0,), (1,), (2,))),  # ... and alone when the cap is spent
    ([4, 4, 4, 3], (0, 0, 0, 0), 3, 4, ((0, 1, 2),) * 4),            # 8 receives after the first phase
])
def test_materialization_small_cases(load, owner, W, cap, want):
    reps = plan_materialization(torch.tensor(load, dtype=torch.float64), owner, W, gather_budget=cap, memory_cap=cap)
    assert reps == want
    _check_materialization(load, owner, W, cap, cap, reps)
    with pytest.raises(TypeError):  # the budget and the cap are easy to swap: keyword-only
        plan_materialization(torch.tensor(load, dtype=torch.float64), owner, W, cap, cap)


def test_route_local_first_then_even_split():
    counts = torch.tensor([[5, 0], [7, 3], [0, 4]])
    routed = route_to_replicas(counts, ((0, 2), (1,)))
    assert routed[0, 0, 0] == 5                    # local replica
    assert sorted([routed[1, 0, 0].item(), routed[1, 2, 0].item()]) == [3, 4]  # 7 split over ranks 0, 2
    assert routed[2, 1, 1] == 4 and routed[1, 1, 1] == 3
    assert torch.equal(routed.sum(1), counts)      # every token goes somewhere


def test_load_predictor_window():
    pred = LoadPredictor(1, 2, window=2)
    assert torch.equal(pred.predict(), torch.ones(1, 2, dtype=torch.float64))
    for c in ([[1, 0]], [[3, 2]], [[5, 4]]):
        pred.observe(torch.tensor(c))
    assert pred.predict().tolist() == [[4.0, 3.0]]
    with pytest.raises(ValueError, match="expected \\(1, 2\\)"):
        pred.observe(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="expected \\(1, 2\\)"):
        pred.observe(torch.zeros(1, 1))


def test_topology_aware_split_prefers_same_node():
    # ranks 0-3 on node 0, 4-7 on node 1; expert replicated on ranks 2 and 5
    assert split_over_replicas(9, 0, (2, 5), 8, ranks_per_node=4) == [(2, 9)]
    assert split_over_replicas(9, 6, (2, 5), 8, ranks_per_node=4) == [(5, 9)]
    assert split_over_replicas(9, 6, (2, 5), 8) == [(2, 5), (5, 4)]  # one node: even split, ring order
    assert split_over_replicas(9, 6, (0, 1), 8, ranks_per_node=4) == [(0, 5), (1, 4)]  # none on the node
    assert split_over_replicas(9, 3, (1, 5), 8) == [(5, 5), (1, 4)]  # the ring starts after the source
    assert split_over_replicas(7, 1, (0, 2, 3), 4) == [(2, 3), (3, 2), (0, 2)]


@pytest.mark.parametrize("seed", range(5))
def test_transfers_pair_up_in_the_same_order_on_both_ends(seed):
    """Every message one rank posts to a peer is posted back by that peer as the opposite operation, in
    the same position of their pair's sequence: what batch_isend_irecv needs to match sends to receives.
    Covers the gather (owner -> replicas), its reverse (gradients) and a re-shard (old -> new owner)."""
    g = torch.Generator().manual_seed(seed)
    W, E = 4, 9
    owner_E = torch.randint(0, W, (E,), generator=g).tolist()
    replicas_E = [tuple(sorted({o} | {r for r in range(W) if torch.rand((), generator=g) < 0.4}))
                  for o in owner_E]
    new_owner_E = torch.randint(0, W, (E,), generator=g).tolist()
    cases = [(owner_E, replicas_E, False), (owner_E, replicas_E, True), (owner_E, [(d,) for d in new_owner_E], False)]
    for src_E, dsts_E, reverse in cases:
        lists = {r: transfers(src_E, dsts_E, r, reverse) for r in range(W)}
        for a in range(W):
            for b in range(W):
                a_to_b = [(e, send) for e, peer, send in lists[a] if peer == b]
                b_to_a = [(e, not send) for e, peer, send in lists[b] if peer == a]
                assert a_to_b == b_to_a, (a, b, reverse)
        # every needed copy is there exactly once, in the direction asked for
        for e, (src, dsts) in enumerate(zip(src_E, dsts_E)):
            for d in set(dsts) - {src}:
                assert lists[src].count((e, d, not reverse)) == 1
                assert lists[d].count((e, src, reverse)) == 1
        assert sum(len(v) for v in lists.values()) == 2 * sum(len(set(d) - {s}) for s, d in zip(src_E, dsts_E))


def test_transfers_by_default_send_from_the_owner():
    # the gather (fssdp.py) calls transfers without `reverse`: the owner sends, the replicas receive
    assert transfers([0, 2], [(0, 1), (1, 2)], 0) == [(0, 1, True)]
    assert transfers([0, 2], [(0, 1), (1, 2)], 1) == [(0, 0, False), (1, 2, False)]
    assert transfers([0, 2], [(0, 1), (1, 2)], 1, reverse=True) == [(0, 0, True), (1, 2, True)]

@pytest.mark.parametrize("ranks_per_node", [None, 2])
def test_device_destinations_split_rows_as_split_over_replicas(ranks_per_node):
    """The forward computes each row's destination on the device (no host sync for the counts); it must
    send exactly the chunks split_over_replicas decides: sizes, ranks and order, for every source rank."""
    g = torch.Generator().manual_seed(3)
    W, E = 4, 7
    replicas_E = [tuple(sorted(set(torch.randint(0, W, (int(torch.randint(1, W + 1, (), generator=g)),),
                                                 generator=g).tolist()))) for _ in range(E)]
    counts_E = torch.randint(0, 11, (E,), generator=g)
    counts_E[2] = 0                                   # an expert without rows
    ids_N = torch.repeat_interleave(torch.arange(E), counts_E)
    for source in range(W):
        ring_ER, size_E = replica_rings(replicas_E, source, W, ranks_per_node)
        got_N = destinations(ids_N, counts_E, ring_ER, size_E)
        want = []
        for e in range(E):
            for d, c in split_over_replicas(int(counts_E[e]), source, replicas_E[e], W, ranks_per_node):
                want += [d] * c
        assert got_N.tolist() == want, source


def test_device_destinations_for_every_split_of_up_to_13_rows_over_3_replicas():
    # each expert's rows over 1, 2 or 3 replicas, none local: every (rows, replicas) pair the chunking
    # formula distinguishes (longer chunks first, remainders, empty chunks)
    replicas_E, counts = [], []
    for reps in [(1,), (1, 2), (1, 2, 3)]:
        for n in range(14):
            replicas_E.append(reps)
            counts.append(n)
    counts_E = torch.tensor(counts)
    ids_N = torch.repeat_interleave(torch.arange(len(counts)), counts_E)
    ring_ER, size_E = replica_rings(replicas_E, 0, 4)
    want = [d for reps, n in zip(replicas_E, counts) for d, c in split_over_replicas(n, 0, reps, 4) for _ in range(c)]
    assert destinations(ids_N, counts_E, ring_ER, size_E).tolist() == want

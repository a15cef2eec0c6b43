"""FSSDP executor on 2 and 4 gloo processes against single-process references: expert outputs and
owner gradients under balanced, Zipf-skewed and all-to-one routing (with and without
re-materialisation, with a rank that routes no tokens) for the fssdp, ep and fsdp placements;
training steps equal single-process training; re-sharding and checkpoints by global expert id."""

import dataclasses
import types
from collections import Counter

import pytest
import torch

from moesys.config import load_config
from moesys.layers import Experts, MoELayer
from moesys.models import MoETransformer
from moesys.parallel.comm import CommContext
import moesys.parallel.fssdp as fssdp_module
from moesys.parallel.fssdp import FSSDPExperts, LayerPlan, start_gather
from moesys.parallel.fssdp_runtime import fssdp_parallelize
from moesys.parallel.testing import spawn
from tests.test_model import TINY

H, I, E, K, T = 8, 6, 8, 2, 7


def routing(kind, W, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "balanced":
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(W * T)])
    elif kind == "zipf":
        p = 1 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
        ids = torch.stack([torch.multinomial(p, K, replacement=False, generator=g) for _ in range(W * T)])
    else:  # all tokens to the same two experts
        ids = torch.tensor([[3, 5]] * (W * T))
    return ids.view(W, T, K), torch.rand(W, T, K, generator=g)


def _experts_worker(rank, W, policy, remat, kind):
    torch.manual_seed(0)
    ref = Experts(E, H, I, backend="loop", bias=True)
    with torch.no_grad():
        ref.gate_up_proj_bias.normal_()
        ref.down_proj_bias.normal_()
    holder = torch.nn.Sequential(MoELayer(H, E, K, I, backend="loop", expert_bias=True))
    holder[0].experts.load_state_dict(ref.state_dict())
    handle = fssdp_parallelize(holder, policy=policy, rematerialize=remat)
    ex = holder[0].experts
    for step in range(2):  # step 0 observes the load; step 1 plans replicas from it
        ids, w = routing(kind, W, seed=step)
        x = torch.randn(W, T, H, generator=torch.Generator().manual_seed(10 + step))
        gout = torch.randn(W, T, H, generator=torch.Generator().manual_seed(20 + step))
        n = [T if step == 0 or r % 2 == 0 else 0 for r in range(W)]  # at step 1 odd ranks route no tokens
        cat = lambda t: torch.cat([t[r, :n[r]] for r in range(W)])
        ref.zero_grad()
        y_ref = ref(cat(x), cat(ids), cat(w))
        (y_ref * cat(gout)).sum().backward()
        handle.begin_step()
        ex.zero_grad()
        x_r = x[rank, :n[rank]].clone().requires_grad_()
        y = ex(x_r, ids[rank, :n[rank]], w[rank, :n[rank]])
        (y * gout[rank, :n[rank]]).sum().backward()
        start = sum(n[:rank])
        ex.finish_reduce_scatter()
        torch.testing.assert_close(y, y_ref[start:start + n[rank]], rtol=1e-5, atol=1e-6)
        for name in ex.weight_names():
            g = getattr(ex, name).grad
            want = getattr(ref, name).grad[ex.owned_ids]
            torch.testing.assert_close(g if g is not None else torch.zeros_like(want), want, rtol=1e-5, atol=1e-6)
        handle.end_step()
    if policy == "fssdp" and kind == "all_to_one":
        assert any(len(r) > 1 for r in ex.plan.replicas_E), ex.plan  # the hot experts got replicas


@pytest.mark.slow
@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("policy,remat,kind", [
    ("fssdp", False, "zipf"), ("fssdp", True, "all_to_one"), ("fssdp", False, "balanced"),
    ("ep", False, "zipf"), ("fsdp", True, "zipf"),
])
def test_experts_match_single_process(W, policy, remat, kind):
    spawn(_experts_worker, W, policy, remat, kind)


def _train_worker(rank, W, policy, remat, steps, reshard_every):
    # The micro-batch Switch loss is not additive over ranks; the per-sequence one is, so it is the
    # aux loss that can match single-process training exactly.
    cfg = load_config(TINY, ["model.num_layers=2", "moe.num_experts=4", "data.seq_len=16", "data.batch_size=2",
                             "moe.backend=loop", "moe.aux_loss_coef=0", "moe.seq_aux_loss_coef=0.01"])
    torch.manual_seed(0)
    ref = MoETransformer.from_config(cfg)
    torch.manual_seed(0)
    model = MoETransformer.from_config(cfg)
    handle = fssdp_parallelize(model, policy=policy, rematerialize=remat, reshard_every=reshard_every)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    moved = 0
    for step in range(steps):
        # a skewed corpus: few distinct bytes, so the routers' load is uneven
        batch = torch.randint(0, 6, (W * 2, 17), generator=g) * 40
        out_ref = ref(batch[:, :-1], labels_BS=batch[:, 1:])
        (out_ref.loss + out_ref.aux_loss).backward()
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt_ref.step()
        opt_ref.zero_grad()

        handle.begin_step()
        mine = batch[rank * 2:(rank + 1) * 2]
        out = model(mine[:, :-1], labels_BS=mine[:, 1:])
        (out.loss + out.aux_loss).backward()
        handle.reduce_gradients()
        # the whole model's norm on every rank: dense squares here, expert squares summed over their owners
        torch.testing.assert_close(handle.clip_grad_norm_(1.0), norm_ref, rtol=1e-5, atol=1e-7)
        opt.step()
        opt.zero_grad()
        moved += handle.end_step(opt)
        losses = torch.tensor([out.loss.item()])
        torch.distributed.all_reduce(losses)
        torch.testing.assert_close(losses.item() / W, out_ref.loss.item(), rtol=1e-4, atol=1e-5)
    full = handle.full_expert_state()
    for i, layer in enumerate(ref.moe_layers()):
        for name in ("gate_up_proj", "down_proj"):
            # Adam turns reduction-order noise in near-zero gradients into updates of up to ~lr/100.
            torch.testing.assert_close(full[f"blocks.{i}.ffn.experts.{name}"], getattr(layer.experts, name),
                                       rtol=1e-3, atol=2e-4)
    # Only owners hold optimizer state for their experts, and it is the single-process state's rows.
    for layer, ref_layer in zip(model.moe_layers(), ref.moe_layers()):
        ex = layer.experts
        for name in ex.weight_names():
            mine, theirs = opt.state[getattr(ex, name)], opt_ref.state[getattr(ref_layer.experts, name)]
            for key in ("exp_avg", "exp_avg_sq"):
                assert mine[key].shape[0] == len(ex.owned_ids)
                torch.testing.assert_close(mine[key], theirs[key][ex.owned_ids], rtol=1e-3, atol=1e-5)
    if reshard_every:
        assert moved >= 1, "the skewed load should have changed the sharding plan"


@pytest.mark.slow
@pytest.mark.parametrize("policy,remat,W", [("fssdp", False, 2), ("fssdp", True, 4), ("ep", False, 2)])
def test_training_equals_single_process(policy, remat, W):
    spawn(_train_worker, W, policy, remat, 4, 2 if policy == "fssdp" else 0)


def _checkpoint_worker(rank, W, path):
    cfg = load_config(TINY, ["moe.num_experts=4", "moe.backend=loop"])
    torch.manual_seed(3)
    model = MoETransformer.from_config(cfg)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(4))
    want = model(ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items() if ".experts." in k}
    h = fssdp_parallelize(model, policy="fssdp")
    h.reshard(type(h.owners)(tuple(tuple((e + l) % W for e in range(4)) for l in range(2)), W))
    assert h.reshards == 1
    # the checkpoint's view: every expert tensor gathered by global id, and this rank's rows back from it
    mine = model.state_dict()
    gathered = h.gather_expert_state(mine)
    assert gathered.keys() == mine.keys() and all(torch.equal(gathered[k], v) for k, v in before.items())
    local = h.local_expert_state(gathered)
    assert all(torch.equal(local[k], v) for k, v in mine.items())
    # optimizer state as checkpoints name it ("{state}/{param}"): the 0-d step stays whole
    key = "blocks.0.ffn.experts.down_proj"
    optim = h.gather_expert_state({f"step/{key}": torch.tensor(3.0), f"exp_avg/{key}": mine[key]},
                                  param_name=lambda k: k.split("/", 1)[1])
    assert optim[f"step/{key}"].dim() == 0 and optim[f"step/{key}"].item() == 3.0
    assert torch.equal(optim[f"exp_avg/{key}"], before[key])
    back = h.local_expert_state(optim, param_name=lambda k: k.split("/", 1)[1])
    assert back[f"step/{key}"].dim() == 0 and torch.equal(back[f"exp_avg/{key}"], mine[key])
    full = h.full_expert_state()
    if rank == 0:
        torch.save(full, path)
    torch.distributed.barrier()
    # ... restored under plain EP, and in one process
    torch.manual_seed(99)
    other = MoETransformer.from_config(cfg)
    dense = {k: v for k, v in model.state_dict().items() if ".experts." not in k}
    other.load_state_dict(dense, strict=False)
    h2 = fssdp_parallelize(other, policy="ep")
    h2.load_full_expert_state(torch.load(path, weights_only=True))
    h2.begin_step()
    h.begin_step()
    torch.testing.assert_close(other(ids).logits, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    single = MoETransformer.from_config(cfg)
    single.load_state_dict(dense, strict=False)
    for k, v in torch.load(path, weights_only=True).items():
        single.get_submodule(k.rsplit(".", 1)[0]).get_parameter(k.rsplit(".", 1)[1]).data.copy_(v)
    torch.testing.assert_close(single(ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_checkpoint_round_trip_fssdp_ep_single(tmp_path):
    spawn(_checkpoint_worker, 2, str(tmp_path / "experts.pt"))


def test_bad_policy_and_sizes():
    with pytest.raises(ValueError, match="policy='zero'"):
        fssdp_parallelize(torch.nn.Sequential(MoELayer(8, 4, 2, 8)), policy="zero")
    with pytest.raises(ValueError, match="no MoELayer"):
        fssdp_parallelize(torch.nn.Linear(2, 2))


def test_a_plan_whose_owners_are_not_this_ranks_experts_is_refused():
    """A plan from before a re-shard would pair the wrong point-to-point messages: the gather refuses it
    before posting any, unless the plan gives this rank exactly its experts (not a prefix of them, not
    more)."""
    comm = CommContext(None, rank=0, group_size=2, layer="l0")
    ex = FSSDPExperts(Experts(4, H, I, backend="loop"), [0, 1], group=None, rank=0, world_size=2,
                      layer_name="l0", comm=comm)
    owned = [getattr(ex, n) for n in ex.weight_names()]
    for owners in [(0, 1, 1, 1), (0, 0, 0, 1), (1, 1, 0, 0)]:  # fewer, more, other experts than [0, 1]
        with pytest.raises(AssertionError, match="not this rank's experts"):
            start_gather(ex, LayerPlan(owners, tuple((o,) for o in owners)), torch.float32, owned)


def test_a_layer_plan_cannot_change_in_place():
    """The executor matches plans by identity (its ring tables are built once per plan, a prefetched
    gather is taken only for the plan it was posted for): a plan edited in place would leave both stale."""
    plan = LayerPlan((0, 1), ((0,), (0, 1)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.replicas_E = ((0,), (1,))


def _one_rank_experts(owned=tuple(range(E)), bias=True):
    """FSSDPExperts built directly, as one process owning `owned` (no process group)."""
    torch.manual_seed(0)
    comm = CommContext(None, rank=0, group_size=1, layer="l0")
    ex = FSSDPExperts(Experts(E, H, I, backend="loop", bias=bias), list(owned), group=None, rank=0, world_size=1,
                      layer_name="l0", comm=comm)
    ex.plan = LayerPlan((0,) * E, ((0,),) * E)
    return ex


def _tokens(seed):
    ids, w = routing("balanced", 1, seed)
    return torch.randn(T, H, generator=torch.Generator().manual_seed(seed)), ids[0], w[0]


def test_directly_built_experts_default_to_no_rematerialisation_no_dropping_one_node():
    ex = _one_rank_experts()
    assert ex.rematerialize is False and ex.drop_zero_weight is False and ex.ranks_per_node is None
    assert ex.last_rows_received == 0 and ex.step_counts_E is None  # nothing computed or counted yet


def test_a_block_started_before_begin_step_leaves_the_error_to_forward():
    ex = _one_rank_experts()
    ex.plan = None
    ex.block_started()  # the pre-hook: no plan, nothing to prefetch
    with pytest.raises(RuntimeError, match="no FSSDP plan; call the controller's begin_step"):
        ex(*_tokens(0))


def test_expert_bytes_are_one_experts_rows_in_the_compute_dtype():
    """The "auto" gather budget divides by this: gate_up [2I, H], down [H, I] and the biases [2I], [H],
    in the master dtype until a forward sets the compute dtype (autocast's bf16)."""
    rows = 2 * I * H + H * I
    assert _one_rank_experts(bias=False).expert_bytes() == rows * 4
    ex = _one_rank_experts(owned=[], bias=True)  # nothing owned: the stacks keep their row shape
    assert ex.expert_bytes() == (rows + 2 * I + H) * 4
    ex = _one_rank_experts()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ex(*_tokens(0))
    assert ex.compute_dtype == torch.bfloat16 and ex.expert_bytes() == (rows + 2 * I + H) * 2
    ex = _one_rank_experts().to(torch.bfloat16)  # bf16 master weights, no forward yet
    assert ex.expert_bytes() == (rows + 2 * I + H) * 2


def test_attention_time_runs_from_the_blocks_start_to_the_layers_first_forward(monkeypatch):
    clock = iter([10.0, 10.25, 11.0, 12.0])
    monkeypatch.setattr(fssdp_module, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    ex = _one_rank_experts()
    assert ex.attention_seconds() is None  # never measured
    ex.block_started()                      # 10.0
    assert ex.attention_seconds() is None  # the layer has not run yet
    ex(*_tokens(0))                         # 10.25
    ex(*_tokens(1))                         # a second call within the block keeps the first end
    assert ex.attention_seconds() == 0.25


def test_training_counts_every_micro_batchs_kept_assignments_one_rank():
    """The load the next plans predict from: the sum over the step's micro-batches, not counted in eval."""
    ex = _one_rank_experts()
    batches = [_tokens(s) for s in range(3)]
    for x, ids, w in batches[:2]:
        ex(x, ids, w)
    ex.eval()
    ex(*batches[2])
    want = Counter(batches[0][1].flatten().tolist() + batches[1][1].flatten().tolist())
    assert ex.step_counts_E.tolist() == [want[e] for e in range(E)]


def _capacity_worker(rank, W):
    # capacity_factor set: the router zeroes the weights of dropped assignments, and the executor ships
    # only the rows with a non-zero weight (a negative weight, from a negative routed scale, is kept).
    torch.manual_seed(0)
    ref = Experts(E, H, I, backend="loop", bias=True)
    holder = torch.nn.Sequential(MoELayer(H, E, K, I, backend="loop", expert_bias=True, capacity_factor=1.0))
    holder[0].experts.load_state_dict(ref.state_dict())
    handle = fssdp_parallelize(holder, policy="ep")
    ex = holder[0].experts
    assert ex.drop_zero_weight and ex.owned_ids == [e for e in range(E) if e // (E // W) == rank]
    handle.begin_step()
    kept = Counter()
    for mb in range(2):  # two micro-batches of one step
        ids, w = routing("zipf", W, seed=5 + mb)
        w[:, ::3, 1] = 0.0                     # every third token's second assignment dropped
        w[:, 1, 0] = -0.5
        w[1 % W, 2] = 0.0                       # a token of rank 1 dropped entirely
        x = torch.randn(W, T, H, generator=torch.Generator().manual_seed(30 + mb))
        y = ex(x[rank], ids[rank], w[rank])
        torch.testing.assert_close(y, ref(x[rank], ids[rank], w[rank]), rtol=1e-5, atol=1e-6)
        shipped = w != 0
        kept.update(ids[rank][shipped[rank]].tolist())
        assert ex.last_rows_received == sum(int(e) in ex.owned_ids for e in ids[shipped]), mb
    assert ex.step_counts_E.tolist() == [kept[e] for e in range(E)]


@pytest.mark.slow
def test_capacity_mode_ships_only_kept_rows_and_counts_them():
    spawn(_capacity_worker, 2)


def _budget_worker(rank, W):
    cfg = load_config(TINY, ["moe.num_experts=4", "moe.backend=loop"])
    torch.manual_seed(0)
    model = MoETransformer.from_config(cfg)
    # 1 GB/s: a few ms of attention buys a fraction of an expert's bytes; 1e6 GB/s buys all of them.
    h = fssdp_parallelize(model, policy="fssdp", gather_budget="auto", bandwidth_gbs=1e6)
    assert h.budgets_L == [0, 0]  # nothing measured yet: no gathers
    ids = torch.zeros(1, 9, dtype=torch.long)  # one repeated token: all load on few experts
    for _ in range(2):
        h.begin_step()
        model(ids, labels_BS=ids).loss.backward()
        h.reduce_gradients()
        h.end_step()
    assert all(b >= 4 for b in h.budgets_L), h.budgets_L
    assert any(len(r) > 1 for p in h.plans() for r in p.replicas_E)
    h.bandwidth_gbs = 1e-6
    h.begin_step()
    model(ids, labels_BS=ids).loss.backward()
    h.reduce_gradients()
    h.end_step()
    assert h.budgets_L == [0, 0]
    assert all(len(r) == 1 for p in h.plans() for r in p.replicas_E)


@pytest.mark.slow
def test_auto_gather_budget_from_measured_attention_time():
    spawn(_budget_worker, 2)


def test_single_process_fssdp_equals_the_plain_model():
    """One rank, no process group: FSSDP owns every expert, needs no collectives, queues no gradient
    messages, and trains exactly like the unwrapped model."""
    cfg = load_config(TINY, ["moe.backend=loop"])
    torch.manual_seed(0)
    ref = MoETransformer.from_config(cfg)
    torch.manual_seed(0)
    model = MoETransformer.from_config(cfg)
    h = fssdp_parallelize(model, policy="fssdp")
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        h.begin_step()
        out, out_ref = model(ids, labels_BS=ids), ref(ids, labels_BS=ids)
        assert torch.equal(out.loss, out_ref.loss)
        out.loss.backward()
        out_ref.loss.backward()
        h.reduce_gradients()
        # no process group: the norm is this process's own (no all-reduce to make)
        # (in float64: torch's float32 vector_norm of the concatenation was 1.4e-5 off here)
        norm_ref = torch.cat([p.grad.double().flatten() for p in ref.parameters()]).norm().float()
        torch.testing.assert_close(h.grad_norm(), norm_ref, rtol=1e-6, atol=0)
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
        h.end_step(opt)
    assert all(m.pending_reduce == [] for m in h.experts)
    state = model.state_dict()  # one rank holds every expert: gathering is the identity, with no all-reduce
    assert all(torch.equal(v, state[k]) for k, v in h.gather_expert_state(state).items())
    assert h.predictor.predict().sum() > 0  # the load was observed

"""FSSDP executor on 2 and 4 gloo processes against single-process references: expert outputs and
owner gradients under balanced, Zipf-skewed and all-to-one routing (with and without
re-materialisation, with a rank that routes no tokens) for the fssdp, ep and fsdp placements;
training steps equal single-process training; re-sharding and checkpoints by global expert id; the
handle's checks, initial owners, plans, block hooks, defaults and schedule state (one process, posing as
one rank of a larger world where only the size and rank matter) and its re-shard schedule (2 ranks)."""

import dataclasses
import json
import types
from collections import Counter, deque
from datetime import timedelta

import pytest
import torch

from moesys.config import load_config
from moesys.layers import Experts, MoELayer
from moesys.models import MoETransformer
from moesys.parallel.comm import CommContext
import moesys.parallel.fssdp as fssdp_module
import moesys.parallel.fssdp_runtime as fssdp_runtime_module
from moesys.parallel.fssdp import FSSDPExperts, LayerPlan, start_gather
from moesys.parallel.fssdp_runtime import FSSDPHandle, fssdp_parallelize
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


def test_one_rank_counts_every_assignment_as_received():
    """With one rank every assignment is computed here; the bench's rows-per-rank figure reads this."""
    ex = _one_rank_experts()
    x, ids, w = _tokens(0)
    ex(x, ids, w)
    assert ex.last_rows_received == ids.numel() == T * K


class _RecordingWork:
    def __init__(self):
        self.calls = []

    def wait(self, *timeout):
        self.calls.append(timeout)
        return True


@pytest.mark.parametrize("device, host_waits", [("cpu", True), ("cuda", False)])
def test_gather_and_reduce_waits_block_the_host_only_off_cuda(device, host_waits):
    """On CUDA a wait with a timeout blocks the host until the transfer lands: a second host sync per layer
    beside the split sizes'. The gather's and the gradient messages' waits are the stream's there; on the
    CPU (gloo) they keep parallel.timeout_s, which names a stuck peer."""
    comm = CommContext(None, rank=0, group_size=2, layer="l0", timeout=timedelta(seconds=7))
    on = types.SimpleNamespace(device=torch.device(device))  # no CUDA tensor needed: only its device is read
    works = [_RecordingWork(), _RecordingWork()]
    fssdp_module.PendingGather(None, torch.float32, [on], works, []).wait(comm)
    ex = _one_rank_experts()
    ex.comm, reduce_works = comm, [_RecordingWork()]
    ex.pending_reduce = [(reduce_works, [], [on])]
    ex.finish_reduce_scatter()
    want = [(timedelta(seconds=7),)] if host_waits else [()]
    assert [w.calls for w in works + reduce_works] == [want] * 3


def test_reduce_scatter_adds_each_experts_messages_in_order_one_index_add_per_round(monkeypatch):
    """finish_reduce_scatter adds the replicas' gradients to the owners' rows as the one-message-at-a-time
    loop did, bit for bit, over two backward passes (two entries), with an expert getting three messages;
    no index_add_ repeats a row (on CUDA repeated rows are added atomically in no fixed order)."""
    ex = _one_rank_experts(owned=[1, 4, 6], bias=True)
    ex.gate_up_proj.grad = torch.randn_like(ex.gate_up_proj) * 1e3  # large, so the order of the adds rounds
    g = torch.Generator().manual_seed(3)
    msg = lambda k: (torch.randn(getattr(ex, ex.weight_names()[k]).shape[1:], generator=g) * 10.0 ** torch.randint(
        -3, 3, (1,), generator=g)).to(torch.bfloat16)
    # (weight, owned row, gradient): row 0 of gate_up_proj three times, row 2 twice; down_proj_bias once
    entries = [[(0, 0, msg(0)), (0, 2, msg(0)), (0, 0, msg(0)), (3, 1, msg(3))], [(0, 0, msg(0)), (0, 2, msg(0))]]
    want = {n: None if getattr(ex, n).grad is None else getattr(ex, n).grad.clone() for n in ex.weight_names()}
    for inbox in entries:  # the loop finish_reduce_scatter replaced
        for k, i, buf in inbox:
            n = ex.weight_names()[k]
            want[n] = torch.zeros_like(getattr(ex, n)) if want[n] is None else want[n]
            want[n][i] += buf.float()
    ex.pending_reduce = [([_RecordingWork()], inbox, [ex.gate_up_proj]) for inbox in entries]
    added, index_add = [], torch.Tensor.index_add_
    monkeypatch.setattr(torch.Tensor, "index_add_", lambda t, dim, idx, src: added.append(idx.tolist()) or
                        index_add(t, dim, idx, src))
    ex.finish_reduce_scatter()
    for n in ex.weight_names():
        got = getattr(ex, n).grad
        assert (got is None and want[n] is None) or torch.equal(got, want[n]), n
    assert ex.down_proj.grad is None and ex.pending_reduce == []  # no message: no gradient made up
    assert added == [[0, 2], [0, 2], [0], [1]]  # per weight, per round: every row at most once


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


def _as_rank(monkeypatch, rank, W):
    """torch.distributed as rank `rank` of a `W`-rank world, with no process group: fssdp_parallelize
    only reads the size and rank, and building the layers, the handle and the plans makes no collective."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: W)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)


def _two_layers(E=4):
    return torch.nn.Sequential(torch.nn.Sequential(MoELayer(H, E, K, I)), torch.nn.Sequential(MoELayer(H, E, K, I)))


def test_world_sizes_are_refused_only_where_the_policy_needs_them_to_divide(monkeypatch):
    """ep: W must divide E (4); fssdp: W must divide layers x experts (8); fsdp shards round-robin, any W."""
    _as_rank(monkeypatch, 0, 3)
    with pytest.raises(ValueError, match=r"policy='ep' needs world_size=3 to divide num_experts=4"):
        fssdp_parallelize(_two_layers(), policy="ep")
    with pytest.raises(ValueError, match=r"policy='fssdp' needs world_size=3 to divide layers x experts = 8"):
        fssdp_parallelize(_two_layers(), policy="fssdp")
    assert fssdp_parallelize(_two_layers(), policy="fsdp").owners.owner_LE == ((0, 1, 2, 0),) * 2
    _as_rank(monkeypatch, 0, 8)  # 8 ranks, 4 experts: not for ep, but one expert slot per rank for fssdp
    with pytest.raises(ValueError, match="policy='ep' needs world_size=8"):
        fssdp_parallelize(_two_layers(), policy="ep")
    assert fssdp_parallelize(_two_layers(), policy="fssdp").owners.slots(0) == 1
    for first, second in ((4, 8), (8, 4)):
        model = torch.nn.Sequential(MoELayer(H, first, K, I), MoELayer(H, second, K, I))
        with pytest.raises(ValueError, match="every MoE layer must have the same number of experts"):
            fssdp_parallelize(model, policy="fsdp")


@pytest.mark.parametrize("policy,owned", [
    ("ep", [[[0, 1], [0, 1]], [[2, 3], [2, 3]]]),     # contiguous blocks, as ParallelHandle
    ("fsdp", [[[0, 2], [0, 2]], [[1, 3], [1, 3]]]),   # round-robin storage
])
def test_initial_owners_per_policy_and_their_plans(monkeypatch, policy, owned):
    """As each of 2 ranks (L=2, E=4): the experts each rank owns, and the replicas under a skewed load: ep
    computes an expert on its owner only, fsdp materialises every expert on every rank."""
    for rank in range(2):
        _as_rank(monkeypatch, rank, 2)
        h = fssdp_parallelize(_two_layers(), policy=policy)
        assert [m.owned_ids for m in h.experts] == owned[rank]
        want = ((0, 0, 1, 1) if policy == "ep" else (0, 1, 0, 1),) * 2
        assert h.owners.owner_LE == want
        reps = ((0,), (0,), (1,), (1,)) if policy == "ep" else ((0, 1),) * 4
        h.predictor.observe(torch.tensor([[100.0, 1, 1, 1], [1, 1, 1, 100]]))  # a skewed load changes neither
        assert h.begin_step() == [LayerPlan(want[0], reps)] * 2
        assert all(m.plan == LayerPlan(want[0], reps) for m in h.experts)


def test_fssdp_initial_owners_balance_slots_and_gather_only_within_the_budget(monkeypatch):
    """fssdp starts from a balanced sharding of a uniform load (each rank 4 of the 8 layer-experts); under
    a skewed load, gather_budget=0 materialises no expert beyond its owner, the default (None: all E) does."""
    owners = []
    skewed = torch.tensor([[100.0, 1, 1, 1], [1, 1, 1, 100]])
    for rank in range(2):
        _as_rank(monkeypatch, rank, 2)
        h = fssdp_parallelize(_two_layers(), policy="fssdp", gather_budget=0)
        owners.append([m.owned_ids for m in h.experts])
        assert h.owners.slots(rank) == 4 and h.budgets_L == [0, 0] and h.memory_cap == 4
        h.predictor.observe(skewed)
        assert all(p.replicas_E == tuple((o,) for o in p.owner_E) for p in h.begin_step())
        h = fssdp_parallelize(_two_layers(), policy="fssdp")
        assert h.budgets_L == [4, 4]
        h.predictor.observe(skewed)
        assert all(len(p.replicas_E[e]) == 2 for p, e in zip(h.begin_step(), (0, 3)))  # the hot experts
    for l in range(2):  # every expert owned exactly once
        assert sorted(owners[0][l] + owners[1][l]) == [0, 1, 2, 3]


@pytest.mark.parametrize("local,W,want", [
    (None, 4, None), ("", 4, None), ("0", 4, None),   # not set: one node
    ("2", 4, 2), ("3", 6, 3), ("2", 8, 2), ("1", 4, 1),  # several nodes of LOCAL_WORLD_SIZE ranks
    ("4", 4, None), ("8", 4, None), ("4", 6, None),    # one node, or not a whole number of nodes
    ("-2", 4, None),                                    # not a size
])
def test_ranks_per_node_from_torchruns_local_world_size(monkeypatch, local, W, want):
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    _as_rank(monkeypatch, 0, W)
    h = fssdp_parallelize(torch.nn.Sequential(torch.nn.Sequential(MoELayer(H, 24, K, I))), policy="ep")
    assert h.experts[0].ranks_per_node == want


def test_gather_budget_is_an_int_at_least_zero_none_or_auto():
    model = lambda: torch.nn.Sequential(MoELayer(H, E, K, I))
    for bad in (-1, 1.5, "all"):
        with pytest.raises(ValueError, match=f"gather_budget={bad!r}; use an int >= 0, None or 'auto'"):
            fssdp_parallelize(model(), gather_budget=bad)
    assert fssdp_parallelize(model(), gather_budget=0).budgets_L == [0]
    assert fssdp_parallelize(model(), gather_budget=3, memory_cap=2).budgets_L == [3]
    assert fssdp_parallelize(model(), gather_budget=None).budgets_L == [E]   # every expert
    assert fssdp_parallelize(model(), gather_budget="auto").budgets_L == [0]  # none until measured


def _prefetch_calls(h):
    """Count each layer's prefetch calls (one process: forward does not wait for a prefetch)."""
    calls = [0] * len(h.experts)
    for l, m in enumerate(h.experts):
        m.prefetch = lambda l=l: calls.__setitem__(l, calls[l] + 1)
    return calls


@pytest.mark.parametrize("prefetch,budget,marks,prefetches", [
    (True, None, True, 1), (True, "auto", True, 1), (False, "auto", True, 0), (False, 2, False, 0)])
def test_block_pre_hooks_mark_the_attention_and_prefetch_as_asked(prefetch, budget, marks, prefetches):
    """The block holding each MoE layer starts its attention window (the "auto" budget's measure) when
    prefetching or measuring, and prefetches only when asked to."""
    cfg = load_config(TINY, ["moe.backend=loop"])
    torch.manual_seed(0)
    model = MoETransformer.from_config(cfg)
    h = fssdp_parallelize(model, prefetch=prefetch, gather_budget=budget)
    calls = _prefetch_calls(h)
    h.begin_step()
    model(torch.zeros(1, 5, dtype=torch.long))
    assert [m.attention_seconds() is not None for m in h.experts] == [marks] * 2
    assert calls == [prefetches] * 2


class _TwoTopLevelLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = MoELayer(H, E, K, I, backend="loop"), MoELayer(H, E, K, I, backend="loop")

    def forward(self, x):
        return self.second(self.first(x)[0])[0]


def test_a_top_level_moe_layer_is_marked_by_the_model_only_when_it_is_the_only_one():
    """A MoE layer whose parent is the model has no block of its own: the model's pre-hook marks it if it
    is the only layer; with two, the model's start would precede both, so neither is."""
    x, ids, w = _tokens(0)
    for n in (1, 2):
        model = torch.nn.Sequential(MoELayer(H, E, K, I, backend="loop")) if n == 1 else _TwoTopLevelLayers()
        h = fssdp_parallelize(model)
        calls = _prefetch_calls(h)
        h.begin_step()
        model(x.unsqueeze(0))
        assert [m.attention_seconds() is not None for m in h.experts] == [n == 1] * n
        assert calls == [int(n == 1)] * n


def _one_process_steps(h, model, steps):
    """Train `steps` steps; returns each step's per-layer expert counts (the layers' own)."""
    counts = []
    for s in range(steps):
        h.begin_step()
        ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(s))
        model(ids, labels_BS=ids).loss.backward()
        h.reduce_gradients()
        counts.append([m.step_counts_E.tolist() for m in h.experts])
        assert h.end_step() is False  # one rank: nothing to move
    return counts


def test_schedule_state_round_trips_through_json_and_is_refused_for_another_layout(monkeypatch):
    """state_dict holds the step count, re-shards, owners, gather budgets and the load history (this
    step's counts, as the layers counted them); a fresh handle takes it back whole and then plans alike.
    A state of another policy or world size is refused and changes nothing."""
    cfg = load_config(TINY, ["moe.backend=loop"])
    fresh = lambda policy="fssdp": fssdp_parallelize(MoETransformer.from_config(cfg), policy=policy,
                                                     gather_budget="auto", window=2)
    torch.manual_seed(0)
    model = MoETransformer.from_config(cfg)
    h = fssdp_parallelize(model, gather_budget="auto", window=2)
    counts = _one_process_steps(h, model, 3)
    sd = h.state_dict()
    assert (sd["policy"], sd["world_size"], sd["step"], sd["reshards"]) == ("fssdp", 1, 3, 0)
    assert sd["owner_LE"] == [[0] * 4] * 2
    assert sd["history"] == counts[1:]  # the window's last 2 steps
    assert all(sum(row) == 2 * 9 * 2 for step in sd["history"] for row in step)  # tokens x top_k: this step's only
    assert len(sd["budgets_L"]) == 2 and all(b > 0 for b in sd["budgets_L"]), sd["budgets_L"]
    saved = json.loads(json.dumps({**sd, "reshards": 2}))  # as a manifest holds it (a re-shard count, too)
    h2 = fresh()
    assert h2.load_state_dict(saved) is True
    assert h2.state_dict() == saved and h2.step == 3 and h2.reshards == 2
    assert h2.plans() == h.plans() and torch.equal(h2.predictor.predict(), h.predictor.predict())
    empty = fresh().state_dict()
    for other in ({**sd, "policy": "fsdp"}, {**sd, "policy": "ep"}, {**sd, "world_size": 2}, {}):
        h3 = fresh()
        assert h3.load_state_dict(other) is False and h3.state_dict() == empty
    h3 = fresh("ep")  # a policy sorting below the saved one
    assert h3.load_state_dict(sd) is False and h3.step == 0
    _as_rank(monkeypatch, 0, 2)  # a world larger than the saved one
    h3 = fresh()
    assert h3.load_state_dict(sd) is False and h3.step == 0 and h3.predictor.history == deque()


@pytest.mark.parametrize("every,replans", [(0, 0), (-1, 0), (1, 2), (2, 1)])
def test_reshard_schedule_steps_counted_from_zero_and_a_fixed_budget(monkeypatch, every, replans):
    """Over 2 steps the sharding is re-planned at every `reshard_every`-th step, never for 0 or less (one
    process: the plan never changes, so nothing moves)."""
    calls = []
    real = fssdp_runtime_module.plan_sharding
    monkeypatch.setattr(fssdp_runtime_module, "plan_sharding", lambda *a, **k: calls.append(a) or real(*a, **k))
    cfg = load_config(TINY, ["moe.backend=loop"])
    torch.manual_seed(0)
    model = MoETransformer.from_config(cfg)
    h = fssdp_parallelize(model, reshard_every=every, gather_budget=3)
    assert h.step == 0
    calls.clear()  # the initial owners' plan
    _one_process_steps(h, model, 2)
    assert (h.step, h.reshards, len(calls)) == (2, 0, replans)
    assert h.budgets_L == [3, 3]  # a fixed budget is not replaced by a measured one


def test_load_full_expert_state_names_a_missing_tensor():
    cfg = load_config(TINY, ["moe.backend=loop"])
    h = fssdp_parallelize(MoETransformer.from_config(cfg))
    full = h.full_expert_state()
    assert sorted(full) == [f"blocks.{l}.ffn.experts.{n}" for l in range(2) for n in ("down_proj", "gate_up_proj")]
    del full["blocks.1.ffn.experts.down_proj"]
    with pytest.raises(KeyError, match="load_full_expert_state: blocks.1.ffn.experts.down_proj missing"):
        h.load_full_expert_state(full)


def test_fssdp_parallelize_defaults():
    """What a caller gets without options (the trainer passes every one from parallel.fssdp)."""
    model = torch.nn.Sequential(torch.nn.Sequential(MoELayer(H, E, K, I)))
    h = fssdp_parallelize(model)
    ex = h.experts[0]
    assert h.policy == "fssdp" and h.reshard_every == 100 and h.predictor.window == 5
    assert h.budgets_L == [E] and h.memory_cap == E and h.bandwidth_gbs == 100.0
    assert h.comm.timeout == ex.comm.timeout == timedelta(seconds=600)
    assert ex.rematerialize is False and ex.drop_zero_weight is False and ex.ranks_per_node is None
    assert len(model[0]._forward_pre_hooks) == 1  # prefetching: the block holding the layer starts its gather
    assert h.device == torch.device("cpu")  # the experts' device (of the only layer here)
    handle = FSSDPHandle(model, h.experts, h.owners, policy="fssdp", group=None, rank=0, world_size=1,
                         reshard_every=100, window=5, gather_budget=E, memory_cap=E, timeout=None)
    assert handle.bandwidth_gbs == 100.0  # a handle built directly: the same default


def test_handle_names_this_ranks_expert_rows_and_the_dense_parameters(monkeypatch):
    """The trainer's and checkpoint code's view: expert parameter names, the global ids of this rank's rows
    (None for a dense tensor), trainable dense parameters, and whether ranks hold different experts."""
    cfg = load_config(TINY, ["moe.backend=loop"])
    experts = {f"blocks.{l}.ffn.experts.{n}" for l in range(2) for n in ("gate_up_proj", "down_proj")}
    for rank, W in ((0, 1), (1, 2)):
        if W > 1:
            _as_rank(monkeypatch, rank, W)
        model = MoETransformer.from_config(cfg)
        model.embed.weight.requires_grad_(False)  # frozen: not a dense parameter to reduce or clip
        h = fssdp_parallelize(model, policy="ep")
        assert h.shards_experts is (W > 1)
        assert h.expert_parameter_names() == experts
        named = dict(model.named_parameters())
        assert {id(p) for p in h.expert_parameters()} == {id(named[n]) for n in experts}
        assert {id(p) for p in h.dense_parameters()} == {id(p) for n, p in named.items()
                                                         if n not in experts and n != "embed.weight"}
        want = [0, 1, 2, 3] if W == 1 else [2, 3]
        assert all(h.local_expert_ids(n) == want for n in experts)
        assert h.local_expert_ids("blocks.0.ffn.router.weight") is None
        assert h.device == torch.device("cpu")


def _schedule_worker(rank, W):
    cfg = load_config(TINY, ["moe.num_experts=4", "moe.backend=loop"])
    ids = torch.zeros(2, 9, dtype=torch.long)  # one repeated token: the load falls on few experts
    run = lambda h, model: (h.begin_step(), model(ids, labels_BS=ids).loss.backward(), h.reduce_gradients())
    torch.manual_seed(0)
    model = MoETransformer.from_config(cfg)
    h = fssdp_parallelize(model, policy="fssdp", reshard_every=3)
    initial = h.full_expert_state()
    moved = []
    for _ in range(4):
        run(h, model)
        moved.append(h.end_step())
    # re-shards only at step 3 (the skewed load changed the plan), counted from 0
    assert moved == [False, False, True, False] and (h.step, h.reshards) == (4, 1), (moved, h.step)
    assert h.owners != fssdp_parallelize(MoETransformer.from_config(cfg), policy="fssdp").owners
    # a fresh run taking this state moves its experts to the saved owners, keeping every expert's weights
    torch.manual_seed(0)
    fresh = MoETransformer.from_config(cfg)
    h2 = fssdp_parallelize(fresh, policy="fssdp", reshard_every=3)
    assert h2.load_state_dict(h.state_dict()) is True
    assert h2.state_dict() == h.state_dict() and [m.owned_ids for m in h2.experts] == [m.owned_ids for m in h.experts]
    assert all(torch.equal(v, initial[k]) for k, v in h2.full_expert_state().items())
    # reshard_every=1: the first step's load already moves experts; the second's, the same, plans the same
    # owners (due, but nothing to move); a third step on other tokens moves them again
    torch.manual_seed(0)
    every = MoETransformer.from_config(cfg)
    h4 = fssdp_parallelize(every, policy="fssdp", reshard_every=1)
    run(h4, every)
    assert h4.end_step() is True and h4.reshards == 1
    owners = h4.owners
    run(h4, every)
    assert h4.end_step() is False and h4.reshards == 1 and h4.owners == owners
    h4.begin_step()
    every(ids + 200, labels_BS=ids + 200).loss.backward()
    h4.reduce_gradients()
    assert h4.end_step() is True and h4.reshards == 2 and h4.owners != owners
    # placements other than fssdp never re-shard, whatever the load
    torch.manual_seed(0)
    other = MoETransformer.from_config(cfg)
    h3 = fssdp_parallelize(other, policy="ep", reshard_every=1)
    for _ in range(2):
        run(h3, other)
        assert h3.end_step() is False
    assert h3.reshards == 0 and h3.owners.owner_LE == ((0, 0, 1, 1),) * 2
    # the "auto" budget: the smallest attention time over ranks (rank 0: 0.5 s, rank 1: 1 s) x bandwidth /
    # an expert's bytes, on every rank; a layer unmeasured on one rank gets none
    bytes_ = h.experts[0].expert_bytes()
    h.bandwidth_gbs = 6.0 * bytes_  # 0.5 s at 6 x bytes GB/s: 3e9 experts
    h.experts[0]._attn_marks = [10.0, 10.5 if rank == 0 else 11.0]
    h.experts[1]._attn_marks = [10.0, 11.0] if rank == 0 else None
    h._update_budgets()
    assert h.budgets_L == [3_000_000_000, 0], h.budgets_L
    # optimizers that disagree (only rank 0's has stepped; lr 0 keeps the weights): both ends agree to move
    # the weights alone, and no moment of the old rows is kept for the new ones
    torch.manual_seed(0)
    fifth = MoETransformer.from_config(cfg)
    h5 = fssdp_parallelize(fifth, policy="fssdp")
    opt = torch.optim.AdamW(fifth.parameters(), lr=0.0)
    if rank == 0:
        for p in fifth.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    h5.reshard(h.owners, opt)
    assert [m.owned_ids for m in h5.experts] == [m.owned_ids for m in h.experts]
    assert all(torch.equal(v, initial[k]) for k, v in h5.full_expert_state().items())
    assert not any("exp_avg" in opt.state.get(getattr(m, n), {}) for m in h5.experts for n in m.weight_names())
    for p in fifth.parameters():  # and the next step starts the experts' state afresh on both ranks
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(opt.state[getattr(m, n)]["step"].item() == 1 for m in h5.experts for n in m.weight_names())
    # an optimizer holding a single expert tensor: its moments move with the rows (expert e's gradient e + 1)
    torch.manual_seed(0)
    sixth = MoETransformer.from_config(cfg)
    h6 = fssdp_parallelize(sixth, policy="fssdp")
    ex = h6.experts[0]
    opt = torch.optim.AdamW([ex.gate_up_proj], lr=0.0)
    ex.gate_up_proj.grad = torch.tensor(ex.owned_ids, dtype=torch.float32).add(1).view(-1, 1, 1).expand_as(
        ex.gate_up_proj).clone()
    opt.step()
    h6.reshard(h.owners, opt)
    moved = opt.state[ex.gate_up_proj]["exp_avg"]  # (1 - beta1) x the gradient
    want = torch.tensor(h.experts[0].owned_ids, dtype=torch.float32).add(1).mul(0.1).view(-1, 1, 1)
    torch.testing.assert_close(moved, want.expand_as(moved))


@pytest.mark.slow
def test_reshard_schedule_resume_and_auto_budget_agree_over_ranks():
    """2 gloo ranks: fssdp re-shards exactly every `reshard_every` steps when the plan changed; a fresh
    handle taking the saved state moves its experts to the saved owners; ep never re-shards; the "auto"
    gather budget is the same on every rank (from the smallest attention time); a re-shard with optimizers
    that disagree on having state moves the weights alone (a mismatched transfer would hang: 30 s limit)."""
    spawn(_schedule_worker, 2, timeout_s=30)

"""The token path EP and FSSDP share (moesys/parallel/dispatch.py), against values computed here: rows
sorted by expert with the dropped ones last, counts, split sizes, the received rows' local expert ids, the
combine's rounding, outputs and gradients against the float64 oracle (3 gloo ranks); and the host reads of
one MoE layer's forward, counted on the CPU: one, the split sizes, for EP and for FSSDP (replicas split
over ranks), dropless and in capacity mode."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import moesys.parallel.dispatch as dispatch_module
import moesys.parallel.fssdp as fssdp_module
from moesys.layers import Experts
from moesys.parallel import ExpertParallelExperts
from moesys.parallel.comm import CommContext, all_to_all
from moesys.parallel.dispatch import combine, count_ids, exchange_splits, expert_mlp, received_expert_ids, sort_rows
from moesys.parallel.fssdp import FSSDPExperts, LayerPlan
from moesys.parallel.fssdp_plan import route_to_replicas
from moesys.parallel.mesh import build_mesh
from moesys.parallel.testing import spawn
from tests.moe_oracle import moe_mlp_oracle

H, I, E, K, T = 8, 6, 6, 2, 7
W = 3


def test_sort_rows_groups_rows_by_expert_and_puts_the_dropped_ones_last():
    ids_TK = torch.tensor([[2, 0], [1, 2], [0, 1], [2, 2]])
    weights_TK = torch.tensor([[0.5, 0.0], [1.0, -0.5], [0.0, 0.25], [0.3, 0.7]])
    # flat rows 0..7: ids 2 0 1 2 0 1 2 2; zero weights at rows 1 and 4
    rows_N, ids_N, counts_E = sort_rows(ids_TK, weights_TK, 3, drop_zero_weight=False)
    assert rows_N.tolist() == [1, 4, 2, 5, 0, 3, 6, 7]
    assert ids_N.tolist() == [0, 0, 1, 1, 2, 2, 2, 2] and counts_E.tolist() == [2, 2, 4]
    rows_N, ids_N, counts_E = sort_rows(ids_TK, weights_TK, 3, drop_zero_weight=True)
    assert rows_N.tolist() == [2, 5, 0, 3, 6, 7, 1, 4]  # a negative weight is kept; rows 1 and 4 last
    assert ids_N.tolist() == [1, 1, 2, 2, 2, 2, 3, 3] and counts_E.tolist() == [0, 2, 4]
    assert sort_rows(ids_TK[:0], weights_TK[:0], 3, True)[2].tolist() == [0, 0, 0]  # no tokens

    g = torch.Generator().manual_seed(0)
    for drop in (False, True):
        ids_TK = torch.randint(0, E, (40, 3), generator=g)
        weights_TK = torch.rand(40, 3, generator=g) * (torch.rand(40, 3, generator=g) > 0.3)
        ids, weights = ids_TK.flatten().tolist(), weights_TK.flatten().tolist()
        gone = [drop and w == 0 for w in weights]
        want = sorted(range(len(ids)), key=lambda r: E if gone[r] else ids[r])  # Python's sort is stable
        rows_N, ids_N, counts_E = sort_rows(ids_TK, weights_TK, E, drop)
        assert rows_N.tolist() == want
        assert ids_N.tolist() == [E if gone[r] else ids[r] for r in want]
        assert counts_E.tolist() == [sum(i == e and not d for i, d in zip(ids, gone)) for e in range(E)]


def test_count_ids_counts_each_id_below_n():
    assert count_ids(torch.tensor([3, 0, 3, 1, 3]), 5).tolist() == [1, 1, 0, 3, 0]
    assert count_ids(torch.tensor([], dtype=torch.long), 2).tolist() == [0, 0]
    assert count_ids(torch.tensor([1, 1], dtype=torch.int32), 2).dtype == torch.long


def _inputs(seed, drop):
    """Every rank's tokens, ids and weights (each rank builds all of them, to know what the others send)."""
    g = torch.Generator().manual_seed(seed)
    n = [T, 0, T - 2]  # rank 1 routes no tokens
    xs = [torch.randn(n[r], H, generator=g, dtype=torch.float64) for r in range(W)]
    ids = [torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n[r])]) if n[r] else
           torch.zeros(0, K, dtype=torch.long) for r in range(W)]
    ids[0][:4, 0] = 1  # expert 1 is hot
    ws = [torch.rand(n[r], K, generator=g, dtype=torch.float64) for r in range(W)]
    if drop:
        for w in ws:
            w[::3, 1] = 0.0
            w[1:2, 0] = -0.5
            w[2:3] = 0.0
    return xs, ids, ws


def _shared_path(rank):
    """EP's placement (rank r owns experts 2r, 2r+1) run through the shared functions directly."""
    comm = CommContext(dist.group.WORLD, rank=rank, group_size=W, layer="t")
    L = E // W
    torch.manual_seed(0)
    full = Experts(E, H, I, backend="loop", bias=True).double()
    with torch.no_grad():
        full.gate_up_proj_bias.normal_()
        full.down_proj_bias.normal_()
    for drop in (False, True):
        xs, ids, ws = _inputs(1, drop)
        x_TH = xs[rank].clone().requires_grad_()
        w_TK = ws[rank].clone().requires_grad_()
        rows_N, _, counts_E = sort_rows(ids[rank], w_TK, E, drop)
        splits = exchange_splits(rows_N, counts_E.view(W, L), comm)

        def sent(src, dst):  # expert ids of the rows `src` sends to `dst`, in send order
            kept = [(int(e), r) for r, (e, w) in enumerate(zip(ids[src].flatten(), ws[src].flatten()))
                    if not (drop and w == 0) and e // L == dst]
            return [e for e, _ in sorted(kept)]
        assert splits.send == [len(sent(rank, d)) for d in range(W)], (drop, splits.send)
        assert splits.recv == [len(sent(s, rank)) for s in range(W)], (drop, splits.recv)
        assert splits.recv_PS.tolist() == [[sent(s, rank).count(rank * L + j) for j in range(L)] for s in range(W)]
        assert splits.rows_N.tolist() == rows_N[:sum(splits.send)].tolist()  # the dropped rows cut off

        x_RH = all_to_all(x_TH[splits.rows_N // K], splits.recv, splits.send, comm, "test dispatch")
        local_ids_R = received_expert_ids(splits, torch.arange(L))
        assert local_ids_R.tolist() == [e - rank * L for s in range(W) for e in sent(s, rank)]
        mine = slice(rank * L, rank * L + L)
        out_RH = expert_mlp(x_RH, local_ids_R, full.gate_up_proj[mine], full.down_proj[mine],
                            full.gate_up_proj_bias[mine], full.down_proj_bias[mine], activation="silu", backend="loop")
        y_TH = combine(out_RH, splits, w_TK, torch.float64, comm, "test combine")

        x_ref, w_ref = xs[rank].clone().requires_grad_(), ws[rank].clone().requires_grad_()
        y_ref = moe_mlp_oracle(x_ref, full.gate_up_proj, full.down_proj, ids[rank], w_ref, "silu",
                               full.gate_up_proj_bias, full.down_proj_bias)
        torch.testing.assert_close(y_TH, y_ref, rtol=1e-12, atol=1e-12)
        g_TH = torch.randn(y_TH.shape, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
        (y_TH * g_TH).sum().backward()
        if y_ref.requires_grad:  # not on the rank without tokens: its oracle output is a fresh [0, H]
            (y_ref * g_TH).sum().backward()
        # The router weights' gradient flows through the combine; a dropped assignment is not computed, so its
        # weight gets none (the router's capacity mask, which zeroed it, passes none back either).
        sent_TK = (ws[rank] != 0) | (not drop)
        for got, ref, keep in [(x_TH, x_ref, True), (w_TK, w_ref, sent_TK)]:
            want = ref.grad * keep if ref.grad is not None else torch.zeros_like(ref)
            torch.testing.assert_close(got.grad, want, rtol=1e-12, atol=1e-12)

    # The combine's rounding, with the rows sent back unchanged (y_t = sum_k w_tk x_t): in bf16 the weights
    # are rounded to bf16 first, the K products summed in fp32 (k = 0, 1), and the sum rounded once.
    xs, ids, ws = _inputs(2, True)
    x_TH, w_TK = xs[rank].to(torch.bfloat16), ws[rank] / 3  # thirds: not bf16 numbers
    rows_N, _, counts_E = sort_rows(ids[rank], w_TK, E, True)
    splits = exchange_splits(rows_N, counts_E.view(W, L), comm)
    x_RH = all_to_all(x_TH[splits.rows_N // K], splits.recv, splits.send, comm, "test dispatch")
    y_TH = combine(x_RH, splits, w_TK, torch.bfloat16, comm, "test combine")
    w_TK2 = w_TK.to(torch.bfloat16).float()
    want = (x_TH.float() * w_TK2[:, 0:1] + x_TH.float() * w_TK2[:, 1:2]).to(torch.bfloat16)
    assert y_TH.dtype == torch.bfloat16 and torch.equal(y_TH, want)


# Ops that read a tensor on the host, so wait for the GPU, when the tensor is on CUDA (here on the CPU,
# where they are cheap but visible): a scalar read, a size that depends on values.
_HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::bincount", "aten::masked_select", "aten::equal",
               "aten::is_nonzero", "aten::unique_consecutive", "aten::_unique2", "aten::unique_dim"}


class _HostReads(TorchDispatchMode):
    """Records the host reads of the code run under it: the ops above, repeat_interleave without an
    output size, indexing by a mask (nonzero inside), and, through `watch`, Tensor.tolist / cpu / numpy
    and copies to a device (`.to(device)`) not made by `to_device_async` (which copies from pinned memory
    without waiting). The expert op itself (`moe_mlp`, whose CPU path checks the ids on the host) is not
    watched: its syncs are its backend's."""

    def __init__(self):
        super().__init__()
        self.seen, self.paused = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if not self.paused:
            if name in _HOST_READS:
                self.seen.append(name)
            elif name == "aten::repeat_interleave" and kwargs.get("output_size") is None:
                self.seen.append("repeat_interleave without output_size")
            elif name == "aten::index" and any(t is not None and t.dtype == torch.bool for t in args[1]):
                self.seen.append("index by a mask")
        return func(*args, **kwargs)

    def watch(self, monkeypatch):
        def record(what, real):
            def wrapper(t, *args, **kwargs):
                if not self.paused:
                    self.seen.append(what)
                return real(t, *args, **kwargs)
            return wrapper
        for method in ("tolist", "cpu", "numpy"):
            monkeypatch.setattr(torch.Tensor, method, record(method, getattr(torch.Tensor, method)))
        real_to = torch.Tensor.to

        def to(t, *args, **kwargs):
            if not self.paused and (isinstance(kwargs.get("device"), (str, torch.device)) or any(
                    isinstance(a, (str, torch.device)) for a in args)):
                self.seen.append("to(device)")
            return real_to(t, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, "to", to)
        for module, name in [(dispatch_module, "moe_mlp"), (fssdp_module, "to_device_async")]:
            monkeypatch.setattr(module, name, self.unwatched(getattr(module, name)))
        return self

    def unwatched(self, fn):
        def wrapper(*args, **kwargs):
            self.paused += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused -= 1
        return wrapper


class _Patches:
    """pytest's monkeypatch, in a worker process."""

    def __init__(self):
        self.undo = []

    def setattr(self, obj, name, value):
        self.undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def restore(self):
        for obj, name, value in reversed(self.undo):
            setattr(obj, name, value)


def _host_reads_per_forward(rank):
    torch.manual_seed(0)
    full = Experts(E, H, I, backend="grouped_mm", bias=True).double()
    mesh = build_mesh(W)
    comm = CommContext(dist.group.WORLD, rank=rank, group_size=W, layer="l0")
    owners = tuple(e // (E // W) for e in range(E))
    # expert 0 also on rank 1 (rank 2 splits its rows over ranks 0 and 1), expert 3 on every rank
    plan = LayerPlan(owners, tuple((0, 1) if e == 0 else (0, 1, 2) if e == 3 else (o,) for e, o in enumerate(owners)))
    for drop, seed in itertools.product((False, True), (3, 4)):
        xs, ids, ws = _inputs(seed, drop)
        ep = ExpertParallelExperts(full, mesh, drop_zero_weight=drop)
        fssdp = FSSDPExperts(full, [e for e in range(E) if owners[e] == rank], group=dist.group.WORLD, rank=rank,
                             world_size=W, layer_name="l0", comm=comm, drop_zero_weight=drop)
        fssdp.plan = plan
        for name, experts in [("ep", ep), ("fssdp", fssdp)]:
            patches = _Patches()
            try:
                with _HostReads().watch(patches) as reads:
                    y_TH = experts(xs[rank], ids[rank], ws[rank])
            finally:
                patches.restore()
            assert reads.seen == ["tolist"], (name, drop, reads.seen)  # the split sizes, nothing else
            torch.testing.assert_close(y_TH, full(xs[rank], ids[rank], ws[rank]), rtol=1e-12, atol=1e-12)
        # The rows not sent (capacity mode) go nowhere, also where an expert's rows are split over replicas.
        kept_WE = torch.stack([count_ids(i.flatten()[(w.flatten() != 0) | (not drop)], E) for i, w in zip(ids, ws)])
        assert fssdp.last_rows_received == int(route_to_replicas(kept_WE, plan.replicas_E)[:, rank].sum())
        assert ep.last_splits[1] == [int(kept_WE[s, rank * 2:rank * 2 + 2].sum()) for s in range(W)]


def _worker(rank, world):
    _shared_path(rank)
    _host_reads_per_forward(rank)


@pytest.mark.slow
def test_shared_path_and_one_host_read_per_forward_3_ranks():
    spawn(_worker, W)

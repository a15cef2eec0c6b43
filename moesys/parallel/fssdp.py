"""FSSDP executor: experts fully sharded by owner, materialised sparsely where tokens need them.

One executor runs three placements (`policy`), so they compare in one run:
- "fssdp": owners from `plan_sharding` (heterogeneous, re-planned every `reshard_every` steps),
  replicas per step and layer from `plan_materialization` on the predicted load;
- "ep": each expert only at its owner (even sharding): plain expert parallelism;
- "fsdp": every expert materialised on every rank: FSDP over experts.

Per MoE layer forward (`FSSDPExperts`):
1. SparseAllGather (`_SparseAllGather`, batched point-to-point): each owner sends the expert's
   weights, cast to the compute dtype (bf16 in training), only to the ranks holding a replica this
   step. Its backward is SparseReduceScatter: every replica's gradient is sent to the owner and
   summed there, so only owners hold expert gradients and run the optimizer step.
2. Tokens go to a local replica when there is one, else split evenly over the replicas
   (`fssdp_plan.route_to_replicas`'s rule), by a variable-split all-to-all (counts exchanged first).
3. The replicas run `moe_mlp`; a reverse all-to-all brings the rows back; the source rank applies
   the router weights and sums each token's K rows in order.
Steps 2 and 3 are the token path EP shares (`moesys.parallel.dispatch`); what FSSDP adds is the
choice of a replica per row (the destination) and the gathered weights the replicas compute with.
With `rematerialize=True` the gathered weights are freed after forward and gathered again in
backward (torch.utils.checkpoint around gather + expert compute).

Every rank issues the same collectives in the same order (plans come from all-reduced counts), and
point-to-point messages between a pair of ranks are ordered by (expert id, tensor), so ranks that
receive nothing simply post no receives.

Legend: T tokens, H hidden, I expert intermediate, E experts per layer, O owned experts,
M materialised experts, K top-k, N routed rows, W ranks, B = E + 1 buckets (the experts and the rows
not sent), R rows received (in the ring tables: an expert's replicas, as in fssdp_plan).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from moesys.layers.experts import Experts, autocast_expert_inputs
from moesys.ops import moe_mlp
from moesys.parallel.comm import CommContext, all_to_all, guarded, wait_work
from moesys.parallel.dispatch import combine, count_ids, exchange_splits, expert_mlp, received_expert_ids, sort_rows
from moesys.parallel.fssdp_plan import destinations, replica_rings, transfers

__all__ = ["FSSDPExperts", "LayerPlan", "POLICIES"]

POLICIES = ("fssdp", "ep", "fsdp")
_WEIGHTS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


@dataclass(frozen=True)
class LayerPlan:
    """One layer's placement for one step; identical on every rank."""
    owner_E: tuple[int, ...]
    replicas_E: tuple[tuple[int, ...], ...]   # sorted ranks holding expert e (owner included)

    def materialised(self, rank: int) -> list[int]:
        return [e for e, reps in enumerate(self.replicas_E) if rank in reps]


def _launch(ops: list, ctx: CommContext, what: str) -> list:
    if not ops:
        return []
    with guarded(ctx, what):
        return dist.batch_isend_irecv(ops)


def _wait_all(works: list, ctx: CommContext, what: str, device: torch.device) -> None:
    """Wait for point-to-point messages into tensors on `device`. Nothing here is read by the host, so on
    CUDA the wait is the stream's only (`wait_work`'s host_sync=False): a wait with a timeout would block
    the host until the transfer lands, a second host sync per layer beside the split sizes' one; a stuck
    peer is named by the count exchange every layer issues first, or by NCCL's watchdog."""
    for work in works:
        wait_work(work, ctx, what, host_sync=device.type != "cuda")


class PendingGather:
    """A SparseAllGather in flight: the materialised buffers fill as the receives complete."""

    def __init__(self, plan: LayerPlan, dtype: torch.dtype, out: list, works: list, keepalive: list):
        self.plan, self.dtype, self.out, self.works, self.keepalive = plan, dtype, out, works, keepalive

    def wait(self, ctx: CommContext) -> list:
        _wait_all(self.works, ctx, "SparseAllGather", self.out[0].device)
        self.works, self.keepalive = [], []
        return self.out


def _local_rows(mat_ids: list[int], owned_index: dict[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions in the materialised list, positions in the owned list) of the experts this rank both
    owns and materialises."""
    pairs = [(m, owned_index[e]) for m, e in enumerate(mat_ids) if e in owned_index]
    m_idx, o_idx = zip(*pairs) if pairs else ((), ())
    return (to_device_async(torch.tensor(m_idx, dtype=torch.long), device),
            to_device_async(torch.tensor(o_idx, dtype=torch.long), device))


def to_device_async(t: torch.Tensor, device) -> torch.Tensor:
    """A small host-built tensor onto `device` without a host sync: a copy from pageable memory would
    wait for the stream's earlier work; from pinned memory it is queued (torch keeps the pinned block
    alive until the copy has run)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def start_gather(module: "FSSDPExperts", plan: LayerPlan, dtype: torch.dtype, owned: list) -> PendingGather:
    """Post the point-to-point messages of one layer's SparseAllGather: owners send each expert's
    rows (cast to `dtype`) to its replicas; replicas receive. Messages between a pair of ranks are
    ordered by (expert id, tensor), the same on both ends."""
    rank = module.rank
    mat_ids = plan.materialised(rank)
    owned_index = {e: i for i, e in enumerate(module.owned_ids)}
    assert [e for e, o in enumerate(plan.owner_E) if o == rank] == module.owned_ids, \
        f"{module.layer_name}: the plan's owners are not this rank's experts (a plan from before a re-shard)"
    with torch.no_grad():
        out = [w.new_empty((len(mat_ids),) + tuple(w.shape[1:]), dtype=dtype) for w in owned]
        ops, keepalive = [], []
        local_m, local_o = _local_rows(mat_ids, owned_index, owned[0].device)
        for o, w in zip(out, owned):  # the materialised experts this rank owns: one batched copy
            o[local_m] = w[local_o].to(dtype)
        sent = {}  # expert -> its rows in the compute dtype, cast once for all its replicas
        for e, peer, send in transfers(plan.owner_E, plan.replicas_E, rank):
            if send:
                if e not in sent:
                    sent[e] = [w[owned_index[e]].to(dtype).contiguous() for w in owned]
                    keepalive += sent[e]
                ops += [dist.P2POp(dist.isend, row, peer, group=module.group) for row in sent[e]]
            else:
                m = mat_ids.index(e)
                ops += [dist.P2POp(dist.irecv, o[m], peer, group=module.group) for o in out]
    return PendingGather(plan, dtype, out, _launch(ops, module.comm, "SparseAllGather"), keepalive)


class _SparseAllGather(torch.autograd.Function):
    """Forward: owned master rows [O, ...] -> materialised rows [M, ...] in the compute dtype (using
    the gather prefetched during attention when there is one).
    Backward: the local replica's gradient returns to the owned rows at once; the other replicas'
    gradients travel to their owners asynchronously (SparseReduceScatter) and are added to the owners'
    `.grad` by `FSSDPExperts.finish_reduce_scatter()` (the handle's `reduce_gradients()` calls it), so
    they overlap the rest of the backward pass."""

    @staticmethod
    def forward(fctx, module: "FSSDPExperts", plan: LayerPlan, dtype: torch.dtype, *owned):
        pending = module.take_prefetch(plan, dtype)
        if pending is None:
            pending = start_gather(module, plan, dtype, list(owned))
        out = pending.wait(module.comm)
        fctx.module, fctx.plan, fctx.master_dtypes = module, plan, [w.dtype for w in owned]
        fctx.owned_shapes = [tuple(w.shape) for w in owned]
        return tuple(out)

    @staticmethod
    def backward(fctx, *grad_mat):
        module, plan, rank = fctx.module, fctx.plan, fctx.module.rank
        mat_ids = plan.materialised(rank)
        owned_index = {e: i for i, e in enumerate(module.owned_ids)}
        grads = [torch.zeros(s, dtype=torch.float32, device=g.device) for s, g in zip(fctx.owned_shapes, grad_mat)]
        grad_mat = [g.contiguous() for g in grad_mat]
        local_m, local_o = _local_rows(mat_ids, owned_index, grads[0].device)
        for acc, g in zip(grads, grad_mat):  # the local replicas' gradients: one batched add
            acc.index_add_(0, local_o, g[local_m].float())
        ops, inbox = [], []
        for e, peer, send in transfers(plan.owner_E, plan.replicas_E, rank, reverse=True):
            if send:  # a replica's gradient back to the owner
                m = mat_ids.index(e)
                ops += [dist.P2POp(dist.isend, g[m], peer, group=module.group) for g in grad_mat]
            else:
                for k, g in enumerate(grad_mat):
                    buf = torch.empty(g.shape[1:], dtype=g.dtype, device=g.device)
                    inbox.append((k, owned_index[e], buf))
                    ops.append(dist.P2POp(dist.irecv, buf, peer, group=module.group))
        if ops:  # nothing in flight (one rank, or no remote replicas): nothing to finish or keep alive
            module.pending_reduce.append((_launch(ops, module.comm, "SparseReduceScatter"), inbox, grad_mat))
        return (None, None, None) + tuple(g.to(d) for g, d in zip(grads, fctx.master_dtypes))


class FSSDPExperts(nn.Module):
    """Drop-in for `Experts` under FSSDP: holds the master weights of the experts this rank owns
    (`owned_ids`, global ids in ascending order; possibly none) as [O, ...] parameters with
    `Experts`' names, and runs the forward described in the module docstring with `self.plan`."""

    def __init__(self, experts: Experts, owned_ids: list[int], *, group, rank: int, world_size: int,
                 layer_name: str, comm: CommContext, rematerialize: bool = False,
                 drop_zero_weight: bool = False, ranks_per_node: int | None = None):
        super().__init__()
        self.num_experts, self.hidden_size, self.ffn_size = experts.num_experts, experts.hidden_size, experts.ffn_size
        self.activation, self.backend = experts.activation, experts.backend
        self.group, self.rank, self.world_size, self.layer_name, self.comm = group, rank, world_size, layer_name, comm
        self.rematerialize, self.drop_zero_weight = rematerialize, drop_zero_weight
        self.ranks_per_node = ranks_per_node
        self.compute_dtype: torch.dtype | None = None    # dtype of the tokens (set by the first forward)
        self.owned_ids: list[int] = sorted(owned_ids)
        for name in _WEIGHTS:
            full = getattr(experts, name)
            setattr(self, name, None if full is None else nn.Parameter(full.detach()[self.owned_ids].clone()))
        self.plan: LayerPlan | None = None
        self._tables_of: LayerPlan | None = None  # the plan `_plan_tables` were built for
        self._plan_tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.step_counts_E: torch.Tensor | None = None   # this rank's kept assignments this step (training)
        self.last_rows_received = 0                      # rows this rank computed in the last forward
        self._prefetch: PendingGather | None = None
        self.pending_reduce: list = []                   # SparseReduceScatter messages in flight

    def block_started(self) -> None:
        """Called when the module holding this layer starts (before its attention): marks the time,
        so that the attention time (the window a gather can hide in) is measured, and prefetches."""
        self._attn_marks = [self._mark(), None]
        self.prefetch()

    def _mark(self):
        if torch.cuda.is_available() and self.gate_up_proj.is_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def attention_seconds(self) -> float | None:
        """Time from the block's start to this layer's forward in the last step (None if unmeasured)."""
        marks = getattr(self, "_attn_marks", None)
        if not marks or marks[1] is None:
            return None
        start, end = marks
        if isinstance(start, float):
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def expert_bytes(self) -> int:
        dtype = self.compute_dtype or self.gate_up_proj.dtype
        size = torch.empty((), dtype=dtype).element_size()
        # One expert's rows of every weight (the stacks keep their row shape even when nothing is owned).
        return sum(math.prod(getattr(self, n).shape[1:]) for n in self.weight_names()) * size

    def prefetch(self) -> None:
        """Start this step's SparseAllGather now (called before the attention that precedes this
        layer, so the transfer overlaps it); forward then only waits for it."""
        if self.plan is None or self._prefetch is not None or not self.plan.materialised(self.rank):
            return
        dtype = self.compute_dtype or getattr(self, "gate_up_proj").dtype
        self._prefetch = start_gather(self, self.plan, dtype, [getattr(self, n) for n in self.weight_names()])

    def take_prefetch(self, plan: LayerPlan, dtype: torch.dtype) -> PendingGather | None:
        pending, self._prefetch = self._prefetch, None
        if pending is not None and (pending.plan is not plan or pending.dtype != dtype):
            pending.wait(self.comm)  # stale (plan or dtype changed): drain it, gather afresh
            return None
        return pending

    @torch.no_grad()
    def finish_reduce_scatter(self) -> None:
        """Wait for the gradient messages of this layer's backward and add them to the owners' grads: one
        index_add_ per weight and round, round r adding every owned expert's r-th message. An expert with
        replicas on several ranks gets several messages; a round holds at most one per expert, so each
        gradient row gets its messages one add at a time, in arrival order, with the rounding of a loop
        over them (index_add_ on CUDA adds repeated indices atomically, in no fixed order)."""
        names = self.weight_names()
        rounds: list[list[tuple[list[int], list[torch.Tensor]]]] = [[] for _ in names]  # per weight
        seen: list[Counter] = [Counter() for _ in names]  # per weight: messages so far per owned row
        for works, inbox, keepalive in self.pending_reduce:
            _wait_all(works, self.comm, "SparseReduceScatter", keepalive[0].device)
            for k, i, buf in inbox:
                r = seen[k][i]
                seen[k][i] += 1
                if r == len(rounds[k]):
                    rounds[k].append(([], []))
                rounds[k][r][0].append(i)
                rounds[k][r][1].append(buf)
        for name, weight_rounds in zip(names, rounds):
            if not weight_rounds:
                continue
            p = getattr(self, name)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            for rows, bufs in weight_rounds:
                p.grad.index_add_(0, to_device_async(torch.tensor(rows, dtype=torch.long), p.grad.device),
                                  torch.stack(bufs).to(p.grad.dtype))
        self.pending_reduce = []

    def weight_names(self) -> list[str]:
        return [n for n in _WEIGHTS if getattr(self, n) is not None]

    def extra_repr(self) -> str:
        return f"owns {self.owned_ids} of {self.num_experts} experts, rematerialize={self.rematerialize}"

    def forward(self, x_TH: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
        if self.plan is None:
            raise RuntimeError(f"{self.layer_name}: no FSSDP plan; call the controller's begin_step() before forward")
        marks = getattr(self, "_attn_marks", None)
        if marks and marks[1] is None:
            marks[1] = self._mark()
        K = topk_ids_TK.shape[1]
        E, W, rank, plan = self.num_experts, self.world_size, self.rank, self.plan
        x_TH, = autocast_expert_inputs(x_TH)  # as `Experts`: the autocast dtype (bf16 copies travel, fp32 masters stay)
        self.compute_dtype = x_TH.dtype
        if W == 1:  # one rank owns every expert: no gather, no dispatch, no process group needed
            return self._single_rank(x_TH, topk_ids_TK, topk_weights_TK)
        rows_N, ids_N, counts_E = sort_rows(topk_ids_TK, topk_weights_TK, E, self.drop_zero_weight)
        if self.training:  # the load the next plans predict from: every micro-batch of the step
            self.step_counts_E = counts_E.detach() + (0 if self.step_counts_E is None else self.step_counts_E)
        ring_BR, size_B, local_E = self._tables(plan, rows_N.device)
        # The rows not sent (capacity mode: id E, sorted last) are bucket E, whose one "replica" is rank W,
        # past every real one: they keep sorting last, and no count of the kept rows is needed on the host.
        counts_B = torch.cat([counts_E, (ids_N.numel() - counts_E.sum()).view(1)])
        dest_N = destinations(ids_N, counts_B, ring_BR, size_B)
        key_N = dest_N * (E + 1) + ids_N   # by destination, then expert
        send_WE = count_ids(key_N, (W + 1) * (E + 1)).view(W + 1, E + 1)[:W, :E]
        order_N = torch.sort(key_N, stable=True).indices
        splits = exchange_splits(rows_N[order_N], send_WE, self.comm)

        self.last_rows_received = sum(splits.recv)
        x_RH = all_to_all(x_TH[splits.rows_N // K], splits.recv, splits.send, self.comm, "FSSDP token dispatch")
        local_ids_R = received_expert_ids(splits, local_E)
        owned = [getattr(self, n) for n in self.weight_names()]
        if not plan.materialised(rank):
            # Nothing owned or replicated here this step: no rows arrive and there is nothing to send.
            # Keep the (empty) result in the graph of x and the owned weights so that this rank
            # runs the same backward collectives as the others.
            out_RH = x_RH * 0 + sum((w.sum() * 0 for w in owned), x_RH.new_zeros(()))
        elif self.rematerialize:
            out_RH = checkpoint(self._gather_and_compute, x_RH, local_ids_R, *owned, use_reentrant=False)
        else:
            out_RH = self._gather_and_compute(x_RH, local_ids_R, *owned)
        # The compute dtype, as `Experts` returns.
        return combine(out_RH, splits, topk_weights_TK, x_TH.dtype, self.comm, "FSSDP expert output")

    def _single_rank(self, x_TH, topk_ids_TK, topk_weights_TK):
        self.last_rows_received = topk_ids_TK.numel()  # every assignment computed here (dropped ones at weight 0)
        if self.training:
            counts_E = count_ids(topk_ids_TK.reshape(-1), self.num_experts)
            self.step_counts_E = counts_E + (0 if self.step_counts_E is None else self.step_counts_E)
        _, w_gate_up, w_down, b_gate_up, b_down = autocast_expert_inputs(
            x_TH, self.gate_up_proj, self.down_proj, self.gate_up_proj_bias, self.down_proj_bias)
        return moe_mlp(x_TH, w_gate_up, w_down, topk_ids_TK, topk_weights_TK.to(x_TH.dtype),
                       activation=self.activation, backend=self.backend, b_gate_up=b_gate_up, b_down=b_down)

    def _gather_and_compute(self, x_RH, local_ids_R, *owned):
        mats = dict(zip(self.weight_names(), _SparseAllGather.apply(self, self.plan, x_RH.dtype, *owned)))
        return expert_mlp(x_RH, local_ids_R, mats["gate_up_proj"], mats["down_proj"], mats.get("gate_up_proj_bias"),
                          mats.get("down_proj_bias"), activation=self.activation, backend=self.backend)

    def _tables(self, plan: LayerPlan, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's tables for `plan`, on `device`: `replica_rings` (ring_BR, size_B) with one more
        bucket B = E for the rows not sent, whose one destination is rank W (past every real rank), and
        local_E[e] = expert e's position in the materialised list (-1 where it is not materialised here: no
        row of it arrives). Built once per plan (per step) and copied from pinned memory without blocking,
        so the forward's only host sync stays the split sizes' (a plain copy of a host tensor to the GPU
        waits for the stream: a second one)."""
        if self._tables_of is not plan:
            ring_ER, size_E = replica_rings(plan.replicas_E, self.rank, self.world_size, self.ranks_per_node)
            not_sent = torch.full((1, ring_ER.shape[1]), -1, dtype=torch.long)
            not_sent[0, 0] = self.world_size
            ring_BR, size_B = torch.cat([ring_ER, not_sent]), torch.cat([size_E, torch.ones(1, dtype=torch.long)])
            mat_ids = plan.materialised(self.rank)
            local_E = torch.full((self.num_experts,), -1, dtype=torch.long)
            local_E[mat_ids] = torch.arange(len(mat_ids))
            self._tables_of = plan
            self._plan_tables = tuple(to_device_async(t, device) for t in (ring_BR, size_B, local_E))
        return self._plan_tables

"""FSSDP runtime: applies FSSDP to a built model and drives it step by step.

    handle = fssdp_parallelize(model, policy="fssdp")    # after init_process_group; same model on all ranks
    for step ...:
        handle.begin_step()                 # plans for this step, from the predicted load
        loss = ...; loss.backward()         # SparseAllGather in forward, SparseReduceScatter in backward
        handle.reduce_gradients(); handle.clip_grad_norm_(1.0); optimizer.step()
        handle.end_step(optimizer)          # observe the load; re-shard every `reshard_every` steps

Gradient math as in `moesys.parallel.handle`: each rank's loss is the mean over its micro-batch,
dense gradients are averaged over ranks, and an owner's expert gradient (already the sum over every
source rank's tokens) is divided by the world size. Optimizer state exists only for owned experts.

Legend: L MoE layers, E experts per layer, W ranks.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from moesys.parallel.comm import CommContext, guarded
from moesys.parallel.data_parallel import sync_gradients
from moesys.parallel.fssdp import POLICIES, FSSDPExperts, LayerPlan
from moesys.parallel.fssdp_plan import (LoadPredictor, ShardingPlan, even_sharding, plan_materialization, plan_sharding,
                                       transfers)
from moesys.parallel.handle import clip_to_norm
from moesys.parallel.hf_experts import drops_zero_weight, moe_sites

__all__ = ["FSSDPHandle", "fssdp_parallelize"]


def _initial_owners(policy: str, L: int, E: int, W: int) -> ShardingPlan:
    if policy == "ep":
        return even_sharding(L, E, W)
    if policy == "fsdp":  # storage is sharded round-robin; every expert is materialised everywhere anyway
        return ShardingPlan(tuple(tuple(e % W for e in range(E)) for _ in range(L)), W)
    return plan_sharding(torch.ones(L, E), W)


def fssdp_parallelize(model: nn.Module, *, policy: str = "fssdp", group=None, rematerialize: bool = False,
                      reshard_every: int = 100, window: int = 5, gather_budget: int | str | None = None,
                      memory_cap: int | None = None, prefetch: bool = True, bandwidth_gbs: float = 100.0,
                      timeout_s: float = 600.0) -> "FSSDPHandle":
    """Swap every MoELayer's experts for `FSSDPExperts` in place; returns the step handle.

    gather_budget: experts a rank may receive per layer and step: an int, None (all of them), or
    "auto": the attention time measured before the layer in the previous step (the minimum over
    ranks, so that all plan alike) x `bandwidth_gbs` / one expert's bytes.
    memory_cap: extra expert copies per rank and layer (default: unlimited).
    prefetch: start each layer's gather when the module holding the MoE layer (a transformer block)
    starts, so the transfer overlaps its attention."""
    if policy not in POLICIES:
        raise ValueError(f"fssdp_parallelize: policy={policy!r}; use one of {POLICIES}")
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    layers = moe_sites(model)  # MoELayers, and the MoE blocks of a transformers model
    if not layers:
        raise ValueError("fssdp_parallelize: the model has no MoELayer")
    E = layers[0][1].experts.num_experts
    if any(m.experts.num_experts != E for _, m in layers):
        raise ValueError("fssdp_parallelize: every MoE layer must have the same number of experts")
    if policy == "ep" and E % world:
        raise ValueError(f"policy='ep' needs world_size={world} to divide num_experts={E}")
    if policy == "fssdp" and (len(layers) * E) % world:
        raise ValueError(f"policy='fssdp' needs world_size={world} to divide layers x experts = {len(layers) * E}")
    owners = _initial_owners(policy, len(layers), E, world)
    timeout = timedelta(seconds=timeout_s)
    for l, (name, layer) in enumerate(layers):
        comm = CommContext(group, rank=rank, group_size=world, layer=name, timeout=timeout)
        layer.experts = FSSDPExperts(layer.experts, owners.owned(rank, l), group=group, rank=rank, world_size=world,
                                     layer_name=name, comm=comm, rematerialize=rematerialize,
                                     drop_zero_weight=drops_zero_weight(layer),
                                     ranks_per_node=_ranks_per_node(world))
    if gather_budget is not None and gather_budget != "auto" and not (isinstance(gather_budget, int) and gather_budget >= 0):
        raise ValueError(f"fssdp_parallelize: gather_budget={gather_budget!r}; use an int >= 0, None or 'auto'")
    if prefetch or gather_budget == "auto":
        for name, layer in layers:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            if parent is not model or len(layers) == 1:
                if prefetch:
                    hook = lambda module, args, experts=layer.experts: experts.block_started()
                else:
                    hook = lambda module, args, experts=layer.experts: setattr(experts, "_attn_marks", [experts._mark(), None])
                parent.register_forward_pre_hook(hook)
    return FSSDPHandle(model, [m.experts for _, m in layers], owners, policy=policy, group=group, rank=rank,
                       world_size=world, reshard_every=reshard_every, window=window,
                       gather_budget=E if gather_budget is None else gather_budget, bandwidth_gbs=bandwidth_gbs,
                       memory_cap=E if memory_cap is None else memory_cap, timeout=timeout)


def _ranks_per_node(world: int) -> int | None:
    """torchrun's LOCAL_WORLD_SIZE (the same on every node), if it says there are several nodes."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    return local if 0 < local < world and world % local == 0 else None


class FSSDPHandle:
    def __init__(self, model, experts: list[FSSDPExperts], owners: ShardingPlan, *, policy, group, rank, world_size,
                 reshard_every, window, gather_budget, memory_cap, timeout, bandwidth_gbs=100.0):
        self.model, self.experts, self.owners, self.policy = model, experts, owners, policy
        self.group, self.rank, self.world_size = group, rank, world_size
        self.reshard_every, self.gather_budget, self.memory_cap = reshard_every, gather_budget, memory_cap
        self.num_experts = experts[0].num_experts
        self.predictor = LoadPredictor(len(experts), self.num_experts, window)
        self.comm = CommContext(group, rank=rank, group_size=world_size, layer="(all layers)", timeout=timeout)
        self.step = 0
        self.reshards = 0
        self.bandwidth_gbs = bandwidth_gbs
        self.budgets_L = [0 if gather_budget == "auto" else gather_budget] * len(experts)  # "auto": none until measured

    @property
    def device(self) -> torch.device:
        """Where collective buffers live (NCCL needs the GPU): the experts' device, read when needed, since
        a model may be parallelized with its experts still on the meta device (hf_model sharded loading)."""
        return self.experts[0].gate_up_proj.device

    # -- parameters ----------------------------------------------------------------------------
    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.experts for p in m.parameters()]

    def dense_parameters(self) -> list[nn.Parameter]:
        ids = {id(p) for p in self.expert_parameters()}
        return [p for p in self.model.parameters() if id(p) not in ids and p.requires_grad]

    # -- per step ------------------------------------------------------------------------------
    def plans(self) -> list[LayerPlan]:
        predicted = self.predictor.predict()
        W, E = self.world_size, self.num_experts
        out = []
        for l in range(len(self.experts)):
            owner = self.owners.owner_LE[l]
            if self.policy == "ep" or W == 1:
                reps = tuple((o,) for o in owner)
            elif self.policy == "fsdp":
                reps = tuple(tuple(range(W)) for _ in range(E))
            else:
                reps = plan_materialization(predicted[l], owner, W, gather_budget=self.budgets_L[l],
                                            memory_cap=self.memory_cap)
            out.append(LayerPlan(owner, reps))
        return out

    def begin_step(self) -> list[LayerPlan]:
        plans = self.plans()
        for module, plan in zip(self.experts, plans):
            module.plan = plan
        return plans

    @torch.no_grad()
    def end_step(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Observe this step's global load; re-shard when due and the plan changed. Returns whether
        ownership moved. A collective: every rank calls it."""
        # Stacked on the device (NCCL reduces device tensors), read back once below.
        counts_LE = torch.stack([m.step_counts_E if m.step_counts_E is not None
                                 else torch.zeros(self.num_experts, dtype=torch.int64, device=self.device)
                                 for m in self.experts]).float()
        for m in self.experts:
            m.step_counts_E = None
        if self.world_size > 1:
            with guarded(self.comm, "load all-reduce"):
                dist.all_reduce(counts_LE, group=self.group)
        self.predictor.observe(counts_LE.cpu())
        if self.gather_budget == "auto":
            self._update_budgets()
        self.step += 1
        if self.policy != "fssdp" or self.reshard_every <= 0 or self.step % self.reshard_every:
            return False
        new = plan_sharding(self.predictor.predict(), self.world_size)
        if new == self.owners:
            return False
        self.reshard(new, optimizer)
        return True

    def _update_budgets(self) -> None:
        """Experts each layer's preceding attention can hide: min over ranks of the measured time
        x bandwidth / expert bytes (all ranks must plan with the same budget)."""
        secs = torch.tensor([m.attention_seconds() or 0.0 for m in self.experts], dtype=torch.float64,
                            device=self.device)
        if self.world_size > 1:
            with guarded(self.comm, "attention-time all-reduce"):
                dist.all_reduce(secs, op=dist.ReduceOp.MIN, group=self.group)
        self.budgets_L = [int(s * self.bandwidth_gbs * 1e9 // m.expert_bytes()) for s, m in zip(secs.tolist(), self.experts)]

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Finish the asynchronous SparseReduceScatter, then average as one process would."""
        self.reduce_expert_gradients()
        if self.world_size > 1:
            sync_gradients(self.dense_parameters(), self.group)

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        dense_sq = sum((p.grad.float().pow(2).sum() for p in self.dense_parameters() if p.grad is not None),
                       torch.zeros((), device=self.device))
        expert_sq = sum((p.grad.float().pow(2).sum() for p in self.expert_parameters() if p.grad is not None),
                        torch.zeros((), device=self.device))
        if self.world_size > 1:  # every expert is owned once: sum the squares over ranks
            with guarded(self.comm, "gradient-norm all-reduce"):
                dist.all_reduce(expert_sq, group=self.group)
        return (dense_sq + expert_sq).sqrt()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return clip_to_norm(self.dense_parameters() + self.expert_parameters(), self.grad_norm(), max_norm)

    # -- the trainer's and checkpoint code's view (the same names as ParallelHandle) ----------------
    @property
    def shards_experts(self) -> bool:
        return self.world_size > 1

    def expert_parameter_names(self) -> set[str]:
        ids = {id(p) for p in self.expert_parameters()}
        return {n for n, p in self.model.named_parameters() if id(p) in ids}

    def _owned_ids_by_name(self) -> dict[str, list[int]]:
        return {f"{m.layer_name}.experts.{n}": m.owned_ids for m in self.experts for n in m.weight_names()}

    def local_expert_ids(self, name: str) -> list[int] | None:
        """Global ids of the experts this rank holds for parameter `name` (None: not an expert tensor)."""
        return self._owned_ids_by_name().get(name)

    @torch.no_grad()
    def reduce_expert_gradients(self) -> None:
        for m in self.experts:
            m.finish_reduce_scatter()
        for p in self.expert_parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.div_(self.world_size)

    @torch.no_grad()
    def gather_expert_state(self, state: dict[str, torch.Tensor], param_name=lambda key: key) -> dict[str, torch.Tensor]:
        """Replace each owned-expert tensor [O, ...] in `state` (model or optimizer state, with
        `param_name(key)` the parameter's name) by the full [E, ...] tensor in global-id order on every
        rank. A collective: every rank calls it with the same keys."""
        owned = self._owned_ids_by_name()
        out = dict(state)
        for key in sorted(k for k, v in state.items() if param_name(k) in owned and v.dim() > 0):
            t = state[key].detach()
            full = torch.zeros((self.num_experts,) + tuple(t.shape[1:]), dtype=torch.float32, device=t.device)
            full[owned[param_name(key)]] = t.float()
            if self.world_size > 1:
                with guarded(self.comm, f"gather of {key}"):
                    dist.all_reduce(full, group=self.group)
            out[key] = full.to(t.dtype)
        return out

    def local_expert_state(self, state: dict[str, torch.Tensor], param_name=lambda key: key) -> dict[str, torch.Tensor]:
        """The inverse of `gather_expert_state`, without communication: this rank's owned rows."""
        owned = self._owned_ids_by_name()
        return {k: (v[owned[param_name(k)]] if param_name(k) in owned and v.dim() > 0 else v) for k, v in state.items()}

    # -- state by global expert id ---------------------------------------------------------------
    @torch.no_grad()
    def full_expert_state(self) -> dict[str, torch.Tensor]:
        """{f"{layer}.experts.{name}": [E, ...]} with every expert in global-id order, on every rank
        (a collective: owners fill their rows, the sum over ranks completes the tensor)."""
        out = {}
        for m in self.experts:
            for name in m.weight_names():
                w = getattr(m, name)
                full = torch.zeros((self.num_experts,) + tuple(w.shape[1:]), dtype=torch.float32, device=w.device)
                full[m.owned_ids] = w.detach().float()
                if self.world_size > 1:
                    with guarded(self.comm, f"gather of {m.layer_name}.{name}"):
                        dist.all_reduce(full, group=self.group)
                out[f"{m.layer_name}.experts.{name}"] = full.to(w.dtype)
        return out

    @torch.no_grad()
    def load_full_expert_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `full_expert_state`, without communication: keep the rows this rank owns."""
        for m in self.experts:
            for name in m.weight_names():
                key = f"{m.layer_name}.experts.{name}"
                if key not in state:
                    raise KeyError(f"load_full_expert_state: {key} missing")
                getattr(m, name).copy_(state[key][m.owned_ids])

    # -- the schedule's state, for exact resumes ---------------------------------------------------------
    def state_dict(self) -> dict:
        """Ownership, load history, step count and gather budgets (JSON-able). Without them a resumed
        run would re-shard at other steps and sum expert gradients on other ranks, in another order."""
        return {"policy": self.policy, "world_size": self.world_size, "step": self.step, "reshards": self.reshards,
                "owner_LE": [list(row) for row in self.owners.owner_LE], "budgets_L": list(self.budgets_L),
                "history": [h.tolist() for h in self.predictor.history]}

    def load_state_dict(self, state: dict, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Restore `state_dict()`: call before the weights are loaded (taking the saved owners moves
        the current, soon overwritten, weights). Returns False and changes nothing when the state is
        from another policy or world size (the run then re-plans from scratch)."""
        if state.get("policy") != self.policy or state.get("world_size") != self.world_size:
            return False
        owners = ShardingPlan(tuple(tuple(int(r) for r in row) for row in state["owner_LE"]), self.world_size)
        if owners != self.owners:
            self.reshard(owners, optimizer)
        self.step, self.reshards = int(state["step"]), int(state["reshards"])
        self.budgets_L = [int(b) for b in state["budgets_L"]]
        self.predictor.history.clear()
        for h in state["history"]:
            self.predictor.observe(torch.tensor(h, dtype=torch.float64))
        return True

    # -- re-sharding ---------------------------------------------------------------------------------
    @torch.no_grad()
    def reshard(self, new: ShardingPlan, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Move master weights (and their optimizer state) of experts whose owner changes; the
        optimizer's parameter list is updated in place to the new Parameter objects."""
        has_state = self._optimizer_has_state(optimizer)
        for l, m in enumerate(self.experts):
            old_owner, new_owner = self.owners.owner_LE[l], new.owner_LE[l]
            new_ids = new.owned(self.rank, l)
            for name in m.weight_names():
                old_p = getattr(m, name)
                state = optimizer.state.get(old_p, {}) if optimizer is not None and has_state else {}
                keys = sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == old_p.shape)
                tensors = [old_p.data] + [state[k] for k in keys]
                new_tensors = [t.new_empty((len(new_ids),) + tuple(t.shape[1:])) for t in tensors]
                for e in set(m.owned_ids) & set(new_ids):  # staying on this rank
                    i, j = m.owned_ids.index(e), new_ids.index(e)
                    for t, n in zip(tensors, new_tensors):
                        n[j] = t[i]
                ops = []
                for e, peer, send in transfers(old_owner, [(d,) for d in new_owner], self.rank):
                    if send:
                        i = m.owned_ids.index(e)
                        ops += [dist.P2POp(dist.isend, t[i].contiguous(), peer, group=self.group) for t in tensors]
                    else:
                        j = new_ids.index(e)
                        ops += [dist.P2POp(dist.irecv, n[j], peer, group=self.group) for n in new_tensors]
                if ops:
                    with guarded(self.comm, f"re-shard of {m.layer_name}.{name}"):
                        for work in dist.batch_isend_irecv(ops):
                            work.wait()
                new_p = nn.Parameter(new_tensors[0], requires_grad=old_p.requires_grad)
                setattr(m, name, new_p)
                if optimizer is not None:
                    _swap_param(optimizer, old_p, new_p, dict(zip(keys, new_tensors[1:])))
            m.owned_ids = new_ids
        self.owners = new
        self.reshards += 1
        # The layers' current plans name the old owners; a forward before the next begin_step (the
        # trainer's validation right after this step) would gather from ranks that no longer hold
        # the experts. Re-plan from the same predicted load: the next begin_step computes the same.
        self.begin_step()

    def _optimizer_has_state(self, optimizer) -> bool:
        """Whether every rank's optimizer has stepped (state exists): both ends of a move must agree."""
        local = float(optimizer is not None and len(optimizer.state) > 0)
        flag = torch.tensor([local], device=self.device)
        if self.world_size > 1:
            with guarded(self.comm, "optimizer-state agreement"):
                dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())


def _swap_param(optimizer, old_p, new_p, moved_state: dict) -> None:
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old_p:
                group["params"][i] = new_p
    old_state = optimizer.state.pop(old_p, {})
    if moved_state:  # nothing moved (some rank had no state): the old rows' state goes with them
        new_state = {k: v for k, v in old_state.items() if not (torch.is_tensor(v) and v.shape == old_p.shape)}
        new_state.update(moved_state)
        optimizer.state[new_p] = new_state

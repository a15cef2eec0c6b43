"""FSSDP planning (Hecate, arXiv 2502.02581): pure, deterministic functions, no collectives.

Every rank calls these with the same all-gathered inputs and so computes the same plans; the
executor then issues the same collectives in the same order on every rank.

- `plan_sharding`: which rank *owns* each expert (fp32 master weights + optimizer state). Every rank
  holds the same number of expert slots summed over all layers, but may own 0..E experts of one layer.
  Cold experts go first, each to the least-loaded rank with a free slot (they will not be replicated,
  so their owner is where their compute happens); hot experts fill the remaining slots (they will be
  replicated by materialisation, so where they live matters little).
- `plan_materialization`: per step and layer, which ranks hold a copy (replica) of each expert. The
  hottest experts are replicated on every rank while the per-rank gather budget (what the preceding
  attention can hide) and the memory cap allow; the rest get replicas in proportion to their load.
- `split_over_replicas` / `route_to_replicas`: each rank's tokens for an expert go to its local
  replica if it has one, else are split evenly over the replicas (those on the same node first);
  `replica_rings` + `destinations` compute the same split per row on the device, without a host sync.
- `LoadPredictor`: per-expert load predicted as the mean of the last `window` steps' global counts.
- `transfers`: the point-to-point messages that move expert rows from one rank set to another, in the
  one order both ends post them (the gather, the gradients' way back and a re-shard all use it).

Legend: L MoE layers, E experts per layer, W ranks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardingPlan:
    owner_LE: tuple[tuple[int, ...], ...]    # owner rank of expert e of MoE layer l
    world_size: int

    def owned(self, rank: int, layer: int) -> list[int]:
        return [e for e, r in enumerate(self.owner_LE[layer]) if r == rank]

    def slots(self, rank: int) -> int:
        return sum(row.count(rank) for row in self.owner_LE)


def even_sharding(num_layers: int, num_experts: int, world_size: int) -> ShardingPlan:
    """Plain EP's placement: expert e of every layer at rank e // (E / W) (needs W | E)."""
    if num_experts % world_size:
        raise ValueError(f"even sharding needs world_size={world_size} to divide num_experts={num_experts}")
    per = num_experts // world_size
    return ShardingPlan(tuple(tuple(e // per for e in range(num_experts)) for _ in range(num_layers)), world_size)


def plan_sharding(load_LE: torch.Tensor, world_size: int, hot_fraction: float = 0.25) -> ShardingPlan:
    """Owners for every (layer, expert) from predicted loads; see the module docstring."""
    L, E = load_LE.shape
    total = L * E
    if total % world_size:
        raise ValueError(f"FSSDP needs the {total} experts (layers x experts) to split evenly over "
                         f"world_size={world_size} ranks; choose a world size that divides {total}")
    slots_per_rank = total // world_size
    load = load_LE.double().flatten().tolist()
    # Cold first; ties broken by (layer, expert) so every rank sorts identically.
    order = sorted(range(total), key=lambda i: (load[i], i))
    num_hot = int(round(hot_fraction * total))
    cold, hot = order[: total - num_hot], order[total - num_hot:]
    owner = [-1] * total
    rank_load = [0.0] * world_size
    rank_slots = [0] * world_size
    for i in reversed(cold):  # hottest of the cold first: greedy balance works best big-to-small
        r = min((r for r in range(world_size) if rank_slots[r] < slots_per_rank), key=lambda r: (rank_load[r], r))
        owner[i] = r
        rank_load[r] += load[i]
        rank_slots[r] += 1
    for i in hot:
        r = max(range(world_size), key=lambda r: (slots_per_rank - rank_slots[r], -rank_load[r], -r))
        owner[i] = r
        rank_load[r] += load[i]
        rank_slots[r] += 1
    return ShardingPlan(tuple(tuple(owner[l * E:(l + 1) * E]) for l in range(L)), world_size)


def plan_materialization(load_E: torch.Tensor, owner_E: tuple[int, ...], world_size: int, *,
                         gather_budget: int, memory_cap: int) -> tuple[tuple[int, ...], ...]:
    """Replica ranks (sorted, owner included) of each expert for one layer and step.

    gather_budget: experts a rank may receive this layer without slowing the step (attention time x
    bandwidth / expert bytes); memory_cap: extra expert copies a rank may hold. Each rank receives at
    most min(gather_budget, memory_cap) experts it does not own."""
    E = load_E.numel()
    cap = max(0, min(gather_budget, memory_cap))
    load = load_E.double().tolist()
    replicas = [{owner_E[e]} for e in range(E)]
    received = [0] * world_size
    rank_work = [0.0] * world_size  # predicted tokens each rank computes, assuming even splits
    for e in range(E):
        rank_work[owner_E[e]] += load[e]
    total = sum(load)
    if total <= 0 or cap == 0 or world_size == 1:
        return tuple(tuple(sorted(r)) for r in replicas)
    order = sorted(range(E), key=lambda e: (-load[e], e))

    def add(e: int, ranks: list[int]) -> None:
        # Keep rank_work as the predicted tokens per rank when e's load splits evenly over its replicas.
        old_n, new_n = len(replicas[e]), len(replicas[e]) + len(ranks)
        for q in replicas[e]:
            rank_work[q] += load[e] / new_n - load[e] / old_n
        for r in ranks:
            replicas[e].add(r)
            rank_work[r] += load[e] / new_n
            received[r] += 1

    ideal = total / world_size
    for e in order:  # experts with at least a rank's fair share: everywhere the budget allows
        if load[e] >= ideal:
            add(e, [r for r in range(world_size) if r not in replicas[e] and received[r] < cap])
    # Then replicas where they pay: split the busiest rank's largest share onto the least busy rank
    # that may still receive, while that lowers the busiest rank's work.
    hosted = [set() for _ in range(world_size)]
    for e in range(E):
        for r in replicas[e]:
            hosted[r].add(e)
    for _ in range(cap * world_size):
        busiest = max(range(world_size), key=lambda r: (rank_work[r], -r))
        movable = [e for e in hosted[busiest] if load[e] > 0 and len(replicas[e]) < world_size]
        if not movable:
            break
        e = max(movable, key=lambda e: (load[e] / len(replicas[e]), -e))
        targets = [r for r in range(world_size) if r not in replicas[e] and received[r] < cap]
        if not targets:
            break
        r = min(targets, key=lambda r: (rank_work[r], r))
        if rank_work[r] + load[e] / (len(replicas[e]) + 1) >= rank_work[busiest]:
            break
        add(e, [r])
        hosted[r].add(e)
    return tuple(tuple(sorted(r)) for r in replicas)


def split_over_replicas(n: int, source: int, replicas: tuple[int, ...], world_size: int,
                        ranks_per_node: int | None = None) -> list[tuple[int, int]]:
    """[(destination rank, rows)] for `n` rows of one expert on rank `source`: all to the local
    replica if there is one; else an even split over the replicas on the source's node if any
    (topology-aware: intra-node links are the fast ones), else over all replicas; remainders go to
    the replicas after the source in ring order, so they spread over ranks."""
    if source in replicas:
        return [(source, n)]
    reps = replicas
    if ranks_per_node:
        same_node = tuple(d for d in replicas if d // ranks_per_node == source // ranks_per_node)
        reps = same_node or replicas
    base, rem = divmod(n, len(reps))
    ring = sorted(reps, key=lambda d: (d - source) % world_size)
    return [(d, base + (1 if i < rem else 0)) for i, d in enumerate(ring)]


def replica_rings(replicas_E, source: int, world_size: int,
                  ranks_per_node: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The destinations of `split_over_replicas` as tables, for `destinations` to use on the device:
    ring_ER[e, i] = the i-th rank that `source`'s rows of expert e go to (-1 padded), size_E[e] = how many."""
    rings = [[d for d, _ in split_over_replicas(len(reps), source, reps, world_size, ranks_per_node)]
             for reps in replicas_E]
    ring_ER = torch.full((len(rings), max(map(len, rings), default=1)), -1, dtype=torch.long)
    for e, ring in enumerate(rings):
        ring_ER[e, :len(ring)] = torch.tensor(ring, dtype=torch.long)
    return ring_ER, torch.tensor([len(r) for r in rings], dtype=torch.long)


def destinations(ids_N: torch.Tensor, counts_E: torch.Tensor, ring_ER: torch.Tensor,
                 size_E: torch.Tensor) -> torch.Tensor:
    """Destination rank of each row, rows grouped by expert (`ids_N` sorted), computed where the rows are
    (no host sync): expert e's n rows are split into size_E[e] consecutive chunks, the first n % size
    of them one row longer, in `replica_rings` order; exactly `split_over_replicas`."""
    N = ids_N.numel()
    start_E = torch.cumsum(counts_E, 0) - counts_E
    j_N = torch.arange(N, device=ids_N.device) - start_E[ids_N]    # position within its expert's rows
    n_N, r_N = counts_E[ids_N], size_E[ids_N]
    base_N, rem_N = n_N // r_N, n_N % r_N
    cut_N = rem_N * (base_N + 1)                                     # rows in the longer chunks
    chunk_N = torch.where(j_N < cut_N, j_N // (base_N + 1), rem_N + (j_N - cut_N) // base_N.clamp_min(1))
    return ring_ER[ids_N, chunk_N]


def route_to_replicas(counts_WE: torch.Tensor, replicas: tuple[tuple[int, ...], ...],
                      ranks_per_node: int | None = None) -> torch.Tensor:
    """tokens_WWE[s, d, e]: tokens source rank s sends to replica rank d of expert e
    (`split_over_replicas` for every source and expert)."""
    W, E = counts_WE.shape
    out = torch.zeros(W, W, E, dtype=torch.int64)
    for e in range(E):
        for s in range(W):
            for d, c in split_over_replicas(int(counts_WE[s, e]), s, replicas[e], W, ranks_per_node):
                out[s, d, e] = c
    return out


def transfers(src_E, dsts_E, rank: int, reverse: bool = False) -> list[tuple[int, int, bool]]:
    """This rank's messages for copying expert e's rows from rank `src_E[e]` to every other rank in
    `dsts_E[e]`, as [(expert, peer, is_send)], ordered by expert id and then peer rank. Both ends of a
    pair derive their lists from the same plan through this function, so the k-th message one posts to
    a peer is the k-th the peer posts back (batch_isend_irecv pairs messages in posting order).
    `reverse=True` runs every message the other way: the replicas' gradients back to the owner."""
    out = []
    for e, (src, dsts) in enumerate(zip(src_E, dsts_E)):
        for peer in sorted(d for d in dsts if d != src):
            if rank == src:
                out.append((e, peer, not reverse))
            elif rank == peer:
                out.append((e, src, reverse))
    return out


class LoadPredictor:
    """Predicted per-expert load = mean of the last `window` steps' global counts (all ranks agree
    because they feed it the same all-gathered counts)."""

    def __init__(self, num_layers: int, num_experts: int, window: int = 5):
        self.window = window
        self.history: deque[torch.Tensor] = deque(maxlen=window)
        self.shape = (num_layers, num_experts)

    def observe(self, counts_LE: torch.Tensor) -> None:
        if tuple(counts_LE.shape) != self.shape:
            raise ValueError(f"LoadPredictor: counts of shape {tuple(counts_LE.shape)}, expected {self.shape}")
        self.history.append(counts_LE.detach().double().cpu())

    def predict(self) -> torch.Tensor:
        if not self.history:
            return torch.ones(self.shape, dtype=torch.float64)  # no data yet: assume balanced
        return torch.stack(list(self.history)).mean(0)

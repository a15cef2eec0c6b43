"""The expert cache's bookkeeping kept on the device, for decode steps without the host.

The host path (moesys.offload.engine) reads each layer's routing back to decide hits, victims and copies:
one sync per layer, and nothing a CUDA graph can replay. Here the same decisions are tensor ops: a lookup
in the expert -> slot table, victims as the K lowest-scored slots of the layer's bank (LRU: last use; LFU:
use count, then last use; next-visit: layers back from the current one, then last use; free slots first),
the tables updated with scatters, and the copies issued by moesys.offload.slot_copy from indices on the
device. Every shape is fixed by the step's N = rows x K ids,
so a decode step's layers can be captured once and replayed for every token. A batch's rows share
experts: each distinct expert is looked up, installed and copied once (its first occurrence), and every
occurrence gets its slot.

Victims: LRU or LFU (the batch-1 decode graph's measured default), or next-visit, the host path's policy
(cache.py): a batch step needs nearly every expert of every layer, which LRU and LFU evict before the next
step returns to them. A batch step may also prefetch: the next layer's guessed experts installed by a step
of their own (`prefetch=True`, this layer's slots protected) whose copies the engine issues on its copy
stream while this layer computes.

On CUDA each step is one launch: `_step_kernel` for one token's distinct ids, `_batch_step_kernel` for a
batch's ids or a prefetch (an eager batch step runs two a layer, and the reference's ~60 small launches a call
were most of its host time); `_step_reference` is the readable version both are tested against, and the CPU's.

Masked scatters go to one extra "trash" entry at the end of each table instead of being skipped (that
would need a data-dependent shape). The host and device bookkeeping hand over in both directions
(`load_from_host`, `store_to_host`) so prefill keeps the host path and its prefetch.

Legend: L MoE layers, E experts per layer, S slots, B slots in a bank, K experts per token, N ids of a step.
"""

from __future__ import annotations

import torch

from moesys.offload.cache import ExpertCache, _LRU

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

_STAMP_BITS = 40  # LFU score = count << 40 | last use: counts first, then recency (ticks < 2**30 at E <= 1024);
# next-visit: layers back << 40 | last use
DEVICE_POLICIES = ("lru", "lfu", "next-visit")


def sort_lanes(n: int) -> int:
    """Lanes of a kernel that tl.sorts n values: a power of two, at least 16 (this module's batch step, the
    prefetch's vote)."""
    return max(16, triton.next_power_of_2(n))


class DeviceCacheTables:
    def __init__(self, cache: ExpertCache, policy: str):
        if policy not in DEVICE_POLICIES:
            raise ValueError(f"device cache policy={policy!r} is unknown; use one of {list(DEVICE_POLICIES)}")
        L, E, S = len(cache.row), cache.num_experts, cache.num_slots
        dev = cache.device
        self.cache, self.policy, self.lfu = cache, policy, policy == "lfu"
        self.trash_key = L * E
        self.table = cache.table_flat                     # [L*E + 1] bank-local slot, -1 = not resident
        self.owner_S = torch.full((S + 1,), self.trash_key, dtype=torch.int64, device=dev)  # slot -> key
        # last use; a free slot s holds s - S - 1 < 0: free slots go first, lowest first (as the host's free
        # list hands them out), and no two slots tie
        self.stamp_S = torch.arange(S + 1, dtype=torch.int64, device=dev) - (S + 1)
        self.count_K = torch.zeros(L * E + 1, dtype=torch.int64, device=dev)    # LFU use counts per key
        self.count_K[-1] = -1  # the owner of a free slot: scored below every resident expert
        self.tick = torch.zeros((), dtype=torch.int64, device=dev)
        # statistics (lookups, misses, evictions, prefetch copies), folded into OffloadStats by the engine when
        # it reads them
        self.counters = torch.zeros(4, dtype=torch.int64, device=dev)
        # the batch step kernel's working memory, sized for the largest bank once: a CUDA graph replays its address,
        # so it is never reallocated (a graph captured before a larger bank's step would write freed memory)
        self._scratch = None if triton is None else torch.empty(
            triton.next_power_of_2(E) + 3 * sort_lanes(max(end - start for start, end in cache.banks)),
            dtype=torch.int64, device=dev)

    # ---------------------------------------------------------------- one layer, one token
    def step(self, row: int, ids_N: torch.Tensor, use_kernel: bool | None = None, distinct: bool = True,
             next_visit_from: int | None = None, protect_N: torch.Tensor | None = None, prefetch: bool = False):
        """Make the experts `ids_N` of MoE layer `row` resident: one token's K distinct ids, or (distinct=
        False) a batch's rows x K, where rows share experts. Returns (bank-local slots [N], src [N]: the
        store row (row * E + expert) of each missed expert's first occurrence, -1 elsewhere, dst [N]:
        global slots); the caller copies rows src into slots dst before computing. The bank must hold
        min(N, E) slots (checked by the engine). use_kernel: None = a fused Triton kernel for CUDA tables,
        the torch reference otherwise. One token's distinct ids take `_step_kernel` (one launch instead of ~35
        small ones: batch-1 decode replays this per layer and token); a batch's or a prefetch's take
        `_batch_step_kernel` (one launch instead of the reference's ~60: an eager batch step runs two per
        layer, and their launches were most of its host time).

        Victims: the table's policy (LRU, LFU), or next-visit (cache.py) counted from MoE layer row
        `next_visit_from` (the policy "next-visit" counts from `row`): free slots, then that layer's
        experts, then the layer before it, ..., least recently used first within a layer.
        A prefetch (the next layer's guessed experts, copied while this layer computes): `protect_N`
        (bank-local slots, this layer's) are never victims, and the step counts its copies as prefetch
        copies, not as lookups or misses."""
        cache = self.cache
        start, end = cache.banks[cache.bank_of[cache.layers[row]]]
        if next_visit_from is None and self.policy == "next-visit":
            next_visit_from = row
        if use_kernel is None:
            use_kernel = self.table.is_cuda and triton is not None
        if not use_kernel:
            return self._step_reference(row, ids_N, start, end, next_visit_from, protect_N, prefetch)
        if distinct and protect_N is None:
            return self._step_kernel(row, ids_N, start, end, next_visit_from, prefetch)
        return self._batch_step_kernel(row, ids_N, start, end, next_visit_from, protect_N, prefetch)

    def _step_kernel(self, row, ids_K, start, end, next_visit_from, prefetch):
        K = ids_K.numel()
        out_3K = torch.empty(3, K, dtype=torch.int64, device=ids_K.device)
        _step_kernel[(1,)](ids_K, self.table, self.owner_S, self.stamp_S, self.count_K, self.tick,
                           self.counters, out_3K, row * self.cache.num_experts, self.cache.num_experts, start,
                           end - start, K, self.trash_key, -1 if next_visit_from is None else next_visit_from,
                           len(self.cache.row), LFU=self.lfu, NEXT_VISIT=next_visit_from is not None,
                           PREFETCH=prefetch, BLOCK_B=triton.next_power_of_2(end - start),
                           BLOCK_K=triton.next_power_of_2(K))
        return out_3K[0], out_3K[1], out_3K[2]

    def _batch_step_kernel(self, row, ids_N, start, end, next_visit_from, protect_N, prefetch):
        N, E, B = ids_N.numel(), self.cache.num_experts, end - start
        block_e, block_b = triton.next_power_of_2(E), sort_lanes(B)
        out_3N = torch.empty(3, N, dtype=torch.int64, device=ids_N.device)
        protect = protect_N if protect_N is not None else ids_N  # (P = 0: never read)
        _batch_step_kernel[(1,)](
            ids_N, N, protect, 0 if protect_N is None else protect_N.numel(), self.table, self.owner_S, self.stamp_S,
            self.count_K, self.tick, self.counters, out_3N, self._scratch, row * E, E, start, B, self.trash_key,
            -1 if next_visit_from is None else next_visit_from, len(self.cache.row), LFU=self.lfu,
            NEXT_VISIT=next_visit_from is not None, PREFETCH=prefetch, BLOCK_E=block_e, BLOCK_B=block_b,
            LOG_B=block_b.bit_length() - 1, CHUNK=32, num_warps=8)
        return out_3N[0], out_3N[1], out_3N[2]

    def _next_visit_distance(self, owner_B: torch.Tensor, origin: int) -> torch.Tensor:
        """How many layers back from `origin` each slot's owner layer is (cache.py's next-visit order: 0 is
        `origin` itself, whose next visit is a whole step away); 0 for a free slot (its negative stamp
        sends it first)."""
        L = len(self.cache.row)
        d_B = torch.remainder(origin - torch.div(owner_B, self.cache.num_experts, rounding_mode="floor"), L)
        return torch.where(owner_B == self.trash_key, 0, d_B)

    def _step_reference(self, row, ids_N, start, end, next_visit_from=None, protect_N=None, prefetch=False):
        cache = self.cache
        B, N = end - start, ids_N.numel()
        key_N = ids_N.to(torch.int64) + row * cache.num_experts
        # an expert's first occurrence stands for all of them (a batch's rows share experts): only it is
        # counted, installed and copied
        order_N = torch.sort(key_N, stable=True).indices
        sorted_N = key_N[order_N]
        first_sorted_N = torch.ones_like(sorted_N, dtype=torch.bool)
        first_sorted_N[1:] = sorted_N[1:] != sorted_N[:-1]
        first_N = torch.empty_like(first_sorted_N).scatter_(0, order_N, first_sorted_N)
        slot_N = self.table[key_N]
        miss_N = (slot_N < 0) & first_N
        self.tick += 1
        score_B = self.stamp_S[start:end]
        if next_visit_from is not None:
            score_B = (self._next_visit_distance(self.owner_S[start:end], next_visit_from) << _STAMP_BITS) + score_B
        elif self.lfu:
            score_B = (self.count_K[self.owner_S[start:end]] << _STAMP_BITS) + score_B
        # this step's hits are not victims: give them the top score (misses write the trash entry B)
        score_B1 = torch.cat((score_B, score_B.new_zeros(1)))
        score_B1.scatter_(0, torch.where(slot_N < 0, B, slot_N), torch.iinfo(torch.int64).max)
        if protect_N is not None:
            score_B1.scatter_(0, protect_N, torch.iinfo(torch.int64).max)
        # misses <= distinct ids <= min(N, E) <= B: the engine checks the bank
        victims_N = torch.topk(score_B1[:B], min(N, B), largest=False).indices
        rank_N = (torch.cumsum(miss_N, 0) - 1).clamp(min=0)
        miss_slot_N = victims_N[rank_N.clamp(max=victims_N.numel() - 1)]
        gmiss_N = miss_slot_N + start
        old_N = self.owner_S[gmiss_N]
        trash_key, trash_slot = self.trash_key, self.owner_S.numel() - 1
        # (the trash entries are reset with fill_: item assignment copies a host scalar, which graph
        # capture refuses)
        self.table.scatter_(0, torch.where(miss_N, old_N, trash_key), -1)            # evict
        self.table.scatter_(0, torch.where(miss_N, key_N, trash_key), miss_slot_N)   # install
        self.table[trash_key:].fill_(-1)
        self.owner_S.scatter_(0, torch.where(miss_N, gmiss_N, trash_slot), key_N)
        self.owner_S[trash_slot:].fill_(trash_key)
        slot_N = self.table[key_N]  # every occurrence: a repeated expert's slot is its first occurrence's
        gslot_N = slot_N + start
        # last use = tick * E + expert: within a step the host path touches experts in ascending id order,
        # so ties break as they do there and both paths evict the same experts (repeats write the same value)
        self.stamp_S.scatter_(0, gslot_N, self.tick * cache.num_experts + ids_N.to(torch.int64))
        if self.lfu:
            self.count_K.scatter_add_(0, key_N, first_N.to(torch.int64))
        misses, evictions = miss_N.sum(), (miss_N & (old_N != trash_key)).sum()
        zero = torch.zeros_like(misses)
        self.counters += (torch.stack((zero, zero, evictions, misses)) if prefetch
                          else torch.stack((first_N.sum(), misses, evictions, zero)))
        return slot_N, torch.where(miss_N, key_N, -1), gslot_N

    # ---------------------------------------------------------------- hand-over with the host path
    def load_from_host(self) -> None:
        """Mirror the host bookkeeping (slot_of, the policies' order and counts) onto the device tables.
        The expert -> slot table is rebuilt too: the host path leaves evicted experts' entries stale (it
        reads only the entries of experts it has just made resident)."""
        cache, E = self.cache, self.cache.num_experts
        S = cache.num_slots
        table = [-1] * (self.trash_key + 1)
        for (layer, e), slot in cache.slot_of.items():
            table[cache.row[layer] * E + e] = slot - cache.banks[cache.bank_of[layer]][0]
        owner = [self.trash_key] * (S + 1)
        stamp = [s - S - 1 for s in range(S + 1)]
        count = [0] * (self.trash_key + 1)
        count[-1] = -1
        tick = 0
        for bank, policy in enumerate(cache.policies):
            # LRU and next-visit keep every resident expert by recency; LFU and next-visit all-time counts
            order = list(policy.order) if isinstance(policy, _LRU) else sorted(policy.resident,
                                                                                 key=lambda k: policy.stamp[k])
            for key, n in getattr(policy, "count", {}).items():
                count[cache.row[key[0]] * E + key[1]] = n
            for i, key in enumerate(order, start=1):
                slot = cache.slot_of[key]
                owner[slot] = cache.row[key[0]] * E + key[1]
                stamp[slot] = i
            tick = max(tick, len(order))
        for t, values in ((self.table, table), (self.owner_S, owner), (self.stamp_S, stamp),
                          (self.count_K, count)):
            t.copy_(torch.tensor(values, dtype=torch.int64))
        self.tick.fill_(tick)

    def store_to_host(self) -> None:
        """Rebuild the host bookkeeping from the device tables (one read back): which expert is in which
        slot, the free slots, and each bank's policy in the device's order."""
        cache, E = self.cache, self.cache.num_experts
        owner, stamp, count = (t.tolist() for t in (self.owner_S[:-1], self.stamp_S[:-1], self.count_K))
        cache.slot_of.clear()
        for layer in cache.resident_per_layer:
            cache.resident_per_layer[layer] = 0
        cache.free = []
        cache.policies = [cache.new_policy() for _ in cache.banks]  # the host's own policy again
        for bank, (start, end) in enumerate(cache.banks):
            used = sorted((stamp[s], s) for s in range(start, end) if owner[s] != self.trash_key)
            cache.free.append([s for s in range(end - 1, start - 1, -1) if owner[s] == self.trash_key])
            policy = cache.policies[bank]
            for i, (_, s) in enumerate(used, start=1):
                key = (cache.layers[owner[s] // E], owner[s] % E)
                cache.slot_of[key] = s
                cache.resident_per_layer[key[0]] += 1
                if hasattr(policy, "count"):  # counts as the device kept them, recency as its order
                    policy.count[key] = count[owner[s]] - 1
                    policy.tick = i - 1
                policy.touch(key)
            if hasattr(policy, "count"):
                for k in range(self.trash_key):
                    key = (cache.layers[k // E], k % E)
                    if count[k] and key not in policy.count and cache.bank_of[key[0]] == bank:
                        policy.count[key] = count[k]  # evicted experts keep their all-time count
        cache.ready = [None] * cache.num_slots


if triton is not None:
    @triton.jit
    def _victim_score(stamp_ptr, owner_ptr, count_ptr, start, bb, b_ok, E, L, origin, trash_key,
                      LFU: tl.constexpr, NEXT_VISIT: tl.constexpr):
        """The bank slots' victim scores (lowest goes first), as `_step_reference` builds them."""
        score = tl.load(stamp_ptr + start + bb, mask=b_ok, other=0)
        if NEXT_VISIT:
            owner_b = tl.load(owner_ptr + start + bb, mask=b_ok, other=trash_key)
            d = (origin - owner_b // E) % L
            d = tl.where(d < 0, d + L, d)  # the sign of % follows the dividend, as in C
            score += tl.where(owner_b == trash_key, 0, d).to(tl.int64) << 40
        elif LFU:
            owner_b = tl.load(owner_ptr + start + bb, mask=b_ok, other=trash_key)
            score += tl.load(count_ptr + owner_b, mask=b_ok, other=0) << 40
        return score

    @triton.jit
    def _step_kernel(ids_ptr, table_ptr, owner_ptr, stamp_ptr, count_ptr, tick_ptr, counters_ptr, out_ptr,
                     key_base, E, start, B, K, trash_key, origin, L, LFU: tl.constexpr, NEXT_VISIT: tl.constexpr,
                     PREFETCH: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
        """`_step_reference` in one program: the bank's B scores sit in registers, the K victims are the K
        successive minima (ties to the lowest slot), and masked stores replace the trash entries."""
        kk = tl.arange(0, BLOCK_K)
        k_ok = kk < K
        ids = tl.load(ids_ptr + kk, mask=k_ok, other=0).to(tl.int64)
        keys = key_base + ids
        slot = tl.load(table_ptr + keys, mask=k_ok, other=-1)
        miss = (slot < 0) & k_ok
        tick = tl.load(tick_ptr) + 1
        tl.store(tick_ptr, tick)
        if tl.sum(miss.to(tl.int32), axis=0) > 0:
            # the victim search (K serial reductions over the bank) only when something missed: a decode
            # step whose experts are all resident is most steps once the cache is warm
            bb = tl.arange(0, BLOCK_B)
            b_ok = bb < B
            score = _victim_score(stamp_ptr, owner_ptr, count_ptr, start, bb, b_ok, E, L, origin, trash_key, LFU,
                                  NEXT_VISIT)
            hit_slot = tl.where(miss | (kk >= K), -1, slot)
            is_hit = tl.sum((bb[:, None] == hit_slot[None, :]).to(tl.int32), axis=1) > 0
            big = 0x7FFFFFFFFFFFFFFF
            score = tl.where(is_hit | (bb >= B), big, score)
            victims = tl.zeros([BLOCK_K], dtype=tl.int64)
            for i in tl.static_range(BLOCK_K):
                v = tl.argmin(score, axis=0)
                victims = tl.where(kk == i, v.to(tl.int64), victims)
                score = tl.where(bb == v, big, score)
            rank = tl.cumsum(miss.to(tl.int32), axis=0) - 1
            chosen = tl.sum(tl.where(rank[:, None] == kk[None, :], victims[None, :], 0), axis=1)
            slot = tl.where(miss, chosen, slot)
        gslot = slot + start
        old = tl.load(owner_ptr + gslot, mask=miss, other=trash_key)
        tl.debug_barrier()  # every thread has read the old owners before any owner is overwritten
        evicted = miss & (old != trash_key)
        tl.store(table_ptr + old, tl.full([BLOCK_K], -1, tl.int64), mask=evicted)
        tl.store(table_ptr + keys, slot, mask=miss)
        tl.store(owner_ptr + gslot, keys, mask=miss)
        tl.store(stamp_ptr + gslot, tick * E + ids, mask=k_ok)
        if LFU:
            tl.store(count_ptr + keys, tl.load(count_ptr + keys, mask=k_ok, other=0) + 1, mask=k_ok)
        if PREFETCH:
            tl.store(counters_ptr + 3, tl.load(counters_ptr + 3) + tl.sum(miss.to(tl.int64), axis=0))
        else:
            tl.store(counters_ptr, tl.load(counters_ptr) + K)
            tl.store(counters_ptr + 1, tl.load(counters_ptr + 1) + tl.sum(miss.to(tl.int64), axis=0))
        tl.store(counters_ptr + 2, tl.load(counters_ptr + 2) + tl.sum(evicted.to(tl.int64), axis=0))
        tl.store(out_ptr + kk, slot, mask=k_ok)
        tl.store(out_ptr + K + kk, tl.where(miss, keys, -1), mask=k_ok)
        tl.store(out_ptr + 2 * K + kk, gslot, mask=k_ok)

    @triton.jit
    def _batch_step_kernel(ids_ptr, N, protect_ptr, P, table_ptr, owner_ptr, stamp_ptr, count_ptr, tick_ptr,
                           counters_ptr, out_ptr, scratch_ptr, key_base, E, start, B, trash_key, origin, L,
                           LFU: tl.constexpr, NEXT_VISIT: tl.constexpr, PREFETCH: tl.constexpr,
                           BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr, LOG_B: tl.constexpr,
                           CHUNK: tl.constexpr):
        """`_step_reference` for a batch's N ids (repeats) or a prefetch (`protect_ptr`'s P slots never victims)
        in one program. It works per expert of the layer (E lanes): an expert's first occurrence in the ids is
        the min over chunks of them, and it stands for all of them. Victims: each candidate slot's rank by
        score, the slot of rank r taking the r-th miss (misses in order of first occurrence), as torch.topk's
        ascending victims do for the reference (the scores of candidates are distinct: last-use stamps are).
        Scratch (global, one program: tl.debug_barrier makes a
        store visible to every thread): [0, BLOCK_E) the misses' first occurrences (N = not a miss), then
        BLOCK_B slot flags (hit or protected), the sorted scores, and the victim of each rank."""
        flags_ptr = scratch_ptr + BLOCK_E
        score_ptr = flags_ptr + BLOCK_B
        victim_ptr = score_ptr + BLOCK_B
        ee = tl.arange(0, BLOCK_E)
        e_ok = ee < E
        cc = tl.arange(0, CHUNK)
        first = tl.full([BLOCK_E], N, tl.int64)
        for n0 in range(0, N, CHUNK):
            ids_c = tl.load(ids_ptr + n0 + cc, mask=n0 + cc < N, other=-1).to(tl.int64)
            pos = tl.where(ids_c[None, :] == ee[:, None], (n0 + cc)[None, :].to(tl.int64), N)
            first = tl.minimum(first, tl.min(pos, axis=1))
        needed = (first < N) & e_ok
        keys = key_base + ee
        slot = tl.load(table_ptr + keys, mask=needed, other=-1)
        miss = needed & (slot < 0)
        misses = tl.sum(miss.to(tl.int64), axis=0)
        tick = tl.load(tick_ptr) + 1
        tl.store(tick_ptr, tick)
        miss_first = tl.where(miss, first, N)
        tl.store(scratch_ptr + ee, miss_first)
        bb = tl.arange(0, BLOCK_B)
        b_ok = bb < B
        tl.store(flags_ptr + bb, tl.zeros([BLOCK_B], tl.int64))
        tl.debug_barrier()
        if misses > 0:
            # the r-th miss in order of first occurrence: r = the misses first seen before it
            rank_e = tl.zeros([BLOCK_E], tl.int64)
            for c0 in range(0, BLOCK_E, CHUNK):
                other = tl.load(scratch_ptr + c0 + cc, mask=c0 + cc < BLOCK_E, other=N)
                rank_e += tl.sum((other[None, :] < miss_first[:, None]).to(tl.int64), axis=1)
            # this step's hits and the protected slots are never victims
            tl.store(flags_ptr + slot, tl.full([BLOCK_E], 1, tl.int64), mask=needed & ~miss)
            for p0 in range(0, P, CHUNK):
                prot = tl.load(protect_ptr + p0 + cc, mask=p0 + cc < P, other=0)
                tl.store(flags_ptr + prot, tl.full([CHUNK], 1, tl.int64), mask=p0 + cc < P)
            tl.debug_barrier()
            score = _victim_score(stamp_ptr, owner_ptr, count_ptr, start, bb, b_ok, E, L, origin, trash_key, LFU,
                                  NEXT_VISIT)
            taken = tl.load(flags_ptr + bb) != 0
            big = 0x7FFFFFFFFFFFFFFF
            score = tl.where(taken | ~b_ok, big, score)
            # each slot's rank = how many scores are below its own (candidates' scores are distinct): a lower
            # bound in the sorted scores, by a branchless binary search (pairwise counts over a bank of 1023 slots
            # spilled registers: 0.5 ms a call on an H100)
            tl.store(score_ptr + bb, tl.sort(score))
            tl.debug_barrier()
            # (each score is among the sorted ones, so the search needs no last check past its window of 1)
            rank_b = tl.zeros([BLOCK_B], tl.int32)
            for i in tl.static_range(LOG_B):
                probe = tl.load(score_ptr + rank_b + (BLOCK_B >> (i + 1)) - 1)
                rank_b = tl.where(probe < score, rank_b + (BLOCK_B >> (i + 1)), rank_b)
            tl.store(victim_ptr + rank_b, bb.to(tl.int64), mask=rank_b < misses)
            tl.debug_barrier()
            slot = tl.where(miss, tl.load(victim_ptr + rank_e, mask=miss, other=0), slot)
        gslot = slot + start
        old = tl.load(owner_ptr + gslot, mask=miss, other=trash_key)
        tl.debug_barrier()  # every thread has read the old owners before any owner is overwritten
        evicted = miss & (old != trash_key)
        tl.store(table_ptr + old, tl.full([BLOCK_E], -1, tl.int64), mask=evicted)
        tl.debug_barrier()
        tl.store(table_ptr + keys, slot, mask=miss)
        tl.store(owner_ptr + gslot, keys, mask=miss)
        tl.store(stamp_ptr + gslot, tick * E + ee, mask=needed)
        if LFU:
            tl.store(count_ptr + keys, tl.load(count_ptr + keys, mask=needed, other=0) + 1, mask=needed)
        evictions = tl.sum(evicted.to(tl.int64), axis=0)
        if PREFETCH:
            tl.store(counters_ptr + 3, tl.load(counters_ptr + 3) + misses)
        else:
            tl.store(counters_ptr, tl.load(counters_ptr) + tl.sum(needed.to(tl.int64), axis=0))
            tl.store(counters_ptr + 1, tl.load(counters_ptr + 1) + misses)
        tl.store(counters_ptr + 2, tl.load(counters_ptr + 2) + evictions)
        tl.debug_barrier()  # the installed slots are in the table before each occurrence reads its own
        for n0 in range(0, N, CHUNK):
            n_ok = n0 + cc < N
            ids_c = tl.load(ids_ptr + n0 + cc, mask=n_ok, other=0).to(tl.int64)
            slot_c = tl.load(table_ptr + key_base + ids_c, mask=n_ok, other=0)
            src_c = tl.where(tl.load(scratch_ptr + ids_c, mask=n_ok, other=N) == n0 + cc, key_base + ids_c, -1)
            tl.store(out_ptr + n0 + cc, slot_c, mask=n_ok)
            tl.store(out_ptr + N + n0 + cc, src_c, mask=n_ok)
            tl.store(out_ptr + 2 * N + n0 + cc, slot_c + start, mask=n_ok)

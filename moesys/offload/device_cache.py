"""The expert cache's bookkeeping kept on the device, for batch-1 decode without the host.

The host path (moesys.offload.engine) reads each layer's routing back to decide hits, victims and copies:
one sync per layer, and nothing a CUDA graph can replay. Here the same decisions are tensor ops: a lookup
in the expert -> slot table, victims as the K lowest-scored slots of the layer's bank (LRU: last use; LFU:
use count, then last use; free slots first), the tables updated with scatters, and the copies issued by
moesys.offload.slot_copy from indices on the device. Every shape is fixed by K, so a decode step's
layers can be captured once and replayed for every token.

Masked scatters go to one extra "trash" entry at the end of each table instead of being skipped (that
would need a data-dependent shape). The host and device bookkeeping hand over in both directions
(`load_from_host`, `store_to_host`) so prefill keeps the host path and its prefetch.

Legend: L MoE layers, E experts per layer, S slots, B slots in a bank, K experts per token.
"""

from __future__ import annotations

import torch

from moesys.offload.cache import ExpertCache, _LFU, _LRU

_STAMP_BITS = 40  # LFU score = count << 40 | last use: counts first, then recency (ticks < 2**30 at E <= 1024)


class DeviceCacheTables:
    def __init__(self, cache: ExpertCache, policy: str):
        L, E, S = len(cache.row), cache.num_experts, cache.num_slots
        dev = cache.device
        self.cache, self.lfu = cache, policy == "lfu"
        self.trash_key = L * E
        self.table = cache.table_flat                     # [L*E + 1] bank-local slot, -1 = not resident
        self.owner_S = torch.full((S + 1,), self.trash_key, dtype=torch.int64, device=dev)  # slot -> key
        self.stamp_S = torch.full((S + 1,), -1, dtype=torch.int64, device=dev)  # last use, -1 = free
        self.count_K = torch.zeros(L * E + 1, dtype=torch.int64, device=dev)    # LFU use counts per key
        self.count_K[-1] = -1  # the owner of a free slot: scored below every resident expert
        self.tick = torch.zeros((), dtype=torch.int64, device=dev)
        # statistics, folded into OffloadStats by the engine when it reads them
        self.lookups = torch.zeros((), dtype=torch.int64, device=dev)
        self.misses = torch.zeros((), dtype=torch.int64, device=dev)
        self.evictions = torch.zeros((), dtype=torch.int64, device=dev)

    # ---------------------------------------------------------------- one layer, one token
    def step(self, row: int, ids_K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Make the K distinct experts `ids_K` of MoE layer `row` resident. Returns (bank-local slots [K],
        misses [K] bool, keys [K] = row * E + expert: the store row of each expert); the caller copies
        the missed experts into their slots before computing."""
        cache = self.cache
        layer = cache.layers[row]
        start, end = cache.banks[cache.bank_of[layer]]
        B, K = end - start, ids_K.numel()
        key_K = ids_K.to(torch.int64) + row * cache.num_experts
        slot_K = self.table[key_K]
        miss_K = slot_K < 0
        self.tick += 1
        score_B = self.stamp_S[start:end]
        if self.lfu:
            score_B = (self.count_K[self.owner_S[start:end]] << _STAMP_BITS) + score_B
        # this token's hits are not victims: give them the top score (misses write the trash entry B)
        score_B1 = torch.cat((score_B, score_B.new_zeros(1)))
        score_B1.scatter_(0, torch.where(miss_K, B, slot_K), torch.iinfo(torch.int64).max)
        victims_K = torch.topk(score_B1[:B], K, largest=False).indices  # B >= K: checked by the engine
        rank_K = (torch.cumsum(miss_K, 0) - 1).clamp(min=0)
        slot_K = torch.where(miss_K, victims_K[rank_K], slot_K)
        gslot_K = slot_K + start
        old_K = self.owner_S[gslot_K]
        trash_key, trash_slot = self.trash_key, self.owner_S.numel() - 1
        # (the trash entries are reset with fill_: item assignment copies a host scalar, which graph
        # capture refuses)
        self.table.scatter_(0, torch.where(miss_K, old_K, trash_key), -1)         # evict
        self.table.scatter_(0, torch.where(miss_K, key_K, trash_key), slot_K)     # install
        self.table[trash_key:].fill_(-1)
        self.owner_S.scatter_(0, torch.where(miss_K, gslot_K, trash_slot), key_K)
        self.owner_S[trash_slot:].fill_(trash_key)
        # last use = tick * E + expert: within a step the host path touches experts in ascending id order,
        # so ties break as they do there and both paths evict the same experts
        self.stamp_S.scatter_(0, gslot_K, self.tick * cache.num_experts + ids_K)
        if self.lfu:
            self.count_K.scatter_add_(0, key_K, torch.ones_like(key_K))
        self.lookups += K
        self.misses += miss_K.sum()
        self.evictions += (miss_K & (old_K != trash_key)).sum()
        return slot_K, miss_K, key_K

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
        stamp = [-1] * (S + 1)
        count = [0] * (self.trash_key + 1)
        count[-1] = -1
        tick = 0
        for bank, policy in enumerate(cache.policies):
            if isinstance(policy, _LRU):
                order = list(policy.order)
            else:
                order = sorted(policy.resident, key=lambda k: policy.stamp[k])
                for key in policy.count:
                    count[cache.row[key[0]] * E + key[1]] = policy.count[key]
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
        cache.policies = [_LFU() if self.lfu else _LRU() for _ in cache.banks]
        for bank, (start, end) in enumerate(cache.banks):
            used = sorted((stamp[s], s) for s in range(start, end) if owner[s] != self.trash_key)
            cache.free.append([s for s in range(end - 1, start - 1, -1) if owner[s] == self.trash_key])
            policy = cache.policies[bank]
            for i, (_, s) in enumerate(used, start=1):
                key = (cache.layers[owner[s] // E], owner[s] % E)
                cache.slot_of[key] = s
                cache.resident_per_layer[key[0]] += 1
                if self.lfu:  # counts as the device kept them, recency as its order
                    policy.count[key] = count[owner[s]] - 1
                    policy.tick = i - 1
                policy.touch(key)
            if self.lfu:
                for k in range(self.trash_key):
                    key = (cache.layers[k // E], k % E)
                    if count[k] and key not in policy.count and cache.bank_of[key[0]] == bank:
                        policy.count[key] = count[k]  # evicted experts keep their all-time count
        cache.ready = [None] * cache.num_slots

"""GPU expert cache: a fixed pool of expert slots on the compute device, keyed by (layer, expert), with
next-visit, LRU or LFU eviction (no write-back: experts are read-only) and per-slot CUDA events so a copy into
a slot waits for the last compute that read it, and compute waits only for the copies it needs.

Policy "auto" (the default) is "next-visit" on the host path and in the device bookkeeping's batch steps
(moesys.offload.device_cache), and LRU or LFU in its batch-1 steps (the decode graph's measured default:
a batch-1 step needs K experts, and LRU keeps what recent tokens used).

- next-visit: every step visits the layers in the same cyclic order, so after layer r the one whose next
  visit is furthest away is r itself (its experts this step did not need), then r - 1, r - 2, ...; the
  victim is the least recently used expert of the first of those layers with one to give (Belady's choice
  at layer granularity, LRU within a layer). Replayed on the OLMoE shape (64 experts, top-8, 16 layers;
  uniform draws and the committed trace of a trained model, bench/results/routing_trace_64x8.safetensors)
  it hits as often as LRU or LFU or more at every cache size and batch: 291 slots, batch 128: 24% where
  LRU and LFU hit nothing (a large batch needs nearly every expert of every layer; LRU and LFU evict each
  layer's before the next step returns to it); 291 slots, batch 1: 51% (LRU 48%, LFU 31%) on the trace.
- LRU / LFU: the device path's, and selectable on the host. "auto" there is LRU unless a bank holds at most
  (its layers - 1) x top_k slots: a batch-1 decode visits the layers in the same order at every token, so
  between an expert's use at layer l and the next token's layer l come at least the top_k experts of each
  of the bank's other layers; when they fill the bank, LRU has evicted the expert by then, and no decode
  step ever hits (GPT-OSS-20B's shape under 8 GiB: one bank of 84 slots, 24 layers x top-4, 0 hits
  measured). LFU keeps a stable set instead, which any routing reuses. Above that size LRU can hit.

Legend: S slots, L MoE layers, E experts per layer.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

import torch

CACHE_POLICIES = ("auto", "next-visit", "lru", "lfu")
# torch's CUDA grouped GEMM takes fewer than 1024 groups per call (TORCH_CHECK(group_count < 1024))
MAX_BANK_SLOTS = 1023


class _LRU:
    def __init__(self):
        self.order: OrderedDict = OrderedDict()

    def touch(self, key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def remove(self, key) -> None:
        self.order.pop(key, None)

    def victim(self, protected) -> object | None:
        for key in self.order:
            if key not in protected:
                return key
        return None


class _NextVisit(_LRU):
    """Evicts from the layer visited furthest in the future (the module docstring): after `visit(r)` the
    layers r, r - 1, ... in turn give their least recently used unprotected expert. `order` (every resident
    expert by recency, from _LRU) and the all-time use counts are what the device bookkeeping takes over
    when the decode graph runs (as LRU or LFU)."""

    def __init__(self, layers: list[int]):
        super().__init__()
        self.rank = {layer: r for r, layer in enumerate(layers)}
        self.by_layer = [OrderedDict() for _ in layers]
        self.count: dict = {}
        self.current = 0
        # a run of victims for one protected set (the engine allocates a layer's misses with one): the layers
        # found to hold only protected experts are not scanned again for it (a batch's layer protects all
        # its experts, 64 scanned per victim otherwise)
        self._scan_protect, self._scan_from = None, 0

    def visit(self, layer: int) -> None:
        self.current, self._scan_protect = self.rank[layer], None

    def touch(self, key) -> None:
        super().touch(key)
        mine = self.by_layer[self.rank[key[0]]]
        mine[key] = None
        mine.move_to_end(key)
        self.count[key] = self.count.get(key, 0) + 1
        if self._scan_protect is not None and key not in self._scan_protect:
            self._scan_protect = None  # an unprotected expert may now sit in a layer the scan passed

    def remove(self, key) -> None:
        super().remove(key)
        self.by_layer[self.rank[key[0]]].pop(key, None)

    def victim(self, protected) -> object | None:
        if protected is not self._scan_protect:
            self._scan_protect, self._scan_from = protected, 0
        L = len(self.by_layer)
        for d in range(self._scan_from, L):
            for key in self.by_layer[(self.current - d) % L]:
                if key not in protected:
                    return key
            self._scan_from = d + 1
        return None


class _LFU:
    """Least frequently used over all-time use counts (an expert evicted and reloaded keeps its count);
    ties go to the least recently used. A lazy heap keeps eviction O(log S)."""

    def __init__(self):
        self.count: dict = {}
        self.stamp: dict = {}
        self.heap: list = []
        self.tick = 0
        self.resident: set = set()

    def touch(self, key) -> None:
        self.tick += 1
        self.count[key] = self.count.get(key, 0) + 1
        self.stamp[key] = self.tick
        self.resident.add(key)
        heapq.heappush(self.heap, (self.count[key], self.tick, key))
        if len(self.heap) > 8 * max(len(self.resident), 64):
            self.heap = [(self.count[k], self.stamp[k], k) for k in self.resident]
            heapq.heapify(self.heap)

    def remove(self, key) -> None:
        self.resident.discard(key)

    def victim(self, protected) -> object | None:
        skipped, found = [], None
        while self.heap:
            count, stamp, key = heapq.heappop(self.heap)
            if key not in self.resident or self.stamp[key] != stamp:
                continue  # stale entry
            skipped.append((count, stamp, key))
            if key not in protected:
                found = key
                break
        for item in skipped:
            heapq.heappush(self.heap, item)
        return found


def bank_ranges(num_slots: int, num_layers: int, bank_size: int) -> list[tuple[int, int]]:
    """The [start, end) slot ranges of the cache's banks: as few as hold num_slots at bank_size each."""
    num_banks = min(num_layers, -(-num_slots // bank_size))
    edges = [num_slots * b // num_banks for b in range(num_banks + 1)]
    return list(zip(edges[:-1], edges[1:]))


def resolve_policy(policy: str, num_slots: int, num_layers: int, num_experts: int, bank_size: int = MAX_BANK_SLOTS,
                   top_k: int = 1, device: bool = False) -> str:
    """The policy a cache of these sizes runs on the host path, or with `device` in the decode graph's
    bookkeeping: "auto" resolved (the module's docstring says why)."""
    if policy in ("lru", "lfu", "next-visit"):
        return policy
    if not device:  # auto
        return "next-visit"
    banks = bank_ranges(num_slots, num_layers, bank_size)
    others = (-(-num_layers // len(banks)) - 1) * min(top_k, num_experts)  # in the fullest bank
    return "lfu" if min(end - start for start, end in banks) <= others else "lru"


class ExpertCache:
    """`num_slots` expert slots laid out as one pool tensor per part ([S, *part_shape]), split into banks of
    at most `bank_size` slots (torch's grouped GEMM takes at most 1023 groups); each layer lives in one bank
    (layer r in bank r % num_banks), so a layer's grouped call sees its bank as its expert tensor."""

    def __init__(self, parts, num_slots: int, device: torch.device, policy: str, layers: list[int],
                 num_experts: int, bank_size: int = MAX_BANK_SLOTS, top_k: int = 1):
        if policy not in CACHE_POLICIES:
            raise ValueError(f"cache_policy={policy!r} is unknown; use one of {list(CACHE_POLICIES)}")
        if num_slots < 1:
            raise ValueError(f"the expert cache needs at least one slot, got num_slots={num_slots}")
        if not 1 <= bank_size <= MAX_BANK_SLOTS:
            raise ValueError(f"bank_size={bank_size} must be in [1, {MAX_BANK_SLOTS}]: torch's grouped GEMM "
                             f"takes fewer than 1024 experts per call")
        self.device, self.num_slots, self.num_experts, self.bank_size = device, num_slots, num_experts, bank_size
        self.pools = {name: torch.empty((num_slots,) + tuple(shape), dtype=dt, device=device)
                      for name, shape, dt in parts}
        self.banks = bank_ranges(num_slots, len(layers), bank_size)  # [start, end) slot ranges
        self.policy = resolve_policy(policy, num_slots, len(layers), num_experts, bank_size, top_k)
        self.device_policy = resolve_policy(policy, num_slots, len(layers), num_experts, bank_size, top_k, device=True)
        # a batch step of the device bookkeeping (several rows): next-visit unless LRU or LFU was asked for
        self.batch_device_policy = "next-visit" if policy in ("auto", "next-visit") else policy
        self.layers = list(layers)
        self.policies = [self.new_policy() for _ in self.banks]
        self.free = [list(range(end - 1, start - 1, -1)) for start, end in self.banks]
        self.row = {layer: r for r, layer in enumerate(layers)}
        self.bank_of = {layer: r % len(self.banks) for r, layer in enumerate(layers)}
        self.slot_of: dict[tuple[int, int], int] = {}
        self.ready: list = [None] * num_slots     # event: copy into the slot done
        self.resident_per_layer = {layer: 0 for layer in layers}
        # device-side expert -> bank-local slot table: a layer whose experts are all resident routes with no
        # host sync; one extra entry at the end takes the device bookkeeping's masked writes
        # (moesys.offload.device_cache)
        self.table_flat = torch.full((len(layers) * num_experts + 1,), -1, dtype=torch.int64, device=device)
        self.slot_table_LE = self.table_flat[:-1].view(len(layers), num_experts)

    def new_policy(self):
        """An empty bookkeeping object of the host policy, for one bank."""
        if self.policy == "next-visit":
            return _NextVisit(self.layers)
        return _LRU() if self.policy == "lru" else _LFU()

    def visit(self, layer: int) -> None:
        """The host path starts `layer`: where next-visit eviction counts the layers' next visits from."""
        if self.policy == "next-visit":
            self.policies[self.bank_of[layer]].visit(layer)

    def capacity(self, layer: int) -> int:
        start, end = self.banks[self.bank_of[layer]]
        return end - start

    def bank_pool(self, layer: int, name: str) -> torch.Tensor:
        start, end = self.banks[self.bank_of[layer]]
        return self.pools[name][start:end]

    def slot_views(self, slot: int) -> dict[str, torch.Tensor]:
        return {name: pool[slot] for name, pool in self.pools.items()}

    def lookup(self, key) -> int | None:
        slot = self.slot_of.get(key)
        if slot is not None:
            self.policies[self.bank_of[key[0]]].touch(key)
        return slot

    def layer_complete(self, layer: int) -> bool:
        return self.resident_per_layer[layer] == self.num_experts

    def allocate(self, key, protected) -> tuple[int, tuple[int, int] | None]:
        """A slot for `key` (not yet resident) in its layer's bank: a free one, else the policy's victim
        outside `protected`. Returns (slot, evicted key or None); the caller fills the slot."""
        bank = self.bank_of[key[0]]
        policy, evicted = self.policies[bank], None
        if self.free[bank]:
            slot = self.free[bank].pop()
        else:
            evicted = policy.victim(protected)
            if evicted is None:
                raise RuntimeError(f"expert cache: all {self.capacity(key[0])} slots of bank {bank} are in use "
                                   "by this step; this is a bug (waves should be no larger than a bank)")
            slot = self.slot_of.pop(evicted)
            policy.remove(evicted)
            self.resident_per_layer[evicted[0]] -= 1
        self.slot_of[key] = slot
        policy.touch(key)
        self.resident_per_layer[key[0]] += 1
        return slot, evicted

    def can_allocate(self, layer: int, protected) -> bool:
        """Whether `allocate` finds a slot in `layer`'s bank without evicting anything in `protected`."""
        bank = self.bank_of[layer]
        return bool(self.free[bank]) or self.policies[bank].victim(protected) is not None

    def update_table(self, layer: int, experts: list[int], slots: list[int]) -> None:
        if experts:
            start = self.banks[self.bank_of[layer]][0]
            idx_val = torch.tensor([experts, [s - start for s in slots]], dtype=torch.int64)
            if self.device.type == "cuda":
                idx_val = idx_val.pin_memory().to(self.device, non_blocking=True)
            self.slot_table_LE[self.row[layer]].index_copy_(0, idx_val[0], idx_val[1])

"""Performance model of offloaded batch decode (MoE-Lens style): tokens/s from batch size, expert-cache
slots, bytes per expert, routing statistics and the hardware, used to pick the batch size and where the KV
cache lives.

One decode step of B rows through L MoE layers:
- unique experts per layer U(B): uniform routing E * (1 - (1 - K/E)^B) (a token misses an expert with
  probability 1 - K/E); measured routing: the mean over a routing trace's steps of B rows;
- misses per step L * U(B) * (1 - h(S)), S = cache slots, h the hit rate at S: the steps (uniform draws,
  or a routing trace's steps of B rows) replayed through the engine's own ExpertCache and policy
  (`engine_cache_hits`): the layers share the cache, so a large batch can hit nothing at all;
- copy time: misses x expert bytes / pinned host-to-device bandwidth;
- compute time: non-expert weights read once (roofline against their 2 B FLOPs per parameter), per layer
  the U(B) experts' weights read or B*K rows' FLOPs (roofline), attention reading B x context KV tokens
  from device memory, plus per-step and per-row overheads (launches, Python, host syncs) fitted by
  `calibrate` to steps measured with every expert resident, and per host-routed layer (a layer the cache
  does not hold whole: its routing read back, bookkeeping, demand copies' round trip) fitted by
  `calibrate_layers` to one offloaded row;
- quantized experts at more than one row (the engine's Quantized strategy): per layer the U(B) needed
  experts run in ceil(U / W) chunks of W = the engine's dequant_experts (top_k, or 4 x top_k in bf16 with
  the dequant_slots kernel), each dequantizing W experts into the workspace and running moe_mlp over its
  own routed rows, plus a per-chunk overhead (launches; fitted by `calibrate_waves` to one quantized row);
- the device path (`path="device"`: generate_batch's bookkeeping "device", the decode graph): no layer's
  routing is read back, so no host-routed layer cost; instead a per-layer cost of the device bookkeeping
  (its table step and copy kernels: `device_layer_overhead_s`, fitted by `calibrate_layers` to a device
  row at batch 1; above batch 1 the step also guesses and prefetches the next layer and quantized experts
  take another op, so `device_batch_layer_overhead_s`, fitted to a device row above batch 1, where there is
  one), and quantized experts run as one grouped GEMM over their packed weights (quant_grouped: each needed
  expert's packed bytes read once, no dequantization wave);
- step time: max(p x copy, compute) + (1 - p) x copy, p the share of the copies the next-gate prefetch
  issued (a routing statistic measured during a run; 0 by default): the host path reads a layer's routing,
  queues its misses the prefetch did not copy and the next layer's guesses, waits for the layer's copies
  and computes it, so per layer the prefetched copies run under the compute of the layer before and the
  rest stand alone on the critical path. max(copy, compute) with `overlap` (the issue's bound: every miss
  copied while something computes);
- tokens/s = B / step time.

KV placement: on the device the KV cache of B x context tokens takes device memory from the expert
cache; in host memory (attention on the CPU) it frees those slots but attention reads host memory at the
CPU's bandwidth and each layer adds a device-host round trip. `best_plan` predicts both for each batch
size and keeps the fastest.

Legend: B batch rows, L MoE layers, E experts per layer, K top-k, S cache slots per layer, N trace tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import torch

from moesys.offload.cache import MAX_BANK_SLOTS, resolve_policy
from moesys.offload.cache_bytes import CacheBytes
from moesys.offload.dequant_slots import kernel_available, workspace_experts

KV_PLACES = ("device", "host")


@dataclass(frozen=True)
class Hardware:
    pcie_Bps: float = 50e9          # pinned host -> device copy bandwidth
    hbm_Bps: float = 4.0e12         # device memory bandwidth
    flops: float = 700e12           # device matmul FLOP/s in the compute dtype
    cpu_mem_Bps: float = 100e9      # host memory bandwidth of CPU attention
    step_overhead_s: float = 2e-3   # per decode step: launches, the routing read back, the token sync
    host_roundtrip_s: float = 30e-6  # per attention layer with host KV: q to the host, the output back
    row_overhead_s: float = 0.0     # per row per step beyond the roofline terms (see calibrate)
    layer_overhead_s: float = 0.0   # per host-routed MoE layer: routing read, bookkeeping, waits (calibrate_layers)
    device_layer_overhead_s: float = 0.0  # per offloaded MoE layer on the device path: its table step, copy kernels
    # the same above batch 1 (next-layer prefetch, quant_grouped instead of quant_gemv); None: as at batch 1
    device_batch_layer_overhead_s: float | None = None
    wave_overhead_s: float = 0.0    # per dequantization wave of quantized experts beyond its roofline (calibrate_waves)

    @classmethod
    def measure(cls, device: torch.device, nbytes: int = 64 << 20) -> "Hardware":
        """Host-to-device copy bandwidth and matmul FLOP/s measured on `device` (a second or so); the
        other figures keep their defaults (H200 class)."""
        device = torch.device(device)
        cuda = device.type == "cuda"
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
        dst.copy_(src, non_blocking=cuda)
        sync()
        # the fastest of five trials: one trial is a few milliseconds, and a trial that meets other traffic
        # (the page cache writing back a checkpoint just saved) read 25 GB/s on an H100 that copies at 54
        # (bench/results/offload_batch_h100_1aff96a_waves.log); the model wants what the link can do
        pcie = 0.0
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(3):
                dst.copy_(src, non_blocking=cuda)
            sync()
            pcie = max(pcie, 3 * nbytes / (time.perf_counter() - t0))
        n = 2048 if cuda else 256
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
        a @ a
        sync()
        t0 = time.perf_counter()
        for _ in range(5):
            a @ a
        sync()
        flops = 5 * 2 * n ** 3 / (time.perf_counter() - t0)
        if cuda:
            return cls(pcie_Bps=pcie, flops=flops)
        # on a CPU "device" memory is host memory: copies, attention and weights all read the same RAM
        return cls(pcie_Bps=pcie, hbm_Bps=pcie, flops=flops, cpu_mem_Bps=pcie, step_overhead_s=1e-3,
                   host_roundtrip_s=0.0)


@dataclass(frozen=True)
class Workload:
    num_layers: int            # MoE layers
    num_experts: int
    top_k: int
    expert_bytes: int          # one expert as stored and copied (int4/int8 smaller)
    expert_flops_per_row: int  # 2 x 3 x H x I for a gated expert
    dense_bytes: int           # non-expert weights, read once per step
    cache: CacheBytes          # the generation cache of one sequence (KV per token, states per row)
    free_bytes: int            # budget minus non-expert weights and the activation workspace: KV + slots
    dequant_bytes: int = 0     # quantized experts: one expert dequantized (compute dtype); 0 = not quantized
    dequant_experts: int = 0   # quantized experts dequantized at once (the engine's); 0 = top_k
    cache_policy: str = "auto"  # the expert cache's eviction policy and bank size (moesys.offload.cache)
    bank_size: int = MAX_BANK_SLOTS

    def to_record(self) -> dict:
        """A JSON-ready dict (the benchmarks' records), read back by from_record."""
        return {**self.__dict__, "cache": asdict(self.cache)}

    @classmethod
    def from_record(cls, record: dict) -> "Workload":
        """The Workload of a to_record dict, or of a record written before the cache was measured (its KV
        bytes per token over `attention_layers` layers, no states)."""
        record = dict(record)
        if "cache" in record:
            record["cache"] = CacheBytes(**{k: tuple(map(tuple, v)) if k == "windows" else v
                                            for k, v in record["cache"].items()})
        else:
            record["cache"] = CacheBytes(full_per_token=record.pop("kv_bytes_per_token"),
                                         attention_layers=record.pop("attention_layers"))
        return cls(**record)

    def slots(self, batch: int, context: int, kv: str) -> int:
        """Expert-cache slots left when the KV cache of `batch` rows of `context` tokens is on `kv`."""
        kv_bytes = self.cache.device_bytes(batch, context, kv)
        return max(0, min(self.num_layers * self.num_experts, (self.free_bytes - kv_bytes) // self.expert_bytes))


class RoutingStats:
    """Expected unique experts per layer for B rows, and the hit rate of the engine's cache."""

    def __init__(self, num_experts: int, top_k: int, ids_NLK: torch.Tensor | None = None,
                 batch_steps: bool = False):
        self.E, self.K, self.ids_NLK, self.batch_steps = num_experts, top_k, ids_NLK, batch_steps
        self._hits: dict[tuple, float] = {}
        self.measured_hit: tuple[int, float] | None = None  # (cache slots, hit rate) seen by the engine
        self.prefetched = 0.0  # share of the copies the next-gate prefetch issued ahead (measured in a run)

    @classmethod
    def uniform(cls, num_experts: int, top_k: int) -> "RoutingStats":
        return cls(num_experts, top_k)

    @classmethod
    def from_trace(cls, ids_NLK: torch.Tensor, num_experts: int, batch_steps: bool = False) -> "RoutingStats":
        """A trace of tokens in sequence order (a step's B rows are taken N // B apart), or with
        `batch_steps` the decode steps of a batch run as recorded (RoutingRecorder.ids_NLK(decode_only=True):
        each step's rows in turn), replayed B consecutive rows a step."""
        return cls(num_experts, ids_NLK.shape[2], ids_NLK.long(), batch_steps)

    def with_engine_hit_rate(self, slots: int, hit_rate: float) -> "RoutingStats":
        """The hit rate the engine measured with its own cache of `slots` slots replaces the predicted one
        there."""
        self.measured_hit = (slots, hit_rate)
        return self

    def with_prefetched_share(self, share: float) -> "RoutingStats":
        """The share of the copies that the engine's prefetch issued a layer ahead (OffloadStats: decode
        prefetch_copies / copies), which overlap the compute of the layer before."""
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"the prefetched share of the copies is a fraction, got {share}")
        self.prefetched = share
        return self

    def steps(self, batch: int, layers: int, count: int = 0) -> torch.Tensor:
        """[steps, layers, batch * K] expert ids of decode steps of `batch` rows: the trace's tokens N // B
        apart (B rows of a step are tokens of B different sequences), its consecutive B rows (batch_steps),
        or `count` steps of uniform draws (each row's top-k distinct, from a fixed generator)."""
        if self.ids_NLK is None:
            g = torch.Generator().manual_seed(0)
            return torch.rand(count, layers, batch, self.E, generator=g).topk(self.K, dim=-1).indices.flatten(2)
        N, L, K = self.ids_NLK.shape
        if batch > N:
            raise ValueError(f"the routing trace has {N} tokens, fewer than batch={batch}")
        if self.batch_steps:
            steps = N // batch
            return self.ids_NLK[:steps * batch].view(steps, batch, L, K).transpose(1, 2).reshape(steps, L, batch * K)
        stride = steps = N // batch
        rows_SB = torch.arange(steps)[:, None] + stride * torch.arange(batch)[None, :]
        return self.ids_NLK[rows_SB].permute(0, 2, 1, 3).reshape(steps, L, batch * K)

    def unique(self, batch: int) -> float:
        if self.ids_NLK is None:
            return self.E * (1 - (1 - self.K / self.E) ** batch)
        ids_SLR = self.steps(batch, self.ids_NLK.shape[1])
        seen_SLE = torch.zeros(*ids_SLR.shape[:2], self.E, dtype=torch.bool).scatter_(2, ids_SLR, True)
        return seen_SLE.sum(-1).float().mean().item()

    def hit_rate(self, slots: int, layers: int, batch: int = 1, policy: str = "auto",
                 bank_size: int = MAX_BANK_SLOTS) -> float:
        """The share of a decode step's lookups (each layer's distinct experts) that find their expert
        resident in the engine's cache of `slots` slots over `layers` MoE layers (`engine_cache_hits`)."""
        if self.measured_hit is not None and self.measured_hit[0] == slots:
            return self.measured_hit[1]
        key = (slots, layers, batch, policy, bank_size)
        if key not in self._hits:
            if self.ids_NLK is not None and self.ids_NLK.shape[1] != layers:
                raise ValueError(f"the routing trace has {self.ids_NLK.shape[1]} layers, the model {layers}")
            # uniform draws: enough steps to fill the cache twice over and count 2000 lookups, as many again
            per_step = layers * self.unique(batch)
            count = 2 * max(math.ceil(slots / per_step) + 2, math.ceil(2000 / per_step))
            self._hits[key] = engine_cache_hits(self.steps(batch, layers, count), self.E, slots, policy,
                                                bank_size, self.K)
        return self._hits[key]


def engine_cache_hits(ids_SLR: torch.Tensor, num_experts: int, slots: int, policy: str = "auto",
                      bank_size: int = MAX_BANK_SLOTS, top_k: int = 1) -> float:
    """Replays decode steps ids_SLR ([steps, layers, routed rows]) through moesys.offload.cache.ExpertCache
    itself (its banks, its policy, "auto" resolved as it resolves it; no weights): each layer is visited,
    looks up its distinct experts in ascending order and allocates the misses, protecting the layer's own
    (a layer needing more experts than its bank: each bank-sized wave's own), as the engine does. Returns
    the hit share of the lookups of the second half of the steps (the first half fills the cache).

    Why not a hit curve per layer: the layers share the cache, visited in the same order every step. When a
    step's lookups over all layers outnumber the slots (a large batch needs nearly every expert of every
    layer), LRU has evicted a layer's experts by the time the next step reaches that layer, and no lookup
    hits, whatever the slots per layer would suggest (min(1, S/E) predicted 28% for the OLMoE shape at
    int4, batch 128, under 4 GiB; the engine's LRU copied every expert:
    bench/results/offload_batch_int4_h100_b0df6cc.json). Prefetch is not replayed: its copies count as
    misses here as in the engine's copy hit rate."""
    from moesys.offload.cache import ExpertCache

    S, L, _ = ids_SLR.shape
    slots = min(slots, L * num_experts)
    if slots < L:
        return 0.0
    cache = ExpertCache([], slots, torch.device("cpu"), policy, list(range(L)), num_experts,
                        bank_size=min(bank_size, slots), top_k=top_k)
    hits = lookups = 0
    for s in range(S):
        for layer in range(L):
            cache.visit(layer)
            needed = sorted(set(ids_SLR[s, layer].tolist()))
            found, capacity = 0, cache.capacity(layer)
            for start in range(0, len(needed), capacity):  # a layer needing more than its bank: in waves
                wave = needed[start:start + capacity]
                protect = {(layer, e) for e in wave}
                for e in wave:
                    if cache.lookup((layer, e)) is None:
                        cache.allocate((layer, e), protect)
                    else:
                        found += 1
            if s >= S // 2:
                hits, lookups = hits + found, lookups + len(needed)
    return hits / max(lookups, 1)


def lru_hit_curve(ids_NLK: torch.Tensor, num_experts: int, batch: int = 1) -> torch.Tensor:
    """hit[S] for S = 0..E: the share of a layer's expert lookups that an LRU cache of S slots per layer
    finds resident, replaying the trace `batch` tokens per step (each step looks up its unique experts).
    One pass per layer with LRU stack distances: a lookup hits in every cache larger than its distance."""
    N, L, K = ids_NLK.shape
    hist = torch.zeros(num_experts + 1, dtype=torch.float64)  # hist[d]: lookups at stack distance d (E: cold)
    lookups = 0
    for layer in range(L):
        stack: list[int] = []  # most recent first
        for start in range(0, N, batch):
            step = sorted(set(ids_NLK[start:start + batch, layer].flatten().tolist()))
            for e in step:
                d = stack.index(e) if e in stack else num_experts
                hist[d] += 1
                lookups += 1
            for e in step:
                if e in stack:
                    stack.remove(e)
            stack[:0] = step[::-1]  # touched in ascending id order, as the engine does: the largest is newest
    cum = torch.cumsum(hist[:num_experts], 0) / max(lookups, 1)
    return torch.cat((torch.zeros(1, dtype=torch.float64), cum))  # distance d hits with S > d slots


# where a decode step's cache bookkeeping runs: "host" (a routing read back per layer), "device" (eager steps,
# the next layer prefetched on the copy stream), "graph" (the batch's CUDA-graph step: the bookkeeping on the
# device inside the replay, no host work per layer, and the misses copied in stream order with no prefetch, so
# nothing overlaps them; its step and row overheads are calibrate()'s fit to all-resident graph steps),
# "graph-prefetch" (the same step with the next layer prefetched on the copy stream inside the capture,
# OffloadEngine.graph_prefetch: the prefetched share of the copies overlaps the compute, as on "device")
PATHS = ("host", "device", "graph", "graph-prefetch")
_GRAPH_PATHS = ("graph", "graph-prefetch")


def predict(w: Workload, hw: Hardware, routing: RoutingStats, batch: int, context: int, kv: str = "device",
            overlap: bool = False, slots: int | None = None, path: str = "host") -> dict:
    """Predicted decode step of `batch` rows with `context` cached tokens each; `slots` (total cache slots)
    defaults to what the budget leaves beside the KV cache on `kv`; `path` is where the cache bookkeeping
    runs (PATHS: "host", a routing read back per layer; "device"; "graph", the copies in stream order;
    "graph-prefetch", the graph step with the device path's prefetch)."""
    if kv not in KV_PLACES:
        raise ValueError(f"kv={kv!r} must be one of {list(KV_PLACES)}")
    if path not in PATHS:
        raise ValueError(f"path={path!r} must be one of {list(PATHS)}")
    S_total = w.slots(batch, context, kv) if slots is None else slots
    U = routing.unique(batch)
    hit = (routing.hit_rate(S_total, w.num_layers, batch, w.cache_policy, w.bank_size)
           if S_total >= w.num_layers else 0.0)
    misses = w.num_layers * U * (1 - hit)
    copy_s = misses * w.expert_bytes / hw.pcie_Bps
    # a layer the cache does not hold whole is host-routed (its routing read back, its bookkeeping, the
    # round trip of its copies that the prefetch did not issue ahead), or on the device path runs the
    # bookkeeping's kernels
    offloaded_layers = w.num_layers if hit < 1 else 0
    layer_s = 0.0 if path in _GRAPH_PATHS else hw.layer_overhead_s if path == "host" else device_layer_s(hw, batch)
    dense_s = max(w.dense_bytes / hw.hbm_Bps, batch * w.dense_bytes / hw.flops)  # 2 FLOPs per 2-byte weight
    rows_s = batch * w.top_k * w.expert_flops_per_row / hw.flops
    waves = dequant_waves(w, U, batch) if path == "host" else 0
    if waves:  # each wave writes and reads its dequantized experts and runs its share of the routed rows
        dequant_s = 2 * chunk_experts(w) * w.dequant_bytes / hw.hbm_Bps
        experts_s = w.num_layers * waves * (max(dequant_s, rows_s / waves) + hw.wave_overhead_s)
    else:
        experts_s = w.num_layers * max(U * w.expert_bytes / hw.hbm_Bps, rows_s)
    # each step reads every row's cache: from the GPU, or with kv="host" its full-attention layers on the CPU
    # (a round trip a layer) and the rest (sliding windows, recurrent states) on the GPU
    attention_s = w.cache.device_bytes(batch, context, kv) / hw.hbm_Bps
    if kv == "host":
        attention_s += (batch * context * w.cache.full_per_token / hw.cpu_mem_Bps
                        + w.cache.attention_layers * hw.host_roundtrip_s)
    compute_s = (dense_s + experts_s + attention_s + hw.step_overhead_s + batch * hw.row_overhead_s
                 + offloaded_layers * layer_s)
    p = 0.0 if path == "graph" else routing.prefetched  # the share of the copies issued a layer ahead
    step_s = max(copy_s, compute_s) if overlap else max(p * copy_s, compute_s) + (1 - p) * copy_s
    feasible = S_total >= w.num_layers  # the engine needs a slot per MoE layer
    return dict(batch=batch, kv=kv, slots=S_total, unique_per_layer=U, hit_rate=hit, misses_per_step=misses,
                copy_s=copy_s, compute_s=compute_s, step_s=step_s, feasible=feasible,
                tokens_per_s=batch / step_s if feasible else 0.0,
                bound_tokens_per_s=batch / max(copy_s, compute_s) if feasible else 0.0,
                bytes_copied_per_token=misses * w.expert_bytes / batch)


def device_layer_s(hw: Hardware, batch: int) -> float:
    """The device path's per-layer cost at `batch`: fitted apart above batch 1 where it was."""
    if batch > 1 and hw.device_batch_layer_overhead_s is not None:
        return hw.device_batch_layer_overhead_s
    return hw.device_layer_overhead_s


def chunk_experts(w: Workload) -> int:
    """Experts per dequantization chunk."""
    return w.dequant_experts or w.top_k


def dequant_waves(w: Workload, unique: float, batch: int) -> int:
    """Dequantization chunks per layer and step: quantized experts at more than one row run in chunks of
    chunk_experts(w) (one row's top_k read packed by quant_gemv instead: none)."""
    if not w.dequant_bytes or batch <= 1:
        return 0
    return math.ceil(unique / chunk_experts(w) - 1e-9)


def best_plan(w: Workload, hw: Hardware, routing: RoutingStats, max_batch: int, context: int,
              kv_places=KV_PLACES, overlap: bool = False, slots: int | None = None, path: str = "host") -> dict:
    """The fastest predicted (batch size in powers of two up to max_batch, and max_batch itself; KV place)."""
    sizes = sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch} | {max_batch})
    options = [predict(w, hw, routing, b, context, kv, overlap, slots, path) for b in sizes for kv in kv_places]
    best = max(options, key=lambda p: (p["tokens_per_s"], -p["batch"]))
    if not best["feasible"]:
        raise ValueError(f"no batch size fits: the budget leaves {w.free_bytes} bytes for KV cache and expert "
                         f"slots, fewer than one expert ({w.expert_bytes} bytes) per MoE layer")
    return best


def calibrate(w: Workload, hw: Hardware, resident_step_s: dict[int, float], context: int,
              path: str = "host") -> Hardware:
    """`hw` with step_overhead_s and row_overhead_s fitted (least squares, clipped at 0) to decode steps
    measured with every expert resident at several batch sizes: what the roofline terms of `path` leave
    unexplained (kernel launches, Python, host syncs) as a + b x B. One batch size fits the constant alone.
    The steps' own path: the graph's quantized steps read packed weights where the host path's dequantize
    in waves, and fitted against the host path's roofline (25 ms more compute a step at batch 128 on the
    Qwen3 shape in int4) they predicted the graph rows 50-57% too fast
    (bench/results/offload_batch_qwen3_int4_graph_h100_6596bf6.json)."""
    bare = replace(hw, step_overhead_s=0.0, row_overhead_s=0.0)
    everything = RoutingStats.uniform(w.num_experts, w.top_k)
    sizes = sorted(resident_step_s)
    rest = [resident_step_s[b] - predict(w, bare, everything, b, context, slots=w.num_layers * w.num_experts,
                                         path=path)["compute_s"] for b in sizes]
    if len(sizes) == 1:
        return replace(bare, step_overhead_s=max(0.0, rest[0]))
    mean_b, mean_r = sum(sizes) / len(sizes), sum(rest) / len(rest)
    slope = (sum((b - mean_b) * (r - mean_r) for b, r in zip(sizes, rest))
             / sum((b - mean_b) ** 2 for b in sizes))
    slope = max(0.0, slope)
    return replace(bare, step_overhead_s=max(0.0, mean_r - slope * mean_b), row_overhead_s=slope)


def _compute_beyond(p: dict, prefetched: float, measured_step_s: float) -> float:
    """How much longer than predicted the compute of `p` (a prediction) must be for its step to take
    measured_step_s: step = max(prefetched x copy, compute) + (1 - prefetched) x copy. 0 when the copies
    alone explain the step (nothing to fit)."""
    compute = measured_step_s - (1 - prefetched) * p["copy_s"]
    if compute <= prefetched * p["copy_s"]:
        return 0.0
    return max(0.0, compute - p["compute_s"])


def calibrate_layers(w: Workload, hw: Hardware, routing: RoutingStats, batch: int, context: int, slots: int,
                     measured_step_s: float, path: str = "host") -> Hardware:
    """`hw` with the per-layer cost of `path` (layer_overhead_s, or device_layer_overhead_s) fitted to one
    offloaded step measured at `batch` on that path (a calibration row: the other rows are then predicted
    with it): the compute the step took beyond the model's, per offloaded layer. At batch 1 on the host path
    that is the routing read back, the bookkeeping and the demand copies' round trip of each layer: fitted
    per miss instead (61 us of bandwidth, 268 us fitted on the OLMoE shape at int4) it made every larger
    batch's step three times too slow (bench/results/offload_batch_int4_h100_96ed0f8.json). On the device path
    a row above batch 1 fits `device_batch_layer_overhead_s` (the Qwen3-30B-A3B shape in int4: a step took
    67 ms at batch 1 and 164-182 ms at every batch from 8 to 128, bench/results/
    offload_batch_qwen3_int4_h100_8061ee3.json, which the batch-1 fit predicted at half that)."""
    if path not in ("host", "device"):
        raise ValueError(f"calibrate_layers fits the host or device path's per-layer cost; path={path!r} has none")
    field = ("layer_overhead_s" if path == "host" else
             "device_batch_layer_overhead_s" if batch > 1 else "device_layer_overhead_s")
    p = predict(w, replace(hw, **{field: 0.0}), routing, batch, context, slots=slots, path=path)
    layers = w.num_layers if p["hit_rate"] < 1 else 0
    extra = _compute_beyond(p, routing.prefetched, measured_step_s)
    return replace(hw, **{field: extra / layers if layers else 0.0})


def calibrate_waves(w: Workload, hw: Hardware, routing: RoutingStats, batch: int, context: int, slots: int,
                    measured_step_s: float) -> Hardware:
    """`hw` with wave_overhead_s fitted to one quantized step measured at `batch` > 1 (a calibration row):
    the compute the step took beyond the model's, per predicted dequantization wave."""
    p = predict(w, replace(hw, wave_overhead_s=0.0), routing, batch, context, slots=slots)
    waves = w.num_layers * dequant_waves(w, p["unique_per_layer"], batch)
    extra = _compute_beyond(p, routing.prefetched, measured_step_s)
    return replace(hw, wave_overhead_s=extra / waves if waves else 0.0)


def dequantized_bytes(quantize: str, gemms: int, H: int, I: int, dtype: torch.dtype) -> int:
    """One expert dequantized into the compute dtype; 0 for experts stored unquantized."""
    if quantize == "none":
        return 0
    return gemms * H * I * torch.empty((), dtype=dtype).element_size()


def workload_of(engine) -> Workload:
    """The Workload of a loaded offload engine (its memory plan, store and cache). The plan's
    KV reserve for max_context tokens counts as free: the batch's cache is taken out of it."""
    plan, store = engine.plan, engine.store
    kv_reserve = plan.cache.reserve_bytes(getattr(engine, "max_context", 0))
    gemms = 3 if store.layout.gated else 2  # gate, up, down; or up, down
    return Workload(num_layers=len(engine.inner), num_experts=engine.cache.num_experts, top_k=engine.top_k,
                    expert_bytes=store.expert_bytes, expert_flops_per_row=2 * gemms * store.H * store.I,
                    dense_bytes=plan.resident_bytes, cache=plan.cache,
                    free_bytes=engine.cache.num_slots * plan.slot_bytes + kv_reserve,
                    dequant_bytes=dequantized_bytes(store.quantize, gemms, store.H, store.I, store.dtype),
                    dequant_experts=engine.dequant_experts, cache_policy=engine.cache.policy,
                    bank_size=engine.cache.bank_size)


def workload_before_load(config, dtype: torch.dtype, gpu_memory, longest: int,
                         quantize_experts: str = "none", device=None) -> Workload:
    """The Workload of a checkpoint not yet loaded, from its memory plan on the meta
    device: what the budget leaves for KV cache and expert slots once the non-expert weights and the
    workspace of one row of `longest` tokens are placed. `device`: where it will run (default: CUDA when
    there is one, as load's), which decides the dequantization chunk."""
    from moesys.offload.adapters import adapter_for, find_moe_blocks
    from moesys.offload.layout import expert_dims
    from moesys.offload.loader import build_skeleton, plan_memory

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    skel = build_skeleton(config, dtype)
    blocks = find_moe_blocks(skel, adapter_for(config))
    plan = plan_memory(skel, blocks, dtype, gpu_memory, quantize_experts=quantize_experts, max_context=longest)
    text = config.get_text_config()
    E, I, H, layout = expert_dims(next(iter(blocks.values())).experts)
    gemms = 3 if layout.gated else 2  # gate, up, down; or up, down
    return Workload(num_layers=len(blocks), num_experts=E, top_k=text.num_experts_per_tok,
                    expert_bytes=plan.slot_bytes, expert_flops_per_row=2 * gemms * H * I,
                    dense_bytes=plan.resident_bytes, cache=plan.cache,
                    free_bytes=plan.budget - plan.resident_bytes - plan.reserve_bytes + plan.cache.reserve_bytes(longest),
                    dequant_bytes=dequantized_bytes(quantize_experts, gemms, H, I, dtype),
                    dequant_experts=workspace_experts(text.num_experts_per_tok, dtype, kernel_available(device)),
                    cache_policy=resolve_policy("auto", plan.num_slots, len(blocks), E, top_k=text.num_experts_per_tok))


def auto_batch_size(model, num_requests: int, longest: int, hardware: Hardware | None = None,
                    routing: RoutingStats | None = None) -> int:
    """generate_batch's batch_size="auto" for a loaded model: the model's fastest batch size whose KV cache
    fits the memory plan's max_context (the expert cache is already sized, so the KV cache stays on the
    device here). Routing: uniform unless given (the worst case for the cache). A model without an offload
    engine decodes every row from resident weights: the largest batch (up to 64) is the fastest."""
    engine = getattr(model, "moesys_offload", None)
    if engine is None or not hasattr(engine, "plan"):
        return max(1, min(num_requests, 64))
    max_context = getattr(engine, "max_context", longest)
    max_batch = max(1, min(num_requests, engine.plan.cache.rows_fit(max(longest, 1), max_context)))
    w = workload_of(engine)
    routing = routing or RoutingStats.uniform(w.num_experts, w.top_k)
    hw = hardware or Hardware.measure(engine.device)
    # rows hold on average about half their final length over a run; generate_batch's bookkeeping "auto"
    # keeps the device path wherever the engine supports it
    path = "device" if engine.device_path_unsupported is None else "host"
    return best_plan(w, hw, routing, max_batch, longest // 2, kv_places=("device",), slots=engine.cache.num_slots,
                     path=path)["batch"]

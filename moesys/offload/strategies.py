"""How the offload engine runs one MoE layer's experts: one strategy class per execution path, chosen once
per engine and phase by `select_strategy` (from the engine's configuration, never per call from flags).

Phases: "prefill" (more than one routed token: a prompt, or a batch's decode step with one row per
sequence), "decode" (one token), "graph" (one token inside moesys.offload.graph's decode step, whose
bookkeeping must stay on the device). Strategies:

- GraphDecode: the decode graph's path. Cache lookups, victims and copies on the device
  (DeviceCacheTables.step + slot_copy), then the layer over its slots; no host sync, replayable.
- HostRouted: the routing read to the host (the one sync), misses copied on the side stream, the next
  layer's guessed experts prefetched, the layer computed in waves of what its cache bank holds (the model's
  grouped implementation over slot ids, or transformers' eager loop).
- Quantized: HostRouted whose waves dequantize their experts into a workspace and run moe_mlp.
- CpuExperts: HostRouted whose missed experts are computed on the host instead of copied.
- DeviceResident: every expert of the layer is in the cache, so routing stays on the device (no sync, no
  guess). Whether a layer is complete is cache state, not configuration: the host-routed strategies that
  may use it (HostRouted for the grouped implementation, Quantized for a few routed rows) hand a complete
  layer to it per call. (A model whose experts all fit does not reach the engine at all: make_resident
  puts the model's own experts modules back.)

The per-expert math (grouped call, eager loop, dequantized moe_mlp, quant_gemv rows, cache traffic) stays
on the engine; strategies only decide which of it runs.

Legend: T tokens, H hidden, K top-k, E experts per layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

PHASES = ("prefill", "decode", "graph")


def phase_of(tokens: int, in_graph_step: bool) -> str:
    """The phase of a call with `tokens` routed tokens: the decode graph's steps (one token, or one per row
    of a batch) are "graph"; otherwise one token is a decode step, more a prefill or a host-routed batch."""
    if tokens == 0:  # no rows: the graph and decode paths read row 0
        return "prefill"
    if in_graph_step:
        return "graph"
    return "decode" if tokens == 1 else "prefill"


class ExpertsStrategy(ABC):
    """One execution path of OffloadEngine.experts_forward: y_TH for the routing (ids_TK, w_TK) of `layer`."""

    name: str

    def __init__(self, engine):
        self.engine = engine

    @abstractmethod
    def forward(self, layer: int, x_TH: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GraphDecode(ExpertsStrategy):
    """A decode step (one token, or one per row of a batch) through one layer with no host sync: hits,
    victims and table updates on the device, misses copied by a kernel reading the pinned store, then the
    layer's compute over its slots. Everything here is replayable from a CUDA graph; no CPU experts. An
    eager batch step also prefetches the next layer's guessed experts on the copy stream while this layer
    computes (OffloadEngine.device_slots; a captured batch step too, with engine.graph_prefetch); one token's
    misses copy in order on the compute stream."""

    name = "graph-decode"

    def forward(self, layer, x_TH, ids_TK, w_TK):
        eng = self.engine
        if eng.grouped:
            return eng.inner[layer](x_TH, eng.device_slots(layer, ids_TK, x_TH=x_TH), w_TK)
        slots_N = eng.device_slots(layer, ids_TK, global_slots=True, x_TH=x_TH).reshape(-1)
        return eng._quantized_rows(x_TH, eng.step_ids(ids_TK), slots_N, w_TK)


class DeviceResident(ExpertsStrategy):
    """Every expert of the layer resident: route on the device, no host sync (and no guess to score);
    quantized experts take this path for decode (a few routed rows, each read packed by quant_gemv)."""

    name = "device-resident"

    def forward(self, layer, x_TH, ids_TK, w_TK):
        eng = self.engine
        if eng.prefetcher is not None:
            eng.prefetcher.pending.pop(layer, None)
        eng._wait(layer, list(eng.pending[layer]))
        if x_TH.shape[0] == 1:  # a token's top-k experts are distinct: K hits, counted without a kernel
            eng.stats.hits += ids_TK.shape[1]
        else:
            eng.count_distinct_hits(ids_TK)
        if eng.grouped:
            out = eng._run_grouped(layer, x_TH, ids_TK, w_TK)
        else:
            out = eng._run_quantized_resident(layer, x_TH, ids_TK, w_TK)
        eng._mark_used(layer)
        return out


def plan_waves(needed: list[int], resident: set[int], capacity: int, pipelined: bool) -> list[list[int]]:
    """The waves in which a layer's `needed` experts run when they do not all fit its bank of `capacity`
    slots at once (one wave when they do).

    pipelined: resident experts first (nothing to copy, so the first wave computes while the next one
    copies), then the misses; the first two waves fill the bank together and each later one takes half of
    it, so a wave's copies go to slots the wave before it is not reading (double buffering), and every
    resident expert is in one of the first two waves, never evicted before its use. Otherwise: ascending
    expert ids in whole banks (the order transformers' eager loop sums in), one wave after the other."""
    if len(needed) <= capacity:
        return [list(needed)]
    if not pipelined or capacity < 2:
        return [needed[i:i + capacity] for i in range(0, len(needed), capacity)]
    order = [e for e in needed if e in resident] + [e for e in needed if e not in resident]
    first, half = capacity - capacity // 2, capacity // 2
    return [order[:first]] + [order[i:i + half] for i in range(first, len(order), half)]


class HostRouted(ExpertsStrategy):
    """The routing read to the host (the one sync, together with the prefetcher's guess), misses copied on
    the side stream, the next layer's guess prefetched, then the layer: one grouped call over slot ids when
    the bank holds all its experts, else in waves (`plan_waves`). With the grouped implementation the waves
    are pipelined, each one grouped call over its routed rows while the next wave copies; transformers'
    eager implementation runs its loop over each wave's slots. A complete layer goes to DeviceResident when
    `resident` is given."""

    name = "host-routed"

    def __init__(self, engine, resident: DeviceResident | None = None):
        super().__init__(engine)
        self.resident = resident

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resident={self.resident is not None})"

    def takes_resident(self, x_TH, ids_TK) -> bool:
        """Whether a complete layer may skip the host routing for these rows."""
        return self.resident is not None

    def pipelines(self) -> bool:
        """Whether waves are planned resident-first with the next wave copying during this one's compute;
        transformers' eager loop keeps ascending expert order (its exact summation order)."""
        return self.engine.grouped

    def cpu_experts(self, layer: int, needed: list[int]) -> set[int]:
        """The needed experts computed on the host instead of copied: none here."""
        return set()

    def run_wave(self, layer, x_TH, ids_TK, w_TK, wave, slots, out_TH, flat_host) -> None:
        eng = self.engine
        if eng.grouped:
            eng._run_grouped_rows(layer, x_TH, w_TK, list(zip(wave, slots)), out_TH, flat_host)
        else:
            eng._run_loop(layer, x_TH, ids_TK, w_TK, list(zip(wave, slots)), out_TH, flat_host)

    def forward(self, layer, x_TH, ids_TK, w_TK):
        eng = self.engine
        if eng._tables_on_device:  # the decode graph ran last: its bookkeeping comes back to the host
            eng._tables_to_host()
        if eng.cache.layer_complete(layer) and self.takes_resident(x_TH, ids_TK):
            return self.resident.forward(layer, x_TH, ids_TK, w_TK)
        eng.cache.visit(layer)  # next-visit eviction ranks the layers from this one

        guess = None
        nxt = eng.prefetcher.next_layer.get(layer) if eng.prefetcher is not None else None
        if nxt is not None and not eng.cache.layer_complete(nxt):
            guess = eng.prefetcher.guess(layer, x_TH)
        flat = ids_TK.flatten()
        host = (flat if guess is None else torch.cat((flat, guess.to(flat.dtype)))).tolist()  # the one sync
        flat_host = host[:flat.numel()]
        needed = sorted(set(flat_host))
        if eng.prefetcher is not None:
            guessed_n, used_n = eng.prefetcher.score(layer, set(needed))
            eng.stats.prefetch_guessed += guessed_n
            eng.stats.prefetch_used += used_n
        cpu_set = self.cpu_experts(layer, needed)
        gpu_needed = [ex for ex in needed if ex not in cpu_set]
        eng.stats.misses += len(cpu_set)
        eng.stats.cpu_experts += len(cpu_set)

        resident = {ex for ex in gpu_needed if (layer, ex) in eng.cache.slot_of}
        waves = plan_waves(gpu_needed, resident, eng.cache.capacity(layer), self.pipelines()) or [[]]
        # the first two waves are copied before anything computes (they fit the bank together when pipelined)
        slots = {0: eng._ensure(layer, waves[0])}
        if len(waves) > 1 and self.pipelines():
            slots[1] = eng._ensure(layer, waves[1], keep=waves[0])
        if guess is not None:  # most wanted first; never evicting what this layer's copied waves hold
            eng._prefetch(layer, [e for e in host[flat.numel():] if e >= 0],
                          protect=[e for i in slots for e in waves[i]])
        if eng.grouped and len(waves) == 1 and not cpu_set:
            eng._wait(layer, slots[0])
            out = eng._run_grouped(layer, x_TH, ids_TK, w_TK)
            eng._mark_used(layer)
            return out
        # pipelined waves sum each routed row into float32 (the order of the waves is the cache's, not the
        # routing's); transformers' eager loop sums in the model's dtype, its own exact order
        out = torch.zeros(x_TH.shape, dtype=torch.float32 if self.pipelines() else x_TH.dtype, device=x_TH.device)
        for i, wave in enumerate(waves):
            # pipelined, the wave after this one copies while this one computes: its victims may be the slots
            # of the wave before, whose compute is already queued (the copy stream waits for it), never this
            # one's. Otherwise each wave is copied once the one before it has been queued (it may evict it).
            ahead = i + 1 if self.pipelines() else i
            if ahead < len(waves) and ahead not in slots:
                slots[ahead] = eng._ensure(layer, waves[ahead], keep=wave if ahead != i else ())
            eng._wait(layer, slots[i])
            self.run_wave(layer, x_TH, ids_TK, w_TK, wave, slots[i], out, flat_host)
            eng._mark_used(layer)
        if cpu_set:
            eng._run_loop(layer, x_TH, ids_TK, w_TK, [(ex, None) for ex in sorted(cpu_set)], out, flat_host)
        return out.to(x_TH.dtype)


class Quantized(HostRouted):
    """Quantized experts with an activation moe_mlp fuses: each wave is dequantized, dequant_experts at a
    time, into the workspace and run by moe_mlp; a complete layer's few routed rows (decode) are read packed
    by quant_gemv (DeviceResident). Quantized experts of any other activation run HostRouted's eager loop."""

    name = "quantized"

    def takes_resident(self, x_TH, ids_TK) -> bool:
        # one token's K rows (decode): each read packed by quant_gemv, no dequantization
        return x_TH.shape[0] * ids_TK.shape[1] <= self.engine.top_k

    def pipelines(self) -> bool:
        return True  # quantized experts have no exact summation order to keep (they are dequantized)

    def run_wave(self, layer, x_TH, ids_TK, w_TK, wave, slots, out_TH, flat_host) -> None:
        self.engine._run_dequant(x_TH, w_TK, wave, slots, out_TH, flat_host)


class CpuExperts(HostRouted):
    """Missed experts computed on the host, where their weights are (x sent over, y brought back), instead
    of copied; resident ones run as HostRouted (or Quantized: `gpu`) runs them, after the host sync even for
    a complete layer."""

    name = "cpu-experts"

    def __init__(self, engine, gpu: HostRouted):
        super().__init__(engine)
        self.gpu = gpu

    def __repr__(self) -> str:
        return f"CpuExperts(gpu={self.gpu!r})"

    def takes_resident(self, x_TH, ids_TK) -> bool:
        return False

    def cpu_experts(self, layer, needed):
        return {ex for ex in needed if (layer, ex) not in self.engine.cache.slot_of}

    def pipelines(self) -> bool:
        return self.gpu.pipelines()

    def run_wave(self, layer, x_TH, ids_TK, w_TK, wave, slots, out_TH, flat_host) -> None:
        self.gpu.run_wave(layer, x_TH, ids_TK, w_TK, wave, slots, out_TH, flat_host)


def select_strategy(engine, phase: str) -> ExpertsStrategy:
    """The strategy `engine` runs in `phase` (one of PHASES), from its configuration: the decode graph's
    path where the device can keep the bookkeeping (otherwise that phase is plain decode), CPU experts when
    asked for (cpu_experts="on", or "auto" for one token when the cost model measured the host faster),
    the dequantizing path for quantized experts moe_mlp can run, else host routing."""
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r} is unknown; use one of {list(PHASES)}")
    if phase == "graph" and engine.device_path_unsupported is None:
        return GraphDecode(engine)
    resident = DeviceResident(engine)
    if engine.store.quantize != "none" and engine.activation is not None:
        gpu = Quantized(engine, resident)
    else:
        gpu = HostRouted(engine, resident if engine.grouped else None)
    one_token = phase != "prefill"
    if engine.cpu_mode == "on" or (engine.cpu_mode == "auto" and engine._cpu_faster and one_token):
        return CpuExperts(engine, gpu)
    return gpu

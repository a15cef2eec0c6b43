"""The offload engine: runs one MoE layer's experts from the expert cache, loading misses from the host
store on a side stream, prefetching the next layer's guessed experts, and (batch-1 decode, when the cost
model says so) computing missed experts on the CPU instead of copying them.

Numerics: when the model's experts implementation is not "eager" and experts are not quantized, the layer
runs that same implementation (transformers' ExpertsInterface) over the slot pool with expert ids remapped
to slot ids, so each routed row meets the same kernel as on a fully resident model; otherwise experts run
one at a time in ascending id order exactly like transformers' eager loop. Either way greedy generation
matches the model fully on the device, bit for bit. Under moesys.offload.graph's compiled decode step that
implementation is traced too (OffloadedExperts calls it on the slot ids from offload_slots), so the step
matches the model on the device under the same compiled step, whose rounding differs from eager's.

Which of these paths a call takes is decided once per engine and phase (prefill, decode, the decode graph's
step) by moesys.offload.strategies; the engine keeps the cache traffic and the per-expert math they call.

Legend: T tokens, H hidden, K top-k, E experts per layer, L MoE layers.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from moesys.offload import quant, slot_copy
from moesys.offload.dequant_slots import dequantize_slots, kernel_available, workspace_experts
from moesys.offload.device_cache import DeviceCacheTables
from moesys.offload.layout import PARAM_OF_PART, ExpertLayout
from moesys.offload.quant_gemv import quant_gemv
from moesys.offload.quant_grouped import quant_moe_mlp
from moesys.offload.rows import lookup, rows_by_chunk
from moesys.ops import moe_mlp
from moesys.offload.stats import OffloadStats
from moesys.offload.strategies import PHASES, phase_of, select_strategy

CPU_EXPERT_MODES = ("auto", "on", "off")
# The host path copies a run of misses with one launch of slot_copy's kernel from the pinned arena, with
# COPY_PROGRAMS programs: enough reads in flight for PCIe, few enough SMs that the waves' compute beside it
# keeps the rest. Only experts of at most COPY_KERNEL_MAX_BYTES: on an H100 the kernel made int4 OLMoE rows
# (3.3 MB experts, 60 us of copy each) 8% faster at batch 32 than a cudaMemcpy per part (about 47 us of host
# time per miss) and equal at 128, but bf16 rows (12.6 MB experts, copy-bound) 6% slower
# (bench/results/offload_batch_copy_kernel_h100_fd052fb.json): the copy engine's bandwidth wins there.
COPY_PROGRAMS = 16
# The copy stream's priority. "high": the GPU dispatches the copy kernel's programs before waiting blocks of the
# compute stream's kernels as SMs free up. A prefetch's copies launched behind a grouped GEMM that fills every SM
# otherwise start when its last block is dispatched (the misses then copy after the compute, not beside it: one
# guess at why the Qwen3 shape's int4 B=128 eager steps ran 57-62% of the bound on one load and 80% on another).
# Not measured on a GPU yet: "normal" (what every measurement so far ran) stays the default, and
# bench/offload_batch.py --copy-priority normal,high is the A/B.
COPY_PRIORITIES = ("normal", "high")
# The decode graph's batch steps prefetch the next layer's guessed experts on the copy stream, as eager batch steps
# do: a fork and join of the copy stream inside the captured step, graph branches that run side by side on each
# replay. Without it every copy of a captured batch step runs in stream order on the compute stream, so the step is
# its copies plus its compute. The Qwen3-30B-A3B shape in int4 under 16 GiB, model routing, one H100: 509 against
# 477 tok/s at batch 32, 847 against 597 at 64, 1613 against 1072 at 128, peaks under the budget, the same tokens
# (bench/results/offload_batch_qwen3_int4_graph_h100_6596bf6.json, _graph_prefetch_h100_6596bf6.json).
GRAPH_PREFETCH = True
COPY_KERNEL_MAX_BYTES = 8 << 20
# How the host path's compute waits for the copies it reads (_wait). "host": the host blocks on each copy's
# event, so it queues a wave's compute only once that wave has landed and its launch work sits between the
# copy and the compute. "device": the compute stream waits for the event and the host goes on queueing (the
# next wave's copies, this wave's compute), blocking next at the next layer's routing read. Not yet measured
# against each other on a GPU (bench/offload_batch.py --copy-wait host, then --copy-wait device).
COPY_WAITS = ("host", "device")
COPY_WAIT = "host"
# Quantized experts on the device path (_quantized_rows): from this many routed rows (T*K) of a layer on, the
# grouped W4A16 / W8A16 GEMM (quant_grouped) instead of quant_gemv's program per routed row. quant_gemv reads an
# expert's packed weights once per routed row and costs little to launch; the grouped op sorts the rows and
# reads a slot's weights once per block of them. Per layer on one H200 (bench/results/quant_grouped_h200_6f15fcb.json,
# int4, OLMoE and Qwen3-30B-A3B shapes): T=1 (8 rows) quant_gemv 0.026-0.028 ms against 0.080-0.100; T=8 (64
# rows) 0.169 against 0.140; T=128 2.41-2.49 against 0.26. Between the two measured points the costs are
# close to linear in the rows and cross at about 42 rows.
QUANT_GROUPED_MIN_ROWS = 40
# When a device-path batch step (device_slots) issues the next layer's prefetch. "early": right after this
# layer's table step, before the compute stream waits for this layer's own prefetched copies, so the copy
# stream queues the next layer's copies behind this layer's and stays busy; "late": after that wait, so each
# layer's prefetch starts only once the layer before's copies landed and the compute stream ran this
# layer's table steps and guess (a gap on the copy stream per layer). On an H100 (OLMoE shape, int4, 4 GiB,
# uniform routing, one machine start) early made batch 32 +36% (498 against 367 tok/s) and batch 128 +32%
# (1869 against 1413); the same tokens under CUDA_LAUNCH_BLOCKING=1 (bench/results/
# offload_batch_int4_prefetch_{early,late}_h100_1def6be.json, offload_batch_equal_int4_blocking_h100_1def6be.json).
PREFETCH_ISSUES = ("early", "late")
PREFETCH_ISSUE = "early"
# transformers' hidden_act -> moesys.ops activation name
_MOESYS_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


# The engine whose decode graph step is running (pushed by OffloadEngine.graph_step). This stack must stay
# module-level: the eager path passes the engine explicitly (OffloadedExperts holds it), but the compiled
# decode step reaches the engine through the custom ops below, and a custom op takes only tensors and
# scalars. Passing an engine handle (an id) instead would be a constant that dynamo guards on, recompiling
# the step for every model loaded; with the stack one compiled graph serves every model of an architecture.
_ACTIVE: list["OffloadEngine"] = []


def _active_engine() -> "OffloadEngine":
    if not _ACTIVE:
        raise RuntimeError("an offloaded model's experts ran under torch.compile outside moesys's decode step; "
                           "do not torch.compile the model yourself: load it with moesys.offload.load(..., "
                           "compile=True), which compiles the decode step around the engine")
    return _ACTIVE[-1]


@torch.library.custom_op("moesys::offload_experts", mutates_args=())
def offload_experts(x_TH: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor, layer: int) -> torch.Tensor:
    """One MoE layer's experts through the active engine: what torch.compile sees of the engine
    (moesys.offload.graph compiles the decode step around it). Opaque on purpose: the engine's cache state
    (slots, tables, counters) is its own, so the compiled graph neither traces nor functionalises it; calls
    stay in layer order because each layer's input is the previous one's output."""
    return _active_engine().experts_forward(layer, x_TH, ids_TK, w_TK)


@offload_experts.register_fake
def _(x_TH, ids_TK, w_TK, layer):
    return torch.empty_like(x_TH)


@torch.library.custom_op("moesys::offload_slots", mutates_args=())
def offload_slots(ids_TK: torch.Tensor, layer: int, x_TH: torch.Tensor) -> torch.Tensor:
    """Graph decode of unquantized experts: make the rows' experts of `layer` resident (the device
    bookkeeping, and the copies of misses into their slots) and return their bank-local slot ids [T, K].
    The layer's input x_TH is read only by a batch step's prefetch of the next layer's guess (engine.
    graph_prefetch), as in the uncompiled step.
    The compiled step runs the model's own grouped experts over the slot pool with these ids, so inductor
    fuses its sort/offsets/gather/combine glue exactly as for the model fully on the GPU; only this op is
    opaque (the grouped GEMMs that follow read the slots it filled: they depend on its output, so they run
    after it)."""
    return _active_engine().device_slots(layer, ids_TK, x_TH=x_TH)


@offload_slots.register_fake
def _(ids_TK, layer, x_TH):
    return torch.empty_like(ids_TK)


def _expert_mlp(module: nn.Module, x_NH: torch.Tensor, parts: dict) -> torch.Tensor:
    """One expert whose layout is not the plain gated one, as transformers' eager loop computes it: GPT-OSS's
    (transposed weights, biases, gate/up interleaved) with the module's own _apply_gate (the clamped SwiGLU)
    between the two matmuls, or a non-gated expert (Nemotron-H: down(act(up x)), relu2)."""
    if "up" in parts:
        return F.linear(module.act_fn(F.linear(x_NH, parts["up"])), parts["down"])
    gate_up = x_NH @ parts["gate_up"] + parts["gate_up_bias"]
    return module._apply_gate(gate_up) @ parts["down"] + parts["down_bias"]


class OffloadedExperts(nn.Module):
    """Drop-in for a transformers v5 experts module: same call, weights live in the engine."""

    def __init__(self, engine: "OffloadEngine", layer: int):
        super().__init__()
        self.engine = engine
        self.layer = layer
        # unquantized experts: the model's own experts module over the slot pool (ids are slot ids); the
        # compiled decode step traces it, with only the cache step opaque (offload_slots)
        self.slot_experts = engine.inner[layer] if engine.grouped else None

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if torch.compiler.is_compiling():  # only moesys.offload.graph's decode step (batch 1 or a batch) compiles
            if self.slot_experts is not None:
                slots = offload_slots(top_k_index, self.layer, hidden_states)
                return self.slot_experts(hidden_states, slots, top_k_weights)
            return offload_experts(hidden_states, top_k_index, top_k_weights, self.layer)
        return self.engine.experts_forward(self.layer, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, offloaded"


class OffloadEngine:
    def __init__(self, *, store, cache, inner: dict[int, nn.Module], device: torch.device,
                 prefetcher=None, cpu_experts: str = "off"):
        if cpu_experts not in CPU_EXPERT_MODES:
            raise ValueError(f"cpu_experts={cpu_experts!r} is unknown; use one of {list(CPU_EXPERT_MODES)}")
        self.store, self.cache, self.inner, self.device = store, cache, inner, device
        self.prefetcher, self.cpu_mode = prefetcher, cpu_experts
        self.stats = OffloadStats()
        self.cuda = device.type == "cuda"
        self.copy_priority = "normal"  # one of COPY_PRIORITIES (set_copy_priority)
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.layer_used: dict[int, torch.cuda.Event] = {}  # last compute event of each layer
        self.pending: dict[int, set[int]] = {layer: set() for layer in inner}  # slots with copies in flight
        # each part's bytes in an arena row and the pool it fills: what slot_copy reads (device_slots, _copy_run)
        self.arena_parts = [(offset, nbytes, cache.pools[name]) for name, offset, nbytes in store.spans]
        # the copy kernel's grid (_copy_run): small experts in an arena the device can read (pinned; any on the
        # CPU, through slot_copy's reference); 0: a copy per expert (store.copy_to, a cudaMemcpy per part)
        readable = store.arena is not None and (device.type != "cuda" or store.mode == "pinned")
        self.copy_programs = COPY_PROGRAMS if readable and store.expert_bytes <= COPY_KERNEL_MAX_BYTES else 0
        self.copy_wait = COPY_WAIT  # one of COPY_WAITS
        self.graph_prefetch = GRAPH_PREFETCH  # the decode graph's batch steps prefetch too (device_slots)
        self.prefetch_issue = PREFETCH_ISSUE  # one of PREFETCH_ISSUES
        # a batch step's bookkeeping (and its prefetch's) on CUDA: the one-launch kernel; False = the torch
        # reference's ~60 launches a call (what ran before the kernel: bench/offload_batch.py's A/B)
        self.batch_step_kernel = True
        self._fast_hits = torch.zeros((), dtype=torch.int64, device=device)
        self._timings: list = []  # (batch, tokens, seconds or CUDA events) per forward, see record_forward
        some = next(iter(inner.values()))
        self.impl = getattr(some.config, "_experts_implementation", "eager") or "eager"
        self.grouped = self.impl != "eager" and store.quantize == "none"
        if self.grouped:
            # the original experts modules now see the slot pool as their weights: ids are slot ids
            for layer, module in inner.items():
                for part, name in PARAM_OF_PART.items():
                    if part in cache.pools:  # biases too, when the experts have them (GPT-OSS)
                        module._parameters.pop(name, None)
                        setattr(module, name, cache.bank_pool(layer, part))
                module.num_experts = cache.capacity(layer)
        act = getattr(some.config, "hidden_act", None)
        self.activation = _MOESYS_ACTIVATIONS.get(act)  # None: quantized experts use the eager loop
        self.moe_backend = "grouped_mm"
        self.top_k = max(1, getattr(some.config, "num_experts_per_tok", 1))
        # routed rows from which quantized experts on the device path run as a grouped GEMM (_quantized_rows)
        self.quant_grouped_min_rows = QUANT_GROUPED_MIN_ROWS
        # quantized experts dequantized at once (in the workspace the memory plan reserves)
        self.dequant_experts = workspace_experts(self.top_k, self.store.dtype, kernel_available(self.device))
        self.cost_model = {}
        self._cpu_faster = False
        if cpu_experts == "auto" and self.cuda:
            self._measure_cost_model()
        # batch-1 decode with the bookkeeping on the device (moesys.offload.device_cache): the phase "graph",
        # set by the CUDA-graph decoder (moesys.offload.graph) around the steps it runs (graph_step)
        self._in_graph_step = False
        self.device_tables = None
        self._tables_on_device = False
        self._device_all_resident = False
        # the device path's prefetch in flight, per layer it fills: (copies done event, src, dst)
        self._device_prefetched: dict[int, tuple] = {}
        self._smallest_bank = min(cache.capacity(layer) for layer in inner)  # the banks are fixed from here on
        self.device_path_unsupported = self._device_path_unsupported()
        # the rows of a batch decode step on the device path that hold a sequence (moesys.offload.batch's
        # graph decode: the captured step always runs the whole batch); a free row takes its step's first
        # row's experts, so it costs no copy; None: every row is real
        self.batch_rows_valid: torch.Tensor | None = None
        # each phase's execution path, chosen once from the configuration above (moesys.offload.strategies)
        self.strategies = {phase: select_strategy(self, phase) for phase in PHASES}

    def _device_path_unsupported(self) -> str | None:
        """Why batch-1 decode cannot keep the cache bookkeeping on the device, or None when it can."""
        if self.store.arena is None:
            return "the memory-mapped host store has no pinned copy of the experts to read from the device"
        if self.cuda and not self.store.arena.is_pinned():
            return "experts are in pageable host memory (host_memory='memory'); the device reads pinned memory"
        if self.cpu_mode == "on":
            return "cpu_experts='on' computes missed experts on the host"
        if self.store.quantize != "none" and self.activation is None:
            return (f"quantized experts with hidden_act={self.inner[next(iter(self.inner))].config.hidden_act!r}: "
                    f"the device path fuses only {sorted(_MOESYS_ACTIVATIONS)}")
        if self.store.quantize == "none" and not self.grouped:
            return (f"experts_implementation={self.impl!r} runs transformers' per-expert loop, which needs the "
                    "routing on the host; use the model's grouped implementation (the default)")
        small = [layer for layer in self.inner if self.cache.capacity(layer) < self.top_k]
        if small:
            return (f"the cache banks of layers {small} hold fewer slots than the {self.top_k} experts a "
                    "token needs; give a larger gpu_memory")
        return None

    def device_batch_unsupported(self, rows: int) -> str | None:
        """Why a decode step of `rows` rows cannot keep the bookkeeping on the device, or None when it can:
        each layer's bank must hold every expert the rows may need at once, min(rows x K, E)."""
        if self.device_path_unsupported is not None:
            return self.device_path_unsupported
        need = min(rows * self.top_k, self.cache.num_experts)
        if self._smallest_bank >= need:  # the decode graph asks every batch step: no loop over layers
            return None
        small = [layer for layer in self.inner if self.cache.capacity(layer) < need]
        if small:
            return (f"the cache banks of layers {small} hold {min(self.cache.capacity(layer) for layer in small)} "
                    f"slots, fewer than the {need} experts {rows} rows may need at once; give a larger gpu_memory "
                    "or a smaller batch")
        return None

    # ---------------------------------------------------------------- all experts fit
    def make_resident(self) -> dict[int, nn.Module] | None:
        """When the cache holds every expert of every layer (and the grouped implementation runs them), load
        them all now, layer r's experts into slots [r*E, (r+1)*E) in expert order, and return the original
        experts modules pointed at those slots: the caller puts them back in the model, so decode runs the
        fully-resident model's own code with no engine work per layer. Banks do not matter here (each call
        sees E experts). None when it cannot, and for quantized experts, which the engine keeps running
        (it dequantizes them): those are loaded now all the same (`_load_every_expert`)."""
        E, layers = self.cache.num_experts, list(self.inner)
        if self.cache.num_slots < E * len(layers) or any(self.pending.values()):
            return None
        if not self.grouped:
            self._load_every_expert()
            return None
        cache = self.cache
        with torch.cuda.stream(self.copy_stream) if self.cuda else contextlib.nullcontext():
            for r, layer in enumerate(layers):
                for e in range(E):
                    self.store.copy_to(layer, e, cache.slot_views(r * E + e))
        if self.cuda:
            torch.cuda.synchronize(self.device)
        cache.free = [[] for _ in cache.banks]  # nothing is ever evicted or loaded again
        modules = {}
        for r, layer in enumerate(layers):
            for e in range(E):
                cache.slot_of[(layer, e)] = r * E + e
            cache.resident_per_layer[layer] = E
            module = self.inner[layer]
            for part, name in PARAM_OF_PART.items():
                if part in cache.pools:
                    setattr(module, name, cache.pools[part][r * E:(r + 1) * E])
            module.num_experts = E
            modules[layer] = module
            # the module sees this layer's slots only, in expert order: no remapping (keeps experts_forward,
            # the engine's own entry point, right)
            cache.slot_table_LE[cache.row[layer]] = torch.arange(E, device=cache.slot_table_LE.device)
        n = E * len(layers)
        self.stats = OffloadStats(copies=n, bytes_copied=n * self.store.expert_bytes, resident=True)
        return modules

    def _load_every_expert(self) -> None:
        """Quantized experts that all fit: load every one now, so each layer is complete from the first
        token and batch-1 decode takes the sync-free path of `_run_quantized_resident` (a layer whose bank
        is too small for all the layers it serves stays on the host-routed path, as it would anyway)."""
        for layer in self.inner:
            self._ensure(layer, list(range(self.cache.num_experts)))
        self._wait_all()
        n = self.cache.num_experts * len(self.inner)
        self.stats = OffloadStats(copies=n, bytes_copied=n * self.store.expert_bytes)

    def _wait_all(self) -> None:
        for layer, slots in self.pending.items():
            self._wait(layer, list(slots))

    # ---------------------------------------------------------------- public
    def record_forward(self, batch: int, tokens: int, elapsed) -> None:
        """One model forward of `batch` x `tokens`: `elapsed` seconds, or a (start, end) pair of CUDA timing
        events read later (bounded: every 256 forwards they are read, one sync)."""
        self._timings.append((batch, tokens, elapsed))
        if len(self._timings) >= 256:
            self._fold_timings()

    def _fold_timings(self) -> None:
        timings, self._timings = self._timings, []
        for batch, tokens, elapsed in timings:
            if isinstance(elapsed, tuple):
                elapsed[1].synchronize()
                elapsed = elapsed[0].elapsed_time(elapsed[1]) / 1e3
            if tokens > 1:
                self.stats.prefill_tokens += batch * tokens
                self.stats.prefill_s += elapsed
            else:
                self.stats.decode_tokens += batch
                self.stats.decode_s += elapsed

    def snapshot(self) -> OffloadStats:
        """Current statistics (also folds in what was counted on the device without a sync)."""
        self._fold_timings()
        self.stats.hits += int(self._fast_hits)
        self._fast_hits.zero_()
        d = self.device_tables
        if d is not None:
            lookups, misses, evictions, prefetched = d.counters.tolist()
            self.stats.hits += lookups - misses
            self.stats.misses += misses
            self.stats.copies += misses + prefetched
            self.stats.prefetch_copies += prefetched
            self.stats.bytes_copied += (misses + prefetched) * self.store.expert_bytes
            self.stats.evictions += evictions
            d.counters.zero_()
        return self.stats

    def reset_stats(self) -> None:
        self._timings = []
        self._fast_hits.zero_()
        if self.device_tables is not None:
            self.device_tables.counters.zero_()
        self.stats = OffloadStats(resident=self.stats.resident)
        if self.prefetcher is not None:
            self.prefetcher.reset()

    # ---------------------------------------------------------------- the layer
    @torch.no_grad()
    def experts_forward(self, layer, x_TH, ids_TK, w_TK):
        """y_TH of `layer`'s experts for the routing (ids_TK, w_TK): the strategy of this call's phase runs it
        (moesys.offload.strategies; chosen when the engine was built)."""
        phase = phase_of(x_TH.shape[0], self._in_graph_step)
        return self.strategies[phase].forward(layer, x_TH, ids_TK, w_TK)

    @contextlib.contextmanager
    def graph_step(self):
        """Calls made in here are moesys.offload.graph's decode steps: one token takes the graph strategy
        (bookkeeping on the device, no host sync), and the compiled step's custom ops find this engine."""
        self._in_graph_step = True
        _ACTIVE.append(self)
        try:
            yield
        finally:
            _ACTIVE.pop()
            self._in_graph_step = False

    # ---------------------------------------------------------------- batch-1 decode on the device
    def device_slots(self, layer: int, ids_TK: torch.Tensor, global_slots: bool = False,
                     x_TH: torch.Tensor | None = None) -> torch.Tensor:
        """The slots [T, K] of the rows' experts of `layer` (bank-local, or indices into the whole pool when
        `global_slots`), made resident without a host sync: hits, victims and table updates on the device
        (DeviceCacheTables.step; a batch's shared experts once), misses copied by a kernel reading the pinned
        store (in stream order, before whatever reads the slots next). A batch step (T > 1) evicts by
        next-visit (the policy "auto" or "next-visit": LRU and LFU hit nothing once a step needs nearly every
        expert of every layer) and, given the layer's input `x_TH`, prefetches the next layer's guessed
        experts on the copy stream while this layer computes (`_device_prefetch`)."""
        if not self._tables_on_device:
            self._tables_to_device()
        T = ids_TK.shape[0]
        ids_TK = self.step_ids(ids_TK)
        if self._device_all_resident:
            # every expert of every layer is in its slot and stays there (nothing can miss, so nothing is
            # evicted): no bookkeeping or copy kernels, only the lookup; hits are counted per step on the
            # host (note_device_step), a batch's distinct experts on the device
            if T > 1:
                self.count_distinct_hits(ids_TK)
            return self._table_slots(layer, ids_TK, global_slots)
        row = self.cache.row[layer]
        if self.prefetch_issue not in PREFETCH_ISSUES:
            raise ValueError(f"prefetch_issue={self.prefetch_issue!r}; use one of {list(PREFETCH_ISSUES)}")
        early = self.prefetch_issue == "early"
        if not early:
            self._join_prefetch(layer)
        next_visit = row if T > 1 and self.cache.batch_device_policy == "next-visit" else None
        # The table step may pick as a victim a slot this layer's prefetch is still copying into (a guess this
        # step does not need): only its writes must wait, so with "early" the join comes before the miss copy
        slot_N, src_N, dst_N = self.device_tables.step(row, ids_TK.reshape(-1), distinct=T == 1,
                                                       next_visit_from=next_visit, use_kernel=self._use_kernel(T > 1))
        # inside a CUDA graph capture only with graph_prefetch (GRAPH_PREFETCH): otherwise the batch graph's steps
        # copy in stream order
        capturing = self.cuda and torch.cuda.is_current_stream_capturing()
        prefetch = T > 1 and x_TH is not None and (self.graph_prefetch or not capturing)
        if early:
            # the next layer's copies queue on the copy stream behind this layer's (stream order keeps a slot's
            # two writes in order; this layer's slots are protected from its victims)
            if prefetch:
                self._device_prefetch(layer, x_TH, slot_N, next_visit)
            self._join_prefetch(layer)
        slot_copy.copy_parts(self.store.arena, self.arena_parts, src_N, dst_N)
        if prefetch and not early:
            self._device_prefetch(layer, x_TH, slot_N, next_visit)
        return (dst_N if global_slots else slot_N).view(ids_TK.shape)

    def _use_kernel(self, batch: bool) -> bool | None:
        """DeviceCacheTables.step's use_kernel: its default, unless this is a batch step (or a prefetch) and batch
        steps were asked to take the torch reference (batch_step_kernel = False)."""
        return False if batch and not self.batch_step_kernel else None

    def step_ids(self, ids_TK: torch.Tensor) -> torch.Tensor:
        """The ids a decode step's rows look up: a free row of a captured batch step (batch_rows_valid) takes
        the first row's experts, so it costs no copy; the compute over the slots must group by these too."""
        T = ids_TK.shape[0]
        if T > 1 and self.batch_rows_valid is not None:
            return torch.where(self.batch_rows_valid[:T, None], ids_TK, ids_TK[:1])
        return ids_TK

    def _device_prefetch(self, layer: int, x_TH: torch.Tensor, slot_N: torch.Tensor, next_visit) -> None:
        """The next layer's guessed experts (its router on this layer's input, NextGatePrefetcher.guess) made
        resident by a device step of their own, and copied on the copy stream while this layer computes; the
        next layer's device_slots waits for them (`_join_prefetch`). This layer's slots `slot_N` are never
        victims; at most what the next layer's bank holds beside them is guessed (the guess is ordered most
        wanted first, so a fixed-size head of it keeps the step's shapes fixed: CUDA graph capture)."""
        if self.prefetcher is None:
            return
        nxt = self.prefetcher.next_layer.get(layer)
        if nxt is None:
            return
        need = min(slot_N.numel(), self.cache.num_experts)
        same_bank = self.cache.bank_of[nxt] == self.cache.bank_of[layer]
        room = self.cache.capacity(nxt) - (need if same_bank else 0)
        if room <= 0:
            return
        guess_M = self.prefetcher.guess(layer, x_TH)[:room]
        guess_M = torch.where(guess_M >= 0, guess_M, guess_M[:1])  # no vote: a repeat of the most wanted one
        _, src_M, dst_M = self.device_tables.step(
            self.cache.row[nxt], guess_M, distinct=False, next_visit_from=next_visit,
            protect_N=slot_N if same_bank else None, prefetch=True, use_kernel=self._use_kernel(batch=True))
        if not self.cuda:
            slot_copy.copy_parts(self.store.arena, self.arena_parts, src_M, dst_M)
            return
        # the copy stream starts after everything queued so far: the victims' last readers (earlier layers)
        # and this step's table updates; the next layer's step waits for its end
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            # a bounded grid, as the host path's copies beside compute (a full one would hold every SM while
            # it waits on PCIe): the engine's copy_programs, or where the host path copies per expert (0: large
            # experts) the default, as the device path always copies through the kernel
            slot_copy.copy_parts(self.store.arena, self.arena_parts, src_M, dst_M,
                                 programs=self.copy_programs or COPY_PROGRAMS)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        # src/dst were allocated on the compute stream: held until the compute stream has waited for the copy
        self._device_prefetched[nxt] = (done, src_M, dst_M)

    def _join_prefetch(self, layer: int) -> None:
        """The compute stream waits for the copies prefetched into `layer`: before its step's miss copies write
        a slot (a victim may be one they are still filling) and before its compute reads them."""
        pending = self._device_prefetched.pop(layer, None)
        if pending is not None and self.cuda:
            torch.cuda.current_stream(self.device).wait_event(pending[0])

    def forget_captured_prefetches(self) -> None:
        """After a failed CUDA graph capture: the prefetches it forked never ran, and their events were recorded
        under the capture, so no stream may wait for them outside it (the eager steps that follow would)."""
        self._device_prefetched.clear()

    def count_distinct_hits(self, ids_TK: torch.Tensor) -> None:
        """A step whose experts are all resident: each distinct expert of its rows is one hit, counted on the
        device (bincount would sync) and folded into the statistics by snapshot()."""
        seen_E = torch.zeros(self.cache.num_experts, dtype=torch.bool, device=ids_TK.device)
        self._fast_hits += seen_E.index_fill_(0, ids_TK.flatten(), True).sum()

    def ensure_device_tables(self) -> None:
        """Put the cache bookkeeping on the device now (eagerly: before a CUDA graph replays steps that use
        it), if the device path is what batch-1 decode will take."""
        if self.device_path_unsupported is None and not self._tables_on_device:
            self._tables_to_device()

    def _tables_to_device(self) -> None:
        self._wait_all()  # host-path copies in flight land before the device reads or replaces slots
        if self.device_tables is None:
            self.device_tables = DeviceCacheTables(self.cache, self.cache.device_policy)
        self.device_tables.load_from_host()
        if self.prefetcher is not None:
            self.prefetcher.reset()
        self._tables_on_device = True
        # complete is for good: a layer with all its experts never misses, so it never evicts
        self._device_all_resident = all(self.cache.layer_complete(layer) for layer in self.inner)

    def note_device_step(self, rows: int = 1) -> None:
        """One decode step of `rows` rows taken on the device path (called by the decode graph per step,
        replayed or not): a batch-1 step's hits, when the all-resident shortcut skipped the device tables'
        counters (a batch step counts its distinct experts on the device)."""
        if rows == 1 and self._tables_on_device and self._device_all_resident:
            self.stats.hits += self.top_k * len(self.inner)

    def _tables_to_host(self) -> None:
        for layer in list(self._device_prefetched):  # the host path reads slots without the device's events
            self._join_prefetch(layer)
        self.device_tables.store_to_host()
        if self.cuda:  # host-path copies into slots must follow the device path's last reads of them
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        self.layer_used.clear()
        self._tables_on_device = False

    # ---------------------------------------------------------------- cache traffic
    def _ensure(self, layer: int, experts: list[int], keep=()) -> list[int]:
        """Slots holding `experts` of `layer`, issuing copies for the missing ones (one run, `_copy_run`);
        neither they nor the experts `keep` of the layer (a wave being computed) are evicted for them."""
        protect = {(layer, e) for e in (*experts, *keep)}
        slots, loaded_e, loaded_s, waits = [], [], [], {}
        for e in experts:
            slot = self.cache.lookup((layer, e))
            if slot is None:
                slot = self._allocate((layer, e), protect, waits)
                loaded_e.append(e)
                loaded_s.append(slot)
                self.stats.misses += 1
            else:
                self.stats.hits += 1
            slots.append(slot)
        self._copy_run(layer, loaded_e, loaded_s, waits)
        self.cache.update_table(layer, loaded_e, loaded_s)
        return slots

    def set_copy_priority(self, priority: str) -> None:
        """The copy stream's priority, one of COPY_PRIORITIES: "high" is the greatest the device has
        (torch.cuda.Stream.priority_range), "normal" the default 0. Waits for the device first: the stream is
        replaced, and nothing may still be queued on the old one."""
        if priority not in COPY_PRIORITIES:
            raise ValueError(f"copy priority {priority!r} is unknown; use one of {list(COPY_PRIORITIES)}")
        self.copy_priority = priority
        if self.cuda:
            torch.cuda.synchronize(self.device)
            level = torch.cuda.Stream.priority_range()[1] if priority == "high" else 0
            self.copy_stream = torch.cuda.Stream(self.device, priority=level)

    def _copy_stream(self):
        """The side stream, for a run of copies: entered once per run (entering it per copy cost about a
        third of a miss's host time: bench/results/offload_batch_profile_int4_u128_h100_11a61c9.txt)."""
        return torch.cuda.stream(self.copy_stream) if self.cuda else contextlib.nullcontext()

    def _prefetch(self, layer: int, guessed: list[int], protect: list[int]) -> None:
        nxt = self.prefetcher.next_layer[layer]
        self.prefetcher.record(layer, guessed)
        keep = {(layer, e) for e in protect} | {(nxt, e) for e in guessed}
        # never let a guess evict what this layer needs, nor take more than half the cache
        same_bank = self.cache.bank_of[nxt] == self.cache.bank_of[layer]
        budget = max(0, min(len(guessed), self.cache.capacity(nxt) // 2 - (len(protect) if same_bank else 0)))
        loaded_e, loaded_s, waits = [], [], {}
        for e in guessed:
            if (nxt, e) in self.cache.slot_of:
                continue
            if budget == 0 or not self.cache.can_allocate(nxt, keep):  # a batch's guesses may cover the bank
                break
            budget -= 1
            loaded_e.append(e)
            loaded_s.append(self._allocate((nxt, e), keep, waits))
        self._copy_run(nxt, loaded_e, loaded_s, waits)
        self.stats.prefetch_copies += len(loaded_e)
        self.cache.update_table(nxt, loaded_e, loaded_s)

    def _allocate(self, key, protect, waits: dict) -> int:
        """A slot for `key` (the policy's victim outside `protect` evicted), whose copy `_copy_run` issues;
        adds to `waits` the last-use event of the evicted expert's layer (its last reader of the slot)."""
        slot, evicted = self.cache.allocate(key, protect)
        if evicted is not None:
            self.stats.evictions += 1
            self.pending[evicted[0]].discard(slot)
            used = self.layer_used.get(evicted[0]) if self.cuda else None
            if used is not None:
                waits[id(used)] = used
        return slot

    def _copy_run(self, layer: int, experts: list[int], slots: list[int], waits: dict) -> None:
        """Copy `experts` of `layer` into their allocated `slots`: on CUDA on the copy stream, after the
        evicted experts' last readers (`waits`), one event marking every slot ready. From a pinned store one
        bounded-grid kernel launch copies all of them (slot_copy: `copy_programs` programs reading the pinned
        arena); a cudaMemcpy per part per expert cost about 47 us of host time per miss at int4, one launch
        per run 7 us (fitted at batch 32: bench/results/offload_batch_int4_h100_ede5ca8.json, _b0df6cc.json).
        With copy_programs 0 (larger experts than COPY_KERNEL_MAX_BYTES, an mmap store's staging, ordinary
        memory beside a GPU) each expert is copied on its own. On the CPU the same row-indexed copy
        (slot_copy's reference) moves the bytes."""
        if not experts:
            return
        with self._copy_stream():
            if self.cuda:
                for used in waits.values():
                    self.copy_stream.wait_event(used)
            if self.copy_programs:
                idx = torch.tensor([[self.store.row_index(layer, e) for e in experts], slots], dtype=torch.int64)
                if self.cuda:
                    idx = idx.pin_memory().to(self.device, non_blocking=True)
                slot_copy.copy_parts(self.store.arena, self.arena_parts, idx[0], idx[1], programs=self.copy_programs)
            else:
                for e, slot in zip(experts, slots):
                    self.store.copy_to(layer, e, self.cache.slot_views(slot))
            if self.cuda:
                event = torch.cuda.Event()
                event.record(self.copy_stream)
                for slot in slots:
                    self.cache.ready[slot] = event
                self.pending[layer].update(slots)
        self.stats.copies += len(experts)
        self.stats.bytes_copied += len(experts) * self.store.expert_bytes

    def _wait(self, layer: int, slots: list[int]) -> None:
        """The copies into `slots` land before the compute queued next reads them (copy_wait: the host blocks
        on each run's event, timed in copy_wait_s, or the compute stream waits for it); the slots are then no
        longer pending. A run's event is waited for once, however many of its slots are listed."""
        if self.copy_wait not in COPY_WAITS:
            raise ValueError(f"copy_wait={self.copy_wait!r}; use one of {list(COPY_WAITS)}")
        waited = set()
        for slot in slots:
            event = self.cache.ready[slot]
            if event is None:
                continue
            if id(event) not in waited:
                waited.add(id(event))
                if self.copy_wait == "device":
                    torch.cuda.current_stream(self.device).wait_event(event)
                elif not event.query():
                    t0 = time.perf_counter()
                    event.synchronize()
                    self.stats.copy_wait_s += time.perf_counter() - t0
            self.cache.ready[slot] = None
            self.pending[layer].discard(slot)

    def _mark_used(self, layer: int) -> None:
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
            self.layer_used[layer] = event

    # ---------------------------------------------------------------- compute
    def _run_grouped(self, layer, x_TH, ids_TK, w_TK):
        return self.inner[layer](x_TH, self._table_slots(layer, ids_TK), w_TK)

    def _wave_rows(self, flat_host: list[int], index_of: dict[int, int], K: int):
        """The routed rows (t*K + j) whose expert is a key of `index_of`, on the device: (row_N, index_N,
        counts per top-k position), in top-k order (`rows_by_chunk`, one chunk). From the ids already on
        the host (no sync); None when the wave has no row."""
        flat_R = np.asarray(flat_host, dtype=np.int64)
        pos, [(_, _, per_k)] = rows_by_chunk(flat_R, dict.fromkeys(index_of, 0), 1, K)
        if not pos.size:
            return None
        idx = torch.from_numpy(np.stack((pos, lookup(index_of, flat_R[pos]))))
        if self.cuda:
            idx = idx.pin_memory().to(self.device, non_blocking=True)
        return idx[0], idx[1], per_k

    @staticmethod
    def _add_rows(out_TH, tok_N, y_NH, per_k) -> None:
        """out_TH[tok_N] += y_NH, one index_add_ per top-k position (rows in top-k order): no call adds to a
        token twice, so no colliding atomic adds, which would sum in a different order from run to run."""
        y_NH, begin = y_NH.to(out_TH.dtype), 0  # one cast, not one per position
        for n in per_k:
            if n:
                out_TH.index_add_(0, tok_N[begin:begin + n], y_NH[begin:begin + n])
            begin += n

    def _run_grouped_rows(self, layer, x_TH, w_TK, experts_slots, out_TH, flat_host) -> None:
        """The routed rows of these (expert, slot) pairs through the model's grouped implementation in one
        call over bank-local slot ids, each row a token of its own (top-1, its routing weight applied),
        added to out_TH by token."""
        K = w_TK.shape[1]
        start = self.cache.banks[self.cache.bank_of[layer]][0]
        rows = self._wave_rows(flat_host, {e: s - start for e, s in experts_slots}, K)
        if rows is None:
            return
        row_N, slot_N, per_k = rows
        tok_N = row_N // K
        y_NH = self.inner[layer](x_TH[tok_N], slot_N.view(-1, 1), w_TK.reshape(-1)[row_N].view(-1, 1))
        self._add_rows(out_TH, tok_N, y_NH, per_k)

    def _table_slots(self, layer, ids: torch.Tensor, global_slots: bool = False) -> torch.Tensor:
        """The slots of resident experts `ids` of `layer` (any shape), looked up in the device table:
        bank-local, or indices into the whole pool when `global_slots`."""
        slots = self.cache.slot_table_LE[self.cache.row[layer]][ids]
        return slots + self.cache.banks[self.cache.bank_of[layer]][0] if global_slots else slots

    def _weights(self, parts: dict, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.store.quantize == "none":
            return parts["gate_up"], parts["down"]
        mode = self.store.quantize
        gu, d = (quant.dequantize(parts[f"{n}.q"][None], parts[f"{n}.scale"][None], mode, dtype)[0]
                 for n in ("gate_up", "down"))
        return gu, d

    def _run_loop(self, layer, x_TH, ids_TK, w_TK, experts_slots, out_TH, flat_host) -> None:
        """transformers' eager expert loop (same ops, same order) over slots, or the host store for slot
        None. Token positions come from the ids already read to the host, so the loop never syncs."""
        act = getattr(self.inner[layer], "act_fn", None)
        K = ids_TK.shape[1]
        order = sorted(experts_slots)
        ids_KT = torch.tensor(flat_host, dtype=torch.int64).view(-1, K).t()
        # Per expert its (k, t) positions in (k, t) order, as transformers' torch.where over its
        # [E, K, T] mask gives them (on the host copy of the ids: no device sync).
        kt_per_expert = [(ids_KT == e).nonzero() for e, _ in order]
        kt_N2 = torch.cat(kt_per_expert) if kt_per_expert else torch.zeros(0, 2, dtype=torch.int64)
        if kt_N2.shape[0] == 0:
            return
        if self.cuda:
            kt_N2 = kt_N2.pin_memory().to(self.device, non_blocking=True)
        start = 0
        for (e, slot), kt in zip(order, kt_per_expert):
            n = kt.shape[0]
            if n == 0:
                continue
            top_k_pos, token_idx = kt_N2[start:start + n, 0], kt_N2[start:start + n, 1]
            start += n
            x = x_TH[token_idx]
            if slot is None:  # computed where the weights already are: the host
                parts, x = self.store.host_parts(layer, e), x.to("cpu", self.store.dtype)
            else:
                parts = self.cache.slot_views(slot)
            h = self._expert_out(layer, x, parts, act).to(x_TH.device, x_TH.dtype)
            h = h * w_TK[token_idx, top_k_pos, None]
            out_TH.index_add_(0, token_idx, h.to(out_TH.dtype))

    def _expert_out(self, layer: int, x_NH: torch.Tensor, parts: dict, act) -> torch.Tensor:
        """One expert's output for rows x_NH from its parts (a cache slot or the host store)."""
        if self.store.layout != ExpertLayout():
            return _expert_mlp(self.inner[layer], x_NH, parts)
        w_gu, w_d = self._weights(parts, x_NH.dtype)
        gate, up = F.linear(x_NH, w_gu).chunk(2, dim=-1)
        return F.linear(act(gate) * up, w_d)

    def _dequantize_slots(self, slots: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [n, 2I, H], down [n, H, I]) of the cache slots `slots` (a device index), in `dtype`."""
        pools, mode = self.cache.pools, self.store.quantize
        return tuple(dequantize_slots(pools[f"{n}.q"], pools[f"{n}.scale"], slots, mode, dtype)
                     for n in ("gate_up", "down"))

    def _run_quantized_resident(self, layer, x_TH, ids_TK, w_TK):
        """A few routed rows (T*K <= the dequantization workspace) of a layer whose quantized experts are all
        resident: the slots come from the device table and each routed row meets its own expert (a token's
        K experts are distinct), so nothing is read back to the host. One row per expert needs no sorting
        or grouping: two quant_gemv calls (a handful of launches, which is what decode pays)."""
        return self._quantized_rows(x_TH, ids_TK, self._table_slots(layer, ids_TK.reshape(-1), global_slots=True),
                                    w_TK)

    def _quantized_rows(self, x_TH, ids_TK, slots_N, w_TK):
        """Row t*K + j of the routing through the quantized expert in slot slots_N[t*K + j], read packed (no
        dequantized copy of the weights). Up to `quant_grouped_min_rows` routed rows, by quant_gemv (a program
        per row: the gate/up call reads each token's row in place, the down call applies the activation and
        sums the top-k combine in fp32, as moe_mlp does); from there on by quant_grouped's grouped GEMM, which
        reads a slot's packed weights once per block of its rows instead of once per row."""
        pools, mode = self.cache.pools, self.store.quantize
        if slots_N.numel() >= self.quant_grouped_min_rows:
            return quant_moe_mlp(x_TH, pools, ids_TK, slots_N.view(w_TK.shape), w_TK, mode, self.activation,
                                 self.cache.num_experts)
        h_NF = quant_gemv(x_TH, pools["gate_up.q"], pools["gate_up.scale"], slots_N, mode)
        return quant_gemv(h_NF, pools["down.q"], pools["down.scale"], slots_N, mode, activation=self.activation,
                          weight_TK=w_TK)

    def _run_dequant(self, x_TH, w_TK, experts, slots, out_TH, flat_host) -> None:
        """Quantized experts of one wave, dequant_experts at a time: each chunk's slots are dequantized together
        into a compact [n, ...] workspace and moesys' moe_mlp runs the chunk's routed rows only (each a token
        of its own, top-1, over workspace ids). The rows of every chunk come from one pass over the routing
        and reach the GPU in one copy with the slots (a pass and two copies per chunk cost a B=128 int4 step
        about 50 ms of host time on an H100: bench/results/offload_batch_profile_int4_u128_h100_11a61c9.txt)."""
        K, n = w_TK.shape[1], self.dequant_experts
        index_of = {e: i for i, e in enumerate(experts)}  # chunk i // n, workspace index i % n
        chunk_of = {e: i // n for e, i in index_of.items()}
        flat_R = np.asarray(flat_host, dtype=np.int64)
        pos, spans = rows_by_chunk(flat_R, chunk_of, -(-len(experts) // n), K)
        if not pos.size:
            return
        # rows, their workspace index, then the wave's slots: one tensor, one copy
        idx = torch.from_numpy(np.concatenate((pos, lookup(index_of, flat_R[pos]) % n,
                                               np.asarray(slots, dtype=np.int64))))
        if self.cuda:
            idx = idx.pin_memory().to(self.device, non_blocking=True)
        N = pos.size
        row_N, index_N, slot_E = idx[:N], idx[N:2 * N], idx[2 * N:]
        tok_N = row_N // K
        w_N = w_TK.reshape(-1)[row_N].to(x_TH.dtype)
        for c, (begin, end, per_k) in enumerate(spans):
            if begin < end:
                self._dequant_chunk(x_TH, tok_N[begin:end], index_N[begin:end], w_N[begin:end],
                                    slot_E[c * n:(c + 1) * n], per_k, out_TH)

    def _dequant_chunk(self, x_TH, tok_N, index_N, w_N, slots, per_k, out_TH) -> None:
        """Routed rows (token tok_N[i] through workspace expert index_N[i], weight w_N[i]) over the experts of
        cache slots `slots` (a device index), dequantized; summed into out_TH by token."""
        w_gu, w_d = self._dequantize_slots(slots, x_TH.dtype)
        y_NH = moe_mlp(x_TH[tok_N], w_gu, w_d, index_N.view(-1, 1), w_N.view(-1, 1),
                       activation=self.activation, backend=self.moe_backend)
        self._add_rows(out_TH, tok_N, y_NH, per_k)

    # ---------------------------------------------------------------- cost model
    def _measure_cost_model(self) -> None:
        """Batch-1 decode: is computing a missed expert on the CPU (send x over, matvec from host memory, bring
        y back, all on the critical path) faster than copying it to the GPU? Copies are timed back to back,
        as they stream on the side stream, so their per-expert time is the bandwidth-bound one."""
        layer = next(iter(self.inner))
        x_dev = torch.randn(1, self.store.H, dtype=self.store.dtype, device=self.device)
        n = min(4, self.cache.num_slots, self.cache.num_experts)
        cpu_s = copy_s = float("inf")
        for _ in range(3):
            torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            # as the CPU path does
            self._expert_out(layer, x_dev.to("cpu"), self.store.host_parts(layer, 0), F.silu).to(self.device)
            torch.cuda.synchronize(self.device)
            cpu_s = min(cpu_s, time.perf_counter() - t0)
            t0 = time.perf_counter()
            for slot in range(n):
                self.store.copy_to(layer, slot, self.cache.slot_views(slot))
            torch.cuda.synchronize(self.device)
            copy_s = min(copy_s, (time.perf_counter() - t0) / n)
        self.cost_model = {"cpu_expert_s": cpu_s, "copy_expert_s": copy_s}
        self._cpu_faster = cpu_s < copy_s

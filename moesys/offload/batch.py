"""Offline batch generation with continuous batching: `generate_batch(model, prompts, ...)` yields each
sequence's result as soon as it finishes, and a finished sequence's place in the batch is refilled from
the queue.

The sequences that join the batch at the same step are prefilled together (left-padded, one forward per
group of at most PREFILL_RESERVE_TOKENS padded tokens, what the offload memory plan reserves activations
for), then decoded with the others, one token per row per step, through one forward of the whole batch:
the offload engine then sees the batch's routing in one call per layer and copies each needed expert
once for all rows (moesys.offload.engine.experts_forward takes the
union of the rows' top-k). Rows are left-padded in a shared KV cache with per-row positions and an
attention mask (moesys.offload.batch_kv), so greedy decoding gives every sequence the tokens it gets
decoded alone. Decoding is greedy (argmax, no logits processors).

Memory: the offload loader reserved the generation cache of `max_context` tokens; a batch shares it, so
batch_size rows of (longest prompt + max_new_tokens) tokens must fit in it (checked before anything
runs): batch_size x longest <= max_context, less for a hybrid model whose rows also keep recurrent states
(moesys.offload.cache_bytes).
With kv="host" the KV cache lives in host memory and attention runs on the CPU (moesys.offload.host_kv).

graph=True: the decode steps replay moesys's CUDA graph (moesys.offload.graph) with the expert cache's
bookkeeping on the device, as batch-1 decode does: the KV cache has fixed shapes (moesys.offload.
batch_static_kv: batch_size rows of at most (max_context - longest prompt) / batch_size columns: a joining
group's prefill cache lives beside it until it is copied in), a finished row's place is free until a
joining sequence takes it, and a free row costs no expert copy. The run's captured graph is released at its
end (its output holds the run's cache). The host-routed steps (the
default) overlap the resident experts' compute with the misses' copies and prefetch the next layer's
experts; the graph's steps do too (engine.graph_prefetch: the copy stream forked and joined inside the capture)
and launch nothing from the host.

Legend: B rows in the batch, L cached columns, V vocabulary.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from moesys.offload.batch_kv import PaddedBatchKV, cache_kwarg
from moesys.offload.batch_static_kv import StaticBatchKV, other_cache_layers
from moesys.offload.host_kv import host_attention
from moesys.offload.loader import PREFILL_RESERVE_TOKENS
from moesys.offload.perf_model import KV_PLACES as KV_MODES
from moesys.offload.sizes import format_bytes

# Where eager decode steps keep the expert cache's bookkeeping. "auto" is "device" wherever the device path
# runs: on the OLMoE shape (int4, 4 GiB, one H200, bench/results/offload_batch_int4_bookkeeping_h200_29f3b2c.json)
# it was 1.07-1.40x the host path at batch 8, 32 and 128 once its quantized experts ran as a grouped GEMM
# from engine.QUANT_GROUPED_MIN_ROWS routed rows (row by row, quant_gemv, it had been 0.79-0.85x at batch 128).
BOOKKEEPING = ("auto", "host", "device")
# graph="auto" takes the decode graph for quantized experts up to this many rows: where it was measured to pay
# (the Qwen3-30B-A3B shape, int4, 16 GiB, one H100, the model's routing, one load each: B=8 7x the eager steps,
# bench/results/offload_batch_qwen3_int4_graph_h100_95e04b3.json; with the graph's prefetch (engine.GRAPH_PREFETCH)
# B=32 509 against 292 tok/s, B=64 847 against 654, B=128 1613 against 1263, _graph_h100_6596bf6.json and
# _graph_prefetch_h100_6596bf6.json; before that prefetch the eager steps won at B=128). Larger batches were not
# measured and keep the eager steps; graph=True runs the graph at any size.
GRAPH_AUTO_MAX_ROWS = 128


# sdpa backends for the batch's forwards: all but cuDNN. cuDNN's attention builds a graph per shape, and
# the key length grows by one every decode step, so it rebuilt one per layer and step: on an H100 (torch
# 2.11) 1.67 ms of host time per call, 19% of a batch-1 step's (bench/results/
# offload_batch_profile_B1_h100_e0b33fe.txt). Flash / memory-efficient attention have no per-shape setup.
DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class Request:
    """One prompt: its token ids, optionally its own max_new_tokens and an id carried to the result."""
    token_ids: list[int]
    max_new_tokens: int | None = None
    id: object = None


@dataclass
class Result:
    index: int               # position of the prompt in the input
    id: object               # the request's id (None when not given)
    prompt_ids: list[int]
    token_ids: list[int]     # generated tokens, the EOS included when the sequence stopped on it
    finish_reason: str       # "eos" or "length"


@dataclass
class _Row:
    index: int
    request: Request
    max_new: int
    tokens: list[int] = field(default_factory=list)


def _as_request(prompt) -> Request:
    if isinstance(prompt, Request):
        request = prompt
    elif isinstance(prompt, torch.Tensor):
        request = Request(prompt.flatten().tolist())
    elif isinstance(prompt, (list, tuple)):
        request = Request(list(prompt))
    else:
        raise TypeError(f"a prompt must be a list of token ids, a 1-D tensor or a moesys.offload.batch.Request, "
                        f"got {type(prompt).__name__}")
    ids = request.token_ids
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"prompt token ids must be a non-empty list of non-negative integers, got {ids[:8]!r}")
    return request


def _eos_set(model, eos) -> set[int]:
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in ([eos] if isinstance(eos, int) else eos)}


class BatchGeneration:
    """Iterate to run: yields a Result per sequence in the order they finish. Counters (prefills,
    decode_steps, generated_tokens, elapsed_s) are for progress, benchmarks and tests."""

    def __init__(self, model, requests: list[Request], max_new_tokens: int, batch_size: int, eos: set[int],
                 continuous: bool, kv: str = "device", graph: bool = False, bookkeeping: str = "auto"):
        self.model, self.requests, self.batch_size, self.eos, self.continuous, self.kv, self.graph = (
            model, requests, batch_size, eos, continuous, kv, graph)
        self.bookkeeping = bookkeeping
        self.max_new = [r.max_new_tokens if r.max_new_tokens is not None else max_new_tokens for r in requests]
        self.prefills = self.decode_steps = self.generated_tokens = 0
        self.elapsed_s = 0.0
        self.device = next(model.parameters()).device

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.elapsed_s if self.elapsed_s else 0.0

    def __iter__(self) -> Iterator[Result]:
        if self.kv == "host":
            with host_attention(self.model):
                yield from self._run()
        else:
            yield from self._run()

    def _run(self) -> Iterator[Result]:
        if not self.requests:
            return  # nothing to prefill or decode (no batch to size a cache for)
        graph = getattr(self.model, "moesys_decode_graph", None)
        if self.batch_size == 1 and self.kv == "device" and graph is not None:
            yield from self._run_alone()
            return
        rows = self._graph_rows() if self.graph is True or (self.graph == "auto" and self._graph_pays()) else None
        if rows is not None:
            yield from self._run_graph(rows)
            return
        queue = deque(range(len(self.requests)))
        kv = PaddedBatchKV(self.model.config, self.device, host=self.kv == "host", cache_name=cache_kwarg(self.model))
        rows: list[_Row] = []
        while queue or rows:
            t0 = time.perf_counter()
            done = []
            # continuous batching refills any free place; static batching only an empty batch (a sequence
            # that ends at its prefill frees its place at once)
            while (self.continuous or not rows) and queue and len(rows) < self.batch_size:
                joining = self._next_group(queue, self.batch_size - len(rows))
                # the joining prompts are prefilled together (left-padded): one forward, so each expert
                # they need is copied once for all of them
                kv.add(self._prefill(kv, joining), [len(row.request.token_ids) for row in joining])
                rows += joining
                self._leave(rows, kv, done)
            if rows:
                last_B1 = torch.tensor([[row.tokens[-1]] for row in rows], device=self.device)
                with self._device_steps(len(rows)):
                    tokens = self._forward(input_ids=last_B1, **kv.step_inputs())
                for row, token in zip(rows, tokens):
                    self._append(row, token)
                self.decode_steps += 1
                self._leave(rows, kv, done)
            self.elapsed_s += time.perf_counter() - t0
            for row in done:
                yield self._result(row)

    def _device_steps(self, rows: int):
        """bookkeeping="device": an eager decode step of `rows` rows runs the decode graph's sync-free layer
        path (OffloadEngine.device_slots: the bookkeeping on the device, the next layer prefetched on the copy
        stream), so the host queues the whole step without waiting for any layer; where the banks cannot
        hold what the rows may need at once, the host-routed step, as with "host". "auto": "device"."""
        engine = getattr(self.model, "moesys_offload", None)
        if self.bookkeeping == "host" or engine is None or engine.device_batch_unsupported(rows) is not None:
            return contextlib.nullcontext()
        return engine.graph_step()

    def _graph_pays(self) -> bool:
        """graph="auto": the decode graph where it was measured faster than the eager steps and can run
        quietly: quantized experts on CUDA at up to GRAPH_AUTO_MAX_ROWS rows (the Qwen3-30B-A3B shape, int4,
        16 GiB, on an H100: B=8 168.5 against 32.3 tok/s, B=32 509 against 292, B=128 1613 against 1263), wherever
        graph=True would run (_graph_blocker). bf16 experts keep the eager steps (the OLMoE shape, B=8: the graph
        4% slower, measured before the graph's steps prefetched; not measured since), and so do larger batches."""
        engine = getattr(self.model, "moesys_offload", None)
        if (engine is None or getattr(self.model, "moesys_decode_graph", None) is None or not engine.cuda
                or engine.store.quantize == "none" or self._rows() > GRAPH_AUTO_MAX_ROWS):
            return False
        return self._graph_blocker(engine, self._rows()) is None

    def _rows(self) -> int:
        return min(self.batch_size, len(self.requests))

    def _graph_blocker(self, engine, rows: int) -> str | None:
        """Why the graph decode's steps cannot run these rows (the bookkeeping on the device, a fixed-shape
        full-attention KV cache on the device), or None."""
        if self.kv != "device":
            return "kv='host' keeps the KV cache on the host"
        other = other_cache_layers(self.model.config)
        if other:
            return f"the fixed-shape batch cache holds full-attention layers only, and this model's has {other}"
        longest, prompt = self._longest(), self._longest_prompt()
        if self._graph_columns(rows) < longest:
            need = engine.plan.cache.context_for(rows, longest) + prompt
            return (f"its fixed-shape cache of {rows} rows x {longest} tokens, beside a joining prompt's prefill "
                    f"cache of {prompt} tokens, needs max_context>={need} (loaded with max_context="
                    f"{engine.max_context})")
        return engine.device_batch_unsupported(rows)

    def _graph_rows(self) -> int | None:
        """The rows of the graph decode's fixed-shape batch, or None (said once) when its steps cannot keep
        the expert cache's bookkeeping on the device: the host-routed steps run instead, same tokens."""
        engine = getattr(self.model, "moesys_offload", None)
        if engine is None or getattr(self.model, "moesys_decode_graph", None) is None:
            raise ValueError("graph=True replays moesys's decode graph: load the model with moesys.offload.load "
                             "(cuda_graph=True, the default)")
        rows = self._rows()
        why = self._graph_blocker(engine, rows)
        if why is not None:
            warnings.warn(f"batch decode takes the host-routed path instead of the decode graph: {why}",
                          stacklevel=4)
            return None
        return rows

    def _run_graph(self, R: int) -> Iterator[Result]:
        """Continuous batching over a fixed-shape KV cache of R rows: joining groups prefill on the
        host-routed path (PaddedBatchKV's inputs), then every step runs all R rows through the decode graph;
        a free row's experts are its step's first row's (engine.batch_rows_valid), so it copies nothing."""
        engine = self.model.moesys_offload
        name = cache_kwarg(self.model)
        prefill = PaddedBatchKV(self.model.config, self.device, cache_name=name)
        columns = self._graph_columns(R)
        kv = StaticBatchKV(self.model.config, self.device, R, columns, cache_name=name)
        # a joining group's prefill cache lives beside the fixed-shape one until it is copied in: as many
        # rows join at once as the reserve holds beside R rows (at least one: _graph_columns left room)
        cache = engine.plan.cache
        spare = cache.reserve_bytes(engine.max_context) - R * cache.row_bytes(columns)
        join_rows = max(1, spare // max(1, cache.row_bytes(self._longest_prompt())))
        engine.batch_rows_valid = valid_R = torch.zeros(R, dtype=torch.bool, device=self.device)
        queue = deque(range(len(self.requests)))
        rows: dict[int, _Row] = {}   # cache row -> its sequence
        try:
            while queue or rows:
                t0 = time.perf_counter()
                done: list[_Row] = []
                while (self.continuous or not rows) and queue and kv.free_rows():
                    free = kv.free_rows()
                    joining = self._next_group(queue, min(len(free), join_rows))
                    # the group's own cache is dropped once copied into the free rows (the reserve holds one)
                    kv.add(self._prefill(prefill, joining), [len(row.request.token_ids) for row in joining],
                           free[:len(joining)])
                    rows.update(zip(free, joining))
                    self._leave_rows(rows, kv, done)
                if rows:
                    inputs = kv.step_inputs({r: row.tokens[-1] for r, row in rows.items()})
                    valid_R.copy_(kv.valid_R())
                    tokens = self._forward(**inputs)
                    for r, row in rows.items():
                        self._append(row, tokens[r])
                    self.decode_steps += 1
                    self._leave_rows(rows, kv, done)
                self.elapsed_s += time.perf_counter() - t0
                for row in done:
                    yield self._result(row)
        finally:
            engine.batch_rows_valid = None
            # the captured step's output holds this run's cache (and its graph, a memory pool): a later run
            # makes a cache of its own, so keeping them would only count twice against the budget (measured:
            # the Qwen3 shape's int4 B=32 graph run peaked 0.29 GiB over its 16 GiB on an H100, the previous
            # run's cache still held)
            self.model.moesys_decode_graph.release()

    def _prefill(self, padded: PaddedBatchKV, joining: list[_Row]) -> dict:
        """One forward of the joining prompts together (left-padded); each row's first token appended.
        Returns the forward's inputs, whose cache now holds the group."""
        group = padded.prefill_inputs([row.request.token_ids for row in joining])
        for row, token in zip(joining, self._forward(**group)):
            self._append(row, token)
        self.prefills += len(joining)
        return group

    def _longest(self) -> int:
        return max(len(r.token_ids) + n for r, n in zip(self.requests, self.max_new))

    def _longest_prompt(self) -> int:
        return max(len(r.token_ids) for r in self.requests)

    def _graph_columns(self, R: int) -> int:
        """Columns per row of the graph's fixed-shape KV cache: room for twice the run's longest sequence
        (prompt + new tokens; rows rarely need a shift left then), rounded up to a power of two (runs of
        similar lengths share a captured graph), at most what the memory plan's reserve for max_context
        tokens gives each of R rows once a joining prompt's prefill cache has its room beside them
        ((max_context - longest prompt) / R without recurrent states). The whole plan (max_context / R each)
        measured 0.58 GiB over a 16 GiB budget on the Qwen3 shape's int4 B=8: the plan's KV reserve,
        allocated whole beside the prefill's activations and the captured step's pool."""
        engine = self.model.moesys_offload
        room = engine.plan.cache.columns_for(R, max(0, engine.max_context - self._longest_prompt()))
        return min(room, 1 << (2 * self._longest() - 1).bit_length())

    def _leave_rows(self, rows: dict[int, _Row], kv: StaticBatchKV, done: list[_Row]) -> None:
        finished = [r for r, row in rows.items() if self._finished(row)]
        done += [rows.pop(r) for r in finished]
        kv.remove(finished)

    def _run_alone(self) -> Iterator[Result]:
        """Batch 1 on a model with moesys's decode graph (moesys.offload.load's cuda_graph=True): each prompt
        through transformers' generate(), whose decode steps on CUDA replay the graph with the cache
        bookkeeping on the device (StaticCache), the fastest batch-1 path; a padded batch's steps cannot
        take it. Tokens are generate()'s: transformers' eager model's, or its compiled step's when the graph
        captures the compiled step (load's compile=True, the CUDA default)."""
        # generate() fills what its config leaves unset from the model's own: so the model's is the one
        # changed for the run (no EOS must mean none, not the checkpoint's), and put back after it
        saved = self.model.generation_config
        config = copy.deepcopy(saved)
        config.do_sample, config.min_new_tokens = False, None
        config.eos_token_id = sorted(self.eos) or None
        self.model.generation_config = config
        try:
            yield from self._generate_each()
        finally:
            self.model.generation_config = saved

    def _generate_each(self) -> Iterator[Result]:
        for i, request in enumerate(self.requests):
            t0 = time.perf_counter()
            ids_1T = torch.tensor([request.token_ids], device=self.device)
            with torch.no_grad(), sdpa_kernel(DECODE_SDPA_BACKENDS):
                out = self.model.generate(ids_1T, attention_mask=torch.ones_like(ids_1T),
                                          max_new_tokens=self.max_new[i])
            row = _Row(i, request, self.max_new[i])
            for token in out[0, ids_1T.shape[1]:].tolist():
                self._append(row, token)
            self.prefills += 1
            self.decode_steps += max(0, len(row.tokens) - 1)
            self.elapsed_s += time.perf_counter() - t0
            yield self._result(row)

    def _next_group(self, queue: deque, free: int) -> list[_Row]:
        """Up to `free` prompts from the queue to prefill in one forward: as many as keep the group's padded
        tokens (rows x longest) within the offload memory plan's activation reserve (a longer prompt goes
        alone, as it would anyway)."""
        group: list[_Row] = []
        longest = 0
        while queue and len(group) < free:
            n = len(self.requests[queue[0]].token_ids)
            if group and (len(group) + 1) * max(longest, n) > PREFILL_RESERVE_TOKENS:
                break
            i = queue.popleft()
            group.append(_Row(i, self.requests[i], self.max_new[i]))
            longest = max(longest, n)
        return group

    def _leave(self, rows: list[_Row], kv: PaddedBatchKV, done: list[_Row]) -> None:
        """Move the finished rows (in place) from `rows` and the KV cache to `done`."""
        finished = [r for r, row in enumerate(rows) if self._finished(row)]
        if finished:
            done += [rows[r] for r in finished]
            kv.remove(finished)
            rows[:] = [row for row in rows if not self._finished(row)]

    def _forward(self, **inputs) -> list[int]:
        """Greedy next token of each row (the one host sync per step: EOS decides who leaves). The step is a
        profiler range (moesys.decode_step, or moesys.prefill for a group's prompts): bench/timeline.py
        splits a step's GPU time by stream within it."""
        name = "moesys.decode_step" if inputs["input_ids"].shape[1] == 1 else "moesys.prefill"
        with torch.no_grad(), sdpa_kernel(DECODE_SDPA_BACKENDS), torch.profiler.record_function(name):
            out = self.model(use_cache=True, logits_to_keep=1, **inputs)
            return out.logits[:, -1].argmax(-1).tolist()

    def _append(self, row: _Row, token: int) -> None:
        row.tokens.append(token)
        self.generated_tokens += 1

    def _finished(self, row: _Row) -> bool:
        return row.tokens[-1] in self.eos or len(row.tokens) >= row.max_new

    def _result(self, row: _Row) -> Result:
        reason = "eos" if row.tokens[-1] in self.eos else "length"
        return Result(row.index, row.request.id, row.request.token_ids, row.tokens, reason)


def _check_cache_fits(cache, rows: int, longest: int, max_context: int) -> None:
    """The memory plan reserved the generation cache of max_context tokens; `rows` rows of up to `longest`
    tokens share it (each with its own recurrent states, in a hybrid model; moesys.offload.cache_bytes)."""
    need, have = rows * cache.row_bytes(longest), cache.reserve_bytes(max_context)
    if need <= have:
        return
    states = (f", {format_bytes(cache.state_per_row)} of which are each row's recurrent states"
              if cache.state_per_row else "")
    raise ValueError(f"batch_size={rows} rows of up to {longest} tokens need {format_bytes(need)} of KV cache"
                     f"{states}, but the memory plan reserved {format_bytes(have)} (max_context={max_context}); "
                     f"use batch_size<={max(1, cache.rows_fit(longest, max_context))} or load with "
                     f"max_context>={cache.context_for(rows, longest)}")


def generate_batch(model, prompts: Iterable, max_new_tokens: int = 128, batch_size: int | str = 8, eos=None, *,
                   continuous: bool = True, kv: str = "device", graph: bool | str = "auto",
                   bookkeeping: str = "auto") -> BatchGeneration:
    """Greedy generation of many prompts at `batch_size` rows at a time; iterate the returned object to get
    a Result per sequence as it finishes (it runs while you iterate).

    Args:
        model: a transformers causal LM (an offloaded one from moesys.offload.load, or any other).
        prompts: token-id lists, 1-D tensors, or Request objects (own max_new_tokens and id).
        max_new_tokens: tokens to generate per sequence unless its Request says otherwise.
        batch_size: rows decoded together, or "auto": the performance model's choice
            (moesys.offload.perf_model) for an offloaded model.
        eos: token id(s) that end a sequence (included in its result); None: the generation config's.
        continuous: refill a finished sequence's place at once (True), or wait until the whole batch has
            finished before starting the next one (False: static batching, for comparison).
        kv: "device": the batch's KV cache on the model's device, within the memory plan's max_context;
            "host": in host memory with attention on the CPU (moesys.offload.host_kv), outside the budget
            (perf_model.best_plan says which is faster for a budget; load with a small max_context then).
        graph: decode steps through moesys's CUDA graph with the expert cache's bookkeeping on the device
            (module docstring); when the model's banks cannot hold what batch_size rows may need at once
            (min(rows x top-k, experts) per layer), it says so once and takes the host-routed steps. "auto"
            (default): the graph where it was measured to pay and can run (quantized experts on CUDA, banks
            that hold the batch, BatchGeneration._graph_pays), else the eager steps, without a word.
        bookkeeping: the eager decode steps' (graph=False) expert cache bookkeeping: "host" reads each
            layer's routing back (one sync per layer) and copies the misses beside the resident experts'
            compute; "device" keeps it on the device as the decode graph does (no sync inside a step, the
            next layer's guessed experts prefetched on the copy stream), where the banks hold what the
            rows may need at once (else "host"); "auto" (default): "device" (the faster of the two on every
            batch size measured; BOOKKEEPING's comment).
    """
    if kv not in KV_MODES:
        raise ValueError(f"kv={kv!r} is unknown; use one of {list(KV_MODES)}")
    if graph not in (True, False, "auto"):
        raise ValueError(f"graph={graph!r} must be True, False or 'auto'")
    if getattr(model, "moesys_exact", False) and (kv != "device" or graph is True):
        raise ValueError("an exact=True model keeps its KV cache on the device and decodes without the CUDA graph "
                         "(its attention is the batch-invariant kernel, not the host's SDPA): kv='device', "
                         "graph=False")
    requests = [_as_request(p) for p in prompts]
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    for r in requests:
        if r.max_new_tokens is not None and (not isinstance(r.max_new_tokens, int) or r.max_new_tokens < 1):
            raise ValueError(f"request {r.id!r}: max_new_tokens={r.max_new_tokens!r} must be a positive integer")
    vocab = model.config.get_text_config().vocab_size
    for r in requests:
        if max(r.token_ids) >= vocab:
            raise ValueError(f"request {r.id!r}: token id {max(r.token_ids)} is outside the vocabulary "
                             f"(vocab_size={vocab})")
    longest = max((len(r.token_ids) + (r.max_new_tokens or max_new_tokens) for r in requests), default=0)
    if batch_size == "auto":
        from moesys.offload.perf_model import auto_batch_size

        batch_size = auto_batch_size(model, len(requests), longest)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer or 'auto'")
    engine = getattr(model, "moesys_offload", None)
    max_context = getattr(engine, "max_context", None)
    if kv == "device" and max_context is not None:
        _check_cache_fits(engine.plan.cache, min(batch_size, len(requests)), longest, max_context)
    if bookkeeping not in BOOKKEEPING:
        raise ValueError(f"bookkeeping={bookkeeping!r} is unknown; use one of {list(BOOKKEEPING)}")
    if bookkeeping == "device" and getattr(model, "moesys_offload", None) is None:
        raise ValueError("bookkeeping='device' keeps an offloaded model's expert cache bookkeeping on the device: "
                         "load the model with moesys.offload.load")
    return BatchGeneration(model, requests, max_new_tokens, batch_size, _eos_set(model, eos), continuous, kv, graph,
                           bookkeeping)

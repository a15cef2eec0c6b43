"""Offloaded batch decode (issue 24): tokens/s at several batch sizes under three routings, predicted
(moesys.offload.perf_model) next to measured, with the bound and transformers + accelerate at the same batch.

    PYTHONPATH=. python bench/offload_batch.py --out bench/results/offload_batch.json [--workdir /tmp/ob]
        [--batch-sizes 1,8,32,128,auto] [--routings model,uniform,trace] [--trace FILE] [--quantize none,int4]
    PYTHONPATH=. python bench/offload_batch.py --smoke --out /tmp/ob.json     # tiny shapes, CPU, seconds
    PYTHONPATH=. python bench/offload_batch.py --shape qwen3-30b-a3b --out bench/results/offload_batch_qwen3.json

Model: the OLMoE-1B-7B shape (bench/offload.py's, random bf16 weights built on the GPU, saved once) under a
4 GiB budget; --smoke: a 4-layer, 16-expert top-4 OLMoE in fp32 on the CPU under a budget holding a third
of the experts. `--shape qwen3-30b-a3b`: the Qwen3-30B-A3B shape (48 layers, 128 experts of 768, top-8) under
16 GiB, whose 61 GB are never written to disk (the GPU machine's disk cannot hold them beside the rest):
each load builds the same seeded random model on the GPU and reads its experts from it (so no accelerate
rows; its routing trace must have 128 experts and 48 layers: without --trace the trace rows replay the
model's own recorded routing). Each (precision) loads once with max_context = largest batch x (prompt + new
tokens), so the expert cache is the same for every row of that precision (the memory plan reserves the
largest batch's KV).

Per row: B prompts of --prompt-len random tokens, --new-tokens greedy tokens each, through
moesys.offload.generate_batch (continuous batching, the eager host-routed path), after a short warm-up.
Measured: decode tok/s (the engine's timing of decode forwards), end-to-end tok/s, hit rate and bytes copied
per token of the decode steps (the prefill's copies excluded); on the "model" routing's smallest batch
above 1, how many of its sequences equal the same prompt generated alone (sequences_equal_to_alone:
[equal, B]); on CUDA the row's peak of allocated device memory against the budget (peak_bytes,
under_budget). Predicted: perf_model with the measured hardware (pinned copy bandwidth, matmul FLOP/s) and
the routing statistics recorded during the row (its decode steps, or uniform draws, replayed through the
engine's cache: predicted_hit_rate), and again with the engine's measured copy hit rate (1 - copies /
lookups: an expert the prefetch copied counts as copied, not as the hit its lookup sees; hit_rate is the
lookups'); its overheads
are fitted once on the all-resident rows, a uniform batch-1 calibration row (per host-routed layer) and, for quantized
experts, a uniform calibration row at the smallest batch above 1 (per dequantization wave); with device bookkeeping,
uniform device rows at batch 1 and at the smallest batch above it (the device path's per-layer cost, fitted apart
above batch 1). Bound (the
issue's): B / max(missed bytes of a step at pinned bandwidth, the same step with every expert resident
(measured per batch size with a budget holding the whole model)).

--bookkeeping host,device runs every offloaded row once per expert cache bookkeeping (generate_batch's:
the host-routed steps, or the device's sync-free steps with prefetch), side by side on one load; a device
row's prediction drops the fitted per-layer host-routing cost. --profile's text starts with the profiled
steps' GPU time split by stream (bench/timeline.py: copy, compute, both, idle).

--batch-graph adds rows of the decode graph's batch steps (generate_batch(graph=True), model routing, one
model loaded with cuda_graph=True and compile=False) next to the host-routed steps on the same model.

Routing "trace" replays --trace (a trace of a trained model: bench/results/routing_trace_64x8.safetensors,
from a moesys-trained 64-expert top-8 16-layer MoE, made by bench/make_routing_trace.py; its E and K must
be the model's: the OLMoE shape's); without --trace the row replays the routing
recorded from the model's own "model" row and says so ("trace_source": "self-recorded").
"""

from __future__ import annotations

import argparse
import functools
import gc
import multiprocessing
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from moesys.checkpoint import write_text_atomic
from run_meta import run_meta, write_json

START = time.time()
ALL_RESIDENT = 1 << 40  # the budget of the all-resident rows: every expert fits


def log(*args):
    print(f"[{time.time() - START:6.1f}s]", *args, flush=True)


def smoke_config():
    from transformers import OlmoeConfig

    return OlmoeConfig(vocab_size=256, hidden_size=64, intermediate_size=48, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, num_experts=16, num_experts_per_tok=4,
                       max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=None)


class Source:
    """Where a run's models come from: `load(gpu_memory=..., **options)` gives an offloaded model;
    `path` is the checkpoint directory (None: no checkpoint, so no accelerate rows)."""

    def __init__(self, load, cfg, dtype, budget, device, path, shape):
        self.load, self.cfg, self.dtype, self.budget, self.device = load, cfg, dtype, budget, device
        self.path, self.shape = path, shape


def build_model(args, workdir) -> Source:
    import moesys.offload as mo
    from transformers import AutoModelForCausalLM

    if args.shape == "qwen3-30b-a3b":
        from offload import qwen3_config

        # 61 GB of bf16 weights do not fit the GPU machine's disk beside the rest: every load builds the same
        # seeded random model and reads its experts straight from it (no checkpoint, so no accelerate rows)
        cfg = qwen3_config(args.smoke)
        device = "cpu" if args.smoke else "cuda"
        dtype = torch.float32 if args.smoke else torch.bfloat16
        return Source(lambda **kw: load_from_random_model(cfg, device, **kw), cfg, dtype,
                      None if args.smoke else 16 * 2**30, device, None, args.shape + ("-smoke" if args.smoke else ""))
    path = os.path.join(workdir, "smoke" if args.smoke else "olmoe_shaped")
    load = functools.partial(mo.load, path)
    if args.smoke:
        cfg, dtype, device = smoke_config(), torch.float32, "cpu"
        if not os.path.isfile(os.path.join(path, "config.json")):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg)
            with torch.no_grad():  # routing that depends on the token, so the cache churns
                for layer in model.model.layers:
                    layer.mlp.gate.weight.normal_(0, 1.0)
            model.save_pretrained(path)
        return Source(load, cfg, dtype, None, device, path, "smoke-olmoe")
    from offload import olmoe_config, random_model_on_gpu

    cfg = olmoe_config()
    if not os.path.isfile(os.path.join(path, "config.json")):
        gpu, _ = random_model_on_gpu(cfg, "olmoe")
        gpu.save_pretrained(path)
        del gpu
        torch.cuda.empty_cache()
    return Source(load, cfg, torch.bfloat16, 4 * 2**30, "cuda", path, "olmoe-1b-7b")


def load_from_random_model(cfg, device, *, dtype, **options):
    """An offloaded model (moesys.offload.loader.build) whose weights are read from a seeded random model built
    on `device` (the same weights every call) through bench/offload.py's source_of_model; the random model is
    freed before returning."""
    from offload import random_model_on_gpu, source_of_model

    from moesys.offload.loader import build

    gpu, _ = random_model_on_gpu(cfg, "qwen3", device=device)
    gpu.to(dtype)
    if options.get("gpu_memory", 0) >= ALL_RESIDENT and device != "cpu":
        # every expert resident (the bound's rows): moesys' copy of the experts takes the GPU, so the random
        # model's experts move to host memory first (61 GB twice does not fit an 80 GB card). Otherwise the
        # store reads them on the GPU and source_of_model drops each layer's experts once it has read them
        # (the store fills its arena without autograd since 10e6f00: before, the graph of those copies kept
        # every expert alive, and the int4 load ran out of memory on an H100)
        for layer in gpu.model.layers:
            layer.mlp.experts.to("cpu")
        torch.cuda.empty_cache()
    if device == "cpu":  # routing that depends on the token, so the cache churns (as the OLMoE smoke)
        with torch.no_grad():
            for layer in gpu.model.layers:
                layer.mlp.gate.weight.normal_(0, 1.0)
    model = build(cfg, source_of_model(gpu, cfg), dtype=dtype, **options)
    del gpu
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model


def smoke_budget(config, dtype, fraction, max_context):
    """A budget whose expert cache holds `fraction` of the experts (plus a slot per layer)."""
    import moesys.offload as mo
    from moesys.offload.adapters import adapter_for, find_moe_blocks
    from moesys.offload.loader import build_skeleton

    skel = build_skeleton(config, dtype)
    blocks = find_moe_blocks(skel, adapter_for(config))
    p = mo.plan_memory(skel, blocks, dtype, 1 << 40, max_context=max_context)
    return p.resident_bytes + p.reserve_bytes + int(fraction * p.total_experts) * p.slot_bytes


def resident_rows(args, impl: str, sizes: list[int], max_context: int, graph: bool = False, quantize: str = "none"):
    """The all-resident rows (every expert on the device) of one experts implementation: ([(B, decode tok/s,
    end-to-end tok/s)], the loaded engine's Workload as a dict). Eager steps under uniform routing, or
    (`graph`) the batch's decode-graph steps under the model's routing (an override's draws would be captured
    once), with `quantize`d experts. Run in a spawned process by main(), so nothing of this model outlives it."""
    from moesys.offload.perf_model import workload_of
    from moesys.offload.routing import RoutingOverride

    if impl == "moesys":
        from moesys.integrations.transformers import register

        register()
    src = build_model(args, args.workdir)
    full = src.load(gpu_memory=ALL_RESIDENT, dtype=src.dtype, max_context=max_context, cuda_graph=graph,
                    compile=False if graph else None, experts_implementation=impl, quantize_experts=quantize)
    if not graph:
        RoutingOverride(full, "uniform", seed=1)
    rows = []
    for B in sizes:
        e2e, stats, _ = run_row(full, B, args, src.cfg.vocab_size, graph=graph)
        rows.append((B, stats.decode_tokens_per_s, e2e))
    return rows, workload_of(full.moesys_offload).to_record()


def row_prompts(B, args, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(B)]


def run_row(model, B, args, vocab, seed=0, graph=False, bookkeeping="host"):
    """(end-to-end tok/s, engine stats, tokens per prompt) of B prompts after a warm-up (graph: the batch's
    steps through the decode graph; its warm-up compiles and captures). Nothing returned holds the model (a
    BatchGeneration does): a row's model must be freed before the next one loads, or the next row's memory
    peak counts it."""
    from moesys.offload.batch import generate_batch

    prompts = row_prompts(B, args, vocab, seed)
    list(generate_batch(model, prompts, max_new_tokens=min(4, args.new_tokens), batch_size=B, eos=[], graph=graph,
                        bookkeeping=bookkeeping))
    engine = getattr(model, "moesys_offload", None)
    if engine is not None:
        engine.reset_stats()
    # the B prompts prefill together in the first forward; the copies and hits of the decode steps alone
    # are the counters at the end minus those when the first decode forward starts
    at_decode = {}

    def mark(module, args, kwargs):
        if engine is not None and not at_decode and kwargs["input_ids"].shape[1] == 1:
            s = engine.snapshot()
            at_decode.update(bytes_copied=s.bytes_copied, hits=s.hits, misses=s.misses, copies=s.copies,
                             prefetch_copies=s.prefetch_copies)

    hook = model.register_forward_pre_hook(mark, with_kwargs=True)
    if engine is not None and engine.cuda:
        torch.cuda.reset_peak_memory_stats(engine.device)
    try:
        run = generate_batch(model, prompts, max_new_tokens=args.new_tokens, batch_size=B, eos=[], graph=graph,
                             bookkeeping=bookkeeping)
        tokens = {r.index: r.token_ids for r in run}
    finally:
        hook.remove()
    if engine is None:
        return run.tokens_per_s, None, [tokens[i] for i in range(B)]
    if engine.cuda:
        torch.cuda.synchronize()
    stats = engine.snapshot()
    stats.peak_bytes = torch.cuda.max_memory_allocated(engine.device) if engine.cuda else None
    stats.decode_bytes_copied = stats.bytes_copied - at_decode.get("bytes_copied", 0)
    hits, misses = stats.hits - at_decode.get("hits", 0), stats.misses - at_decode.get("misses", 0)
    stats.decode_hit_rate = hits / (hits + misses) if hits + misses else stats.hit_rate
    # a hit may be an expert the previous layer's prefetch copied: what the performance model's hit rate
    # means is experts not copied, so the one it is fed counts every copy (prefetches too) as a miss
    copies = stats.copies - at_decode.get("copies", 0)
    # (below 0 where the copies outnumber the lookups: prefetched guesses no row then used)
    stats.decode_copy_hit_rate = 1 - copies / (hits + misses) if hits + misses else None
    # the copies the prefetch issued a layer ahead, which overlap the compute of the layer before
    prefetched = stats.prefetch_copies - at_decode.get("prefetch_copies", 0)
    stats.decode_prefetched_share = prefetched / copies if copies else 0.0
    return run.tokens_per_s, stats, [tokens[i] for i in range(B)]


def matches_alone(model, tokens, args, vocab, bookkeeping="host"):
    """How many of a batch row's sequences equal the same prompt generated alone (batch 1, the same
    bookkeeping: its path computes quantized experts as the batch's does), token for token."""
    from moesys.offload.batch import generate_batch

    prompts = row_prompts(len(tokens), args, vocab)
    return sum(next(iter(generate_batch(model, [p], max_new_tokens=args.new_tokens, batch_size=1, eos=[],
                                        bookkeeping=bookkeeping))).token_ids
               == t for p, t in zip(prompts, tokens))


def accelerate_row(path, dtype, budget, B, args, vocab):
    """transformers + accelerate offload (device_map="auto" under the same budget), generate() at batch B."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto",
                                                 max_memory={0: budget, "cpu": 200 * 2**30}).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (B, args.prompt_len), generator=g).to(model.device)
    steps = min(args.new_tokens, 4)
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                       do_sample=False)
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return B * steps / elapsed


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default="/tmp/offload_batch")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (runs anywhere in seconds)")
    ap.add_argument("--shape", choices=("olmoe-1b-7b", "qwen3-30b-a3b"), default="olmoe-1b-7b",
                    help="the model: OLMoE-1B-7B under 4 GiB (a checkpoint saved once in --workdir), or "
                         "Qwen3-30B-A3B under 16 GiB (built from a seeded random model at every load)")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated, may include 'auto' "
                    "(default 1,8,32,128,auto; smoke 1,4,16,auto)")
    ap.add_argument("--routings", default="model,uniform,trace")
    ap.add_argument("--trace", default=None, help="routing trace file for the 'trace' rows")
    ap.add_argument("--quantize", default=None, help="comma-separated none,int8,int4 (default none,int4; smoke none)")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--no-accelerate", action="store_true")
    ap.add_argument("--copy-programs", type=int, default=None,
                    help="the offloaded rows' copy kernel grid (OffloadEngine.copy_programs, the host path's copies and "
                         "the device path's prefetch; 0 = the host path copies each expert on its own, a cudaMemcpy "
                         "per part: the copies before the kernel); default: the engine's")
    ap.add_argument("--copy-wait", default=None, choices=("host", "device"),
                    help="how the offloaded rows' host path waits for its copies (OffloadEngine.copy_wait: the host "
                         "blocks on them, or the compute stream waits); default: the engine's")
    ap.add_argument("--prefetch-issue", default=None, choices=("early", "late"),
                    help="when the device path's batch steps issue the next layer's prefetch (OffloadEngine."
                         "prefetch_issue: before or after the wait for the layer's own copies); default: the engine's")
    ap.add_argument("--bookkeeping", default="host",
                    help="comma-separated host,device: the offloaded rows' eager decode steps with the expert "
                         "cache's bookkeeping on the host (a sync per layer) or on the device (generate_batch's "
                         "bookkeeping; each row is run once per mode, side by side)")
    ap.add_argument("--batch-step-kernel", default="on",
                    help="comma-separated on,off: the device bookkeeping's batch steps through the one-launch kernel "
                         "(on, the engine's default) or the torch reference (off: OffloadEngine.batch_step_kernel); "
                         "each row is run once per value, side by side")
    ap.add_argument("--copy-priority", default="normal",
                    help="comma-separated normal,high: the offloaded rows' copy stream at the default priority or "
                         "the device's greatest (OffloadEngine.set_copy_priority: the copy kernel's programs "
                         "dispatched before the compute kernels' waiting blocks); each row is run once per value")
    ap.add_argument("--cache-policy", default="auto", choices=("auto", "next-visit", "lru", "lfu"),
                    help="the offloaded rows' (and --profile's) expert cache policy (moesys.offload.cache)")
    ap.add_argument("--batch-graph", action="store_true",
                    help="also the decode graph's batch steps (generate_batch(graph=True)) next to the host-routed "
                         "ones, the model's own routing (an override's per-step draw cannot be replayed), "
                         "--graph-quantize precision, "
                         "each batch size above 1: tok/s, hit rate, and whether the tokens equal the host path's")
    ap.add_argument("--graph-budget", type=float, default=None, metavar="GIB",
                    help="--batch-graph rows under this budget (GiB; default the other rows'): the graph's steps need "
                         "each layer's cache bank to hold min(B x top-k, experts) experts")
    ap.add_argument("--graph-only", action="store_true",
                    help="only the --batch-graph rows (host-routed and graph side by side), no bound or calibration")
    ap.add_argument("--graph-resident", action="store_true",
                    help="the --batch-graph rows' bound and prediction: their graph steps with every expert resident "
                         "first (a process of its own), which also fit the graph path's overheads")
    ap.add_argument("--graph-quantize", default="none", choices=("none", "int8", "int4"),
                    help="the --batch-graph rows' expert precision (default bf16: none)")
    ap.add_argument("--graph-prefetch", default=None,
                    help="comma-separated off,on: the --batch-graph rows' captured steps without or with the next "
                         "layer's prefetch on the copy stream (OffloadEngine.graph_prefetch); each graph row is run "
                         "once per value, side by side; default: the engine's (on)")
    ap.add_argument("--graph-batch-sizes", default=None,
                    help="comma-separated batch sizes of the --batch-graph rows (default: --batch-sizes); at 1 the "
                         "host path is the graph too (generate(), replayed), so one row")
    ap.add_argument("--experts-impl", default="grouped_mm,moesys",
                    help="comma-separated transformers experts implementations: the first runs the offloaded rows "
                         "(int4 always runs moesys' dequantizing kernels), each one the all-resident rows; the bound "
                         "takes the fastest all-resident step. Default grouped_mm first: moesys.offload.load's own "
                         "default, and the faster all-resident eager step on the H100 at e0b33fe (BENCHMARKS.md)")
    ap.add_argument("--profile", default=None, metavar="FILE",
                    help="only profile one row (--profile-row) and write where its decode steps' time goes: "
                         "torch.profiler's ops by device time and by host time, and cProfile's Python functions")
    ap.add_argument("--profile-row", default="int4:uniform:128", metavar="QUANTIZE:ROUTING:B",
                    help="the --profile row: precision (none, int8, int4), routing (model, uniform) and batch size")
    args = ap.parse_args()
    args.batch_sizes = args.batch_sizes or ("1,4,16,auto" if args.smoke else "1,8,32,128,auto")
    args.quantize = args.quantize or ("none" if args.smoke else "none,int4")
    args.prompt_len = args.prompt_len or (8 if args.smoke else 64)
    args.new_tokens = args.new_tokens or (8 if args.smoke else 32)

    from moesys.offload.perf_model import (Hardware, RoutingStats, Workload, auto_batch_size, calibrate,
                                           calibrate_layers, calibrate_waves, predict, workload_of)
    from moesys.offload.routing import RoutingOverride, RoutingRecorder

    os.makedirs(args.workdir, exist_ok=True)
    src = build_model(args, args.workdir)
    cfg, dtype, budget, device = src.cfg, src.dtype, src.budget, src.device
    if args.profile:
        profile_row(args, src)
        return
    meta = run_meta(device)
    sizes = [s for s in args.batch_sizes.split(",") if s != "auto"]
    sizes = [int(s) for s in sizes]
    ctx = args.prompt_len + args.new_tokens
    max_context = max(sizes + [64 if args.smoke else 128]) * ctx
    hw = Hardware.measure(device)
    log("hardware", hw)
    records = []

    def save():
        write_json(args.out, records)

    base = dict(meta, bench="offload_batch", shape=src.shape,
                prompt_tokens=args.prompt_len, new_tokens=args.new_tokens, path="eager host-routed, generate_batch",
                hardware=hw.__dict__)
    impls = args.experts_impl.split(",")
    if "moesys" in impls:
        from moesys.integrations.transformers import register

        register()

    def run_graph_rows():
        graph_sizes = [int(b) for b in args.graph_batch_sizes.split(",")] if args.graph_batch_sizes else sizes
        graph_budget = int(args.graph_budget * 2**30) if args.graph_budget else budget
        graph_rows(args, src, graph_budget, max_context, graph_sizes, base, records, impls[0], save, hw)

    if args.graph_only:  # the --batch-graph rows alone (a short GPU run)
        run_graph_rows()
        save()
        log("wrote", args.out, len(records), "records")
        return
    # every expert resident: the compute side of the bound, per batch size, with each experts implementation
    # (the bound takes the fastest; the first one also runs the offloaded rows, and calibrates the model)
    resident_step, calib = {}, None
    for impl in impls:
        # in a process of its own: whatever the all-resident model leaves on the GPU goes with the process (on
        # an H200 the Qwen3 shape's 64 GB stayed allocated after `del` and the offloaded load ran out of memory)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows, workload = pool.submit(resident_rows, args, impl, sizes, max_context).result()
        steps = {}
        for B, tokens_per_s, e2e in rows:
            steps[B] = B / tokens_per_s
            resident_step[B] = min(resident_step.get(B, steps[B]), steps[B])
            records.append(dict(base, impl="moesys-all-resident", experts_implementation=impl, batch=B,
                                routing="uniform", tokens_per_s=tokens_per_s, e2e_tokens_per_s=e2e))
            log(records[-1]["impl"], impl, B, f"{tokens_per_s:.1f} tok/s")
        if calib is None:
            # what the roofline terms leave unexplained in these steps (launches, Python, syncs): fitted once
            # here, then the offloaded rows are predicted, not fitted
            calib = calibrate(Workload.from_record(workload), hw, steps, args.prompt_len + args.new_tokens // 2)
    hw = calib
    log("calibrated", hw)
    base["hardware"] = hw.__dict__
    save()

    # transformers + accelerate at the same batch sizes, before the offloaded rows (the slowest to run)
    def accelerate_rows():
        for B in sizes:
            why = ("--no-accelerate" if args.no_accelerate else
                   "accelerate loads a checkpoint from disk, and this shape has none (its 61 GB of bf16 weights do "
                   "not fit the GPU machine's disk beside the rest)" if src.path is None else
                   "needs a GPU" if device != "cuda" else None)
            if why is not None:
                records.append(dict(base, impl="accelerate-offload", batch=B, error="not run: " + why))
                continue
            try:
                records.append(dict(base, impl="accelerate-offload", batch=B, routing="model",
                                    tokens_per_s=accelerate_row(src.path, dtype, budget, B, args, cfg.vocab_size)))
                log("accelerate", B, records[-1]["tokens_per_s"])
            except Exception as e:
                traceback.print_exc()
                records.append(dict(base, impl="accelerate-offload", batch=B, error=repr(e)))
            save()

    accelerate_rows()
    for quantize in args.quantize.split(","):
        row_budget = budget if budget is not None else smoke_budget(cfg, dtype, 1 / 3, max_context)
        model = src.load(gpu_memory=row_budget, dtype=dtype, max_context=max_context, cuda_graph=False,
                        quantize_experts=quantize, experts_implementation=impls[0], cache_policy=args.cache_policy)
        engine = model.moesys_offload
        if args.copy_programs is not None:
            engine.copy_programs = args.copy_programs
        if args.copy_wait is not None:
            engine.copy_wait = args.copy_wait
        if args.prefetch_issue is not None:
            engine.prefetch_issue = args.prefetch_issue
        base["copy_programs"], base["cache_policy"] = engine.copy_programs, engine.cache.policy
        base["copy_wait"], base["prefetch_issue"] = engine.copy_wait, engine.prefetch_issue
        w = workload_of(engine)
        context = args.prompt_len + args.new_tokens // 2

        def calibration_row(fit, B, seed, hw_in, bookkeeping="host"):
            """A uniform row at B (prompts of its own), run twice, and `hw_in` with `fit`'s overhead fitted to the
            faster: one run is a few seconds, and on an H100 a device calibration row ran at 386 tok/s where the
            same row ran at 502-517 on other starts and the measured rows after it at 514
            (bench/results/offload_batch_int4_prefetch_wrap_off_h100_7a9937b.json: every prediction 25% low)."""
            uni = RoutingOverride(model, "uniform", seed=seed)
            st = max((run_row(model, B, args, cfg.vocab_size, seed=seed, bookkeeping=bookkeeping)[1] for _ in range(2)),
                     key=lambda s: s.decode_tokens_per_s)
            uni.remove()
            uniform = RoutingStats.uniform(w.num_experts, w.top_k).with_prefetched_share(st.decode_prefetched_share)
            fitted = fit(w, hw_in, uniform, B, context, engine.cache.num_slots, B / st.decode_tokens_per_s,
                         **({"path": bookkeeping} if fit is calibrate_layers else {}))
            records.append(dict(base, impl="moesys-calibration", quantize=quantize, routing="uniform", batch=B,
                                bookkeeping=bookkeeping,
                                tokens_per_s=st.decode_tokens_per_s, hardware=fitted.__dict__,
                                fitted=fit.__name__, copy_hit_rate=st.decode_copy_hit_rate,
                                prefetched_share=st.decode_prefetched_share, workload=w.to_record()))
            return fitted

        # the per-layer cost of host routing (the routing read, bookkeeping, demand copies' round trip), fitted
        # at the smallest batch;
        # quantized experts at several rows run in dequantization waves, whose overhead is fitted at the
        # smallest batch above 1; every other row is predicted with these
        row_hw = calibration_row(calibrate_layers, min(sizes), 99, hw)
        B1 = min([b for b in sizes if b > 1], default=None)
        if w.dequant_bytes and B1 is not None:
            row_hw = calibration_row(calibrate_waves, B1, 98, row_hw)
        if "device" in args.bookkeeping.split(","):  # the device path's per-layer cost, from a device row
            row_hw = calibration_row(calibrate_layers, min(sizes), 97, row_hw, bookkeeping="device")
            if B1 is not None:  # and above batch 1, where it is its own (perf_model.device_layer_s)
                row_hw = calibration_row(calibrate_layers, B1, 96, row_hw, bookkeeping="device")
        log("calibrated", quantize, row_hw)
        self_trace = None
        for routing in args.routings.split(","):
            override, trace_source = None, None
            if routing == "trace":
                trace = args.trace or self_trace
                if trace is None:
                    records.append(dict(base, impl="moesys", quantize=quantize, routing=routing,
                                        error="no trace: give --trace or run the 'model' routing first"))
                    continue
                trace_source = "file" if args.trace else "self-recorded"
                override = RoutingOverride(model, "trace", trace=trace)
            elif routing == "uniform":
                override = RoutingOverride(model, "uniform", seed=0)
            row_sizes = list(sizes)
            if "auto" in args.batch_sizes:
                row_sizes.append(auto_batch_size(model, 128 if not args.smoke else 64, ctx, hardware=row_hw))
            kernels, priorities = args.batch_step_kernel.split(","), args.copy_priority.split(",")
            variants = [(B, bk, kern, prio) for B in row_sizes for bk in args.bookkeeping.split(",")
                        for kern in kernels for prio in priorities]
            for i, (B, bookkeeping, kernel, priority) in enumerate(variants):
                i //= len(args.bookkeeping.split(",")) * len(kernels) * len(priorities)
                if kernel not in ("on", "off"):
                    raise SystemExit(f"--batch-step-kernel {kernel!r}: use on or off")
                engine.batch_step_kernel = kernel == "on"
                engine.set_copy_priority(priority)
                rec = RoutingRecorder(model)
                try:
                    e2e, stats, tokens = run_row(model, B, args, cfg.vocab_size, bookkeeping=bookkeeping)
                except Exception as e:  # one row's failure must not hide the others
                    traceback.print_exc()
                    records.append(dict(base, impl="moesys", quantize=quantize, routing=routing, batch=B,
                                        bookkeeping=bookkeeping, error=repr(e)))
                    rec.remove()
                    continue
                rec.remove()
                if routing == "model" and self_trace is None:
                    self_trace = os.path.join(args.workdir, f"self_trace_{quantize}.safetensors")
                    rec.save(self_trace)
                # the decode steps' routing only: prefill tokens (and padding rows) route as no decode step
                # does, and the rows predict decode
                ids_NLK = rec.ids_NLK(decode_only=True).long()
                stats_r = (RoutingStats.uniform(w.num_experts, w.top_k) if routing == "uniform"
                           else RoutingStats.from_trace(ids_NLK, w.num_experts, batch_steps=True))
                stats_r.with_prefetched_share(stats.decode_prefetched_share)
                # the device bookkeeping reads no layer's routing back (perf_model's path "device")
                path = "host" if bookkeeping == "host" else "device"
                pred = predict(w, row_hw, stats_r, B, context, slots=engine.cache.num_slots, path=path)
                stats_r.with_engine_hit_rate(engine.cache.num_slots, stats.decode_copy_hit_rate)
                pred_hit = predict(w, row_hw, stats_r, B, context, slots=engine.cache.num_slots, path=path)
                steps = max(1, stats.decode_tokens // B)
                missed_s = stats.decode_bytes_copied / steps / hw.pcie_Bps
                bound = B / max(missed_s, resident_step.get(B, 0.0)) if B in resident_step else None
                measured = stats.decode_tokens_per_s
                records.append(dict(
                    base, impl="moesys", quantize=quantize, routing=routing, trace_source=trace_source,
                    batch=B, bookkeeping=bookkeeping, batch_step_kernel=engine.batch_step_kernel,
                    copy_priority=engine.copy_priority,
                    auto=i >= len(sizes), tokens_per_s=measured,
                    e2e_tokens_per_s=e2e,
                    hit_rate=stats.decode_hit_rate, copy_hit_rate=stats.decode_copy_hit_rate,
                    bytes_copied_per_token=stats.decode_bytes_copied / max(
                        stats.decode_tokens, 1), prefill_and_decode_hit_rate=stats.hit_rate,
                    predicted_hit_rate=pred["hit_rate"], prefetched_share=stats.decode_prefetched_share,
                    predicted_tokens_per_s=pred["tokens_per_s"], predicted_with_measured_hit=pred_hit["tokens_per_s"],
                    predicted_bound=pred["bound_tokens_per_s"], bound_tokens_per_s=bound,
                    share_of_bound=measured / bound if bound else None,
                    # predicted_with_measured_hit's error (the field's meaning since it was added), and the
                    # error of predicted_tokens_per_s (the decode routing's hit curve: BENCHMARKS' column)
                    prediction_error=pred_hit["tokens_per_s"] / measured - 1 if measured else None,
                    prediction_error_decode_routing=pred["tokens_per_s"] / measured - 1 if measured else None,
                    cache_slots=engine.cache.num_slots, budget=row_budget, experts_implementation=impls[0],
                    context=context, workload=w.to_record(),
                    peak_bytes=stats.peak_bytes, under_budget=None if None in (stats.peak_bytes, row_budget)
                    else stats.peak_bytes <= row_budget))
                if routing == "model" and B == min([b for b in sizes if b > 1], default=None):
                    # batch equals alone (greedy, the model's own routing; uniform and trace draw per call)
                    equal = matches_alone(model, tokens, args, cfg.vocab_size, bookkeeping)
                    records[-1]["sequences_equal_to_alone"] = [equal, B]
                    log("equal to alone:", records[-1]["sequences_equal_to_alone"])
                log(f"{quantize} {routing} B={B} {bookkeeping} batch-step-kernel {kernel} copy priority {priority}: "
                    f"{measured:.1f} tok/s, "
                    f"predicted {pred['tokens_per_s']:.1f} "
                    f"({pred_hit['tokens_per_s']:.1f} with the measured copy hit rate "
                    f"{stats.decode_copy_hit_rate:.2f}; "
                    f"lookups hit {stats.decode_hit_rate:.2f}), bound",
                    f"{bound:.1f}" if bound else "not measured at this batch size")
                save()
            if override is not None:
                override.remove()
                override = None  # it holds the model, which must be gone before the next precision loads
        del model, engine
        gc.collect()

    if args.batch_graph:
        run_graph_rows()
    save()
    log("wrote", args.out, len(records), "records")


def profile_row(args, src):
    """--profile: one row's decode steps under torch.profiler (ops by device and by host time) and, in a second
    pass, cProfile (the engine's Python); wall time per step of an unprofiled pass first. Written to one text
    file: the answer to where a step's time goes that the performance model's overheads only fit."""
    import cProfile
    import io
    import pstats

    from moesys.offload.batch import generate_batch
    from moesys.offload.routing import RoutingOverride

    quantize, routing, B = args.profile_row.split(":")
    B = int(B)
    if routing not in ("model", "uniform"):
        raise SystemExit(f"--profile-row routing {routing!r}: use model or uniform")
    max_context = B * (args.prompt_len + args.new_tokens)
    cfg, dtype = src.cfg, src.dtype
    row_budget = src.budget if src.budget is not None else smoke_budget(cfg, dtype, 1 / 3, max_context)
    model = src.load(gpu_memory=row_budget, dtype=dtype, max_context=max_context, cuda_graph=False,
                    quantize_experts=quantize, cache_policy=args.cache_policy)
    override = RoutingOverride(model, "uniform", seed=0) if routing == "uniform" else None
    prompts = row_prompts(B, args, cfg.vocab_size)
    engine = model.moesys_offload
    if args.prefetch_issue is not None:
        engine.prefetch_issue = args.prefetch_issue

    def decode(tokens):
        run = generate_batch(model, prompts, max_new_tokens=tokens, batch_size=B, eos=[],
                             bookkeeping=args.bookkeeping.split(",")[0])
        list(run)
        if engine.cuda:
            torch.cuda.synchronize()
        return run

    decode(min(4, args.new_tokens))  # warm-up
    engine.reset_stats()
    run = decode(args.new_tokens)
    stats = engine.snapshot()
    head = (f"profile of {args.profile_row} (precision:routing:batch), bookkeeping {args.bookkeeping.split(',')[0]}, "
            f"{meta_line(engine)}, cache slots "
            f"{engine.cache.num_slots} ({engine.cache.policy}), budget {row_budget}\n"
            f"unprofiled: {stats.decode_tokens_per_s:.1f} decode tok/s "
            f"({B / stats.decode_tokens_per_s * 1e3:.1f} ms per step), end to end {run.tokens_per_s:.1f} tok/s, "
            f"hit rate {stats.hit_rate:.3f}, {stats.copies} copies over {args.new_tokens} tokens "
            f"(prefill included), strategies {engine.strategies}\n")
    log(head)
    profiled_tokens = min(6, args.new_tokens)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if engine.cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        decode(profiled_tokens)
    by_device = "self_device_time_total" if engine.cuda else "self_cpu_time_total"
    tables = []
    if engine.cuda:
        from timeline import profiler_timeline

        split = profiler_timeline(prof)
        tables.append("GPU time of a profiled decode step (ms; copy = the copy stream busy, compute = any other "
                      "stream, idle = neither): " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                              for k, v in split.items()) + "\n")
        log(tables[-1])
    tables += [f"torch.profiler, {profiled_tokens} new tokens (prefill included), ops by {by_device}:",
              prof.key_averages().table(sort_by=by_device, row_limit=40),
              "the same ops by self_cpu_time_total (host):",
              prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)]
    py = cProfile.Profile()
    py.enable()
    decode(profiled_tokens)
    py.disable()
    text = io.StringIO()
    pstats.Stats(py, stream=text).sort_stats("tottime").print_stats(40)
    tables += [f"cProfile, {profiled_tokens} new tokens (prefill included), by tottime:", text.getvalue()]
    if override is not None:
        override.remove()
    write_text_atomic(Path(args.profile), head + "\n" + "\n".join(tables))
    log("wrote", args.profile)


def meta_line(engine):
    m = run_meta(engine.device.type)
    return ", ".join(f"{k} {m[k]}" for k in ("device", "torch", "triton", "transformers", "git_sha", "date"))


def graph_rows(args, src, budget, max_context, sizes, base, records, impl, save, hw):
    """Host-routed and decode-graph batch steps side by side on one model (cuda_graph=True; compile off: one
    capture per batch size, no recompile), the model's routing; tokens compared row by row. With
    --graph-resident, the same graph steps with every expert resident first (a process of their own): the
    graph rows' bound, and their prediction (perf_model path "graph", or "graph-prefetch" for steps with the
    prefetch, --graph-prefetch; its overheads fitted to those steps)."""
    from moesys.offload.engine import GRAPH_PREFETCH
    from moesys.offload.perf_model import RoutingStats, Workload, calibrate, predict

    dtype, vocab = src.dtype, src.cfg.vocab_size
    # the graph's fixed-shape cache of B rows has a joining prompt's prefill cache beside it
    max_context += args.prompt_len
    resident_step, hw_graph, w = {}, None, None
    context = args.prompt_len + args.new_tokens // 2  # a decode step's mean cached tokens (as the other rows)
    if args.graph_resident:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows, workload = pool.submit(resident_rows, args, impl, sizes, max_context, True,
                                         args.graph_quantize).result()
        for B, tokens_per_s, e2e in rows:
            resident_step[B] = B / tokens_per_s
            records.append(dict(base, impl="moesys-batch-graph-all-resident", quantize=args.graph_quantize,
                                graph_section=True, batch=B, routing="model", tokens_per_s=tokens_per_s,
                                e2e_tokens_per_s=e2e))
            log(records[-1]["impl"], B, f"{tokens_per_s:.1f} tok/s")
        w = Workload.from_record(workload)
        hw_graph = calibrate(w, hw, resident_step, context, path="graph")
        log("calibrated graph steps", hw_graph)
    row_budget = budget if budget is not None else smoke_budget(src.cfg, dtype, 1 / 3, max_context)
    model = src.load(gpu_memory=row_budget, dtype=dtype, max_context=max_context, cuda_graph=True,
                    compile=False, experts_implementation=impl, quantize_experts=args.graph_quantize)
    engine = model.moesys_offload
    if args.copy_programs is not None:  # the graph's prefetch and the eager rows' copies beside it
        engine.copy_programs = args.copy_programs
    base = dict(base, quantize=args.graph_quantize, copy_programs=engine.copy_programs)
    log("graph rows: budget", row_budget, "cache slots", engine.cache.num_slots, "experts", args.graph_quantize)
    # the eager rows beside the graph's take the first --bookkeeping mode (the graph's is on the device)
    eager_bookkeeping = args.bookkeeping.split(",")[0]
    for B in sizes:
        why = engine.device_batch_unsupported(B) if B > 1 else None
        if why is not None:
            records.append(dict(base, impl="moesys-batch-graph", batch=B, routing="model", error=why,
                                budget=row_budget))
            log("batch graph", B, why)
            continue
        tokens = {}
        # (graph, its prefetch): the host-routed row first, then the graph's (at batch 1 the graph only)
        runs = [(True, v == "on") for v in args.graph_prefetch.split(",")] if args.graph_prefetch else [
            (True, GRAPH_PREFETCH)]
        for graph, graph_prefetch in runs if B == 1 else [(False, False)] + runs:
            engine.graph_prefetch = graph_prefetch
            try:
                e2e, stats, tokens[graph] = run_row(model, B, args, vocab, graph=graph,
                                                    bookkeeping=eager_bookkeeping)
            except Exception as e:
                traceback.print_exc()
                records.append(dict(base, impl="moesys-batch-graph" if graph else "moesys", batch=B, routing="model",
                                    error=repr(e), graph_section=True))
                continue
            records.append(dict(base, impl="moesys-batch-graph" if graph else "moesys", graph_section=True,
                                path=("decode graph, generate() at batch 1" if B == 1 else
                                      "decode graph, generate_batch(graph=True)") if graph else base["path"],
                                batch=B, routing="model", tokens_per_s=stats.decode_tokens_per_s,
                                bookkeeping="device" if graph else eager_bookkeeping, e2e_tokens_per_s=e2e,
                                hit_rate=stats.decode_hit_rate,
                                replays=model.moesys_decode_graph.replays, peak_bytes=stats.peak_bytes,
                                under_budget=None if stats.peak_bytes is None else stats.peak_bytes <= row_budget,
                                budget=row_budget, cache_slots=engine.cache.num_slots,
                                graph_prefetch=graph_prefetch if graph else None,
                                prefetched_share=stats.decode_prefetched_share,
                                bytes_copied_per_token=stats.decode_bytes_copied / max(stats.decode_tokens, 1),
                                copy_hit_rate=stats.decode_copy_hit_rate))
            if graph and False in tokens:
                records[-1]["sequences_equal_to_host_path"] = [sum(a == b for a, b in zip(tokens[True], tokens[False])), B]
            if graph and B in resident_step:
                # the bound and the prediction (fed the row's measured copy hit rate) of the graph step
                steps = max(1, stats.decode_tokens // B)
                missed_s = stats.decode_bytes_copied / steps / hw.pcie_Bps
                routing = RoutingStats.uniform(w.num_experts, w.top_k).with_engine_hit_rate(
                    engine.cache.num_slots, stats.decode_copy_hit_rate).with_prefetched_share(
                    stats.decode_prefetched_share)
                pred = predict(w, hw_graph, routing, B, context, slots=engine.cache.num_slots,
                               path="graph-prefetch" if graph_prefetch else "graph")
                measured = stats.decode_tokens_per_s
                bound = B / max(missed_s, resident_step[B])
                records[-1].update(
                    bound_tokens_per_s=bound,
                    share_of_bound=measured / bound, predicted_with_measured_hit=pred["tokens_per_s"],
                    prediction_error=pred["tokens_per_s"] / measured - 1, hardware=hw_graph.__dict__,
                    workload=w.to_record(), context=context)
            log(records[-1]["impl"], B, "graph prefetch" if graph_prefetch else "",
                f"{stats.decode_tokens_per_s:.1f} tok/s",
                records[-1].get("sequences_equal_to_host_path", ""), "peak", stats.peak_bytes)
            save()  # each row as it comes (a GPU call's time limit may cut the next)
    del model, engine
    gc.collect()


if __name__ == "__main__":
    main()

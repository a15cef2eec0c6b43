"""Offloaded-inference benchmark (issue 5) on one GPU, with its correctness checks in the same run.

    PYTHONPATH=. python bench/offload.py --out bench/results/offload.json [--workdir /tmp/offload] [--skip-qwen3]

1. Correctness: tiny random Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE in bf16 and fp32, greedy tokens of
   `moesys.offload.load` under a budget that holds part of the experts == transformers fully on the GPU;
   torch.cuda.max_memory_allocated() <= budget for every offloaded run below.
2. OLMoE-1B-7B-shaped random bf16 model (~14 GB, saved to disk so the memory-mapped store is used) under a
   4 GiB budget: decode tokens/s at batch 1 and prefill tokens/s for a 512-token prompt for transformers
   fully on the GPU, transformers + accelerate CPU offload (dispatch_model with an inferred device map and
   max_memory), moesys (mmap store, pinned store, int8, int4) and moesys with a budget holding the whole
   model; the bound is pinned H2D bandwidth / (expert bytes missed per decode token) at the measured hit rate.
3. Qwen3-30B-A3B-shaped random bf16 model (~61 GB, built on the GPU, experts copied to pinned host memory,
   never written to disk) under 16 GiB, if the time guard allows.
4. On request (--stages deepseek-v2-lite,gpt-oss-20b): DeepSeek-V2-Lite- and GPT-OSS-20B-shaped random bf16
   models under 8 GiB, beside transformers fully on the GPU and accelerate's offload; the bound is
   1 / max(missed bytes per token / pinned bandwidth, decode step with every expert resident).
   --stages smoke runs both shapes tiny on the CPU (the code path, no numbers worth keeping).

Legend: T tokens, H hidden, I expert intermediate, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import time
import traceback

import torch

from run_meta import run_meta, write_json

START = time.time()


def log(*args):
    print(f"[{time.time() - START:6.1f}s]", *args, flush=True)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def h2d_bandwidth(nbytes: int = 1 << 30) -> dict:
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = {}
    for name, pin in (("pinned", True), ("pageable", False)):
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        src.fill_(1)
        best = float("inf")
        for _ in range(4):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=pin)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        out[f"h2d_{name}_GBps"] = nbytes / best / 1e9
    return out


def static_cache_for(model, max_len: int):
    """One StaticCache per model, reused (reset) across runs: the decode graph is keyed on the cache object,
    so the warm-up captures it and the timed run only replays."""
    from transformers import StaticCache

    cache = getattr(model, "_bench_static_cache", None)
    if cache is None:
        cache = model._bench_static_cache = StaticCache(config=model.config, max_cache_len=max_len)
    return cache


def _cache_kwargs(model, cache, positions):
    kw = {"past_key_values": cache, "use_cache": True}
    takes = getattr(model, "_bench_takes_cache_position", None)
    if takes is None:  # asked once per model: inspect.signature costs ~0.2 ms, inside the timed decode loop
        takes = model._bench_takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters
    if takes:  # transformers < 5.2x
        kw["cache_position"] = positions
    return kw


@torch.no_grad()
def forced_decode(model, prompt, steps: int, vocab: int, before_decode=None, seed: int = 123, static=False):
    """(prefill tokens/s, decode tokens/s): one forward over the prompt, then `steps` batch-1 forwards with the
    KV cache, each fed a random token. A random-weight model's own greedy continuation repeats itself (and so
    reuses the same experts); random inputs route like real text does, so cache misses are realistic.
    static: a StaticCache (the decode steps then replay moesys' CUDA graph where the model has one)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    toks = torch.randint(2, vocab, (steps, 1, 1), generator=g).to(prompt.device)
    P = prompt.shape[1]
    cache = None
    if static:
        cache = static_cache_for(model, P + steps)
        cache.reset()
    _sync()
    t0 = time.perf_counter()
    if static:
        out = model(prompt, logits_to_keep=1, **_cache_kwargs(model, cache, torch.arange(P, device=prompt.device)))
    else:
        out = model(prompt, use_cache=True, logits_to_keep=1)
    _sync()
    t1 = time.perf_counter()
    if before_decode is not None:
        before_decode()  # the engine's statistics read (a sync): outside the decode timing
    t2 = time.perf_counter()
    past = out.past_key_values
    for i in range(steps):
        if static:
            model(toks[i], **_cache_kwargs(model, cache, torch.tensor([P + i], device=prompt.device)))
        else:
            past = model(toks[i], past_key_values=past, use_cache=True).past_key_values
    _sync()
    return P / (t1 - t0), steps / (time.perf_counter() - t2)


SYNC_NAMES = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync",
              "aten::_local_scalar_dense")


def profile_summary(prof, steps: int, wall_s: float) -> dict:
    """Per decode token, from a torch.profiler run over `steps` steps: wall time, the kernels' summed device
    time, kernel launches, host time blocked in synchronisations (and D2H reads), the top host ops."""
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    host = prof.key_averages()
    syncs = {e.key: (e.count / steps, e.cpu_time_total / steps / 1e3) for e in host if e.key in SYNC_NAMES}
    launches = sum(e.count for e in host if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
    top = sorted((e for e in host if e.device_type == torch.autograd.DeviceType.CPU),
                 key=lambda e: -e.self_cpu_time_total)[:15]
    return {"wall_ms_per_token": wall_s / steps * 1e3,
            "kernel_ms_per_token": sum(e.device_time_total for e in kernels) / steps / 1e3,
            "kernels_per_token": len(kernels) / steps, "launch_calls_per_token": launches / steps,
            "sync_calls_and_ms_per_token": syncs,
            "top_host_ops_self_ms_per_token": {e.key: e.self_cpu_time_total / steps / 1e3 for e in top}}


def profile_forced_decode(model, prompt, steps: int, vocab: int, static: bool) -> dict:
    """forced_decode with other tokens than the timed run's, its `steps` decode steps (not the prefill)
    under torch.profiler; the wall time includes the profiler's own overhead."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    _, decode = forced_decode(model, prompt, steps, vocab, seed=999, static=static, before_decode=prof.start)
    prof.stop()
    return profile_summary(prof, steps, steps / decode)


def warm_up(model, prompt, steps: int, vocab: int, static=False) -> None:
    """One untimed pass over the timed run's sequence lengths, with other decode tokens (so the expert cache
    is not primed with the timed routing). cuDNN attention builds an execution plan per new KV length,
    ~5 ms of host time per layer and token on the H200 machine (bench/offload_profile.py): whoever meets a
    length first pays it, so every implementation gets the same warm start (and a decode graph is captured
    here, not in the timed run)."""
    forced_decode(model, prompt, steps, vocab, seed=321, static=static)


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()  # give cached pinned blocks back before the next store is pinned


# ------------------------------------------------------------------ 1. correctness on tiny models
def tiny_configs():
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=None)
    return {
        "mixtral": MixtralConfig(**common, num_local_experts=8, num_experts_per_tok=2),
        "qwen2_moe": Qwen2MoeConfig(**common, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                    shared_expert_intermediate_size=80),
        "qwen3_moe": Qwen3MoeConfig(**common, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                    head_dim=16),
        "olmoe": OlmoeConfig(**common, num_experts=8, num_experts_per_tok=2),
    }


def correctness_tiny(workdir) -> list[dict]:
    from transformers import AutoModelForCausalLM

    import moesys.offload as mo
    from moesys.offload.adapters import adapter_for, find_moe_blocks
    from moesys.offload.loader import build_skeleton, plan_memory

    rows = []
    for name, cfg in tiny_configs().items():
        path = os.path.join(workdir, f"tiny_{name}")
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
        for dtype in (torch.bfloat16, torch.float32):
            ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda()
            prompt = torch.randint(2, 256, (1, 24), device="cuda")
            want = {"dynamic": ref.generate(prompt, max_new_tokens=24, do_sample=False),
                    "static": ref.generate(prompt, max_new_tokens=24, do_sample=False,
                                           cache_implementation="static", disable_compile=True)}
            del ref
            free()
            skel = build_skeleton(cfg, dtype)
            plan = plan_memory(skel, find_moe_blocks(skel, adapter_for(cfg)), dtype, 1 << 40)
            budget = plan.resident_bytes + plan.reserve_bytes + 10 * plan.slot_bytes  # 10 of 24 experts
            # the default (a StaticCache, each decode step replaying the CUDA graph) against transformers
            # with a StaticCache; cuda_graph=False (dynamic cache, routing read back) against its default
            for graph in (True, False):
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                model = mo.load(path, gpu_memory=budget, dtype=dtype, cpu_experts="off", cuda_graph=graph)
                got = model.generate(prompt, max_new_tokens=24, do_sample=False)
                peak = torch.cuda.max_memory_allocated() - base
                dec = getattr(model, "moesys_decode_graph", None)
                rows.append({"model": name, "dtype": str(dtype).split(".")[-1], "cuda_graph": graph,
                             "identical": bool(torch.equal(want["static" if graph else "dynamic"], got)),
                             "peak_bytes": peak, "budget": budget,
                             "hit_rate": model.moesys_offload.snapshot().hit_rate,
                             "graph_replays": dec.replays if dec is not None else None})
                log("correctness", rows[-1])
                del model
                free()
    return rows


# ------------------------------------------------------------------ 2. OLMoE-shaped
def olmoe_config():
    from transformers import OlmoeConfig

    return OlmoeConfig(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                       num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                       max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=None,
                       dtype="bfloat16")


def random_model_on_gpu(cfg, name: str, device: str = "cuda", prompt_tokens: int = 512):
    """(bf16 model with random weights built on the GPU, a fixed random 512-token prompt): generating on
    the GPU is seconds where filling 7B parameters on the host took minutes. `device`="cpu": the smoke runs."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        gpu = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    log(name, "built on", device, sum(p.numel() for p in gpu.parameters()) * 2 / 1e9, "GB")
    prompt = torch.randint(2, cfg.vocab_size, (1, prompt_tokens), device=device,
                           generator=torch.Generator(device).manual_seed(0))
    return gpu, prompt


def source_of_model(model, cfg):
    """A moesys.offload TensorSource reading a transformers Qwen3-MoE-style model in memory (fused
    gate_up_proj [E, 2I, H] and down_proj per layer). Layers are read in order, so each layer's experts are
    dropped from `model` once the store has read the next layer's first: the expert cache, allocated after
    the store, then fits on the GPU beside what is left."""
    from moesys.offload.adapters import adapter_for
    from moesys.offload.source import TensorSource

    adapter = adapter_for(cfg)
    state = {adapter.module_name(k): v for k, v in model.state_dict().items() if ".experts." not in k}
    layers, I = model.model.layers, cfg.moe_intermediate_size

    def expert(layer, e):
        if e == 0 and layer > 0:
            prev = layers[layer - 1].mlp.experts
            prev.gate_up_proj, prev.down_proj = None, None
        ex = layers[layer].mlp.experts
        return ex.gate_up_proj[e, :I], ex.gate_up_proj[e, I:], ex.down_proj[e]

    return TensorSource(state, expert)


def expert_bytes(cfg, I):
    return 3 * cfg.hidden_size * I * 2


def run_ours(records, base, model, prompt, steps, budget, bw, vocab, want=None, extra=None, static=True):
    """Identity check (greedy tokens; `want` maps "static"/"dynamic" to transformers' eager tokens with that
    cache, and "compiled" to transformers' under moesys' compiled decode graph), then timed prefill +
    teacher-forced decode; stats, bound, memory peak. static: decode with a StaticCache (the CUDA-graph path,
    moesys.offload's default on CUDA), else transformers' DynamicCache."""
    engine = model.moesys_offload
    _reset_peak()
    identical = identical_compiled = None
    if want is not None:
        tokens = want["static" if static else "dynamic"]
        got = model.generate(prompt[:, :64], max_new_tokens=len(tokens), do_sample=False, pad_token_id=0,
                             cache_implementation="static" if static else "dynamic")[0, 64:].tolist()
        identical = got == tokens
        if static and want.get("compiled") is not None:
            # the compiled step (the default on CUDA) reproduces transformers' compiled step, not its eager one
            identical_compiled = got == want["compiled"]
    warm_up(model, prompt, steps, vocab, static=static)
    engine.reset_stats()
    at = {}
    prefill, decode = forced_decode(model, prompt, steps, vocab, static=static,
                                    before_decode=lambda: at.update(engine.snapshot().as_dict()))
    end = engine.snapshot().as_dict()
    misses = (end["misses"] - at["misses"]) / steps
    hits = (end["hits"] - at["hits"]) / steps
    missed_bytes = misses * engine.store.expert_bytes
    bound = bw / missed_bytes if missed_bytes else None
    d = {k: end[k] - at[k] for k in ("prefetch_guessed", "prefetch_used", "copy_wait_s", "bytes_copied",
                                     "cpu_experts")}
    rec = dict(base, tokens_per_s=decode, decode_tokens_per_s=decode, prefill_tokens_per_s=prefill,
               decode_hit_rate=hits / (hits + misses) if hits + misses else 1.0,
               decode_missed_experts_per_token=misses, decode_missed_bytes_per_token=missed_bytes,
               bound_tokens_per_s=bound, fraction_of_bound=decode / bound if bound else None,
               decode_prefetch_accuracy=d["prefetch_used"] / d["prefetch_guessed"] if d["prefetch_guessed"] else None,
               decode_copy_wait_s_per_token=d["copy_wait_s"] / steps,
               decode_bytes_copied_per_token=d["bytes_copied"] / steps, decode_cpu_experts=d["cpu_experts"],
               prefill_bytes_copied=at["bytes_copied"], expert_bytes=engine.store.expert_bytes,
               num_slots=engine.cache.num_slots, host_memory=engine.host_mode,
               budget_bytes=budget, peak_bytes=_peak(), cost_model=engine.cost_model,
               identical_to_gpu=identical, identical_to_gpu_compiled=identical_compiled, static_cache=static,
               graph_replays=getattr(getattr(model, "moesys_decode_graph", None), "replays", None))
    rec["peak_within_budget"] = rec["peak_bytes"] <= budget if rec["peak_bytes"] is not None else None
    if extra:
        rec.update(extra)
    records.append(rec)
    log(rec["impl"], {k: rec[k] for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "decode_hit_rate",
                                          "bound_tokens_per_s", "decode_prefetch_accuracy",
                                          "decode_copy_wait_s_per_token", "peak_within_budget",
                                          "identical_to_gpu", "identical_to_gpu_compiled")})
    return rec


def baseline(records, base, impl, model, prompt, steps, vocab, want_tokens=0, budget=None, static=False):
    """transformers' own numbers: greedy tokens (for the identity checks, with a DynamicCache and with a
    StaticCache) and the same timed run (static: a StaticCache, the decode steps replayed as a CUDA graph by
    moesys.offload.graph on the plain model: what transformers' own compiled static-cache generate aims at,
    without torch.compile's minutes of compile time)."""
    want = None
    if want_tokens:
        want = {}
        for kind in ("dynamic", "static"):
            out = model.generate(prompt[:, :64], max_new_tokens=want_tokens, do_sample=False, pad_token_id=0,
                                 cache_implementation=kind, disable_compile=True)
            want[kind] = out[0, 64:].tolist()
    warm_up(model, prompt, steps, vocab, static=static)
    _reset_peak()
    prefill, decode = forced_decode(model, prompt, steps, vocab, static=static)
    records.append(dict(base, impl=impl, tokens_per_s=decode, decode_tokens_per_s=decode,
                        prefill_tokens_per_s=prefill, decode_steps=steps, budget_bytes=budget,
                        peak_bytes=_peak(), static_cache=static))
    log(impl, "decode", decode, "prefill", prefill)
    return want


def load_and_run(records, base, path, budget, opts, bw_Bps, prompt, steps, vocab, want, static, save,
                 profile_steps=0):
    """mo.load the checkpoint at `path` under `budget` with `opts` and run_ours on it; a failure is recorded
    (and the next implementation still runs). The record, or None."""
    import moesys.offload as mo

    rec = model = None
    try:
        t0 = time.perf_counter()
        model = mo.load(path, gpu_memory=budget, dtype=torch.bfloat16, **opts)
        load_s = time.perf_counter() - t0
        rec = run_ours(records, base, model, prompt, steps, budget, bw_Bps, vocab, want=want,
                       extra={"load_s": load_s, "options": opts}, static=static)
        if profile_steps:
            rec["profile"] = profile_forced_decode(model, prompt, profile_steps, vocab, static)
            log(base["impl"], "profile", rec["profile"])
    except Exception as e:
        traceback.print_exc()
        records.append(dict(base, error=repr(e)))
    # a failed row must not keep its model (device memory, the pinned host store) from the rows after it:
    # the local, not only the traceback, holds it
    model = None
    free()
    save()
    return rec


class _Skipped(Exception):
    pass


def bench_olmoe(records, meta, workdir, bw, steps, only=None, save=lambda: None):
    """`only`: the impls to run besides transformers-gpu (which the identity checks need); None = all.
    `save` is called after each implementation (a run cut short keeps what it measured)."""
    from transformers import AutoModelForCausalLM

    cfg = olmoe_config()
    path = os.path.join(workdir, "olmoe_shaped")
    V = cfg.vocab_size
    gpu, prompt = random_model_on_gpu(cfg, "olmoe")
    gpu.save_pretrained(path)
    log("olmoe saved")
    base = dict(meta, bench="offload", shape="olmoe-1b-7b", prompt_tokens=512, decode_steps=steps, batch=1,
                decode="teacher-forced random tokens, KV cache")
    want = baseline(records, base, "transformers-gpu", gpu, prompt, steps, V, want_tokens=16)
    from moesys.offload import graph as decode_graph
    decode_graph.install(gpu)
    baseline(records, base, "transformers-gpu-cudagraph", gpu, prompt, steps, V, static=True)
    # the same graph over torch.compile's step (what moesys captures by default on CUDA): the compute-bound
    # ceiling of this model's decode, every expert on the GPU
    del gpu.forward, gpu._bench_static_cache  # back to the class's forward, a cache the new graph captures
    decode_graph.install(gpu, compile=True)
    t0 = time.perf_counter()
    got = baseline(records, base, "transformers-gpu-compiled-cudagraph", gpu, prompt, steps, V, want_tokens=16,
                   static=True)
    # inductor's kernels round differently from eager's: are the greedy tokens still transformers' own?
    records[-1].update(warm_up_and_run_s=time.perf_counter() - t0, identical_to_gpu=got["static"] == want["static"])
    want["compiled"] = got["static"]
    del gpu
    free()

    budget = 4 * 2**30
    try:
        if only is not None and "accelerate-offload" not in only:
            raise _Skipped
        acc = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="auto",
                                                   max_memory={0: budget, "cpu": 100 * 2**30}).eval()
        baseline(records, base, "accelerate-offload", acc, prompt, 3, V, budget=budget)
        del acc
    except _Skipped:
        pass
    except Exception as e:  # the baseline's failure must not hide ours
        traceback.print_exc()
        records.append(dict(base, impl="accelerate-offload", error=repr(e)))
    free()

    # (impl, budget, load options, static cache): static rows take the CUDA-graph decode (the default);
    # the mmap store cannot (no pinned copy for the device to read), and "-eager" rows are the per-layer
    # host-routed path with speculative prefetch (cuda_graph=False)
    runs = [("moesys-mmap", budget, dict(host_memory="mmap"), False),
            ("moesys-pinned-eager", budget, dict(host_memory="pinned", cuda_graph=False), False),
            ("moesys-pinned", budget, dict(host_memory="pinned"), True),
            ("moesys-pinned-uncompiled", budget, dict(host_memory="pinned", compile=False), True),
            ("moesys-int8", budget, dict(host_memory="pinned", quantize_experts="int8"), True),
            ("moesys-int4", budget, dict(host_memory="pinned", quantize_experts="int4"), True),
            ("moesys-int4-eager", budget, dict(host_memory="pinned", quantize_experts="int4", cuda_graph=False),
             False),
            # a budget holding the whole model: at least as fast as transformers fully on the GPU
            ("moesys-whole-model-budget", 40 * 2**30, dict(host_memory="pinned"), True)]
    for impl, b, opts, static in runs:
        if only is not None and impl not in only:
            continue
        exact = opts.get("quantize_experts", "none") == "none"
        load_and_run(records, dict(base, impl=impl), path, b, opts, bw["h2d_pinned_GBps"] * 1e9, prompt, steps, V,
                     want if exact else None, static, save)


# ------------------------------------------------------------------ 3. Qwen3-30B-A3B-shaped
def qwen3_config(tiny: bool = False):
    """The Qwen3-30B-A3B shape (48 layers, 128 experts of 768, top-8; 61 GB in bf16), or a 3-layer, 16-expert
    top-4 miniature for CPU smoke runs."""
    from transformers import Qwen3MoeConfig

    if tiny:
        return Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              num_experts=16, num_experts_per_tok=4, max_position_embeddings=1024,
                              pad_token_id=0, bos_token_id=1, eos_token_id=None)
    return Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, max_position_embeddings=4096,
                          pad_token_id=0, bos_token_id=1, eos_token_id=None, dtype="bfloat16")


def bench_qwen3(records, meta, bw, steps):
    from moesys.offload.loader import build

    cfg = qwen3_config()
    shape = "qwen3-30b-a3b"
    gpu, prompt = random_model_on_gpu(cfg, "qwen3")
    V = cfg.vocab_size
    base = dict(meta, bench="offload", shape=shape, prompt_tokens=512, decode_steps=steps, batch=1,
                decode="teacher-forced random tokens, KV cache")
    want = baseline(records, base, "transformers-gpu", gpu, prompt, steps, V, want_tokens=16)
    # the same model in moesys' compiled decode graph: its speed, and the tokens moesys' default step matches
    from moesys.offload import graph as decode_graph
    decode_graph.install(gpu, compile=True)
    got = baseline(records, base, "transformers-gpu-compiled-cudagraph", gpu, prompt, steps, V, want_tokens=16,
                   static=True)
    records[-1].update(identical_to_gpu=got["static"] == want["static"])
    want["compiled"] = got["static"]
    del gpu.forward, gpu._bench_static_cache, gpu.moesys_decode_graph  # the graph's pool, before the build

    budget = 16 * 2**30
    # the experts go to pinned host memory straight from the GPU model; the GPU model is freed after
    t0 = time.perf_counter()
    model = build(cfg, source_of_model(gpu, cfg), gpu_memory=budget, dtype=torch.bfloat16, host_memory="pinned")
    load_s = time.perf_counter() - t0
    del gpu
    free()
    run_ours(records, dict(base, impl="moesys-pinned"), model, prompt, steps, budget,
             bw["h2d_pinned_GBps"] * 1e9, V, want=want, extra={"load_s": load_s})
    del model
    free()
    records.append(dict(base, impl="accelerate-offload", error="not run: the bf16 model (61 GB) twice in "
                        "host memory (ours + accelerate's CPU copy) does not fit 128 GB next to the time budget"))


# ------------------------------------------------------------------ 4. DeepSeek-V2-Lite- and GPT-OSS-20B-shaped
def shape_configs(tiny: bool = False) -> dict:
    """name -> config: DeepSeek-V2-Lite (MLA, 2 shared + 64 routed experts, top-6) and GPT-OSS-20B (dequantized
    to bf16: 32 experts with biases and clamped SwiGLU, top-4, sliding-window layers, attention sinks), or the
    same architectures tiny (`tiny`: the CPU smoke run)."""
    from transformers import DeepseekV2Config, GptOssConfig

    common = dict(pad_token_id=0, bos_token_id=1, eos_token_id=None, dtype="bfloat16")
    if tiny:
        return {"deepseek-v2-lite": DeepseekV2Config(vocab_size=101, hidden_size=32, intermediate_size=40,
                                                     moe_intermediate_size=24, num_hidden_layers=3,
                                                     num_attention_heads=4, num_key_value_heads=4,
                                                     n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
                                                     first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                                                     qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                                     max_position_embeddings=256, **common),
                "gpt-oss-20b": GptOssConfig(vocab_size=101, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                            num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
                                            layer_types=["sliding_attention", "full_attention"],
                                            max_position_embeddings=256, **common)}
    return {"deepseek-v2-lite": DeepseekV2Config(vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                                                 moe_intermediate_size=1408, num_hidden_layers=27,
                                                 num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
                                                 n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
                                                 kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
                                                 qk_nope_head_dim=128, v_head_dim=128, routed_scaling_factor=1.0,
                                                 max_position_embeddings=4096, **common),
            "gpt-oss-20b": GptOssConfig(vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                                        num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8,
                                        head_dim=64, num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
                                        layer_types=["sliding_attention", "full_attention"] * 12,
                                        max_position_embeddings=4096, **common)}


def _few_slots_budget(path, slots: int = 4) -> int:
    """A budget holding the non-expert weights, the workspace and `slots` experts of the checkpoint at `path`."""
    from transformers import AutoConfig

    import moesys.offload as mo
    from moesys.offload.adapters import adapter_for, find_moe_blocks
    from moesys.offload.loader import build_skeleton

    cfg = AutoConfig.from_pretrained(path)
    skel = build_skeleton(cfg, torch.bfloat16)
    plan = mo.plan_memory(skel, find_moe_blocks(skel, adapter_for(cfg)), torch.bfloat16, 1 << 40)
    return plan.resident_bytes + plan.reserve_bytes + slots * plan.slot_bytes


def bench_shape(records, meta, workdir, bw_Bps, steps, name, cfg, budget, device="cuda", save=lambda: None,
                prompt_tokens=512, only=None, profile_steps=0):
    """Batch-1 decode of one random bf16 model saved to disk: transformers fully on the device (where it fits),
    transformers + accelerate offload (device_map="auto" with max_memory = the budget), moesys under `budget`
    (pinned store, CUDA-graph decode; compiled, the default, and not), transformers under moesys' compiled
    decode graph (the default row's exact reference), and moesys with a budget holding every expert (the
    resident step).
    bound = 1 / max(missed bytes per token / pinned bandwidth, resident step time): the copies and the compute
    can at best overlap fully. `only`: the impls to run (None: all; without transformers-gpu there are no
    reference tokens to compare). `profile_steps`: that many more decode steps of each moesys row under
    torch.profiler (`profile` in its record: kernel time, launches, host syncs per token)."""
    from transformers import AutoModelForCausalLM

    path = os.path.join(workdir, f"{name}_shaped")
    V = cfg.vocab_size
    base = dict(meta, bench="offload", shape=name, prompt_tokens=prompt_tokens, decode_steps=steps, batch=1,
                decode="teacher-forced random tokens, KV cache")
    full, prompt = random_model_on_gpu(cfg, name, device, prompt_tokens)
    full.save_pretrained(path)
    log(name, "saved")
    if callable(budget):  # the smoke run: a budget from the memory plan (a few slots, so experts are evicted)
        budget = budget(path)
    want = None

    def wanted(impl):
        return only is None or impl in only
    try:  # fully on the device: the tokens every exact run must give, and the speed to compare with
        if wanted("transformers-gpu"):
            want = baseline(records, base, "transformers-gpu", full, prompt, steps, V, want_tokens=16)
    except Exception as e:
        traceback.print_exc()
        records.append(dict(base, impl="transformers-gpu", error=repr(e)))
    if want is not None and device == "cuda" and wanted("transformers-gpu-compiled-cudagraph"):
        # the same model under moesys' compiled decode graph: the tokens moesys' default (compiled) step must
        # give; with "moesys-pinned-uncompiled" against the eager tokens, this tells compile rounding apart
        # from an offload fault when the default row differs from the eager model
        from moesys.offload import graph as decode_graph
        try:
            decode_graph.install(full, compile=True)
            got = baseline(records, base, "transformers-gpu-compiled-cudagraph", full, prompt, steps, V,
                           want_tokens=16, static=True)
            records[-1].update(identical_to_gpu=got["static"] == want["static"])
            want["compiled"] = got["static"]
        except Exception as e:
            traceback.print_exc()
            records.append(dict(base, impl="transformers-gpu-compiled-cudagraph", error=repr(e)))
        save()
    del full
    free()
    ours = {}
    host = "pinned" if device == "cuda" else "memory"
    # the exactness rows first (the run has a time guard): the default compiled graph, then the same without
    # compile, then the resident step for the bound; accelerate (the slowest) last
    for impl, b, opts in (("moesys-pinned", budget, {}), ("moesys-pinned-uncompiled", budget, dict(compile=False)),
                          ("moesys-whole-model-budget", 1 << 40, {})):
        if (impl == "moesys-pinned-uncompiled" and device != "cuda") or not wanted(impl):
            continue  # compile is off on the CPU anyway
        rec = load_and_run(records, dict(base, impl=impl), path, b, dict(host_memory=host, device=device, **opts),
                           bw_Bps, prompt, steps, V, want, True, save, profile_steps)
        if rec is not None:
            ours[impl] = rec
    if device == "cuda" and wanted("accelerate-offload"):
        try:
            acc = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="auto",
                                                       max_memory={0: budget, "cpu": 200 * 2**30}).eval()
            baseline(records, base, "accelerate-offload", acc, prompt, 3, V, budget=budget)
            del acc
        except Exception as e:  # the baseline's failure must not hide ours
            traceback.print_exc()
            records.append(dict(base, impl="accelerate-offload", error=repr(e)))
        free()
        save()
    if "moesys-pinned" in ours and "moesys-whole-model-budget" in ours:
        rec, resident = ours["moesys-pinned"], ours["moesys-whole-model-budget"]
        copy_s = rec["decode_missed_bytes_per_token"] / bw_Bps
        bound = 1 / max(copy_s, 1 / resident["decode_tokens_per_s"])
        rec.update(bound_tokens_per_s=bound, fraction_of_bound=rec["decode_tokens_per_s"] / bound,
                   resident_step_s=1 / resident["decode_tokens_per_s"], missed_copy_s_per_token=copy_s)
        acc = [r for r in records if r.get("shape") == name and r["impl"] == "accelerate-offload"
               and "tokens_per_s" in r]
        if acc:
            rec["speedup_vs_accelerate"] = rec["decode_tokens_per_s"] / acc[-1]["decode_tokens_per_s"]
        log(name, {k: rec.get(k) for k in ("decode_tokens_per_s", "decode_hit_rate", "bound_tokens_per_s",
                                            "fraction_of_bound", "speedup_vs_accelerate", "identical_to_gpu")})
        save()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--workdir", default="/tmp/moesys_offload_bench")
    p.add_argument("--steps", type=int, default=24, help="timed batch-1 decode steps")
    p.add_argument("--skip-qwen3", action="store_true")
    p.add_argument("--stages", default="correctness,olmoe,qwen3",
                   help="comma-separated stages to run (default: correctness,olmoe,qwen3); also deepseek-v2-lite and "
                        "gpt-oss-20b (8 GiB budget each), and smoke (both of those shapes tiny, on the CPU)")
    p.add_argument("--only", default=None,
                   help="comma-separated impls to run in the OLMoE stage and in deepseek-v2-lite / gpt-oss-20b "
                        "(default: all)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="deepseek-v2-lite / gpt-oss-20b: profile this many more decode steps of each moesys row")
    p.add_argument("--qwen3-after-s", type=float, default=200.0,
                   help="skip the Qwen3 shape if this many seconds have passed before it starts")
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    stages = set(args.stages.split(","))
    records = []

    def save():
        write_json(args.out, records)

    if stages == {"smoke"}:  # CPU: the new shapes' code path on tiny models, no GPU, nominal bandwidth
        meta = run_meta("cpu")
        for name, cfg in shape_configs(tiny=True).items():
            bench_shape(records, meta, args.workdir, 1e9, 4, name, cfg, _few_slots_budget, device="cpu", save=save,
                        prompt_tokens=72)  # run_ours checks greedy tokens after a 64-token prompt
        log("done")
        return
    meta = run_meta("cuda")
    bw = h2d_bandwidth()
    log("bandwidth", bw)
    records.append(dict(meta, bench="offload", impl="h2d-bandwidth", shape="1GiB", **bw))

    def stage(name, fn):
        try:
            fn()
        except Exception as e:  # one stage's failure must not lose the others' numbers
            traceback.print_exc()
            records.append(dict(meta, bench="offload", impl=name, error=repr(e)))
        free()
        save()

    def tiny():
        for row in correctness_tiny(args.workdir):
            records.append(dict(meta, bench="offload-correctness", impl="moesys", shape=f"tiny-{row['model']}",
                                **row))

    if "correctness" in stages:
        stage("correctness", tiny)
    only = set(args.only.split(",")) if args.only else None
    if "olmoe" in stages:
        stage("olmoe", lambda: bench_olmoe(records, meta, args.workdir, bw, args.steps, only, save))
    if "qwen3" not in stages:
        log("qwen3 shape not among --stages")
    elif args.skip_qwen3 or time.time() - START > args.qwen3_after_s:
        log("qwen3 shape skipped (time guard)")
        records.append(dict(meta, bench="offload", shape="qwen3-30b-a3b", impl="moesys-pinned",
                            error="not run: time guard"))
        save()
    else:
        stage("qwen3", lambda: bench_qwen3(records, meta, bw, args.steps))
    for name, cfg in shape_configs().items():
        if name in stages:
            stage(name, lambda: bench_shape(records, meta, args.workdir, bw["h2d_pinned_GBps"] * 1e9, args.steps,
                                            name, cfg, 8 * 2**30, save=save, only=only,
                                            profile_steps=args.profile_steps))
    log("done")


if __name__ == "__main__":
    main()

"""Where a graph-replayed decode step of the OLMoE-1B-7B shape spends its time (issue 5), on one GPU.

For transformers fully on the GPU (the compiled step under moesys' decode graph: the compute ceiling) and
for moesys (budget holding the whole model, 4 GiB pinned bf16, 4 GiB int4), after a warm-up:
- decode tokens/s as bench/offload.py times it (teacher-forced random tokens, StaticCache);
- the GPU time of back-to-back replays of the captured graph (no host in between; the cache sees the last
  step's token again, so no misses: the step's compute and bookkeeping without copies), and the rest of
  a timed step (host work, input copies, misses' copies);
- the kernels of three replays from torch.profiler, summed by name: the top ones, and kernels per step.

    PYTHONPATH=.:bench python bench/offload_step_profile.py --out profile.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from offload import forced_decode, free, log, olmoe_config, random_model_on_gpu
from run_meta import run_meta


@torch.no_grad()
def measure(model, prompt, vocab, steps=24) -> dict:
    from transformers import StaticCache

    # the cache forced_decode reuses, with room for the extra replays below: the captured step advances the
    # cache's own write position on the device (transformers' StaticCache), so each replay takes a slot
    model._bench_static_cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + steps + 64)
    forced_decode(model, prompt, steps, vocab, seed=321, static=True)  # warm-up: compile, capture
    decode = forced_decode(model, prompt, steps, vocab, static=True)[1]
    decoder = model.moesys_decode_graph
    graph = decoder.graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    replay_ms = start.elapsed_time(end) / 20
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    by_name = {}
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        n, t = by_name.get(e.name, (0, 0.0))
        by_name[e.name] = (n + 1, t + e.device_time_total)
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:30]
    rec = dict(decode_tokens_per_s=decode, step_ms=1e3 / decode, replay_ms=replay_ms,
               host_and_launch_ms=1e3 / decode - replay_ms, kernels_per_step=sum(n for n, _ in by_name.values()) / 3,
               profiled_us_per_step=sum(t for _, t in by_name.values()) / 3,
               top_kernels=[(name[:120], n / 3, t / 3) for name, (n, t) in top])
    rec.update(host_split(model, prompt, vocab))
    # a third run over the same StaticCache (generate() reuses a model's cache the same way): still right?
    again = forced_decode(model, prompt, steps, vocab, static=True)[1]
    rec["third_run_tokens_per_s"] = again
    log({k: v for k, v in rec.items() if k != "top_kernels"})
    for name, n, t in rec["top_kernels"][:12]:
        log(f"   {t:8.1f} us  x{n:5.1f}  {name[:90]}")
    return rec


def host_split(model, prompt, vocab, steps=24) -> dict:
    """Per decode step as forced_decode takes it (serial: the next step's position tensor is copied from host
    memory, which waits for the GPU): the host time inside model() (hooks, the decode graph's argument
    checks and input copies, the graph launch) and the whole step through a sync, medians over unprofiled
    steps; then the host functions of as many more steps by cumulative time (cProfile)."""
    import cProfile
    import io
    import pstats
    import statistics

    from offload import _cache_kwargs

    cache = model._bench_static_cache
    P = prompt.shape[1]
    cache.reset()
    model(prompt, logits_to_keep=1, **_cache_kwargs(model, cache, torch.arange(P, device=prompt.device)))
    toks = torch.randint(2, vocab, (steps, 1, 1), device=prompt.device)
    host, whole = [], []
    prof = cProfile.Profile()
    for i in range(steps):
        pos = torch.tensor([P + i], device=prompt.device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        profiled = i >= steps // 2  # the first half is timed, the second profiled
        if profiled:
            prof.enable()
        model(toks[i], **_cache_kwargs(model, cache, pos))
        prof.disable()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        if not profiled:
            host.append(t1 - t0)
            whole.append(time.perf_counter() - t0)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
    return dict(host_in_forward_ms=1e3 * statistics.median(host), step_synced_ms=1e3 * statistics.median(whole),
                host_profile=buf.getvalue()[-6000:])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--only", default="transformers-gpu-compiled-cudagraph,moesys-whole-model-budget,moesys-pinned,"
                   "moesys-int4", help="comma-separated implementations to profile")
    args = p.parse_args()
    only = set(args.only.split(","))
    known = {"transformers-gpu-compiled-cudagraph", "moesys-whole-model-budget", "moesys-pinned", "moesys-int4"}
    if only - known:
        p.error(f"--only: unknown {sorted(only - known)}; choose from {sorted(known)}")
    from moesys.offload import graph as decode_graph
    from moesys.offload.adapters import adapter_for
    from moesys.offload.loader import build
    from moesys.offload.source import TensorSource

    meta = run_meta("cuda")
    rows = []

    def save():
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1, default=str)

    cfg = olmoe_config()
    V = cfg.vocab_size
    gpu, prompt = random_model_on_gpu(cfg, "olmoe")
    base = dict(meta, bench="offload-step-profile", shape="olmoe-1b-7b")
    if "transformers-gpu-compiled-cudagraph" in only:
        decode_graph.install(gpu, compile=True)
        rows.append(dict(base, impl="transformers-gpu-compiled-cudagraph", **measure(gpu, prompt, V)))
        save()

    adapter = adapter_for(cfg)
    state = {adapter.module_name(k): v for k, v in gpu.state_dict().items() if ".experts." not in k}
    I = cfg.intermediate_size

    def expert(layer, e):
        ex = gpu.model.layers[layer].mlp.experts
        return ex.gate_up_proj[e, :I], ex.gate_up_proj[e, I:], ex.down_proj[e]

    for impl, budget, opts in [("moesys-whole-model-budget", 40 * 2**30, {}),
                               ("moesys-pinned", 4 * 2**30, {}),
                               ("moesys-int4", 4 * 2**30, dict(quantize_experts="int4"))]:
        if impl not in only:
            continue
        try:
            model = build(cfg, TensorSource(state, expert), gpu_memory=budget, dtype=torch.bfloat16,
                          host_memory="pinned", **opts)
            rows.append(dict(base, impl=impl, budget_bytes=budget, options=opts, **measure(model, prompt, V)))
            del model
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            rows.append(dict(base, impl=impl, error=repr(e)[:600]))
        free()
        save()
    log("done")


if __name__ == "__main__":
    main()

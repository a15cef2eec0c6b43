"""One batch step of the device bookkeeping (moesys.offload.device_cache, issue 24): the one-launch batch kernel
against the torch reference it replaces, on the tables of an offloaded model's shape.

The Qwen3-30B-A3B shape under 16 GiB in int4 has 48 MoE layers of 128 experts and 4858 cache slots (banks of up to
1023); a decode step at batch B looks up B x 8 ids per layer (uniform routing, deterministic), next-visit victims,
and prefetches the next layer's guess (this layer's slots protected). Per (bank, B): the GPU time of one call
(median over layers of CUDA events, launches queued back to back) and the host time per call (wall time of a
loop of calls, synchronised once: what an eager step pays when the GPU waits for the host). Correctness in the
same run: every call's outputs and every table equal between the two (fed the same steps).

    PYTHONPATH=.:bench python bench/device_step.py --out bench/results/device_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from run_meta import run_meta, write_json


def tables_pair(layers: int, experts: int, slots: int, device: str):
    from moesys.offload.cache import ExpertCache
    from moesys.offload.device_cache import DeviceCacheTables

    pair = []
    for _ in range(2):
        cache = ExpertCache([("w", (2,), torch.float32)], slots, torch.device(device), "next-visit",
                            list(range(layers)), experts)
        pair.append(DeviceCacheTables(cache, "next-visit"))
        pair[-1].load_from_host()
    return pair


def steps(layers, experts, B, K, tokens, seed, device):
    """(row, ids [B*K]) for `tokens` decode steps of every layer: each row's top-K drawn uniformly."""
    g = torch.Generator().manual_seed(seed)
    return [(row, torch.stack([torch.randperm(experts, generator=g)[:K] for _ in range(B)]).flatten().to(device))
            for _ in range(tokens) for row in range(layers)]


def run_steps(tables, plan, use_kernel, guess):
    """Each layer's step and the next layer's prefetch (its guess, this layer's slots protected), as
    OffloadEngine.device_slots runs them; returns the outputs of every call."""
    outs = []
    L = len(tables.cache.row)
    for row, ids in plan:
        slot, src, dst = tables.step(row, ids, distinct=False, next_visit_from=row, use_kernel=use_kernel)
        nxt = (row + 1) % L
        same = tables.cache.bank_of[nxt] == tables.cache.bank_of[row]
        start, end = tables.cache.banks[tables.cache.bank_of[nxt]]
        room = end - start - (min(ids.numel(), tables.cache.num_experts) if same else 0)
        pre = tables.step(nxt, guess[row][:room], distinct=False, next_visit_from=row, use_kernel=use_kernel,
                          protect_N=slot if same else None, prefetch=True) if room > 0 else ()
        outs.append((slot, src, dst, *pre))
    return outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--slots", default="4858,1000", help="comma-separated cache sizes (slots)")
    ap.add_argument("--batch-sizes", default="8,32,128")
    ap.add_argument("--tokens", type=int, default=4)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    L, E, K = args.layers, args.experts, args.top_k
    records = []
    for slots in (int(s) for s in args.slots.split(",")):
        for B in (int(b) for b in args.batch_sizes.split(",")):
            ref, ker = tables_pair(L, E, slots, device)
            if min(end - start for start, end in ref.cache.banks) < min(B * K, E):
                records.append(dict(slots=slots, batch=B, error="a bank holds fewer slots than a step's experts"))
                continue
            plan = steps(L, E, B, K, args.tokens, seed=B, device=device)
            g = torch.Generator().manual_seed(1)
            guess = [torch.randperm(E, generator=g).to(device) for _ in range(L)]
            # correctness: the same steps through both, every output and table equal
            outs_r, outs_k = run_steps(ref, plan, False, guess), run_steps(ker, plan, True, guess)
            equal = all(torch.equal(a, b) for o, p in zip(outs_r, outs_k) for a, b in zip(o, p)) and all(
                torch.equal(getattr(ref, n), getattr(ker, n)) for n in ("table", "owner_S", "stamp_S", "counters"))
            rec = dict(run_meta(device), bench="device_step", layers=L, experts=E, top_k=K, slots=slots,
                       banks=[end - start for start, end in ref.cache.banks], batch=B, ids_per_step=B * K,
                       equal_to_reference=equal)
            for name, tables, use_kernel in (("reference", ref, False), ("kernel", ker, True)):
                run_steps(tables, plan, use_kernel, guess)  # warm (compile)
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                run_steps(tables, plan, use_kernel, guess)
                if device == "cuda":
                    torch.cuda.synchronize()
                host_us = (time.perf_counter() - t0) / (2 * len(plan)) * 1e6  # two calls a layer
                gpu_us = None
                if device == "cuda":
                    times = []
                    for row, ids in plan[:L]:
                        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        a.record()
                        tables.step(row, ids, distinct=False, next_visit_from=row, use_kernel=use_kernel)
                        b.record()
                        b.synchronize()
                        times.append(a.elapsed_time(b) * 1e3)
                    gpu_us = statistics.median(times)
                rec[f"{name}_wall_us_per_call"] = host_us
                rec[f"{name}_gpu_us_per_call"] = gpu_us
            records.append(rec)
            print(json.dumps({k: rec[k] for k in ("slots", "batch", "equal_to_reference", "reference_wall_us_per_call",
                                                   "kernel_wall_us_per_call", "reference_gpu_us_per_call",
                                                   "kernel_gpu_us_per_call")}), flush=True)
    write_json(args.out, records)


if __name__ == "__main__":
    main()

"""Sweep of backend="auto" against every backend it chooses between, over token counts and the
Qwen3-30B-A3B, OLMoE and Mixtral expert shapes; run through `python bench/moe_layer.py --sweep-auto`.

For each shape and T in SWEEP_T, in three modes: "fwd_eager" (no grad, eager: decode through transformers),
"fwd_graph" (no grad, one CUDA-graph replay, as a captured decode step; CUDA only; the eager warm-up
before the capture runs inside `moesys.backends.capture_warmup()`, as a user capturing "auto" does), "fwdbwd"
(training). Each backend and "auto" is timed; a record per (shape, T, mode) gives auto's choice, the best
backend and auto's ratio to it (the issue's target: <= 1.05 everywhere). The sweep then prints the
threshold table (moesys/backends/auto.py) that minimises the worst ratio over the measured points.

Legend: T tokens, H hidden, I expert intermediate, E experts, K top-k.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import traceback

import torch

from moesys.backends import capture_warmup, triton_unavailable_reason
from moesys.backends.auto import AUTO_TRITON_MIN_ROWS_PER_EXPERT, auto_mode, pick_auto
from moesys.ops import moe_mlp
from run_meta import write_json

# name: (H, I, E, K)
SWEEP_SHAPES = {
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "olmoe-1b-7b": (2048, 1024, 64, 8),
    "mixtral-8x7b": (4096, 14336, 8, 2),
}
SWEEP_T = (1, 4, 16, 64, 256, 1024, 4096, 16384)
SMOKE_SHAPES = {"smoke": (32, 16, 8, 2)}
SMOKE_T = (1, 4, 16)
CANDIDATES = ("grouped_mm", "triton")  # what "auto" picks between (moesys/backends/auto.py)
MODES = ("fwd_eager", "fwd_graph", "fwdbwd")


def _cpu_ms(fn, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_ms(fn, device: torch.device, mode: str, leaves=None) -> float | None:
    """Median milliseconds of `fn()`; None for a CUDA-graph time on the CPU."""
    if device.type != "cuda":
        return None if mode == "fwd_graph" else _cpu_ms(fn)
    from triton.testing import do_bench, do_bench_cudagraph
    if mode == "fwd_graph":
        with capture_warmup():  # autotune and warm up outside the timing, readying "auto"'s capture
            fn()
        # do_bench_cudagraph runs on a stream of its own that waits for nothing: without this its first call
        # could read the point's inputs before the kernels that make them finish (OLMoE T=1024 failed the
        # expert-id check so, at 5e61323, once the captured mode came first)
        torch.cuda.synchronize()
        return do_bench_cudagraph(fn, rep=50, return_mode="median")
    fn()  # autotune and warm up outside the timing
    return do_bench(fn, warmup=10, rep=50, grad_to_none=leaves, return_mode="median")


def measure(fn_of_backend, device, mode, leaves=None) -> float | None:
    try:
        with torch.set_grad_enabled(mode == "fwdbwd"):
            return time_ms(fn_of_backend, device, mode, leaves)
    except RuntimeError as err:  # e.g. a backend that cannot be captured; the record says so
        print(f"  {mode}: {str(err)[:200]}", flush=True)
        print("".join(traceback.format_exception(err)[-8:])[-3000:], flush=True)  # where, for a device error
        return None


def sweep_point(shape, T, H, I, E, K, device, make_inputs, meta, modes=MODES) -> list[dict]:
    x, w_gu, w_d, ids, tw = make_inputs(T, H, I, E, K, device=device)
    backends = [b for b in CANDIDATES if b == "grouped_mm" or triton_unavailable_reason(device) is None]
    records = []
    for mode in modes:
        leaves = [t.detach().requires_grad_() for t in (x, w_gu, w_d, tw)] if mode == "fwdbwd" else None
        dy = torch.randn_like(x) if leaves else None
        times = {}
        for impl in backends + ["auto"]:
            if leaves:
                def fn(impl=impl):
                    moe_mlp(leaves[0], leaves[1], leaves[2], ids, leaves[3], backend=impl).backward(dy)
            else:
                def fn(impl=impl):
                    return moe_mlp(x, w_gu, w_d, ids, tw, backend=impl)
            times[impl] = measure(fn, device, mode, leaves)
        timed = [b for b in backends if times[b] is not None]
        if not timed:
            continue
        best = min(timed, key=lambda b: times[b])
        # under capture "auto" takes Triton only once its kernels ran: the warm-up above ran them
        choice = pick_auto(T * K / E, mode == "fwdbwd", "triton" in backends, capturing=mode == "fwd_graph",
                           triton_ready=True)
        rec = dict(bench="moe_auto_sweep", impl="auto", shape=shape, T=T, H=H, I=I, E=E, K=K, mode=mode,
                   rows_per_expert=T * K / E, ms={k: v for k, v in times.items()}, auto_choice=choice,
                   best_impl=best, auto_ratio=(times["auto"] / times[best]) if times["auto"] else None,
                   choice_ratio=(times[choice] / times[best]) if times[choice] else None, **meta)
        records.append(rec)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items() if k not in meta}),
              flush=True)
    return records


def suggest_thresholds(records: list[dict]) -> dict[str, dict]:
    """Per auto mode ("graph": fwd_graph points, "inference": fwd_eager, "training": fwdbwd), the threshold on
    rows per expert that minimises the worst ratio (picked backend / best) over the records, with that
    worst ratio; ties go to the lower mean ratio. Records must hold ms of grouped_mm and triton."""
    out = {}
    for mode in ("graph", "inference", "training"):
        pts = [(r["rows_per_expert"], r["ms"]["grouped_mm"], r["ms"]["triton"]) for r in records
               if auto_mode(r["mode"] == "fwdbwd", r["mode"] == "fwd_graph") == mode
               and r["ms"].get("triton") and r["ms"].get("grouped_mm")]
        if not pts:
            continue
        rpes = sorted({p[0] for p in pts})
        # 0 (Triton at every size), one between each pair of neighbours (geometric), inf (never Triton)
        cands = [0.0] + [math.sqrt(a * b) for a, b in zip(rpes, rpes[1:])] + [math.inf]

        def score(c):
            ratios = [(t if rpe >= c else g) / min(g, t) for rpe, g, t in pts]
            return max(ratios), statistics.fmean(ratios)

        best = min(cands, key=score)
        worst, mean = score(best)
        out[mode] = {"threshold": best, "worst_ratio": worst, "mean_ratio": mean}
    return out


def print_report(records: list[dict]) -> None:
    print(f"\n{'shape':16s} {'T':>6s} {'rows/E':>8s} " + " ".join(f"{m + ' (auto ratio, best)':>30s}" for m in MODES))
    keyed = {(r["shape"], r["T"], r["mode"]): r for r in records}
    for shape, T in sorted({(r["shape"], r["T"]) for r in records}, key=lambda k: (k[0], k[1])):
        cells = []
        for m in MODES:
            r = keyed.get((shape, T, m))
            ratio = f"{r['auto_ratio']:.2f}" if r and r["auto_ratio"] else "-"
            cells.append(f"{(r['auto_choice'] + ' ' + ratio + ', ' + r['best_impl']) if r else '-':>30s}")
        rpe = next(r["rows_per_expert"] for r in records if (r["shape"], r["T"]) == (shape, T))
        print(f"{shape:16s} {T:6d} {rpe:8.2f} " + " ".join(cells))
    worst = max((r["auto_ratio"] for r in records if r["auto_ratio"]), default=None)
    print(f"\nworst auto/best over the sweep: {worst:.3f} (target <= 1.05)" if worst else "\nno auto timing")
    # the same with auto's choice timed as that backend's own measurement: free of auto's timing noise
    worst_choice = max((r["choice_ratio"] for r in records if r["choice_ratio"]), default=None)
    if worst_choice:
        print(f"worst (auto's choice)/best, from the backends' own timings: {worst_choice:.3f}")
    print(f"current table: AUTO_TRITON_MIN_ROWS_PER_EXPERT = {AUTO_TRITON_MIN_ROWS_PER_EXPERT}")
    sug = suggest_thresholds(records)
    if sug:
        cells = [f'"{m}": ' + (f"{s['threshold']:.3g}" if math.isfinite(s["threshold"]) else 'float("inf")')
                 for m, s in sug.items()]
        print("suggested (moesys/backends/auto.py): AUTO_TRITON_MIN_ROWS_PER_EXPERT = {" + ", ".join(cells) + "}")
        for m, s in sug.items():
            print(f"  {m}: worst ratio {s['worst_ratio']:.3f}, mean {s['mean_ratio']:.3f} under it")


def run_sweep(out: str, make_inputs, meta: dict, smoke: bool, shapes: list[str] | None = None,
              tokens: list[int] | None = None, modes: list[str] | None = None) -> list[dict]:
    """Sweep `shapes` (names in SWEEP_SHAPES; default all) over `tokens` (default SWEEP_T) in `modes` (default
    MODES), writing `out` after every point; `smoke`: SMOKE_SHAPES and SMOKE_T on the CPU."""
    bad = [m for m in modes or [] if m not in MODES]
    if bad:
        raise ValueError(f"--sweep-modes: {bad} unknown; choose from {list(MODES)}")
    device = torch.device("cpu" if smoke else "cuda")
    if smoke:
        shapes_d, Ts = SMOKE_SHAPES, SMOKE_T
    else:
        unknown = [n for n in shapes or [] if n not in SWEEP_SHAPES]
        if unknown:
            raise ValueError(f"--sweep-shapes: {unknown} unknown; choose from {list(SWEEP_SHAPES)}")
        shapes_d = {n: SWEEP_SHAPES[n] for n in shapes} if shapes else SWEEP_SHAPES
        Ts = tuple(tokens) if tokens else SWEEP_T
    records = []
    for shape, (H, I, E, K) in shapes_d.items():
        for T in Ts:
            records += sweep_point(shape, T, H, I, E, K, device, make_inputs, meta, tuple(modes or MODES))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write_json(out, records)
    print_report(records)
    return records

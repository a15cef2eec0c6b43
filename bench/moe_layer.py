"""Benchmark of the expert MLP (`moesys.ops.moe_mlp`) on one GPU: our "triton" backend side by side, in
one run, with our "grouped_mm" backend, transformers' MixtralExperts (experts_implementation=
"grouped_mm") and an ideal balanced torch.bmm of the same FLOPs; a correctness check in the same run.

    PYTHONPATH=. python bench/moe_layer.py --out bench/results/moe_layer.json
    PYTHONPATH=. python bench/moe_layer.py --sweep-auto --out bench/results/moe_auto_sweep.json
        (backend="auto" against each backend over T and shapes: bench/moe_auto_sweep.py; --cpu-smoke: tiny, CPU)

Legend: T tokens, H hidden, I expert intermediate, E experts, K top-k.
FLOPs: forward 6*T*K*H*I (three GEMMs), forward+backward 3x that.
Decode shapes time the forward only, eagerly and as a CUDA-graph replay, against the time to read
every touched expert's weights once at the measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from moesys.ops import moe_mlp
from run_meta import run_meta

# name: (T, H, I, E, K, decode)
SHAPES = {
    "mixtral-8x7b": (8192, 4096, 14336, 8, 2, False),
    "qwen3-30b-a3b": (8192, 2048, 768, 128, 8, False),
    "olmoe-1b-7b": (8192, 2048, 1024, 64, 8, False),
    "qwen3-30b-a3b-decode-T64": (64, 2048, 768, 128, 8, True),
    "mixtral-8x7b-decode-T8": (8, 4096, 14336, 8, 2, True),
}


def make_inputs(T, H, I, E, K, seed=0, device="cuda"):
    """bf16 weights ~ N(0, 1/fan_in), tokens ~ N(0, 1), routing from a random gate (softmax top-k)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dev, dt = device, torch.bfloat16
    x = torch.randn(T, H, device=dev, dtype=dt, generator=g)
    w_gu = (torch.randn(E, 2 * I, H, device=dev, generator=g) * H ** -0.5).to(dt)
    w_d = (torch.randn(E, H, I, device=dev, generator=g) * I ** -0.5).to(dt)
    gate = torch.randn(H, E, device=dev, generator=g) * H ** -0.5
    probs = torch.softmax(x.float() @ gate, -1)
    tw, ids = probs.topk(K, -1)
    return x, w_gu, w_d, ids, (tw / tw.sum(-1, keepdim=True))


def impls(H, I, E, K, w_gu, w_d):
    """name -> fn(x, w_gu, w_d, ids, tw) -> y; the bmm baseline ignores the routing (balanced)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
                        hidden_act="silu")
    cfg._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        hf = MixtralExperts(cfg)
    del hf.gate_up_proj, hf.down_proj  # plain attributes from here on: they share our tensors

    def hf_fn(x, w_gu_, w_d_, ids, tw):
        hf.gate_up_proj, hf.down_proj = w_gu_, w_d_  # so grads land on the leaves being timed
        return hf(x, ids, tw)

    def bmm_fn(x, w_gu_, w_d_, ids, tw):
        T = x.shape[0]
        x_E = x.repeat(K, 1).view(E, T * K // E, H)  # every expert gets the same number of rows
        gate, up = torch.bmm(x_E, w_gu_.transpose(1, 2)).chunk(2, -1)
        return torch.bmm(F.silu(gate) * up, w_d_.transpose(1, 2)).view(K, T, H).sum(0)

    return {
        "triton": lambda *a: moe_mlp(*a, backend="triton"),
        "grouped_mm": lambda *a: moe_mlp(*a, backend="grouped_mm"),
        "hf_grouped_mm": hf_fn,
        "bmm_balanced": bmm_fn,
    }


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check(T, H, I, E, K, decode):
    """Triton and grouped_mm (bf16) vs an fp32 reference (loop backend on fp32 copies): forward and grads."""
    x, w_gu, w_d, ids, tw = make_inputs(T, H, I, E, K, seed=1)
    dy = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    out = {}
    for name, dtype, backend in (("ref", torch.float32, "loop"), ("triton", torch.bfloat16, "triton"),
                                 ("grouped_mm", torch.bfloat16, "grouped_mm")):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w_gu, w_d)] + [tw.detach().clone().requires_grad_()]
        y = moe_mlp(leaves[0], leaves[1], leaves[2], ids, leaves[3], backend=backend)
        if decode:
            out[name] = [y.detach()]
        else:
            y.backward(dy.to(dtype))
            out[name] = [y.detach()] + [t.grad for t in leaves]
        del leaves, y
    names = ["y", "dx", "dw_gate_up", "dw_down", "dtopk_w"]
    res = {}
    for impl in ("triton", "grouped_mm"):
        res[impl] = {n: rel(a, b) for n, a, b in zip(names, out[impl], out["ref"])}
    ok = all(res["triton"][n] <= 2 * res["grouped_mm"][n] + 2e-3 for n in res["triton"])
    return ok, res


def copy_bandwidth():
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)  # bytes read + written per second


def bench_shape(name, T, H, I, E, K, decode, bw, meta):
    x, w_gu, w_d, ids, tw = make_inputs(T, H, I, E, K)
    flops = 6 * T * K * H * I
    records, fns = [], impls(H, I, E, K, w_gu, w_d)
    touched = int(torch.unique(ids).numel())
    read_ms = touched * 3 * H * I * 2 / bw * 1e3  # each touched expert's bf16 weights once
    for impl, fn in fns.items():
        torch.cuda.synchronize()
        rec = dict(bench="moe_layer", impl=impl, shape=name, T=T, H=H, I=I, E=E, K=K, **meta)
        with torch.no_grad():
            fn(x, w_gu, w_d, ids, tw)  # autotune / warm up outside the timing
            rec["fwd_ms"] = do_bench(lambda: fn(x, w_gu, w_d, ids, tw), return_mode="median")
            if decode and impl in ("triton", "grouped_mm"):
                try:  # a decode step must be capturable: no host sync anywhere in it
                    rec["fwd_graph_ms"] = do_bench_cudagraph(lambda: fn(x, w_gu, w_d, ids, tw),
                                                             return_mode="median")
                except RuntimeError as err:
                    rec["fwd_graph_ms"], rec["graph_error"] = None, str(err)[:300]
        rec["tflops_fwd"] = flops / rec["fwd_ms"] * 1e-9
        rec["fwdbwd_ms"] = rec["tflops_fwdbwd"] = None
        if decode:
            rec.update(touched_experts=touched, weight_read_ms=read_ms, copy_tb_s=bw * 1e-12)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if not decode:
            leaves = [x.detach().requires_grad_(), w_gu.detach().requires_grad_(), w_d.detach().requires_grad_(),
                      tw.detach().requires_grad_()]
            dy = torch.randn_like(x)

            def step():
                fn(leaves[0], leaves[1], leaves[2], ids, leaves[3]).backward(dy)

            step()  # autotune / warm up; its benchmarking buffers stay out of the peak below
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            rec["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
            rec["peak_step_gb"] = (torch.cuda.max_memory_allocated() - base) / 2**30
            rec["fwdbwd_ms"] = do_bench(step, grad_to_none=leaves, return_mode="median")
            rec["tflops_fwdbwd"] = 3 * flops / rec["fwdbwd_ms"] * 1e-9
            del leaves
        else:
            with torch.no_grad():
                fn(x, w_gu, w_d, ids, tw)
            rec["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
            rec["peak_step_gb"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        records.append(rec)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()
                          if k not in meta}), flush=True)
    return records


def profile_triton(name, T, H, I, E, K, path):
    """Device time per stage of one triton fwd+bwd (the kernels run inside `moesys::*` profiler ranges)."""
    from torch.profiler import ProfilerActivity, profile
    x, w_gu, w_d, ids, tw = make_inputs(T, H, I, E, K)
    leaves = [t.detach().requires_grad_() for t in (x, w_gu, w_d, tw)]
    dy = torch.randn_like(x)
    moe_mlp(leaves[0], leaves[1], leaves[2], ids, leaves[3], backend="triton").backward(dy)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            moe_mlp(leaves[0], leaves[1], leaves[2], ids, leaves[3], backend="triton").backward(dy)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=14, max_name_column_width=40)
    with open(path, "a") as f:
        f.write(f"== {name} (3 steps)\n{table}\n")
    print(f"profile {name}:\n{table}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/moe_layer.json")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ", ".join(SHAPES))
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--profile", default=None, help="append a per-stage profile of the triton fwd+bwd to this file")
    ap.add_argument("--sweep-auto", action="store_true", help="time backend='auto' against each backend over "
                    "token counts and shapes (bench/moe_auto_sweep.py) instead of the table above")
    ap.add_argument("--cpu-smoke", action="store_true", help="with --sweep-auto: a tiny shape on the CPU, seconds")
    ap.add_argument("--sweep-shapes", default=None, help="with --sweep-auto: comma-separated subset of "
                    "qwen3-30b-a3b, olmoe-1b-7b, mixtral-8x7b (default all)")
    ap.add_argument("--sweep-modes", default=None, help="with --sweep-auto: comma-separated subset of "
                    "fwd_eager,fwd_graph,fwdbwd (default all)")
    ap.add_argument("--sweep-tokens", default=None, help="with --sweep-auto: comma-separated token counts "
                    "(default 1,4,16,64,256,1024,4096,16384)")
    args = ap.parse_args()
    meta = run_meta("cpu" if args.cpu_smoke else None)
    if args.sweep_auto:
        from moe_auto_sweep import run_sweep
        run_sweep(args.out, make_inputs, meta, smoke=args.cpu_smoke,
                  shapes=args.sweep_shapes.split(",") if args.sweep_shapes else None,
                  tokens=[int(t) for t in args.sweep_tokens.split(",")] if args.sweep_tokens else None,
                  modes=args.sweep_modes.split(",") if args.sweep_modes else None)
        return
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw * 1e-12:.2f} TB/s", flush=True)
    records = []
    for name in args.shapes.split(","):
        T, H, I, E, K, decode = SHAPES[name]
        if not args.no_check:
            ok, res = check(T, H, I, E, K, decode)
            print(name, "correct" if ok else "MISMATCH", json.dumps(res), flush=True)
            records.append(dict(bench="moe_layer_check", impl="triton", shape=name, ok=ok, rel_err=res, **meta))
        torch.cuda.empty_cache()
        records += bench_shape(name, T, H, I, E, K, decode, bw, meta)
        torch.cuda.empty_cache()
        if args.profile and not decode:
            try:
                profile_triton(name, T, H, I, E, K, args.profile)
            except Exception as err:  # the profile is a diagnostic; never lose the benchmark to it
                print(f"profile {name} failed: {err!r}", flush=True)
            torch.cuda.empty_cache()
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    print(f"\n{'shape':28s} {'impl':14s} {'fwd ms':>8s} {'fwd+bwd':>8s} {'TF fwd':>7s} {'TF f+b':>7s} {'peak GB':>8s}")
    for r in records:
        if r["bench"] != "moe_layer":
            continue
        fb = f"{r['fwdbwd_ms']:8.3f}" if r["fwdbwd_ms"] else "       -"
        tf = f"{r['tflops_fwdbwd']:7.0f}" if r["tflops_fwdbwd"] else "      -"
        extra = (f"  graph {r['fwd_graph_ms']:.3f} ms, weight read {r['weight_read_ms']:.3f} ms"
                 if r.get("fwd_graph_ms") else "")
        print(f"{r['shape']:28s} {r['impl']:14s} {r['fwd_ms']:8.3f} {fb} {r['tflops_fwd']:7.0f} {tf} "
              f"{r['peak_gb']:8.2f}{extra}")


if __name__ == "__main__":
    main()

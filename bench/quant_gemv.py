"""Batch-1 decode experts from quantized weights (issue 5: int4 at least 2.5x faster than bf16), one GPU.

One decode step's experts of the OLMoE-1B-7B shape (16 layers, 8 routed experts each, H 2048, I 1024), as
the offload engine runs them over a cache of expert slots (612 int4 slots, 315 int8, 194 bf16: what a 4 GiB
budget holds, bench/results/offload_77fe6bf.json), each layer on 8 distinct random slots so the step reads
~430 MB (int4) of weights that no earlier layer left in L2. Captured in a CUDA graph (no launch overhead)
and timed over replays, median:
- quant_gemv, the engine's path (gate/up call, SwiGLU, down call with the routing weights, top-k sum);
  with --before PATH also the same steps through another quant_gemv.py (an earlier commit's: A/B in one run);
- the same experts dequantized then multiplied (quant_gemv_reference, fp32: what a kernel-less path does);
- bf16 experts through torch._grouped_mm over the slot pool (what moesys' bf16 decode runs);
- the bound: the step's weight and scale bytes at the device's measured read bandwidth;
- per block shape of the kernel (quant_gemv.SWEEP_CONFIGS), the cold time of each call over the step: the
  data behind ROW_CONFIG and COMBINE_CONFIG.
Correctness in the same run: the kernel against the reference on the timed inputs.

    PYTHONPATH=.:bench python bench/quant_gemv.py --out bench/results/quant_gemv.json
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import statistics

import torch
import torch.nn.functional as F

from run_meta import run_meta

H, I, K, L = 2048, 1024, 8, 16
SLOTS = {"int4": 612, "int8": 315, "bf16": 194}


def graph_ms(fn, reps: int = 30) -> float:
    """Median ms of one replay of a CUDA graph of fn (after warm-up replays)."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def read_bandwidth() -> float:
    """Bytes/s of a 2 GiB read-mostly pass (a sum), the bound a weight-streaming kernel meets."""
    x = torch.randn(2**30, device="cuda", dtype=torch.bfloat16)
    ms = graph_ms(lambda: x.sum(dtype=torch.float32), reps=10)
    return x.numel() * 2 / (ms * 1e-3)


def quantized_pools(mode: str, gen: torch.Generator, S: int | None = None, hidden: int = H, inter: int = I):
    """Random packed expert pools of S slots (default SLOTS[mode]) of the (hidden, inter) shape."""
    from moesys.offload import quant

    S = S or SLOTS[mode]
    pools = {}
    for name, (R, C) in (("gate_up", (2 * inter, hidden)), ("down", (hidden, inter))):
        (_, qshape, qdtype), (_, sshape, _) = quant.quantized_shapes(R, C, mode)
        lo, hi = (0, 256) if mode == "int4" else (-127, 128)
        pools[f"{name}.q"] = torch.randint(lo, hi, (S, *qshape), device="cuda", generator=gen).to(qdtype)
        pools[f"{name}.scale"] = torch.rand((S, *sshape), device="cuda", generator=gen) * 1e-2 + 1e-3
    return pools


def routing(S: int, gen: torch.Generator):
    slots_LN = torch.stack([torch.randperm(S, device="cuda", generator=gen)[:K] for _ in range(L)])
    w_LN = torch.rand(L, K, device="cuda", generator=gen).softmax(-1).to(torch.bfloat16)
    return slots_LN, w_LN


def quantized_step(qg, pools, mode, x_H, slots_LN, w_LN, old_api=False):
    """The engine's _quantized_rows per layer (old_api: a quant_gemv that takes [N, C] rows and returns them
    unweighted, before the activation and the top-k combine moved into the kernel: moesys at 9587d01)."""
    outs = []
    for layer in range(L):
        slots, w = slots_LN[layer], w_LN[layer]
        x = x_H[None]
        if old_api:
            h = qg.quant_gemv(x.expand(K, H).reshape(K, H), pools["gate_up.q"], pools["gate_up.scale"], slots, mode)
            y = qg.quant_gemv(F.silu(h[:, :I]) * h[:, I:], pools["down.q"], pools["down.scale"], slots, mode)
            outs.append((y.float() * w.float()[:, None]).sum(0).to(x.dtype))
        else:
            h = qg.quant_gemv(x, pools["gate_up.q"], pools["gate_up.scale"], slots, mode)
            outs.append(qg.quant_gemv(h, pools["down.q"], pools["down.scale"], slots, mode, activation="silu",
                                      weight_TK=w[None])[0])
    return torch.stack(outs)


def bf16_step(gate_up_SFH, down_SHI, x_H, slots_LN, w_LN):
    """bf16 experts over the slot pool as transformers' grouped_mm implementation runs them for one token:
    rows sorted by slot, one grouped GEMM per projection over every slot (empty groups included)."""
    S = gate_up_SFH.shape[0]
    outs = []
    for layer in range(L):
        slots, w = slots_LN[layer], w_LN[layer]
        order = slots.argsort()
        ones = torch.ones_like(slots, dtype=torch.int32)
        counts = torch.zeros(S, dtype=torch.int32, device=slots.device).index_add_(0, slots, ones)  # no sync
        offs = counts.cumsum(0, dtype=torch.int32)
        x = x_H[None].expand(K, H).contiguous()
        h = torch._grouped_mm(x, gate_up_SFH.transpose(1, 2), offs=offs)
        a = F.silu(h[:, :I]) * h[:, I:]
        y = torch._grouped_mm(a, down_SHI.transpose(1, 2), offs=offs)
        outs.append((y.float() * w[order].float()[:, None]).sum(0).to(x.dtype))
    return torch.stack(outs)


def config_sweep(qg, pools, mode, x_H, slots_LN, w_LN) -> list[dict]:
    """Cold ms per step of each call (16 layers' slots, graph-replayed) under each kernel config."""
    h_KF = torch.randn(K, 2 * I, device="cuda", dtype=x_H.dtype)
    rows = []
    for config in qg.SWEEP_CONFIGS:
        rec = dict(config=config)
        rec["gate_up_ms"] = graph_ms(lambda: [
            qg.quant_gemv(x_H[None], pools["gate_up.q"], pools["gate_up.scale"], slots_LN[r], mode, config=config)
            for r in range(L)], reps=15)
        rec["down_combine_ms"] = graph_ms(lambda: [
            qg.quant_gemv(h_KF, pools["down.q"], pools["down.scale"], slots_LN[r], mode, activation="silu",
                          weight_TK=w_LN[r][None], config=config)
            for r in range(L)], reps=15)
        rows.append(rec)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--before", default=None,
                   help="another quant_gemv.py to time beside (an earlier commit's; 9587d01's rows API, [N, C] rows in "
                        "and unweighted rows out, is recognised)")
    args = p.parse_args()
    from moesys.offload import quant_gemv as qg

    before = None
    if args.before:
        spec = importlib.util.spec_from_file_location("quant_gemv_before", args.before)
        before = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(before)
        # 9587d01's rows API has no top-k combine; later modules take the engine's call forms
        before_rows_api = "weight_TK" not in inspect.signature(before.quant_gemv).parameters
    meta = run_meta("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    bw = read_bandwidth()
    x_H = torch.randn(H, device="cuda", dtype=torch.bfloat16, generator=gen)
    records = [dict(meta, bench="quant-gemv", impl="read-bandwidth", GBps=bw / 1e9)]

    gate_up = torch.randn(SLOTS["bf16"], 2 * I, H, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    down = torch.randn(SLOTS["bf16"], H, I, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    slots_LN, w_LN = routing(SLOTS["bf16"], gen)
    bf16_bytes = L * K * 3 * H * I * 2
    ms = graph_ms(lambda: bf16_step(gate_up, down, x_H, slots_LN, w_LN))
    records.append(dict(meta, bench="quant-gemv", impl="bf16-grouped-mm", mode="bf16", step_ms=ms,
                        weight_bytes=bf16_bytes, bound_ms=bf16_bytes / bw * 1e3, GBps=bf16_bytes / ms / 1e6))
    bf16_ms = ms
    del gate_up, down

    for mode in ("int4", "int8"):
        pools = quantized_pools(mode, gen)
        slots_LN, w_LN = routing(SLOTS[mode], gen)
        nbytes = sum(L * K * t[0].numel() for t in pools.values())
        common = dict(meta, bench="quant-gemv", mode=mode, weight_bytes=nbytes, bound_ms=nbytes / bw * 1e3)
        want = quantized_step(qg, pools, mode, x_H, slots_LN, w_LN)
        ref = torch.stack([
            qg.quant_gemv_reference(
                qg.quant_gemv_reference(x_H[None], pools["gate_up.q"], pools["gate_up.scale"], slots_LN[r], mode),
                pools["down.q"], pools["down.scale"], slots_LN[r], mode, "silu", w_LN[r][None])[0]
            for r in range(L)])
        err = ((want.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        impls = [("moesys-quant-gemv", lambda: quantized_step(qg, pools, mode, x_H, slots_LN, w_LN))]
        if before is not None:
            impls.append(("before-quant-gemv",
                          lambda: quantized_step(before, pools, mode, x_H, slots_LN, w_LN, old_api=before_rows_api)))

        def dequantized():
            for r in range(L):
                h = qg.quant_gemv_reference(x_H[None], pools["gate_up.q"], pools["gate_up.scale"], slots_LN[r], mode)
                qg.quant_gemv_reference(h, pools["down.q"], pools["down.scale"], slots_LN[r], mode, "silu",
                                        w_LN[r][None])
        impls.append(("dequantize-then-bmm", dequantized))
        for impl, fn in impls:
            ms = graph_ms(fn)
            rec = dict(common, impl=impl, step_ms=ms, GBps=nbytes / ms / 1e6, speedup_vs_bf16=bf16_ms / ms,
                       fraction_of_bound=(nbytes / bw * 1e3) / ms)
            if impl == "moesys-quant-gemv":
                rec["max_rel_err_vs_reference"] = err
                rec["configs"] = dict(row=qg.ROW_CONFIG, combine=qg.COMBINE_CONFIG)
            records.append(rec)
        records.append(dict(common, impl="config-sweep", configs=config_sweep(qg, pools, mode, x_H, slots_LN, w_LN)))
        del pools
        torch.cuda.empty_cache()

    for r in records:
        print(json.dumps({k: v for k, v in r.items() if k not in ("torch", "triton", "device", "date")}))
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()

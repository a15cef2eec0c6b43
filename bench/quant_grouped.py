"""Batch decode experts from quantized weights on the device path (issue 24): quant_grouped's grouped W4A16 /
W8A16 GEMM against quant_gemv's program per routed row, one GPU.

A decode step's experts of L layers at batch T (top-K of E experts per token, drawn uniformly: no locality),
each layer's experts in their own E cache slots so no layer finds another's weights in L2, the layers run back
to back in one CUDA graph (no launch overhead), median replay time per layer:
- moesys-quant-grouped: quant_grouped.quant_moe_mlp (the device path from
  engine.QUANT_GROUPED_MIN_ROWS routed rows);
- moesys-quant-gemv-rows: quant_gemv's two calls (the device path below it);
- dequant-moe-mlp: the layer's distinct experts dequantized (dequantize_slots), then moe_mlp's grouped GEMM over
  them: the host path's compute, given the distinct experts the host knows after its sync (the lower bound of
  that path's compute);
- the bound: the layer's distinct experts' packed bytes at the device's read bandwidth.
Per T, grouped block shapes are swept (--sweep) for the choice of quant_grouped.CONFIG.
Correctness in the same run: the grouped op against its reference, and each token of a batch equal to the
token alone, bit for bit.

    PYTHONPATH=.:bench python bench/quant_grouped.py --out bench/results/quant_grouped.json
"""

from __future__ import annotations

import argparse
import json

import torch

from quant_gemv import graph_ms, quantized_pools, read_bandwidth
from run_meta import run_meta

SHAPES = {"olmoe": dict(H=2048, I=1024, E=64, K=8), "qwen3-30b-a3b": dict(H=2048, I=768, E=128, K=8)}
SWEEP = [dict(BM=bm, BN=bn, BK=bk, num_warps=w, num_stages=s)
         for bm, bn, bk, w, s in ((16, 64, 64, 4, 3), (16, 128, 64, 4, 3), (16, 64, 128, 4, 3), (32, 64, 64, 4, 3),
                                  (64, 128, 64, 8, 3), (16, 32, 64, 2, 4))]


def uniform_routing(L: int, T: int, E: int, K: int, gen):
    """[L, T, K] expert ids (K distinct per token), their slots (layer l's experts in slots l*E..) and routing
    weights."""
    ids = torch.stack([torch.stack([torch.randperm(E, device="cuda", generator=gen)[:K] for _ in range(T)])
                       for _ in range(L)])
    slots = ids + torch.arange(L, device="cuda")[:, None, None] * E
    w = torch.rand(L, T, K, device="cuda", generator=gen).softmax(-1).to(torch.bfloat16)
    return ids, slots, w


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="olmoe,qwen3-30b-a3b")
    p.add_argument("--batches", default="1,8,32,128")
    p.add_argument("--mode", default="int4", choices=["int4", "int8"])
    p.add_argument("--layers", type=int, default=6, help="layers per captured step (each its own slots: cold)")
    p.add_argument("--sweep", action="store_true", help="time every block shape of SWEEP too")
    args = p.parse_args()
    from moesys.offload.dequant_slots import dequantize_slots
    from moesys.offload.quant_gemv import quant_gemv
    from moesys.offload.quant_grouped import CONFIG, quant_moe_mlp, quant_moe_mlp_reference
    from moesys.ops import moe_mlp

    meta = run_meta("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    bw = read_bandwidth()
    records = [dict(meta, bench="quant-grouped", impl="read-bandwidth", GBps=bw / 1e9)]
    mode, L = args.mode, args.layers
    for shape in args.shapes.split(","):
        H, I, E, K = (SHAPES[shape][k] for k in ("H", "I", "E", "K"))
        pools = quantized_pools(mode, gen, L * E, H, I)
        expert_bytes = sum(t[0].numel() * t.element_size() for t in pools.values())
        for T in (int(b) for b in args.batches.split(",")):
            ids, slots, w = uniform_routing(L, T, E, K, gen)
            x = torch.randn(L, T, H, device="cuda", dtype=torch.bfloat16, generator=gen)
            distinct = [torch.unique(slots[l]) for l in range(L)]  # the host path's knowledge (not timed)
            n_distinct = sum(d.numel() for d in distinct) / L
            # correctness on layer 0: reference, and batch equals alone bit for bit
            got = quant_moe_mlp(x[0], pools, ids[0], slots[0], w[0], mode, "silu", E)
            n = min(T, 8)  # the reference dequantizes an expert per routed row: its first 8 tokens only
            ref = quant_moe_mlp_reference(x[0, :n], pools, slots[0, :n], w[0, :n], mode, "silu")
            err = ((got[:n].float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            alone_equal = sum(bool(torch.equal(got[t:t + 1], quant_moe_mlp(
                x[0, t:t + 1], pools, ids[0, t:t + 1], slots[0, t:t + 1], w[0, t:t + 1], mode, "silu", E)))
                for t in range(min(T, 8)))

            def grouped(config=None):
                for l in range(L):
                    quant_moe_mlp(x[l], pools, ids[l], slots[l], w[l], mode, "silu", E, config=config)

            def rows():
                for l in range(L):
                    s = slots[l].reshape(-1)
                    h = quant_gemv(x[l], pools["gate_up.q"], pools["gate_up.scale"], s, mode)
                    quant_gemv(h, pools["down.q"], pools["down.scale"], s, mode, activation="silu", weight_TK=w[l])

            # the host path's compute: its distinct experts dequantized, each routed row a top-1 token of its own
            local = []
            for l in range(L):
                index = torch.full((L * E,), -1, dtype=torch.int64, device="cuda")
                index[distinct[l]] = torch.arange(distinct[l].numel(), device="cuda")
                local.append(index[slots[l]].reshape(-1, 1))

            def dequant_mlp():
                for l in range(L):
                    gu = dequantize_slots(pools["gate_up.q"], pools["gate_up.scale"], distinct[l], mode, torch.bfloat16)
                    d = dequantize_slots(pools["down.q"], pools["down.scale"], distinct[l], mode, torch.bfloat16)
                    moe_mlp(x[l].repeat_interleave(K, 0), gu, d, local[l], w[l].reshape(-1, 1), activation="silu",
                            backend="grouped_mm")

            bound_ms = n_distinct * expert_bytes / bw * 1e3
            common = dict(meta, bench="quant-grouped", shape=shape, mode=mode, T=T, K=K, E=E,
                          distinct_experts_per_layer=n_distinct, bound_ms_per_layer=bound_ms)
            for impl, fn in (("moesys-quant-grouped", grouped), ("moesys-quant-gemv-rows", rows),
                             ("dequant-moe-mlp", dequant_mlp)):
                try:
                    ms = graph_ms(fn) / L
                except Exception as e:  # recorded, and the other rows still run
                    records.append(dict(common, impl=impl, error=str(e)[:300]))
                    print(impl, "failed:", str(e)[:300], flush=True)
                    continue
                rec = dict(common, impl=impl, ms_per_layer=ms, fraction_of_bound=bound_ms / ms)
                if impl == "moesys-quant-grouped":
                    rec.update(config=CONFIG, max_rel_err_vs_reference=err, tokens_equal_alone=[alone_equal, min(T, 8)])
                records.append(rec)
                print(json.dumps({k: v for k, v in rec.items() if k not in ("torch", "triton", "device", "date",
                                                                             "transformers", "git_sha")}), flush=True)
            if args.sweep:
                sweep = []
                for config in SWEEP:
                    try:
                        sweep.append(dict(config=config, ms_per_layer=graph_ms(lambda: grouped(config), reps=15) / L))
                    except Exception as e:  # a shape the device cannot hold (shared memory): said, not fatal
                        sweep.append(dict(config=config, error=str(e)[:200]))
                records.append(dict(common, impl="grouped-config-sweep", sweep=sweep))
                best = min((s for s in sweep if "ms_per_layer" in s), key=lambda s: s["ms_per_layer"])
                print(json.dumps(dict(shape=shape, T=T, best=best)), flush=True)
        del pools
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()

"""Where the Triton expert MLP's time goes: each of its kernels timed alone on the training shapes of
bench/moe_layer.py, next to the same GEMM as torch._grouped_mm over pre-sorted contiguous rows (the
cuBLAS/CUTLASS grouped GEMM, no gather and no epilogue) and a dense torch.mm of the same FLOPs, plus a
sweep of tile configs per kernel. Diagnostic for issue 3; the side-by-side benchmark is moe_layer.py.

    PYTHONPATH=. python bench/moe_stages.py --out stages.json [--shapes mixtral-8x7b] [--sweep]

Stages (N = T*K routed rows, F = 2I): fwd_gate_up [N,H]x[H,F] + SwiGLU; fwd_down [N,I]x[I,H] + combine;
bwd_down [N,H]x[H,I]; bwd_act the activation backward (bandwidth-bound; its "grouped_mm" column is copies
of the same bytes); bwd_dx [N,F]x[F,H] + the top-k fold; dw_gate_up, dw_down the grouped X^T.dY weight
gradients. fwd_gate_up, bwd_down, bwd_dx and the dW stages each run as a Triton kernel or as cuBLAS's grouped
GEMM with copies and a bandwidth-bound pass around it (launch.fwd_impl / dgrad_impl / wgrad_impl): "ours"
is the path the backend picks ("impl"), and both paths are timed (triton_path_ms, cublas_path_ms);
routing_sort the one-launch routing kernel next to its torch reference (sort_routing_reference).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
from triton.testing import do_bench

from moesys.kernels import launch
from moesys.kernels.act import ACT_CODES
from moesys.kernels.grouped_gemm import EPI_ACT_FWD, EPI_SCATTER, EPI_STORE
from moesys.backends.grouped_mm import inverse_permutation
from moesys.kernels.routing import sort_routing, sort_routing_reference
from run_meta import run_meta

# the training shapes of moe_layer.py, and configs/small.yaml's layer (batch 8 x 2048 tokens)
SHAPES = {"mixtral-8x7b": (8192, 4096, 14336, 8, 2), "qwen3-30b-a3b": (8192, 2048, 768, 128, 8),
          "olmoe-1b-7b": (8192, 2048, 1024, 64, 8), "small-config": (16384, 1024, 512, 32, 4)}

SWEEP = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4),
         (256, 128, 64, 8, 3), (128, 128, 128, 8, 3), (64, 256, 64, 4, 4), (128, 64, 64, 4, 4),
         (64, 128, 64, 4, 4), (128, 256, 32, 8, 5), (128, 128, 64, 4, 4)]


def stages(T, H, I, E, K):
    g = torch.Generator(device="cuda").manual_seed(0)
    dt, dev = torch.bfloat16, "cuda"
    x = torch.randn(T, H, device=dev, dtype=dt, generator=g)
    dy = torch.randn(T, H, device=dev, dtype=dt, generator=g)
    w_gu = (torch.randn(E, 2 * I, H, device=dev, generator=g) * H ** -0.5).to(dt)
    w_d = (torch.randn(E, H, I, device=dev, generator=g) * I ** -0.5).to(dt)
    probs = torch.softmax(x.float() @ (torch.randn(H, E, device=dev, generator=g) * H ** -0.5), -1)
    tw, ids = probs.topk(K, -1)
    tw = tw / tw.sum(-1, keepdim=True)
    N, F = T * K, 2 * I
    token_N, perm_N, off_E = sort_routing(ids, E)
    rw_N = tw.reshape(-1)[perm_N].float()
    h = x.new_empty(N, F)
    a = x.new_empty(N, I)
    dh = x.new_empty(N, F)
    silu = ACT_CODES["silu"]
    x_s, dy_s = x[token_N.long()], dy[token_N.long()]
    gm = torch._grouped_mm

    def fwd_gate_up_triton():
        launch.grouped_gemm(x, w_gu, (w_gu.stride(0), w_gu.stride(2), w_gu.stride(1)), H, I, token_N, off_E,
                            epilogue=EPI_ACT_FWD, out=a, gather_a=True, gated=True, I=I, h=h, save_h=True, act=silu)

    def fwd_gate_up_cublas():
        launch.act_forward(gm(x.index_select(0, token_N), w_gu.transpose(1, 2), offs=off_E), a, gated=True, I=I,
                           act=silu)

    def fwd_down():
        y32 = torch.zeros(T, H, dtype=torch.float32, device=dev)
        launch.grouped_gemm(a, w_d, (w_d.stride(0), w_d.stride(2), w_d.stride(1)), I, H, token_N, off_E,
                            epilogue=EPI_SCATTER, out=y32, gather_a=False, rw_N=rw_N)

    def bwd_down_triton():
        launch.grouped_gemm(dy, w_d, (w_d.stride(0), w_d.stride(1), w_d.stride(2)), H, I, token_N, off_E,
                            epilogue=EPI_STORE, out=a, gather_a=True)

    drw = torch.empty(N, dtype=torch.float32, device=dev)
    ones_N = torch.ones_like(rw_N)

    def bwd_act():
        # a holds g here and becomes w * act(h) in place; with w = 1 repeated calls stay at act(h), far
        # from zero, and move the same bytes as the real pass
        launch.act_backward(h, a, dh, ones_N, drw, gated=True, I=I, act=silu)

    def bwd_dx_triton():
        dx32 = torch.zeros(T, H, dtype=torch.float32, device=dev)
        launch.grouped_gemm(dh, w_gu, (w_gu.stride(0), w_gu.stride(1), w_gu.stride(2)), F, H, token_N, off_E,
                            epilogue=EPI_SCATTER, out=dx32, gather_a=False)
        dx32.to(dt)

    inv_N = inverse_permutation(perm_N)
    dw_gu = torch.empty_like(w_gu)
    dw_d = torch.empty_like(w_d)
    # Each stage the backend can run two ways: (which it picks, the Triton path, the cuBLAS path), each path
    # as the backend runs it, copies included. When the data gradients run on cuBLAS, dy is gathered once
    # for bwd_down and dW_down reuses the copy: its gather is counted in bwd_down, not in dw_down.
    fwd = launch.fwd_impl(x, w_gu, save_h=True, has_bias=False)
    dgrad = launch.dgrad_impl(dy, w_d)
    paths = {
        "fwd_gate_up": (fwd, fwd_gate_up_triton, fwd_gate_up_cublas),
        "bwd_down": (dgrad, bwd_down_triton, lambda: gm(dy.index_select(0, token_N), w_d, offs=off_E)),
        "bwd_dx": (dgrad, bwd_dx_triton, lambda: launch.token_sum(gm(dh, w_gu, offs=off_E), inv_N, T, K)),
        "dw_gate_up": (launch.wgrad_impl(dh, x),
                       lambda: launch.expert_wgrad(dh, x, token_N, off_E, dw_gu, gather_p=False, gather_q=True),
                       lambda: gm(dh.t(), x.index_select(0, token_N), offs=off_E)),
        "dw_down": (launch.wgrad_impl(dy, a),
                    lambda: launch.expert_wgrad(dy, a, token_N, off_E, dw_d, gather_p=True, gather_q=False),
                    lambda: gm((dy_s if dgrad == "grouped_mm" else dy.index_select(0, token_N)).t(), a, offs=off_E)),
    }

    def chosen(name):
        impl, triton_fn, cublas_fn = paths[name]
        return cublas_fn if impl == "grouped_mm" else triton_fn

    ours = {"fwd_gate_up": (chosen("fwd_gate_up"), launch._gemm_tuned, N * H * F),
            "fwd_down": (fwd_down, launch._gemm_tuned, N * I * H),
            "bwd_down": (chosen("bwd_down"), launch._gemm_tuned, N * H * I),
            "bwd_act": (bwd_act, None, 0),
            "bwd_dx": (chosen("bwd_dx"), launch._gemm_tuned, N * F * H),
            "dw_gate_up": (chosen("dw_gate_up"), launch._wgrad_tuned, N * F * H),
            "dw_down": (chosen("dw_down"), launch._wgrad_tuned, N * H * I)}
    cublas = {"fwd_gate_up": lambda: gm(x_s, w_gu.transpose(-2, -1), offs=off_E),
              "fwd_down": lambda: gm(a, w_d.transpose(-2, -1), offs=off_E),
              "bwd_down": lambda: gm(dy_s, w_d, offs=off_E),
              # the same bytes as bwd_act moves (h and g read, dh and g written): a copy of h into dh plus g's
              "bwd_act": lambda: (dh.copy_(h), a.copy_(a)),
              "bwd_dx": lambda: gm(dh, w_gu, offs=off_E),
              "dw_gate_up": lambda: gm(dh.t(), x_s, offs=off_E),
              "dw_down": lambda: gm(dy_s.t(), a, offs=off_E)}
    dense = {}
    for name, (_, _, macs) in ours.items():
        if not macs:
            continue
        # a dense GEMM of the same FLOPs: [N, Kd] x [Kd, Nd] with the stage's own inner sizes
        m, kd = {"fwd_gate_up": (N, H), "fwd_down": (N, I), "bwd_down": (N, H), "bwd_dx": (N, F),
                 "dw_gate_up": (F, N // E), "dw_down": (H, N // E)}[name]
        A = torch.randn(m, kd, device=dev, dtype=dt)
        B = torch.randn(kd, macs // (m * kd), device=dev, dtype=dt)
        if name.startswith("dw"):  # E separate [M, N/E] x [N/E, Nd] products = one bmm
            A = torch.randn(E, m, kd, device=dev, dtype=dt)
            B = torch.randn(E, kd, macs // (E * m * kd), device=dev, dtype=dt)
            dense[name] = (lambda A=A, B=B: torch.bmm(A, B))
        else:
            dense[name] = (lambda A=A, B=B: A @ B)
    route = lambda: sort_routing(ids, E)  # noqa: E731
    route_ref = lambda: sort_routing_reference(ids, E)  # noqa: E731  (the torch ops it replaced)
    return ours, cublas, dense, route, route_ref, paths


def tf(macs, ms):
    return 2 * macs / ms * 1e-9


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--sweep", action="store_true", help="also time every config of SWEEP per stage")
    args = ap.parse_args()
    records, meta = [], dict(run_meta("cuda"), bench="moe_stages")
    for shape in args.shapes.split(","):
        T, H, I, E, K = SHAPES[shape]
        ours, cublas, dense, route, route_ref, paths = stages(T, H, I, E, K)
        route_ms, ref_ms = do_bench(route, return_mode="median"), do_bench(route_ref, return_mode="median")
        print(f"== {shape}: routing sort {route_ms:.3f} ms (torch reference {ref_ms:.3f} ms)", flush=True)
        records.append({**meta, "shape": shape, "stage": "routing_sort", "ours_ms": route_ms, "reference_ms": ref_ms})
        total = {"ours": route_ms, "cublas": 0.0, "dense": 0.0}
        for name, (fn, tuned, macs) in ours.items():
            fn()  # autotune
            rec = {**meta, "shape": shape, "stage": name}
            rec["ours_ms"] = do_bench(fn, return_mode="median")
            if name in paths:
                rec["impl"], triton_fn, cublas_fn = paths[name]
                for path, path_fn in (("triton", triton_fn), ("cublas", cublas_fn)):
                    path_fn()  # autotune
                    rec[f"{path}_path_ms"] = do_bench(path_fn, return_mode="median")
            rec["tuned_config"] = str(getattr(tuned, "best_config", None)) if tuned is not None else "fixed"
            for other, table in (("cublas", cublas), ("dense", dense)):
                try:
                    rec[f"{other}_ms"] = do_bench(table[name], return_mode="median") if name in table else None
                except Exception as err:  # a baseline this torch cannot run must not lose the rest
                    rec[f"{other}_ms"], rec[f"{other}_error"] = None, repr(err)[:200]
            total["ours"] += rec["ours_ms"]
            for other in ("cublas", "dense"):
                total[other] += rec[f"{other}_ms"] or 0.0
            if args.sweep and tuned is not None:
                rec["sweep"] = {}
                for c in SWEEP:
                    cfg = triton.Config({"BM": c[0], "BN": c[1], "BK": c[2], "GROUP_M": 8}, num_warps=c[3],
                                        num_stages=c[4])
                    try:
                        with launch.forced_config(cfg):
                            fn()
                            rec["sweep"][str(c)] = do_bench(fn, return_mode="median")
                    except Exception as err:
                        rec["sweep"][str(c)] = repr(err)[:80]
                best = min((v, k) for k, v in rec["sweep"].items() if isinstance(v, float))
                rec["sweep_best"] = {"config": best[1], "ms": best[0], "tflops": tf(macs, best[0])}
            print(f"{name:13s} ours {rec['ours_ms']:7.3f} ms {tf(macs, rec['ours_ms']):5.0f} TF  "
                  + (f"[{rec['impl']}; paths: triton {rec['triton_path_ms']:.3f}, cublas {rec['cublas_path_ms']:.3f} ms]  "
                     if "impl" in rec else "")
                  + f"grouped_mm {rec['cublas_ms'] or float('nan'):7.3f} ms  dense {rec['dense_ms'] or float('nan'):7.3f} ms"
                  f"  tuned {rec['tuned_config']}" + (f"  sweep best {rec['sweep_best']}" if "sweep_best" in rec else ""),
                  flush=True)
            records.append(rec)
        print(f"   total ms: {json.dumps({k: round(v, 3) for k, v in total.items()})}", flush=True)
        records.append({**meta, "shape": shape, "stage": "total", **total})
        torch.cuda.empty_cache()
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()

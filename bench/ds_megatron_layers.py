"""MoE layer benchmark against DeepSpeed's and Megatron-core's MoE layers, in one run, with the same
weights and the same routing, and a correctness check in the same run (issue 25).

Whole layer forward+backward (router, dispatch, experts, combine), bf16, dropless, top-k softmax
renormalised over the chosen experts (DeepSpeed's top-2 with top2_2nd_expert_sampling=False and its
top-k, Megatron's default router, moesys's Router with renormalize=True choose the same experts):
- moesys:        moesys.layers.MoELayer (Triton experts; parallelize(ep=world) above one GPU);
- ds_dropin:     moesys.integrations.deepspeed.MoE (DeepSpeed's gate rules, moesys experts and dispatch);
- deepspeed:     deepspeed.moe.layer.MoE (SwiGLU expert module, ep_size=world);
- megatron:      megatron.core MoELayer, alltoall dispatcher, the fastest experts its installed
                 dependencies allow: TEGroupedMLP (Transformer Engine) > GroupedMLP (grouped_gemm) >
                 SequentialMLP; the record names the one used;
- megatron_moesys: the same MoELayer with moesys experts (with_moesys_experts).
Shapes: the training shapes of bench/moe_layer.py (Mixtral, Qwen3-30B-A3B, OLMoE; T = 8192 per GPU).

One GPU:   PYTHONPATH=. python bench/ds_megatron_layers.py --out bench/results/ds_megatron_layers.json
N GPUs:    PYTHONPATH=. torchrun --nproc_per_node N bench/ds_megatron_layers.py --out ...   (ep = N)
CPU smoke: PYTHONPATH=. python bench/ds_megatron_layers.py --device cpu --shapes tiny --out /tmp/x.json
(Megatron's router moves its weight to CUDA, so the megatron impls are skipped on the CPU.)
Records: docs/ARCHITECTURE.md section 4 (benchmark records), plus world_size, and per impl the
correctness against moesys (rel_err_y, rel_err_dx: relative L2 error of output and input gradient on
the same batch).

Legend: T tokens per rank, H hidden, I expert intermediate, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moesys.config import ParallelConfig  # noqa: E402
from moesys.layers.experts import DenseMLP  # noqa: E402
from moesys.layers.moe import MoELayer  # noqa: E402
from moesys.parallel import parallelize  # noqa: E402
from moesys.parallel.testing import Holder  # noqa: E402
from run_meta import run_meta  # noqa: E402

# name: (T, H, I, E, K), as the kernels benchmark's training shapes
SHAPES = {
    "mixtral-8x7b": (8192, 4096, 14336, 8, 2),
    "qwen3-30b-a3b": (8192, 2048, 768, 128, 8),
    "olmoe-1b-7b": (8192, 2048, 1024, 64, 8),
    "tiny": (64, 32, 24, 8, 2),
}


def timed(fn, device: str) -> float:
    """Median milliseconds of fn()."""
    if device == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def reference_weights(H, I, E, device, seed=0):
    """Full router [E, H] and expert weights [E, 2I, H] / [E, H, I] (fp32, N(0, 1/fan_in)), same on every rank."""
    g = torch.Generator(device=device).manual_seed(seed)
    router = torch.randn(E, H, device=device, generator=g) * H ** -0.5
    w_gu = torch.randn(E, 2 * I, H, device=device, generator=g) * H ** -0.5
    w_d = torch.randn(E, H, I, device=device, generator=g) * I ** -0.5
    return router, w_gu, w_d


# ---- the layers, each holding this rank's experts of the same weights ----------------------------

def build_moesys(H, I, E, K, w, world, device, dtype, backend):
    router, w_gu, w_d = w
    layer = MoELayer(H, E, K, I, backend=backend, renormalize=True).to(device)
    with torch.no_grad():
        layer.router.weight.copy_(router)
        layer.experts.gate_up_proj.copy_(w_gu)
        layer.experts.down_proj.copy_(w_d)
    model = Holder(layer.to(dtype))
    model.moe.router.float()  # the gate weight stays fp32 (the router computes in fp32 anyway)
    parallelize(model, ParallelConfig(ep=world))
    return lambda x: model.moe(x)[0]


def _ds_local(layer, w, rank, world, names):
    """Copy the gate and this rank's experts into a DeepSpeed-style layer."""
    router, w_gu, w_d = w
    E = router.shape[0]
    L = E // world
    with torch.no_grad():
        names["gate"].copy_(router)
        for i, (up, down) in enumerate(names["experts"]):
            up.copy_(w_gu[rank * L + i])
            down.copy_(w_d[rank * L + i])


def build_deepspeed(H, I, E, K, w, world, rank, device, dtype, backend, dropin: bool):
    import deepspeed
    if world > 1:
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", verbose=False)
    kwargs = dict(num_experts=E, ep_size=world, k=K, drop_tokens=False, top2_2nd_expert_sampling=False,
                  use_rts=False, min_capacity=0)
    expert = DenseMLP(H, I, activation="silu")
    if dropin:
        from moesys.integrations.deepspeed import MoE
        layer = MoE(H, expert, backend=backend, **kwargs)
    else:
        from deepspeed.moe.layer import MoE
        layer = MoE(H, expert, **kwargs)
    layer = layer.to(device)
    if world > 1:
        layer.set_deepspeed_parallelism()
    if dropin:
        ex = layer.experts
        pairs = [(ex.gate_up_proj[i], ex.down_proj[i]) for i in range(E // world)]
        gate = layer.gate.wg.weight
    else:
        pairs = [(e.gate_up_proj.weight, e.down_proj.weight) for e in layer.deepspeed_moe.experts.deepspeed_experts]
        gate = layer.deepspeed_moe.gate.wg.weight
    _ds_local(layer, w, rank, world, {"gate": gate, "experts": pairs})
    layer.to(dtype)
    gate.data = gate.data.float()  # both gates compute in fp32 from an fp32 weight, as moesys's router
    return lambda x: layer(x)[0]


def megatron_experts_spec():
    """The fastest experts spec Megatron-core can build here, and its name."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    try:
        import transformer_engine  # noqa: F401
        return get_moe_module_spec(use_te=True, num_experts=8, moe_grouped_gemm=True), "TEGroupedMLP"
    except ImportError:
        pass
    try:
        import grouped_gemm  # noqa: F401
        return get_moe_module_spec(use_te=False, num_experts=8, moe_grouped_gemm=True), "GroupedMLP"
    except ImportError:
        return get_moe_module_spec(use_te=False, num_experts=8, moe_grouped_gemm=False), "SequentialMLP"


def build_megatron(H, I, E, K, w, world, rank, device, dtype, backend, moesys_experts: bool):
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from moesys.integrations.megatron import define_missing_te_gemm, with_moesys_experts
    define_missing_te_gemm()  # megatron-core 0.16.1's router needs it without Transformer Engine
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(expert_model_parallel_size=world)
        model_parallel_cuda_manual_seed(0)
    spec, kind = megatron_experts_spec()
    if moesys_experts:
        spec, kind = with_moesys_experts(spec, backend=backend), "MoesysExperts"
    config = TransformerConfig(
        num_layers=1, hidden_size=H, num_attention_heads=8, num_moe_experts=E, moe_router_topk=K,
        moe_ffn_hidden_size=I, ffn_hidden_size=I, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0, expert_model_parallel_size=world, bf16=dtype == torch.bfloat16,
        params_dtype=dtype, moe_grouped_gemm=kind in ("TEGroupedMLP", "GroupedMLP"), use_cpu_initialization=True,
        moe_router_dtype="fp32")
    layer = build_module(spec, config=config).to(device)
    router, w_gu, w_d = w
    L = E // world
    local = slice(rank * L, (rank + 1) * L)
    with torch.no_grad():
        layer.router.weight.copy_(router)
        ex = layer.experts
        if kind == "MoesysExperts":
            ex.experts.gate_up_proj.copy_(w_gu[local])
            ex.experts.down_proj.copy_(w_d[local])
        elif kind == "GroupedMLP":
            ex.weight1.copy_(w_gu[local].transpose(1, 2).reshape(H, -1))
            ex.weight2.copy_(w_d[local].transpose(1, 2).reshape(-1, H))
        elif kind == "TEGroupedMLP":
            for i in range(L):
                getattr(ex.linear_fc1, f"weight{i}").copy_(w_gu[rank * L + i])
                getattr(ex.linear_fc2, f"weight{i}").copy_(w_d[rank * L + i])
        else:
            for i, e in enumerate(ex.local_experts):
                e.linear_fc1.weight.copy_(w_gu[rank * L + i])
                e.linear_fc2.weight.copy_(w_d[rank * L + i])

    def run(x_TH):
        return layer(x_TH.unsqueeze(1))[0].squeeze(1)  # Megatron takes [S, B, H]
    return run, kind


# ---- one shape ------------------------------------------------------------------------------------

def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def fwd_bwd(fn, x, dy):
    leaf = x.detach().requires_grad_(True)
    y = fn(leaf)
    y.backward(dy)
    return y.detach(), leaf.grad


def bench_shape(name, shape, args, rank, world, meta):
    T, H, I, E, K = shape
    device, dtype = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    backend = "triton" if device == "cuda" else "grouped_mm"
    router, w_gu, w_d = reference_weights(H, I, E, device)
    # Every impl holds the router weight in its own dtype or in fp32: give them all the same
    # representable values, so the fp32 gates choose the same experts.
    w = (router.to(dtype).float(), w_gu, w_d)
    g = torch.Generator(device=device).manual_seed(100 + rank)
    x = torch.randn(T, H, device=device, generator=g).to(dtype)
    dy = torch.randn(T, H, device=device, generator=g).to(dtype)
    builders = {
        "moesys": lambda: (build_moesys(H, I, E, K, w, world, device, dtype, backend), "moesys MoELayer"),
        "ds_dropin": lambda: (build_deepspeed(H, I, E, K, w, world, rank, device, dtype, backend, True), "moesys experts"),
        "deepspeed": lambda: (build_deepspeed(H, I, E, K, w, world, rank, device, dtype, backend, False), "deepspeed Experts"),
        "megatron": lambda: build_megatron(H, I, E, K, w, world, rank, device, dtype, backend, False),
        "megatron_moesys": lambda: build_megatron(H, I, E, K, w, world, rank, device, dtype, backend, True),
    }
    wanted = args.impls.split(",")
    if device != "cuda":
        wanted = [i for i in wanted if not i.startswith("megatron")]
    flops = 3 * 6 * T * K * H * I  # forward + backward of the three expert GEMMs, per rank
    records, ref = [], None
    for impl in wanted:
        fn, experts_kind = builders[impl]()
        y, dx = fwd_bwd(fn, x, dy)  # warm-up (autotuning), and the correctness check against moesys
        if ref is None:
            ref = (y, dx)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ms = timed(lambda: fn(x.detach().requires_grad_(True)).backward(dy), device)
        rec = dict(bench="ds_megatron_layers", impl=impl, shape=name, T=T, H=H, I=I, E=E, K=K, world_size=world,
                   experts=experts_kind, fwdbwd_ms=ms, tflops_fwdbwd=flops / ms * 1e-9, tokens_per_s=T * world / ms * 1e3,
                   rel_err_y=rel(y, ref[0]), rel_err_dx=rel(dx, ref[1]), **meta)
        if device == "cuda":
            rec["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        records.append(rec)
        del fn
        if rank == 0:
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items() if k not in meta}),
                  flush=True)
    peers = [r["fwdbwd_ms"] for r in records if r["impl"] in ("deepspeed", "megatron")]
    for r in records:
        if r["impl"] == "moesys" and peers:
            r["speedup_vs_best_peer"] = min(peers) / r["fwdbwd_ms"]  # the target: >= 1.5 on every shape
    return records


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/ds_megatron_layers.json")
    ap.add_argument("--shapes", default="mixtral-8x7b,qwen3-30b-a3b,olmoe-1b-7b", help=", ".join(SHAPES))
    ap.add_argument("--impls", default="moesys,ds_dropin,deepspeed,megatron,megatron_moesys")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--max-rel-err", type=float, default=2e-2, help="fail the run when a peer's output differs more")
    args = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():  # Megatron and DeepSpeed want a process group even on one GPU
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29561")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    meta = run_meta(args.device)
    records = []
    for name in args.shapes.split(","):
        records += bench_shape(name, SHAPES[name], args, rank, world, meta)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    bad = [r for r in records if r["rel_err_y"] > args.max_rel_err or r["rel_err_dx"] > args.max_rel_err]
    if rank == 0:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=1))
        tmp.rename(args.out)
        print(f"wrote {len(records)} records to {args.out}; correctness: {'MISMATCH ' + str([(r['impl'], r['shape']) for r in bad]) if bad else 'ok'}")
    dist.barrier()
    dist.destroy_process_group()
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()

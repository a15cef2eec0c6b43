"""FSSDP vs EP vs FSDP-over-experts training steps: step time, tokens/s, peak memory and the
per-rank expert-compute imbalance, under balanced and Zipf-skewed routing (forced, reproducible).

The three placements run through the same executor (`moesys.parallel.fssdp_runtime`), so only the
placement differs. Each configuration trains a small MoE transformer (attention + MoE blocks) for
`--warmup` steps (at least the load window, so FSSDP plans from predictions) and times `--iters`
full steps (forward, backward, gradient reduction, AdamW, end_step).

GPUs (one process per GPU, NCCL; NVLink multicast stays off, NCCL_NVLS_ENABLE=0 by default):
    torchrun --nproc_per_node 8 bench/fssdp_bench.py --device cuda --out bench/results/fssdp_bench.json
CPU (gloo; spawns the processes itself):
    python bench/fssdp_bench.py --device cpu --nproc 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ep_bench import ForcedRouter, _meta, forced_ids  # noqa: E402  (same forced routing as the EP bench)

from moesys.config import load_config  # noqa: E402
from moesys.models import MoETransformer  # noqa: E402
from moesys.parallel.fssdp_runtime import fssdp_parallelize  # noqa: E402
from moesys.parallel.testing import run_workers  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def build(args, device):
    cfg = load_config(CONFIGS / "tiny.yaml", [
        f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", f"model.num_heads={args.heads}",
        f"model.num_kv_heads={args.heads}", f"moe.num_experts={args.experts}", f"moe.top_k={args.top_k}",
        f"moe.ffn_size={args.ffn}", f"moe.backend={args.backend}", "model.vocab_size=256"])
    torch.manual_seed(args.seed)
    model = MoETransformer.from_config(cfg)
    for layer in model.moe_layers():
        forced = ForcedRouter(args.hidden, args.experts, args.top_k)
        forced.weight = layer.router.weight
        layer.router = forced
    return model.to(device)


def run_config(rank, world, args, policy, routing, device):
    model = build(args, device)
    handle = fssdp_parallelize(model, policy=policy, rematerialize=args.rematerialize,
                               gather_budget=args.gather_budget, memory_cap=args.memory_cap,
                               reshard_every=args.reshard_every)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    B, S = args.batch, args.seq
    T = B * S
    ids_TK = forced_ids(routing, T, args.top_k, args.experts, rank, args.zipf_s, device)
    for layer in model.moe_layers():
        layer.router.ids_TK = ids_TK
    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, 256, (B, S + 1), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        handle.begin_step()
        with autocast:
            out = model(tokens[:, :-1], labels_BS=tokens[:, 1:])
        out.loss.backward()
        handle.reduce_gradients()
        handle.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        handle.end_step(opt)
        return out.loss

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        dist.barrier()
        t0 = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    # A step is as slow as its slowest rank.
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    rows = torch.tensor([float(sum(m.last_rows_received for m in handle.experts))])
    all_rows = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(all_rows, rows)
    rows_W = torch.cat(all_rows)
    step_s = statistics.median(t.tolist())
    return dict(bench="fssdp_bench", impl=f"{policy}/{routing}", policy=policy, routing=routing,
                shape=dict(tokens_per_rank=T, hidden=args.hidden, ffn=args.ffn, experts=args.experts,
                           top_k=args.top_k, layers=args.layers),
                step_ms=1e3 * step_s, tokens_per_s=T * world / step_s,
                peak_gb=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                expert_rows_max_over_mean=float(rows_W.max() / rows_W.mean().clamp_min(1)),
                reshards=handle.reshards, loss=loss.item())


def _worker(rank, world, args):
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    records = []
    for routing in args.routing:
        for policy in args.policies:
            r = run_config(rank, world, args, policy, routing, device)
            records.append(r)
            if rank == 0:
                print(f"{r['impl']:<18} step {r['step_ms']:9.2f} ms  {r['tokens_per_s']:11.0f} tok/s  "
                      f"rows max/mean {r['expert_rows_max_over_mean']:5.2f}  reshards {r['reshards']}", flush=True)
    if rank == 0 and args.out:
        meta = _meta(args.device, world)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps([{**r, **meta} for r in records], indent=1) + "\n")
        tmp.replace(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--nproc", type=int, default=2, help="processes to spawn when not under torchrun")
    p.add_argument("--policies", nargs="+", default=["ep", "fssdp", "fsdp"], choices=["ep", "fssdp", "fsdp"])
    p.add_argument("--routing", nargs="+", default=["balanced", "zipf"], choices=["balanced", "zipf"])
    p.add_argument("--zipf-s", type=float, default=1.2)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--ffn", type=int, default=None)
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument("--gather-budget", type=int, default=None, help="experts a rank may receive per layer")
    p.add_argument("--memory-cap", type=int, default=None, help="extra expert copies per rank and layer")
    p.add_argument("--reshard-every", type=int, default=100)
    p.add_argument("--rematerialize", action="store_true")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    # Tiny on the CPU; a Qwen3-MoE-like block stack on GPUs.
    defaults = dict(batch=2 if cpu else 4, seq=32 if cpu else 2048, hidden=64 if cpu else 2048,
                    heads=4 if cpu else 16, ffn=32 if cpu else 768, experts=8 if cpu else 128,
                    top_k=2 if cpu else 8, layers=2 if cpu else 4, warmup=6, iters=3 if cpu else 10)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None) -> None:
    run_workers(_worker, parse_args(argv), "fssdp_bench.py")


if __name__ == "__main__":
    main()

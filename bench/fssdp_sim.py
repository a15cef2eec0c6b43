"""FSSDP simulator (CPU): bytes moved per step and per-rank compute imbalance of EP,
FSDP-over-experts and FSSDP for 8..1024 ranks under Zipf or recorded routing.

Each strategy is a placement the same executor would run (moesys.parallel.fssdp_plan):
- EP: experts evenly sharded, every expert only at its owner; tokens travel to the owner.
- FSDP over experts: every expert materialised on every rank; tokens stay local; every expert's
  weights are gathered and its gradients reduce-scattered each step.
- FSSDP: owners from `plan_sharding`, replicas from `plan_materialization` (gather budget from the
  attention time the gather hides), tokens to a local replica first.
Loads are predicted from the previous `--window` steps' routing and evaluated on a fresh step.
Per step and MoE layer, forward + backward, bf16 activations and weights:
  token bytes  = tokens sent off-rank x H x 2 B x 2 (dispatch + combine) x 2 (forward + backward)
  weight bytes = experts gathered x expert bytes, plus the same again for the gradient reduce-scatter
  imbalance    = max over ranks of tokens computed / mean.
The estimated step time adds the busiest rank's expert compute and its communication at
`--bandwidth-gbs`; it is a model, not a measurement.

    python bench/fssdp_sim.py --ranks 8 16 64 256 1024 --zipf 1.2 --plot bench/results/fssdp_sim.png
    python bench/fssdp_sim.py --routing counts.pt   # recorded routing: a [steps, L, W, E] int tensor
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from moesys.parallel.fssdp_plan import (LoadPredictor, even_sharding, plan_materialization, plan_sharding)


def zipf_counts(steps, L, W, E, tokens_per_rank, K, s, seed):
    """[steps, L, W, E] assignment counts; each layer has its own random popularity order. Counts are
    Poisson with the Zipf means (the large-T limit of the multinomial, and far cheaper to draw)."""
    g = torch.Generator().manual_seed(seed)
    p = 1 / torch.arange(1, E + 1, dtype=torch.float64) ** s
    p = p / p.sum()
    perms = [torch.randperm(E, generator=g) for _ in range(L)]
    mean_LE = torch.stack([p[perm] for perm in perms]) * tokens_per_rank * K
    return torch.poisson(mean_LE.expand(steps, W, L, E).permute(0, 2, 1, 3).contiguous(), generator=g).long()


def layer_cost(counts_WE, replicas, owner_E, H, expert_bytes):
    """(token bytes, weight bytes, per-rank tokens computed) of one layer under a replica placement."""
    W, E = counts_WE.shape
    work_W = torch.zeros(W, dtype=torch.float64)
    off_rank = 0.0
    gathered = 0
    for e in range(E):
        reps = list(replicas[e])
        c_W = counts_WE[:, e].double()
        in_reps = torch.zeros(W, dtype=torch.bool)
        in_reps[reps] = True
        remote = c_W[~in_reps].sum().item()
        off_rank += remote
        work_W[reps] += c_W[reps] + remote / len(reps)
        gathered += len(reps) - 1
    token_bytes = off_rank * H * 2 * 2 * 2
    weight_bytes = 2 * gathered * expert_bytes
    return token_bytes, weight_bytes, work_W


def simulate(W, E, L, H, I, K, tokens_per_rank, zipf_s, window, attn_ms, bandwidth_gbs, memory_cap, seed,
             routing=None):
    expert_bytes = 3 * H * I * 2
    counts = routing if routing is not None else zipf_counts(window + 1, L, W, E, tokens_per_rank, K, zipf_s, seed)
    predictor = LoadPredictor(L, E, window)
    for t in range(counts.shape[0] - 1):
        predictor.observe(counts[t].sum(1))
    now = counts[-1]
    predicted = predictor.predict()
    budget = int(attn_ms * 1e-3 * bandwidth_gbs * 1e9 / expert_bytes)
    fssdp_owner = plan_sharding(predicted, W) if (L * E) % W == 0 else None
    ep_owner = even_sharding(L, E, W) if E % W == 0 else None
    flops_per_token = 6 * H * I  # forward; x3 for forward + backward
    results = {}
    for name in ("ep", "fsdp_experts", "fssdp"):
        tb = wb = 0.0
        busiest_tokens = 0.0
        imbalance = []
        if name == "ep" and ep_owner is None or name == "fssdp" and fssdp_owner is None:
            continue
        for l in range(L):
            if name == "ep":
                owner = ep_owner.owner_LE[l]
                reps = tuple((o,) for o in owner)
            elif name == "fsdp_experts":
                owner = tuple(e % W for e in range(E))
                reps = tuple(tuple(range(W)) for _ in range(E))
            else:
                owner = fssdp_owner.owner_LE[l]
                reps = plan_materialization(predicted[l], owner, W, gather_budget=budget, memory_cap=memory_cap)
            t_b, w_b, work = layer_cost(now[l], reps, owner, H, expert_bytes)
            tb += t_b
            wb += w_b
            busiest_tokens += work.max().item()
            imbalance.append((work.max() / work.mean()).item())
        compute_s = busiest_tokens * 3 * flops_per_token / 700e12
        comm_s = (tb + wb) / W / (bandwidth_gbs * 1e9)
        results[name] = dict(token_bytes_per_step=tb, weight_bytes_per_step=wb,
                             bytes_per_rank=(tb + wb) / W, imbalance_max_over_mean=max(imbalance),
                             imbalance_mean=sum(imbalance) / len(imbalance),
                             est_moe_time_ms=1e3 * (compute_s + comm_s))
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    ap.add_argument("--experts", type=int, default=0, help="experts per layer (default: max(128, ranks))")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens-per-rank", type=int, default=8192)
    ap.add_argument("--zipf", type=float, default=1.2)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--attn-ms", type=float, default=2.0, help="attention time a layer's gather hides")
    ap.add_argument("--bandwidth-gbs", type=float, default=100.0, help="per-rank interconnect bandwidth")
    ap.add_argument("--memory-cap", type=int, default=32, help="extra expert copies a rank may hold per layer")
    ap.add_argument("--routing", type=Path, help="recorded counts [steps, L, W, E] (torch.save, weights_only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/fssdp_sim.json"))
    ap.add_argument("--plot", type=Path, help="write a PNG (needs matplotlib: pip install moesys[plots])")
    args = ap.parse_args(argv)

    routing = torch.load(args.routing, weights_only=True) if args.routing else None
    ranks = [routing.shape[2]] if routing is not None else args.ranks
    records = []
    for W in ranks:
        E = routing.shape[3] if routing is not None else (args.experts or max(128, W))
        L = routing.shape[1] if routing is not None else args.layers
        t0 = time.perf_counter()
        res = simulate(W, E, L, args.hidden, args.ffn, args.top_k, args.tokens_per_rank, args.zipf, args.window,
                       args.attn_ms, args.bandwidth_gbs, args.memory_cap, args.seed, routing)
        for impl, m in res.items():
            records.append(dict(bench="fssdp_sim", impl=impl, world_size=W,
                                shape=dict(experts=E, layers=L, hidden=args.hidden, ffn=args.ffn, top_k=args.top_k,
                                           tokens_per_rank=args.tokens_per_rank, zipf=args.zipf), **m,
                                device="simulated", torch=torch.__version__, date=time.strftime("%Y-%m-%d")))
        line = "  ".join(f"{k}: {v['bytes_per_rank'] / 1e9:7.2f} GB/rank imb {v['imbalance_max_over_mean']:5.2f} "
                         f"est {v['est_moe_time_ms']:7.1f} ms" for k, v in res.items())
        print(f"W={W:5d} E={E:5d} ({time.perf_counter() - t0:5.1f}s)  {line}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(args.out)
    if args.plot:
        plot(records, args.plot)
    return records


def plot(records, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for impl in ("ep", "fsdp_experts", "fssdp"):
        rs = [r for r in records if r["impl"] == impl]
        if not rs:
            continue
        ws = [r["world_size"] for r in rs]
        axes[0].plot(ws, [r["bytes_per_rank"] / 1e9 for r in rs], marker="o", label=impl)
        axes[1].plot(ws, [r["imbalance_max_over_mean"] for r in rs], marker="o", label=impl)
    for ax, title in zip(axes, ("GB moved per rank per step", "compute imbalance (max / mean)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)


if __name__ == "__main__":
    main()

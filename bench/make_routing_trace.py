"""Make the routing trace that the offload benchmark replays ("trace" rows, moesys.offload.routing): train a
small moesys MoE (64 experts, top-8, 16 MoE layers; configs/trace_64x8.yaml) on real text until its
routing is learned, run it over held-out text, record each token's expert ids per layer, and write
summary statistics beside the trace.

    PYTHONPATH=. python bench/make_routing_trace.py            # one GPU, ~2-3 minutes
    PYTHONPATH=. python bench/make_routing_trace.py --cpu-smoke --out /tmp/t.safetensors   # seconds

Outputs (paths: --out and --stats-out):
- bench/results/routing_trace_64x8.safetensors: the trace, ids_NLK uint8 [N tokens, 16 layers, 8], the
  held-out sequences one after another in reading order (a batch-1 decode of each), ~1 MiB for 4096 tokens;
- bench/results/routing_trace_64x8.json: per MoE layer, the expert-usage entropy (natural log divided
  by log E: 1 = every expert equally used), max/mean load and the hit rate an LRU cache of S experts per
  layer gets, for the trained model, the same model at its initialisation (before) and uniform routing,
  plus the training loss and validation loss at the start and the end. Learned routing shows as balanced
  use (entropy near 1, as uniform) with locality left (LRU hit rate above uniform's S/E).

Data: `data.source: stdlib` (byte tokens of the Python standard library's sources: code, docstrings and
comments, the real text available without a download); `--set data.source=PATH` takes any .txt/.jsonl/
.parquet corpus the data module reads. The trace is recorded on the validation split, never trained on.

Legend: N trace tokens, L MoE layers, E experts, K top-k, S cache slots per layer.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from moesys import checkpoint as ckpt
from moesys.config import load_config
from moesys.data import load_tokens, pack
from moesys.models.transformer import MoETransformer
from moesys.offload.perf_model import lru_hit_curve
from moesys.offload.routing import RoutingRecorder, load_trace
from moesys.train import autocast_context
from moesys.train import main as train_main
from moesys.train_metrics import expert_load_stats
from run_meta import run_meta, write_json

# A model and run that finish in seconds on a CPU: the same 64 experts top-8 (so the trace drives the same
# models), two layers, a narrow hidden size and three steps.
SMOKE_OVERRIDES = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2",
                   "model.ffn_size=64", "model.max_seq_len=64", "moe.ffn_size=16", "data.seq_len=64",
                   "data.batch_size=4", "data.max_tokens=200000", "train.steps=3", "train.warmup_steps=1",
                   "log.every=1", "log.val_every=0", "log.tensorboard=false"]
CACHE_SLOTS = (8, 16, 32, 48)


def record_routing(model: MoETransformer, input_ids_BS: torch.Tensor, batch: int, autocast) -> RoutingRecorder:
    """The model's own routing over the rows of input_ids_BS, row after row (a detached recorder)."""
    layers = model.moe_layers()
    rec = RoutingRecorder.on_modules([m.experts for m in layers], model.moe_config.num_experts,
                                     model.moe_config.top_k)
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), autocast():
            for start in range(0, input_ids_BS.shape[0], batch):
                model(input_ids_BS[start:start + batch].to(device))
    finally:
        rec.remove()
    return rec


def usage_entropy(ids_NLK: torch.Tensor, E: int) -> list[float]:
    """Per layer, the entropy of the expert-usage distribution over N*K assignments, in units of log E."""
    counts_LE = torch.zeros(ids_NLK.shape[1], E, dtype=torch.float64)
    counts_LE.scatter_add_(1, ids_NLK.permute(1, 0, 2).reshape(ids_NLK.shape[1], -1),
                           torch.ones(ids_NLK.shape[1], ids_NLK.shape[0] * ids_NLK.shape[2], dtype=torch.float64))
    p_LE = counts_LE / counts_LE.sum(1, keepdim=True)
    h_L = -(p_LE * p_LE.clamp_min(1e-300).log()).sum(1) / math.log(E)
    return h_L.tolist()


def uniform_trace(N: int, L: int, E: int, K: int, seed: int = 0) -> torch.Tensor:
    """ids_NLK of uniform routing (K distinct of E per token), as RoutingOverride(mode="uniform") draws it."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N * L, E, generator=g).topk(K, dim=1, largest=False).indices.view(N, L, K)


def routing_summary(ids_NLK: torch.Tensor, E: int, slots=CACHE_SLOTS) -> dict:
    """Per-layer entropy and load balance, and LRU hit rates by slots per layer (batch 1: a decode of one
    sequence; per layer and over all layers)."""
    N, L, K = ids_NLK.shape
    load_LE = torch.zeros(L, E).scatter_add_(1, ids_NLK.permute(1, 0, 2).reshape(L, -1),
                                             torch.ones(L, N * K))
    load = expert_load_stats(load_LE, torch.zeros(L))
    per_layer = [lru_hit_curve(ids_NLK[:, r:r + 1], E) for r in range(L)]
    entropy_L = usage_entropy(ids_NLK, E)
    return {
        "tokens": N, "layers": L, "top_k": K, "num_experts": E,
        "entropy_per_layer": entropy_L, "entropy_mean": sum(entropy_L) / L,
        "load_max_mean_per_layer": load["expert_load_max_mean"],
        "load_max_mean_worst": max(load["expert_load_max_mean"]),
        "lru_hit_rate": {str(s): float(sum(c[s] for c in per_layer) / L) for s in slots},
        "lru_hit_rate_per_layer": {str(s): [float(c[s]) for c in per_layer] for s in slots},
    }


def held_out_ids(config, num_tokens: int) -> torch.Tensor:
    """input_ids_BS of the first validation sequences, whole ones, enough for num_tokens tokens (rounded up to
    a multiple of data.seq_len; fewer when the validation split is shorter)."""
    splits = pack(load_tokens(config.data), config.data.seq_len, config.data.val_fraction)
    count = min(splits.num_val, -(-num_tokens // config.data.seq_len))
    input_ids_BS, _ = splits.sequences(list(range(splits.num_train, splits.num_train + count)))
    return input_ids_BS


def loss_curve(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    vals = [r for r in rows if r.get("val_loss") is not None]
    return {"first_step": rows[0]["step"], "first_loss": rows[0]["loss"], "last_step": rows[-1]["step"],
            "last_loss": rows[-1]["loss"],
            "val_loss": {str(r["step"]): r["val_loss"] for r in vals}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/trace_64x8.yaml")
    ap.add_argument("--run-dir", default=None, help="training run directory (default: a new temporary one)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens in the trace (rounded up to whole sequences)")
    ap.add_argument("--out", default="bench/results/routing_trace_64x8.safetensors")
    ap.add_argument("--stats-out", default=None, help="summary JSON (default: --out with .json)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model, 3 steps, 256 tokens, on the CPU")
    args = ap.parse_args(argv)
    if args.tokens < 1:
        raise ValueError(f"--tokens={args.tokens}: give a positive number of trace tokens")
    overrides = (SMOKE_OVERRIDES + ["train.device=cpu"] if args.cpu_smoke else []) + args.overrides
    tokens = min(args.tokens, 256) if args.cpu_smoke else args.tokens
    out = Path(args.out)
    stats_out = Path(args.stats_out) if args.stats_out else out.with_suffix(".json")
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="trace_run_"))

    train_argv = ["--config", args.config, "--run-dir", str(run_dir)]
    for item in overrides:
        train_argv += ["--set", item]
    rc = train_main(train_argv)
    if rc != 0:
        print(f"make_routing_trace: training failed (exit {rc}); run dir {run_dir}", file=sys.stderr)
        return rc

    config = load_config(run_dir / "config.yaml")
    device = torch.device("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    E, K = config.moe.num_experts, config.moe.top_k
    input_ids_BS = held_out_ids(config, tokens)
    batch = max(1, config.data.batch_size)
    autocast = autocast_context(config, device)
    torch.manual_seed(config.train.seed)  # the initial weights of the run (before training)
    with device:
        model = MoETransformer.from_config(config).eval()
    before_NLK = record_routing(model, input_ids_BS, batch, autocast).ids_NLK().long()
    ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir / "ckpt"), model=model, optimizer=None, rank=0,
                         device=device)
    out.parent.mkdir(parents=True, exist_ok=True)
    record_routing(model, input_ids_BS, batch, autocast).save(out)
    after_NLK, _ = load_trace(out)  # what the benchmark will replay, read back through the loader

    N, L, _ = after_NLK.shape
    stats = {
        "bench": "routing_trace", "trace": str(out), "config": args.config, "overrides": overrides,
        "data_source": config.data.source, "held_out": "validation split (data.val_fraction)",
        "trace_bytes": out.stat().st_size,
        "trained": routing_summary(after_NLK, E), "init": routing_summary(before_NLK, E),
        "uniform": routing_summary(uniform_trace(N, L, E, K), E),
        "uniform_analytic_hit_rate": {str(s): s / E for s in CACHE_SLOTS},
        "training": loss_curve(run_dir), "run_dir": str(run_dir), **run_meta(str(device)),
    }
    write_json(stats_out, stats)
    print(f"trace {out} ({stats['trace_bytes']} bytes, {N} tokens x {L} layers x top-{K} of {E})")
    print(f"loss {stats['training']['first_loss']:.3f} (step {stats['training']['first_step']}) -> "
          f"{stats['training']['last_loss']:.3f} (step {stats['training']['last_step']})")
    print(f"{'routing':8s} {'entropy':>8s} {'max/mean':>9s} " + " ".join(f"{'LRU ' + str(s):>8s}" for s in CACHE_SLOTS))
    for name in ("init", "trained", "uniform"):
        s = stats[name]
        print(f"{name:8s} {s['entropy_mean']:8.3f} {s['load_max_mean_worst']:9.2f} "
              + " ".join(f"{s['lru_hit_rate'][str(c)]:8.3f}" for c in CACHE_SLOTS))
    print(f"stats {stats_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

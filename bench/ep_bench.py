"""Expert-parallel MoE layer benchmark: tokens/s, step time, the all-to-all share of the layer time and
what overlapping the shared expert with the token all-to-all buys, under balanced and Zipf-skewed routing.

GPUs (one process per GPU, NCCL; NVLink multicast stays off, NCCL_NVLS_ENABLE=0 by default):
    torchrun --nproc_per_node 8 bench/ep_bench.py --device cuda --tokens 8192 --hidden 4096 --ffn 1408 \
        --experts 64 --top-k 6 --shared-ffn 2816 --dtype bfloat16 --out bench/results/ep_bench_h100.json
CPU (gloo; spawns the processes itself):
    python bench/ep_bench.py --device cpu --nproc 2

Routing is forced (reproducible, independent of the router weights): "balanced" gives every expert
exactly T*K*W/E rows; "zipf" draws each token's K distinct experts with P(e) ~ 1/(e+1)^s, so the
experts of ep rank 0 are the hottest. Each configuration times the layer's forward, forward+backward
and the full step (with the gradient reduction), overlap on and off alternating in rounds (medians
reported); the all-to-all time is measured by replaying the same all-to-alls (counts, dispatch and
combine, forward and backward; same splits and bytes) alone.
Records follow docs/ARCHITECTURE.md, contracts (bench, impl, shape, metrics, device, torch, date, git_sha, world_size).
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

from moesys.config import ParallelConfig  # noqa: E402
from moesys.layers.moe import MoELayer  # noqa: E402
from moesys.layers.router import Router, RouterOutput  # noqa: E402
from moesys.parallel import parallelize  # noqa: E402
from moesys.parallel.testing import Holder, run_workers  # noqa: E402
from run_meta import run_meta  # noqa: E402


class ForcedRouter(Router):
    """A router whose choices are set from outside (`ids_TK`); the combine weights still come from
    the gate (softmax, renormalised) so the router gets gradients as in training."""

    ids_TK: torch.Tensor | None = None

    def forward(self, x_TH, num_sequences: int = 1) -> RouterOutput:
        logits_TE = torch.nn.functional.linear(x_TH.float(), self.weight.float())
        weights_TK = logits_TE.softmax(-1).gather(1, self.ids_TK)
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        counts_E = torch.bincount(self.ids_TK.reshape(-1), minlength=self.num_experts)
        zero = logits_TE.new_zeros(())
        return RouterOutput(self.ids_TK, weights_TK, logits_TE, counts_E, zero, zero, zero, zero)


def forced_ids(routing: str, T: int, K: int, E: int, rank: int, zipf_s: float, device) -> torch.Tensor:
    if routing == "balanced":
        g_T = torch.arange(T) + rank * T                        # global token index
        return ((g_T[:, None] * K + torch.arange(K)) % E).to(device)
    p_E = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** zipf_s
    gen = torch.Generator().manual_seed(1234 + rank)
    return torch.multinomial(p_E.expand(T, E), K, replacement=False, generator=gen).to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, iters: int, warmup: int, device) -> float:
    """Mean milliseconds per call, the slowest rank's (a step is as slow as its slowest rank)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    # On the device: NCCL reduces only CUDA tensors.
    ms = torch.tensor([(time.perf_counter() - start) * 1e3 / iters], device=device)
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return float(ms)


def _a2a_replay_ms(layer, args, device, dtype) -> float:
    """The layer's all-to-alls alone: counts, then dispatch and combine, forward and backward."""
    experts = layer.experts
    send, recv = experts.last_splits
    group, H, E = experts.comm.group, args.hidden, args.experts
    counts = torch.zeros(E, dtype=torch.int64, device=device)
    x_send = torch.randn(sum(send), H, device=device, dtype=dtype)
    x_recv = torch.empty(sum(recv), H, device=device, dtype=dtype)

    def run():
        dist.all_to_all_single(torch.empty_like(counts), counts, group=group)
        for _ in range(2):  # forward and backward each move the rows there and back
            dist.all_to_all_single(x_recv, x_send, recv, send, group=group)
            dist.all_to_all_single(x_send, x_recv, send, recv, group=group)
    return _time(run, args.iters, args.warmup, device)


def bench(rank: int, world: int, args) -> list[dict]:
    # main() has set this process's GPU from LOCAL_RANK (multi-node: rank != local rank).
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    ep = args.ep or world
    T, K, E = args.tokens, args.top_k, args.experts
    flags = [True, False] if args.overlap == "both" else [args.overlap == "on"]
    if ep == 1:
        flags = [False]  # nothing is in flight without EP
    records = []
    for routing in (["balanced", "zipf"] if args.routing == "both" else [args.routing]):
        torch.manual_seed(args.seed)
        layer = MoELayer(args.hidden, E, K, args.ffn, shared_ffn_size=args.shared_ffn, backend=args.backend)
        forced = ForcedRouter(args.hidden, E, K)
        forced.weight.data.copy_(layer.router.weight.data)
        layer.router = forced
        model = Holder(layer).to(device=device, dtype=dtype)
        forced.ids_TK = forced_ids(routing, T, K, E, rank, args.zipf_s, device)
        handle = parallelize(model, ParallelConfig(ep=ep))
        x = torch.randn(T, args.hidden, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(T, args.hidden, device=device, dtype=dtype)

        def fwd():
            with torch.no_grad():
                model.moe(x)

        def fwdbwd():
            y, _ = model.moe(x)
            y.backward(dy)

        def step():
            fwdbwd()
            handle.reduce_gradients()
            for p in model.parameters():
                p.grad = None

        # Overlap on and off alternate in rounds on the same weights, and each metric is the median
        # over rounds, so that drift in the machine's load does not masquerade as an overlap effect.
        times = {(flag, what): [] for flag in flags for what in ("fwd", "fwdbwd", "step", "wait")}
        for _ in range(args.rounds):
            for flag in flags:
                if ep > 1:
                    model.moe.experts.overlap = flag
                for what, fn in (("fwd", fwd), ("fwdbwd", fwdbwd), ("step", step)):
                    if ep > 1 and what == "fwd":
                        model.moe.experts.dispatch_waits = []
                    times[(flag, what)].append(_time(fn, args.iters, args.warmup, device))
                    if ep > 1 and what == "fwd":
                        waits = model.moe.experts.dispatch_waits[args.warmup:]
                        times[(flag, "wait")].append(1e3 * sum(waits) / max(len(waits), 1))
                        model.moe.experts.dispatch_waits = None
        a2a_ms = _a2a_replay_ms(model.moe, args, device, dtype) if ep > 1 else 0.0
        recv = torch.tensor([float(sum(model.moe.experts.last_splits[1])) if ep > 1 else float(T * K)], device=device)
        recv_max, recv_sum = recv.clone(), recv.clone()
        dist.all_reduce(recv_max, op=dist.ReduceOp.MAX)
        dist.all_reduce(recv_sum)
        for flag in flags:
            med = {what: statistics.median(times[(flag, what)] or [0.0]) for what in ("fwd", "fwdbwd", "step", "wait")}
            records.append({
                "bench": "ep_layer", "impl": f"ep{ep}-{routing}-overlap_{'on' if flag else 'off'}",
                "shape": {"tokens_per_rank": T, "hidden": args.hidden, "ffn": args.ffn, "experts": E, "top_k": K,
                          "shared_ffn": args.shared_ffn, "ep": ep, "dtype": args.dtype, "backend": args.backend},
                "routing": routing, "overlap": flag, "rounds": args.rounds, "iters": args.iters,
                "fwd_ms": med["fwd"], "fwdbwd_ms": med["fwdbwd"], "step_ms": med["step"],
                "tokens_per_s": T * world / (med["step"] / 1e3),
                "a2a_ms": a2a_ms, "a2a_share": a2a_ms / med["fwdbwd"],
                "dispatch_wait_ms": med["wait"],  # host time blocked on dispatched tokens (CPU; fwd)
                "recv_rows_max_over_mean": float(recv_max) / max(float(recv_sum) / world, 1e-9),
            })
        if len(flags) == 2:
            on, off = records[-2], records[-1]
            on["overlap_saving_ms"] = off["fwdbwd_ms"] - on["fwdbwd_ms"]
            on["overlap_saving_fwd_ms"] = off["fwd_ms"] - on["fwd_ms"]
            on["dispatch_wait_hidden_ms"] = off["dispatch_wait_ms"] - on["dispatch_wait_ms"]
    return records


def _meta(device: str, world: int) -> dict:
    return {**run_meta(device), "world_size": world}


def _worker(rank: int, world: int, args) -> None:
    records = bench(rank, world, args)
    if rank == 0:
        meta = _meta(args.device, world)
        records = [{**r, **meta} for r in records]
        for r in records:
            print(f"{r['impl']:<28} step {r['step_ms']:8.2f} ms  fwd+bwd {r['fwdbwd_ms']:8.2f} ms  "
                  f"{r['tokens_per_s']:10.0f} tok/s  a2a {100 * r['a2a_share']:5.1f}%  "
                  f"dispatch wait {r['dispatch_wait_ms']:6.2f} ms"
                  + (f"  overlap saves {r['overlap_saving_ms']:+.2f} ms" if "overlap_saving_ms" in r else ""),
                  flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(records, indent=1) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--nproc", type=int, default=2, help="processes to spawn when not under torchrun")
    p.add_argument("--ep", type=int, default=0, help="expert-parallel degree (default: the world size)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--ffn", type=int, default=None)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--shared-ffn", type=int, default=None, help="shared expert size (0 = none)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--routing", choices=["balanced", "zipf", "both"], default="both")
    p.add_argument("--zipf-s", type=float, default=1.2)
    p.add_argument("--overlap", choices=["on", "off", "both"], default="both")
    p.add_argument("--iters", type=int, default=10, help="timed calls per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds alternating overlap on/off; medians reported")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON records here")
    args = p.parse_args(argv)
    # Tiny defaults on the CPU, a DeepSeek-MoE-like layer on GPUs.
    cpu = args.device == "cpu"
    defaults = dict(tokens=256 if cpu else 8192, hidden=128 if cpu else 2048, ffn=128 if cpu else 1408,
                    shared_ffn=256 if cpu else 2816, dtype="float32" if cpu else "bfloat16")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None) -> None:
    run_workers(_worker, parse_args(argv), "ep_bench.py")


if __name__ == "__main__":
    main()

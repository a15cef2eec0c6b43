"""Training throughput of configs/small.yaml (OLMoE-like, 0.72B total / 0.19B active) on one GPU: the
moesys trainer side by side with the same architecture as a transformers model (Qwen3MoeForCausalLM,
q/k norm per head, un-renormalised top-4) with experts_implementation="grouped_mm" and "eager".

Same batch (8 x 2048 tokens), same optimizer (fused AdamW, grad clip 1.0), MoE aux loss on in both.
moesys runs its real trainer (`moesys.train.train`: bf16 autocast over fp32 master weights, per-step
statistics all-reduce and NaN check, data from the stdlib corpus) and reports the tokens/s of its
logged windows after the first; transformers runs a plain loop in pure bf16 (the reference setup;
its grouped_mm path would run the experts in fp32 under autocast). MFU for all = tokens/s x the same
FLOPs/token (moesys.train_metrics.flops_per_token) / the GPU's bf16 peak.

The `moesys_deepspeed` row runs the same trainer with `train.engine=deepspeed` (configs/
deepspeed_zero2_bf16.json: ZeRO-2, bf16 parameters over fp32 masters and AdamW state in DeepSpeed's
optimizer) in this one process (a one-rank process group); the issue's target is within 10% of the
`moesys` row's tokens/s (`vs_torch_engine`). Needs the extra moesys[deepspeed].

    PYTHONPATH=. python bench/train_small.py --out bench/results/train_small.json [--steps 20]
    PYTHONPATH=. python bench/train_small.py --cpu-smoke --config configs/tiny.yaml --steps 10 \
        --skip moesys_triton --skip moesys_eager --skip hf_grouped_mm --skip hf_eager   # the script on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from moesys.config import load_config
from moesys.export import hf_config
from moesys.models.transformer import MoETransformer
from moesys.parallel import bootstrap
from moesys.train_metrics import flops_per_token, peak_flops
from run_meta import run_meta, write_json

REPO = Path(__file__).resolve().parents[1]


def moe_backend(device: torch.device) -> str:
    from moesys.backends import triton_unavailable_reason
    if device.type == "cuda" and triton_unavailable_reason(device) is None:
        return "triton"
    return "grouped_mm"


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_moesys(config, steps: int, log_every: int) -> dict:
    from moesys.train import train
    precision = ("bf16 autocast, fp32 master weights" if config.train.param_dtype == "float32"
                 else "pure bf16: bf16 parameters, gradients and AdamW state")
    if config.train.engine == "deepspeed":  # what moesys.train.run checks before starting
        from moesys.integrations.deepspeed_config import require_deepspeed, resolve_deepspeed_config
        ds = resolve_deepspeed_config(config)
        require_deepspeed()
        mode = ("fp32 parameters under bf16 autocast (torch_autocast)" if ds.get("torch_autocast", {}).get("enabled")
                else "bf16 parameters, fp32 masters" if ds["bf16"]["enabled"] else "fp32")
        precision = f"DeepSpeed {config.train.deepspeed_config}: {mode}"
    ctx = bootstrap.init_distributed(config)
    _reset_peak(ctx.device)
    zero = {}  # DeepSpeed: how many ZeRO groups took their gradients unflattened at the last step
    with tempfile.TemporaryDirectory() as run_dir, _watch_zero_groups(config, zero):
        config.train.steps = steps
        config.log.every = log_every
        train(config, Path(run_dir), None, ctx)
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    if len(records) < 2:
        raise ValueError(f"--steps {steps} gives {len(records)} log window(s) of {log_every} steps; the first is "
                         f"warm-up, so time at least {2 * log_every} steps")
    timed = records[1:]  # the first window holds allocator warm-up and kernel autotuning
    tokens_per_s = sum(r["tokens_per_s"] for r in timed) / len(timed)
    return {"tokens_per_s": tokens_per_s, "loss_first": records[0]["loss"], "loss_last": records[-1]["loss"],
            "peak_gb": _peak_gb(ctx.device), "timed_steps": len(timed) * log_every,
            "precision": precision,
            "moe_backend": moe_backend(ctx.device) if config.moe.backend == "auto" else config.moe.backend, **zero}


@contextlib.contextmanager
def _watch_zero_groups(config, out: dict):
    """Under train.engine=deepspeed, record after each backward how many of ZeRO's parameter groups the step
    takes unflattened (`zero_groups_unflattened` of `zero_groups`)."""
    if config.train.engine != "deepspeed":
        yield
        return
    from moesys.integrations.deepspeed_engine import DeepSpeedEngine
    backward = DeepSpeedEngine.backward

    def watched(self, loss):
        backward(self, loss)
        out.update(zero_groups=len(self.zero.bit16_groups), zero_groups_unflattened=self.adopted_groups)

    DeepSpeedEngine.backward = watched
    try:
        yield
    finally:
        DeepSpeedEngine.backward = backward


def bench_hf(config, experts_implementation: str, warmup: int, steps: int, device: torch.device) -> dict:
    from transformers import Qwen3MoeForCausalLM
    cfg = hf_config(config, "qwen3_moe")
    cfg.output_router_logits = True     # adds the load-balancing loss, as moesys does
    cfg.router_aux_loss_coef = config.moe.aux_loss_coef
    torch.manual_seed(0)
    with device:
        model = Qwen3MoeForCausalLM._from_config(cfg, experts_implementation=experts_implementation,
                                                 dtype=torch.bfloat16)
    return hf_train_loop(model, config, device, warmup, steps)


def hf_train_loop(model, config, device: torch.device, warmup: int, steps: int) -> dict:
    """A transformers model's plain training loop in pure bf16 (fused AdamW, the trainer's clipping) on byte
    tokens, as the moesys run reads them (ids below 256 of the vocabulary)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.train.lr, betas=tuple(config.train.betas),
                            weight_decay=config.train.weight_decay, fused=device.type == "cuda")
    B, S = config.data.batch_size, config.data.seq_len
    ids = torch.randint(0, 256, (B, S), generator=torch.Generator().manual_seed(0)).to(device)
    _reset_peak(device)
    losses = []

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(warmup):
        losses.append(step())
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        losses.append(step())
    _sync(device)
    elapsed = time.perf_counter() - t0
    return {"tokens_per_s": steps * B * S / elapsed, "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
            "peak_gb": _peak_gb(device), "timed_steps": steps, "precision": "bf16 parameters and optimizer state"}


def profile_moesys(config, device: torch.device, path: Path | None) -> None:
    """Where a moesys training step spends its GPU time: torch.profiler's top kernels over 2 steps."""
    from torch.profiler import ProfilerActivity, profile
    from moesys.parallel.handle import total_norm
    from moesys.train import autocast_context, build_optimizer, clip_gradients
    from moesys.train_precision import cast_parameters, param_dtype
    torch.manual_seed(0)
    with device:
        model = MoETransformer.from_config(config)
    cast_parameters(model, param_dtype(config))  # as build_model does, before the optimizer
    optimizer, opt_impl = build_optimizer(model, config)
    if config.train.compile:
        model.compile_parts(config.train.compile_mode, config.train.compile_scope)
    autocast = autocast_context(config, device)
    B, S = config.data.batch_size, config.data.seq_len
    ids = torch.randint(0, 256, (B, S + 1), generator=torch.Generator().manual_seed(0)).to(device)

    graphs = config.train.compile and config.train.compile_mode == "reduce-overhead"

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast():
            out = model(ids[:, :-1], ids[:, 1:], return_logits=False)
        (out.loss + out.aux_loss).backward()
        params = [p for p in model.parameters() if p.grad is not None]  # clipped as the trainer clips
        clip_gradients(optimizer, opt_impl, params, total_norm([p.grad for p in params]),
                       config.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    _sync(device)
    wall_ms = (time.perf_counter() - t0) / 3 * 1e3
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        _sync(device)
    table = kernel_table(prof, 2, device, f"step wall {wall_ms:.1f} ms (unprofiled)")
    print(table)
    if path is not None:
        path.write_text(table)


def kernel_table(prof, steps: int, device: torch.device, header: str) -> str:
    """torch.profiler's result as text: the kernels' summed device time per step (against the wall time in
    `header` it says whether the step is GPU- or host-bound; only kernels count, an op's row repeats its
    kernels' time), the top kernels, then the ops sorted by their device time."""
    # the device rows of user annotations (ProfilerStep#, Optimizer.step#...) span kernels: not kernels
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False) and not e.name.startswith("ProfilerStep")]
    device_ms = sum(e.device_time_total for e in kernels) / steps / 1e3
    by_kernel: dict[str, list[float]] = {}
    for e in kernels:
        by_kernel.setdefault(e.name, []).append(e.device_time_total / steps / 1e3)
    top = sorted(by_kernel.items(), key=lambda kv: -sum(kv[1]))[:60]
    kernel_lines = [f"{sum(v):8.3f} ms {len(v) // steps:5d}x  {name[:110]}" for name, v in top]
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return (f"{header}, kernels' device time {device_ms:.1f} ms per step\n"
            "top kernels per step (ms, launches):\n" + "\n".join(kernel_lines) + "\n\n"
            + prof.key_averages().table(sort_by=sort, row_limit=80, max_name_column_width=60))


def profile_trainer(config, device: torch.device, path: Path, steps: int) -> None:
    """Profile two steps of the real trainer (`moesys.train.train`, so either engine: `--set
    train.engine=deepspeed` profiles DeepSpeed's backward hooks and ZeRO step too) after `steps - 2` steps
    of warm-up. The profiler advances at the end of each step: this wraps the trainer's `_end_step`."""
    from torch.profiler import ProfilerActivity, profile, schedule
    import moesys.train as trainer
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    end_step = trainer._end_step
    times: list[float] = []
    with profile(activities=activities, schedule=schedule(wait=steps - 3, warmup=1, active=2)) as prof:
        def end_step_then_advance(run, stats):
            end_step(run, stats)
            _sync(device)
            times.append(time.perf_counter())
            prof.step()
        trainer._end_step = end_step_then_advance
        try:
            bench_moesys(config, steps, steps // 2)
        finally:
            trainer._end_step = end_step
    # the steps before the profiled ones are timed with a sync per step (no profiler running)
    wall_ms = (times[steps - 4] - times[steps - 9]) / 5 * 1e3
    table = kernel_table(prof, 2, device, f"{config.train.engine} engine: step wall {wall_ms:.1f} ms (synchronised "
                                          "each step, unprofiled)")
    print(table)
    path.write_text(table)


def run_impls(runs, skip, common: dict, flops_tok: float, peak, device: torch.device) -> list[dict]:
    """Run each (impl, fn) not in `skip`, one record per impl (common fields, result, MFU), printed as it
    finishes; a failing implementation is recorded with its error and does not lose the others' numbers."""
    records = []
    for impl, fn in runs:
        if impl in skip:
            continue
        try:
            result = fn()
        except Exception as e:
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}"[:500]}
        if "tokens_per_s" in result:
            result["mfu"] = result["tokens_per_s"] * flops_tok / peak if peak else None
        record = {**common, "impl": impl, **result}
        records.append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "shape"}), flush=True)
        if device.type == "cuda":
            release_compiled()
    return records


def release_compiled() -> None:
    """Free what a finished implementation left on the GPU: its model is garbage by now, but compiled
    reduce-overhead steps keep their CUDA graphs' private memory pools (36 GiB after the fine-tuning
    bench's init_from row, which made the next rows run out of memory on an 80 GB H100)."""
    import gc

    from torch._inductor import cudagraph_trees

    torch._dynamo.reset()
    cudagraph_trees.reset_cudagraph_trees()
    gc.collect()
    torch.cuda.empty_cache()


def write_records(records: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, records)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "small.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=30, help="moesys steps (the first log window is warm-up)")
    parser.add_argument("--hf-steps", type=int, default=12)
    parser.add_argument("--eager-steps", type=int, default=3)
    parser.add_argument("--skip", action="append", default=[],
                        help="impl to skip: moesys, moesys_triton, moesys_deepspeed, moesys_eager, hf_grouped_mm, "
                             "hf_eager")
    parser.add_argument("--out", default=None, help="JSON file for the records")
    parser.add_argument("--cpu-smoke", action="store_true", help="run on the CPU (checks the script, not speed)")
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="only profile two moesys steps and write the kernel table to FILE")
    parser.add_argument("--profile-trainer", default=None, metavar="FILE",
                        help="only profile two steps of the trainer itself (--set train.engine=deepspeed for "
                             "DeepSpeed's) after --steps - 2 warm-up steps; the kernel table goes to FILE")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("bench/train_small.py needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    overrides = ["log.progress_bar=false", "log.tensorboard=false", "log.val_every=0",
                 "checkpoint.save_final=false", "data.max_tokens=4000000", *args.overrides]
    config = load_config(args.config, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    if device.type == "cpu":
        overrides.append("train.device=cpu")
        config = load_config(args.config, overrides)
    with torch.device("meta"):
        meta = MoETransformer.from_config(config)
    flops_tok = flops_per_token(meta, config)
    peak = peak_flops(device, config.log.peak_tflops)
    if args.profile:
        profile_moesys(config, device, Path(args.profile))
        return 0
    if args.profile_trainer:
        if args.steps < 10:
            parser.error("--profile-trainer needs --steps >= 10 (warm-up, five timed steps, two profiled)")
        profile_trainer(config, device, Path(args.profile_trainer), args.steps)
        return 0
    m, moe, d = config.model, config.moe, config.data
    shape = {"hidden": m.hidden_size, "layers": m.num_layers, "heads": m.num_heads, "experts": moe.num_experts,
             "expert_ffn": moe.ffn_size, "top_k": moe.top_k, "vocab": m.vocab_size, "batch": d.batch_size,
             "seq_len": d.seq_len, "total_params": meta.num_params(), "active_params": meta.num_params(active=True)}
    common = {"bench": "train_small", "shape": shape, "world_size": 1, "flops_per_token": flops_tok,
              "optimizer": "AdamW fused, grad clip 1.0", **run_meta()}
    # moesys as configured (configs/small.yaml: compiled, grouped_mm experts), with the Triton experts,
    # and eagerly with the Triton experts (the fastest uncompiled setup).
    runs = [("moesys", lambda: bench_moesys(config, args.steps, 5)),
            ("moesys_triton", lambda: bench_moesys(load_config(args.config, overrides + ["moe.backend=triton"]),
                                                   args.steps, 5)),
            ("moesys_deepspeed", lambda: bench_moesys(load_config(args.config, overrides + ["train.engine=deepspeed"]),
                                                      args.steps, 5)),
            ("moesys_eager", lambda: bench_moesys(
                load_config(args.config, overrides + ["train.compile=false", "moe.backend=triton"]), args.steps, 5)),
            ("hf_grouped_mm", lambda: bench_hf(config, "grouped_mm", 3, args.hf_steps, device)),
            ("hf_eager", lambda: bench_hf(config, "eager", 1, args.eager_steps, device))]
    records = run_impls(runs, args.skip, common, flops_tok, peak, device)
    base = next((r for r in records if r["impl"] == "hf_grouped_mm" and "tokens_per_s" in r), None)
    torch_engine = next((r for r in records if r["impl"] == "moesys" and "tokens_per_s" in r), None)
    for r in records:
        if base is not None and "tokens_per_s" in r:
            r["speedup_vs_hf_grouped_mm"] = r["tokens_per_s"] / base["tokens_per_s"]
        if r["impl"] == "moesys_deepspeed" and torch_engine is not None and "tokens_per_s" in r:
            r["vs_torch_engine"] = r["tokens_per_s"] / torch_engine["tokens_per_s"]  # target: >= 0.9
    if args.out:
        write_records(records, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

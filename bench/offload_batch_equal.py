"""Which sequences of an offloaded batch part from the same prompt generated alone, where, and by how much
(issue 24's "batch equals alone", diagnosed).

For each variant of the engine, the B prompts decode as one batch (generate_batch, greedy) and each prompt
alone (batch 1, the same variant). For every sequence that parts, the record gives the first differing
position and, from one forward of the prompt plus the alone run's tokens before it, the two candidates'
logit gap next to the spacing of representable values (of the model's dtype) at that logit. A gap of a
few spacings is a near-tie that a different summation order flips (random weights leave many); a gap of
many is a wrong computation. Variants:

    device             bookkeeping="device" (the default path): sync-free steps, next-layer prefetch
    device-no-prefetch the same without the prefetch on the copy stream (no second stream at all)
    device-rows        the same with quantized experts row by row (quant_gemv) at every batch, as batch 1
                       computes them, instead of the grouped op from engine.QUANT_GROUPED_MIN_ROWS rows
    host               bookkeeping="host": the routing read back per layer
    exact              a model loaded with exact=True (bf16 experts: --quantize none), host bookkeeping:
                       batch-invariant matmuls, sums and attention, the per-expert loop (moesys.offload.exact);
                       every sequence should equal its run alone

Run it again under CUDA_LAUNCH_BLOCKING=1 (every launch waits for the one before: no two streams overlap)
to rule a race in or out.

    PYTHONPATH=.:bench python bench/offload_batch_equal.py --out bench/results/offload_batch_equal.json \
        [--quantize int4] [--batch 8] [--new-tokens 32] [--variants device,device-no-prefetch,device-rows,host]
    PYTHONPATH=.:bench python bench/offload_batch_equal.py --quantize none --variants host,exact --out ...
    PYTHONPATH=.:bench python bench/offload_batch_equal.py --smoke --out /tmp/equal.json   # CPU, seconds

The model and budget are bench/offload_batch.py's (the OLMoE shape under 4 GiB, its own routing), loaded
with the memory plan of its largest batch (--plan-batch, 128) so the cache is that run's.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from offload_batch import build_model, log, row_prompts, smoke_budget
from run_meta import run_meta, write_json

VARIANTS = ("device", "device-no-prefetch", "device-rows", "host", "exact")


def spacing(value: float, dtype: torch.dtype) -> float:
    """The distance between adjacent representable values of `dtype` at |value|."""
    finfo = torch.finfo(dtype)
    magnitude = max(abs(value), finfo.tiny)
    return finfo.eps * 2.0 ** math.floor(math.log2(magnitude))


def parted(model, prompt, alone, batch, dtype) -> dict | None:
    """Where batch's tokens part from alone's, and the two tokens' logits there (None: equal)."""
    pos = next((i for i, (a, b) in enumerate(zip(alone, batch)) if a != b), None)
    if pos is None:
        return None if len(alone) == len(batch) else dict(position=min(len(alone), len(batch)), lengths_differ=True)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits_V = model(input_ids=torch.tensor([prompt + alone[:pos]], device=device)).logits[0, -1].float()
    a, b = logits_V[alone[pos]].item(), logits_V[batch[pos]].item()
    return dict(position=pos, alone_token=alone[pos], batch_token=batch[pos], alone_logit=a, batch_logit=b,
                gap=a - b, spacing=spacing(max(abs(a), abs(b)), dtype),
                top_token=int(logits_V.argmax()))


def prefill_logits_gap(model, prompts) -> dict:
    """The last position's logits of the prompts prefilled as one left-padded batch against each alone: how many
    rows are equal bit for bit, and the largest absolute difference (the rounding a batch adds, before any
    greedy choice hides it)."""
    from moesys.offload.batch_kv import PaddedBatchKV, cache_kwarg

    device = next(model.parameters()).device
    group = PaddedBatchKV(model.config, device, cache_name=cache_kwarg(model)).prefill_inputs(prompts)
    with torch.no_grad():
        batch = model(**group).logits[:, -1].float()
        alone = torch.cat([model(input_ids=torch.tensor([p], device=device)).logits[:, -1].float() for p in prompts])
    return dict(prefill_logits_equal=sum(torch.equal(a, b) for a, b in zip(alone, batch)),
                prefill_logits_max_abs_diff=(alone - batch).abs().max().item())


def run_variant(model, name, prompts, args, dtype) -> dict:
    from moesys.offload.batch import generate_batch

    engine = model.moesys_offload
    prefetcher, min_rows = engine.prefetcher, engine.quant_grouped_min_rows
    if name == "device-no-prefetch":
        engine.prefetcher = None
    if name == "device-rows":
        engine.quant_grouped_min_rows = 1 << 62
    bookkeeping = "host" if name in ("host", "exact") else "device"
    prefetched = engine.snapshot().prefetch_copies
    started = time.perf_counter()
    try:
        run = generate_batch(model, prompts, max_new_tokens=args.new_tokens, batch_size=len(prompts), eos=[],
                             bookkeeping=bookkeeping)
        batch = {r.index: r.token_ids for r in run}
        batch_seconds = time.perf_counter() - started
        alone = [next(iter(generate_batch(model, [p], max_new_tokens=args.new_tokens, batch_size=1, eos=[],
                                          bookkeeping=bookkeeping))).token_ids for p in prompts]
    finally:
        engine.prefetcher, engine.quant_grouped_min_rows = prefetcher, min_rows
    seconds = time.perf_counter() - started
    diverged = []
    for i, p in enumerate(prompts):
        where = parted(model, p, alone[i], batch[i], dtype)
        if where is not None:
            diverged.append(dict(sequence=i, **where))
    return dict(variant=name, bookkeeping=bookkeeping, equal=len(prompts) - len(diverged), batch=len(prompts),
                prefetch_copies=engine.snapshot().prefetch_copies - prefetched, diverged=diverged,
                seconds_batch_and_alone=seconds, batch_tokens_per_s=sum(map(len, batch.values())) / batch_seconds,
                alone_tokens_per_s=sum(map(len, alone)) / (seconds - batch_seconds),
                **(prefill_logits_gap(model, prompts) if bookkeeping == "host" else {}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default="/tmp/offload_batch")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (runs anywhere in seconds)")
    ap.add_argument("--quantize", default="int4", choices=("none", "int8", "int4"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--plan-batch", type=int, default=128,
                    help="the batch whose KV the memory plan reserves (bench/offload_batch.py's largest)")
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "exact"),
                    help=f"comma-separated of {list(VARIANTS)} (default all but exact, which needs --quantize none)")
    args = ap.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.shape = "olmoe-1b-7b"
    args.prompt_len = args.prompt_len or (16 if args.smoke else 64)
    args.new_tokens = args.new_tokens or (8 if args.smoke else 32)

    from moesys.integrations.transformers import register

    register()
    os.makedirs(args.workdir, exist_ok=True)
    src = build_model(args, args.workdir)
    max_context = max(args.plan_batch, args.batch) * (args.prompt_len + args.new_tokens)
    budget = src.budget if src.budget is not None else smoke_budget(src.cfg, src.dtype, 1 / 3, max_context)
    if "exact" in variants and args.quantize != "none":
        ap.error("the exact variant runs bf16 experts: pass --quantize none")
    prompts = row_prompts(args.batch, args, src.cfg.vocab_size)
    record = dict(run_meta(src.device), bench="offload_batch_equal", shape=src.shape, quantize=args.quantize,
                  batch=args.batch, prompt_tokens=args.prompt_len, new_tokens=args.new_tokens,
                  cuda_launch_blocking=os.environ.get("CUDA_LAUNCH_BLOCKING", "0"), variants=[])
    model = None
    for name in sorted(variants, key=lambda v: v == "exact"):  # exact last: its own load
        if model is None or name == "exact":
            del model
            options = dict(exact=True) if name == "exact" else dict(
                cuda_graph=False, quantize_experts=args.quantize, experts_implementation="moesys")
            model = src.load(gpu_memory=budget, dtype=src.dtype, max_context=max_context, **options)
            record.setdefault("cache_slots", model.moesys_offload.cache.num_slots)
        record["variants"].append(run_variant(model, name, prompts, args, src.dtype))
        v = record["variants"][-1]
        log(name, f"{v['equal']} of {v['batch']} equal alone, end-to-end {v['batch_tokens_per_s']:.1f} tok/s batch, "
            f"{v['alone_tokens_per_s']:.1f} alone; prefill logits equal {v.get('prefill_logits_equal')}, max diff "
            f"{v.get('prefill_logits_max_abs_diff')}",
            [(d["sequence"], d["position"], round(d.get("gap", float("nan")), 5), d.get("spacing"))
             for d in v["diverged"]])
    write_json(args.out, record)


if __name__ == "__main__":
    main()

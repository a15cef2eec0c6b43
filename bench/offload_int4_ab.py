"""Diagnostic A/B for quantized offload decode (OLMoE shape, int4, 4 GiB): the engine as it is against the
same loaded model with every layer forced onto the host-routed path, plus the host time per engine call
split by path. Writes JSON records; the side-by-side table is bench/offload.py's.

    PYTHONPATH=.:bench python bench/offload_int4_ab.py --out int4_ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from offload import forced_decode, free, olmoe_config, warm_up
from run_meta import run_meta


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--workdir", default="/tmp/moesys_offload_bench")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--mode", default="int4")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    import moesys.offload as mo
    cfg = olmoe_config()
    path = os.path.join(args.workdir, "olmoe_shaped")
    if not os.path.isfile(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        with torch.device("cuda"):
            gpu = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
        gpu.save_pretrained(path)
        del gpu
        free()
    V = cfg.vocab_size
    prompt = torch.randint(2, V, (1, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    model = mo.load(path, gpu_memory=4 * 2**30, dtype=torch.bfloat16, host_memory="pinned",
                    quantize_experts=args.mode)
    engine = model.moesys_offload
    calls: dict[str, list[float]] = {}
    forward = engine.experts_forward

    def timed(layer, x, ids, w):
        path_ = "complete" if engine.cache.layer_complete(layer) and x.shape[0] == 1 else "host-routed"
        t0 = time.perf_counter()
        out = forward(layer, x, ids, w)
        calls.setdefault(path_, []).append(time.perf_counter() - t0)
        return out

    engine.experts_forward = timed
    records = []
    for variant in ("as-is", "host-routed-only"):
        if variant == "host-routed-only":
            engine.cache.layer_complete = lambda layer: False
        warm_up(model, prompt, args.steps, V)
        calls.clear()
        engine.reset_stats()
        _, decode = forced_decode(model, prompt, args.steps, V)
        rec = dict(run_meta("cuda"), bench="offload-int4-ab", impl=f"moesys-{args.mode}", variant=variant,
                   decode_tokens_per_s=decode, num_slots=engine.cache.num_slots,
                   layers_complete=sum(engine.cache.layer_complete(layer) for layer in engine.inner)
                   if variant == "as-is" else 0,
                   host_ms_per_call={k: 1e3 * sum(v) / len(v) for k, v in calls.items()},
                   calls={k: len(v) for k, v in calls.items()}, stats=engine.snapshot().as_dict())
        print(json.dumps(rec, default=str), flush=True)
        records.append(rec)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1, default=str)


if __name__ == "__main__":
    main()

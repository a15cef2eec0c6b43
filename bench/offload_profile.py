"""Where a batch-1 decode step of offloaded inference spends its time (diagnostic for issue 5's bound target):
torch.profiler over a few decode steps of an OLMoE-shaped random model (OLMoE-1B-7B's layer, fewer layers:
the per-layer costs are what is measured), for transformers fully on the GPU and for moesys with a budget
holding the whole model and one holding a quarter of the experts.

    PYTHONPATH=.:bench python bench/offload_profile.py --out offload_profile.json [--layers 4]

Per decode token it reports the wall time, the kernels' summed device time, the number of kernel launches,
the host time spent blocked in synchronisations, and the top host-side ops by self time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from offload import forced_decode, free, olmoe_config, profile_summary
from run_meta import run_meta, write_json


@torch.no_grad()
def profile_decode(model, vocab: int, steps: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(7)
    prompt = torch.randint(2, vocab, (1, 64), generator=g).cuda()
    # warm-up over the same lengths (cuDNN attention builds a plan per new KV length: the first to meet a
    # length pays it), with other tokens
    forced_decode(model, prompt, steps, vocab, seed=321)
    toks = torch.randint(2, vocab, (steps, 1, 1), generator=g).cuda()
    past = model(prompt, use_cache=True, logits_to_keep=1).past_key_values
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            past = model(toks[i], past_key_values=past, use_cache=True).past_key_values
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    return profile_summary(prof, steps, wall * steps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    import moesys.offload as mo
    cfg = olmoe_config()
    cfg.num_hidden_layers = args.layers
    V = cfg.vocab_size
    meta = dict(run_meta("cuda"), bench="offload_profile", shape=f"olmoe-1b-7b layer x {args.layers}")
    records = []
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "model")
        torch.manual_seed(0)
        with torch.device("cuda"):
            gpu = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
        gpu.save_pretrained(path)
        default_impl = getattr(gpu.config, "_experts_implementation", None)
        records.append(dict(meta, impl=f"transformers-gpu (experts {default_impl})",
                            **profile_decode(gpu, V, args.steps)))
        print(json.dumps(records[-1]), flush=True)
        del gpu
        free()
        expert_bytes = 3 * cfg.hidden_size * cfg.intermediate_size * 2
        non_expert = 2 * (2 * V * cfg.hidden_size + args.layers * (4 * cfg.hidden_size ** 2))
        quarter = non_expert + args.layers * cfg.num_experts // 4 * expert_bytes + (1 << 30)
        for impl, budget in (("moesys whole-model budget", 40 * 2**30), ("moesys quarter of the experts", quarter)):
            model = mo.load(path, gpu_memory=budget, dtype=torch.bfloat16, host_memory="pinned")
            rec = dict(meta, impl=impl, budget_bytes=budget, **profile_decode(model, V, args.steps))
            rec["hit_rate"] = model.moesys_offload.snapshot().hit_rate
            records.append(rec)
            print(json.dumps(rec), flush=True)
            del model
            free()
    write_json(args.out, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

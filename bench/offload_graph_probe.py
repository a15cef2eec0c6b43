"""Feasibility probe for a CUDA-graph offload decode (issue 5), on one GPU:

1. a Triton kernel reading experts straight from pinned host memory (zero-copy, no cudaMemcpy), eager and
   inside a CUDA graph, against back-to-back cudaMemcpy of the same experts;
2. a transformers decode step with a StaticCache captured as a CUDA graph: logits equal to eager's;
3. the OLMoE-1B-7B shape fully on the GPU: decode tokens/s eager (dynamic cache, static cache) vs the graph.

    PYTHONPATH=.:bench python bench/offload_graph_probe.py --out probe.json

The recorded run (bench/results/offload_graph_probe.json, before slot_copy existed) timed an inline copy
of the same kernel at three block sizes (1024, 4096, 16384 words: 49.5-49.8 GB/s, no difference); the
script now times slot_copy itself.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from moesys.offload import slot_copy
from run_meta import run_meta


def copy_rows(src, dst, src_idx, dst_idx):
    """The offload engine's device-side copy (moesys.offload.slot_copy) of whole rows."""
    slot_copy.copy_parts(src.view(torch.uint8).view(src.shape[0], -1), [(0, dst[0].nbytes, dst)], src_idx, dst_idx)


def time_it(fn, n=20):
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def zero_copy(rows):
    row_bytes, E, S, K = 12582912, 64, 16, 8
    src = torch.randint(0, 2**62, (E, row_bytes // 8), dtype=torch.int64).pin_memory()
    dst = torch.zeros(S, row_bytes // 8, dtype=torch.int64, device="cuda")
    src_idx = torch.randperm(E)[:K].cuda()
    dst_idx = torch.randperm(S)[:K].cuda()
    out = {}
    try:
        copy_rows(src, dst, src_idx, dst_idx)
        torch.cuda.synchronize()
        out["triton_correct"] = bool(torch.equal(dst[dst_idx].cpu(), src[src_idx.cpu()]))
        out["triton_GBps"] = K * row_bytes / time_it(lambda: copy_rows(src, dst, src_idx, dst_idx)) / 1e9
    except Exception as exc:  # noqa: BLE001 - a probe reports what failed
        out["triton_error"] = repr(exc)[:400]
    si, di = src_idx.tolist(), dst_idx.tolist()

    def memcpy():
        for a, b in zip(si, di):
            dst[b].copy_(src[a], non_blocking=True)
    out["memcpy_GBps"] = K * row_bytes / time_it(memcpy) / 1e9
    try:
        g = torch.cuda.CUDAGraph()
        dst.zero_()
        with torch.cuda.graph(g):
            copy_rows(src, dst, src_idx, dst_idx)
        g.replay()
        torch.cuda.synchronize()
        out["graph_correct"] = bool(torch.equal(dst[dst_idx].cpu(), src[src_idx.cpu()]))
        src_idx.copy_(torch.randperm(E)[:K].cuda())  # new data-dependent sources, same graph
        g.replay()
        torch.cuda.synchronize()
        out["graph_correct_new_idx"] = bool(torch.equal(dst[dst_idx].cpu(), src[src_idx.cpu()]))
        out["graph_GBps"] = K * row_bytes / time_it(g.replay) / 1e9
    except Exception as exc:  # noqa: BLE001
        out["graph_error"] = repr(exc)[:400]
    rows.append({"bench": "offload-graph-probe", "impl": "zero-copy", **out})
    print(out, flush=True)


def olmoe(config_kw):
    from transformers import OlmoeConfig, OlmoeForCausalLM
    cfg = OlmoeConfig(**config_kw)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = OlmoeForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


@torch.no_grad()
def graph_decode(model, prompt, steps, vocab, max_len):
    """(eager static tok/s, graph tok/s, max |logit diff| over steps): same inputs through both."""
    from transformers import StaticCache
    g_tok = torch.Generator(device="cpu").manual_seed(1)
    toks = torch.randint(2, vocab, (steps, 1, 1), generator=g_tok).cuda()
    res = {}
    logits_by = {}
    for mode in ("eager", "graph"):
        cache = StaticCache(config=model.config, max_cache_len=max_len)
        P = prompt.shape[1]
        model(prompt, past_key_values=cache, cache_position=torch.arange(P, device="cuda"), use_cache=True)
        ids = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        pos = torch.zeros(1, dtype=torch.long, device="cuda")

        def step():
            return model(ids, past_key_values=cache, cache_position=pos, use_cache=True).logits
        outs = []
        graph = None
        torch.cuda.synchronize()
        t0 = None
        for i in range(steps):
            ids.copy_(toks[i])
            pos.fill_(P + i)
            if mode == "eager" or i == 0:
                logits = step()
            else:
                if graph is None:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        static_logits = step()
                graph.replay()
                logits = static_logits
            outs.append(logits.float().clone())
            if i == 1:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
        torch.cuda.synchronize()
        res[f"{mode}_static_tok_s"] = (steps - 2) / (time.perf_counter() - t0)
        logits_by[mode] = torch.stack(outs)
    res["max_abs_diff"] = float((logits_by["eager"] - logits_by["graph"]).abs().max())
    return res


def hf_graph(rows):
    common = dict(pad_token_id=0, bos_token_id=1, eos_token_id=None)
    tiny = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, **common)
    try:
        model = olmoe(tiny)
        r = graph_decode(model, torch.randint(2, 256, (1, 7), device="cuda"), 6, 256, 64)
    except Exception as exc:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        r = {"error": repr(exc)[:600]}
    rows.append({"bench": "offload-graph-probe", "impl": "hf-static-graph", "shape": "tiny-olmoe", **r})
    print(rows[-1], flush=True)
    full = dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, **common)
    try:
        model = olmoe(full)
        prompt = torch.randint(2, 50304, (1, 512), device="cuda")
        r = graph_decode(model, prompt, 34, 50304, 1024)
        # the dynamic-cache eager baseline, as bench/offload.py times transformers
        out = model(prompt, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        toks = torch.randint(2, 50304, (34, 1, 1), device="cuda")
        for i in range(2):
            past = model(toks[i], past_key_values=past, use_cache=True).past_key_values
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(2, 34):
            past = model(toks[i], past_key_values=past, use_cache=True).past_key_values
        torch.cuda.synchronize()
        r["eager_dynamic_tok_s"] = 32 / (time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        r = {"error": repr(exc)[:600]}
    rows.append({"bench": "offload-graph-probe", "impl": "hf-static-graph", "shape": "olmoe-1b-7b", **r})
    print(rows[-1], flush=True)


def copy_sweep(rows):
    """slot_copy's block and warp shapes, one decode step's worth of misses (7 OLMoE-shaped bf16 experts,
    12.6 MB each, distinct rows of a 64-expert pinned arena into a 16-slot pool) per timed call, against
    back-to-back cudaMemcpy of the same rows; the copied rows are checked."""
    row_bytes, E, S, K = 12582912, 64, 16, 7
    src = torch.randint(0, 2**62, (E, row_bytes // 8), dtype=torch.int64).pin_memory()
    dst = torch.zeros(S, row_bytes // 8, dtype=torch.int64, device="cuda")
    src_idx, dst_idx = torch.randperm(E)[:K].cuda(), torch.randperm(S)[:K].cuda()
    si, di = src_idx.tolist(), dst_idx.tolist()

    def memcpy():
        for a, b in zip(si, di):
            dst[b].copy_(src[a], non_blocking=True)
    rows.append({"bench": "offload-copy-sweep", "impl": "cudaMemcpy", "GBps": K * row_bytes / time_it(memcpy) / 1e9})
    default = (slot_copy._BLOCK, slot_copy._NUM_WARPS)
    for block, warps in [(4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16), (2048, 2), (1024, 4)]:
        slot_copy._BLOCK, slot_copy._NUM_WARPS = block, warps
        dst.zero_()
        copy_rows(src, dst, src_idx, dst_idx)
        torch.cuda.synchronize()
        ok = bool(torch.equal(dst[dst_idx].cpu(), src[src_idx.cpu()]))
        gbps = K * row_bytes / time_it(lambda: copy_rows(src, dst, src_idx, dst_idx)) / 1e9
        rows.append({"bench": "offload-copy-sweep", "impl": "slot_copy", "block_words": block, "num_warps": warps,
                     "correct": ok, "GBps": gbps, "default": (block, warps) == default})
        print(rows[-1], flush=True)
    slot_copy._BLOCK, slot_copy._NUM_WARPS = default


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--copy-sweep", action="store_true", help="only time slot_copy's block/warp shapes")
    a = p.parse_args()
    rows = []
    if a.copy_sweep:
        copy_sweep(rows)
    else:
        zero_copy(rows)
        hf_graph(rows)
    meta = run_meta()
    with open(a.out, "w") as f:
        json.dump([{**meta, **r} for r in rows], f, indent=1)


if __name__ == "__main__":
    main()

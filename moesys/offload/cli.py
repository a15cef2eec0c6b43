"""`moesys generate`: stream text from an MoE checkpoint larger than the GPU, then print one stats line."""

from __future__ import annotations

import argparse
import os
import sys

from moesys.offload.cache import CACHE_POLICIES
from moesys.offload.engine import CPU_EXPERT_MODES
from moesys.offload.prefetch import PREFETCH_POLICIES
from moesys.offload.quant import QUANT_MODES
from moesys.offload.store import HOST_MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="transformers checkpoint directory (config.json, *.safetensors, tokenizer)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--gpu-memory", required=True, help="device memory budget, e.g. 16GiB or a byte count")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--cache-policy", choices=CACHE_POLICIES, default="lru")
    parser.add_argument("--prefetch", choices=PREFETCH_POLICIES, default="next-gate")
    parser.add_argument("--quantize-experts", choices=QUANT_MODES, default="none")
    parser.add_argument("--cpu-experts", choices=CPU_EXPERT_MODES, default="off",
                        help="batch-1 decode: compute missed experts on the CPU when a measured cost model says "
                             "it beats the copy (auto), always (on), never (off, the default: bit-identical "
                             "output to the model fully on the GPU)")
    parser.add_argument("--host-memory", choices=HOST_MODES, default="auto",
                        help="pinned host RAM, plain RAM, or memory-mapped checkpoint files (host RAM short)")
    parser.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: the config's)")
    parser.add_argument("--max-context", type=int, default=4096, help="tokens the KV cache is planned for")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--cuda-graph", choices=("on", "off"), default="on",
                        help="on (default): batch-1 decode keeps the expert cache's bookkeeping on the GPU and "
                             "replays each token as one CUDA graph (static KV cache; no speculative prefetch or "
                             "CPU experts in decode); off: every layer reads its routing back to the host")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile the decode step the CUDA graph captures (inductor fuses the "
                             "model's kernels around the expert cache; the first decode step then waits for the "
                             "compile, about a minute for a 16-layer model, cached on disk after). Logits then "
                             "equal the model's under the same compiled step, bit for bit; off: its eager "
                             "logits. auto (default): on with --cuda-graph on a GPU")


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer, TextStreamer

    from moesys.offload.loader import load

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    if not os.path.isdir(args.model_dir):
        raise ValueError(f"MODEL_DIR={args.model_dir!r} is not a directory")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = load(args.model_dir, gpu_memory=args.gpu_memory, dtype=args.dtype,
                 cache_policy=args.cache_policy, prefetch=args.prefetch, quantize_experts=args.quantize_experts,
                 cpu_experts=args.cpu_experts, host_memory=args.host_memory, max_context=args.max_context,
                 device=args.device, cuda_graph=args.cuda_graph == "on",
                 compile={"auto": None, "on": True, "off": False}[args.compile])
    engine = model.moesys_offload
    print(f"[moesys] {engine.plan.describe()}, host memory: {engine.host_mode}", file=sys.stderr)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=False)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)
    print(f"[moesys] {engine.snapshot().summary()}", flush=True)
    return 0

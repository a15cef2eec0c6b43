"""`moesys generate`: stream text from an MoE checkpoint larger than the GPU, then print one stats line.

MODEL is a checkpoint directory or a hub id (`org/name`, from huggingface_hub's cache; see moesys.hub).
`--prompt` needs the checkpoint's tokenizer; `--token-ids 1,2,3` works without one: the prompt goes in
as token ids and the generated ids come out on stdout, one line. `--prompts FILE.jsonl --out FILE.jsonl`
generates many prompts with continuous batching (moesys.offload.batch_cli says the file formats).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moesys.offload import batch_cli
from moesys.offload.cache import CACHE_POLICIES
from moesys.offload.engine import CPU_EXPERT_MODES
from moesys.offload.prefetch import PREFETCH_POLICIES
from moesys.offload.quant import QUANT_MODES
from moesys.offload.routing import ROUTING_MODES
from moesys.offload.store import HOST_MODES

# Any of these makes AutoTokenizer try the directory; without one it has nothing to load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL",
                        help="transformers checkpoint directory (config.json, *.safetensors, tokenizer), or a hub "
                             "id org/name resolved through the Hugging Face cache")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text to continue (needs the checkpoint's tokenizer)")
    prompt.add_argument("--token-ids", metavar="IDS",
                        help="the prompt as comma-separated token ids, e.g. 1,2,3; prints the generated ids "
                             "(prompt included) instead of text, so no tokenizer is needed")
    prompt.add_argument("--prompts", metavar="FILE.jsonl",
                        help="batch generation: one JSON object per line, {\"prompt\": text} or {\"token_ids\": "
                             "[...]}, optional \"max_new_tokens\" and \"id\"; results go to --out as they finish")
    parser.add_argument("--out", metavar="FILE.jsonl", help="with --prompts: the results, one JSON line per "
                        "sequence in finishing order (written to FILE.jsonl.partial, renamed at the end)")
    parser.add_argument("--batch-size", default="8", metavar="N|auto",
                        help="with --prompts: sequences decoded together (continuous batching), or auto: the "
                             "performance model's choice")
    parser.add_argument("--kv", choices=("device", "host", "auto"), default="device",
                        help="with --prompts: the batch's KV cache on the device (within --gpu-memory; "
                             "--max-context is raised to hold batch x the longest sequence, and a hybrid's "
                             "recurrent states), in host memory with attention on the CPU (frees the budget for "
                             "the expert cache), or auto: the performance model's faster choice")
    parser.add_argument("--batch-graph", choices=("auto", "on", "off"), default="auto",
                        help="with --prompts: on: the batch's decode steps replay the CUDA graph with the expert "
                             "cache's bookkeeping on the GPU (a fixed-shape KV cache sized to the run, at most "
                             "max-context in all; needs --cuda-graph on and banks that hold batch x top-k "
                             "experts, else it says so and runs off); off: eager steps, which overlap the resident "
                             "experts' compute with the misses' copies and prefetch; auto: on for int8/int4 "
                             "experts on a GPU at up to 128 rows where the banks hold them (measured 1.3-7x "
                             "faster there), else off")
    parser.add_argument("--bookkeeping", choices=("auto", "host", "device"), default="auto",
                        help="with --prompts and --batch-graph off: where the eager decode steps keep the expert "
                             "cache's bookkeeping: host (each layer's routing read back, one sync per layer), "
                             "device (no sync inside a step, the next layer's guess prefetched on the copy stream; "
                             "where the banks cannot hold batch x top-k experts, host), or auto: device, except "
                             "quantized experts above 8 routed rows per expert (computed row by row there)")
    parser.add_argument("--routing", choices=ROUTING_MODES, default="model",
                        help="benchmarking: the model's router, uniform random top-k per token (seeded), or a "
                             "replayed routing trace (--routing-trace)")
    parser.add_argument("--routing-trace", metavar="FILE", help="routing trace (safetensors) for --routing trace")
    parser.add_argument("--routing-seed", type=int, default=0, help="seed of --routing uniform")
    parser.add_argument("--gpu-memory", required=True, help="device memory budget, e.g. 16GiB or a byte count")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate after the prompt")
    parser.add_argument("--cache-policy", choices=CACHE_POLICIES, default="auto",
                        help="which cached expert the GPU expert cache evicts (auto: next-visit, the least "
                             "recently used expert of the layer visited furthest ahead; the CUDA-graph decode's "
                             "device bookkeeping runs LRU, or LFU when the cache is so small that LRU would never hit)")
    parser.add_argument("--prefetch", choices=PREFETCH_POLICIES, default="next-gate",
                        help="speculative copy of the experts the next layer's gate predicts")
    parser.add_argument("--quantize-experts", choices=QUANT_MODES, default="none",
                        help="store the experts quantized (smaller copies; output within the stated error)")
    parser.add_argument("--cpu-experts", choices=CPU_EXPERT_MODES, default="off",
                        help="batch-1 decode: compute missed experts on the CPU when a measured cost model says "
                             "it beats the copy (auto), always (on), never (off: bit-identical output to the "
                             "model fully on the GPU)")
    parser.add_argument("--host-memory", choices=HOST_MODES, default="auto",
                        help="pinned host RAM, plain RAM, or memory-mapped checkpoint files (host RAM short)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="compute dtype (None: the checkpoint config's)")
    parser.add_argument("--max-context", type=int, default=4096,
                        help="tokens the KV cache is planned for: one sequence of this length, or a batch's rows "
                             "sharing it (each with its recurrent states, in a hybrid model)")
    parser.add_argument("--device", default=None, help="torch device (None: cuda if available, else cpu)")
    parser.add_argument("--exact", action="store_true",
                        help="greedy tokens of a prompt in any batch equal its tokens alone, bit for bit in every "
                             "dtype (batch-invariant matmuls, norms and attention, the per-expert loop, no CUDA "
                             "graph; slower; bf16/fp16/fp32 experts only). On a CPU set TRITON_INTERPRET=1")
    parser.add_argument("--cuda-graph", choices=("on", "off"), default=None,
                        help="(default on, off with --exact) on: batch-1 decode keeps the expert cache's "
                             "bookkeeping on the GPU and replays each token as one CUDA graph (static KV cache; no "
                             "speculative prefetch or CPU experts in decode); off: every layer reads its routing "
                             "back to the host")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile the decode step the CUDA graph captures (inductor fuses the "
                             "model's kernels around the expert cache; the first decode step then waits for the "
                             "compile, about a minute for a 16-layer model, cached on disk after). Logits then "
                             "equal the model's under the same compiled step, bit for bit; off: its eager "
                             "logits. auto: on with --cuda-graph on a GPU")


def parse_token_ids(text: str) -> list[int]:
    """'1, 2,3' -> [1, 2, 3]; ValueError naming the bad item."""
    ids = []
    for item in text.replace(" ", "").split(","):
        if not item.isdigit():
            raise ValueError(f"--token-ids {text!r}: {item!r} is not a token id; write non-negative integers "
                             "separated by commas, e.g. --token-ids 1,2,3")
        ids.append(int(item))
    return ids


def load_tokenizer(model_dir: Path):
    """The checkpoint's tokenizer, or a one-line ValueError naming --token-ids when it has none."""
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{model_dir} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...); give the prompt "
                         "as ids with --token-ids 1,2,3 (prints ids), or copy the model's tokenizer files there")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (ValueError, OSError, ImportError) as e:   # e.g. a sentencepiece model without sentencepiece
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load the tokenizer in {model_dir} ({first}); give the prompt as ids with "
                         "--token-ids 1,2,3 instead") from e


def resolve_cuda_graph(args: argparse.Namespace) -> None:
    """--cuda-graph's default: on, except with --exact (whose decode runs the eager path)."""
    if args.cuda_graph is None:
        args.cuda_graph = "off" if args.exact else "on"


def run(args: argparse.Namespace) -> int:
    import torch

    from moesys.hub import resolve_model_dir
    from moesys.offload.loader import load
    from moesys.offload.sizes import parse_bytes

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    resolve_cuda_graph(args)
    parse_bytes(args.gpu_memory, name="--gpu-memory")   # a bad budget fails before the model is read
    model_dir = resolve_model_dir(args.model_dir, what="MODEL")
    ids = parse_token_ids(args.token_ids) if args.token_ids is not None else None
    requests = None
    if args.prompts is not None:   # batch mode: the prompts file is checked before the model is read
        tokenizer, requests, batch_size, kv = batch_cli.prepare(args, model_dir)
    else:
        tokenizer = load_tokenizer(model_dir) if ids is None else None
    model = load(model_dir, gpu_memory=args.gpu_memory, dtype=args.dtype,
                 cache_policy=args.cache_policy, prefetch=args.prefetch, quantize_experts=args.quantize_experts,
                 cpu_experts=args.cpu_experts, host_memory=args.host_memory, max_context=args.max_context,
                 device=args.device, cuda_graph=args.cuda_graph == "on",
                 compile={"auto": None, "on": True, "off": False}[args.compile], exact=args.exact)
    engine = model.moesys_offload
    print(f"[moesys] {engine.plan.describe()}, host memory: {engine.host_mode}", file=sys.stderr)
    if requests is not None:
        batch_cli.run_batch(args, model, tokenizer, requests, batch_size, kv)
    elif ids is not None:
        vocab = model.config.vocab_size
        if max(ids) >= vocab:
            raise ValueError(f"--token-ids: id {max(ids)} is outside the vocabulary (vocab_size={vocab})")
        input_ids = torch.tensor([ids], device=model.device)
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=args.max_new_tokens, do_sample=False)
        print(",".join(str(i) for i in out[0].tolist()), flush=True)
    else:
        from transformers import TextStreamer

        inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
        streamer = TextStreamer(tokenizer, skip_prompt=False)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)
    print(f"[moesys] {engine.snapshot().summary()}", flush=True)
    return 0

"""`moesys generate MODEL --prompts IN.jsonl --out OUT.jsonl [--batch-size N|auto]`: offline batch generation.

Input: one JSON object per line, {"prompt": "text"} (needs the checkpoint's tokenizer) or {"token_ids": [1, 2]},
optionally "max_new_tokens" (int) and "id" (any JSON value; default: the line number). Blank lines are
skipped. Anything else is an error naming the file, the line and what is wrong, before the model is read.

Output: one JSON object per finished sequence, in the order they finish: {"id", "index" (0-based position
among the prompts), "token_ids" (generated), "text" (with a tokenizer), "finish_reason" ("eos" | "length"),
"prompt_tokens"}. Written as they complete to OUT.partial, flushed per line (an interrupted run leaves the
finished sequences there, each a whole line), renamed to OUT when all are done.

Progress goes to stderr: a tqdm bar on a terminal, plain lines otherwise; a final throughput line to stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from moesys.offload.batch import Request, generate_batch

_KEYS = {"prompt", "token_ids", "max_new_tokens", "id"}


def read_prompts(path: Path, tokenizer, vocab_size: int) -> list[Request]:
    """The requests of a JSONL prompts file; ValueError 'FILE:LINE: what is wrong' on the first bad line."""
    requests = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            requests.append(_parse_line(line, f"{path}:{n}", n, tokenizer, vocab_size))
    if not requests:
        raise ValueError(f"{path}: no prompts (one JSON object per line: {{\"prompt\": ...}} or {{\"token_ids\": [...]}})")
    return requests


def _parse_line(line: str, where: str, n: int, tokenizer, vocab_size: int) -> Request:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object like {{\"prompt\": \"...\"}}, got {type(obj).__name__}")
    unknown = set(obj) - _KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    if ("prompt" in obj) == ("token_ids" in obj):
        raise ValueError(f"{where}: give exactly one of \"prompt\" (text) or \"token_ids\" (a list of ints)")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise ValueError(f"{where}: \"prompt\" must be a non-empty string, got {obj['prompt']!r}")
        if tokenizer is None:
            raise ValueError(f"{where}: a text \"prompt\" needs the checkpoint's tokenizer, which this model "
                             "directory lacks; give \"token_ids\" instead")
        ids = tokenizer(obj["prompt"])["input_ids"]
    else:
        ids = obj["token_ids"]
        if (not isinstance(ids, list) or not ids
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
            raise ValueError(f"{where}: \"token_ids\" must be a non-empty list of non-negative integers")
    bad = [i for i in ids if i >= vocab_size]
    if bad:
        raise ValueError(f"{where}: token id {bad[0]} is outside the vocabulary (vocab_size={vocab_size})")
    new = obj.get("max_new_tokens")
    if new is not None and (not isinstance(new, int) or isinstance(new, bool) or new < 1):
        raise ValueError(f"{where}: \"max_new_tokens\" must be a positive integer, got {new!r}")
    return Request(ids, new, obj.get("id", n))


def parse_batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--batch-size {text!r}: give a positive integer or 'auto'")
    return int(text)


class Progress:
    """Finished sequences and generated tokens: a tqdm bar on a terminal, else a plain line every
    `every_s` seconds (and at the end) so logs stay readable."""

    def __init__(self, total: int, stream=None, every_s: float = 10.0):
        self.stream = stream or sys.stderr
        self.total, self.every_s, self.done, self.last = total, every_s, 0, 0.0
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="seq", file=self.stream)

    def update(self, run) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{run.tokens_per_s:.1f} tok/s")
            self.bar.update(1)
        elif self.done == self.total or time.perf_counter() - self.last >= self.every_s:
            self.last = time.perf_counter()
            print(f"[moesys] {self.done}/{self.total} sequences, {run.generated_tokens} tokens, "
                  f"{run.tokens_per_s:.1f} tok/s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def check_args(args) -> None:
    """Batch-mode arguments that can be wrong, checked before anything is read."""
    if args.out is None:
        raise ValueError("--prompts needs --out FILE.jsonl (where the results go)")
    parse_batch_size(args.batch_size)
    if (args.routing == "trace") != (args.routing_trace is not None):
        raise ValueError("--routing trace and --routing-trace FILE go together")
    if not Path(args.out).parent.is_dir():
        raise ValueError(f"--out {args.out}: the directory {Path(args.out).parent} does not exist")
    if args.batch_graph == "on" and (args.cuda_graph == "off" or args.exact):
        off = "--exact" if args.exact else "--cuda-graph off"
        raise ValueError(f"--batch-graph on replays the decode graph, which {off} does not build")
    if args.kv == "host" and args.exact:
        raise ValueError("--exact runs attention in its batch-invariant device kernel: the KV cache stays on the "
                         "device (drop --kv host)")


def prepare(args, model_dir: Path):
    """Batch mode before the model loads: (tokenizer or None, requests, batch size, KV place); sets
    args.max_context to what the chosen batch needs."""
    import torch
    from transformers import AutoConfig

    from moesys.offload.cli import TOKENIZER_FILES, load_tokenizer
    from moesys.offload.loader import _resolve_dtype

    check_args(args)
    has_tokenizer = any((model_dir / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = load_tokenizer(model_dir) if has_tokenizer else None
    config = AutoConfig.from_pretrained(model_dir)
    requests = read_prompts(Path(args.prompts), tokenizer, config.get_text_config().vocab_size)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and args.routing != "model" and args.cuda_graph == "on":
        # the override draws (or replays) ids on every call: a captured step would replay its first draw
        raise ValueError(f"--routing {args.routing} sets each step's experts from the host; a CUDA graph would "
                         "replay the first step's: add --cuda-graph off")
    batch_size, kv, args.max_context = choose_batch(args, config, _resolve_dtype(args.dtype, config), requests,
                                                    device)
    return tokenizer, requests, batch_size, kv


def choose_batch(args, config, dtype, requests: list[Request], device) -> tuple[int, str, int]:
    """(batch size, KV place, max_context to load with) before the model is loaded. --batch-size auto or
    --kv auto: the performance model's fastest prediction (uniform routing, or the --routing-trace
    statistics; measured copy bandwidth and FLOP/s). A device KV cache gets max_context = batch x the
    longest sequence, plus the longest prompt where the decode graph may run (--batch-graph on, or auto on a
    GPU: a joining group's prefill sits beside its fixed-shape rows; the budget then splits between that KV
    cache and the expert cache); a host one
    keeps one row's length (the per-forward context guard). A hybrid's rows each also need their recurrent
    states: max_context then covers them too (moesys.offload.cache_bytes.CacheBytes.context_for)."""
    longest = max(len(r.token_ids) + (r.max_new_tokens or args.max_new_tokens) for r in requests)
    batch, kv = parse_batch_size(args.batch_size), args.kv
    batch_auto_or_kv_auto = batch == "auto" or kv == "auto"
    if batch_auto_or_kv_auto:
        from moesys.offload import perf_model as pm

        w = pm.workload_before_load(config, dtype, args.gpu_memory, longest, args.quantize_experts, device)
        if args.routing == "trace":
            from moesys.offload.routing import load_trace

            routing = pm.RoutingStats.from_trace(load_trace(args.routing_trace)[0], w.num_experts)
        else:
            routing = pm.RoutingStats.uniform(w.num_experts, w.top_k)
        # exact mode's attention is the device kernel: its KV cache stays there
        places = ("device",) if args.exact else pm.KV_PLACES if kv == "auto" else (kv,)
        hw = pm.Hardware.measure(device)
        if batch == "auto":
            best = pm.best_plan(w, hw, routing, len(requests), longest // 2, kv_places=places)
            batch = best["batch"]
        else:  # a fixed batch size: the faster KV place at that size
            best = max((pm.predict(w, hw, routing, batch, longest // 2, k) for k in places),
                       key=lambda p: p["tokens_per_s"])
        kv = best["kv"]
        print(f"[moesys] performance model: batch size {batch}, KV cache on the {kv}, predicted "
              f"{best['tokens_per_s']:.1f} tok/s (hit rate {best['hit_rate']:.1%}, {best['slots']} expert slots)",
              file=sys.stderr)
    rows = min(batch, len(requests))
    if kv != "device":
        return batch, kv, longest
    from moesys.offload.batch_static_kv import other_cache_layers
    from moesys.offload.cache_bytes import measure

    cache = w.cache if batch_auto_or_kv_auto else measure(config, dtype)
    need = cache.context_for(rows, longest)
    graph_on = args.batch_graph == "on" or (args.batch_graph == "auto" and device.type == "cuda")
    if rows > 1 and graph_on and args.cuda_graph == "on" and not other_cache_layers(config):
        # the decode graph's fixed-shape rows keep a joining prompt's prefill cache beside them
        # (generate_batch takes the eager steps where they cannot)
        need += max(len(r.token_ids) for r in requests)
    return batch, kv, max(args.max_context, need)


def run_batch(args, model, tokenizer, requests: list[Request], batch_size: int, kv: str) -> None:
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    override = None
    if args.routing != "model":
        from moesys.offload.routing import RoutingOverride

        override = RoutingOverride(model, args.routing, seed=args.routing_seed, trace=args.routing_trace)
    run = generate_batch(model, requests, max_new_tokens=args.max_new_tokens, batch_size=batch_size, kv=kv,
                         graph={"on": True, "off": False, "auto": "auto"}[args.batch_graph],
                         bookkeeping=args.bookkeeping)
    progress = Progress(len(requests))
    with open(partial, "w", encoding="utf-8") as f:
        for result in run:
            record = {"id": result.id, "index": result.index, "token_ids": result.token_ids,
                      "finish_reason": result.finish_reason, "prompt_tokens": len(result.prompt_ids)}
            if tokenizer is not None:
                record["text"] = tokenizer.decode(result.token_ids)
            f.write(json.dumps(record) + "\n")
            f.flush()
            progress.update(run)
    progress.close()
    os.replace(partial, out)
    if override is not None:
        override.remove()
    print(f"[moesys] {len(requests)} sequences, {run.generated_tokens} tokens in {run.elapsed_s:.2f} s: "
          f"{run.tokens_per_s:.2f} tok/s at batch size {run.batch_size} ({run.decode_steps} decode steps, "
          f"{run.prefills} prefills, KV cache on the {kv}) -> {out}", flush=True)

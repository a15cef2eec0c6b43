"""`moesys upcycle` and `moesys.upcycle(...)`: turn a dense Hugging Face checkpoint (Llama, Mistral,
Qwen2, Qwen3) into a Mixtral, Qwen2-MoE or Qwen3-MoE checkpoint whose logits start equal to the dense
model's.

plan.py is the pure conversion (config dict + tensor shapes -> target config + output tensor list),
io.py reads and writes safetensors, streamed; this file wires them to the API and the command line.
Nothing here unpickles or runs remote code: configs are JSON read into transformers' own config
classes, weights are safetensors only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

from moesys.upcycling.plan import (ROUTER_INITS, SOURCES, TARGETS, Plan, UpcycleOptions, check_source_tensors,
                                   plan_upcycle, upcycle_state_dict)

__all__ = ["upcycle", "UpcycleOptions", "UpcycleResult", "plan_upcycle", "upcycle_state_dict", "add_arguments", "run"]

# Copied verbatim when present; weights and config are written by us.
_AUX_PATTERNS = ("generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                 "vocab.txt", "merges.txt", "chat_template*", "*.tiktoken")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")


@dataclasses.dataclass
class UpcycleResult:
    out_dir: Path
    config: dict
    files: list[str]
    bytes_written: int
    function_preserving: bool
    notes: list[str]
    peak_held_bytes: int


def load_dense_config(dense_dir: Path) -> dict:
    """config.json as a full dict (every default filled in by transformers' config class), so the
    target gets explicit values even where the two classes' defaults differ (e.g. rope_theta)."""
    path = dense_dir / "config.json"
    if not dense_dir.is_dir():
        raise ValueError(f"dense checkpoint directory {dense_dir} does not exist")
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing; a dense Hugging Face checkpoint needs its config.json") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    mt = raw.get("model_type")
    if mt not in SOURCES:
        arch = raw.get("architectures")
        raise ValueError(f"unsupported dense architecture model_type={mt!r} (architectures={arch}); "
                         f"supported: {', '.join(SOURCES)}")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        full = CONFIG_MAPPING[mt].from_dict(raw).to_dict()
    except Exception as e:  # transformers' validation raises several types; all mean a bad config.json
        raise ValueError(f"{path}: transformers rejects this {mt} config: {e}") from e
    for k in ("id2label", "label2id"):  # to_dict always writes these; keep them only if config.json had them
        if k not in raw:
            full.pop(k, None)
    return full


def upcycle(dense_dir: str | Path, out_dir: str | Path, *, num_experts: int, top_k: int, target: str | None = None,
            granularity: int = 1, moe_layers: str | list[int] = "all", router_init: str = "normal",
            router_std: float | None = None, drop_ratio: float = 0.0, shared_expert: bool | None = None,
            norm_topk_prob: bool = True, seed: int = 0, overwrite: bool = False, max_shard_size: int | str = "5GB",
            memory_budget: int | str = "256MiB", progress: bool = True) -> UpcycleResult:
    """Upcycle the dense checkpoint in `dense_dir` into an MoE checkpoint at `out_dir`.

    Every input is validated before anything is written; the output appears at `out_dir` only when
    complete. `memory_budget` bounds the produced tensor bytes held before they are written (peak
    memory is about that plus the largest single tensor). Raises ValueError for bad input."""
    from tqdm.auto import tqdm

    from moesys.upcycling.io import ShardWriter, SourceReader, atomic_output_dir, parse_bytes, source_tensors

    from moesys.hub import resolve_model_dir

    dense_dir, out_dir = resolve_model_dir(dense_dir, what="dense checkpoint"), Path(out_dir)
    src = load_dense_config(dense_dir)
    where, shapes = source_tensors(dense_dir)
    check_source_tensors(src, shapes)
    opts = UpcycleOptions(num_experts=num_experts, top_k=top_k, target=target, granularity=granularity,
                          moe_layers=moe_layers if isinstance(moe_layers, str) else tuple(moe_layers),
                          router_init=router_init, router_std=router_std, drop_ratio=drop_ratio,
                          shared_expert=shared_expert, norm_topk_prob=norm_topk_prob, seed=seed)
    plan: Plan = plan_upcycle(src, shapes, opts)
    budget, max_shard = parse_bytes(memory_budget), parse_bytes(max_shard_size)
    if out_dir.resolve() == dense_dir.resolve():
        raise ValueError(f"OUT_DIR {out_dir} is the dense checkpoint itself; choose another directory")
    for note in plan.notes:
        print(f"moesys upcycle: note: {note}", file=sys.stderr)

    total = sum(t.nbytes for t in plan.tensors)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
        for pattern in _AUX_PATTERNS:
            for f in sorted(dense_dir.glob(pattern)):
                if f.is_file() and f.suffix not in _PICKLE_SUFFIXES:
                    shutil.copy2(f, tmp / f.name)
        with tqdm(total=total, unit="B", unit_scale=True, desc="upcycle", disable=not progress) as bar:
            writer = ShardWriter(budget, progress=bar.update)
            files = writer.write(tmp, plan.tensors, SourceReader(where), max_shard)
        provenance = {"source": str(dense_dir), "options": dataclasses.asdict(opts),
                      "target": plan.config["model_type"], "moe_layers": plan.moe_layers,
                      "function_preserving": plan.function_preserving, "notes": plan.notes}
        (tmp / "upcycling.json").write_text(json.dumps(provenance, indent=2, default=list) + "\n")
    return UpcycleResult(out_dir, plan.config, files, total, plan.function_preserving, plan.notes,
                         writer.peak_held_bytes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dense_dir", metavar="DENSE_DIR",
                        help="dense HF checkpoint directory (config.json + safetensors), or a hub id org/name "
                             "resolved through the Hugging Face cache")
    parser.add_argument("out_dir", metavar="OUT_DIR",
                        help="where the MoE checkpoint goes (must not exist unless --overwrite)")
    parser.add_argument("--num-experts", type=int, required=True, help="routed experts per MoE layer")
    parser.add_argument("--top-k", type=int, required=True, help="experts per token")
    parser.add_argument("--target", choices=TARGETS, default=None,
                        help="output architecture (None: mixtral for llama/mistral, qwen2_moe for qwen2, "
                             "qwen3_moe for qwen3)")
    parser.add_argument("--granularity", type=int, default=1,
                        help="split each dense copy into G experts of intermediate/G (G must divide top-k, "
                             "num-experts and the intermediate size)")
    parser.add_argument("--moe-layers", default="all",
                        help="all | every-other | comma list of layer ids; the rest stay dense")
    parser.add_argument("--router-init", choices=ROUTER_INITS, default="normal",
                        help="router weight init")
    parser.add_argument("--router-std", type=float, default=None,
                        help="std of --router-init normal (None: the config's initializer_range)")
    parser.add_argument("--drop-ratio", type=float, default=0.0,
                        help="drop-upcycling: re-initialise this fraction of each expert's neurons "
                             "(not function preserving)")
    parser.add_argument("--shared-expert", action="store_true", default=None,
                        help="add a shared expert (Qwen2-MoE; implies --target qwen2_moe). Without it the "
                             "target decides: qwen2_moe always has one, mixtral and qwen3_moe none")
    parser.add_argument("--no-norm-topk", dest="norm_topk_prob", action="store_false",
                        help="softmax without top-k renormalisation (qwen targets; function preserving only "
                             "with --router-init zeros)")
    parser.add_argument("--seed", type=int, default=0, help="seed for router and drop-upcycling init")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard")
    parser.add_argument("--memory-budget", default="256MiB",
                        help="produced tensor bytes held before writing them out (peak memory is about this "
                             "plus the largest tensor and torch itself)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """A ValueError is reported by cli.guarded: one line, exit code 2."""
    result = upcycle(args.dense_dir, args.out_dir, num_experts=args.num_experts, top_k=args.top_k,
                     target=args.target, granularity=args.granularity, moe_layers=args.moe_layers,
                     router_init=args.router_init, router_std=args.router_std, drop_ratio=args.drop_ratio,
                     shared_expert=args.shared_expert, norm_topk_prob=args.norm_topk_prob, seed=args.seed,
                     overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                     memory_budget=args.memory_budget, progress=args.progress)
    kind = "function preserving" if result.function_preserving else "NOT function preserving (see notes above)"
    print(f"wrote {result.config['architectures'][0]} to {result.out_dir}: {len(result.files)} shard(s), "
          f"{result.bytes_written / 1e6:,.1f} MB, {kind}")
    return 0

"""Benchmark `moesys upcycle` on a Llama-3.2-1B-shaped random bf16 checkpoint (CPU, disk bound).

Compares the wall time of `moesys.upcycle(...)` to 8 experts (fsync'd output; the time includes
importing transformers for the config classes, about 4 s here) with `cp -r` of the output directory
followed by `sync`, i.e. copying the same number of bytes; best of --repeats alternating runs. Reports
the upcycler's peak RSS (VmHWM of a child process, which includes torch itself). Writes the records to
bench/results/upcycle.json and prints a Markdown table row.

    python bench/upcycle.py [--workdir /work/tmp_upcycle_bench] [--layers 16] [--experts 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from run_meta import git_sha

ROOT = Path(__file__).resolve().parent.parent

# VmHWM, not ru_maxrss: after fork+exec, ru_maxrss still counts the parent's pages at fork time.
CHILD = r"""
import json, sys, time
import moesys

def hwm_gb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20

rss0 = hwm_gb()
t = time.perf_counter()
r = moesys.upcycle(sys.argv[1], sys.argv[2], num_experts=int(sys.argv[3]), top_k=int(sys.argv[4]),
                   granularity=int(sys.argv[5]), target=sys.argv[6] or None, progress=False)
wall = time.perf_counter() - t
print(json.dumps({"wall_s": wall, "bytes": r.bytes_written, "files": r.files,
                  "peak_rss_gb": hwm_gb(), "rss_before_gb": rss0}))
"""


def make_dense(path: Path, layers: int) -> dict:
    """A Llama-3.2-1B-shaped bf16 checkpoint filled from one tiled random block (one normal_ per
    tensor would dominate the benchmark's setup time)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                      max_position_embeddings=131072, dtype="bfloat16",
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    path.mkdir(parents=True)
    cfg.to_json_file(path / "config.json")
    block = (torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)

    def fill(*shape):
        n = math.prod(shape)
        return block.repeat(-(-n // block.numel()))[:n].reshape(shape).clone()

    H, I, kv = 2048, 8192, 8 * 64
    sd = {"model.embed_tokens.weight": fill(128256, H), "model.norm.weight": torch.ones(H, dtype=torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}"
        sd.update({f"{p}.input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
                   f"{p}.post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
                   f"{p}.self_attn.q_proj.weight": fill(H, H), f"{p}.self_attn.k_proj.weight": fill(kv, H),
                   f"{p}.self_attn.v_proj.weight": fill(kv, H), f"{p}.self_attn.o_proj.weight": fill(H, H),
                   f"{p}.mlp.gate_proj.weight": fill(I, H), f"{p}.mlp.up_proj.weight": fill(I, H),
                   f"{p}.mlp.down_proj.weight": fill(H, I)})
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    return {"hidden": H, "intermediate": I, "layers": layers, "heads": 32, "kv_heads": 8, "vocab": 128256,
            "dtype": "bfloat16", "tied_embeddings": True}


def _settle() -> None:
    subprocess.run(["sync"], check=True)
    time.sleep(5)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    return platform.processor()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=ROOT.parent / "tmp_upcycle_bench")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--granularity", type=int, default=1)
    ap.add_argument("--target", default=None, help="default: mixtral")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "upcycle.json")
    args = ap.parse_args()
    import torch

    work = args.workdir
    if work.exists():
        shutil.rmtree(work)
    try:
        shape = make_dense(work / "dense", args.layers)
        shape.update(experts=args.experts, top_k=args.top_k, granularity=args.granularity,
                     target=args.target or "mixtral")
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        ups, cps = [], []
        # Alternate the two and keep the best of each: the disk's speed drifts (writeback of earlier
        # files, discards after deletes), and a single pair of samples can be off by 2x.
        for _ in range(args.repeats):
            _settle()
            t = time.perf_counter()
            child = subprocess.run([sys.executable, "-c", CHILD, str(work / "dense"), str(work / "moe"),
                                    str(args.experts), str(args.top_k), str(args.granularity), args.target or ""],
                                   capture_output=True, text=True, env=env, check=True)
            up = json.loads(child.stdout.strip().splitlines()[-1])
            up["process_wall_s"] = time.perf_counter() - t
            ups.append(up)
            _settle()
            t = time.perf_counter()
            subprocess.run(["cp", "-r", str(work / "moe"), str(work / "moe_copy")], check=True)
            subprocess.run(["sync"], check=True)
            cps.append(time.perf_counter() - t)
            shutil.rmtree(work / "moe_copy")
            shutil.rmtree(work / "moe")
        up = min(ups, key=lambda u: u["wall_s"])
        up["peak_rss_gb"] = max(u["peak_rss_gb"] for u in ups)
        cp_s = min(cps)
        total_s = up["process_wall_s"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    common = {"bench": "upcycle", "shape": shape, "bytes": up["bytes"], "device": cpu_model(),
              "torch": torch.__version__, "triton": None,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "git_sha": git_sha()}
    records = [
        {**common, "impl": "moesys.upcycle" + (f" G={args.granularity}" if args.granularity > 1 else "")
         + (f" {args.target}" if args.target else ""), "wall_s": round(up["wall_s"], 2), "cp_s": round(cp_s, 2),
         "vs_cp": round(up["wall_s"] / cp_s, 2), "process_wall_s": round(total_s, 2),
         "peak_rss_gb": round(up["peak_rss_gb"], 2), "rss_before_gb": round(up["rss_before_gb"], 2),
         "samples_wall_s": [round(u["wall_s"], 2) for u in ups]},
        {**common, "impl": "cp -r + sync", "wall_s": round(cp_s, 2), "cp_s": round(cp_s, 2), "peak_rss_gb": None,
         "samples_wall_s": [round(c, 2) for c in cps]},
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=2) + "\n")
    r = records[0]
    print(f"| {args.layers} layers -> {args.experts} experts, {r['impl']} | {r['bytes'] / 1e9:.1f} GB | "
          f"{r['wall_s']:.1f} s | {cp_s:.1f} s | {r['vs_cp']:.2f}x | {r['peak_rss_gb']:.2f} GB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

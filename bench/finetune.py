"""Fine-tuning throughput from a Hugging Face checkpoint on one GPU (issue 22), side by side in one run:
- moesys_init_from: `model.init_from: DIR`, the moesys model, its real trainer as configs/small.yaml runs it
  (bf16 autocast over fp32 master weights, torch.compile reduce-overhead, grouped_mm experts);
- moesys_init_from_bf16: the same with `train.param_dtype: bfloat16` (pure bf16: parameters, gradients and
  AdamW state in bf16, the baseline's precision);
- moesys_init_from_triton, moesys_init_from_bf16_triton: the two rows above with Triton experts;
- moesys_hf_model:  `model.hf_model: DIR`, transformers' own OlmoeForCausalLM with moesys experts, the same
  trainer (its decoder layers compiled, default mode; Triton experts);
- hf_grouped_mm:    transformers alone, OlmoeForCausalLM.from_pretrained(experts_implementation="grouped_mm"),
  a plain loop in pure bf16 (the reference setup of bench/train_small.py).

The checkpoint is OLMoE-1B-7B-shaped (hidden 2048, 64 experts of 1024, top-8, 16 heads, vocab 50304, q/k norm
over all heads) with --layers of its 16 layers (8 by default, so that fp32 master weights and AdamW state fit
beside the activations), random weights saved to disk in bf16. Load time = from_pretrained / build_model from
files evicted from the page cache (posix_fadvise DONTNEED), to the model on the GPU.
Correctness in the same run: step-0 logits of both moesys models against transformers' on one batch, all in
fp32 (relative L2 error; row `correctness`); and in pure bf16 (row `correctness_bf16`): the moesys model with
bf16 parameters under bf16 autocast, as the bf16 row trains it, and transformers' bf16 model, each against
transformers' fp32 logits, so moesys's bf16 error can be read beside transformers' own.

    PYTHONPATH=. python bench/finetune.py --out bench/results/finetune.json
    PYTHONPATH=. python bench/finetune.py --only moesys_init_from,moesys_init_from_bf16,hf_grouped_mm  # some rows
    PYTHONPATH=. python bench/finetune.py --cpu-smoke --out /tmp/finetune.json    # checks the script only
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from moesys.config import load_config
from moesys.hf.resolve import resolve_init_from
from moesys.models.transformer import MoETransformer
from moesys.parallel import bootstrap
from moesys.train_metrics import flops_per_token, peak_flops
from run_meta import run_meta
from train_small import _sync, bench_moesys, hf_train_loop, profile_moesys, run_impls, write_records

REPO = Path(__file__).resolve().parents[1]
ROWS = ("correctness", "correctness_bf16", "moesys_init_from", "moesys_init_from_bf16", "moesys_init_from_triton",
        "moesys_init_from_bf16_triton", "moesys_hf_model", "hf_grouped_mm")


def olmoe_config(layers: int, smoke: bool):
    from transformers import OlmoeConfig
    if smoke:
        return OlmoeConfig(vocab_size=512, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=256, tie_word_embeddings=False)
    return OlmoeConfig(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                       max_position_embeddings=4096, tie_word_embeddings=False, rope_theta=10000.0)


def write_checkpoint(path: Path, cfg, device: torch.device) -> int:
    from transformers import OlmoeForCausalLM
    torch.manual_seed(0)
    with device:
        model = OlmoeForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    del model
    return n


def evict(path: Path) -> None:
    """Drop the checkpoint's pages from the page cache, so a load reads the disk."""
    for f in path.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def moesys_config(ckpt: Path, key: str, smoke: bool, extra: list[str]):
    overrides = [f"model.{key}={ckpt}", "log.progress_bar=false", "log.tensorboard=false", "log.val_every=0",
                 "checkpoint.save_final=false", "checkpoint.every=0", "data.max_tokens=4000000",
                 "data.seq_len=128" if smoke else "data.seq_len=2048", "data.batch_size=8",
                 "train.warmup_steps=0", *extra]
    if smoke:
        overrides.append("train.device=cpu")
    config = resolve_init_from(load_config(REPO / "configs" / "finetune.yaml", overrides))
    if config.model.hf_model is not None:
        from moesys.models.hf_source import resolve_config
        config = resolve_config(config)
    return config


def load_moesys(config, ckpt: Path):
    """(model, seconds) with build_model's own loading path, from an evicted page cache."""
    from moesys.train import build_model
    evict(ckpt)
    ctx = bootstrap.init_distributed(config)
    _sync(ctx.device)
    t0 = time.perf_counter()
    model, *_ = build_model(config, ctx)
    _sync(ctx.device)
    return model, time.perf_counter() - t0


def load_hf(ckpt: Path, device: torch.device, dtype, impl: str):
    from transformers import OlmoeForCausalLM
    evict(ckpt)
    _sync(device)
    t0 = time.perf_counter()
    placement = {"device_map": str(device)} if device.type == "cuda" else {}  # device_map needs accelerate
    model = OlmoeForCausalLM.from_pretrained(ckpt, dtype=dtype, experts_implementation=impl, **placement)
    _sync(device)
    return model, time.perf_counter() - t0


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reference_logits(ckpt: Path, device: torch.device, vocab: int, smoke: bool):
    """(input ids, transformers' fp32 eager logits) of one batch."""
    ids = torch.randint(0, vocab, (1, 64 if smoke else 512), generator=torch.Generator().manual_seed(1)).to(device)
    ref_model, _ = load_hf(ckpt, device, torch.float32, "eager")
    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits.float()
    del ref_model
    _free(device)
    return ids, ref


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).norm() / ref.norm()).item()


def correctness(ckpt: Path, device: torch.device, vocab: int, smoke: bool) -> dict:
    """Relative L2 error of step-0 logits, fp32, both moesys models against transformers'."""
    ids, ref = _reference_logits(ckpt, device, vocab, smoke)
    out = {}
    for key, extra in (("init_from", ["moe.backend=grouped_mm"]), ("hf_model", [])):
        model, _ = load_moesys(moesys_config(ckpt, key, smoke, extra), ckpt)  # fp32 master weights
        with torch.no_grad():
            out[f"rel_err_logits_{key}"] = _rel_err(model(ids).logits, ref)
        del model
        _free(device)
    return out


def correctness_bf16(ckpt: Path, device: torch.device, vocab: int, smoke: bool) -> dict:
    """Relative L2 error of step-0 logits against transformers' fp32 ones: the init_from model with bf16
    parameters under bf16 autocast (as the pure-bf16 row computes), and transformers' bf16 model (as the
    baseline computes)."""
    ids, ref = _reference_logits(ckpt, device, vocab, smoke)
    config = moesys_config(ckpt, "init_from", smoke, ["moe.backend=grouped_mm", "train.param_dtype=bfloat16"])
    model, _ = load_moesys(config, ckpt)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        out = {"rel_err_logits_init_from_bf16": _rel_err(model(ids).logits, ref)}
    del model
    _free(device)
    hf_model, _ = load_hf(ckpt, device, torch.bfloat16, "grouped_mm")
    with torch.no_grad():
        out["rel_err_logits_hf_bf16"] = _rel_err(hf_model(input_ids=ids).logits, ref)
    del hf_model
    _free(device)
    return out


def bench_hf_loop(ckpt: Path, config, device: torch.device, warmup: int, steps: int) -> dict:
    model, load_s = load_hf(ckpt, device, torch.bfloat16, "grouped_mm")
    model.config.output_router_logits = True  # the load-balancing loss, as moesys adds it
    model.config.router_aux_loss_coef = config.moe.aux_loss_coef
    return {"load_s": load_s, **hf_train_loop(model, config, device, warmup, steps)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8, help="OLMoE-shaped layers (the real model has 16)")
    p.add_argument("--steps", type=int, default=30, help="moesys steps (the first log window is warm-up)")
    p.add_argument("--hf-steps", type=int, default=12)
    p.add_argument("--skip", action="append", default=[], help=f"row to skip (repeatable): {', '.join(ROWS)}")
    p.add_argument("--only", default=None, metavar="ROW,ROW",
                   help="run only these rows, comma-separated (e.g. moesys_init_from,moesys_init_from_bf16,"
                        "hf_grouped_mm: the fp32-master and pure-bf16 rows beside the baseline)")
    p.add_argument("--workdir", default=None, help="where the checkpoint is written (default: a temp dir)")
    p.add_argument("--out", default=None)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (checks the script, not speed)")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="only profile two init_from steps (as configured for the moesys_init_from row, or with "
                        "--profile-param-dtype bfloat16 the moesys_init_from_bf16 row) and write "
                        "the kernel table to FILE")
    p.add_argument("--profile-param-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="train.param_dtype of the --profile run")
    p.add_argument("--profile-backend", choices=("grouped_mm", "triton"), default="grouped_mm",
                   help="moe.backend of the --profile run")
    args = p.parse_args()
    skip = set(args.skip)
    if args.only is not None:
        only = {r.strip() for r in args.only.split(",") if r.strip()}
        unknown = sorted(only - set(ROWS))
        if unknown:
            p.error(f"--only: unknown row(s) {unknown}; the rows are {list(ROWS)}")
        skip |= set(ROWS) - only
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("bench/finetune.py needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    steps = 4 if args.cpu_smoke else args.steps
    hf_steps = 2 if args.cpu_smoke else args.hf_steps
    log_every = 2 if args.cpu_smoke else 5
    cfg = olmoe_config(args.layers, args.cpu_smoke)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        ckpt = Path(tmp) / "olmoe"
        t0 = time.perf_counter()
        n_params = write_checkpoint(ckpt, cfg, device)
        write_s = time.perf_counter() - t0
        print(f"checkpoint: {n_params / 1e9:.2f}B parameters, written in {write_s:.1f} s", flush=True)
        base_config = moesys_config(ckpt, "init_from", args.cpu_smoke, [])
        with torch.device("meta"):
            meta = MoETransformer.from_config(base_config)
        flops_tok = flops_per_token(meta, base_config)
        peak = peak_flops(device, base_config.log.peak_tflops)
        shape = {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "experts": cfg.num_experts,
                 "expert_ffn": cfg.intermediate_size, "top_k": cfg.num_experts_per_tok, "vocab": cfg.vocab_size,
                 "batch": base_config.data.batch_size, "seq_len": base_config.data.seq_len,
                 "total_params": n_params, "active_params": meta.num_params(active=True)}
        common = {"bench": "finetune", "shape": shape, "world_size": 1, "flops_per_token": flops_tok,
                  "optimizer": "AdamW, grad clip 1.0", **run_meta()}
        small = ["train.compile=true", "train.compile_mode=reduce-overhead", "moe.backend=grouped_mm"]
        small_triton = small[:-1] + ["moe.backend=triton"]
        if args.profile:
            backend = [] if args.cpu_smoke else small[:-1] + [f"moe.backend={args.profile_backend}"]
            extra = backend + [f"train.param_dtype={args.profile_param_dtype}"]
            profile_moesys(moesys_config(ckpt, "init_from", args.cpu_smoke, extra), device, Path(args.profile))
            return 0

        def moesys_run(key, extra):
            config = moesys_config(ckpt, key, args.cpu_smoke, extra)
            model, load_s = load_moesys(config, ckpt)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return {"load_s": load_s, **bench_moesys(config, steps, log_every)}

        bf16 = ["train.param_dtype=bfloat16"]
        runs = [("correctness", lambda: correctness(ckpt, device, cfg.vocab_size, args.cpu_smoke)),
                ("correctness_bf16", lambda: correctness_bf16(ckpt, device, cfg.vocab_size, args.cpu_smoke)),
                ("moesys_init_from", lambda: moesys_run("init_from", [] if args.cpu_smoke else small)),
                ("moesys_init_from_bf16", lambda: moesys_run("init_from", bf16 if args.cpu_smoke else small + bf16)),
                ("moesys_init_from_triton", lambda: moesys_run("init_from", [] if args.cpu_smoke else small_triton)),
                ("moesys_init_from_bf16_triton", lambda: moesys_run(
                    "init_from", bf16 if args.cpu_smoke else small_triton + bf16)),
                ("moesys_hf_model", lambda: moesys_run(
                    "hf_model", [] if args.cpu_smoke else ["moe.backend=triton", "train.compile=true"])),
                ("hf_grouped_mm", lambda: bench_hf_loop(ckpt, base_config, device, 1 if args.cpu_smoke else 3,
                                                        hf_steps))]
        assert [impl for impl, _ in runs] == list(ROWS)
        records = run_impls(runs, skip, {**common, "checkpoint_write_s": write_s}, flops_tok, peak, device)
    base = next((r for r in records if r["impl"] == "hf_grouped_mm" and "tokens_per_s" in r), None)
    for r in records:
        if base is not None and "tokens_per_s" in r:
            r["speedup_vs_hf_grouped_mm"] = r["tokens_per_s"] / base["tokens_per_s"]
    if args.out:
        write_records(records, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The DeepSpeed JSON of `train.engine: deepspeed`: read it, refuse what moesys cannot honour, and fill the
values moesys owns from the moesys config so that the two cannot disagree.

Filled from moesys (a value the JSON leaves out or sets to "auto"; a different explicit value is an
error naming both): `train_micro_batch_size_per_gpu` = data.batch_size, `gradient_accumulation_steps`
= train.grad_accum, `train_batch_size` = their product times the world size, `gradient_clipping` =
train.grad_clip, `gradient_allreduce_op` = "sum" at one rank (DeepSpeed's mean divides every gradient by 1
there), `bf16.enabled` = whether moesys trains in bf16 (train.dtype bfloat16, or auto on a GPU) and
the JSON does not turn on `torch_autocast` (fp32 parameters under autocast, the torch engine's precision).
Refused: FSSDP placement (parallel.expert_sharding fssdp/fsdp re-shards experts between steps), ZeRO
stage 0 and 3 (stage 3 would partition the experts that moesys places itself), fp16 (moesys has no loss
scaling), `optimizer` / `scheduler` sections (moesys builds AdamW and the warmup + cosine schedule from
train.*), ZeRO-Offload, and the ZeRO-2 switches DeepSpeed's MoE support needs on.

No DeepSpeed import here: the file is checked before any process starts, and `require_deepspeed` says
how to install the extra when it is missing.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[2]
_QUIET_STEPS = 1_000_000_000  # DeepSpeed's own progress lines: moesys logs the metrics itself


def require_deepspeed() -> None:
    try:
        importlib.import_module("deepspeed")
    except ImportError as e:
        raise ValueError(f"train.engine=deepspeed but DeepSpeed cannot be imported ({e}); "
                         "pip install 'moesys[deepspeed]', or set train.engine=torch") from None


def find_config_file(path: str) -> Path:
    """A relative path is looked up in the working directory, then in the moesys checkout."""
    p = Path(path)
    for candidate in (p,) if p.is_absolute() else (p, _REPO / p):
        if candidate.is_file():
            return candidate
    raise ValueError(f"train.deepspeed_config={path!r}: no such file (relative paths are tried in the working "
                     f"directory and in {_REPO}); point it at a DeepSpeed JSON such as "
                     "configs/deepspeed_zero2_bf16.json")


def trains_in_bf16(config) -> bool:
    """moesys's own precision rule (moesys.train.autocast_context) without a device in hand."""
    t = config.train
    on_gpu = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    return t.dtype == "bfloat16" or (t.dtype == "auto" and on_gpu)


def _fill(ds: dict, key: str, value, moesys_key: str, where: str) -> None:
    """ds[key] = value unless the JSON sets a different explicit value (then the error names both)."""
    given = ds.get(key, "auto")
    if given != "auto" and given != value:
        raise ValueError(f"{where}: {key}={given!r} contradicts {moesys_key} (which gives {value!r}); remove "
                         f"{key} from the JSON or set it to \"auto\" (moesys fills it), or change {moesys_key}")
    ds[key] = value


_BF16_NAMES = ("bfloat16", "bf16", "torch.bfloat16")


def _torch_autocast(ds: dict, config, where: str) -> bool:
    """Whether DeepSpeed runs in its `torch_autocast` mode: fp32 parameters, masters and AdamW state, the
    forward under torch.autocast(bfloat16): the precision of moesys's torch engine, where bf16 mode casts
    the parameters themselves. A JSON with a `torch_autocast` section asks for it; `enabled` "auto" (or
    left out) follows moesys's precision as `bf16.enabled` does (autocast when moesys trains in bf16, off
    in fp32), true in an fp32 run is a contradiction. The dtype must be bfloat16 (moesys has no fp16 loss
    scaling). The section is completed in `ds`: `lower_precision_safe_modules` defaults to none, so
    gradients are reduced in fp32 as the torch engine reduces them (DeepSpeed's default reduces nn.Linear
    gradients in the autocast dtype)."""
    section = ds.get("torch_autocast")
    if section is None:
        return False
    section = dict(section)
    dtype = section.get("dtype", "bfloat16")
    if str(dtype) not in _BF16_NAMES:
        raise ValueError(f"{where}: torch_autocast.dtype={dtype!r}; moesys trains in bfloat16 without loss scaling: "
                         "set it to \"bfloat16\"")
    t = config.train
    _fill(section, "enabled", trains_in_bf16(config), f"train.dtype={t.dtype!r} (device {t.device!r})",
          f"{where} torch_autocast")
    section.update(dtype="bfloat16")
    section.setdefault("lower_precision_safe_modules", [])
    ds["torch_autocast"] = section
    return section["enabled"]


def resolve_deepspeed_config(config, world_size: int | None = None) -> dict:
    """The DeepSpeed config dict for `config` (a moesys Config with train.engine=deepspeed); ValueError,
    naming the file and the values, for anything moesys refuses. `world_size` None skips the check of
    train_batch_size (before the processes exist)."""
    sharding = config.parallel.expert_sharding
    if sharding != "ep":
        raise ValueError(f"train.engine=deepspeed with parallel.expert_sharding={sharding!r}: FSSDP re-shards experts "
                         "and their optimizer state between steps, which ZeRO's flat partitions cannot follow; use "
                         "parallel.expert_sharding=ep (any parallel.ep) or train.engine=torch")
    path = find_config_file(config.train.deepspeed_config)
    where = f"train.deepspeed_config={str(path)!r}"
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(ds, dict):
        raise ValueError(f"{where}: the top level must be a JSON object, got {type(ds).__name__}")
    for section, owner in (("optimizer", "train.lr, train.betas, train.eps, train.weight_decay"),
                           ("scheduler", "train.lr, train.warmup_steps, train.min_lr_ratio")):
        if section in ds:
            raise ValueError(f"{where}: remove the {section!r} section; moesys builds AdamW and its warmup + cosine "
                             f"schedule from {owner}")
    if (ds.get("fp16") or {}).get("enabled") not in (None, False, "auto"):
        raise ValueError(f"{where}: fp16.enabled=true; moesys trains in bf16 or fp32 without loss scaling: "
                         "remove the fp16 section (bf16 is filled from train.dtype)")
    zero = ds.get("zero_optimization")
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (1, 2):
        raise ValueError(f"{where}: zero_optimization.stage={stage!r}; train.engine=deepspeed runs ZeRO stage 1 or 2 "
                         "(stage 3 would partition the experts that moesys places itself over the expert-parallel "
                         "ranks)")
    for key in ("offload_optimizer", "offload_param"):
        if (zero.get(key) or {}).get("device", "none") != "none":
            raise ValueError(f"{where}: zero_optimization.{key} offloads to {zero[key]['device']!r}; ZeRO-Offload "
                             "needs DeepSpeed's CPU Adam, moesys passes its own AdamW: remove it")
    if stage == 2:
        for key in ("contiguous_gradients", "reduce_scatter"):
            if zero.get(key, True) is not True:
                raise ValueError(f"{where}: zero_optimization.{key}={zero[key]!r}; DeepSpeed's ZeRO-2 needs it true "
                                 "for MoE parameter groups")
    t = config.train
    _fill(ds, "train_micro_batch_size_per_gpu", config.data.batch_size, "data.batch_size", where)
    _fill(ds, "gradient_accumulation_steps", t.grad_accum, "train.grad_accum", where)
    if world_size is not None:
        _fill(ds, "train_batch_size", config.data.batch_size * t.grad_accum * world_size,
              f"data.batch_size x train.grad_accum x {world_size} ranks", where)
    _fill(ds, "gradient_clipping", t.grad_clip, "train.grad_clip", where)
    autocast = _torch_autocast(ds, config, where)
    bf16 = dict(ds.get("bf16") or {})
    # torch_autocast keeps the parameters fp32 (bf16 parameters would be a second, contradicting precision)
    _fill(bf16, "enabled", trains_in_bf16(config) and not autocast,
          f"train.dtype={t.dtype!r} (device {t.device!r})" + (" with torch_autocast on" if autocast else ""),
          f"{where} bf16")
    ds["bf16"] = bf16
    ds.setdefault("steps_per_print", _QUIET_STEPS)
    if world_size == 1:
        # DeepSpeed's default mean divides every gradient bucket by the data-parallel size, at one rank too: a
        # pass over all gradients each step (part of ZeRO's 1.9 ms of multiplies in an H100 step,
        # bench/results/train_small_deepspeed_profile_h100_fd052fb.txt); over one rank the sum is the mean
        ds.setdefault("gradient_allreduce_op", "sum")
    return ds

"""Training metrics: model FLOPs per token and MFU, expert-load statistics over a logging window, and
the writer of `metrics.jsonl` and TensorBoard logs in the run directory.

FLOPs per token follow the PaLM/torchtitan convention: 6 x (active parameters that multiply a
token: all but the input embedding, top_k of num_experts experts per MoE layer) plus attention's
12 x layers x heads x head_dim x seq_len. MFU divides achieved FLOP/s by the device's dense bf16 peak.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from moesys.config import Config

# Dense bf16 peak FLOP/s by device-name substring (first match wins).
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12),
                   ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("B200", 2250e12))


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_BF16_FLOPS if key in name), None)


def flops_per_token(model: torch.nn.Module, config: Config) -> float:
    m = config.model
    active = model.num_params(active=True)
    if not m.tie_embeddings:
        active -= model.embed.weight.numel()  # a lookup, not a matmul (tied: it is the lm_head's matmul)
    head_dim = m.head_dim or m.hidden_size // m.num_heads
    attention = 12 * m.num_layers * m.num_heads * head_dim * config.data.seq_len
    return 6.0 * active + attention


def expert_load_stats(load_LE: torch.Tensor, dropped_L: torch.Tensor) -> dict:
    """Per MoE layer: max/mean load, coefficient of variation, the load fractions per expert and the
    dropped fraction; `load_LE` counts routed assignments."""
    if load_LE.numel() == 0:
        return {}
    load_LE = load_LE.double().cpu()
    mean_L = load_LE.mean(1).clamp_min(1e-12)
    return {
        "expert_load_max_mean": (load_LE.max(1).values / mean_L).tolist(),
        "expert_load_cv": (load_LE.std(1, unbiased=False) / mean_L).tolist(),
        "expert_load_fraction": (load_LE / load_LE.sum(1, keepdim=True).clamp_min(1e-12)).tolist(),
        "dropped_fraction": dropped_L.double().cpu().tolist(),
    }


class MetricsWindow:
    """The steps since the last log line: their routed load summed and their dropped fraction averaged
    (device tensors, added without a sync), and their wall time, from which tokens/s comes."""

    def __init__(self, num_layers: int, num_experts: int, device: torch.device, divisor: int):
        self.divisor = divisor  # micro-batches x ranks: a step's dropped-fraction sum becomes its mean
        self.load_LE = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device)
        self.dropped_L = torch.zeros(num_layers, dtype=torch.float64, device=device)
        self.reset()

    def reset(self) -> None:
        self.load_LE.zero_()
        self.dropped_L.zero_()
        self.start, self.steps = time.perf_counter(), 0

    def add(self, load_LE: torch.Tensor, dropped_L: torch.Tensor) -> None:
        self.load_LE += load_LE
        self.dropped_L += dropped_L / self.divisor
        self.steps += 1

    def tokens_per_s(self, tokens_per_step: int) -> float:
        """Throughput since `start`; the caller has waited for the device first."""
        return self.steps * tokens_per_step / max(time.perf_counter() - self.start, 1e-9)

    def load_stats(self) -> dict:
        return expert_load_stats(self.load_LE, self.dropped_L / self.steps)


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard
    (`RUN_DIR/tb`). Only rank 0 writes (`enabled`)."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb_dir = Path(run_dir) / "tb"
        self.tensorboard, self.enabled = tensorboard, enabled
        self._file = None
        self._tb = None

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run rewrites them), atomically."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def open(self) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                print(f"moesys train: TensorBoard logs skipped: {e} (pip install tensorboard, or set "
                      "log.tensorboard=false)", file=sys.stderr)
            else:
                self._tb = SummaryWriter(str(self.tb_dir))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(f"train/{key}", value, step)
            for key in ("expert_load_max_mean", "expert_load_cv"):
                for layer, value in enumerate(record.get(key, [])):
                    self._tb.add_scalar(f"{key}/layer{layer}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()

"""What `moesys train` tells the user around the loop: CPU threads, the start-up block, progress, the final line.

- CPU threads: on the CPU torch's default intra-op thread count is the machine's core count, whatever
  this process may run on and however many ranks share the node; on a busy or pinned machine that
  oversubscribes the cores (the tiny run took 34 s instead of 4 s on 2 busy cores). The choice, in
  order: `train.cpu_threads`, else `OMP_NUM_THREADS` when set, else the cores in this process's
  affinity mask divided by the ranks on this node (at least 1).
- The start-up block (rank 0): parameter counts, device and dtype, world size and mesh, data, steps,
  run dir, threads, and where the run starts (resumed from ckpt/step_N, or fresh).
- Progress: a tqdm bar on a terminal; elsewhere (a log file, CI) plain lines every tenth of the run.
- The log line: a logged step's record in one line (loss, validation loss, throughput, MFU, gradient norm, load).
- The final line: steps, wall time, tokens/s, last loss and where the checkpoint is.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch

from moesys.config import Config
from moesys.train_precision import precision_label

# Node-local process counts as torchrun, Open MPI and MPICH announce them.
_LOCAL_SIZE_ENV = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask; cgroup-pinned containers included)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_world_size(world_size: int, env=os.environ) -> int:
    for key in _LOCAL_SIZE_ENV:
        if env.get(key, "").isdigit() and int(env[key]) > 0:
            return int(env[key])
    return world_size          # no launcher said: assume every rank is on this node (the safe side)


def choose_cpu_threads(requested: int | None, world_size: int, env=os.environ) -> tuple[int, str]:
    """(intra-op threads, why) for a CPU run; see the module docstring for the order."""
    if requested is not None:
        return requested, "train.cpu_threads"
    omp = env.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    cores, local = usable_cores(), local_world_size(world_size, env)
    return max(1, cores // local), f"{cores} usable cores / {local} rank(s) on this node"


def configure_threads(config: Config, device: torch.device, world_size: int) -> str:
    """Set torch's intra-op threads for a CPU run; returns the start-up line saying what and why."""
    if device.type != "cpu":
        return f"CPU threads: {torch.get_num_threads()} (torch default; the device does the work)"
    threads, why = choose_cpu_threads(config.train.cpu_threads, world_size)
    torch.set_num_threads(threads)
    return f"CPU threads: {threads} ({why}; override with --set train.cpu_threads=N)"


def param_counts(model) -> dict[str, int]:
    """Total, active per token and embedding parameters of an MoETransformer holding every expert."""
    return {"total": model.num_params(), "active": model.num_params(active=True),
            "embedding": model.embed.weight.numel()}


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def resume_line(run_dir: Path, resume: bool, resume_from: Path | None) -> str:
    if resume_from is not None:
        shown = resume_from.relative_to(run_dir) if resume_from.is_relative_to(run_dir) else resume_from
        return f"resumed from {shown}"
    if resume:
        return f"no checkpoint in {run_dir / 'ckpt'}: starting fresh"
    return "starting fresh"


def startup_block(config: Config, *, params: dict[str, int], device: torch.device, world_size: int,
                  launcher: str, num_tokens: int, num_train: int, num_val: int, run_dir: Path, threads: str,
                  start: str) -> str:
    m, p, t, d = config.model, config.parallel, config.train, config.data
    dtype = precision_label(config, device)
    tokens_per_step = d.batch_size * d.seq_len * t.grad_accum * world_size
    mesh = (f"dp {world_size // p.ep} x ep {p.ep}" if p.expert_sharding == "ep"
            else f"{p.expert_sharding} over {world_size}")
    return "\n".join([
        f"moesys train: {m.num_layers} layers, {config.moe.num_experts} experts top-{config.moe.top_k}; "
        f"parameters {_count(params['total'])} total, {_count(params['active'])} active per token, "
        f"{_count(params['embedding'])} embedding",
        f"  device {device} ({dtype}), world size {world_size} ({launcher}), mesh {mesh}",
        f"  {threads}",
        f"  data {d.source}: {num_tokens:,} tokens, {num_train:,} train / {num_val:,} val sequences of {d.seq_len}",
        f"  steps {t.steps} x {tokens_per_step:,} tokens; run dir {run_dir}; {start}",
    ])


def final_line(*, steps_run: int, last_step: int, elapsed_s: float, tokens: int, last_loss: float | None,
               checkpoint: Path | None) -> str:
    loss = f"last loss {last_loss:.4f}" if last_loss is not None else "no loss read"
    where = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint written"
    return (f"moesys train: done: {steps_run} steps (to step {last_step}) in {elapsed_s:.1f} s, "
            f"{tokens / max(elapsed_s, 1e-9):,.0f} tokens/s, {loss}; {where}")


def log_line(r: dict) -> str:
    parts = [f"step {r['step']}", f"loss {r['loss']:.4f}"]
    if r.get("val_loss") is not None:
        parts.append(f"val {r['val_loss']:.4f}")
    parts.append(f"{r['tokens_per_s']:.0f} tok/s")
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    parts.append(f"gnorm {r['grad_norm']:.3f}")
    if r.get("expert_load_max_mean"):
        parts.append(f"load max/mean {max(r['expert_load_max_mean']):.2f}")
    return " | ".join(parts)


class PlainProgress:
    """tqdm's interface (update, set_postfix, write, close) as plain lines every `every` steps and at the
    last step, for output that is not a terminal: a log file gets no carriage-return frames."""

    def __init__(self, total: int, initial: int = 0, file=None):
        self.total, self.n = total, initial
        self.every = max(1, math.ceil(total / 10))
        self.file = file if file is not None else sys.stdout
        self.postfix = ""
        self._start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n >= self.total:
            elapsed = time.perf_counter() - self._start
            self.write(f"train {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%) "
                       f"{elapsed:.1f} s{self.postfix}")

    def set_postfix(self, **values) -> None:
        self.postfix = "".join(f", {k} {v}" for k, v in values.items())

    def write(self, line: str) -> None:
        print(line, file=self.file, flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int):
    """A tqdm bar (drawn on stderr, log lines on stdout) when both are terminals, else PlainProgress."""
    if sys.stdout.isatty() and sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
    return PlainProgress(total, initial)

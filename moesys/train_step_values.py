"""A training step's statistics on their way from the device to the host, with one host sync per step.

`StepStats` packs what a step measures (loss and aux-loss sums, the SIGTERM flag, the dropped fraction
per MoE layer, the routed load per layer and expert) into ONE float64 device tensor, so a single
all-reduce sums it over ranks; its fields are named views into that tensor, laid out here and nowhere
else. `PendingStepValues` copies the scalars (with the gradient norm) to the host a step late and
checks them: the first non-finite loss or gradient norm raises `TrainingStopped` naming the step.
"""

from __future__ import annotations

import collections
import math
from pathlib import Path
from typing import NamedTuple

import torch


class TrainingStopped(RuntimeError):
    """A non-finite loss or gradient norm: the message names the step and the last good checkpoint."""


class StepReadback(NamedTuple):
    """What the host reads of a step, in the order of its one copy: `StepStats.scalars`, then the
    gradient norm (computed after the statistics' all-reduce, so not packed with them)."""
    loss_sum: float
    aux_sum: float
    sigterm: float
    grad_norm: float


class StepStats:
    """One step's statistics, summed over micro-batches (`add_micro_batch`) and then over ranks (one
    all-reduce of `packed`). Layout of `packed` [3 + L + L*E]: loss_sum, aux_sum, sigterm (the
    `scalars`, StepReadback's order), dropped_L, load_LE."""

    def __init__(self, num_layers: int, num_experts: int, device: torch.device):
        L, E = num_layers, num_experts
        n = len(StepReadback._fields) - 1  # the scalars before the gradient norm
        self.packed = torch.zeros(n + L + L * E, dtype=torch.float64, device=device)
        self.scalars = self.packed[:n]
        self.loss_sum, self.aux_sum, self.sigterm = self.scalars.unbind()
        self.dropped_L = self.packed[n:n + L]
        self.load_LE = self.packed[n + L:].view(L, E)

    def add_micro_batch(self, out) -> None:
        """Add a micro-batch's model output (loss, aux_loss, per-layer moe_stats); no sync."""
        self.loss_sum += out.loss.detach().double()
        self.aux_sum += out.aux_loss.detach().double()
        if self.dropped_L.numel():  # a model with MoE layers
            self.dropped_L += torch.stack([s.dropped_fraction.detach() for s in out.moe_stats]).double()
            self.load_LE += torch.stack([s.tokens_per_expert for s in out.moe_stats]).double()

    def set_sigterm(self, raised: bool) -> None:
        self.sigterm.fill_(float(raised))


class StepValues(NamedTuple):
    step: int
    loss: float
    aux_loss: float
    grad_norm: float


class PendingStepValues:
    """Each step's all-reduced scalars and gradient norm, kept off the host's critical path: `push`
    starts a copy to pinned host memory (synchronous on the CPU) and `read_through(step)` reads every
    pending step up to `step` in order. Reading checks each step: the first non-finite loss or gradient
    norm raises TrainingStopped naming that step."""

    def __init__(self, divisor: int, resumed: tuple[Path, int] | None = None):
        self.divisor = divisor              # micro-batches x ranks: the sums become means
        self.resumed = resumed              # (checkpoint, its step) when the run resumed
        self._pending = collections.deque()  # (step, host float64 [len(StepReadback)], CUDA event or None)
        self.sigterm = False                # some rank saw SIGTERM in a step read so far
        self.latest: StepValues | None = None

    def push(self, step: int, stats: StepStats, grad_norm: torch.Tensor) -> None:
        values = torch.cat([stats.scalars, grad_norm.reshape(1).to(stats.scalars.dtype)])
        on_cuda = values.is_cuda
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=on_cuda)
        host.copy_(values, non_blocking=on_cuda)
        event = None
        if on_cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending.append((step, host, event))

    def read_through(self, step: int, last_saved: Path | None) -> None:
        while self._pending and self._pending[0][0] <= step:
            s, host, event = self._pending.popleft()
            if event is not None:
                event.synchronize()
            read = StepReadback(*host.tolist())
            loss = read.loss_sum / self.divisor
            if not math.isfinite(loss):
                raise TrainingStopped(stop_message("loss", loss, s, last_saved, self.resumed))
            if not math.isfinite(read.grad_norm):
                raise TrainingStopped(stop_message("gradient norm", read.grad_norm, s, last_saved, self.resumed))
            self.sigterm = self.sigterm or read.sigterm > 0
            self.latest = StepValues(s, loss, read.aux_sum / self.divisor, read.grad_norm)


def stop_message(what: str, value: float, step: int, last_saved: Path | None,
                 resumed: tuple[Path, int] | None = None) -> str:
    if resumed is not None and last_saved == resumed[0] and step == resumed[1] + 1:
        # The first step on loaded weights: the checkpoint's values, not the learning rate, are suspect.
        return (f"non-finite {what} ({value}) at step {step}, the first step after resuming from "
                f"{last_saved}; stopping without saving. Its files match the checksums recorded when it was "
                f"saved, so it was written with these values: resume from an earlier checkpoint (move "
                f"{last_saved.name} out of {last_saved.parent}) rather than changing train.lr")
    where = f"the last good checkpoint is {last_saved}" if last_saved is not None else \
        "no checkpoint was written yet"
    return (f"non-finite {what} ({value}) at step {step}; stopping without saving. {where}; lower "
            "train.lr or raise train.warmup_steps and resume with --resume")

"""The one interface of what `moesys.parallel.parallelize` returns, whichever placement it applied:
`ParallelHandle` (expert parallelism, `parallel.expert_sharding: ep`) and `FSSDPHandle` (`fssdp`,
`fsdp`). The trainer (moesys.train) and the checkpoint code (moesys.checkpoint) call only these
members; tests/test_handle_api.py checks that both handles provide every one with the same parameters.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch
import torch.nn as nn

__all__ = ["PlacementHandle"]


@runtime_checkable
class PlacementHandle(Protocol):
    @property
    def shards_experts(self) -> bool:
        """Whether ranks hold different experts (then the trainer reduces expert gradients apart)."""

    def expert_parameters(self) -> list[nn.Parameter]:
        """Expert parameters this rank holds (sharded; reduced by `reduce_expert_gradients`)."""

    def dense_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters replicated on every rank (data parallel over the world)."""

    def begin_step(self) -> object:
        """Before a step's first forward (FSSDP plans this step's materialisation)."""

    def end_step(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """After the optimizer step (FSSDP observes the load, re-shards when due); whether anything moved."""

    def reduce_gradients(self) -> None:
        """Dense and expert gradients averaged as if one process had trained on the global batch."""

    def reduce_expert_gradients(self) -> None:
        """Only the expert gradients (the trainer reduces the dense ones itself)."""

    def grad_norm(self) -> torch.Tensor:
        """The L2 norm of the whole model's gradients, over every rank's experts; after the reduction."""

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip with that global norm, as torch.nn.utils.clip_grad_norm_ does; returns the norm."""

    def expert_parameter_names(self) -> set[str]:
        """Names (as in model.named_parameters()) of the expert parameters."""

    def local_expert_ids(self, name: str) -> list[int] | None:
        """Global ids of this rank's rows of expert parameter `name` (None: not an expert tensor)."""

    def gather_expert_state(self, state: dict[str, torch.Tensor],
                            param_name: Callable[[str], str] = ...) -> dict[str, torch.Tensor]:
        """`state` with each expert tensor replaced by all experts in global-id order (a collective)."""

    def local_expert_state(self, state: dict[str, torch.Tensor],
                           param_name: Callable[[str], str] = ...) -> dict[str, torch.Tensor]:
        """The inverse of `gather_expert_state` without communication: this rank's rows."""

"""Expert parallelism: each rank of an ep group holds E/ep experts and tokens travel to them by all-to-all.

`ExpertParallelExperts` replaces a layer's `Experts`: same forward signature, same expert op
(`moe_mlp`, same backends), but only the local experts' weights (global ids
ep_rank * E_local ... ep_rank * E_local + E_local - 1, in `global_expert_ids`). A forward runs the token
path FSSDP shares (`moesys.parallel.dispatch`, whose docstring has the steps):

1. sort this rank's routed assignments by global expert id, which orders them by destination rank,
   then by its local expert (capacity mode: dropped assignments, whose weight the router zeroed, are
   not sent at all);
2. exchange the per-(rank, local expert) counts, so every rank knows the splits; this happens even
   for a rank with zero tokens, which sends and receives zeros but issues the same collectives;
3. dispatch the token rows (variable-split all-to-all, async; the shared expert runs meanwhile);
4. run the local experts on the received rows with weight 1;
5. combine: the reverse all-to-all brings the rows back, and the source rank applies the router
   weights and sums the K rows of each token in the order the single-device op uses.

Gradients flow through both all-to-alls (their backward is the reverse all-to-all). Capacity is per
rank: each rank's router applies the capacity factor to its own micro-batch (as Megatron does).

Legend: T tokens, H hidden, E experts (global), L local experts, K top-k, N = T*K routed rows
(or the kept ones), R rows received from all source ranks, P ep group size.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from moesys.layers.experts import Experts, autocast_expert_inputs
from moesys.layers.moe import MoELayer
from moesys.parallel.comm import CommContext, all_to_all_async
from moesys.parallel.dispatch import combine, exchange_splits, expert_mlp, received_expert_ids, sort_rows
from moesys.parallel.mesh import EPMesh, check_ep

__all__ = ["ExpertParallelExperts", "ExpertParallelMoELayer"]


class ExpertParallelExperts(nn.Module):
    """The local experts of one ep rank plus the token dispatch; a drop-in for `Experts`.

    Parameters keep `Experts`' names and layouts with E_local rows: gate_up_proj [L, 2I, H],
    down_proj [L, H, I], optional gate_up_proj_bias [L, 2I], down_proj_bias [L, H].
    `global_expert_ids[i]` is the global id of local expert i (checkpoints name experts by it)."""

    def __init__(self, experts: Experts, mesh: EPMesh, *, layer_name: str = "moe", drop_zero_weight: bool = False,
                 overlap: bool = True):
        super().__init__()
        E, ep = experts.num_experts, mesh.ep
        check_ep(ep, mesh.world_size, E)
        L = E // ep
        self.num_experts, self.num_local_experts, self.ep = E, L, ep
        self.expert_offset = mesh.ep_rank * L
        self.global_expert_ids = list(range(self.expert_offset, self.expert_offset + L))
        self.hidden_size, self.ffn_size = experts.hidden_size, experts.ffn_size
        self.activation, self.backend = experts.activation, experts.backend
        # Capacity mode: the router zeroed the weight of dropped assignments; don't ship them.
        self.drop_zero_weight, self.overlap, self.layer_name = drop_zero_weight, overlap, layer_name
        local = slice(self.expert_offset, self.expert_offset + L)
        for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            full = getattr(experts, name)
            setattr(self, name, None if full is None else nn.Parameter(full.detach()[local].clone(),
                                                                        requires_grad=full.requires_grad))
        self.comm = CommContext(mesh.ep_group, rank=mesh.rank, group_size=ep, layer=layer_name, timeout=mesh.timeout)
        self.last_splits: tuple[list[int], list[int]] | None = None  # (sent per rank, received per rank)
        # Benchmarks set a list here to collect the host seconds spent waiting for dispatched tokens
        # (the part of the transfer that overlap did not hide; meaningful on CPU, where waits block).
        self.dispatch_waits: list[float] | None = None

    def extra_repr(self) -> str:
        return (f"experts {self.global_expert_ids[0]}..{self.global_expert_ids[-1]} of {self.num_experts}, "
                f"ep={self.ep}, backend={self.backend!r}, overlap={self.overlap}")

    def forward(self, x_TH: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
        return self.dispatch(x_TH, topk_ids_TK, topk_weights_TK)[0]

    def dispatch(self, x_TH: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                 during_transfer=None):
        """Routed-expert output y_TH, and `during_transfer()`'s result, computed while the tokens
        are in flight when `overlap` is on (after they arrived otherwise)."""
        K = topk_ids_TK.shape[1]
        E, L, P = self.num_experts, self.num_local_experts, self.ep
        # Sorting by global id groups the rows by destination rank, then by its local expert.
        rows_N, _, counts_E = sort_rows(topk_ids_TK, topk_weights_TK, E, self.drop_zero_weight)
        splits = exchange_splits(rows_N, counts_E.view(P, L), self.comm)
        self.last_splits = (splits.send, splits.recv)

        x_NH = autocast_expert_inputs(x_TH)[0][splits.rows_N // K]  # under autocast, bf16 rows travel
        pending = all_to_all_async(x_NH, splits.recv, splits.send, self.comm, "token dispatch all-to-all")
        side = during_transfer() if during_transfer is not None and self.overlap else None
        waited = time.perf_counter()
        x_RH = pending.wait()
        if self.dispatch_waits is not None:
            self.dispatch_waits.append(time.perf_counter() - waited)
        if during_transfer is not None and not self.overlap:
            side = during_transfer()

        local_ids_R = received_expert_ids(splits, torch.arange(L, device=x_RH.device))
        x_RH, w_gate_up, w_down, b_gate_up, b_down = autocast_expert_inputs(
            x_RH, self.gate_up_proj, self.down_proj, self.gate_up_proj_bias, self.down_proj_bias)
        out_RH = expert_mlp(x_RH, local_ids_R, w_gate_up, w_down, b_gate_up, b_down,
                            activation=self.activation, backend=self.backend)
        # The compute dtype (the autocast dtype under autocast), as `Experts` returns it.
        y_TH = combine(out_RH, splits, topk_weights_TK, x_RH.dtype, self.comm, "expert output all-to-all")
        return y_TH, side


class ExpertParallelMoELayer(MoELayer):
    """`MoELayer` with expert-parallel experts: same submodules and parameter names (router.*,
    experts.*, shared_expert.*, shared_expert_gate.*), so state dicts and `isinstance` checks keep
    working; MoELayer's forward, with the shared expert run while the routed tokens are in flight.
    Statistics stay per rank (this rank's tokens); sum them over ranks to log global load."""

    def __init__(self, layer: MoELayer, mesh: EPMesh, *, layer_name: str, overlap: bool = True):
        experts = ExpertParallelExperts(layer.experts, mesh, layer_name=layer_name, overlap=overlap,
                                        drop_zero_weight=layer.router.capacity_factor is not None)
        self._adopt(layer.router, experts, layer.shared_expert, layer.shared_expert_gate)

    def routed_and_shared(self, x_TH: torch.Tensor, topk_ids_TK: torch.Tensor,
                          topk_weights_TK: torch.Tensor) -> torch.Tensor:
        side = (lambda: self.shared(x_TH)) if self.shared_expert is not None else None
        y_TH, shared_TH = self.experts.dispatch(x_TH, topk_ids_TK, topk_weights_TK, side)
        if shared_TH is not None:
            y_TH = y_TH + shared_TH
        return y_TH

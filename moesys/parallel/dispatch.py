"""The token path that expert parallelism (`ep.py`) and FSSDP (`fssdp.py`) share: routed rows out to the
ranks that compute them, through the local experts at weight 1, and back, weighted and summed.

One MoE layer's forward, on every rank of the group:
1. `sort_rows`: this rank's routed assignments (rows t*K + k of the flat top-k), grouped by expert id,
   and the count per expert. In capacity mode the dropped assignments (weight zeroed by the router) sort
   last instead of being removed, so nothing here reads a size on the host.
2. The caller orders the rows by destination rank and counts them per (destination, slot): EP's
   destination is the expert's owner, which the id order already is (slot: the owner's local expert);
   FSSDP picks a replica per row (`fssdp_plan.destinations`; slot: the global expert id).
3. `exchange_splits`: the counts' all-to-all, then the layer's one host sync: the split sizes of the token
   all-to-all must be known on the host. The dropped rows are cut off here, by the count now known.
4. The caller sends x[rows // K] with those splits: EP asynchronously, running the shared expert while
   the rows are in flight; FSSDP at once (its SparseAllGather, posted during attention, is in flight).
5. `received_expert_ids` + `expert_mlp`: the received rows come ordered by source rank, then slot; each
   gets its local expert index on the device and runs through it with weight 1.
6. `combine`: the reverse all-to-all brings the rows back; the source rank applies the router weights
   and sums each token's K rows as the single-device op does (fp32, k = 0..K-1 in order).
Gradients flow through both all-to-alls (their backward is the reverse all-to-all).

Legend: T tokens, H hidden, E experts (global), K top-k, N = T*K routed rows (sorted; after
`exchange_splits`, only the sent ones), R rows received from all source ranks, P ranks of the group,
S count slots per destination rank (EP: its local experts; FSSDP: all E experts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moesys.ops import moe_mlp
from moesys.parallel.comm import CommContext, all_to_all, exchange_counts

__all__ = ["Splits", "sort_rows", "count_ids", "exchange_splits", "received_expert_ids", "expert_mlp", "combine"]


def count_ids(ids_N: torch.Tensor, n: int) -> torch.Tensor:
    """counts_n[i] = how many of ids_N equal i (0 <= ids < n), int64, where ids_N is. torch.bincount would
    read max(ids) on the host on CUDA (a host sync) to size its output; an index_add_ of ones into n zeros
    does not (integers: exact, whatever the order of the adds)."""
    ones_N = torch.ones(ids_N.shape, dtype=torch.long, device=ids_N.device)
    return torch.zeros(n, dtype=torch.long, device=ids_N.device).index_add_(0, ids_N, ones_N)


def sort_rows(topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, num_experts: int,
              drop_zero_weight: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows_N, ids_N, counts_E): every routed row t*K + k, stably sorted by expert id (ids_N, ascending),
    and counts_E[e] = the rows of expert e that are sent.

    With `drop_zero_weight` (capacity mode: the router zeroed the weight of dropped assignments, which
    are not sent at all) a dropped row gets the id E and so sorts after every kept one: the kept rows come
    first, in the order a sort of the kept rows alone gives, and `exchange_splits` cuts the rest off. Picking
    the kept rows with nonzero() instead would size a tensor by a count the host must read (a host sync on
    CUDA that the split sizes do not force)."""
    ids_N = topk_ids_TK.reshape(-1)
    if drop_zero_weight:
        ids_N = torch.where(topk_weights_TK.reshape(-1).detach() != 0, ids_N, num_experts)
    ids_N, rows_N = torch.sort(ids_N, stable=True)
    return rows_N, ids_N, count_ids(ids_N, num_experts + 1)[:num_experts]


@dataclass
class Splits:
    """What `exchange_splits` agreed on: the sent rows in send order, the counts received per (source
    rank, slot) (on the device), and the token all-to-all's split sizes per rank (on the host)."""
    rows_N: torch.Tensor
    recv_PS: torch.Tensor
    send: list[int]
    recv: list[int]


def exchange_splits(rows_N: torch.Tensor, send_PS: torch.Tensor, comm: CommContext) -> Splits:
    """Exchange the counts send_PS[p, s] (rows this rank sends to rank p's slot s; rows_N ordered by p,
    then s, unsent rows last) and read the split sizes on the host: the one host sync of the layer. Every
    rank calls this, even with no tokens: the counts are what lets the ranks agree on the splits."""
    P = send_PS.shape[0]
    recv_PS = exchange_counts(send_PS, comm)
    splits = torch.cat([send_PS.sum(1), recv_PS.sum(1)]).tolist()  # the one host sync
    send, recv = splits[:P], splits[P:]
    return Splits(rows_N[:sum(send)], recv_PS, send, recv)


def received_expert_ids(splits: Splits, local_S: torch.Tensor) -> torch.Tensor:
    """The local expert index of each received row: rows come ordered by source rank, then slot, so slot
    s's local index local_S[s] repeats recv_PS[p, s] times per source p. On the device, sized by the
    host's split sizes (no sync)."""
    P = splits.recv_PS.shape[0]
    return torch.repeat_interleave(local_S.repeat(P), splits.recv_PS.reshape(-1), output_size=sum(splits.recv))


def expert_mlp(x_RH: torch.Tensor, local_ids_R: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
               b_gate_up: torch.Tensor | None, b_down: torch.Tensor | None, *, activation, backend: str) -> torch.Tensor:
    """The received rows through their local experts, each with weight 1: the router weights stay on the
    source rank, which applies them in `combine`."""
    return moe_mlp(x_RH, w_gate_up, w_down, local_ids_R.unsqueeze(1), x_RH.new_ones(x_RH.shape[0], 1),
                   activation=activation, backend=backend, b_gate_up=b_gate_up, b_down=b_down)


def combine(out_RH: torch.Tensor, splits: Splits, topk_weights_TK: torch.Tensor, dtype: torch.dtype,
            comm: CommContext, what: str) -> torch.Tensor:
    """y_TH in the compute dtype `dtype`: the reverse all-to-all brings the expert outputs back, and
    each token's K rows are weighted and summed like the single-device op: fp32 accumulation (of the
    weights rounded to `dtype`, as `Experts` rounds them), zero rows for the assignments not sent,
    k = 0..K-1 summed in order (deterministic)."""
    T, K = topk_weights_TK.shape
    rows_N = splits.rows_N
    back_NH = all_to_all(out_RH, splits.send, splits.recv, comm, what)
    H = back_NH.shape[1]
    acc_dtype = torch.promote_types(dtype, torch.float32)
    weighted_NH = back_NH.to(acc_dtype) * topk_weights_TK.reshape(-1)[rows_N].to(dtype).to(acc_dtype).unsqueeze(1)
    full_NH = weighted_NH.new_zeros(T * K, H).index_copy(0, rows_N, weighted_NH)
    return full_NH.view(T, K, H).sum(1).to(dtype)

"""Speculative prefetch: apply the next MoE layer's router to the current layer's expert input and load
the experts it picks while this layer computes (hidden states change little between adjacent layers, so
the guess is often right). Accuracy is scored when the next layer runs.

Legend: T tokens, H hidden, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from moesys.offload.device_cache import sort_lanes

PREFETCH_POLICIES = ("next-gate", "none")


def vote_order(ids_N: torch.Tensor, num_experts: int, use_kernel: bool | None = None) -> torch.Tensor:
    """The experts picked by the ids `ids_N` (the rows' top-k), most picked first, ties by lower id, as a tensor
    of min(E, N) entries, -1 past the experts picked at all (a fixed shape: the device path's prefetch is
    captured in CUDA graphs). use_kernel: None = one Triton program on CUDA (a batch step guesses once a layer,
    and the torch version's ~9 small launches were host time of every eager step), the torch version otherwise."""
    E, N = num_experts, ids_N.numel()
    M = min(E, N)
    if use_kernel is None:
        use_kernel = ids_N.is_cuda and triton is not None
    if use_kernel:
        out_M = torch.empty(M, dtype=torch.int64, device=ids_N.device)
        _vote_kernel[(1,)](ids_N, out_M, N, E, M, BLOCK_E=sort_lanes(E), CHUNK=32, num_warps=4)
        return out_M
    votes_E = torch.zeros(E, dtype=torch.int64, device=ids_N.device).index_add_(0, ids_N, torch.ones_like(ids_N))
    order_E = votes_E * (E + 1) + (E - torch.arange(E, device=ids_N.device))  # votes, then lower id first
    top_M = torch.topk(order_E, M).indices
    return torch.where(votes_E[top_M] > 0, top_M, -1)


class NextGatePrefetcher:
    def __init__(self, gates: dict[int, nn.Module], top_k: int):
        layers = sorted(gates)
        self.next_layer = dict(zip(layers, layers[1:]))
        self.gates, self.top_k = gates, top_k
        self.pending: dict[int, set[int]] = {}

    def guess(self, layer: int, x_TH: torch.Tensor) -> torch.Tensor | None:
        """Device tensor of the next layer's guessed expert ids, most wanted first, or None (last layer).
        With several rows (batch decode, prefill) the experts are ordered by how many rows' top-k pick them,
        ties by id, so the prefetch budget goes to the experts most of the rows will use; entries picked by
        no row are -1 (the shape stays fixed: min(E, T*K)). Any number of rows is guessed for: a large batch
        needs nearly every expert of the next layer, and copying them during this layer's compute is the
        only overlap its step has (a batch of 128 rows with no guess, when guesses stopped at 64 rows, hit
        no expert and copied each layer's experts after the layer before had computed:
        bench/results/offload_batch_int4_h100_b0df6cc.json). A layer needing more experts than its bank
        holds leaves no prefetch budget (OffloadEngine._prefetch), so a large prefill is unchanged."""
        nxt = self.next_layer.get(layer)
        if nxt is None:
            return None
        logits_TE = F.linear(x_TH, self.gates[nxt].weight)
        return vote_order(torch.topk(logits_TE, self.top_k, dim=-1).indices.flatten(), logits_TE.shape[-1])

    def record(self, layer: int, guessed: list[int]) -> None:
        nxt = self.next_layer[layer]
        self.pending[nxt] = set(guessed)

    def score(self, layer: int, needed: set[int]) -> tuple[int, int]:
        """(guessed, of those actually used) for `layer`'s pending guess; (0, 0) when there was none."""
        guessed = self.pending.pop(layer, None)
        if not guessed:
            return 0, 0
        return len(guessed), len(guessed & needed)

    def reset(self) -> None:
        self.pending.clear()


if triton is not None:
    @triton.jit
    def _vote_kernel(ids_ptr, out_ptr, N, E, M, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):
        """vote_order in one program: each expert's votes counted over chunks of the ids, then the experts
        sorted by votes x (E + 1) + (E - id), descending (distinct keys: the torch version's topk order)."""
        ee = tl.arange(0, BLOCK_E)
        cc = tl.arange(0, CHUNK)
        votes = tl.zeros([BLOCK_E], tl.int64)
        for n0 in range(0, N, CHUNK):
            ids = tl.load(ids_ptr + n0 + cc, mask=n0 + cc < N, other=-1).to(tl.int64)
            votes += tl.sum((ids[None, :] == ee[:, None]).to(tl.int64), axis=1)
        key = tl.sort(tl.where(ee < E, votes * (E + 1) + (E - ee), -1), descending=True)
        tl.store(out_ptr + ee, tl.where(key // (E + 1) > 0, E - key % (E + 1), -1), mask=ee < M)

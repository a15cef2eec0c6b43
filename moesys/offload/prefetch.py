"""Speculative prefetch: apply the next MoE layer's router to the current layer's expert input and load
the experts it picks while this layer computes (hidden states change little between adjacent layers, so
the guess is often right). Accuracy is scored when the next layer runs.

Legend: T tokens, H hidden, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

PREFETCH_POLICIES = ("next-gate", "none")


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
        E = logits_TE.shape[-1]
        ids_N = torch.topk(logits_TE, self.top_k, dim=-1).indices.flatten()
        votes_E = torch.zeros(E, dtype=torch.int64, device=ids_N.device).index_add_(0, ids_N, torch.ones_like(ids_N))
        order_E = votes_E * (E + 1) + (E - torch.arange(E, device=ids_N.device))  # votes, then lower id first
        top_M = torch.topk(order_E, min(E, ids_N.numel())).indices
        return torch.where(votes_E[top_M] > 0, top_M, -1)

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

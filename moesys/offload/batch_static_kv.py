"""The KV cache of a continuous batch whose decode steps replay a CUDA graph (moesys.offload.graph): every
shape fixed, every tensor allocated once.

PaddedBatchKV grows, shrinks and trims a DynamicCache, which a captured step cannot follow. Here the cache
is R rows (the batch size) x C columns from the start. All rows write the next token's keys and values at
the same column (`ColumnKVLayer`: one index_copy_ per layer at a device scalar set before each step), each
row from its own start column on, and a [R, 1, 1, C] boolean mask (passed to the model as a prepared 4D
mask, so transformers builds none) says which columns each row attends to. Positions are per row, so
rotary embeddings see what the sequence decoded alone sees.

- A joining group is prefilled as PaddedBatchKV prefills one (left-padded, its own DynamicCache); its keys
  and values are then copied into free rows, right-aligned to end just before the write column. A group
  longer than that first shifts every row right (more left padding).
- A finished row is freed and its columns masked out. A free row still runs through the step (the graph's
  shape is fixed): it attends to its own columns of the current steps only (never an empty softmax), and
  the offload engine gives it its step's first row's experts (OffloadEngine.batch_rows_valid), so it
  costs no copy.
- When the write column reaches C, the columns before the earliest start of a live row are dropped (every
  row shifted left); C >= the longest sequence, so a live row always fits.

Shifts copy within the same tensors: their storage, which the captured graph reads, never changes.

Legend: R rows, C columns, N KV heads, D head dim, G rows of a joining group, P its padded prompt length.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class ColumnKVLayer(DynamicLayer):
    """A cache layer of fixed shape [R, N, C, D] whose update writes the step's keys and values at column
    `column_1` (a device tensor [1] shared by every layer) of every row and returns the whole cache."""

    is_compileable = True  # fixed shapes: what moesys.offload.graph's eligibility check asks of a cache

    def __init__(self, column_1: torch.Tensor):
        super().__init__()
        self.column_1 = column_1

    def allocate(self, rows: int, columns: int, keys_GNPD: torch.Tensor, values_GNPD: torch.Tensor) -> None:
        self.keys = keys_GNPD.new_zeros(rows, keys_GNPD.shape[1], columns, keys_GNPD.shape[3])
        self.values = values_GNPD.new_zeros(rows, values_GNPD.shape[1], columns, values_GNPD.shape[3])
        self.device, self.is_initialized = keys_GNPD.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys.index_copy_(2, self.column_1, key_states)
        self.values.index_copy_(2, self.column_1, value_states)
        return self.keys, self.values


def other_cache_layers(config) -> list[str]:
    """The cache layer types of `config`'s model other than full attention (sorted names): the fixed-shape
    batch cache holds full-attention layers only."""
    layers = DynamicCache(config=config).layers
    return sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})


class StaticBatchKV:
    def __init__(self, config, device: torch.device, rows: int, columns: int, cache_name: str = "cache"):
        self.config, self.device, self.rows, self.columns, self.cache_name = config, device, rows, columns, cache_name
        self.column = 0                       # where the next decode step writes (host copy of column_1)
        self.column_1 = torch.zeros(1, dtype=torch.long, device=device)
        self.cache = DynamicCache(config=config)
        bad = other_cache_layers(config)
        if bad:
            raise ValueError(f"the batch's fixed-shape KV cache needs full-attention cache layers; this model's "
                             f"cache has {bad} (sliding-window or other); decode it with graph=False")
        self.cache.layers = [ColumnKVLayer(self.column_1) for _ in self.cache.layers]
        self.allocated = False
        self.start: list[int | None] = [None] * rows   # first real column of each row; None: free row
        self.lengths = [0] * rows                      # real tokens cached per row
        self.mask_R11C = torch.zeros(rows, 1, 1, columns, dtype=torch.bool, device=device)

    def free_rows(self) -> list[int]:
        return [r for r in range(self.rows) if self.start[r] is None]

    def valid_R(self) -> torch.Tensor:
        return torch.tensor([s is not None for s in self.start], device=self.device)

    def add(self, group: dict, lengths: list[int], rows: list[int]) -> None:
        """Copy a prefilled group (group = PaddedBatchKV.prefill_inputs(...) after its forward, prompts of
        `lengths` tokens) into free `rows`, its columns ending just before the write column."""
        group_cache, group_mask = group[self.cache_name], group["attention_mask"]
        P = group_mask.shape[1]
        if P >= self.columns:
            raise ValueError(f"a prompt of {P} tokens does not fit the batch's KV cache of {self.columns} columns")
        if not self.allocated:
            for mine, theirs in zip(self.cache.layers, group_cache.layers):
                mine.allocate(self.rows, self.columns, theirs.keys, theirs.values)
            self.allocated = True
        if not any(s is not None for s in self.start):
            self.column = P  # nobody to keep: the group starts at column 0
        elif P > self.column:  # live rows to the far left first, then right by what the group lacks
            self._shift_left(self._live_start())
            self._shift_right(P - self.column)
        c = self.column
        index = torch.tensor(rows, device=self.device)
        for mine, theirs in zip(self.cache.layers, group_cache.layers):
            mine.keys[index, :, c - P:c] = theirs.keys.to(mine.keys.dtype)
            mine.values[index, :, c - P:c] = theirs.values.to(mine.values.dtype)
        self.mask_R11C[index] = False
        self.mask_R11C[index, 0, 0, c - P:c] = group_mask.to(self.device).bool()
        for r, n in zip(rows, lengths):
            self.start[r], self.lengths[r] = c - n, n

    def remove(self, rows: list[int]) -> None:
        """Free finished rows (their columns masked out; the others keep their places)."""
        for r in rows:
            self.start[r], self.lengths[r] = None, 0
        if rows:
            self.mask_R11C[torch.tensor(rows, device=self.device)] = False

    def step_inputs(self, last_tokens: dict[int, int]) -> dict:
        """Arguments of one decode forward of every row: input_ids [R, 1] (row r's last token, 0 for a free
        row), the 4D mask with the new column, per-row positions and the cache; the write column is set."""
        if self.column >= self.columns:
            if self._live_start() == 0:  # cannot happen with columns >= the longest sequence (checked)
                raise RuntimeError(f"the batch's KV cache of {self.columns} columns is full")
            self._shift_left(self._live_start())
        c = self.column
        self.mask_R11C[:, 0, 0, c] = True  # free rows too: they attend to their own columns of these steps
        ids_R1 = torch.tensor([[last_tokens.get(r, 0)] for r in range(self.rows)], device=self.device)
        position_R1 = torch.tensor([[n] for n in self.lengths], device=self.device)
        self.column_1.fill_(c)
        self.column += 1
        self.lengths = [n + 1 if s is not None else 0 for n, s in zip(self.lengths, self.start)]
        return {"input_ids": ids_R1, "attention_mask": self.mask_R11C.clone(), "position_ids": position_R1,
                self.cache_name: self.cache}

    def _live_start(self) -> int:
        """The earliest column a live row needs (the write column when no row is live)."""
        return min((s for s in self.start if s is not None), default=self.column)

    def _shift_left(self, n: int) -> None:
        if n <= 0:
            return
        for layer in self.cache.layers:
            for t in (layer.keys, layer.values):
                t[:, :, :self.columns - n] = t[:, :, n:].clone()
        self.mask_R11C[..., :self.columns - n] = self.mask_R11C[..., n:].clone()
        self.mask_R11C[..., self.columns - n:] = False
        self.column -= n
        self.start = [None if s is None else s - n for s in self.start]

    def _shift_right(self, n: int) -> None:
        for layer in self.cache.layers:
            for t in (layer.keys, layer.values):
                t[:, :, n:] = t[:, :, :self.columns - n].clone()
        self.mask_R11C[..., n:] = self.mask_R11C[..., :self.columns - n].clone()
        self.mask_R11C[..., :n] = False
        self.column += n
        self.start = [None if s is None else s + n for s in self.start]

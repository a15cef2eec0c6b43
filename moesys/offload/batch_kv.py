"""The KV cache of a continuous batch: one transformers DynamicCache whose rows are left-padded to a shared
length, with a [B, L] attention mask saying which columns are real.

A row joins with the KV cache of its own batch-1 prefill (left-padded to the batch's length, or the batch
padded to the row's); a finished row leaves by index selection; columns that are padding in every row are
dropped, so the shared length stays the longest row's. Positions are per row (each row's real length), so
rotary embeddings see the same positions as the sequence decoded alone.

Legend: B rows, L cached columns, N KV heads, D head dim.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from moesys.offload.host_kv import HostKVLayer


class PaddedBatchKV:
    def __init__(self, config, device: torch.device, host: bool = False):
        # host: the rows' keys and values live in host memory (moesys.offload.host_kv), the mask on `device`
        self.config, self.device, self.host = config, device, host
        self.cache: DynamicCache | None = None
        self.mask_BL = torch.zeros(0, 0, dtype=torch.long, device=device)
        self.lengths: list[int] = []  # real tokens cached per row

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> int:
        return self.mask_BL.shape[1]

    def new_row_cache(self) -> DynamicCache:
        """An empty cache for one sequence's prefill; only plain (full-attention) layers can be padded."""
        cache = DynamicCache(config=self.config)
        bad = [type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer]
        if bad:
            raise ValueError(f"batched decoding pads each row's KV cache on the left, which needs full-attention "
                             f"cache layers; this model's cache has {sorted(set(bad))} (sliding-window or other); "
                             "decode it at batch_size=1")
        if self.host:
            cache.layers = [HostKVLayer() for _ in cache.layers]
        return cache

    def add(self, row_cache: DynamicCache, length: int) -> int:
        """Append a prefilled sequence (its batch-1 cache of `length` tokens) as the last row; returns its row."""
        if self.cache is None:
            self.cache, self.lengths = row_cache, [length]
            self.mask_BL = torch.ones(1, length, dtype=torch.long, device=self.device)
            return 0
        L = max(self.length, length)
        self._pad_left(self.cache, L - self.length)
        self._pad_left(row_cache, L - length)
        for mine, theirs in zip(self.cache.layers, row_cache.layers):
            mine.keys = torch.cat((mine.keys, theirs.keys))
            mine.values = torch.cat((mine.values, theirs.values))
        row_mask = torch.zeros(1, L, dtype=torch.long, device=self.device)
        row_mask[:, L - length:] = 1
        pad = torch.zeros(self.rows, L - self.length, dtype=torch.long, device=self.device)
        self.mask_BL = torch.cat((torch.cat((pad, self.mask_BL), dim=1), row_mask))
        self.lengths.append(length)
        return self.rows - 1

    def remove(self, rows: list[int]) -> None:
        """Drop finished rows (the others keep their order) and the columns nobody needs any more."""
        keep = [r for r in range(self.rows) if r not in set(rows)]
        if not keep:
            self.__init__(self.config, self.device, self.host)
            return
        index = torch.tensor(keep)  # a host index selects rows of device and host tensors alike
        for layer in self.cache.layers:
            layer.batch_select_indices(index)
        self.mask_BL = self.mask_BL[index]
        self.lengths = [self.lengths[r] for r in keep]
        drop = self.length - max(self.lengths)  # leading columns that are padding in every row
        if drop:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, drop:], layer.values[:, :, drop:]
            self.mask_BL = self.mask_BL[:, drop:]

    def step_inputs(self) -> dict:
        """Arguments of one decode forward (besides input_ids): the mask with the new column, per-row positions."""
        self.mask_BL = torch.cat((self.mask_BL, torch.ones(self.rows, 1, dtype=torch.long, device=self.device)), 1)
        position_B1 = torch.tensor(self.lengths, device=self.device).view(-1, 1)
        self.lengths = [n + 1 for n in self.lengths]
        return dict(attention_mask=self.mask_BL, position_ids=position_B1, cache=self.cache)

    @staticmethod
    def _pad_left(cache: DynamicCache, n: int) -> None:
        if n <= 0:
            return
        for layer in cache.layers:
            B, N, _, D = layer.keys.shape
            zeros = layer.keys.new_zeros(B, N, n, D)
            layer.keys = torch.cat((zeros, layer.keys), dim=2)
            layer.values = torch.cat((layer.values.new_zeros(B, N, n, layer.values.shape[-1]), layer.values), dim=2)


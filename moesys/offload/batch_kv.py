"""The KV cache of a continuous batch: one transformers DynamicCache whose rows are left-padded to a shared
length, with a [B, L] attention mask saying which columns are real.

Rows join in groups: the KV cache of one prefill of several prompts, left-padded to the group's longest
(PaddedBatchKV.prefill_inputs builds its mask and positions), is left-padded to the batch's length (or
the batch to the group's) and appended; a finished row leaves by index selection; columns that are
padding in every row are dropped, so the shared length stays the longest row's. Positions are per row
(each row's real length), so rotary embeddings see the same positions as the sequence decoded alone.

Cache layers of other kinds keep the same shared L columns in their own way (`layer_kind`):
- sliding-window (GPT-OSS): only the last min(L, W - 1) columns are kept; a row's real tokens are its last
  ones (rows are right-aligned), so padding a group on the left to that width and setting the layer's
  cumulative length to L puts every column at the position the mask and the window expect;
- linear attention / state-space (Qwen3-Next, Jamba, Nemotron-H): conv and recurrent states per row, no
  columns; the models mask padded tokens out of their inputs, so a left-padded prefill leaves a row's
  state as the sequence alone leaves it; joining rows are concatenated, and the layer's length says L;
- no cache (Nemotron-H's MoE layers): nothing.
Host KV (kv="host") holds full-attention layers only.

Legend: B rows, L cached columns, N KV heads, D head dim, W sliding window.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from moesys.offload.host_kv import HostKVLayer

_KINDS = {DynamicLayer: "full", HostKVLayer: "full", DynamicSlidingWindowLayer: "sliding"}
try:  # transformers 5.25 (not every 5.x): one cache class for recurrent layers, one for layers without a cache
    from transformers.cache_utils import DummyLayer, LinearAttentionLayer

    _KINDS.update({LinearAttentionLayer: "linear", DummyLayer: "none"})
except ImportError:  # earlier: model-specific recurrent caches, which a padded batch does not take
    pass


def layer_kind(layer) -> str | None:
    """How a padded batch keeps this cache layer (the module docstring), or None for a kind it cannot:
    exact types only, as a subclass may keep its tensors differently."""
    return _KINDS.get(type(layer))


def _left_pad(x: torch.Tensor, columns: int) -> torch.Tensor:
    """x [B, N, c, D] with zero columns prepended up to `columns`."""
    n = columns - x.shape[2]
    return x if n <= 0 else torch.cat((x.new_zeros(x.shape[0], x.shape[1], n, x.shape[3]), x), dim=2)


def _set_length(layer, kind: str, L: int) -> None:
    """The layer's token count, which transformers reads for positions and masks: the batch's L columns."""
    if kind == "sliding":
        layer.cumulative_length = L
    elif kind == "linear":
        layer.cumulative_length_linear.fill_(L)


def cache_kwarg(model) -> str:
    """The name the model's forward takes its KV cache under: `cache` from transformers 5.2x on,
    `past_key_values` before (5.17 and earlier silently ignore `cache`, through **kwargs, and build their own)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class PaddedBatchKV:
    def __init__(self, config, device: torch.device, host: bool = False, cache_name: str = "cache"):
        # host: the rows' keys and values live in host memory (moesys.offload.host_kv), the mask on `device`;
        # cache_name: the forward's keyword for the cache (cache_kwarg)
        self.config, self.device, self.host, self.cache_name = config, device, host, cache_name
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
        """An empty cache for one group's prefill, of layers a padded batch can keep (layer_kind)."""
        cache = DynamicCache(config=self.config)
        bad = [type(layer).__name__ for layer in cache.layers if layer_kind(layer) is None]
        if bad:
            raise ValueError(f"batched decoding pads each row's cache on the left, which this model's cache layers "
                             f"{sorted(set(bad))} do not support (full-attention, sliding-window, linear-attention "
                             "and state-space layers do); decode it at batch_size=1")
        if self.host:
            other = sorted({type(layer).__name__ for layer in cache.layers if layer_kind(layer) != "full"})
            if other:
                raise ValueError(f"kv='host' keeps full-attention keys and values in host memory; this model's cache "
                                 f"also has {other} layers: use kv='device'")
            cache.layers = [HostKVLayer() for _ in cache.layers]
        return cache

    def prefill_inputs(self, prompts: list[list[int]]) -> dict:
        """Arguments of one prefill forward of `prompts` together, left-padded to the longest: input_ids,
        attention_mask (0 on padding), position_ids (0.. per prompt; padding at 0) and an empty cache."""
        G, P = len(prompts), max(len(p) for p in prompts)
        ids_GP = torch.zeros(G, P, dtype=torch.long)
        mask_GP = torch.zeros(G, P, dtype=torch.long)
        for g, p in enumerate(prompts):
            ids_GP[g, P - len(p):] = torch.tensor(p)
            mask_GP[g, P - len(p):] = 1
        position_GP = (mask_GP.cumsum(1) - 1).clamp_min(0)
        return {"input_ids": ids_GP.to(self.device), "attention_mask": mask_GP.to(self.device),
                "position_ids": position_GP.to(self.device), self.cache_name: self.new_row_cache()}

    def add(self, group: dict, lengths: list[int]) -> None:
        """Append the rows of a group prefilled with `group` = prefill_inputs(...) (prompts of `lengths`
        tokens) as the last rows."""
        group_cache, group_mask = group[self.cache_name], group["attention_mask"]
        if self.cache is None:
            self.cache, self.lengths, self.mask_BL = group_cache, list(lengths), group_mask
            return
        P = group_mask.shape[1]
        L = max(self.length, P)
        for mine, theirs in zip(self.cache.layers, group_cache.layers):
            kind = layer_kind(mine)
            if kind in ("full", "sliding"):
                width = L if kind == "full" else min(L, mine.sliding_window - 1)
                mine.keys = torch.cat((_left_pad(mine.keys, width), _left_pad(theirs.keys, width)))
                mine.values = torch.cat((_left_pad(mine.values, width), _left_pad(theirs.values, width)))
            elif kind == "linear":
                for states in ("conv_states", "recurrent_states"):
                    mine_i, theirs_i = getattr(mine, states), getattr(theirs, states)
                    for i, t in mine_i.items():
                        if t is not None:
                            mine_i[i] = torch.cat((t, theirs_i[i]))
            _set_length(mine, kind, L)
        pad_mine = torch.zeros(self.rows, L - self.length, dtype=torch.long, device=self.device)
        pad_group = torch.zeros(len(lengths), L - P, dtype=torch.long, device=self.device)
        self.mask_BL = torch.cat((torch.cat((pad_mine, self.mask_BL), 1), torch.cat((pad_group, group_mask), 1)))
        self.lengths += list(lengths)

    def remove(self, rows: list[int]) -> None:
        """Drop finished rows (the others keep their order) and the columns nobody needs any more."""
        leaving = set(rows)
        keep = [r for r in range(self.rows) if r not in leaving]
        if not keep:
            self.__init__(self.config, self.device, self.host, self.cache_name)
            return
        index = torch.tensor(keep)  # a host index selects rows of device and host tensors alike
        for layer in self.cache.layers:
            if layer_kind(layer) == "linear":  # (no batch_select_indices; its reorder selects rows)
                layer.reorder_cache(index)
            else:
                layer.batch_select_indices(index)
        self.mask_BL = self.mask_BL[index]
        self.lengths = [self.lengths[r] for r in keep]
        drop = self.length - max(self.lengths)  # leading columns that are padding in every row
        if drop:
            L = self.length - drop
            for layer in self.cache.layers:
                kind = layer_kind(layer)
                if kind in ("full", "sliding"):
                    width = L if kind == "full" else min(L, layer.sliding_window - 1)
                    layer.keys, layer.values = layer.keys[:, :, -width:], layer.values[:, :, -width:]
                _set_length(layer, kind, L)
            self.mask_BL = self.mask_BL[:, drop:]

    def step_inputs(self) -> dict:
        """Arguments of one decode forward (besides input_ids): the mask with the new column, per-row positions."""
        self.mask_BL = torch.cat((self.mask_BL, torch.ones(self.rows, 1, dtype=torch.long, device=self.device)), 1)
        position_B1 = torch.tensor(self.lengths, device=self.device).view(-1, 1)
        self.lengths = [n + 1 for n in self.lengths]
        return {"attention_mask": self.mask_BL, "position_ids": position_B1, self.cache_name: self.cache}

"""The bytes a model's generation cache holds for one sequence, measured once from the model's own code.

A row of `tokens` tokens holds, per cache layer:
- full attention: K and V of every token;
- sliding-window attention (GPT-OSS): K and V of its last tokens only, at most the layer's window;
- linear attention and state-space layers (Qwen3-Next, Jamba, Nemotron-H): conv and recurrent states of a fixed
  size whatever the length (tens of MiB a row on real shapes: Qwen3-Next-80B's are 74 MiB);
- nothing (Nemotron-H's MoE layers).
Config fields do not say this reliably: MLA attention (DeepSeek) caches a compressed latent, 7-28x smaller than
2 x heads x head_dim; hybrids keep KV in a quarter of their layers; states have model-specific shapes and
dtypes. So `measure` runs the model's forward on the meta device (shapes and dtypes only: no memory, no
weights; 1-3 s on full-size configs, DeepSeek-V3 3 s) with its experts replaced by an identity, at 1, 2 and
(sliding layers) window + 1 tokens, and reads the cache the forward filled: per layer, the bytes a token
adds, the fixed bytes, and the columns a sliding layer keeps.

The memory plan reserves `reserve_bytes(max_context)`: max_context tokens of KV, a window's layers counted as
if each token stayed (a batch's rows share those tokens), and the states of one row. B rows of up to `longest`
tokens fit when B x row_bytes(longest) <= reserve_bytes(max_context): for a model of full attention only,
B x longest <= max_context; a sliding layer's rows pay at most its window; a hybrid's each pay their states.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from moesys.offload.sizes import format_bytes

log = logging.getLogger(__name__)

# the experts implementation the probe forward runs: each expert block adds nothing (transformers' grouped
# experts forward counts tokens per expert, which the meta device cannot)
PROBE_EXPERTS = "moesys_cache_probe"
_MEASURED: dict[tuple, "CacheBytes"] = {}  # measure's results by (config class, config JSON, dtype)


@dataclass(frozen=True)
class CacheBytes:
    full_per_token: int = 0                       # K and V of one token over the full-attention layers
    windows: tuple[tuple[int, int], ...] = ()     # (columns kept, bytes per token) of each sliding layer
    state_per_row: int = 0                        # conv and recurrent states of one sequence
    attention_layers: int = 0                     # layers with a full-attention KV cache (host KV holds these)

    def row_bytes(self, tokens: int) -> int:
        """The cache of one sequence of `tokens` tokens."""
        return (tokens * self.full_per_token + sum(min(tokens, cols) * b for cols, b in self.windows)
                + self.state_per_row)

    def device_bytes(self, rows: int, tokens: int, kv: str = "device") -> int:
        """What `rows` sequences of `tokens` keep on the GPU: everything (kv="device"), or with the KV cache
        in host memory (kv="host", moesys.offload.host_kv: full-attention layers only) the rest."""
        host = tokens * self.full_per_token if kv == "host" else 0
        return rows * (self.row_bytes(tokens) - host)

    @property
    def per_token(self) -> int:
        """KV bytes a token adds while every sliding window is still filling (an upper bound)."""
        return self.full_per_token + sum(b for _, b in self.windows)

    def reserve_bytes(self, max_context: int) -> int:
        """What the memory plan reserves for `max_context` tokens (module docstring)."""
        return max_context * self.per_token + self.state_per_row

    def rows_fit(self, tokens: int, max_context: int) -> int:
        """How many rows of `tokens` tokens the reserve for max_context holds."""
        return self.reserve_bytes(max_context) // max(1, self.row_bytes(tokens))

    def columns_for(self, rows: int, max_context: int) -> int:
        """The longest sequence (up to max_context) each of `rows` rows may hold within the reserve."""
        budget, lo, hi = self.reserve_bytes(max_context), 0, max_context
        while lo < hi:  # row_bytes grows with tokens: the largest t with rows x row_bytes(t) <= budget
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if rows * self.row_bytes(mid) <= budget else (lo, mid - 1)
        return lo

    def context_for(self, rows: int, tokens: int) -> int:
        """The smallest max_context (at least `tokens`) whose reserve holds `rows` rows of `tokens` tokens."""
        need = rows * self.row_bytes(tokens) - self.state_per_row
        if self.per_token == 0:
            if need > 0:
                raise ValueError(f"{rows} rows need {format_bytes(need + self.state_per_row)} of cache, but this "
                                 "model keeps no KV cache: a larger max_context does not reserve more; use batch "
                                 "size 1 or pass a larger reserve= (bytes) to load")
            return tokens
        return max(tokens, -(-need // self.per_token))

    def describe(self) -> str:
        parts = [f"{format_bytes(self.full_per_token)} per token in {self.attention_layers} attention layers"]
        if self.windows:
            parts.append(f"{len(self.windows)} sliding-window layers of up to {max(c for c, _ in self.windows)} "
                         "tokens")
        if self.state_per_row:
            parts.append(f"{format_bytes(self.state_per_row)} of recurrent states per sequence")
        return ", ".join(parts)


def from_config(config, dtype: torch.dtype) -> CacheBytes:
    """The estimate used before moesys measured the cache, and when the probe forward fails: K and V of
    num_key_value_heads x head_dim in every layer, no states (too much for MLA and hybrids, too little for
    a hybrid's states)."""
    config = config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    elsize = torch.empty((), dtype=dtype).element_size()
    return CacheBytes(full_per_token=2 * kv_heads * head_dim * elsize * config.num_hidden_layers,
                      attention_layers=config.num_hidden_layers)


def _tensor_bytes(obj, seen=None) -> int:
    """Bytes of the tensors (of one or more dimensions: not the 0-d length counters) an object holds in its
    attributes, lists, tuples and dicts."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen or obj.dim() == 0:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        return sum(_tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def _register_probe() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(PROBE_EXPERTS, lambda self, hidden_states, top_k_index, top_k_weights: hidden_states)


def _layer_bytes(model, tokens: int) -> tuple[list[int], list[int | None]]:
    """Bytes of each cache layer after a forward of one row of `tokens` tokens on the meta device, and each
    layer's sliding window (None: not a sliding layer)."""
    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    layers = getattr(cache, "layers", None)
    if layers is None:  # a model-specific cache class without per-layer objects: its total as one layer
        return [_tensor_bytes(cache)], [None]
    return [_tensor_bytes(layer) for layer in layers], [getattr(layer, "sliding_window", None) for layer in layers]


def measure(config, dtype: torch.dtype) -> CacheBytes:
    """The cache of `config`'s model in `dtype`, read off forwards on the meta device (module docstring). If
    that forward fails (a model whose experts do not take transformers' experts implementations, or code
    the meta device cannot run), the config estimate, with a warning. Measured once per config and dtype in
    a process (`moesys generate --prompts` plans before loading, and the load plans again)."""
    key = (type(config).__name__, config.to_json_string(), dtype)
    if key not in _MEASURED:
        _MEASURED[key] = _measure(config, dtype)
    return _MEASURED[key]


def _measure(config, dtype: torch.dtype) -> CacheBytes:
    from moesys.offload.loader import build_skeleton

    try:
        _register_probe()
        # (a copy: the implementation chosen here would stay in the caller's config)
        model = build_skeleton(copy.deepcopy(config), dtype, experts_implementation=PROBE_EXPERTS)
        (one, windows), (two, _) = _layer_bytes(model, 1), _layer_bytes(model, 2)
        per_token = [b - a for a, b in zip(one, two)]
        fixed = [a - t for a, t in zip(one, per_token)]
        sliding = [w for w in windows if w]
        far = _layer_bytes(model, max(sliding) + 1)[0] if sliding else two
    except Exception as e:  # noqa: BLE001 - any failure of the probe falls back to the estimate
        estimate = from_config(config, dtype)
        log.warning("could not measure the generation cache of %s on the meta device (%s: %s); planning with "
                    "the config's estimate: %s", getattr(config, "model_type", "?"), type(e).__name__, e,
                    estimate.describe())
        return estimate
    full, slid = 0, []
    for layer, (t, f, b) in enumerate(zip(per_token, fixed, far)):
        if t and windows[layer]:
            slid.append(((b - f) // t, t))  # the columns it kept at window + 1 tokens
        else:
            full += t
    return CacheBytes(full_per_token=full, windows=tuple(slid), state_per_row=sum(fixed),
                      attention_layers=sum(1 for layer, t in enumerate(per_token) if t and not windows[layer]))

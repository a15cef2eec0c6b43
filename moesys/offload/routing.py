"""Routing modes for benchmarking offloaded inference, and routing traces.

- "model": the model's own router (nothing installed).
- "uniform": each token's top-k expert ids drawn independently and uniformly (K distinct of E) from a
  seeded generator: no locality, the worst case for an expert cache.
- "trace": replay of a recorded routing trace, token after token (wrapping at its end); MoE layer r of the
  model replays trace layer r mod L_trace. The trace's E and K must equal the model's.

The ids are swapped in by a forward pre-hook on each MoE block's experts module (transformers' public hook
API), so the offload engine, and a model fully on the device, see them as the router's output. The
router's top-k weights are kept (the mixing weights stay the size the model's own are). Under a CUDA-graph
decode step the hook would be captured with its first draw, so these modes need cuda_graph=False.

Trace file (safetensors, no pickle): tensor "ids_NLK" [N tokens, L MoE layers, K], uint8 for E <= 256 else
int16 (any integer dtype loads), metadata
{"format": "moesys-routing-trace", "version": "1", "num_experts": E, "top_k": K}. `RoutingRecorder`
writes it from the model's own routing (temp file, then rename).

Legend: T tokens, N trace tokens, L MoE layers, E experts, K top-k.
"""

from __future__ import annotations

import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moesys.offload.adapters import adapter_for, find_moe_blocks
from moesys.offload.engine import OffloadedExperts

ROUTING_MODES = ("model", "uniform", "trace")
TRACE_FORMAT = "moesys-routing-trace"


def _experts_modules(model) -> tuple:
    """(text config, each MoE layer's experts module in layer order): the engine's OffloadedExperts of an
    offloaded model, else the experts of the sparse blocks (a plain model, or an offloaded one whose budget
    held every expert)."""
    config = model.config.get_text_config()
    offloaded = sorted((m.layer, id(m), m) for m in model.modules() if isinstance(m, OffloadedExperts))
    if offloaded:
        return config, [m for *_, m in offloaded]
    blocks = find_moe_blocks(model, adapter_for(model.config))
    return config, [block.experts for block in blocks.values()]


def _moe_shape(config) -> tuple[int, int]:
    E = next(getattr(config, n) for n in ("num_experts", "num_local_experts", "n_routed_experts")
             if getattr(config, n, None))
    return E, config.num_experts_per_tok


def load_trace(path) -> tuple[torch.Tensor, int]:
    """(ids_NLK, num_experts) of a trace file, checked: ValueError naming the file and what is wrong."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != TRACE_FORMAT or "ids_NLK" not in f.keys():
            raise ValueError(f"{path} is not a moesys routing trace (metadata format={meta.get('format')!r}, "
                             f"tensors {list(f.keys())}); record one with moesys.offload.routing.RoutingRecorder")
        ids_NLK = f.get_tensor("ids_NLK").long()
    E, K = int(meta["num_experts"]), int(meta["top_k"])
    if ids_NLK.dim() != 3 or ids_NLK.shape[2] != K or ids_NLK.numel() == 0:
        raise ValueError(f"{path}: ids_NLK has shape {tuple(ids_NLK.shape)}, expected [N>0, L, top_k={K}]")
    if int(ids_NLK.min()) < 0 or int(ids_NLK.max()) >= E:
        raise ValueError(f"{path}: expert ids span [{int(ids_NLK.min())}, {int(ids_NLK.max())}], outside [0, {E})")
    return ids_NLK, E


class RoutingOverride:
    """Installs uniform or trace routing on `model` (see the module docstring); `remove()` undoes it."""

    def __init__(self, model, mode: str, *, seed: int = 0, trace=None):
        if mode not in ROUTING_MODES:
            raise ValueError(f"routing={mode!r} is unknown; use one of {list(ROUTING_MODES)}")
        config, modules = _experts_modules(model)
        self.E, self.K = _moe_shape(config)
        self.mode, self.seed, self.handles, self.generators = mode, seed, [], {}
        if mode == "trace":
            if trace is None:
                raise ValueError("routing='trace' needs a trace file (trace=PATH)")
            self.ids_NLK, trace_E = load_trace(trace)
            if (trace_E, self.ids_NLK.shape[2]) != (self.E, self.K):
                raise ValueError(f"{trace}: a trace of {trace_E} experts top-{self.ids_NLK.shape[2]} "
                                 f"cannot drive a model of {self.E} experts top-{self.K}")
            self.cursor = [0] * len(modules)
            self._on_device: dict = {}  # the trace per device it is read on
        if mode != "model":
            for r, module in enumerate(modules):
                self.handles.append(module.register_forward_pre_hook(self._hook(r)))

    def _hook(self, r: int):
        def swap(module, args):
            x_TH, ids_TK, w_TK = args[:3]
            return (x_TH, self.ids(r, ids_TK.shape[0], ids_TK.device).to(ids_TK.dtype), w_TK) + tuple(args[3:])
        return swap

    def ids(self, r: int, T: int, device: torch.device) -> torch.Tensor:
        """The ids_TK that MoE layer r uses for its next T tokens."""
        if self.mode == "uniform":
            g = self.generators.get(device)
            if g is None:
                g = self.generators[device] = torch.Generator(device).manual_seed(self.seed)
            # K distinct experts per token, each K-subset equally likely: the K smallest of E uniform keys
            return torch.rand(T, self.E, generator=g, device=device).topk(self.K, dim=1, largest=False).indices
        N, L = self.ids_NLK.shape[:2]
        table = self._on_device.get(device)
        if table is None:
            # copied once (int16: any id < 32768): a copy from pageable host memory per call waits for the
            # device's queue, one sync per layer, which the device bookkeeping's steps otherwise never have
            table = self._on_device[device] = self.ids_NLK.to(device, torch.int16)
        rows = (self.cursor[r] + torch.arange(T, device=device)) % N
        self.cursor[r] = (self.cursor[r] + T) % N
        return table[rows, r % L]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


FLUSH_CALLS = 256  # a recorder's ids stay on the device for this many calls of a layer


class RoutingRecorder:
    """Records the ids each MoE layer's experts receive (the model's routing, or an override's), in call
    order; `save(path)` writes a trace file (every call: a replay routes prefill and decode alike).
    `ids_NLK(decode_only=True)`: only the calls made in decode forwards (one token per sequence), what a
    decode step's cache sees: the prefill's tokens (and a left-padded batch prefill's padding rows) route
    as no decode step does."""

    def __init__(self, model):
        config, modules = _experts_modules(model)
        self._attach(modules, *_moe_shape(config))
        self.handles.append(model.register_forward_pre_hook(self._note_phase, with_kwargs=True))

    def _note_phase(self, module, args, kwargs):
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        self._decode = tokens is not None and tokens.dim() >= 2 and tokens.shape[1] == 1

    @classmethod
    def on_modules(cls, modules, num_experts: int, top_k: int) -> "RoutingRecorder":
        """A recorder on any experts modules called as `module(x_TH, topk_ids_TK, topk_weights_TK)`, in MoE
        layer order: a moesys MoETransformer's `[layer.experts for layer in model.moe_layers()]`."""
        rec = cls.__new__(cls)
        rec._attach(list(modules), num_experts, top_k)
        return rec

    def _attach(self, modules, E: int, K: int) -> None:
        self.E, self.K = E, K
        # whether the model forward under way decodes; None: unknown (on_modules watches no model)
        self._decode: bool | None = None
        self.chunks: list[list[torch.Tensor]] = [[] for _ in modules]
        self._pending: list[list[torch.Tensor]] = [[] for _ in modules]  # not yet brought to the host
        self.in_decode: list[list[bool | None]] = [[] for _ in modules]  # per chunk
        self.handles = [m.register_forward_pre_hook(self._hook(r)) for r, m in enumerate(modules)]

    def _hook(self, r: int):
        def record(module, args):
            # kept where they are (a copy to the host per call would sync every layer: the device
            # bookkeeping's steps have no sync otherwise), brought over every FLUSH_CALLS calls
            self._pending[r].append(args[1].detach().to(torch.int16, copy=True))
            self.in_decode[r].append(self._decode)
            if len(self._pending[r]) >= FLUSH_CALLS:
                self._to_host(r)
        return record

    def _to_host(self, r: int) -> None:
        """Layer r's ids still on the device appended to its host chunks (one copy)."""
        pending, self._pending[r] = self._pending[r], []
        if pending:
            self.chunks[r] += torch.cat(pending).cpu().split([c.shape[0] for c in pending])

    def ids_NLK(self, decode_only: bool = False) -> torch.Tensor:
        for r in range(len(self.chunks)):
            self._to_host(r)
        if not decode_only:
            return torch.stack([torch.cat(c) for c in self.chunks], dim=1)
        if any(flag is None for flags in self.in_decode for flag in flags):
            raise ValueError("this recorder knows no forward's phase (it watches experts modules, not a model): "
                             "record with RoutingRecorder(model) to keep the decode steps apart")
        return torch.stack([torch.cat([c for c, d in zip(chunks, flags) if d] or [torch.empty(0, self.K,
                                                                                          dtype=torch.int16)])
                            for chunks, flags in zip(self.chunks, self.in_decode)], dim=1)

    def save(self, path) -> None:
        tmp = f"{path}.tmp"
        # uint8 holds every id of up to 256 experts: half the bytes of int16 for a committed trace
        dtype = torch.uint8 if self.E <= 256 else torch.int16
        save_file({"ids_NLK": self.ids_NLK().to(dtype).contiguous()}, tmp,
                  metadata={"format": TRACE_FORMAT, "version": "1", "num_experts": str(self.E), "top_k": str(self.K)})
        os.replace(tmp, path)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

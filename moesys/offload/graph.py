"""Decode steps replayed from a CUDA graph: batch 1, and a batch's steps (moesys.offload.batch).

A decode step of a transformers model is hundreds of small kernels, and launching them from Python costs
more than running them (24-41 ms of host time per token for the OLMoE-1B-7B shape on the H200 machine,
against 3.7 ms replayed: bench/results/offload_graph_probe.json). With a static KV cache (transformers'
StaticCache, whose shapes never change) and an offload engine whose decode path never syncs
(moesys.offload.device_cache), the whole step is captured once and replayed for every token.

`install(model, engine)` wraps `model.forward`. A call takes the graph when it decodes one token per
row with a compileable cache, without autograd, on CUDA: one row (input_ids with one element), or B rows
(input_ids [B, 1]) with a 4D attention mask, per-row position_ids and an engine whose banks hold the
min(B x K, E) experts a step may need (moesys.offload.batch's graph decode passes exactly that). The first
such call for a given cache and argument layout runs eagerly (the warm-up: Triton kernels compile, lazy
buffers are made); the second captures; every later one copies its tensor arguments into the captured
ones and replays. Anything else (prefill, a DynamicCache, a 2D padding mask) runs the model as before. On
a CPU the eligible calls run eagerly through the same sync-free path, so tests exercise it there.

`install(model, engine, compile=True)` (moesys.offload.load's default on CUDA) captures torch.compile's
step instead of the eager one: inductor fuses the norms, rotary embedding and routing math (on the H200
the OLMoE-1B-7B shape fully on the GPU decodes at 446 tok/s replaying the compiled step, 266 replaying
the eager one: bench/results/offload_77fe6bf.json). Of the engine, the compiled step sees only opaque
custom ops: for unquantized experts the cache step (moesys.offload.engine.offload_slots: bookkeeping and
copies), after which the model's own grouped experts module runs traced over the slot pool (its glue
fused as for the model fully on the GPU: 436 instead of 772 kernels per step for the OLMoE-1B-7B shape);
for quantized experts the whole layer (offload_experts). The first two eligible calls run the compiled
step eagerly (the compile happens in the first); the third captures.

Nothing may compile while a graph is being captured (dynamo's tracing makes host tensors and copies, which a
capture refuses), and a replay freezes every Python value the step read: warm-up steps go on, up to
MAX_WARMUP_STEPS, until one compiled nothing and left the cache's Python scalars as it found them.

Sliding windows (GPT-OSS, and any model with transformers' StaticSlidingWindowLayer): such a layer counts its
tokens in a Python int, read to pick its update branch, to size and offset the sliding mask and (layer 0)
to derive the positions; a compiled step guards on it, so it would recompile at every token, and a replay
would freeze it. While a window fills, each fill level is its own step: those steps run eagerly, uncompiled
(`filling_steps`). Once every window is full, a one-token step takes the same branch at every count, so
DecodeGraph builds the masks (as generate() does for a static cache, `create_masks_for_generate`) and the
position from the true count outside the step, passes them in, and runs the step with the counters pinned at
the window size (`_pinned_counters`), advancing the true counts itself after each step, replayed or not.

Any other cache scalar changed by two warm-up steps in a row is taken for a counter at once. A layout still
unsettled (or with such a counter) then decodes uncompiled without a graph from there on, one whose capture
fails without a graph (a warning says why; `fallback_reason` keeps it), and so does a model whose step is
known not to be capturable (`capture_blocker`): float32 or float16 experts with transformers' grouped_mm,
which under torch.compile loops over the experts after reading their row counts back to the host.

Legend: V vocabulary.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings

import torch

# warm-up steps a layout may take before the capture, at most: it must stop compiling by then
MAX_WARMUP_STEPS = 8


def _frames_compiled() -> int:
    """Frames dynamo has compiled in this process so far: a warm-up step that moved it compiled something."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def _python_state(kwargs, skip=frozenset()) -> dict[str, object]:
    """The Python scalars of the static cache in `kwargs` and of its layers ("layers[i].name": value), but
    those named in `skip` (the window counters DecodeGraph keeps itself)."""
    state = {}
    for value in kwargs.values():
        if _is_static_cache(value):
            layers = [(f"layers[{i}].", layer) for i, layer in enumerate(getattr(value, "layers", ()))]
            for prefix, obj in [("", value)] + layers:
                attrs = getattr(obj, "__dict__", {})  # (none to compare on an object with __slots__)
                state.update({prefix + k: v for k, v in attrs.items()
                              if isinstance(v, (bool, int, float, str)) and prefix + k not in skip})
    return state


def _window_layers(cache) -> list[tuple[int, object]]:
    """(index, layer) of the cache layers that count their tokens in a Python int: transformers'
    StaticSlidingWindowLayer (`cumulative_length_int`, its window `max_cache_len`)."""
    return [(i, layer) for i, layer in enumerate(getattr(cache, "layers", ()))
            if getattr(layer, "is_sliding", False) and isinstance(getattr(layer, "cumulative_length_int", None), int)
            and isinstance(getattr(layer, "max_cache_len", None), int)]


@contextlib.contextmanager
def _pinned_counters(layers):
    """Run a one-token step with every full window layer's token counter pinned at its window size, and
    leave it one token further than it was (as far as it was, should the step raise).

    Once a window is full, a one-token step of transformers' sliding-window layer reads the counter only to
    take the "full" branch (roll the window, write the last slot), to size the mask and to derive the
    positions; DecodeGraph builds the masks and positions outside the step from the true count. Pinned, the
    counter is the same at every step: a compiled step's guard on it holds, and a replay (which runs no
    Python, so never counts) freezes the value the step would read anyway. The true count is kept here."""
    counts = [layer.cumulative_length_int for layer in layers]
    for layer in layers:
        layer.cumulative_length_int = layer.max_cache_len
    done = False
    try:
        yield
        done = True
    finally:
        for layer, n in zip(layers, counts):
            layer.cumulative_length_int = n + 1 if done else n


def _moved_names(before: dict, after: dict) -> list[str]:
    """The names of the Python values that a step changed, sorted."""
    return [name for name in sorted(before.keys() | after.keys()) if before.get(name) != after.get(name)]


def _moved_state(before: dict, after: dict, names: list[str] | None = None) -> str | None:
    """The first Python value (of `names`, default any) that a step changed, as "name (old -> new)", or None."""
    for name in _moved_names(before, after) if names is None else names:
        return f"{name} ({before.get(name)} -> {after.get(name)})"
    return None


def capture_blocker(model, compile: bool) -> str | None:
    """Why the model's decode step cannot be captured in a CUDA graph, known before trying, or None."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    impl = getattr(text, "_experts_implementation", None) or getattr(config, "_experts_implementation", None)
    dtype = next(model.parameters()).dtype
    if compile and impl == "grouped_mm" and dtype != torch.bfloat16:
        return (f"transformers' grouped_mm runs {dtype} experts under torch.compile as a loop over the experts that "
                "reads their row counts back to the host (its grouped GEMM is bfloat16-only there), which a CUDA "
                "graph cannot capture; load in bfloat16, or with compile=False")
    return None


def _is_static_cache(value) -> bool:
    return getattr(value, "is_compileable", False) and hasattr(value, "get_seq_length")


class DecodeGraph:
    def __init__(self, model, engine=None, compile: bool = False):
        self.engine = engine
        self.eager_forward = model.forward
        # compile: the step the graph captures is torch.compile's (inductor fuses the norms, rotary embedding
        # and routing math into a few kernels; the engine's cache step stays opaque: moesys::offload_slots or,
        # for quantized experts, moesys::offload_experts)
        self.step_forward = torch.compile(self.eager_forward, dynamic=False) if compile else self.eager_forward
        self.cuda = next(model.parameters()).device.type == "cuda"
        self.model = model
        self.forward_params = set(inspect.signature(self.eager_forward).parameters)
        self.captures = self.replays = self.eager_steps = 0
        # of eager_steps: steps with sliding windows outside the graph's case (a window still filling, a batch,
        # masks that are not tensors), run uncompiled
        self.filling_steps = 0
        self.window_mask_error: str | None = None  # why the masks of a sliding-window step could not be built
        # why steps run without a graph (None: they are captured): known at install, or found on the way
        self.fallback_reason = None
        blocker = capture_blocker(model, compile) if self.cuda else None
        if blocker is not None:
            self._give_up(blocker)
        self._reset()

    def _reset(self) -> None:
        self.key = None
        self.warm = 0
        # why the last warm-up step was not the last one needed (None: capture next); none ran yet
        self.warm_unsettled: str | None = "no warm-up step ran"
        self.last_moved: list[str] = []  # the cache scalars the last warm-up step changed
        self.graph = None
        self.static_inputs: dict[tuple[str, str | None], torch.Tensor] = {}
        self.static_output = None

    def release(self) -> None:
        """Drop the captured graph, its memory pool and its static inputs and output (which hold the step's
        cache): the next eligible step warms up and captures again."""
        self._reset()

    def _signature(self, args, kwargs):
        """(kwargs with every argument named, key of the captured layout, rows) or None when not eligible."""
        if args:
            kwargs = {"input_ids": args[0], **kwargs}
            if len(args) > 1:
                return None
        if self.engine is not None and self.engine.device_path_unsupported is not None:
            return None  # its layers read the routing back to the host: nothing a graph can replay
        ids = kwargs.get("input_ids")
        if ids is None or kwargs.get("inputs_embeds") is not None or torch.is_grad_enabled():
            return None
        rows = 1 if ids.numel() == 1 else ids.shape[0] if ids.dim() == 2 and ids.shape[1] == 1 else None
        if rows is None:
            return None
        caches = [v for v in kwargs.values() if _is_static_cache(v)]
        if len(caches) != 1:
            return None
        mask = kwargs.get("attention_mask")
        if rows > 1:
            # a batch: its padding mask prepared (4D: no mask building that syncs), positions per row, and
            # banks that hold what its rows may need at once (no engine: every expert resident, nothing to hold)
            if self.engine is not None and self.engine.device_batch_unsupported(rows) is not None:
                return None
            if not (isinstance(mask, torch.Tensor) and mask.dim() == 4) or \
                    not isinstance(kwargs.get("position_ids"), torch.Tensor):
                return None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            # a 2D padding mask grows by one column per token (no fixed shape to capture); at batch 1 it is
            # all ones, which is what the model assumes without it
            if not bool(mask.all()):
                return None
            kwargs = {k: v for k, v in kwargs.items() if k != "attention_mask"}
        key = []
        for name in sorted(kwargs):
            value = kwargs[name]
            if isinstance(value, torch.Tensor):
                key.append((name, tuple(value.shape), value.dtype, value.device))
            elif isinstance(value, dict):  # per-layer-type masks (sliding / full attention)
                if not all(v is None or isinstance(v, torch.Tensor) for v in value.values()):
                    return None
                key.append((name, tuple((k, None if v is None else (tuple(v.shape), v.dtype, v.device))
                                        for k, v in sorted(value.items()))))
            elif _is_static_cache(value):
                key.append((name, id(value)))
            else:
                try:
                    hash(value)
                except TypeError:
                    return None
                key.append((name, value))
        return kwargs, tuple(key), rows

    def __call__(self, *args, **kwargs):
        sig = self._signature(args, kwargs)
        if sig is None:
            return self.eager_forward(*args, **kwargs)
        kwargs, key, rows = sig
        if self.engine is not None:
            self.engine.ensure_device_tables()
            self.engine.note_device_step(rows)
        cache = next(v for v in kwargs.values() if _is_static_cache(v))
        windows = _window_layers(cache)
        if not windows:
            return self._step(kwargs, key)
        # sliding-window layers: full, a one-token step no longer depends on their counters (_pinned_counters);
        # still filling, each fill level is a step of its own (a branch, a mask size): eager, uncompiled, as
        # are batches (their rows' windows fill apart) and masks that are not tensors
        inputs = None
        if rows == 1 and all(layer.cumulative_length_int >= layer.max_cache_len for _, layer in windows):
            inputs = self._window_inputs(kwargs, cache, windows[0][1].cumulative_length_int)
        if inputs is None:
            self.eager_steps += 1
            self.filling_steps += 1
            with self._device_decode():
                return self.eager_forward(**kwargs)
        skip = frozenset(f"layers[{i}].cumulative_length_int" for i, _ in windows)
        with _pinned_counters([layer for _, layer in windows]):
            return self._step(inputs, key + (("window-inputs", tuple(sorted(inputs.keys() - kwargs.keys()))),),
                              skip)

    def _window_inputs(self, kwargs, cache, seen: int) -> dict | None:
        """`kwargs` (whose static cache is `cache`) with what a step of a full sliding-window cache must not
        derive from the cache's counters: the position (cache_position, or position_ids where the model has
        no cache_position: transformers >= 5.2x) and the per-layer-type masks, built here as generate()
        builds them for a static cache, from the true count of tokens `seen`. None where a mask is not a
        tensor (flex attention's BlockMask)."""
        ids = kwargs["input_ids"]
        out = dict(kwargs)
        if "cache_position" in self.forward_params:
            if out.get("cache_position") is None:
                out["cache_position"] = torch.tensor([seen], device=ids.device)
        elif "position_ids" in self.forward_params and out.get("position_ids") is None:
            out["position_ids"] = torch.tensor([[seen]], device=ids.device)
        if not isinstance(out.get("attention_mask"), dict):
            from transformers import masking_utils

            make = getattr(self.model, "create_masks_for_generate", masking_utils.create_masks_for_generate)
            names = inspect.signature(make).parameters
            # only the batch size, query length, dtype and device of the embeddings are read
            embeds = torch.empty((1, 1, 0), dtype=self.model.dtype, device=ids.device)
            args = {"config": self.model.config, "attention_mask": out.get("attention_mask"),
                    "position_ids": out.get("position_ids"), "cache_position": out.get("cache_position"),
                    # the names of transformers >= 5.2x, else the older ones
                    "cache" if "cache" in names else "past_key_values": cache,
                    "inputs_embeds" if "inputs_embeds" in names else "input_embeds": embeds}
            try:
                masks = make(**{k: v for k, v in args.items() if k in names})
            except TypeError as e:  # a model's own mask builder that wants more than generate() passes
                if not self.window_mask_error:
                    warnings.warn(f"moesys decode graph: sliding-window steps run without a graph: building their "
                                  f"masks outside the step failed ({e})", stacklevel=4)
                self.window_mask_error = str(e)
                return None
            if isinstance(masks, dict):
                if not all(m is None or isinstance(m, torch.Tensor) for m in masks.values()):
                    return None
            elif masks is not None and not isinstance(masks, torch.Tensor):
                return None
            out["attention_mask"] = masks
        return out

    def _step(self, kwargs, key, skip=frozenset()):
        """One eligible step: warm-up, capture or replay of the layout `key` (eager on the CPU and after
        giving up); `skip`: cache scalars kept outside the step (_pinned_counters)."""
        if key != self.key:
            self._reset()
            self.key = key
        if not self.cuda or self.fallback_reason is not None:
            return self._eager_step(kwargs)  # the CPU path, and steps that cannot be captured
        # warm-up steps until one compiled nothing and left the cache's Python state as it found it: one
        # uncompiled, two or more compiled (the first compiles, and a compiled step may specialise on the first
        # step's values once more on the second). Recompiling or autotuning must not happen during a capture,
        # and a replay would freeze any Python value the step reads from the cache.
        if self.graph is None and self.warm_unsettled is not None:
            if self.warm >= MAX_WARMUP_STEPS:
                self._give_up(f"{self.warm_unsettled} at its warm-up step {self.warm}", eager=True)
                return self._eager_step(kwargs)
            before, state = _frames_compiled(), _python_state(kwargs, skip)
            out = self._eager_step(kwargs)  # warm-up: compiles, autotunes, makes lazy buffers
            self.warm += 1
            after = _python_state(kwargs, skip)
            names, moved, again = _moved_names(state, after), None, None
            if names:
                # a scalar that two steps in a row changed counts steps: it never settles, and a compiled step
                # guards on it, so each further warm-up step would recompile the whole model (minutes for
                # GPT-OSS-20B before its window counters were kept apart): give up now, not at MAX_WARMUP_STEPS
                again = [name for name in names if name in self.last_moved] or None
                moved = _moved_state(state, after, again or names)
            self.last_moved = names
            self.warm_unsettled = (
                "the compiled step still recompiled" if _frames_compiled() != before and not again else
                f"the cache's {moved} changes at every step (a Python value that a replayed graph would "
                "freeze)" if moved else None)
            if again:
                self._give_up(f"{self.warm_unsettled} at its warm-up step {self.warm}", eager=True)
            return out
        if self.graph is None:
            try:
                self._capture(kwargs)
            except RuntimeError as e:  # nothing ran (a capture only records): the step runs eagerly instead
                self.graph = self.static_output = None
                self.static_inputs = {}
                if self.engine is not None:
                    self.engine.forget_captured_prefetches()
                self._give_up(f"its capture failed: {e}")
                return self._eager_step(kwargs)
        for (name, sub), t in self.static_inputs.items():
            t.copy_(kwargs[name] if sub is None else kwargs[name][sub])
        self.graph.replay()
        self.replays += 1
        return self.static_output

    def _eager_step(self, kwargs):
        self.eager_steps += 1
        with self._device_decode():
            return self.step_forward(**kwargs)

    def _give_up(self, reason: str, eager: bool = False) -> None:
        """Every later step runs without a graph (through the same sync-free path), said once; `eager`: and
        uncompiled, since a compiled step whose inputs never settle would only recompile (to dynamo's limit)."""
        self.fallback_reason = reason
        if eager:
            self.step_forward = self.eager_forward
        warnings.warn(f"moesys decode graph: decode steps run without a CUDA graph from here on: {reason}",
                      stacklevel=4)

    def _capture(self, kwargs) -> None:
        static = dict(kwargs)
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                static[name] = self.static_inputs[(name, None)] = value.clone()
            elif isinstance(value, dict):
                static[name] = {k: v if v is None else self.static_inputs.setdefault((name, k), v.clone())
                                for k, v in value.items()}
        graph = torch.cuda.CUDAGraph()
        with self._device_decode(), torch.cuda.graph(graph):
            self.static_output = self.step_forward(**static)
        self.graph = graph
        self.captures += 1

    def _device_decode(self):
        """The engine's layers take their sync-free path (the graph strategy) for the steps run in here."""
        return contextlib.nullcontext() if self.engine is None else self.engine.graph_step()


def install(model, engine=None, compile: bool = False) -> DecodeGraph:
    """Wrap `model.forward` so decode steps with a static cache replay a CUDA graph (of the
    torch.compile'd step when `compile`); returns the DecodeGraph (also at `model.moesys_decode_graph`).
    transformers' generate() then uses a StaticCache when the generation config says so
    (`cache_implementation="static"`), and must not torch.compile the forward itself
    (`disable_compile=True`): moesys.offload.load sets both on CUDA."""
    decoder = DecodeGraph(model, engine, compile)

    @functools.wraps(decoder.eager_forward)
    def forward(*args, **kwargs):
        return decoder(*args, **kwargs)

    model.forward = forward
    model.moesys_decode_graph = decoder
    return decoder

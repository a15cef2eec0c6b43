"""`load()`: a transformers model whose sparse MoE experts are offloaded (moesys.offload's public API).

Steps: config.json -> model skeleton on the meta device (never trust_remote_code) -> memory plan (fails
before anything is read if the budget cannot hold the non-expert weights, a workspace and one expert per
MoE layer) -> non-expert weights to the device -> host expert store -> expert cache -> each block's
experts module replaced by an OffloadedExperts.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from moesys.hf.meta import materialize_meta_buffers, still_meta
from moesys.offload import exact as exact_mode
from moesys.offload import graph as decode_graph
from moesys.offload.adapters import adapter_for, find_moe_blocks, router_of
from moesys.offload.cache import CACHE_POLICIES, ExpertCache
from moesys.offload.cache_bytes import CacheBytes
from moesys.offload.cache_bytes import measure as measure_cache
from moesys.offload.dequant_slots import workspace_bytes
from moesys.offload.engine import CPU_EXPERT_MODES, OffloadedExperts, OffloadEngine
from moesys.offload.layout import ExpertLayout, expert_dims, is_experts_module
from moesys.offload.prefetch import PREFETCH_POLICIES, NextGatePrefetcher
from moesys.offload.quant import QUANT_MODES
from moesys.offload.sizes import format_bytes, parse_bytes
from moesys.offload.source import SafetensorsSource
from moesys.offload.store import HOST_MODES, HostExpertStore, parts_nbytes, slot_parts

_OPTIONS = {"cache_policy": "auto", "prefetch": "next-gate", "quantize_experts": "none", "cpu_experts": "off",
            "host_memory": "auto", "device": None, "max_context": 4096, "reserve": None,
            "experts_implementation": None, "group_size": 128, "bank_size": 1023, "resident_if_fits": True,
            "cuda_graph": True, "compile": None, "exact": False}


@dataclass
class MemoryPlan:
    budget: int
    resident_bytes: int  # non-expert weights
    reserve_bytes: int   # KV cache for max_context, activations, dequantization workspace
    slot_bytes: int      # one expert in the cache
    num_slots: int
    total_experts: int
    num_moe_layers: int
    # the generation cache of one sequence (KV per token, a hybrid's states): the reserve holds max_context
    # tokens of it, which a batch's rows share (moesys.offload.cache_bytes)
    cache: CacheBytes = CacheBytes()

    @property
    def min_budget(self) -> int:
        return self.resident_bytes + self.reserve_bytes + self.num_moe_layers * self.slot_bytes

    def describe(self) -> str:
        return (f"non-expert weights {format_bytes(self.resident_bytes)}, workspace "
                f"{format_bytes(self.reserve_bytes)}, cache {self.num_slots}/{self.total_experts} experts of "
                f"{format_bytes(self.slot_bytes)}; generation cache {self.cache.describe()}")


def _resolve_options(options: dict) -> dict:
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise TypeError(f"moesys.offload.load: unknown option(s) {sorted(unknown)}; allowed: {sorted(_OPTIONS)}")
    opts = {**_OPTIONS, **options}
    for key, allowed in (("cache_policy", CACHE_POLICIES), ("prefetch", PREFETCH_POLICIES),
                         ("quantize_experts", QUANT_MODES), ("cpu_experts", CPU_EXPERT_MODES),
                         ("host_memory", HOST_MODES)):
        if opts[key] not in allowed:
            raise ValueError(f"{key}={opts[key]!r} is not allowed; use one of {list(allowed)}")
    if not isinstance(opts["cuda_graph"], bool):
        raise ValueError(f"cuda_graph={opts['cuda_graph']!r} must be True or False")
    if opts["compile"] not in (None, True, False):
        raise ValueError(f"compile={opts['compile']!r} must be None (on with CUDA graphs on CUDA), True or False")
    if opts["compile"] and not opts["cuda_graph"]:
        raise ValueError("compile=True compiles the CUDA-graph decode step; it needs cuda_graph=True")
    if not isinstance(opts["exact"], bool):
        raise ValueError(f"exact={opts['exact']!r} must be True or False")
    if opts["exact"]:
        opts = exact_mode.check_options(opts, options)
    return opts


def _resolve_dtype(dtype, config) -> torch.dtype:
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype; use e.g. 'bfloat16' or torch.bfloat16")
        dtype = getattr(torch, dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype} is not supported; use torch.bfloat16, torch.float16 or torch.float32")
    return dtype


def build_skeleton(config, dtype: torch.dtype, experts_implementation: str | None = None) -> nn.Module:
    """The transformers model for `config` with every parameter on the meta device."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval()


# tokens of one prefill forward the activation reserve is sized for (moesys.offload.batch groups its
# joining prompts so that a group's padded tokens stay within it)
PREFILL_RESERVE_TOKENS = 1024


def plan_memory(model: nn.Module, blocks: dict, dtype: torch.dtype, gpu_memory, *, quantize_experts="none",
                max_context=4096, reserve=None, group_size=128) -> MemoryPlan:
    """How the budget splits; raises ValueError if it cannot hold one expert per MoE layer."""
    budget = parse_bytes(gpu_memory)
    config = model.config.get_text_config()
    expert_params = {id(p) for b in blocks.values() for p in b.experts.parameters()}
    elsize = torch.empty((), dtype=dtype).element_size()
    resident = sum(p.numel() for p in model.parameters() if id(p) not in expert_params) * elsize
    E, I, H, layout = expert_dims(next(iter(blocks.values())).experts)
    K = getattr(config, "num_experts_per_tok", 1)
    slot_bytes = parts_nbytes(slot_parts(I, H, dtype, quantize_experts, group_size, layout))
    cache = measure_cache(model.config, dtype)
    if reserve is None:
        heads = config.num_attention_heads
        kv = cache.reserve_bytes(max_context)
        prefill = min(max_context, PREFILL_RESERVE_TOKENS)
        act = prefill * (K * (3 * H + 4 * I) + 12 * H) * elsize + prefill * heads * prefill * 4
        dequant = 0 if quantize_experts == "none" else workspace_bytes(K, 3 * I * H, elsize)
        reserve = kv + act + dequant + 8 * config.vocab_size * 4 + 64 * 2**20
    plan = MemoryPlan(budget, resident, int(reserve), slot_bytes, 0, E * len(blocks), len(blocks), cache)
    if budget < plan.min_budget:
        raise ValueError(
            f"gpu_memory={format_bytes(budget)} is too small for this model: non-expert weights need "
            f"{format_bytes(resident)}, the workspace (KV cache for max_context={max_context}, activations) "
            f"{format_bytes(plan.reserve_bytes)}, and one expert per MoE layer {len(blocks)} x "
            f"{format_bytes(slot_bytes)}; give at least {format_bytes(plan.min_budget)}, or lower max_context"
            + (", or use quantize_experts='int4'" if layout == ExpertLayout() else ""))
    plan.num_slots = min(plan.total_experts, (budget - resident - plan.reserve_bytes) // slot_bytes)
    return plan


def _load_non_experts(model: nn.Module, source, adapter, device, dtype) -> None:
    state = {}
    for disk_name, tensor in source.non_expert_items():
        state[adapter.module_name(disk_name)] = tensor.to(device=device,
                                                          dtype=dtype if tensor.is_floating_point() else None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"checkpoint tensors {unexpected[:5]} match no module of {type(model).__name__}; "
                         "is config.json's model_type right for these files?")
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    materialize_meta_buffers(model, device)  # rotary inv_freq: in no checkpoint
    expert_params = {id(p) for m in model.modules() if is_experts_module(m) for p in m.parameters()}
    left = still_meta(model, expert_params)
    if left:
        raise ValueError(f"weights {left[:5]} (and {max(0, len(left) - 5)} more) are missing from the checkpoint")


def _host_mode(mode: str, device: torch.device, expert_total_bytes: int) -> str:
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "memory"
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = None
    # pin only what leaves the host comfortable room; else read through the page cache
    return "pinned" if avail is None or expert_total_bytes < 0.7 * avail else "mmap"


def build(config, source, *, gpu_memory, dtype=None, model_dir=None, **options) -> nn.Module:
    """Offloaded model from a config and a weight source (see moesys.offload.source)."""
    opts = _resolve_options(options)
    dtype = _resolve_dtype(dtype, config)
    device = torch.device(opts["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    adapter = adapter_for(config)
    model = build_skeleton(config, dtype, opts["experts_implementation"])
    blocks = find_moe_blocks(model, adapter)
    E, I, H, layout = expert_dims(next(iter(blocks.values())).experts)
    for layer in blocks:
        source.check_experts(layer, E, I, H, layout)
    plan = plan_memory(model, blocks, dtype, gpu_memory, quantize_experts=opts["quantize_experts"],
                       max_context=opts["max_context"], reserve=opts["reserve"], group_size=opts["group_size"])

    _load_non_experts(model, source, adapter, device, dtype)
    mode = _host_mode(opts["host_memory"], device, plan.total_experts * plan.slot_bytes)
    if mode == "pinned" and device.type != "cuda":
        mode = "memory"  # page-locking only helps copies to CUDA
    store = HostExpertStore(source, list(blocks), E, I, H, dtype, mode=mode, quantize=opts["quantize_experts"],
                            group_size=opts["group_size"], work_device=device, layout=layout)
    top_k = getattr(config.get_text_config(), "num_experts_per_tok", 1)
    cache = ExpertCache(store.parts, plan.num_slots, device, opts["cache_policy"], list(blocks), E,
                        bank_size=opts["bank_size"], top_k=top_k)
    inner = {layer: block.experts for layer, block in blocks.items()}
    prefetcher = None
    if opts["prefetch"] == "next-gate" and len(blocks) > 1:
        prefetcher = NextGatePrefetcher({layer: router_of(b) for layer, b in blocks.items()}, top_k)
    engine = OffloadEngine(store=store, cache=cache, inner=inner, device=device, prefetcher=prefetcher,
                           cpu_experts=opts["cpu_experts"])
    engine.plan, engine.host_mode, engine.max_context = plan, mode, opts["max_context"]
    resident = engine.make_resident() if opts["resident_if_fits"] else None
    for layer, block in blocks.items():
        # a budget holding every expert: the model runs as if fully on the device (no engine per layer)
        block.experts = resident[layer] if resident is not None else OffloadedExperts(engine, layer)
    model.moesys_offload = engine
    if model_dir is not None:
        _load_generation_config(model, model_dir)
    if opts["cuda_graph"]:
        # batch-1 decode with a static KV cache replays one CUDA graph per step (moesys.offload.graph);
        # generate() then uses a StaticCache
        compile_step = opts["compile"] if opts["compile"] is not None else device.type == "cuda"
        decode_graph.install(model, engine if resident is None else None, compile=compile_step)
        if device.type == "cuda":
            model.generation_config.cache_implementation = "static"
    if device.type == "cuda":
        # transformers would torch.compile the forward for a static cache, tracing the engine (which reads
        # routing back on its host path) or the decode graph's wrapper: neither can be traced
        model.generation_config.disable_compile = True
    _attach_timing(model, engine)
    _attach_context_guard(model, opts["max_context"])
    if opts["exact"]:
        exact_mode.enable(model)
    return model


def load(model_dir, *, gpu_memory, dtype=None, **options) -> nn.Module:
    """A transformers model (its `generate()` works as usual) with experts offloaded to host memory.

    Args:
        model_dir: a transformers v5 checkpoint directory (config.json + *.safetensors) of an architecture
            whose experts are stored per expert: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, and any other whose
            names transformers' checkpoint conversion mapping gives (tested: DeepSeek-V2/V3, GLM-4-MoE,
            PhiMoE, Jamba, Qwen3-Next, and non-gated Nemotron-H), or fused per layer under the in-memory
            names (GPT-OSS, bf16: its transposed, interleaved gate/up with biases and clamped SwiGLU;
            quantized checkpoints such as MXFP4 are refused, dequantize them first). Quantized experts
            (int8/int4) are plain gated experts only.
        gpu_memory: the device memory budget, bytes (int) or a string like "16GiB".
        dtype: compute dtype (default: the config's dtype).
        options: cache_policy "auto"|"next-visit"|"lru"|"lfu" (auto: next-visit on the host path, which
            evicts from the layer visited furthest ahead; in the decode graph's device bookkeeping LRU, or LFU
            when a bank holds so few slots that a batch-1 decode under LRU could never hit:
            moesys.offload.cache), prefetch "next-gate"|"none", quantize_experts "none"|"int8"|"int4",
            cpu_experts "off"|"auto"|"on" (default "off": experts computed on the CPU round differently, so
            only "off" keeps greedy output bit-identical to the model fully on the device), host_memory "auto"|"pinned"|"memory"|"mmap", device,
            max_context (tokens the KV cache is planned for), reserve (workspace bytes, overrides the
            estimate), experts_implementation, group_size (quantization group), bank_size (cache slots
            per bank, at most 1023: torch's grouped GEMM takes fewer than 1024 groups), resident_if_fits
            (default True: when the budget holds every expert, load them all once and run the model as if
            fully on the device, without the engine in each layer's forward), cuda_graph (default True:
            batch-1 decode with a static KV cache keeps the cache bookkeeping on the device and replays each
            step as one CUDA graph; on CUDA, generate() then uses a StaticCache. False: every step runs
            eagerly, the routing read back per layer, with speculative prefetch and CPU experts), compile
            (default None: on CUDA with cuda_graph; the captured decode step is torch.compile'd first, so
            inductor fuses the model's kernels around the expert cache; the first decode step then takes a
            compile, about a minute for a 16-layer model, cached by inductor on disk for later loads; the
            logits are then those of the model under the same compiled step, bit for bit, and with False
            those of the eager model), exact (default False; True: greedy tokens of a sequence in any batch
            equal its tokens alone, bit for bit in every dtype: batch-invariant matmuls, sums and attention,
            the experts' per-expert loop, no CUDA graph; slower; moesys.offload.exact).
    Statistics: `model.moesys_offload.snapshot()` (an OffloadStats; `.summary()`, `.as_dict()`).
    """
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"model_dir={str(model_dir)!r} has no config.json; pass a transformers checkpoint directory")
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    source = SafetensorsSource(model_dir, adapter_for(config))
    return build(config, source, gpu_memory=gpu_memory, dtype=dtype, model_dir=model_dir, **options)


def _load_generation_config(model, model_dir) -> None:
    if os.path.isfile(os.path.join(model_dir, "generation_config.json")):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(model_dir)


def _attach_timing(model: nn.Module, engine: OffloadEngine) -> None:
    """Prefill / decode tokens and seconds per forward, through the model's public hook API. On CUDA each
    forward is bracketed by two timing events rather than a sync (a sync per decode step would stall the
    host between replayed steps); the engine reads them when its statistics are read."""
    started = {}

    def pre(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        started["shape"] = tuple(ids.shape[:2]) if ids is not None else (1, 1)
        if engine.cuda:
            started["event"] = torch.cuda.Event(enable_timing=True)
            started["event"].record()
        else:
            started["t0"] = time.perf_counter()

    def post(module, args, kwargs, output):
        B, T = started["shape"]
        if engine.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            engine.record_forward(B, T, (started["event"], end))
        else:
            engine.record_forward(B, T, time.perf_counter() - started["t0"])

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True)


def _kv_tokens(cache, new_tokens: int) -> int | None:
    """Tokens of KV cache this forward needs: a static cache's full length (allocated whole), else what is
    cached plus the new tokens. Host-side numbers only (no device read: decode steps must not sync)."""
    if cache is None:
        return new_tokens
    if getattr(cache, "is_compileable", False):  # StaticCache: fixed length
        for name in ("get_max_length", "get_max_cache_shape"):  # transformers >= 5.2x / earlier
            fn = getattr(cache, name, None)
            length = fn() if fn is not None else None
            if isinstance(length, int) and length > 0:
                return length
        return None
    return cache.get_seq_length() + new_tokens


def _attach_context_guard(model: nn.Module, max_context: int) -> None:
    """The memory plan reserved KV cache for `max_context` tokens; a longer generation would take more
    device memory than the budget allows, so it stops with a message before the forward runs."""

    def check(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        needed = _kv_tokens(cache, ids.shape[1] if ids is not None else 0)
        if needed is not None and needed > max_context:
            raise ValueError(f"this generation needs a KV cache of {needed} tokens, but the memory plan reserved "
                             f"max_context={max_context}; load with max_context>={needed} (CLI --max-context) "
                             f"or generate fewer tokens")

    model.register_forward_pre_hook(check, with_kwargs=True)

"""The device-side decode path of moesys.offload (device_cache, slot_copy, graph): the bookkeeping on the
device makes the same hits, misses and evictions as the host path, the experts it copies land in their
slots bit for bit, greedy generation with a StaticCache equals transformers' with a StaticCache, and the
hand-over between the host and device paths keeps the cache consistent. On CUDA the same steps are
captured as a CUDA graph and replayed (the GPU tests at the end)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import moesys.offload as mo
from moesys.offload import quant, slot_copy
from tests.test_offload import CONFIGS, DEVICE, NEW_TOKENS, _budget, _prompt, _reference  # noqa: F401
from tests.test_offload import checkpoints  # noqa: F401  (the module-scoped fixture)

# disable_compile: transformers would otherwise torch.compile the forward for a static cache on CUDA
STATIC = dict(max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static", disable_compile=True)


def _static_reference(path, dtype, prompt):
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(DEVICE)
    return ref.generate(prompt, **STATIC)


def _slots_hold_their_experts(engine):
    """Every expert the host bookkeeping lists as resident sits in its slot, bit for bit."""
    cache, store = engine.cache, engine.store
    assert cache.slot_of, "nothing resident"
    for (layer, e), slot in cache.slot_of.items():
        src = store._views(store.arena[store.row_index(layer, e)])
        for name, pool in cache.pools.items():
            assert torch.equal(pool[slot].cpu(), src[name]), (layer, e, slot, name)


def _table_matches_host(engine):
    cache = engine.cache
    want = torch.full_like(cache.slot_table_LE, -1)
    for (layer, e), slot in cache.slot_of.items():
        want[cache.row[layer], e] = slot - cache.banks[cache.bank_of[layer]][0]
    assert torch.equal(cache.slot_table_LE, want)


@pytest.mark.parametrize("parts", [[(8, 24)], [(3, 13)], [(2, 6)], [(256 + 4, 40)],
                                   [(0, 48), (64, 16), (256, 120)],                  # one launch, 3 parts
                                   [(0, 8), (8, 16), (24, 8), (32, 40), (256, 64)]])  # two launches: 4 + 1
@pytest.mark.parametrize("block", [4, None])
@pytest.mark.parametrize("use_kernel, programs", [(False, None), (True, None), (True, 3)],
                         ids=["reference", "kernel", "kernel-3-programs"])
def test_copy_parts_copies_the_chosen_rows_only(parts, block, use_kernel, programs, monkeypatch):
    """Arena rows src_K (byte ranges [offset, offset + nbytes), each into its own pool) into pool rows
    dst_K; -1 skips a row, also one that shares a copied row's slot (a batch's repeated expert: skipped rows
    must not write back over the copy). The kernel (under TRITON_INTERPRET on a CPU; on a GPU from pinned memory) and
    the reference agree with a plain loop; odd byte counts take the byte-wide variant; 4-word blocks make
    parts span several blocks, so each program has to find its part and its block within it; 3 programs
    (the host path's bounded grid) each loop over rows and blocks."""
    if block is not None:
        monkeypatch.setattr(slot_copy, "_BLOCK", block)
    g = torch.Generator().manual_seed(0)
    arena = torch.randint(0, 256, (7, 512), dtype=torch.uint8, generator=g)
    pools = [torch.randint(0, 256, (5, nbytes), dtype=torch.uint8, generator=g) for _, nbytes in parts]
    want = [pool.clone() for pool in pools]
    src_K, dst_K = torch.tensor([4, -1, 0, 6, -1]), torch.tensor([2, 0, 4, 1, 2])
    for s, d in zip(src_K.tolist(), dst_K.tolist()):
        if s >= 0:
            for (offset, nbytes), w in zip(parts, want):
                w[d] = arena[s, offset:offset + nbytes]
    if torch.cuda.is_available():  # the kernel reads pinned host memory into device memory
        arena, src_K, dst_K = arena.pin_memory(), src_K.cuda(), dst_K.cuda()
        pools = [pool.cuda() for pool in pools]
    slot_copy.copy_parts(arena, [(offset, nbytes, pool) for (offset, nbytes), pool in zip(parts, pools)],
                         src_K, dst_K, use_kernel=use_kernel, programs=programs)
    for pool, w in zip(pools, want):
        assert torch.equal(pool.cpu(), w)


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(cache_policy="lru"), dict(cache_policy="lfu"),
                                     dict(cache_policy="lru", bank_size=4)])
def test_device_bookkeeping_evicts_like_the_host_path(checkpoints, options):
    """Same routing, same budget, same policy (LRU or LFU, which the device runs; "auto" runs next-visit on
    the host only), no prefetch: the device tables make exactly the host path's hits, misses and evictions,
    the slots hold the right experts afterwards, and the tokens are the same."""
    path = checkpoints["olmoe"]
    prompt = _prompt(seed=4)
    kw = dict(gpu_memory=_budget(path, torch.float32, 10), dtype=torch.float32, prefetch="none", **options)
    host = mo.load(path, cuda_graph=False, **kw)
    dev = mo.load(path, **kw)
    want = host.generate(prompt, **STATIC)
    got = dev.generate(prompt, **STATIC)
    assert torch.equal(want, got)
    a, b = host.moesys_offload.snapshot(), dev.moesys_offload.snapshot()
    assert dev.moesys_offload._tables_on_device
    assert (a.hits, a.misses, a.evictions, a.bytes_copied) == (b.hits, b.misses, b.evictions, b.bytes_copied)
    assert b.evictions > 0
    dev.moesys_offload._tables_to_host()
    _slots_hold_their_experts(dev.moesys_offload)
    _table_matches_host(dev.moesys_offload)
    assert {k: v for k, v in host.moesys_offload.cache.slot_of.items()}.keys() == \
        dev.moesys_offload.cache.slot_of.keys()


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_static_cache_decode_identical_on_every_architecture(checkpoints, arch, dtype):
    """generate() with a StaticCache: every decode step takes the device path (no routing read back), and the
    tokens equal transformers' fully on the device with a StaticCache."""
    path = checkpoints[arch]
    prompt = _prompt()
    want = _static_reference(path, dtype, prompt)
    model = mo.load(path, gpu_memory=_budget(path, dtype, 10), dtype=dtype)
    engine, decoder = model.moesys_offload, model.moesys_decode_graph
    host_calls, guess_rows = [], []
    ensure, guess = engine._ensure, engine.prefetcher.guess
    engine._ensure = lambda layer, experts: host_calls.append(layer) or ensure(layer, experts)
    engine.prefetcher.guess = lambda layer, x_TH: guess_rows.append(x_TH.shape[0]) or guess(layer, x_TH)
    got = model.generate(prompt, **STATIC)
    assert torch.equal(want, got)
    assert decoder.eager_steps + decoder.replays == NEW_TOKENS - 1
    assert len(host_calls) == 3  # the prefill's three layers; decode never asked the host path
    stats = engine.snapshot()
    assert stats.misses > 0 and stats.evictions > 0 and stats.decode_tokens == NEW_TOKENS - 1
    assert guess_rows == [prompt.shape[1]] * 2  # only the prefill guesses (layers 0 -> 1 -> 2), never the graph


@pytest.mark.slow
def test_host_and_device_paths_hand_over_both_ways(checkpoints):
    """Static-cache generate (device tables), then a DynamicCache generate (host path: the bookkeeping comes
    back), then static again: each run right, and the cache consistent at every hand-over."""
    path = checkpoints["qwen3_moe"]
    prompt = _prompt(seed=5)
    want_static = _static_reference(path, torch.float32, prompt)
    _, want_dynamic = _reference(path, torch.float32, prompt)
    model = mo.load(path, gpu_memory=_budget(path, torch.float32, 8), dtype=torch.float32)
    engine = model.moesys_offload
    assert torch.equal(model.generate(prompt, **STATIC), want_static)
    assert engine._tables_on_device
    dynamic = dict(max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="dynamic")  # (CUDA: static)
    assert torch.equal(model.generate(prompt, **dynamic), want_dynamic)
    assert not engine._tables_on_device
    _slots_hold_their_experts(engine)
    assert torch.equal(model.generate(prompt, **STATIC), want_static)
    engine._tables_to_host()
    _slots_hold_their_experts(engine)
    _table_matches_host(engine)
    assert sum(engine.cache.resident_per_layer.values()) == len(engine.cache.slot_of) == engine.cache.num_slots


@pytest.mark.slow
@pytest.mark.parametrize("mode, bank_size", [("int8", 1023), ("int4", 5)])
def test_quantized_device_path_matches_the_host_path(checkpoints, mode, bank_size):
    """Quantized experts that do not all fit: the device path copies the packed experts and dequantizes the K
    routed ones, with the same tokens and logits as the host path's waves. With two banks (int4: 4 and 5
    slots) layer 1's slots start at 4, so the packed rows must be read by their slots in the whole pool."""
    path = checkpoints["mixtral"]
    prompt = _prompt(seed=6)
    kw = dict(gpu_memory=_budget(path, torch.float32, 9, quantize_experts=mode), dtype=torch.float32,
              quantize_experts=mode, bank_size=bank_size)
    dev, host = mo.load(path, **kw), mo.load(path, cuda_graph=False, **kw)
    assert dev.moesys_offload.cache.num_slots == 9
    assert dev.moesys_offload.cache.banks == ([(0, 9)] if bank_size > 9 else [(0, 4), (4, 9)])
    got = dev.generate(prompt, **STATIC)
    assert torch.equal(got, host.generate(prompt, **STATIC))
    assert dev.moesys_decode_graph.eager_steps + dev.moesys_decode_graph.replays == NEW_TOKENS - 1
    assert dev.moesys_offload.snapshot().misses > 0
    dev.moesys_offload._tables_to_host()
    _slots_hold_their_experts(dev.moesys_offload)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_all_resident_quantized_decode_skips_the_bookkeeping(checkpoints, mode):
    """Quantized experts that all fit: every decode step is a lookup (no device-table step, no copy kernel),
    with the host path's tokens and the same hit count (K per layer per token), nothing missed."""
    path = checkpoints["mixtral"]
    prompt = _prompt(seed=7)
    kw = dict(gpu_memory=_budget(path, torch.float32, 1000, quantize_experts=mode), dtype=torch.float32,
              quantize_experts=mode)
    dev, host = mo.load(path, **kw), mo.load(path, cuda_graph=False, **kw)
    engine = dev.moesys_offload
    assert engine.cache.num_slots == engine.cache.num_experts * len(engine.inner)
    want = host.generate(prompt, **STATIC)
    got = dev.generate(prompt, **STATIC)
    assert torch.equal(want, got)
    assert engine._device_all_resident and engine._tables_on_device
    assert int(engine.device_tables.counters.sum()) == 0  # the device tables never stepped
    a, b = host.moesys_offload.snapshot(), engine.snapshot()
    assert (a.hits, a.misses, a.evictions) == (b.hits, b.misses, b.evictions)
    assert b.misses == 0 and b.hits > 0


@pytest.mark.parametrize("options,reason", [(dict(host_memory="mmap"), "memory-mapped"),
                                            (dict(experts_implementation="eager"), "per-expert loop"),
                                            (dict(cpu_experts="on"), "cpu_experts")])
def test_what_the_device_path_cannot_run_keeps_the_host_path(checkpoints, options, reason):
    path = checkpoints["olmoe"]
    prompt = _prompt(seed=2)
    model = mo.load(path, gpu_memory=_budget(path, torch.float32, 10), dtype=torch.float32, **options)
    assert reason in model.moesys_offload.device_path_unsupported
    impl = {"experts_implementation": "eager"} if "experts_implementation" in options else {}
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **impl).to(DEVICE)
    want = ref.generate(prompt, **STATIC)
    got = model.generate(prompt, **STATIC)
    if "cpu_experts" not in options:  # CPU experts round differently
        assert torch.equal(want, got)
    assert model.moesys_decode_graph.eager_steps == 0 and not model.moesys_offload._tables_on_device


def test_cuda_graph_option_is_checked(checkpoints):
    with pytest.raises(ValueError, match="cuda_graph"):
        mo.load(checkpoints["olmoe"], gpu_memory="1GiB", cuda_graph="yes")
    with pytest.raises(ValueError, match="compile"):
        mo.load(checkpoints["olmoe"], gpu_memory="1GiB", compile="yes")
    with pytest.raises(ValueError, match="needs cuda_graph=True"):
        mo.load(checkpoints["olmoe"], gpu_memory="1GiB", compile=True, cuda_graph=False)


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_compiled_decode_step_matches_the_eager_one(checkpoints, quantize):
    """compile=True: the decode step runs as torch.compile's graph (inductor; on a CPU, C++ kernels) with the
    engine inside as opaque ops: for unquantized experts only the cache step (moesys::offload_slots; the
    model's own grouped experts are traced), for quantized ones the whole layer (moesys::offload_experts).
    Same tokens as the uncompiled device path, same hits, misses and evictions; a second model of the same
    architecture reuses the compiled graph (no recompile per engine)."""
    torch._dynamo.reset()
    path = checkpoints["olmoe"]
    prompt = _prompt(seed=4)
    kw = dict(gpu_memory=_budget(path, torch.float32, 10, quantize_experts=quantize), dtype=torch.float32,
              prefetch="none", quantize_experts=quantize)
    plain = mo.load(path, compile=False, **kw)
    want = plain.generate(prompt, **STATIC)
    frames = torch._dynamo.utils.counters["frames"]
    for i in range(2):
        model = mo.load(path, compile=True, **kw)
        engine, calls = model.moesys_offload, {"layer": 0, "slots": 0}
        layer_fn, slots_fn = engine.experts_forward, engine.device_slots

        def layer_call(layer, x_TH, *a):
            calls["layer"] += x_TH.shape[0] == 1
            return layer_fn(layer, x_TH, *a)

        def slots_call(*a, **k):
            calls["slots"] += 1
            return slots_fn(*a, **k)

        engine.experts_forward, engine.device_slots = layer_call, slots_call
        got = model.generate(prompt, **STATIC)
        assert torch.equal(want, got), i
        # the layers of the decode steps that ran Python: all of them on a CPU, the eager warm-ups and the
        # capture on CUDA (replays run none)
        decoder = model.moesys_decode_graph
        steps = (decoder.eager_steps + decoder.captures) * len(engine.inner)
        assert steps > 0
        assert calls == ({"layer": 0, "slots": steps} if quantize == "none" else {"layer": steps, "slots": steps})
        a, b = plain.moesys_offload.snapshot(), model.moesys_offload.snapshot()
        assert (a.hits, a.misses, a.evictions) == (b.hits, b.misses, b.evictions), i
        assert b.misses > 0
        if i == 0:
            compiled = frames["ok"]
            assert compiled > 0  # dynamo did compile the step
    assert frames["ok"] == compiled, "the second engine recompiled the decode step"


@torch.no_grad()
def _forced_logits(model, tokens_1N, prompt_len):
    """Logits of each batch-1 decode step after a prompt, fed the given tokens, with a StaticCache."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=tokens_1N.shape[1] + 1)
    model(tokens_1N[:, :prompt_len], past_key_values=cache, use_cache=True)
    return torch.stack([model(tokens_1N[:, i:i + 1], past_key_values=cache, use_cache=True).logits[0, -1].clone()
                        for i in range(prompt_len, tokens_1N.shape[1])])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["olmoe", "qwen3_moe"])
def test_decode_logits_equal_transformers_bit_for_bit_in_both_modes(checkpoints, arch):
    """Offloaded decode (bf16, 10 of 24 experts cached: misses and evictions) reproduces transformers fully on
    the device bit for bit in either mode: compile=False the eager model, compile=True the model under the
    same compiled decode step (inductor rounds its fusions differently from eager, for both alike). The
    compiled step traces the model's own grouped experts over the slot pool, so it fuses them as it does for
    the model on the device."""
    from moesys.offload import graph as decode_graph

    path = checkpoints[arch]
    tokens = torch.randint(2, 101, (1, 24), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(DEVICE)
    want = {False: _forced_logits(ref, tokens, 9)}
    decode_graph.install(ref, compile=True)
    want[True] = _forced_logits(ref, tokens, 9)
    for compile in (False, True):
        model = mo.load(path, gpu_memory=_budget(path, torch.bfloat16, 10), dtype=torch.bfloat16, prefetch="none",
                        compile=compile)
        got = _forced_logits(model, tokens, 9)
        assert torch.equal(got, want[compile]), (compile, (got.float() - want[compile].float()).abs().max())
        assert model.moesys_offload.snapshot().evictions > 0


@pytest.mark.slow
def test_compiling_the_offloaded_model_by_hand_says_how_to_do_it(checkpoints):
    path = checkpoints["olmoe"]
    model = mo.load(path, gpu_memory=_budget(path, torch.float32, 10), dtype=torch.float32, cuda_graph=False)
    step = torch.compile(model.forward, backend="eager")
    with pytest.raises(RuntimeError, match="compile=True"):
        step(_prompt(seed=1))


# ------------------------------------------------------------------ on the GPU: capture and replay
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@needs_cuda
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("quantize", ["none", "int4"])
def test_decode_replays_a_cuda_graph_on_gpu(checkpoints, quantize, compile):
    """generate() on CUDA defaults to a StaticCache: the first decode step runs eagerly (the first two for a
    compiled step), the next is captured, the rest replay it; tokens equal the host path's with the same
    cache, and the memory peak stays in budget."""
    path = checkpoints["olmoe"]
    prompt = _prompt(seed=11)
    budget = _budget(path, torch.bfloat16, 10, quantize_experts=quantize)
    kw = dict(gpu_memory=budget, dtype=torch.bfloat16, quantize_experts=quantize)
    host = mo.load(path, cuda_graph=False, **kw)
    want = host.generate(prompt, **STATIC)
    del host
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = mo.load(path, compile=compile, **kw)
    assert model.generation_config.cache_implementation == "static"
    got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.cuda.max_memory_allocated() - base <= budget
    decoder = model.moesys_decode_graph
    # warm-up steps (one, two compiled, more while the compiled step recompiles), one capture, then replays
    assert decoder.captures == 1 and decoder.eager_steps >= (2 if compile else 1)
    assert decoder.eager_steps + decoder.replays == NEW_TOKENS - 1
    assert torch.equal(want, got)
    stats = model.moesys_offload.snapshot()
    assert stats.misses > 0 and stats.evictions > 0


@pytest.mark.parametrize("K", [1, pytest.param(3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quant_gemv_kernel_matches_the_dequantized_product(mode, dtype, K):
    """quant_gemv's kernel (TRITON_INTERPRET on a CPU, CUDA on a GPU) on odd shapes (R and C not multiples
    of the blocks, three groups per row of a size that is not a power of two, repeated slots) in the three
    ways a layer calls it: K rows per token reading the token's row; a row per routed row through a gated
    activation; and that with the top-k combine (SwiGLU, and gelu_tanh). Against a float64 oracle, and the
    reference too."""
    from moesys.activations import apply_activation
    from moesys.offload.quant_gemv import quant_gemv
    g = torch.Generator().manual_seed(3)
    S, R, C, T = 4, 37, 36, 5
    w = torch.randn(S, R, C, generator=g)
    qs, ss = zip(*(quant.quantize(w[s], mode, group_size=12) for s in range(S)))
    q, scale = torch.stack(qs), torch.stack(ss)
    assert scale.shape == (S, R, 3)
    x = torch.randn(T, C, generator=g).to(dtype)
    h = torch.randn(T * K, 2 * C, generator=g).to(dtype)  # [gate | up] of each routed row
    slots = torch.tensor([2, 0, 2, 3, 1, 0, 1, 3, 2, 0, 3, 3, 1, 2, 0])[:T * K]
    route_w = torch.rand(T, K, generator=g).to(dtype)
    deq = quant.dequantize(q, scale, mode, torch.float64)[slots]
    plain = torch.einsum("nrc,nc->nr", deq, x.double().repeat_interleave(K, dim=0))
    act = torch.einsum("nrc,nc->nr", deq, apply_activation(h.double(), "silu"))
    combined = (act.view(T, K, R) * route_w.double()[..., None]).sum(1)
    gelu = torch.einsum("nrc,nc->nr", deq, apply_activation(h.double(), "gelu_tanh"))
    gelu_combined = (gelu.view(T, K, R) * route_w.double()[..., None]).sum(1)
    dev = DEVICE
    to = lambda t: t.to(dev)  # noqa: E731
    calls = [((x, None, None), plain), ((h, "silu", None), act), ((h, "silu", route_w), combined),
             ((h, "gelu_tanh", route_w), gelu_combined)]
    for (inp, activation, weight), want in calls:
        # bf16: the output's rounding and the reference's
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        for use_kernel in (True, False):
            got = quant_gemv(to(inp), to(q), to(scale), to(slots), mode, activation=activation,
                             weight_TK=None if weight is None else to(weight), use_kernel=use_kernel)
            assert got.dtype == dtype and got.shape == want.shape
            torch.testing.assert_close(got.double().cpu(), want, **tol)
    with pytest.raises(ValueError, match="the same number of routed rows"):
        quant_gemv(x[:2], q, scale, torch.tensor([0, 1, 2]), mode)
    with pytest.raises(ValueError, match="is not gated"):
        quant_gemv(h, q, scale, slots, mode, activation="relu")


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_batch_step_handles_each_shared_expert_once(policy):
    """A batch's rows x K ids repeat experts: the step equals one over the distinct ids in first-occurrence
    order (same slots, tables, stamps, LFU counts and counters), every occurrence gets its expert's slot,
    and each missed expert is copied once (its first occurrence)."""
    from moesys.offload.cache import ExpertCache
    from moesys.offload.device_cache import DeviceCacheTables
    E, layers, K, rows = 9, [0, 1], 2, 4
    tables = []
    for _ in range(2):
        cache = ExpertCache([("w", (2,), torch.float32)], 14, DEVICE, policy, layers, E, bank_size=7)
        tables.append(DeviceCacheTables(cache, policy))
        tables[-1].load_from_host()
    g = torch.Generator().manual_seed(5)
    repeated = 0
    for step in range(30):
        row = step % 2
        pool = torch.randperm(E, generator=g)[:5]  # the step's rows share 5 of the 9 experts: repeats, evictions
        ids_N = torch.stack([pool[torch.randperm(5, generator=g)[:K]] for _ in range(rows)]).flatten().to(DEVICE)
        distinct = list(dict.fromkeys(ids_N.tolist()))
        repeated += len(distinct) < ids_N.numel()
        slot_N, src_N, dst_N = tables[0].step(row, ids_N, use_kernel=False, distinct=False)
        slot_U, src_U, dst_U = tables[1].step(row, torch.tensor(distinct, device=DEVICE), use_kernel=False)
        for name in ("table", "owner_S", "stamp_S", "count_K", "tick", "counters"):
            assert torch.equal(getattr(tables[0], name), getattr(tables[1], name)), (step, name)
        where = {e: i for i, e in enumerate(distinct)}
        pick = torch.tensor([where[e] for e in ids_N.tolist()], device=DEVICE)
        assert torch.equal(slot_N, slot_U[pick]) and torch.equal(dst_N, dst_U[pick])
        copied = src_N[src_N >= 0].tolist()
        assert sorted(copied) == sorted(src_U[src_U >= 0].tolist()) and len(copied) == len(set(copied))
        first = [ids_N.tolist().index(e) for e in distinct]
        assert all(src_N[i] < 0 for i in range(ids_N.numel()) if i not in first)
    assert repeated == 30 and tables[0].counters[2] > 0  # repeats in every step, and evictions


@pytest.mark.parametrize("policy,E,bank,rows,K", [
    ("next-visit", 9, 7, 4, 2), ("lru", 9, 7, 4, 3), ("lfu", 9, 7, 3, 2),
    # more than one chunk (32) of experts, bank slots and ids: 40 experts, banks of 45, 16 rows x 4 ids
    ("next-visit", 40, 45, 16, 4), ("lfu", 40, 45, 16, 4)])
def test_batch_step_kernel_matches_the_reference(policy, E, bank, rows, K):
    """The one-program batch step kernel (TRITON_INTERPRET on a CPU) against the torch reference, fed the same
    steps over three layers sharing two banks: batch steps whose rows repeat experts, a step taken twice (the
    second time every expert hits: the kernel's no-miss branch) and the next layer's prefetch with this layer's
    slots protected. The same slots, store rows copied, global slots, tables, stamps, counts and counters."""
    from moesys.offload.cache import ExpertCache
    from moesys.offload.device_cache import DeviceCacheTables
    layers = [0, 1, 2]
    tables = []
    for _ in range(2):
        cache = ExpertCache([("w", (2,), torch.float32)], 2 * bank - 1, DEVICE, policy, layers, E, bank_size=bank)
        tables.append(DeviceCacheTables(cache, policy))
        tables[-1].load_from_host()
    names = ("table", "owner_S", "stamp_S", "count_K", "tick", "counters")
    g = torch.Generator().manual_seed(E + K)
    all_hit = protected_kept = 0
    for step in range(24):
        row, nxt = step % 3, (step + 1) % 3
        pool = torch.randperm(E, generator=g)[:min(E, bank - 1, rows * K)]
        ids_N = pool[torch.randint(len(pool), (rows * K,), generator=g)].to(DEVICE)
        nv = row if policy == "next-visit" else None
        for _ in range(2 if step % 5 == 0 else 1):
            ref = tables[0].step(row, ids_N, use_kernel=False, distinct=False, next_visit_from=nv)
            got = tables[1].step(row, ids_N, use_kernel=True, distinct=False, next_visit_from=nv)
            for a, b in zip(ref, got):
                assert torch.equal(a, b), step
            for name in names:
                assert torch.equal(getattr(tables[0], name), getattr(tables[1], name)), (step, name)
            all_hit += bool((ref[1] < 0).all())
        if tables[0].cache.bank_of[nxt] != tables[0].cache.bank_of[row]:
            continue
        start, end = tables[0].cache.banks[tables[0].cache.bank_of[nxt]]
        room = end - start - len(set(ids_N.tolist()))  # what the engine's prefetch may guess
        guess_M = torch.randperm(E, generator=g)[:room].to(DEVICE)
        ref = tables[0].step(nxt, guess_M, use_kernel=False, distinct=False, next_visit_from=nv, protect_N=ref[0],
                             prefetch=True)
        got = tables[1].step(nxt, guess_M, use_kernel=True, distinct=False, next_visit_from=nv, protect_N=got[0],
                             prefetch=True)
        for a, b in zip(ref, got):
            assert torch.equal(a, b), ("prefetch", step)
        for name in names:
            assert torch.equal(getattr(tables[0], name), getattr(tables[1], name)), ("prefetch", step, name)
        protected_kept += bool((ref[1] >= 0).any())
    assert all_hit >= 4 and protected_kept >= 3
    assert tables[1].counters[2] > 0 and tables[1].counters[3] > 0  # evictions and prefetch copies happened


def test_batch_step_scratch_is_sized_for_the_largest_bank_once():
    """The batch kernel's scratch is allocated with the tables, for the largest bank (a CUDA graph replays its
    address: one reallocated for a larger bank's step would leave a captured graph writing freed memory); steps
    in a smaller and a larger bank keep it."""
    from moesys.offload.cache import ExpertCache
    from moesys.offload.device_cache import DeviceCacheTables
    cache = ExpertCache([("w", (2,), torch.float32)], 33, DEVICE, "lru", [0, 1, 2], 20, bank_size=17)
    assert sorted(end - start for start, end in cache.banks) == [16, 17]
    tables = DeviceCacheTables(cache, "lru")
    tables.load_from_host()
    scratch = tables._scratch
    assert scratch.numel() == 32 + 3 * 32  # experts (20 -> 32 lanes), then 3 x the 17-slot bank's 32 lanes
    assert {cache.bank_of[layer] for layer in (0, 1, 2)} == {0, 1}
    for row in (0, 1, 2):  # both banks
        tables.step(row, torch.tensor([1, 5, 1, 7, 5, 9], device=DEVICE), use_kernel=True, distinct=False)
    assert tables._scratch is scratch


@pytest.mark.parametrize("policy", ["lru", "next-visit", pytest.param("lfu", marks=pytest.mark.slow)])
@pytest.mark.parametrize("K", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_fused_bookkeeping_kernel_matches_the_reference(policy, K):
    """The one-program step kernel (TRITON_INTERPRET on a CPU) and the torch reference, fed the same routing
    for 40 steps over three layers sharing banks of 7 and 6 slots: the same slots, copies, tables, counters."""
    from moesys.offload.cache import ExpertCache
    from moesys.offload.device_cache import DeviceCacheTables
    E, layers = 9, [0, 1, 2]
    tables = []
    for _ in range(2):
        cache = ExpertCache([("w", (2,), torch.float32)], 13, DEVICE, policy, layers, E, bank_size=7)
        t = DeviceCacheTables(cache, policy)
        t.load_from_host()
        tables.append(t)
    assert tables[0].cache.banks == [(0, 6), (6, 13)]
    g = torch.Generator().manual_seed(K)
    all_hits = 0
    for step in range(40):
        row = step % 3
        ids = torch.randperm(E, generator=g)[:K].to(DEVICE)
        # every fourth step is taken twice: the second time every expert hits (the kernel's no-miss branch)
        for _ in range(2 if step % 4 == 0 else 1):
            ref = tables[0].step(row, ids, use_kernel=False)
            fused = tables[1].step(row, ids, use_kernel=True)
            for a, b in zip(ref, fused):
                assert torch.equal(a, b), step
            for name in ("table", "owner_S", "stamp_S", "count_K", "tick", "counters"):
                assert torch.equal(getattr(tables[0], name), getattr(tables[1], name)), (step, name)
            all_hits += bool((ref[1] < 0).all())
    assert all_hits >= 10
    assert tables[1].counters[2] > 0  # evictions happened


def test_auto_policy_is_lfu_only_where_lru_could_never_hit():
    """cache_policy "auto": next-visit on the host path; in the device bookkeeping LFU when the fullest bank
    has at most (its layers - 1) x top_k slots (the experts of the other layers between two visits of a
    layer fill it), else LRU; top_k counts at most the experts a layer has."""
    from moesys.offload.cache import ExpertCache

    def policy(slots, layers, top_k, bank_size=1023, experts=8):
        cache = ExpertCache([("w", (2,), torch.float32)], slots, torch.device("cpu"), "auto", list(range(layers)),
                            experts, bank_size=bank_size, top_k=top_k)
        assert cache.policy == "next-visit"
        return cache.device_policy
    assert policy(4, 3, 2) == "lfu" and policy(5, 3, 2) == "lru" and policy(3, 3, 2) == "lfu"
    assert policy(84, 24, 4, experts=32) == "lfu"  # GPT-OSS-20B's shape under 8 GiB: 84 slots, 92 between
    assert policy(4, 4, 2, bank_size=2) == "lfu"   # banks of 2 slots, 2 layers each: 2 others fill one
    assert policy(6, 4, 2, bank_size=3) == "lru"   # banks of 3 slots, 2 layers each: one slot survives
    assert policy(6, 3, 2, bank_size=3) == "lru"   # banks of 3 slots; the first holds 2 layers
    assert policy(5, 3, 2, bank_size=3) == "lfu"   # banks of 2 and 3 slots: the fullest rule takes the 2
    assert policy(8, 2, 20, experts=8) == "lfu" and policy(9, 2, 20, experts=8) == "lru"  # at most 8 a layer
    assert policy(1, 1, 2) == "lru"                # one layer: nothing comes between its visits
    assert ExpertCache([("w", (2,), torch.float32)], 4, torch.device("cpu"), "lru", [0, 1, 2], 8,
                       top_k=2).policy == "lru"     # asked for by name: kept


@torch.no_grad()
def _greedy_decode(model, prompt, steps, static):
    """Prefill, then the engine's statistics reset, then `steps` greedy one-token steps (a StaticCache: the
    device path; else a DynamicCache: the host-routed path). The tokens, and the decode steps' statistics."""
    from transformers import StaticCache

    P = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=P + steps) if static else None
    kw = dict(past_key_values=cache, cache_position=torch.arange(P)) if static else dict(use_cache=True)
    out = model(prompt, **kw)
    model.moesys_offload.reset_stats()
    tokens = [out.logits[:, -1:].argmax(-1)]
    for i in range(steps):
        past = cache if static else out.past_key_values
        kw = dict(cache_position=torch.tensor([P + i])) if static else dict(use_cache=True)
        out = model(tokens[-1], past_key_values=past, **kw)
        tokens.append(out.logits[:, -1:].argmax(-1))
    return torch.cat(tokens, 1), model.moesys_offload.snapshot()


@pytest.mark.parametrize("static", [True, False])
def test_auto_policy_hits_where_lru_thrashes(checkpoints, static):
    """4 slots for 3 layers x top-2: between a layer's visits come the 4 experts of the other two layers, so
    LRU has evicted its experts by the next token and no decode step hits. The default ("auto") picks LFU
    there for the device path (StaticCache) and next-visit for the host-routed one, and both hit; the
    tokens are the same (a policy decides residency, never arithmetic)."""
    path, prompt = checkpoints["olmoe"], _prompt(seed=4)
    kw = dict(gpu_memory=_budget(path, torch.float32, 4), dtype=torch.float32, prefetch="none")
    runs = {}
    for name, options in (("lru", dict(cache_policy="lru")), ("auto", {})):
        model = mo.load(path, **kw, **options)
        assert model.moesys_offload.cache.num_slots == 4
        cache = model.moesys_offload.cache
        runs[name] = (*_greedy_decode(model, prompt, 12, static), (cache.policy, cache.device_policy))
    (lru_tokens, lru, lru_policy), (auto_tokens, auto, auto_policy) = runs["lru"], runs["auto"]
    assert (lru_policy, auto_policy) == (("lru", "lru"), ("next-visit", "lfu"))
    assert torch.equal(lru_tokens, auto_tokens)
    assert lru.hits + lru.misses == auto.hits + auto.misses == 12 * 3 * 2
    assert lru.hits == 0 and auto.hits > 0

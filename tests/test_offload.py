"""moesys.offload on CPU tensors: greedy generation of tiny random Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE
checkpoints against transformers' from_pretrained of the same files, plus the cache, prefetch, budget,
quantization and CLI pieces against hand-computed expectations."""

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

import moesys.offload as mo
from moesys.offload import quant
from moesys.offload.adapters import adapter_for, find_moe_blocks
from moesys.offload.cache import ExpertCache
from moesys.offload.loader import build_skeleton
from moesys.offload.prefetch import NextGatePrefetcher

COMMON = dict(vocab_size=101, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
              eos_token_id=None)
CONFIGS = {
    "mixtral": lambda: MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": lambda: Qwen2MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                                        shared_expert_intermediate_size=20),
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24,
                                        head_dim=8, norm_topk_prob=True),
    "olmoe": lambda: OlmoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2),
}
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One saved tiny random checkpoint per architecture (on-disk per-expert names, as save_pretrained writes)."""
    paths = {}
    for name, make in CONFIGS.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make())
        with torch.no_grad():  # larger router weights: routing then depends on the token, so the cache churns
            for block in find_moe_blocks(model, adapter_for(model.config)).values():
                block.gate.weight.normal_(0, 1.0)
        paths[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(paths[name])
    return paths


def _plan(path, dtype, **kw):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    skel = build_skeleton(config, dtype)
    return mo.plan_memory(skel, find_moe_blocks(skel, adapter_for(config)), dtype, 1 << 40, **kw)


def _budget(path, dtype, slots, **kw):
    p = _plan(path, dtype, **kw)
    return p.resident_bytes + p.reserve_bytes + slots * p.slot_bytes


@pytest.fixture(autouse=True)
def host_routed_path(monkeypatch):
    """These tests pin the host-routed path (DynamicCache, each layer's routing read back, prefetch): on CUDA
    moesys.offload.load would otherwise default generate() to a StaticCache and the device path, which
    tests/test_offload_graph.py covers."""
    from moesys.offload import loader

    monkeypatch.setitem(loader._OPTIONS, "cuda_graph", False)


# The reference is the same model fully on the device the offload engine computes on.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _prompt(n=9, seed=1):
    """Token ids on DEVICE, where both the reference and the offloaded model take their input."""
    return torch.randint(2, 101, (1, n), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _reference(path, dtype, prompt, **kw):
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).to(DEVICE)
    out = ref.generate(prompt.to(DEVICE), max_new_tokens=NEW_TOKENS, do_sample=False)
    return ref, out


def _greedy_logits(model, prompt) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, the logits of every generated position [NEW_TOKENS, V]) of a greedy generate(): the
    decode steps run the host-routed path one token at a time, where the cache churns and prefetch runs."""
    out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.cat(out.logits).float()


def _assert_same_generation(path, dtype, prompt, model, ref_kw=None):
    """Tokens equal and logits close to transformers' model of the same files: a wrong expert weight in
    one decode step moves the logits long before it flips a greedy token."""
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **(ref_kw or {})).to(DEVICE)
    want, want_logits = _greedy_logits(ref, prompt)
    got, got_logits = _greedy_logits(model, prompt)
    assert torch.equal(want, got)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_logits, want_logits, **tol)


def test_on_disk_names_match_adapters(checkpoints):
    from moesys.offload.source import SafetensorsSource
    from transformers import AutoConfig

    for name, path in checkpoints.items():
        config = AutoConfig.from_pretrained(path)
        source = SafetensorsSource(path, adapter_for(config))
        source.check_experts(0, 8, config.moe_intermediate_size if hasattr(config, "moe_intermediate_size")
                             else config.intermediate_size, 32)
        assert not any(adapter_for(config).is_expert_key(n) for n, _ in source.non_expert_items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_greedy_identical_with_eviction(checkpoints, arch, dtype):
    path = checkpoints[arch]
    prompt = _prompt()
    model = mo.load(path, gpu_memory=_budget(path, dtype, 10), dtype=dtype)  # 10 of 24 experts
    _assert_same_generation(path, dtype, prompt, model)
    stats = model.moesys_offload.snapshot()
    assert model.moesys_offload.cache.num_slots == 10
    assert stats.evictions > 0 and stats.misses > 0 and stats.hits > 0
    # nothing frees a slot here: every copy after the cache filled up evicted exactly one expert
    assert stats.evictions == stats.copies - model.moesys_offload.cache.num_slots
    assert stats.bytes_copied == stats.copies * model.moesys_offload.store.expert_bytes
    assert stats.prefill_tokens == prompt.numel() and stats.decode_tokens == NEW_TOKENS - 1
    assert 0 < stats.prefetch_guessed and 0 <= stats.prefetch_used <= stats.prefetch_guessed


@pytest.mark.parametrize("options", [dict(cache_policy="lfu"), dict(prefetch="none"), dict(host_memory="mmap"),
                                     dict(experts_implementation="eager", cache_policy="lfu")])
def test_options_keep_generation_identical(checkpoints, options):
    path = checkpoints["qwen3_moe"]
    prompt = _prompt(seed=2)
    impl = {"experts_implementation": options["experts_implementation"]} if "experts_implementation" in options else {}
    model = mo.load(path, gpu_memory=_budget(path, torch.float32, 7), dtype=torch.float32, **options)
    _assert_same_generation(path, torch.float32, prompt, model, impl)


def test_prefetch_that_evicts_keeps_the_logits(checkpoints):
    """LFU, top-2, 8 slots for 3 layers of 8 experts: a decode step may prefetch up to 8 // 2 - 2 = 2
    guessed experts of the next layer, evicting others, but never the experts the current layer is
    about to compute with (under LFU those just loaded are the least frequent, the first victims:
    without that protection the logits here move by 2e-2 while the greedy tokens stay the same)."""
    path = checkpoints["mixtral"]
    prompt = _prompt(seed=2)
    model = mo.load(path, gpu_memory=_budget(path, torch.float32, 8), dtype=torch.float32, cache_policy="lfu")
    _assert_same_generation(path, torch.float32, prompt, model)
    stats = model.moesys_offload.snapshot()
    assert stats.prefetch_copies > 0 and stats.evictions > 0


def test_prefetch_stops_when_every_slot_is_protected(checkpoints):
    """A batch's guesses may name every resident expert of the next layer: with the bank full of those and
    of the current layer's experts, a guess that is not resident has no victim, and the prefetch stops
    there instead of failing the step."""
    path = checkpoints["mixtral"]
    model = mo.load(path, gpu_memory=_budget(path, torch.float32, 6), dtype=torch.float32)
    engine = model.moesys_offload
    assert engine.cache.banks == [(0, 6)]
    engine._ensure(1, [0, 1, 2, 3])
    engine._ensure(0, [0, 1])
    engine._prefetch(0, guessed=[0, 1, 2, 3, 4, 5], protect=[0, 1])
    assert engine.snapshot().prefetch_copies == 0
    assert {key for key in engine.cache.slot_of} == {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3)}


def _prefetched(engine, layer, guessed, protect):
    before = engine.snapshot().prefetch_copies
    engine._prefetch(layer, guessed=guessed, protect=protect)
    nxt = engine.prefetcher.next_layer[layer]
    return engine.snapshot().prefetch_copies - before, sorted(e for (l, e) in engine.cache.slot_of if l == nxt)


def test_prefetch_budget_is_half_the_bank_less_what_this_layer_holds_there(checkpoints):
    """The prefetch budget in one bank of 11 slots: 11 // 2 = 5 slots, less the 2 experts this layer computes
    with in the same bank, so 3 copies; an already resident guess costs nothing and the walk goes on past it;
    each copy counts once. When this layer holds more than half the bank, nothing is prefetched."""
    path = checkpoints["mixtral"]
    model = mo.load(path, gpu_memory=_budget(path, torch.float32, 11), dtype=torch.float32)
    engine = model.moesys_offload
    assert engine.cache.banks == [(0, 11)]
    engine._ensure(1, [5])
    engine._ensure(0, [0, 1])
    assert _prefetched(engine, 0, guessed=[5, 2, 3, 4, 6, 7], protect=[0, 1]) == (3, [2, 3, 4, 5])

    model = mo.load(path, gpu_memory=_budget(path, torch.float32, 11), dtype=torch.float32)
    engine = model.moesys_offload
    engine._ensure(0, [0, 1, 2, 3, 4, 5, 6])
    assert _prefetched(engine, 0, guessed=[0, 1, 2], protect=[0, 1, 2, 3, 4, 5, 6]) == (0, [])


@pytest.mark.parametrize("layer", [0, 1])
def test_prefetch_into_another_bank_may_take_half_of_it(checkpoints, layer):
    """Two banks of 8 slots (layers 0 and 2 in bank 0, layer 1 in bank 1): a guess for the next layer in the
    other bank may fill half of that bank, 4 copies, whatever this layer holds in its own; both directions
    (bank 0 -> 1 and 1 -> 0) are checked."""
    path = checkpoints["mixtral"]
    model = mo.load(path, gpu_memory=_budget(path, torch.float32, 16), dtype=torch.float32, bank_size=8)
    engine = model.moesys_offload
    assert engine.cache.bank_of == {0: 0, 1: 1, 2: 0}
    engine._ensure(layer, [0, 1, 2])
    assert _prefetched(engine, layer, guessed=[7, 6, 5, 4, 3, 2], protect=[0, 1, 2]) == (4, [4, 5, 6, 7])


def test_cache_banks_keep_generation_identical(checkpoints):
    """Two banks of 8 slots (torch's grouped GEMM caps the groups per call): layers 0 and 2 share a bank."""
    path = checkpoints["mixtral"]
    prompt = _prompt(seed=7)
    model = mo.load(path, gpu_memory=_budget(path, torch.float32, 16), dtype=torch.float32, bank_size=8)
    cache = model.moesys_offload.cache
    assert cache.banks == [(0, 8), (8, 16)] and cache.bank_of == {0: 0, 1: 1, 2: 0}
    _assert_same_generation(path, torch.float32, prompt, model)
    assert model.moesys_offload.snapshot().evictions > 0


@pytest.mark.slow
def test_waves_when_a_layer_needs_more_experts_than_the_cache(checkpoints):
    """3 slots (one per layer) with top-3 routing over a long prompt: experts are loaded in waves. The eager
    reference is matched bit for bit; the grouped one within float32 rounding."""
    path = checkpoints["qwen3_moe"]
    prompt = _prompt(n=24, seed=3)
    for impl in ("eager", "grouped_mm"):
        ref, want = _reference(path, torch.float32, prompt, experts_implementation=impl)
        model = mo.load(path, gpu_memory=_budget(path, torch.float32, 3), dtype=torch.float32,
                        experts_implementation=impl)
        assert model.moesys_offload.cache.num_slots == 3
        got = model(want).logits
        torch.testing.assert_close(got, ref(want).logits, rtol=0, atol=0 if impl == "eager" else 1e-5)
        if impl == "eager":  # decode: one routed row per expert and wave (the loop's smallest case), on logits
            _assert_same_generation(path, torch.float32, prompt, model, ref_kw=dict(experts_implementation=impl))


def test_cpu_experts_path_matches(checkpoints):
    path = checkpoints["mixtral"]
    prompt = _prompt(seed=4)
    ref, want = _reference(path, torch.float32, prompt)
    model = mo.load(path, gpu_memory=_budget(path, torch.float32, 6), dtype=torch.float32, cpu_experts="on")
    # decode steps on logits: a step's host-computed expert often serves its one routed row alone
    _assert_same_generation(path, torch.float32, prompt, model)
    assert model.moesys_offload.snapshot().cpu_experts > 0
    torch.testing.assert_close(model(want).logits, ref(want).logits, rtol=1e-4, atol=1e-5)


def test_cpu_experts_dequantize_quantized_experts_like_the_device_path(checkpoints):
    """cpu_experts="on" with int8 experts: the host computes from the packed host copy (dequantized there), the
    device from its slots; both dequantize the same bytes, so the decode logits agree to float32 rounding."""
    path = checkpoints["mixtral"]
    prompt = _prompt(seed=4)
    budget = _budget(path, torch.float32, 6, quantize_experts="int8")
    host = mo.load(path, gpu_memory=budget, dtype=torch.float32, quantize_experts="int8", cpu_experts="on")
    device = mo.load(path, gpu_memory=budget, dtype=torch.float32, quantize_experts="int8")
    got, got_logits = _greedy_logits(host, prompt)
    want, want_logits = _greedy_logits(device, prompt)
    assert host.moesys_offload.snapshot().cpu_experts > 0
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,bound", [("int8", 0.02), ("int4", 0.25)])
def test_quantized_experts_within_stated_error(checkpoints, mode, bound):
    """Per-layer expert output of int8 / int4 experts vs the unquantized ones: relative error (Frobenius)
    below 2% for int8 and 25% for int4 (group size 128, here one group per row)."""
    path = checkpoints["olmoe"]
    full = mo.load(path, gpu_memory="1GiB", dtype=torch.float32)
    q = mo.load(path, gpu_memory="1GiB", dtype=torch.float32, quantize_experts=mode)
    g = torch.Generator().manual_seed(5)
    x_TH = torch.randn(16, 32, generator=g).to(DEVICE)
    ids_TK = torch.randint(0, 8, (16, 2), generator=g).to(DEVICE)
    w_TK = torch.rand(16, 2, generator=g).to(DEVICE)
    for layer in range(3):
        want = full.moesys_offload.experts_forward(layer, x_TH, ids_TK, w_TK)
        got = q.moesys_offload.experts_forward(layer, x_TH, ids_TK, w_TK)
        assert ((got - want).norm() / want.norm()).item() < bound
    assert q.moesys_offload.store.expert_bytes < full.moesys_offload.store.expert_bytes / (2 if mode == "int8" else 3)
    prompt = _prompt(seed=6)
    assert q.generate(prompt, max_new_tokens=4, do_sample=False).shape == (1, prompt.shape[1] + 4)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_roundtrip_bound(mode):
    w = torch.randn(12, 40, dtype=torch.float64)
    qw, scale = quant.quantize(w, mode, group_size=16)  # 40 -> groups of 10
    assert scale.shape == (12, 4)
    deq = quant.dequantize(qw, scale, mode, torch.float64)
    # Symmetric rounding onto the levels -qmax..qmax of each group's absmax: half a level at most.
    # The bound comes from the weights alone, not from the scale the quantizer chose.
    qmax = {"int8": 127, "int4": 7}[mode]
    absmax = w.abs().view(12, 4, 10).amax(-1).repeat_interleave(10, dim=1)
    err = (deq - w).abs()
    assert torch.all(err <= absmax / (2 * qmax) + 1e-7)
    assert err.max() > absmax.min() / (8 * qmax)  # and it is a rounding, not a copy of the float weights


def test_budget_too_small_fails_before_loading(checkpoints, monkeypatch):
    import moesys.offload.loader as loader

    def must_not_run(*a, **k):
        raise AssertionError("weights were read before the budget check")

    monkeypatch.setattr(loader, "_load_non_experts", must_not_run)
    path = checkpoints["olmoe"]
    need = _budget(path, torch.float32, 3)  # one expert per MoE layer
    with pytest.raises(ValueError, match="too small.*one expert per MoE layer.*give at least"):
        mo.load(path, gpu_memory=need - 1, dtype=torch.float32)
    monkeypatch.undo()
    model = mo.load(path, gpu_memory=need, dtype=torch.float32)
    engine = model.moesys_offload
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    cache_bytes = sum(t.numel() * t.element_size() for t in engine.cache.pools.values())
    assert resident == engine.plan.resident_bytes
    assert resident + cache_bytes + engine.plan.reserve_bytes <= need


@pytest.mark.parametrize("bad,msg", [(dict(gpu_memory="16 parsecs"), "not a size"), (dict(gpu_memory=0), "positive"),
                                     (dict(cache_policy="fifo"), "cache_policy"), (dict(prefetch="oracle"), "prefetch"),
                                     (dict(quantize_experts="int3"), "quantize_experts")])
def test_bad_options_name_the_value(checkpoints, bad, msg):
    kwargs = dict(gpu_memory="1GiB")
    kwargs.update(bad)
    with pytest.raises(ValueError, match=msg):
        mo.load(checkpoints["olmoe"], **kwargs)
    with pytest.raises(TypeError, match="unknown option"):
        mo.load(checkpoints["olmoe"], gpu_memory="1GiB", cache="lru")


def test_parse_bytes():
    assert mo.parse_bytes("16GiB") == 16 * 2**30
    assert mo.parse_bytes("1.5 GB") == 1_500_000_000
    assert mo.parse_bytes("512M") == 512 * 2**20
    assert mo.parse_bytes(123) == 123


def _tiny_cache(policy, slots=3):
    return ExpertCache([("w", (2,), torch.float32)], slots, torch.device("cpu"), policy, [0, 1], 4)


def test_bank_size_is_bounded_by_grouped_gemm_limit():
    with pytest.raises(ValueError, match="bank_size=1024"):
        ExpertCache([("w", (2,), torch.float32)], 2048, torch.device("cpu"), "lru", [0, 1], 1024, bank_size=1024)
    c = ExpertCache([("w", (2,), torch.float32)], 2000, torch.device("cpu"), "lru", [0, 1, 2], 1024)
    assert c.banks == [(0, 1000), (1000, 2000)] and c.bank_of == {0: 0, 1: 1, 2: 0}
    full = ExpertCache([("w", (2,), torch.float32)], 1023, torch.device("cpu"), "lru", [0, 1], 1024)
    assert full.banks == [(0, 1023)]  # the default bank is the limit itself: 1023 slots, one bank


def test_one_slot_and_banks_of_one_slot_are_the_smallest_cache():
    # The lower bounds of the checks: no slot, or banks of no slot, is a clear error naming the value;
    # one slot, and banks of one slot, make a working cache.
    part = [("w", (2,), torch.float32)]
    with pytest.raises(ValueError, match="at least one slot, got num_slots=0"):
        ExpertCache(part, 0, torch.device("cpu"), "lru", [0], 4)
    with pytest.raises(ValueError, match=r"bank_size=0 must be in \[1, 1023\]"):
        ExpertCache(part, 4, torch.device("cpu"), "lru", [0], 4, bank_size=0)
    one = ExpertCache(part, 1, torch.device("cpu"), "lru", [0], 4)
    assert one.banks == [(0, 1)]
    assert one.allocate((0, 2), set()) == (0, None)
    assert one.allocate((0, 3), set()) == (0, (0, 2))  # the one slot is reused
    c = ExpertCache(part, 3, torch.device("cpu"), "lfu", [0, 1, 2], 4, bank_size=1)
    assert c.banks == [(0, 1), (1, 2), (2, 3)] and c.bank_of == {0: 0, 1: 1, 2: 2}


def test_lru_evicts_least_recent_and_respects_protection():
    c = _tiny_cache("lru")
    for e in range(3):
        c.allocate((0, e), set())
    c.lookup((0, 0))                       # order now 1, 2, 0
    _, evicted = c.allocate((1, 0), set())
    assert evicted == (0, 1)
    _, evicted = c.allocate((1, 1), {(0, 2)})  # 2 is protected -> 0 goes
    assert evicted == (0, 0)
    assert c.resident_per_layer == {0: 1, 1: 2}


def test_next_visit_evicts_from_the_layer_visited_furthest_ahead():
    """Layers 0-3 visited in order: after visit(2) the victims come from layer 2's unprotected experts (its
    next visit is a whole step away), then 1, 0, 3 (visited next), least recently used first in each."""
    c = ExpertCache([("w", (2,), torch.float32)], 8, torch.device("cpu"), "auto", [0, 1, 2, 3], 4)
    assert c.policy == "next-visit"
    for layer in (3, 0, 1, 2):
        c.visit(layer)
        for e in (0, 1):
            c.allocate((layer, e), set())
    c.lookup((1, 0))                                   # layer 1's least recent is now 1
    c.visit(2)
    protect = {(2, 0), (2, 1), (2, 2), (2, 3)}         # layer 2 needs all four: nothing of its own to give
    evicted = [c.allocate((2, e), protect)[1] for e in (2, 3)]
    assert evicted == [(1, 1), (1, 0)]
    assert c.allocate((3, 2), protect | {(3, 2)})[1] == (0, 0)  # then (layer 1 is empty) 0, least recent first
    c.visit(3)                                          # now layer 3's own unneeded experts go first
    assert c.allocate((3, 3), {(3, 3), (3, 2)})[1] == (3, 0)
    c.visit(0)                                          # from layer 0: itself, then 3, 2, 1
    keep = {(0, 2), (0, 1), (3, 1), (3, 2), (3, 3), (2, 1), (2, 2), (2, 3)}
    assert c.allocate((0, 2), keep)[1] == (2, 0)
    assert c.resident_per_layer == {0: 2, 1: 0, 2: 3, 3: 3}
    # the same protected set again: the scan skips layers it found fully protected, unless one of them has
    # since been touched by an expert outside the set
    policy = c.policies[0]
    assert policy.victim(keep) is None
    policy.touch((0, 3))
    assert policy.victim(keep) == (0, 3)


def test_next_visit_hands_over_to_the_device_tables_and_back():
    """The decode graph runs LRU (or LFU) on the device: a next-visit cache gives it its recency order and
    use counts, and takes the device's back as a next-visit policy again."""
    from moesys.offload.device_cache import DeviceCacheTables

    c = ExpertCache([("w", (2,), torch.float32)], 6, torch.device("cpu"), "auto", [0, 1, 2], 4, top_k=2)
    assert (c.policy, c.device_policy) == ("next-visit", "lru")
    for key in [(0, 1), (1, 2), (2, 3), (0, 0), (1, 1), (2, 0)]:
        c.visit(key[0])
        c.allocate(key, set())
    c.lookup((0, 1))
    order, counts = list(c.policies[0].order), dict(c.policies[0].count)
    tables = DeviceCacheTables(c, c.device_policy)
    tables.load_from_host()
    tables.store_to_host()
    back = c.policies[0]
    assert type(back).__name__ == "_NextVisit" and list(back.order) == order and back.count == counts
    c.visit(1)
    assert c.allocate((1, 3), {(1, 3)})[1] == (1, 2)  # by layer again: layer 1's least recent first


def test_lfu_evicts_least_frequent_then_least_recent():
    c = _tiny_cache("lfu")
    for e in range(3):
        c.allocate((0, e), set())
    for _ in range(3):
        c.lookup((0, 0))
    c.lookup((0, 2))                        # counts: 0 -> 4, 1 -> 1, 2 -> 2
    _, evicted = c.allocate((1, 0), set())
    assert evicted == (0, 1)
    _, evicted = c.allocate((1, 1), set())  # (1, 0) has count 1 but is newer than nothing else at 1
    assert evicted == (1, 0)
    with pytest.raises(RuntimeError):
        c.allocate((1, 2), {(0, 0), (0, 2), (1, 1)})


def test_lfu_heap_is_rebuilt_rarely_and_keeps_the_eviction_order():
    # LFU pushes one heap entry per use and drops the stale ones lazily; the heap is rebuilt from the
    # resident keys only once it holds several times as many entries, so a use costs O(log S) amortised
    # (a rebuild costs O(S)), and after the rebuilds the victims still go by (use count, last use).
    S = 200
    c = ExpertCache([("w", (2,), torch.float32)], S, torch.device("cpu"), "lfu", [0], 2 * S)
    lfu = c.policies[0]
    for e in range(S):
        c.allocate((0, e), set())
    uses = torch.randint(0, S, (6000,), generator=torch.Generator().manual_seed(0)).tolist()
    between, since = [], 0  # uses between two rebuilds
    for e in uses:
        heap = lfu.heap
        c.lookup((0, e))
        since += 1
        if lfu.heap is not heap:
            assert sorted(k for _, _, k in lfu.heap) == [(0, k) for k in range(S)]  # the resident keys, once
            between.append(since)
            since = 0
        assert len(lfu.heap) <= 16 * S
    assert len(between) >= 2 and min(between) >= S
    # (uses, last use) of each key: one use when allocated (in id order), then its lookups
    last = {e: e - S for e in range(S)} | {e: i for i, e in enumerate(uses)}
    order = sorted(range(S), key=lambda e: (1 + uses.count(e), last[e]))
    for j in range(10):
        assert lfu.victim({(0, e) for e in order[:j]}) == (0, order[j])
    freed = c.slot_of[(0, order[0])]
    assert c.allocate((0, S), set()) == (freed, (0, order[0]))


def test_summary_says_when_nothing_was_guessed():
    from moesys.offload.stats import OffloadStats

    assert "prefetch accuracy n/a" in OffloadStats(hits=3, misses=1).summary()  # not a 0% accuracy
    assert "prefetch accuracy 50.0%" in OffloadStats(prefetch_guessed=4, prefetch_used=2).summary()


def test_batch_guess_puts_the_most_wanted_experts_first():
    """A batch's guess: experts ordered by how many rows pick them (ties by id), -1 for unpicked places, so
    the prefetch budget goes to the experts most of the batch will use."""
    gate = torch.nn.Linear(3, 5, bias=False)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.4, 0.4, 0.4]]))
    p = NextGatePrefetcher({0: gate, 1: gate}, top_k=2)
    # rows' top-2: {1,4} {1,4} {1,4} {2,4} {3,1}: experts 1 and 4 four votes each (tie: lower id first)
    x_TH = torch.tensor([[1.0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0.9, 0, 1]])
    assert p.guess(0, x_TH).tolist() == [1, 4, 2, 3, -1]
    # any number of rows is guessed for (a batch of 128 rows needs its next layer's experts copied early)
    assert p.guess(0, x_TH.repeat(40, 1)).tolist() == [1, 4, 2, 3, -1]
    # one row: its top-k by id (as the batch-1 path always loaded them)
    assert p.guess(0, torch.tensor([[0.0, 0, 1]])).tolist() == [3, 4]
    # more votes beat a lower id: expert 4 (the last) picked by 2 rows, expert 0 by 1 -> [4, 0, ...]
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 1, 0]]))
    p1 = NextGatePrefetcher({0: gate, 1: gate}, top_k=1)
    assert p1.guess(0, torch.tensor([[0.0, 1, 0], [0, 1, 0], [1, 0, 0]])).tolist() == [4, 0, -1]


def test_next_gate_prefetch_guess_and_score():
    gates = {}
    for layer in (0, 1):
        g = torch.nn.Linear(4, 6, bias=False)
        gates[layer] = g
    with torch.no_grad():
        gates[1].weight.zero_()
        gates[1].weight[3, 0] = 1.0
        gates[1].weight[5, 1] = 2.0
    p = NextGatePrefetcher(gates, top_k=2)
    guess = p.guess(0, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    assert sorted(guess.tolist()) == [3, 5]
    assert p.guess(1, torch.ones(1, 4)) is None             # last layer
    assert sorted(p.guess(0, torch.ones(300, 4)).tolist()[:2]) == [3, 5]  # and for a batch of any size
    p.record(0, [3, 5])
    assert p.score(1, {5, 2}) == (2, 1)
    p.record(0, [3, 5])
    assert p.score(1, {3, 5, 2}) == (2, 2)
    assert p.score(1, {5}) == (0, 0)


@pytest.mark.parametrize("graph", ["on", "off"])
def test_cli_streams_text_and_prints_stats(checkpoints, tmp_path, capsys, monkeypatch, graph):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import shutil

    from moesys.cli import main
    from moesys.offload import loader

    loaded = []
    load = loader.load
    monkeypatch.setattr(loader, "load", lambda *a, **kw: loaded.append(kw) or load(*a, **kw))

    vocab = {f"w{i}": i for i in range(101)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model_dir = tmp_path / "m"
    shutil.copytree(checkpoints["olmoe"], model_dir)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0").save_pretrained(model_dir)
    rc = main(["generate", str(model_dir), "--prompt", "w5 w7 w9", "--gpu-memory", "1GiB",
               "--max-new-tokens", "5", "--dtype", "float32", "--cache-policy", "lfu", "--cuda-graph", graph,
               "--compile", "auto" if graph == "on" else "off"])
    out = capsys.readouterr()
    assert rc == 0
    assert loaded[0]["cuda_graph"] is (graph == "on")
    assert loaded[0]["compile"] is (None if graph == "on" else False)
    assert "w5" in out.out and "hit rate" in out.out and "decode" in out.out
    assert "cache" in out.err


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "olmoe"])
def test_budget_holding_every_expert_runs_the_plain_model(checkpoints, name):
    """A budget that holds every expert, cut in two banks of 12 slots (bank_size=16; layers 0 and 2 share a
    bank too small for both, which must not matter): all are loaded once,
    the original experts modules come back into the model pointed at their slots (no engine in the
    forward), and generation equals the model fully on the device; resident_if_fits=False keeps the engine."""
    from moesys.offload.engine import OffloadedExperts
    path = checkpoints[name]
    prompt = _prompt(seed=8)
    _, want = _reference(path, torch.float32, prompt)
    model = mo.load(path, gpu_memory=_budget(path, torch.float32, 32), dtype=torch.float32, bank_size=16)
    engine = model.moesys_offload
    assert engine.cache.num_slots == 24 and len(engine.cache.banks) == 2
    assert not any(isinstance(m, OffloadedExperts) for m in model.modules())
    assert torch.equal(want, model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False))
    stats = engine.snapshot()
    assert stats.resident and stats.hit_rate == 1.0 and stats.copies == 24 and stats.misses == 0
    assert stats.bytes_copied == 24 * engine.store.expert_bytes
    for layer in engine.inner:  # the cache's bookkeeping names the slot each expert was loaded into
        for e in range(8):
            slot = engine.cache.lookup((layer, e))
            want_parts = {part: torch.empty_like(view) for part, view in engine.cache.slot_views(slot).items()}
            engine.store.copy_to(layer, e, want_parts)
            assert all(torch.equal(view, want_parts[part]) for part, view in engine.cache.slot_views(slot).items())
    assert "hit rate 100.0%" in stats.summary()
    x_TH = torch.randn(5, 32, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    ids_TK = torch.tensor([[7, 1], [0, 3], [5, 2], [6, 4], [1, 7]], device=DEVICE)
    w_TK = torch.rand(5, 2, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    engaged = mo.load(path, gpu_memory=_budget(path, torch.float32, 32), dtype=torch.float32, bank_size=16,
                      resident_if_fits=False)
    assert sum(isinstance(m, OffloadedExperts) for m in engaged.modules()) == 3
    assert torch.equal(want, engaged.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False))
    for layer in range(3):  # the engine's own entry point agrees on the resident model
        torch.testing.assert_close(engine.experts_forward(layer, x_TH, ids_TK, w_TK),
                                   engaged.moesys_offload.experts_forward(layer, x_TH, ids_TK, w_TK))


@pytest.mark.slow
@pytest.mark.parametrize("mode,bank_size", [("int8", None), ("int4", None), ("int8", 8)])
def test_quantized_experts_that_all_fit_decode_without_the_host(checkpoints, mode, bank_size):
    """A budget holding every quantized expert loads them all at once; then each batch-1 decode step takes the
    sync-free path (slots from the device table, the K routed experts dequantized on their own), and its
    logits equal the engine's host-routed path (resident_if_fits=False: experts loaded on demand).
    bank_size=8: one bank per layer, so the pool-wide slot of layer 1 and 2's experts is not the bank's own."""
    path = checkpoints["olmoe"]
    prompt = _prompt(seed=10)
    kw = {} if bank_size is None else dict(bank_size=bank_size)
    fast = mo.load(path, gpu_memory="1GiB", dtype=torch.float32, quantize_experts=mode, **kw)
    slow = mo.load(path, gpu_memory="1GiB", dtype=torch.float32, quantize_experts=mode, resident_if_fits=False)
    engine = fast.moesys_offload
    assert len(engine.cache.banks) == (1 if bank_size is None else 3)
    assert all(engine.cache.layer_complete(layer) for layer in engine.inner)
    assert engine.snapshot().copies == 3 * 8 and not any(slow.moesys_offload.cache.resident_per_layer.values())
    assert engine.snapshot().bytes_copied == 3 * 8 * engine.store.expert_bytes
    calls = []
    run = engine._run_quantized_resident
    engine._run_quantized_resident = lambda *a: calls.append(a[0]) or run(*a)
    got = fast.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert len(calls) == 3 * (NEW_TOKENS - 1)  # every layer of every decode step (prefill: the wave path)
    assert torch.equal(got, slow.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False))
    torch.testing.assert_close(fast(got).logits, slow(got).logits, rtol=1e-5, atol=1e-6)
    stats = engine.snapshot()
    assert stats.misses == 0 and stats.hit_rate == 1.0


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_generating_past_max_context_stops_with_a_message(checkpoints, cache):
    """The KV cache is planned for max_context tokens: a longer generation (prompt + new tokens) stops
    before its forward with a message naming the fix; one that fits runs."""
    path = checkpoints["olmoe"]
    prompt = _prompt(n=7, seed=1)
    model = mo.load(path, gpu_memory="1GiB", dtype=torch.float32, max_context=12)
    kw = dict(do_sample=False, cache_implementation=cache, disable_compile=True)
    assert model.generate(prompt, max_new_tokens=5, **kw).shape[1] == 12
    with pytest.raises(ValueError, match=r"max_context=12; load with max_context>=1[3-9]"):
        model.generate(prompt, max_new_tokens=9, **kw)

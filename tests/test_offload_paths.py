"""The offload strategies' own bookkeeping on a tiny model, on the CPU (`device="cpu"`, also on a GPU
machine): which path a call takes, the hits each path counts, the guess each path consumes or scores, and
what goes to the prefetch. Outputs are checked against
transformers by test_offload*.py; these observables are what those tests cannot see."""

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig

import moesys.offload as mo
from tests.test_offload import COMMON, _budget


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    out = {}
    for name, cfg in (("mixtral", MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2)),
                      ("olmoe_top4", OlmoeConfig(**COMMON, num_experts=8, num_experts_per_tok=4))):
        torch.manual_seed(0)
        out[name] = tmp_path_factory.mktemp(name)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(out[name])
    return out


def _rows(T, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, 32, generator=g), torch.rand(T, 2, generator=g)


def _resident_engine(path, **kw):
    """Every expert in the cache, the engine kept in the forward (resident_if_fits=False)."""
    model = mo.load(path, gpu_memory="1GiB", dtype=torch.float32, device="cpu", resident_if_fits=False, **kw)
    engine = model.moesys_offload
    for layer in engine.inner:
        engine._ensure(layer, list(range(8)))
    assert all(engine.cache.layer_complete(layer) for layer in engine.inner)
    engine.reset_stats()
    return engine


@pytest.mark.parametrize("ids, hits", [([[7, 1]], 2), ([[1, 2], [1, 3]], 3), ([[7, 1], [0, 3], [5, 2], [6, 4], [1, 7]], 8)])
def test_a_complete_layer_counts_each_used_expert_once(paths, ids, hits):
    """A complete layer runs on the device with no host sync: one token counts its K experts, several tokens
    the distinct experts they use (two tokens sharing expert 1: 3 hits, not 4)."""
    engine = _resident_engine(paths["mixtral"])
    x, w = _rows(len(ids))
    engine.experts_forward(0, x, torch.tensor(ids), w)
    stats = engine.snapshot()
    assert (stats.hits, stats.misses) == (hits, 0)


@pytest.mark.parametrize("prefetch", ["next-gate", "none"])
def test_a_complete_layer_drops_its_pending_guess_unscored(paths, prefetch):
    """A complete layer needs no guess: the pending one is dropped without being scored (the host-routed path
    would score it: prefetch_guessed += 2); without a prefetcher there is nothing to drop."""
    engine = _resident_engine(paths["mixtral"], prefetch=prefetch)
    if prefetch == "none":
        assert engine.prefetcher is None
    else:
        engine.prefetcher.pending[1] = {0, 1}
    x, w = _rows(1)
    engine.experts_forward(1, x, torch.tensor([[2, 3]]), w)
    assert engine.snapshot().prefetch_guessed == 0
    if engine.prefetcher is not None:
        assert 1 not in engine.prefetcher.pending


def test_cpu_experts_route_a_complete_layer_on_the_host_and_score_the_guess(paths):
    """cpu_experts="on" takes the host sync even for a complete layer (it decides per expert where to compute),
    so the pending guess is scored there."""
    engine = _resident_engine(paths["mixtral"], cpu_experts="on")
    engine.prefetcher.pending[1] = {0, 1}
    x, w = _rows(1)
    engine.experts_forward(1, x, torch.tensor([[1, 3]]), w)
    stats = engine.snapshot()
    assert (stats.prefetch_guessed, stats.prefetch_used, stats.cpu_experts) == (2, 1, 0)


def test_one_wave_runs_grouped_and_the_guess_goes_to_the_prefetch_without_pads(paths, monkeypatch):
    """A layer whose needed experts fit the bank runs as one grouped call; the next layer's guess, -1 pads
    dropped and expert 0 kept, is prefetched once."""
    model = mo.load(paths["mixtral"], gpu_memory="1GiB", dtype=torch.float32, device="cpu", resident_if_fits=False)
    engine = model.moesys_offload
    grouped, prefetched = [], []
    run_grouped, prefetch = engine._run_grouped, engine._prefetch
    monkeypatch.setattr(engine, "_run_grouped", lambda *a: grouped.append(a[0]) or run_grouped(*a))
    monkeypatch.setattr(engine, "_prefetch", lambda layer, guessed, protect: prefetched.append(list(guessed))
                        or prefetch(layer, guessed, protect))
    monkeypatch.setattr(engine.prefetcher, "guess", lambda layer, x: torch.tensor([0, 5, -1, -1]))
    x, w = _rows(2)
    engine.experts_forward(0, x, torch.tensor([[1, 2], [1, 3]]), w)
    assert grouped == [0] and prefetched == [[0, 5]]


def test_waves_prefetch_once(paths, monkeypatch):
    """A layer needing more experts than its bank runs in waves; the guess is prefetched with the first wave
    only (a later wave would evict what the earlier prefetch loaded)."""
    model = mo.load(paths["mixtral"], gpu_memory=_budget(paths["mixtral"], torch.float32, 6), dtype=torch.float32, device="cpu")
    engine = model.moesys_offload
    assert engine.cache.capacity(0) == 6
    calls = []
    prefetch = engine._prefetch
    monkeypatch.setattr(engine, "_prefetch", lambda layer, guessed, protect: calls.append(layer)
                        or prefetch(layer, guessed, protect))
    monkeypatch.setattr(engine.prefetcher, "guess", lambda layer, x: torch.tensor([4, 5]))
    x, w = _rows(4)
    engine.experts_forward(0, x, torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]]), w)
    assert calls == [0]


@pytest.mark.parametrize("mode", ["int8"])
def test_quantized_decode_reads_packed_only_for_one_token(paths, monkeypatch, mode):
    """Quantized experts of a complete layer: one token's K rows (K=4 here) are read packed (quant_gemv);
    two tokens' 8 rows exceed the dequantization workspace of K experts and take the dequantizing waves."""
    engine = _resident_engine(paths["olmoe_top4"], quantize_experts=mode)
    seen = []
    packed, dequant = engine._run_quantized_resident, engine._dequant_chunk
    monkeypatch.setattr(engine, "_run_quantized_resident", lambda *a: seen.append("packed") or packed(*a))
    monkeypatch.setattr(engine, "_dequant_chunk", lambda *a: seen.append("dequant") or dequant(*a))
    g = torch.Generator().manual_seed(4)
    for T in (1, 2):
        x, w = torch.randn(T, 32, generator=g), torch.rand(T, 4, generator=g)
        engine.experts_forward(0, x, torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]][:T]), w)
        seen.append("|")
    assert seen == ["packed", "|", "dequant", "dequant", "|"]
    # a workspace of 8 (the dequant_slots kernel's on a GPU): both tokens' 8 experts in one chunk, the same
    # layer output; one token still reads packed (decode is one token's K rows, not the workspace's)
    x, w = torch.randn(2, 32, generator=g), torch.rand(2, 4, generator=g)
    ids = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    by4 = engine.experts_forward(0, x, ids, w)
    engine.dequant_experts, seen[:] = 8, []
    torch.testing.assert_close(engine.experts_forward(0, x, ids, w), by4, rtol=1e-6, atol=1e-6)
    engine.experts_forward(0, x[:1], ids[:1], w[:1])
    assert seen == ["dequant", "packed"]


@pytest.mark.parametrize("needed, resident, capacity, pipelined, waves", [
    ([0, 1, 2], {1}, 3, True, [[0, 1, 2]]),  # all fit: one wave, in routing order
    ([0, 1, 2, 3, 4, 5, 6, 7], {5, 6}, 6, True, [[5, 6, 0], [1, 2, 3], [4, 7]]),  # resident first, then halves
    ([0, 1, 2, 3, 4, 5, 6], {0, 1, 2, 3, 4}, 5, True, [[0, 1, 2], [3, 4], [5, 6]]),  # odd bank: ceil, then floor
    ([0, 1, 2, 3, 4], set(), 6, True, [[0, 1, 2, 3, 4]]),  # fewer than the bank: one wave, no split
    ([0, 1, 2, 3], {2}, 2, True, [[2], [0], [1], [3]]),  # two slots: one each, resident first
    ([0, 1, 2, 3], {3}, 1, True, [[0], [1], [2], [3]]),  # one slot: nothing to overlap
    ([0, 1, 2, 3, 4, 5, 6, 7], {5, 6}, 6, False, [[0, 1, 2, 3, 4, 5], [6, 7]]),  # eager loop: id order, whole banks
])
def test_plan_waves(needed, resident, capacity, pipelined, waves):
    """Pipelined waves put the resident experts first, within the first two waves (which fill the bank
    together: none is evicted before its use), and later waves take half the bank each."""
    from moesys.offload.strategies import plan_waves

    got = plan_waves(needed, resident, capacity, pipelined)
    assert got == waves
    assert sorted(e for w in got for e in w) == sorted(needed)


def test_waves_copy_ahead_of_the_compute_and_run_grouped(paths, monkeypatch):
    """A layer needing all 8 experts with a bank of 6, experts 5 and 6 already resident: the waves are [5, 6, 0],
    [1, 2, 3], [4, 7]; the second wave is copied before the first computes and the third before the second
    computes (the observable of the copy/compute overlap), each wave is one grouped call (no per-expert loop),
    each missing expert is copied once, and the output equals the layer with every expert resident."""
    mixtral = paths["mixtral"]
    model = mo.load(mixtral, gpu_memory=_budget(mixtral, torch.float32, 6), dtype=torch.float32, device="cpu",
                    prefetch="none", resident_if_fits=False)
    engine = model.moesys_offload
    assert engine.cache.capacity(0) == 6 and engine.grouped
    engine._ensure(0, [5, 6])
    engine.reset_stats()
    events = []
    copy_run, rows = engine._copy_run, engine._run_grouped_rows
    monkeypatch.setattr(engine, "_copy_run", lambda layer, experts, *a: events.extend(("copy", e) for e in experts)
                        or copy_run(layer, experts, *a))
    monkeypatch.setattr(engine, "_run_grouped_rows", lambda layer, x, w, pairs, out, flat: events.append(
        ("compute", [e for e, _ in pairs])) or rows(layer, x, w, pairs, out, flat))
    monkeypatch.setattr(engine, "_run_loop", lambda *a: pytest.fail("the grouped waves ran the per-expert loop"))
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [1, 6]])
    x, w = _rows(len(ids))
    got = engine.experts_forward(0, x, ids, w)
    assert events == [("copy", 0), ("copy", 1), ("copy", 2), ("copy", 3), ("compute", [5, 6, 0]),
                      ("copy", 4), ("copy", 7), ("compute", [1, 2, 3]), ("compute", [4, 7])]
    stats = engine.snapshot()
    assert (stats.hits, stats.misses, stats.copies) == (2, 6, 6)
    want = _resident_engine(mixtral).experts_forward(0, x, ids, w)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_dequantizing_waves_run_each_routed_row_once(paths, monkeypatch):
    """Quantized experts at 3 tokens x top-4 over all 8 experts: two dequantization waves of 4 experts (the
    workspace holds one token's top-4). Each wave runs moe_mlp on its own routed rows only, 12 rows in all
    (running every row in every wave, rows of other experts weighted 0, was 24), and the layer equals one
    moe_mlp call over all 8 dequantized experts."""
    import moesys.offload.engine as engine_mod

    engine = _resident_engine(paths["olmoe_top4"], quantize_experts="int8")
    rows = []
    real = engine_mod.moe_mlp
    monkeypatch.setattr(engine_mod, "moe_mlp", lambda x, *a, **k: rows.append(x.shape[0]) or real(x, *a, **k))
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 32, generator=g), torch.rand(3, 4, generator=g)
    ids = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [7, 0, 5, 2]])
    got = engine.experts_forward(0, x, ids, w)
    assert sum(rows) == 12 and len(rows) == 2
    slots = torch.tensor([engine.cache.slot_of[(0, e)] for e in range(8)])
    w_gu, w_d = engine._dequantize_slots(slots, x.dtype)
    want = real(x, w_gu, w_d, ids, w, activation=engine.activation, backend="loop")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_wave_in_compute_is_kept_when_the_next_one_copies(paths, monkeypatch):
    """Under LFU a wave in compute may be used less than what else its bank holds. Layer 0's experts 0-2 (used
    11 times) are resident beside layer 1's 0-2 (used 21 times), all 6 slots: the waves are [0, 1, 2], [3, 4,
    5], [6, 7]. Copying the second wave would evict the first (the least used) before it computes, and
    copying the third the second (used once), unless the wave in compute is kept; with it kept the layer
    equals the resident one."""
    mixtral = paths["mixtral"]
    model = mo.load(mixtral, gpu_memory=_budget(mixtral, torch.float32, 6), dtype=torch.float32, device="cpu",
                    prefetch="none", resident_if_fits=False, cache_policy="lfu")
    engine = model.moesys_offload
    assert engine.cache.capacity(0) == engine.cache.capacity(1) == 6 and engine.cache.bank_of[1] == 0
    engine._ensure(0, [0, 1, 2])
    engine._ensure(1, [0, 1, 2])
    for layer, uses in ((0, 10), (1, 20)):
        for _ in range(uses):
            for e in range(3):
                engine.cache.lookup((layer, e))
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [1, 6]])
    x, w = _rows(len(ids))
    got = engine.experts_forward(0, x, ids, w)
    want = _resident_engine(mixtral).experts_forward(0, x, ids, w)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("limit, host_memory, kernel", [(None, "memory", True), (0, "memory", False),
                                                       (None, "mmap", False)],
                         ids=["small-experts", "large-experts", "mmap-store"])
def test_small_experts_copy_as_arena_rows_large_ones_per_part(paths, monkeypatch, limit, host_memory, kernel):
    """A run of misses copies as rows of the host arena in one call (slot_copy.copy_parts: one kernel launch
    on a GPU) when an expert is at most COPY_KERNEL_MAX_BYTES and the store has an arena, else one expert at a
    time (store.copy_to: a cudaMemcpy per part on a GPU; an mmap store has no arena); the waves' output is the
    fully resident layer's either way."""
    from moesys.offload import engine as engine_module, slot_copy

    mixtral = paths["mixtral"]
    if limit is not None:
        monkeypatch.setattr(engine_module, "COPY_KERNEL_MAX_BYTES", limit)
    model = mo.load(mixtral, gpu_memory=_budget(mixtral, torch.float32, 6), dtype=torch.float32, device="cpu",
                    prefetch="none", resident_if_fits=False, host_memory=host_memory)
    assert model.moesys_offload.store.mode == host_memory
    engine = model.moesys_offload
    assert (engine.copy_programs == engine_module.COPY_PROGRAMS) == kernel and (engine.copy_programs == 0) != kernel
    calls = []
    copy_parts, copy_to = slot_copy.copy_parts, engine.store.copy_to
    monkeypatch.setattr(slot_copy, "copy_parts", lambda arena, parts, src, dst, **kw: calls.append(
        ("rows", src.tolist(), dst.tolist())) or copy_parts(arena, parts, src, dst, **kw))
    monkeypatch.setattr(engine.store, "copy_to", lambda layer, e, views: calls.append(("part", e))
                        or copy_to(layer, e, views))
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [1, 6]])
    x, w = _rows(len(ids))
    got = engine.experts_forward(0, x, ids, w)
    seen = list(calls)  # the resident engine below loads too
    want = _resident_engine(mixtral).experts_forward(0, x, ids, w)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if kernel:  # the waves' misses: [0..5] fill the bank, then [6, 7]
        assert [c[1] for c in seen] == [[engine.store.row_index(0, e) for e in run] for run in ([0, 1, 2], [3, 4, 5],
                                                                                            [6, 7])], seen
        assert all(c[0] == "rows" for c in seen)
    else:
        assert seen == [("part", e) for e in range(8)]


def test_waves_copy_before_the_next_layers_prefetch(paths, monkeypatch):
    """The first two waves are copied before the next layer's guess is prefetched (into the other bank), so
    the prefetch never delays the copies this layer waits for; the third wave copies after them."""
    mixtral = paths["mixtral"]
    model = mo.load(mixtral, gpu_memory=_budget(mixtral, torch.float32, 12), dtype=torch.float32, device="cpu",
                    bank_size=6, resident_if_fits=False)
    engine = model.moesys_offload
    assert engine.cache.banks == [(0, 6), (6, 12)] and engine.cache.bank_of[1] == 1
    copies = []
    copy_run = engine._copy_run
    monkeypatch.setattr(engine, "_copy_run", lambda layer, experts, *a: copies.extend((layer, e) for e in experts)
                        or copy_run(layer, experts, *a))
    monkeypatch.setattr(engine.prefetcher, "guess", lambda layer, x: torch.tensor([4, 5]))
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    x, w = _rows(len(ids))
    engine.experts_forward(0, x, ids, w)
    assert copies == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (1, 4), (1, 5), (0, 6), (0, 7)]


def test_eager_waves_sum_like_transformers_eager_loop_in_bf16(paths):
    """transformers' eager experts implementation keeps whole-bank waves in ascending ids and sums in the
    model's dtype: a top-4 layer needing 8 experts from a bank of 6 equals its eager loop bit for bit in bf16
    (four terms per token: summed in float32 instead, the bf16 result differs)."""
    from transformers import AutoModelForCausalLM

    path = paths["olmoe_top4"]
    model = mo.load(path, gpu_memory=_budget(path, torch.bfloat16, 6), dtype=torch.bfloat16, device="cpu",
                    prefetch="none", resident_if_fits=False, experts_implementation="eager")
    engine = model.moesys_offload
    assert engine.cache.capacity(0) == 6 and not engine.grouped
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, experts_implementation="eager")
    g = torch.Generator().manual_seed(6)
    x = torch.randn(16, 32, generator=g).to(torch.bfloat16)
    w = torch.rand(16, 4, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(8, generator=g)[:4] for _ in range(16)])
    got = engine.experts_forward(0, x, ids, w)
    with torch.no_grad():
        want = ref.model.layers[0].mlp.experts(x, ids, w)
    assert torch.equal(got, want)

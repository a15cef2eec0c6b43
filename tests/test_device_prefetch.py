"""The device bookkeeping's batch steps (moesys.offload.device_cache, OffloadEngine.device_slots): next-visit
eviction equal to the host path's, and the next layer's guessed experts prefetched by a step of their own
(counted as prefetch copies, never evicting this layer's experts), on the CPU."""

import pytest
import torch

import moesys.offload as mo
from moesys.offload import engine as engine_module
from moesys.offload.cache import ExpertCache
from moesys.offload.device_cache import DeviceCacheTables
from tests.test_offload import DEVICE, checkpoints  # noqa: F401
from tests.test_offload_batch import budget

CPU = torch.device("cpu")


def _host_step(cache: ExpertCache, layer: int, ids: list[int]) -> None:
    """What the host path does for a layer's distinct experts, ascending: visit, then lookup or allocate with
    the step's experts protected (OffloadEngine._ensure)."""
    cache.visit(layer)
    protect = {(layer, e) for e in ids}
    for e in ids:
        if cache.lookup((layer, e)) is None:
            cache.allocate((layer, e), protect)


@pytest.mark.parametrize("policy", ["auto", "lru"])
def test_batch_steps_evict_as_the_host_next_visit_policy_does(policy):
    """A batch step asks next-visit (cache_policy auto): fed the same steps over 6 layers sharing banks of 7
    and 6 slots, the device tables hold the same expert in the same slot as the host's next-visit cache
    after every step. Asked for LRU, they differ (the policies choose other victims)."""
    E, layers = 9, [0, 1, 2, 3, 4, 5]
    host = ExpertCache([("w", (2,), torch.float32)], 13, CPU, "next-visit", layers, E, bank_size=7)
    dev_cache = ExpertCache([("w", (2,), torch.float32)], 13, CPU, policy, layers, E, bank_size=7)
    tables = DeviceCacheTables(dev_cache, dev_cache.device_policy)
    tables.load_from_host()
    g = torch.Generator().manual_seed(3)
    differed = 0
    for step in range(60):
        row = step % len(layers)
        ids = sorted(torch.randperm(E, generator=g)[:3].tolist())
        _host_step(host, row, ids)
        nv = row if dev_cache.batch_device_policy == "next-visit" else None
        tables.step(row, torch.tensor(ids), use_kernel=False, distinct=False, next_visit_from=nv)
        start = {layer: host.banks[host.bank_of[layer]][0] for layer in layers}
        want = torch.full((len(layers) * E,), -1, dtype=torch.int64)
        for (layer, e), slot in host.slot_of.items():
            want[layer * E + e] = slot - start[layer]
        same = torch.equal(tables.table[:-1], want)
        if policy == "auto":
            assert same, step
        differed += not same
    assert policy == "auto" or differed > 0


def test_prefetch_step_keeps_this_layers_slots_and_counts_as_prefetch():
    """A prefetch step for the next layer, in a bank holding only this layer's experts and free slots: the
    free slots go first, then next-visit would take this layer's own experts (its next visit is furthest)
    but `protect_N` keeps them; its copies count as prefetch copies, not lookups or misses."""
    E = 8
    cache = ExpertCache([("w", (2,), torch.float32)], 6, CPU, "auto", [0, 1], E)
    tables = DeviceCacheTables(cache, cache.device_policy)
    tables.load_from_host()
    slot_N, src_N, _ = tables.step(0, torch.tensor([1, 2, 3, 1]), use_kernel=False, distinct=False,
                                   next_visit_from=0)
    assert (src_N >= 0).sum() == 3 and tables.counters.tolist() == [3, 3, 0, 0]
    _, src_M, dst_M = tables.step(1, torch.tensor([4, 5, 6]), use_kernel=False, distinct=False,
                                  next_visit_from=0, protect_N=slot_N, prefetch=True)
    assert (src_M >= 0).sum() == 3
    assert tables.counters.tolist() == [3, 3, 0, 3]  # three free slots: nothing evicted yet
    for e in (1, 2, 3):  # layer 0's experts kept their slots
        assert int(tables.table[e]) >= 0
    # one more guess than free slots: without protection layer 0's experts would be the first victims
    _, src_M, _ = tables.step(1, torch.tensor([7, 4]), use_kernel=False, distinct=False,
                              next_visit_from=0, protect_N=slot_N, prefetch=True)
    assert tables.counters.tolist() == [3, 3, 1, 4]
    assert all(int(tables.table[e]) >= 0 for e in (1, 2, 3))
    assert int(tables.table[E + 7]) >= 0 and sum(int(tables.table[E + e]) >= 0 for e in (5, 6)) == 1


def test_device_batch_step_prefetches_the_next_layers_guess(checkpoints):
    """OffloadEngine.device_slots for a batch step with the layer's input: the next layer's guessed experts
    (its router on this input) are resident afterwards, copied as prefetches with the weights from the
    store; the next layer's step over exactly those experts then misses nothing. Without the input (or one
    token) nothing is prefetched."""
    path, dtype = checkpoints["olmoe"], torch.float32
    model = mo.load(path, gpu_memory=budget(path, dtype, 16), dtype=dtype, cuda_graph=False)
    engine = model.moesys_offload
    layers = sorted(engine.inner)
    H = engine.store.H
    x_TH = torch.randn(3, H, generator=torch.Generator().manual_seed(0)).to(engine.device, engine.store.dtype)
    ids_TK = torch.tensor([[0, 1], [2, 1], [3, 0]], device=engine.device)[:, :engine.top_k]
    engine.device_slots(layers[0], ids_TK)  # no input: no prefetch
    assert engine.device_tables.counters[3] == 0
    engine.reset_stats()
    engine.device_slots(layers[0], ids_TK, x_TH=x_TH)
    guess = engine.prefetcher.guess(layers[0], x_TH)
    guess = sorted(set(guess[guess >= 0].tolist()))
    row1 = engine.cache.row[layers[1]]
    E = engine.cache.num_experts
    table = engine.device_tables.table
    assert all(int(table[row1 * E + e]) >= 0 for e in guess)
    prefetched = int(engine.device_tables.counters[3])
    # the demand step found every expert resident (the first call loaded them); the guess copied
    assert prefetched > 0 and engine.device_tables.counters[:2].tolist() == [len(set(ids_TK.flatten().tolist())), 0]
    # the prefetched slots hold the experts' weights from the store
    start = engine.cache.banks[engine.cache.bank_of[layers[1]]][0]
    for e in guess:
        slot = int(table[row1 * E + e]) + start
        for name, view in engine.cache.slot_views(slot).items():
            want = engine.store.host_parts(layers[1], e)[name]
            assert torch.equal(view.cpu(), want.to(view.dtype)), (e, name)
    misses = int(engine.device_tables.counters[1])
    engine.device_slots(layers[1], torch.tensor(guess[:engine.top_k], device=engine.device)[None].repeat(2, 1))
    assert int(engine.device_tables.counters[1]) == misses
    stats = engine.snapshot()
    assert stats.prefetch_copies == prefetched and stats.copies == stats.misses + prefetched


def test_early_prefetch_is_issued_before_the_wait_for_this_layers_copies(checkpoints):
    """prefetch_issue "early" (the default): a batch step issues the next layer's prefetch right after its
    table step, then waits for its own prefetched copies, then copies its misses; "late": wait, misses, then
    the prefetch. An unknown value is refused."""
    from moesys.offload import slot_copy

    path, dtype = checkpoints["olmoe"], torch.float32
    model = mo.load(path, gpu_memory=budget(path, dtype, 16), dtype=dtype, cuda_graph=False)
    engine = model.moesys_offload
    layer = sorted(engine.inner)[0]
    x_TH = torch.randn(3, engine.store.H, generator=torch.Generator().manual_seed(0)).to(engine.device, dtype)
    ids_TK = torch.tensor([[0, 1], [2, 1], [3, 0]], device=engine.device)[:, :engine.top_k]
    calls = []
    prefetch, join, copy = engine._device_prefetch, engine._join_prefetch, slot_copy.copy_parts
    engine._device_prefetch = lambda *a, **k: (calls.append("prefetch"), prefetch(*a, **k))[1]
    engine._join_prefetch = lambda *a, **k: (calls.append("join"), join(*a, **k))[1]

    def spy_copy(*a, **k):
        calls.append("copy")
        return copy(*a, **k)
    try:
        slot_copy.copy_parts = spy_copy
        order = {}
        for issue in ("early", "late"):
            engine.prefetch_issue = issue
            calls.clear()
            engine.device_slots(layer, ids_TK, x_TH=x_TH)
            order[issue] = list(calls)
    finally:
        slot_copy.copy_parts = copy
    # (on the CPU the prefetch's own copy runs inside _device_prefetch, right after its mark)
    assert order["early"] == ["prefetch", "copy", "join", "copy"]
    assert order["late"] == ["join", "copy", "prefetch", "copy"]
    engine.prefetch_issue = "sometime"
    with pytest.raises(ValueError, match="prefetch_issue='sometime'"):
        engine.device_slots(layer, ids_TK, x_TH=x_TH)


@pytest.mark.parametrize("arch,issue", [("olmoe", "early"), ("olmoe", "late"), ("qwen3_moe", "early"),
                                        ("mixtral", "early")])
def test_eager_batch_with_device_bookkeeping_equals_each_sequence_alone(checkpoints, arch, issue):
    """generate_batch(bookkeeping="device"): five prompts, three rows, an EOS mid-way; each sequence's
    tokens are transformers' own for it alone, every decode step kept the bookkeeping on the device (its
    lookups counted there: distinct experts per layer and step) and prefetched the next layer's guess, with
    the prefetch issued before ("early") or after ("late") the wait for the layer's own copies."""
    from moesys.offload.batch import generate_batch
    from tests.test_offload_batch import alone, prompts, truncate_at

    path, dtype, new = checkpoints[arch], torch.float32, 8
    ps = prompts()
    want = alone(path, dtype, ps, new)
    eos = want[1][3]
    want = [truncate_at(w, eos) for w in want]
    model = mo.load(path, gpu_memory=budget(path, dtype, 16), dtype=dtype, cuda_graph=False)
    engine = model.moesys_offload
    engine.prefetch_issue = issue
    steps = []
    real = engine.device_slots

    def spy(layer, ids_TK, *args, **kwargs):
        steps.append((layer, len(set(ids_TK.flatten().tolist()))))
        return real(layer, ids_TK, *args, **kwargs)
    engine.device_slots = spy
    run = generate_batch(model, ps, max_new_tokens=new, batch_size=3, eos=eos, bookkeeping="device")
    got = {r.index: r for r in run}
    assert [got[i].token_ids for i in range(len(ps))] == want
    assert len(steps) == run.decode_steps * len(engine.inner) > 0
    stats = engine.snapshot()
    assert engine.device_tables.counters.sum() == 0  # folded into the statistics by snapshot
    assert stats.prefetch_copies > 0 and stats.evictions > 0
    with pytest.raises(ValueError, match="bookkeeping='sideways' is unknown"):
        generate_batch(model, ps, bookkeeping="sideways")


def test_batch_steps_take_the_kernel_unless_the_engine_asks_for_the_reference(checkpoints, monkeypatch):
    """OffloadEngine.batch_step_kernel: True (default) leaves a batch step's and its prefetch's use_kernel to the
    tables (the batch kernel on CUDA); False asks for the torch reference (bench/offload_batch.py's A/B). A
    batch-1 step keeps its own default either way."""
    from moesys.offload.batch import generate_batch
    from moesys.offload.device_cache import DeviceCacheTables

    asked = []
    real = DeviceCacheTables.step
    monkeypatch.setattr(DeviceCacheTables, "step", lambda self, row, ids, **kw: asked.append(
        (ids.numel() > 3 or kw.get("prefetch", False), kw.get("use_kernel"))) or real(self, row, ids, **kw))
    path = checkpoints["qwen3_moe"]
    model = mo.load(path, gpu_memory=budget(path, torch.float32, 16), dtype=torch.float32, cuda_graph=False)
    for flag in (True, False):
        model.moesys_offload.batch_step_kernel = flag
        asked.clear()
        list(generate_batch(model, [[5, 6, 7], [8, 9]], max_new_tokens=3, bookkeeping="device"))
        batch = {k for b, k in asked if b}
        assert batch == ({None} if flag else {False}), flag
        assert {k for b, k in asked if not b} <= {None}



def test_copy_priority_replaces_the_copy_stream_and_keeps_the_tokens(checkpoints):
    """OffloadEngine.set_copy_priority: "high" puts the copies on a stream of the device's greatest priority
    (bench/offload_batch.py --copy-priority's A/B), "normal" back at 0; the tokens stay the same; an unknown
    priority is refused. On a CPU there is no stream, and only the setting is kept."""
    from moesys.offload.batch import generate_batch

    path = checkpoints["qwen3_moe"]
    model = mo.load(path, gpu_memory=budget(path, torch.float32, 16), dtype=torch.float32, cuda_graph=False)
    engine = model.moesys_offload
    ps = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    tokens = {}
    for priority in ("normal", "high", "normal"):
        engine.set_copy_priority(priority)
        assert engine.copy_priority == priority
        if engine.cuda:
            want = torch.cuda.Stream.priority_range()[1] if priority == "high" else 0
            assert engine.copy_stream.priority == want
        else:
            assert engine.copy_stream is None
        run = {r.index: r.token_ids for r in generate_batch(model, ps, max_new_tokens=4, bookkeeping="device")}
        assert tokens.setdefault(priority, run) == run
    assert tokens["high"] == tokens["normal"] and engine.snapshot().misses > 0
    with pytest.raises(ValueError, match=r"copy priority 'urgent' is unknown; use one of \['normal', 'high'\]"):
        engine.set_copy_priority("urgent")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the copy stream's prefetch (a grid-bounded copy kernel) "
                    "runs on CUDA only; on a CPU the prefetch copies through slot_copy's reference")
def test_device_prefetch_copies_with_the_engines_copy_programs(checkpoints, monkeypatch):
    """The device path's prefetch on the copy stream takes the engine's copy_programs as its grid (what
    bench/offload_batch.py --copy-programs sweeps), and the default where the host path copies per expert (0)."""
    from moesys.offload import slot_copy
    from moesys.offload.batch import generate_batch

    path = checkpoints["qwen3_moe"]
    model = mo.load(path, gpu_memory=budget(path, torch.float32, 16), dtype=torch.float32, cuda_graph=False)
    engine = model.moesys_offload
    grids, copy_parts = [], slot_copy.copy_parts

    def recording(*args, programs=None, **kwargs):
        grids.append(programs)
        return copy_parts(*args, programs=programs, **kwargs)

    monkeypatch.setattr(slot_copy, "copy_parts", recording)
    ps = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    for programs, want in ((5, 5), (0, engine_module.COPY_PROGRAMS)):
        engine.copy_programs, grids[:] = programs, []
        list(generate_batch(model, ps, max_new_tokens=4, bookkeeping="device"))
        # the host path's copies (prefill) take copy_programs too, or with 0 a cudaMemcpy each; the miss copies None
        assert set(grids) - {None} == {want} and engine.snapshot().prefetch_copies > 0, (programs, grids)


def test_auto_bookkeeping_takes_the_device_path_wherever_the_banks_hold_the_batch(checkpoints):
    """bookkeeping="auto": quantized and unquantized experts take the device path at any batch the banks hold
    (a batch of 8 tokens' rows included: 64 routed rows for 8 experts); "host" never, and a batch the banks
    cannot hold takes the host path whatever was asked."""
    import contextlib

    from moesys.offload.batch import generate_batch

    def on_device(model, rows, bookkeeping="auto"):
        gen = generate_batch(model, [[5, 6, 7]], max_new_tokens=2, bookkeeping=bookkeeping)
        return not isinstance(gen._device_steps(rows), contextlib.nullcontext)

    path = checkpoints["olmoe"]
    for quantize, slots in (("none", 6), ("int4", 8)):  # unquantized: 6 slots, fewer than the 8 experts
        model = mo.load(path, gpu_memory=budget(path, torch.float32, slots), dtype=torch.float32, cuda_graph=False,
                        quantize_experts=quantize)
        engine = model.moesys_offload
        for rows in (1, 2, 8) if quantize == "int4" else (1, 2):
            assert engine.device_batch_unsupported(rows) is None
            assert on_device(model, rows) and on_device(model, rows, "device") and not on_device(model, rows, "host")
        if quantize == "none":  # 4 rows may need all 8 experts at once: more than the bank's 6 slots
            assert engine.device_batch_unsupported(4) is not None
            assert not on_device(model, 4, "device") and not on_device(model, 4)


@pytest.mark.parametrize("E,N", [(8, 3), (8, 16), (20, 40), (128, 1024), (6, 100)])
def test_vote_order_kernel_matches_the_torch_version(E, N):
    """prefetch.vote_order's one-program kernel (TRITON_INTERPRET on a CPU, CUDA on a GPU) and its torch version:
    the experts by votes, ties by lower id, -1 past those picked, min(E, N) entries; ids drawn from a few experts,
    so votes tie and some experts get none."""
    from moesys.offload.prefetch import vote_order

    g = torch.Generator().manual_seed(E * N)
    for _ in range(3):
        pool = torch.randperm(E, generator=g)[:max(1, E // 2)]
        ids_N = pool[torch.randint(len(pool), (N,), generator=g)]
        want = vote_order(ids_N, E, use_kernel=False)
        got = vote_order(ids_N.to(DEVICE), E, use_kernel=True).cpu()  # on a GPU: the compiled kernel
        assert got.shape == (min(E, N),) and torch.equal(got, want), (E, N)
        assert (want >= 0).sum() == min(len(set(ids_N.tolist())), E, N)  # -1 past the experts picked
        votes = torch.bincount(ids_N, minlength=E)
        picked = want[want >= 0]
        assert torch.equal(votes[picked], torch.sort(votes[picked], descending=True, stable=True).values)

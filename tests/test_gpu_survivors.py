"""What only a CUDA device shows, against independent expectations: the capacity tie rule under CUDA's
unstable small sort (a Python loop), the offload engine's copy-stream waits, host waits and pending sets (the
events it records and the logits of the model fully on the GPU), host-built indices reaching the GPU without a
host sync (torch's sync debug mode), the device bookkeeping's kernel choice and tie order (the CPU reference),
and FSSDP's attention time in seconds (the GPU time of a sleep kernel). Each test kills mutants that survive
every CPU run; tools/gpu_mutants.py lists them and runs this file against each (docs/TESTING.md)."""

import functools
import sys
import time

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA sorts, streams, "
                                 "events and the sync debug mode")]


@functools.cache
def _cycles_per_second() -> float:
    torch.cuda._sleep(1000)  # load the kernel
    torch.cuda.synchronize()
    n = 20_000_000
    t0 = time.perf_counter()
    torch.cuda._sleep(n)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def _gpu_sleep(seconds: float) -> None:
    """A kernel that keeps the current stream busy for about `seconds` (the host goes on at once)."""
    torch.cuda._sleep(int(seconds * _cycles_per_second()))


def _target_device(args, kwargs) -> torch.device | None:
    for a in (*args, kwargs.get("device")):
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
        if isinstance(a, int) and not isinstance(a, bool):
            return torch.device("cuda", a)
    return None


class HostToDevice:
    """Records every Tensor.to that moesys code makes from a CPU tensor to a CUDA device as (calling function,
    synced): each such copy runs under torch's sync debug mode "error", so a copy that makes the host wait for
    the GPU (a blocking copy, from pageable or pinned memory) is seen as synced=True, and then made anyway."""

    def __init__(self, monkeypatch):
        self.records: list[tuple[str, bool]] = []
        real = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            target = _target_device(args, kwargs)
            if tensor.device.type != "cpu" or target is None or target.type != "cuda" or \
                    not caller.f_globals.get("__name__", "").startswith("moesys."):
                return real(tensor, *args, **kwargs)
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out, synced = real(tensor, *args, **kwargs), False
            except RuntimeError as e:
                if "synchroniz" not in str(e):
                    raise
                out, synced = None, True
            finally:
                torch.cuda.set_sync_debug_mode(mode)
            self.records.append((caller.f_code.co_name, synced))
            return real(tensor, *args, **kwargs) if synced else out

        monkeypatch.setattr(torch.Tensor, "to", to)

    def synced(self, functions) -> list[str]:
        return [name for name, synced in self.records if synced and name in functions]

    def calls(self, name) -> int:
        return sum(n == name for n, _ in self.records)


# ------------------------------------------------------------------ moesys/layers/router.py
def _kept_by_the_tie_rule(ids_TK, score_TK, num_experts, capacity):
    """keep_top_per_expert's contract as a loop: each expert keeps its `capacity` highest-scored assignments,
    equal scores in row-major [T, K] order (Python's sort is stable)."""
    T, K = ids_TK.shape
    keep = torch.zeros(T, K, dtype=torch.bool)
    for e in range(num_experts):
        mine = sorted(((t, k) for t in range(T) for k in range(K) if ids_TK[t, k] == e),
                      key=lambda tk: -float(score_TK[tk]))
        for t, k in mine[:capacity]:
            keep[t, k] = True
    return keep


def tie_cases():
    """(ids_TK, score_TK, E, capacity) with N = T*K <= 32 and many ties: every score equal, or on 5 levels."""
    g = torch.Generator().manual_seed(0)
    for T, K, E, capacity in [(16, 2, 4, 3), (8, 4, 8, 2), (32, 1, 4, 5), (11, 2, 3, 4), (5, 3, 6, 1)]:
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        levels = torch.rand(T, K, generator=g).mul(4).round().div(4)
        yield ids, torch.full((T, K), 0.5), E, capacity
        yield ids, levels, E, capacity


def test_capacity_ties_keep_the_earlier_assignment_on_cuda():
    """Equal scores: the earlier assignment stays. torch's CUDA sort with stable=False is a bitonic network for
    at most 32 keys, which reorders equal keys (larger sorts are merge or radix sorts, stable either way, and
    the CPU sort is stable too), so the rule is checked at N = T*K <= 32, against a loop
    (tests/test_gpu_mutants.py checks on the CPU that these cases tell the unstable sorts apart)."""
    from moesys.layers.router import keep_top_per_expert

    for ids, score, E, capacity in tie_cases():
        got = keep_top_per_expert(ids.cuda(), score.cuda(), E, capacity).cpu()
        assert torch.equal(got, _kept_by_the_tie_rule(ids, score, E, capacity)), (ids, score, E, capacity)


def test_router_capacity_drops_the_later_of_equal_tokens_on_cuda():
    """A router whose logits are all equal (zero tokens): every routed weight ties, so the capacity keeps each
    expert's earliest assignments (12 tokens x top-2 = 24 <= 32: the bitonic range)."""
    from moesys.layers.router import Router

    T, E, K = 12, 4, 2
    r = Router(8, E, K, capacity_factor=1.0).cuda()
    out = r(torch.zeros(T, 8, device="cuda"))
    kept = (out.topk_weights_TK != 0).cpu()
    want = _kept_by_the_tie_rule(out.topk_ids_TK.cpu(), torch.ones(T, K), E, r.capacity(T))
    assert torch.equal(kept, want) and not kept.all()


# ------------------------------------------------------------------ moesys/offload/cache.py, device_cache.py
def _cache(device, policy="lru", bank_size=1023):
    from moesys.offload.cache import ExpertCache

    return ExpertCache([("w", (4,), torch.float32)], 6, torch.device(device), policy, [0, 1], 8,
                       bank_size=bank_size, top_k=2)


def test_slot_table_upload_is_pinned_and_asynchronous(monkeypatch):
    """update_table copies the new entries to the device table from pinned memory without a host sync (the host
    path calls it per layer), into each layer's row, bank-local (two banks of 3 slots)."""
    cache = _cache("cuda", bank_size=3)
    spy = HostToDevice(monkeypatch)
    want = torch.full((2, 8), -1, dtype=torch.int64)
    for layer in (0, 1):
        slots = [cache.allocate((layer, e), set())[0] for e in (5, 2)]
        cache.update_table(layer, [5, 2], slots)
        start = cache.banks[cache.bank_of[layer]][0]
        want[layer, [5, 2]] = torch.tensor(slots) - start
    assert cache.banks == [(0, 3), (3, 6)]
    assert spy.records == [("update_table", False)] * 2
    assert torch.equal(cache.slot_table_LE.cpu(), want)


# batch steps (row, ids) whose experts repeat, 8 to 24 ids: an unstable sort takes a later occurrence first
REPEATED_STEPS = [(0, [3, 5, 3, 3, 5, 1, 3, 1]), (1, [2, 2, 7, 2, 7, 7, 0, 2, 0, 0, 2, 7]),
                  (0, [4, 4, 4, 4, 6, 6, 3, 3, 6, 4]), (1, [1] * 16 + [5] * 8)]


def _tables(device, policy):
    from moesys.offload.device_cache import DeviceCacheTables

    return DeviceCacheTables(_cache(device, policy), policy)


def test_device_bookkeeping_takes_a_fused_kernel_on_cuda(monkeypatch):
    """use_kernel=None: one token's distinct ids on a CUDA table take the fused Triton kernel, a batch's ids
    (repeats) the batch kernel; both give the CPU reference's slots (on a GPU: the kernels' barriers make
    their scratch stores visible to the whole program)."""
    from moesys.offload.device_cache import DeviceCacheTables

    calls = []
    for name in ("_step_kernel", "_batch_step_kernel", "_step_reference"):
        real = getattr(DeviceCacheTables, name)
        monkeypatch.setattr(DeviceCacheTables, name,
                            lambda self, *a, _real=real, _name=name: calls.append((_name, self.table.is_cuda))
                            or _real(self, *a))
    gpu, cpu = _tables("cuda", "lru"), _tables("cpu", "lru")
    for row, ids, distinct in ((0, [3, 5], True), (1, [3, 3, 6, 5, 6], False), (0, [7, 3], True)):
        got = gpu.step(row, torch.tensor(ids, device="cuda"), distinct=distinct)
        want = cpu.step(row, torch.tensor(ids), use_kernel=False, distinct=distinct)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want)), (row, ids)
    assert [name for name, on_gpu in calls if on_gpu] == ["_step_kernel", "_batch_step_kernel", "_step_kernel"]


@pytest.mark.parametrize("use_kernel", [False, True])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_device_bookkeeping_of_repeated_experts_takes_their_first_occurrence_on_cuda(policy, use_kernel):
    """A batch step's repeated expert is counted, installed and copied at its first occurrence: the store rows
    (src) sit at the first occurrences and the misses take victims in that order, as on the CPU. The ids are
    sorted to find the first occurrences, with 8 to 24 ids: CUDA's unstable sort (a bitonic network up to 32
    keys) would take a later occurrence for the first; the batch kernel takes the min position instead."""
    gpu, cpu = _tables("cuda", policy), _tables("cpu", policy)
    for row, ids in REPEATED_STEPS:
        got = gpu.step(row, torch.tensor(ids, device="cuda"), use_kernel=use_kernel, distinct=False)
        want = cpu.step(row, torch.tensor(ids), use_kernel=False, distinct=False)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want)), (row, ids)
    assert torch.equal(gpu.table.cpu(), cpu.table) and torch.equal(gpu.owner_S.cpu(), cpu.owner_S)


# ------------------------------------------------------------------ moesys/offload/engine.py
@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """A tiny random Mixtral (3 layers, 8 experts, top-2) with large router weights, so the cache churns."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from moesys.offload.adapters import adapter_for, find_moe_blocks
    from tests.test_offload import COMMON

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2))
    with torch.no_grad():
        for block in find_moe_blocks(model, adapter_for(model.config)).values():
            block.gate.weight.normal_(0, 1.0)
    path = tmp_path_factory.mktemp("mixtral")
    model.save_pretrained(path)
    return path


def _offloaded(path, slots=6, **options):
    """The host-routed engine on CUDA (no decode graph) with a cache of `slots` experts in one bank."""
    import moesys.offload as mo
    from tests.test_offload import _budget

    dtype = torch.bfloat16 if options.get("quantize_experts", "none") != "none" else torch.float32
    model = mo.load(path, gpu_memory=_budget(path, dtype, slots, **{k: v for k, v in options.items()
                                                                    if k == "quantize_experts"}),
                    dtype=dtype, cuda_graph=False, **options)
    engine = model.moesys_offload
    assert engine.cuda and engine.cache.banks == [(0, slots)]
    return model, engine


@torch.no_grad()
def _teacher_forced_logits(model, ids_BT, prefill):
    """Logits [T, V] of a prefill of `prefill` tokens and then one decode step per remaining token."""
    out = model(ids_BT[:, :prefill], use_cache=True)
    logits, cache = [out.logits[0]], out.past_key_values
    for t in range(prefill, ids_BT.shape[1]):
        out = model(ids_BT[:, t:t + 1], past_key_values=cache, use_cache=True)
        logits.append(out.logits[0])
        cache = out.past_key_values
    return torch.cat(logits).float()


@pytest.mark.parametrize("copy_wait", ["host", "device"])
@pytest.mark.parametrize("programs", [None, 0], ids=["copy-kernel", "memcpy-per-part"])
def test_copies_wait_for_the_evicted_experts_last_reader_and_keep_the_logits(mixtral, monkeypatch, programs,
                                                                             copy_wait):
    """A prefill whose layers need all 8 experts from a bank of 6 (pipelined waves: a wave's copies evict the
    wave before it, whose compute is queued) and decode steps that evict other layers' experts. Every run of
    copies (a wave's misses, a prefetch) copies exactly its allocated (layer, expert) -> slot pairs on the
    copy stream (small experts: one bounded-grid launch of slot_copy's kernel; with copy_programs 0, the
    large experts' way: a cudaMemcpy per part, store.copy_to), after making the copy stream wait for exactly
    the evicted experts' layers' last-use events (each once, none for free slots), and marks its slots
    pending for its layer under one event. Each wave's compute is held back by a sleep kernel, so a copy that
    does not wait overwrites the slots before they are read: the logits of every position must still equal
    the model fully on the GPU. With copy_wait "device" every copy is held back too (the host does not block
    on it): a compute that does not wait for its copies reads its slots before they land."""
    from transformers import AutoModelForCausalLM

    from moesys.offload import engine as engine_module, slot_copy

    model, engine = _offloaded(mixtral)
    assert engine.copy_programs == engine_module.COPY_PROGRAMS  # tiny experts take the kernel
    if programs is not None:
        engine.copy_programs = programs
    engine.copy_wait = copy_wait
    slow_copy = (lambda: _gpu_sleep(0.003)) if copy_wait == "device" else (lambda: None)
    _cycles_per_second()  # calibrated before the forward: its sync would hold the host
    log = []
    prefill = engine.strategies["prefill"]
    allocate, copy_parts, copy_run, run_wave = (engine.cache.allocate, slot_copy.copy_parts, engine._copy_run,
                                                prefill.run_wave)
    wait_event = torch.cuda.Stream.wait_event

    def logged_allocate(key, protect):
        slot, evicted = allocate(key, protect)
        log.append(("alloc", key, slot, evicted, None if evicted is None else engine.layer_used.get(evicted[0])))
        return slot, evicted

    def logged_wait(stream, event):
        if stream == engine.copy_stream:
            log.append(("wait", event))
        return wait_event(stream, event)

    def logged_copy(arena, parts, src, dst, **kw):  # the indices are read after the forward (reading syncs)
        log.append(("copy", src, dst, torch.cuda.current_stream() == engine.copy_stream, kw))
        slow_copy()
        return copy_parts(arena, parts, src, dst, **kw)

    copy_to = engine.store.copy_to

    def logged_copy_to(layer, e, views):
        log.append(("copy_to", (layer, e), torch.cuda.current_stream() == engine.copy_stream))
        slow_copy()
        return copy_to(layer, e, views)

    runs, last_end = [], [0]

    def checked_run(layer, experts, slots, waits):
        first = len(log)
        copy_run(layer, experts, slots, waits)
        if experts:  # the allocations since the previous run are this run's (_ensure / _prefetch: then the copy)
            runs.append(dict(layer=layer, experts=list(experts), slots=list(slots), log=log[first:],
                             allocs=[e for e in log[last_end[0]:first] if e[0] == "alloc"],
                             pending=set(slots) <= engine.pending[layer],
                             events={id(engine.cache.ready[s]) for s in slots}))
        last_end[0] = len(log)

    waves = []
    monkeypatch.setattr(engine.cache, "allocate", logged_allocate)
    monkeypatch.setattr(slot_copy, "copy_parts", logged_copy)
    monkeypatch.setattr(engine.store, "copy_to", logged_copy_to)
    monkeypatch.setattr(engine, "_copy_run", checked_run)
    monkeypatch.setattr(prefill, "run_wave", lambda layer, *a: waves.append(layer) or _gpu_sleep(0.005)
                        or run_wave(layer, *a))
    monkeypatch.setattr(torch.cuda.Stream, "wait_event", logged_wait)

    ids = torch.randint(2, 101, (1, 36), generator=torch.Generator().manual_seed(1)).cuda()
    got = _teacher_forced_logits(model, ids, prefill=32)
    monkeypatch.undo()
    ref = AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.float32).cuda()
    torch.testing.assert_close(got, _teacher_forced_logits(ref, ids, prefill=32), rtol=1e-5, atol=1e-5)

    assert all(waves.count(layer) >= 2 for layer in engine.inner), waves  # every layer's prefill ran in waves
    allocs = [e for e in log if e[0] == "alloc"]
    assert sum(len(r["allocs"]) for r in runs) == len(allocs) > 0  # every allocation belongs to a run
    for run in runs:
        mine = run["allocs"]
        assert [a[1] for a in mine] == [(run["layer"], e) for e in run["experts"]], run
        assert [a[2] for a in mine] == run["slots"], run
        kernel, per_part = ([e for e in run["log"] if e[0] == kind] for kind in ("copy", "copy_to"))
        if engine.copy_programs:
            (_, src, dst, on_copy_stream, kw), = kernel
            assert not per_part, run
            assert src.tolist() == [engine.store.row_index(run["layer"], e) for e in run["experts"]], run
            assert dst.tolist() == run["slots"] and on_copy_stream, run
            assert kw.get("programs") == engine.copy_programs, kw
        else:
            assert not kernel and [e[1] for e in per_part] == [(run["layer"], e) for e in run["experts"]], run
            assert all(e[2] for e in per_part), run
        want, seen = [], set()
        for a in mine:
            if a[4] is not None and id(a[4]) not in seen:
                seen.add(id(a[4]))
                want.append(a[4])
        waits = [e[1] for e in run["log"] if e[0] == "wait"]
        assert len(waits) == len(want) and all(a is b for a, b in zip(waits, want)), run
        assert run["pending"] and len(run["events"]) == 1 and id(None) not in run["events"], run
    evicting = [a for a in allocs if a[4] is not None]
    assert any(a[3][0] == a[1][0] for a in evicting)  # a wave evicting its own layer's earlier wave
    assert any(a[3][1] != a[3][0] for a in evicting)  # an expert id that is not its layer's
    assert any(len(r["experts"]) > 1 for r in runs)  # a run of several copies in one launch


def _slow_copies(engine, monkeypatch, seconds=0.03):
    """Each run of copies starts after a sleep kernel on the copy stream: its event stays pending that long."""
    from moesys.offload import slot_copy

    copy_parts = slot_copy.copy_parts
    _cycles_per_second()
    monkeypatch.setattr(slot_copy, "copy_parts", lambda *a, **kw: _gpu_sleep(seconds) or copy_parts(*a, **kw))


def test_wait_returns_once_each_slots_copy_has_landed_and_times_it(mixtral, monkeypatch):
    """_wait blocks the host until the copy into each slot has run (a slot whose copy was waited for already,
    listed first, is skipped), clears the slots' events and pending marks, and adds the time it blocked to
    copy_wait_s (more than 0, at most the call's wall time)."""
    _, engine = _offloaded(mixtral)
    _slow_copies(engine, monkeypatch)
    assert not engine.cache.slot_of
    done = engine._ensure(0, [7])
    engine._wait(0, done)
    slots = engine._ensure(0, [0, 1])
    events = [engine.cache.ready[s] for s in slots]
    assert None not in events and not any(e.query() for e in events)  # 30 ms copies still in flight
    assert set(slots) <= engine.pending[0]
    before = engine.stats.copy_wait_s
    t0 = time.perf_counter()
    engine._wait(0, done + slots)
    wall = time.perf_counter() - t0
    assert all(e.query() for e in events)
    assert all(engine.cache.ready[s] is None for s in slots) and not set(slots) & engine.pending[0]
    assert 0 < engine.stats.copy_wait_s - before <= wall


def test_device_wait_queues_the_compute_after_the_copies_without_blocking(mixtral, monkeypatch):
    """copy_wait "device": _wait returns while a 30 ms copy is still in flight (no host time counted), clears
    the slots' events and pending marks, and what the compute stream reads from the slots next is the copied
    expert (the stream waited for the copy; without that wait it reads the slot before the copy lands)."""
    _, engine = _offloaded(mixtral)
    engine.copy_wait = "device"
    _slow_copies(engine, monkeypatch)
    assert not engine.cache.slot_of  # the slots held no expert before
    slots = engine._ensure(0, [3, 5])
    events = [engine.cache.ready[s] for s in slots]
    before = engine.stats.copy_wait_s
    t0 = time.perf_counter()
    engine._wait(0, slots)
    wall = time.perf_counter() - t0
    assert wall < 0.02 and not any(e.query() for e in events)  # returned with the copies in flight
    assert engine.stats.copy_wait_s == before
    assert all(engine.cache.ready[s] is None for s in slots) and not set(slots) & engine.pending[0]
    read = {name: view.clone() for name, view in engine.cache.slot_views(slots[1]).items()}  # compute stream
    want = {name: torch.empty_like(t) for name, t in read.items()}
    engine.store.copy_to(0, 5, want)
    torch.cuda.synchronize()
    for name in read:
        assert torch.equal(read[name], want[name]), name


def test_wait_all_waits_for_every_layers_copies(mixtral, monkeypatch):
    _, engine = _offloaded(mixtral)
    _slow_copies(engine, monkeypatch)
    slots = {0: engine._ensure(0, [2, 3]), 1: engine._ensure(1, [4])}
    events = [engine.cache.ready[s] for layer_slots in slots.values() for s in layer_slots]
    assert None not in events and engine.pending[0] and engine.pending[1]
    engine._wait_all()
    assert all(e.query() for e in events) and not any(engine.pending.values())
    assert all(engine.cache.ready[s] is None for layer_slots in slots.values() for s in layer_slots)


@pytest.mark.parametrize("options, path", [(dict(experts_implementation="eager"), "_run_loop"),
                                           (dict(quantize_experts="int8"), "_run_dequant")],
                         ids=["eager-loop", "int8-dequant"])
def test_host_built_row_indices_reach_the_gpu_without_a_host_sync(mixtral, monkeypatch, options, path):
    """The per-expert loop (transformers' eager implementation) and the dequantizing waves build their row
    indices on the host from the ids already read back; they go to the GPU from pinned memory without
    blocking the host (one sync per layer is the routing's)."""
    model, engine = _offloaded(mixtral, **options)
    spy = HostToDevice(monkeypatch)
    ids = torch.randint(2, 101, (1, 24), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        model(ids)
    assert spy.calls(path) > 0, spy.records
    assert spy.synced({"_run_loop", "_run_dequant", "_wave_rows", "update_table"}) == []


# ------------------------------------------------------------------ moesys/parallel/fssdp.py
def _one_rank_fssdp_experts():
    """FSSDPExperts as one process owning all 8 experts (no process group), as tests/test_fssdp.py builds it."""
    from moesys.layers import Experts
    from moesys.parallel.comm import CommContext
    from moesys.parallel.fssdp import FSSDPExperts, LayerPlan

    torch.manual_seed(0)
    ex = FSSDPExperts(Experts(8, 16, 12, backend="loop"), list(range(8)), group=None, rank=0, world_size=1,
                      layer_name="l0", comm=CommContext(None, rank=0, group_size=1, layer="l0"))
    ex.plan = LayerPlan((0,) * 8, ((0,),) * 8)
    return ex


def _fssdp_tokens(device, T=5):
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(T)])
    return torch.randn(T, 16, generator=g).to(device), ids.to(device), torch.rand(T, 2, generator=g).to(device)


def test_attention_time_of_cuda_experts_is_the_gpu_time_in_seconds():
    """Experts on CUDA time the attention with CUDA timing events: the GPU time from the block's start to the
    layer's forward, a 50 ms sleep kernel here, which the host did not wait for; in seconds (the events'
    milliseconds / 1000), at most the wall time around it."""
    ex = _one_rank_fssdp_experts().cuda()
    tokens = _fssdp_tokens("cuda")
    _cycles_per_second()  # calibrated before the timed region
    ex.block_started()  # warm-up: the pinned buffers of the prefetch, the kernels
    ex(*tokens)
    ex.attention_seconds()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    ex.block_started()
    _gpu_sleep(0.05)
    ex(*tokens)
    secs = ex.attention_seconds()
    wall = time.perf_counter() - t0
    start, end = ex._attn_marks
    assert isinstance(start, torch.cuda.Event) and isinstance(end, torch.cuda.Event)
    assert secs == pytest.approx(start.elapsed_time(end) / 1000, rel=1e-6)
    assert 0.02 <= secs <= wall


def test_attention_time_of_host_experts_on_a_gpu_machine_is_host_time():
    """Experts on the CPU of a machine with a GPU keep the host clock: CUDA events would time an idle stream."""
    ex = _one_rank_fssdp_experts()
    tokens = _fssdp_tokens("cpu")
    t0 = time.perf_counter()
    ex.block_started()
    time.sleep(0.05)
    ex(*tokens)
    secs = ex.attention_seconds()
    assert all(isinstance(m, float) for m in ex._attn_marks)
    assert 0.045 <= secs <= time.perf_counter() - t0


def test_small_index_tensors_reach_the_gpu_without_a_host_sync(monkeypatch):
    """to_device_async: pinned and non-blocking on CUDA (FSSDP's tables and local rows each step: a plain copy
    from pageable memory would wait for the stream, a second host sync per layer)."""
    from moesys.parallel.fssdp import to_device_async

    spy = HostToDevice(monkeypatch)
    t = torch.arange(7)
    for device in ("cuda", torch.device("cuda")):
        out = to_device_async(t, device)
        assert out.is_cuda and torch.equal(out.cpu(), t)
    assert spy.records == [("to_device_async", False)] * 2

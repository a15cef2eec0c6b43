"""generate_batch(graph=True): a batch's decode steps through moesys's decode graph (the expert cache's
bookkeeping on the device, a fixed-shape KV cache), on tiny random checkpoints offloaded under a budget
that evicts. On a CPU the graph's steps run eagerly through the same sync-free path (moesys.offload.graph),
so everything but the capture is exercised here."""

import warnings

import pytest
import torch

import moesys.offload as mo
from moesys.offload import batch_static_kv
from moesys.offload.batch import Request, generate_batch
from tests.test_offload import checkpoints  # noqa: F401  (the fixture: tiny random checkpoints per architecture)
from tests.test_offload_batch import ARCHS, alone, budget, prompts, truncate_at

CONTEXT = 256


def load(path, dtype=torch.float32, slots=10, max_context=CONTEXT):
    """The exact mode (compile=False; on a CPU compile is off anyway): on CUDA the compiled step's kernels
    may round a bf16 near-tie otherwise than transformers' eager model, whose tokens these tests compare."""
    return mo.load(path, gpu_memory=budget(path, dtype, slots, max_context=max_context), dtype=dtype,
                   max_context=max_context, compile=False)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
@pytest.mark.parametrize("arch", ARCHS)
def test_graph_batch_equals_each_sequence_alone(checkpoints, arch, dtype):
    """Five prompts of different lengths, three rows, an EOS one sequence meets mid-way: each sequence's
    tokens are transformers' own for it alone, and every decode step took the decode graph's path."""
    path, new = checkpoints[arch], 8
    ps = prompts()
    want = alone(path, dtype, ps, new)
    eos = want[1][3]
    want = [truncate_at(w, eos) for w in want]
    model = load(path, dtype)  # 10 of 24 experts' slots: the banks evict, and hold the 6 a step may need
    run = generate_batch(model, ps, max_new_tokens=new, batch_size=3, eos=eos, graph=True)
    got = {r.index: r for r in run}
    assert [got[i].token_ids for i in range(len(ps))] == want
    assert [got[i].finish_reason for i in range(len(ps))] == ["eos" if eos in w else "length" for w in want]
    graph = model.moesys_decode_graph
    # every step took the graph's path: replayed on CUDA, run eagerly on a CPU (or as a warm-up)
    assert graph.eager_steps + graph.replays == run.decode_steps > 0
    engine = model.moesys_offload
    assert engine.batch_rows_valid is None             # handed back after the run
    stats = engine.snapshot()
    assert stats.evictions > 0 and stats.misses > 0


def test_free_rows_copy_nothing(checkpoints):
    """A row whose sequence ended stays in the step (fixed shape) but takes its step's first row's experts:
    the device bookkeeping then looks up exactly the live row's K experts per layer and step."""
    path = checkpoints["olmoe"]
    model = load(path)
    requests = [Request(prompts()[0], max_new_tokens=9), Request(prompts()[1], max_new_tokens=1)]
    run = generate_batch(model, requests, batch_size=2, graph=True)
    got = {r.index: r.token_ids for r in run}
    assert got == {0: alone(path, torch.float32, [requests[0].token_ids], 9)[0],
                   1: alone(path, torch.float32, [requests[1].token_ids], 1)[0]}
    engine = model.moesys_offload
    lookups = int(engine.device_tables.counters[0])
    assert run.decode_steps == 8 and lookups == run.decode_steps * len(engine.inner) * engine.top_k


def test_kv_cache_shifts_keep_the_tokens(checkpoints, monkeypatch):
    """A joining prompt longer than the write column shifts every row right; a write column at the end of
    the cache drops the leading padding (shift left). Both happen here, and the tokens stay."""
    path, new = checkpoints["qwen3_moe"], 6
    ps = prompts(lengths=(3, 4, 14, 2, 11), seed=7)
    shifts = {"left": 0, "right": 0}
    for side in shifts:
        real = getattr(batch_static_kv.StaticBatchKV, f"_shift_{side}")

        def spy(self, n, real=real, side=side):
            shifts[side] += n > 0
            return real(self, n)
        monkeypatch.setattr(batch_static_kv.StaticBatchKV, f"_shift_{side}", spy)
    longest = max(len(p) for p in ps) + new
    # two rows of `longest` columns (and room for a joining prompt beside them): shifted left often
    model = load(path, max_context=2 * longest + max(len(p) for p in ps))
    requests = [Request(p, max_new_tokens=n) for p, n in zip(ps, (2, new, new, 3, new))]
    got = {r.index: r.token_ids for r in generate_batch(model, requests, batch_size=2, graph=True)}
    assert [got[i] for i in range(len(ps))] == [alone(path, torch.float32, [p], r.max_new_tokens)[0]
                                                for p, r in zip(ps, requests)]
    assert shifts["left"] > 0 and shifts["right"] > 0


def test_banks_too_small_for_the_batch_say_so_and_keep_the_tokens(checkpoints):
    path, new = checkpoints["mixtral"], 5
    ps = prompts()
    model = load(path, slots=5)  # 5 slots, 3 rows x top-2 may need 6
    with pytest.warns(UserWarning, match=r"host-routed path instead of the decode graph: the cache banks of "
                                         r"layers \[.*\] hold 5 slots, fewer than the 6 experts 3 rows"):
        got = {r.index: r.token_ids for r in generate_batch(model, ps, max_new_tokens=new, batch_size=3,
                                                            graph=True)}
    assert [got[i] for i in range(len(ps))] == alone(path, torch.float32, ps, new)
    assert model.moesys_decode_graph.eager_steps == model.moesys_decode_graph.replays == 0
    with pytest.warns(UserWarning, match="decode graph: kv='host' keeps the KV cache on the host"):
        list(generate_batch(load(path), ps[:2], max_new_tokens=2, batch_size=2, graph=True, kv="host"))


def test_graph_needs_the_decode_graph(checkpoints):
    path = checkpoints["olmoe"]
    model = mo.load(path, gpu_memory=budget(path, torch.float32, 10), dtype=torch.float32, cuda_graph=False)
    with pytest.raises(ValueError, match="graph=True replays moesys's decode graph"):
        list(generate_batch(model, prompts(), max_new_tokens=2, batch_size=2, graph=True))
    with pytest.raises(ValueError, match="graph='yes' must be True, False or 'auto'"):
        generate_batch(model, prompts(), graph="yes")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # graph="auto" (the default) never warns
        list(generate_batch(model, prompts()[:2], max_new_tokens=2, batch_size=2))


def test_static_batching_refills_rows_that_sat_free(checkpoints):
    """continuous=False: rows that finished sit free (they still run, attending to the current steps'
    columns) until the whole batch is done; the next batch takes them and must see none of that."""
    path, new = checkpoints["olmoe"], 5
    ps = prompts(lengths=(4, 9, 6, 3, 8), seed=2)
    requests = [Request(p, max_new_tokens=n) for p, n in zip(ps, (2, new, new, 1, 3))]
    model = load(path)
    got = {r.index: r.token_ids for r in generate_batch(model, requests, batch_size=2, graph=True, continuous=False)}
    assert [got[i] for i in range(len(ps))] == [alone(path, torch.float32, [p], r.max_new_tokens)[0]
                                                for p, r in zip(ps, requests)]


class _Layer:
    def __init__(self, keys):
        self.keys = self.values = keys


def test_fixed_shape_kv_bookkeeping(checkpoints):
    """StaticBatchKV on its own: a group lands right-aligned before the write column, rows keep their own
    start columns and lengths, a free row attends to the current step's column (never nothing), and a
    longer joiner shifts every live row right, keys and mask together."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoints["olmoe"])
    kv = batch_static_kv.StaticBatchKV(config, torch.device("cpu"), rows=3, columns=12)
    L, N, D = len(kv.cache.layers), config.num_key_value_heads, config.hidden_size // config.num_attention_heads

    def group(lengths):
        P = max(lengths)
        mask = torch.tensor([[0] * (P - n) + [1] * n for n in lengths])
        keys = torch.arange(len(lengths) * N * P * D, dtype=torch.float32).view(len(lengths), N, P, D) + 1
        cache = type("C", (), {"layers": [_Layer(keys) for _ in range(L)]})()
        return {"attention_mask": mask, "cache": cache}, keys

    g, keys = group([2, 4])
    kv.add(g, [2, 4], [0, 2])
    assert (kv.column, kv.start, kv.lengths) == (4, [2, None, 0], [2, 0, 4])
    assert torch.equal(kv.cache.layers[0].keys[[0, 2], :, 0:4], keys)
    step = kv.step_inputs({0: 7, 2: 9})
    assert step["input_ids"].flatten().tolist() == [7, 0, 9] and step["position_ids"].flatten().tolist() == [2, 0, 4]
    assert step["attention_mask"][:, 0, 0].int().tolist() == [[0, 0, 1, 1, 1] + [0] * 7, [0, 0, 0, 0, 1] + [0] * 7,
                                                              [1, 1, 1, 1, 1] + [0] * 7]
    assert int(kv.column_1) == 4 and kv.column == 5 and kv.lengths == [3, 0, 5]
    kv.remove([2])
    g, keys = group([7])  # longer than the write column (5): live rows move right by 2
    kv.add(g, [7], [2])
    assert (kv.column, kv.start, kv.lengths) == (7, [4, None, 0], [3, 0, 7])
    assert kv.mask_R11C[0, 0, 0].int().tolist() == [0, 0, 0, 0, 1, 1, 1] + [0] * 5
    assert kv.mask_R11C[2, 0, 0].int().tolist() == [1] * 7 + [0] * 5   # none of the row's old columns
    assert kv.mask_R11C[1].sum() == 1                                   # the free row: its one step's column
    assert torch.equal(kv.cache.layers[0].keys[2:, :, 0:7], keys)
    assert kv.cache.get_seq_length() == 12  # allocated: the cache says it holds its columns
    first_key = kv.cache.layers[0].keys[0, :, 4].clone()
    for _ in range(5):  # the write column reaches the end (12)
        kv.step_inputs({0: 1, 2: 1})
    kv.remove([2])
    step = kv.step_inputs({0: 1})  # full: every row moves left by the earliest live start (row 0's, 4), then writes
    assert step["position_ids"].flatten().tolist() == [8, 0, 0]  # free rows at position 0
    assert (kv.start, int(kv.column_1), kv.column, kv.lengths) == ([0, None, None], 8, 9, [9, 0, 0])
    assert torch.equal(kv.cache.layers[0].keys[0, :, 0], first_key)
    assert kv.mask_R11C[0, 0, 0].int().tolist() == [1] * 9 + [0] * 3            # nothing left in the tail
    assert kv.mask_R11C[2, 0, 0].int().tolist() == [0] * 8 + [1] + [0] * 3     # freed: this step's column only
    for P in (12, 13):
        with pytest.raises(ValueError, match=f"a prompt of {P} tokens does not fit the batch's KV cache of 12 "):
            kv.add(group([P])[0], [P], [1])


def test_fixed_shape_kv_moves_left_by_one_and_refuses_a_full_row(checkpoints):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoints["olmoe"])
    kv = batch_static_kv.StaticBatchKV(config, torch.device("cpu"), rows=2, columns=5)
    N, D = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    keys = torch.randn(2, N, 3, D)
    cache = type("C", (), {"layers": [_Layer(keys) for _ in kv.cache.layers]})()
    kv.add({"attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]), "cache": cache}, [2, 3], [0, 1])
    kv.step_inputs({0: 1, 1: 1})
    kv.step_inputs({0: 1, 1: 1})                 # the write column is at the end (5)
    kv.remove([1])
    kv.step_inputs({0: 1})                       # row 0 starts at column 1: one column to drop
    assert (kv.start, int(kv.column_1), kv.column) == ([0, None], 4, 5)
    assert torch.equal(kv.cache.layers[0].keys[0, :, 0:2], keys[0, :, 1:])
    kv.remove([0])
    kv.add({"attention_mask": torch.ones(2, 1, dtype=torch.long), "cache": type("C", (), {"layers": [
        _Layer(torch.randn(2, N, 1, D)) for _ in kv.cache.layers]})()}, [1, 1], [0, 1])
    for _ in range(4):
        kv.step_inputs({0: 1, 1: 1})
    with pytest.raises(RuntimeError, match="the batch's KV cache of 5 columns is full"):
        kv.step_inputs({0: 1, 1: 1})            # a row as long as the cache (generate_batch never lets one be)


@pytest.mark.parametrize("quantize", ["none", pytest.param("int8", marks=pytest.mark.slow)])
def test_graph_batch_counts_like_the_host_path_with_every_expert_resident(checkpoints, quantize):
    """Every expert in the cache (resident_if_fits off, so the engine still runs each layer): nothing
    misses, and the graph's batch steps count each step's distinct experts as hits, as the host-routed steps
    do; the tokens are the same (int8: through the quantized rows kernel, several rows per step)."""
    path, new = checkpoints["olmoe"], 6
    ps = prompts()
    runs = {}
    for graph in (False, True):
        model = mo.load(path, gpu_memory=budget(path, torch.float32, 24, max_context=CONTEXT), dtype=torch.float32,
                        max_context=CONTEXT, resident_if_fits=False, quantize_experts=quantize)
        run = generate_batch(model, ps, max_new_tokens=new, batch_size=3, graph=graph)
        got = {r.index: r.token_ids for r in run}
        runs[graph] = ([got[i] for i in range(len(ps))], model.moesys_offload.snapshot())
        decoder = model.moesys_decode_graph
        assert decoder.eager_steps + decoder.replays == (run.decode_steps if graph else 0)
    (want, host), (tokens, dev) = runs[False], runs[True]
    assert tokens == want and dev.misses == host.misses
    assert dev.hits == host.hits > 0



@pytest.mark.parametrize("quantize", ["none", "int4"])
def test_graph_batch_of_a_model_whose_experts_all_fit(checkpoints, quantize):
    """A budget that holds every expert (resident_if_fits, the default): unquantized, the model runs as if
    fully on the device and its decode graph has no engine; quantized, the engine keeps the packed experts.
    Either way graph=True takes the graph's steps (bench/offload_batch.py --graph-resident times them: the
    graph rows' bound), with the host-routed batch's tokens."""
    path, new = checkpoints["olmoe"], 5
    ps = prompts()
    model = mo.load(path, gpu_memory=1 << 34, dtype=torch.float32, max_context=CONTEXT, compile=False,
                    quantize_experts=quantize)
    assert (model.moesys_decode_graph.engine is None) == (quantize == "none")
    want = {r.index: r.token_ids for r in generate_batch(model, ps, max_new_tokens=new, batch_size=3, graph=False)}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*host-routed path instead")  # no fallback from the graph
        run = generate_batch(model, ps, max_new_tokens=new, batch_size=3, graph=True)
        got = {r.index: r.token_ids for r in run}
    decoder = model.moesys_decode_graph
    assert got == want and decoder.eager_steps + decoder.replays == run.decode_steps > 0

@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("quantize", ["none", "int4"])
def test_graph_batch_replays_a_cuda_graph_on_gpu(checkpoints, quantize, compile):
    """On CUDA the batch's steps are captured once and replayed (the first one or two eagerly), and the
    memory peak stays in the budget. Uncompiled and unquantized, the tokens equal the host-routed batch's
    (both transformers' eager arithmetic); compiled, inductor's kernels for three rows may round near-ties
    otherwise than any reference, and int4 rows take another kernel than the host path's dequantized waves."""
    path, new = checkpoints["olmoe"], 6
    ps = prompts()
    kw = dict(gpu_memory=budget(path, torch.bfloat16, 12, max_context=CONTEXT), dtype=torch.bfloat16,
              max_context=CONTEXT, quantize_experts=quantize)
    ref = mo.load(path, cuda_graph=False, **kw)
    want = {r.index: r.token_ids for r in generate_batch(ref, ps, max_new_tokens=new, batch_size=3)}
    del ref
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = mo.load(path, compile=compile, **kw)
    run = generate_batch(model, ps, max_new_tokens=new, batch_size=3, graph=True)
    got = {r.index: r.token_ids for r in run}
    assert torch.cuda.max_memory_allocated() - base <= kw["gpu_memory"]
    graph = model.moesys_decode_graph
    # warm-up steps (one, two compiled, more while the compiled step recompiles), one capture, then replays
    assert graph.captures == 1 and graph.eager_steps >= (2 if compile else 1)
    assert graph.eager_steps + graph.replays == run.decode_steps
    if quantize == "none" and not compile:
        assert got == want
    assert sorted(got) == list(range(len(ps))) and all(len(t) == new for t in got.values())
    stats = model.moesys_offload.snapshot()
    assert stats.misses > 0
    # a second run (its own cache and capture) stays in the budget too: the first run's captured step, whose
    # output held that run's cache, was released at its end
    torch.cuda.reset_peak_memory_stats()
    again = {r.index: r.token_ids for r in generate_batch(model, ps, max_new_tokens=new, batch_size=3, graph=True)}
    assert torch.cuda.max_memory_allocated() - base <= kw["gpu_memory"]
    assert again == got and graph.captures == 2 and graph.static_output is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("quantize", ["none", "int4"])
def test_graph_batch_prefetch_forks_the_copy_stream_inside_the_capture(checkpoints, quantize):
    """OffloadEngine.graph_prefetch: the captured batch step prefetches the next layer's guessed experts on the
    copy stream (a fork and join inside the capture) and replays with the same tokens as the steps without
    it (which experts sit in which slots never changes an output); its replays count prefetch copies, where
    without it only the eager warm-up step prefetches. Two runs in a row stay in the budget."""
    path, new = checkpoints["olmoe"], 8
    ps = prompts()
    kw = dict(gpu_memory=budget(path, torch.bfloat16, 12, max_context=CONTEXT), dtype=torch.bfloat16,
              max_context=CONTEXT, quantize_experts=quantize, compile=False)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = mo.load(path, **kw)
    engine, got, prefetched = model.moesys_offload, {}, {}
    for on in (False, True, True):
        engine.graph_prefetch = on
        engine.reset_stats()
        run = generate_batch(model, ps, max_new_tokens=new, batch_size=3, graph=True)
        got.setdefault(on, []).append({r.index: r.token_ids for r in run})
        prefetched.setdefault(on, []).append(engine.snapshot().prefetch_copies)
        assert model.moesys_decode_graph.replays > 0 and torch.cuda.max_memory_allocated() - base <= kw["gpu_memory"]
    assert got[True] == [got[False][0]] * 2
    assert prefetched[True][0] > prefetched[False][0], prefetched


@pytest.mark.slow
def test_compiled_batch_graph_steps_prefetch_from_the_layer_input(checkpoints):
    """compile=True, unquantized experts: the compiled step's opaque cache op (moesys::offload_slots) is given
    the layer's input, so a batch step prefetches the next layer's guess as the uncompiled step does (a CPU
    captures nothing: each step runs the compiled code), with the uncompiled graph run's tokens."""
    torch._dynamo.reset()
    path, ps = checkpoints["olmoe"], prompts()[:3]
    kw = dict(gpu_memory=budget(path, torch.float32, 12, max_context=CONTEXT), dtype=torch.float32,
              max_context=CONTEXT)
    plain = mo.load(path, compile=False, **kw)
    want = {r.index: r.token_ids for r in generate_batch(plain, ps, max_new_tokens=4, batch_size=3, graph=True)}
    model = mo.load(path, compile=True, **kw)
    engine, calls = model.moesys_offload, []
    slots_fn = engine.device_slots

    def slots_call(layer, ids_TK, *args, x_TH=None, **kwargs):
        calls.append((ids_TK.shape[0], x_TH is not None))
        return slots_fn(layer, ids_TK, *args, x_TH=x_TH, **kwargs)

    engine.device_slots = slots_call
    engine.reset_stats()
    got = {r.index: r.token_ids for r in generate_batch(model, ps, max_new_tokens=4, batch_size=3, graph=True)}
    assert got == want
    batch_steps = [given for rows, given in calls if rows > 1]
    assert batch_steps and all(batch_steps), calls
    assert engine.snapshot().prefetch_copies > 0


def test_sliding_window_batch_takes_the_host_routed_steps(tmp_path, monkeypatch):
    """A sliding-window model's padded batch decodes host-routed (PaddedBatchKV keeps its window), with each
    sequence's tokens as alone; graph=True says once that the fixed-shape cache holds full attention only
    and takes those steps. Host KV (full attention only) and a cache layer kind no padded batch keeps are
    refused with the way out."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from moesys.offload import batch_kv
    from tests.test_offload import COMMON

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2,
                                                   sliding_window=4)).save_pretrained(tmp_path)
    model = load(tmp_path)
    ps = prompts()
    want = alone(tmp_path, torch.float32, ps, 6)
    for graph in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = {r.index: r.token_ids for r in generate_batch(model, ps, max_new_tokens=6, batch_size=3, eos=[],
                                                                graph=graph)}
        assert [got[i] for i in range(len(ps))] == want
        said = [str(w.message) for w in caught if "decode graph" in str(w.message)]
        assert said == ([] if not graph else [
            "batch decode takes the host-routed path instead of the decode graph: the fixed-shape batch cache "
            "holds full-attention layers only, and this model's has ['DynamicSlidingWindowLayer']"])
    assert model.moesys_decode_graph.replays == 0
    with pytest.raises(ValueError, match=r"kv='host' keeps full-attention .* \['DynamicSlidingWindowLayer'\] layers: "
                                         r"use kv='device'"):
        list(generate_batch(model, ps[:2], max_new_tokens=2, batch_size=2, kv="host"))
    monkeypatch.delitem(batch_kv._KINDS, batch_kv.DynamicSlidingWindowLayer)
    with pytest.raises(ValueError, match=r"batched decoding pads .* \['DynamicSlidingWindowLayer'\] do not support "
                                         r".* batch_size=1"):
        list(generate_batch(model, ps[:2], max_new_tokens=2, batch_size=2))
    with pytest.raises(ValueError, match=r"fixed-shape KV cache needs full-attention .*DynamicSlidingWindowLayer.* "
                                         r"graph=False"):
        batch_static_kv.StaticBatchKV(model.config, torch.device("cpu"), 2, 16)


def test_auto_takes_the_graph_for_quantized_experts_on_cuda_where_the_banks_hold_the_batch(checkpoints, monkeypatch):
    """graph="auto" (the default): the decode graph for int8/int4 experts on CUDA, at up to 128 rows, with a
    full-attention KV cache on the device and banks that hold the batch's experts; the eager steps for bf16/fp32 experts, on the CPU,
    with kv="host", without the decode graph, or when the banks are too small. The engine's device is faked
    as CUDA for the decision only; a run with the rule forced on takes the graph's steps."""
    from moesys.offload.batch import BatchGeneration, Request

    path = checkpoints["olmoe"]
    reqs = [Request(token_ids=p) for p in prompts()[:3]]

    def pays(model, batch_size=3, kv="device", cuda=True, requests=reqs):
        monkeypatch.setattr(model.moesys_offload, "cuda", cuda)
        return BatchGeneration(model, requests, 2, batch_size, set(), True, kv=kv, graph="auto")._graph_pays()

    int8 = mo.load(path, gpu_memory=budget(path, torch.float32, 10, max_context=CONTEXT), dtype=torch.float32,
                   max_context=CONTEXT, compile=False, quantize_experts="int8")
    assert pays(int8)
    # up to GRAPH_AUTO_MAX_ROWS rows (128, where it was measured to pay); 129 rows keep the eager steps, though
    # the banks hold them (graph=True would take the graph)
    monkeypatch.setattr(int8.moesys_offload, "max_context", 129 * 5 + 3)  # 129 rows of 3 + 2 tokens, one joining
    many = [Request(token_ids=p) for p in prompts(lengths=[3] * 129)]
    assert pays(int8, batch_size=128, requests=many) and not pays(int8, batch_size=129, requests=many)
    assert pays(int8, batch_size=256, requests=many[:128])  # the rows that run: min(batch_size, requests)
    monkeypatch.setattr(int8.moesys_offload, "max_context", CONTEXT)
    assert not pays(int8, cuda=False) and not pays(int8, kv="host")
    monkeypatch.setattr(int8.moesys_offload, "_smallest_bank", 0)
    monkeypatch.setattr(int8.moesys_offload.cache, "capacity", lambda layer: 0)
    assert not pays(int8)
    monkeypatch.undo()
    assert not pays(load(path))  # fp32 experts keep the eager steps
    no_graph = mo.load(path, gpu_memory=budget(path, torch.float32, 10), dtype=torch.float32, cuda_graph=False,
                       quantize_experts="int8")
    assert not pays(no_graph)

    monkeypatch.setattr(BatchGeneration, "_graph_pays", lambda self: True)
    run = generate_batch(int8, prompts()[:3], max_new_tokens=3, batch_size=3)
    list(run)
    assert int8.moesys_decode_graph.eager_steps + int8.moesys_decode_graph.replays == run.decode_steps > 0


def test_graph_kv_cache_holds_what_the_run_needs_not_the_whole_plan(checkpoints, monkeypatch):
    """The fixed-shape KV cache gets 2x the run's longest sequence per row, rounded up to a power of two, capped
    at max_context / rows: not the memory plan's whole KV reserve (which, allocated whole, took a 16 GiB
    budget 0.58 GiB over on an H100); the tokens are the same as with the whole plan's columns."""
    from moesys.offload.batch import BatchGeneration

    path = checkpoints["olmoe"]
    ps = prompts()  # up to 12 tokens, + 5 new: 17 -> 64 columns of CONTEXT / 3 = 85
    made = []
    real = batch_static_kv.StaticBatchKV.__init__

    def spy(self, config, device, rows, columns, **kw):
        made.append((rows, columns))
        real(self, config, device, rows, columns, **kw)

    monkeypatch.setattr(batch_static_kv.StaticBatchKV, "__init__", spy)
    model = load(path)
    run = {r.index: r.token_ids for r in generate_batch(model, ps, max_new_tokens=5, batch_size=3, graph=True)}
    assert made == [(3, 64)]
    monkeypatch.setattr(BatchGeneration, "_graph_columns", lambda self, R: CONTEXT // R)
    whole = {r.index: r.token_ids for r in generate_batch(model, ps, max_new_tokens=5, batch_size=3, graph=True)}
    assert made[-1] == (3, CONTEXT // 3) and whole == run
    monkeypatch.undo()
    gen = BatchGeneration(model, [Request(token_ids=[1] * 40)], 50, 2, set(), True, graph=True)
    # 2 x 90 rounds to 256, over what the plan gives a row beside a joining prompt: (256 - 40) / 2
    assert gen._graph_columns(2) == (CONTEXT - 40) // 2


def test_graph_kv_cache_leaves_room_for_a_joining_prompt(checkpoints, monkeypatch):
    """A joining group's prefill cache lives beside the fixed-shape one until it is copied in: the columns
    leave room for the longest prompt, as many rows join at once as the reserve holds beside the R rows, and
    where R rows of the longest sequence and one prompt do not fit max_context the run says so and decodes
    host-routed (same tokens). The run's captured step is released at its end (its output holds the cache)."""
    path = checkpoints["olmoe"]
    ps = prompts()  # 5 prompts of up to 12 tokens, + 5 new: 17 -> 64 columns
    # the host-routed batch's tokens (each sequence's alone: test_offload_batch)
    want = {r.index: r.token_ids for r in generate_batch(load(path), ps, max_new_tokens=5, batch_size=3, eos=[])}
    joins = []
    real = batch_static_kv.StaticBatchKV.add

    def spy(self, group, lengths, rows):
        joins.append((self.rows, self.columns, len(rows), group["attention_mask"].shape[1]))
        real(self, group, lengths, rows)

    monkeypatch.setattr(batch_static_kv.StaticBatchKV, "add", spy)
    for max_context, most in ((3 * 64 + 12, 1), (3 * 64 + 24, 2), (CONTEXT, 3)):
        joins.clear()
        model = load(path, max_context=max_context)
        got = {r.index: r.token_ids for r in generate_batch(model, ps, max_new_tokens=5, batch_size=3, eos=[],
                                                            graph=True)}
        assert got == want
        assert max(g for _, _, g, _ in joins) == most
        # the fixed-shape rows and the joining group's prefill within the reserve's max_context tokens
        assert all(R * C + g * P <= max_context for R, C, g, P in joins), joins
        graph = model.moesys_decode_graph
        assert graph.key is None and graph.static_output is None and not graph.static_inputs
    # 3 rows of 17 tokens and a 12-token prompt need 63 tokens; 62 cannot hold them beside it
    model = load(path, max_context=62)
    with pytest.warns(UserWarning, match=r"3 rows x 17 tokens.*12 tokens, needs max_context>=63 \(loaded "
                                         r"with max_context=62\)"):
        got = {r.index: r.token_ids for r in generate_batch(model, ps, max_new_tokens=5, batch_size=3, eos=[],
                                                            graph=True)}
    assert got == want and model.moesys_decode_graph.eager_steps == 0
    for graph in (True, False, "auto"):  # no prompts: no results, on every path
        run = generate_batch(model, [], graph=graph)
        assert list(run) == [] and run.decode_steps == run.prefills == 0

"""moesys.offload.generate_batch against each prompt generated alone by transformers (greedy, batch 1), on
tiny random OLMoE / Qwen3-MoE / Mixtral checkpoints offloaded under a budget that evicts; continuous
batching's order and step count against hand-computed schedules; one copy per expert per step."""

import time

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moesys.offload as mo
from moesys.offload.adapters import adapter_for, find_moe_blocks
from moesys.offload.batch import Request, generate_batch
from moesys.offload.batch_kv import PaddedBatchKV
from moesys.offload.loader import build_skeleton
from tests.test_offload import checkpoints  # noqa: F401  (the fixture: tiny random checkpoints per architecture)

ARCHS = ("olmoe", "qwen3_moe", "mixtral")

PROMPT_LENGTHS = (5, 9, 3, 12, 7)


def budget(path, dtype, slots, max_context=4096):
    config = AutoConfig.from_pretrained(path)
    skel = build_skeleton(config, dtype)
    p = mo.plan_memory(skel, find_moe_blocks(skel, adapter_for(config)), dtype, 1 << 40, max_context=max_context)
    return p.resident_bytes + p.reserve_bytes + slots * p.slot_bytes


def prompts(lengths=PROMPT_LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 101, (n,), generator=g).tolist() for n in lengths]


def alone(path, dtype, prompt_list, new_tokens):
    """Each prompt generated alone (batch 1) by transformers' model of the same files."""
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    out = []
    for p in prompt_list:
        ids = ref.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False)
        out.append(ids[0, len(p):].tolist())
    return out


def truncate_at(tokens, eos):
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
@pytest.mark.parametrize("arch", ARCHS)
def test_batch_equals_each_sequence_alone(checkpoints, arch, dtype):
    path, new = checkpoints[arch], 8
    ps = prompts()
    want = alone(path, dtype, ps, new)
    # an EOS that one sequence meets mid-way (a token it generates at position 3), so it stops early
    eos = want[1][3]
    want = [truncate_at(w, eos) for w in want]
    model = mo.load(path, gpu_memory=budget(path, dtype, 10), dtype=dtype, cuda_graph=False)  # 10 of 24
    run = generate_batch(model, ps, max_new_tokens=new, batch_size=3, eos=eos)
    got = {r.index: r for r in run}
    assert [got[i].token_ids for i in range(len(ps))] == want
    assert [got[i].finish_reason for i in range(len(ps))] == ["eos" if w[-1] == eos and eos in w else "length"
                                                             for w in want]
    stats = model.moesys_offload.snapshot()
    assert stats.evictions > 0 and stats.misses > 0
    assert run.generated_tokens == sum(map(len, want))


@pytest.mark.slow
def test_batch_of_six_prefetches_and_keeps_the_tokens(checkpoints):
    """Six rows decode together with next-gate prefetch on: the batch's guesses are copied (most wanted
    first, within the prefetch budget) and every sequence still equals itself generated alone."""
    path, new = checkpoints["qwen3_moe"], 6
    ps = prompts(lengths=(5, 9, 6, 12, 7, 8), seed=3)  # prefills and decode all over 4 rows
    model = mo.load(path, gpu_memory=budget(path, torch.float32, 18), dtype=torch.float32, cuda_graph=False)
    run = generate_batch(model, ps, max_new_tokens=new, batch_size=6)
    got = {r.index: r.token_ids for r in run}
    assert [got[i] for i in range(len(ps))] == alone(path, torch.float32, ps, new)
    stats = model.moesys_offload.snapshot()
    assert stats.prefetch_guessed > 0 and stats.prefetch_copies > 0 and stats.evictions > 0
    assert 0 < stats.prefetch_used <= stats.prefetch_guessed


@pytest.mark.slow
def test_continuous_batching_order_and_steps(checkpoints):
    """Lengths 2, 7, 3, 3, 2 at batch 2, no EOS. Continuous: rows {0,1}; 0 ends after step 1 (its first token
    comes from prefill), 2 joins and ends at step 3, 3 joins and ends at step 5, 4 joins and ends at step 6,
    1 ends at step 6 too (row order: 1 before 4): 6 steps. Static: {0,1} takes 6 steps, {2,3} 2, {4} 1: 9."""
    path = checkpoints["olmoe"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    news = [2, 7, 3, 3, 2]
    ps = prompts()
    reqs = [Request(p, n, id=f"r{i}") for i, (p, n) in enumerate(zip(ps, news))]
    want = [w[:n] for w, n in zip(alone(path, torch.float32, ps, max(news)), news)]

    run = generate_batch(model, reqs, batch_size=2, eos=[])
    t0 = time.perf_counter()
    results = list(run)
    wall = time.perf_counter() - t0
    assert [r.id for r in results] == ["r0", "r2", "r3", "r1", "r4"]
    # the throughput line's clock: the time spent in prefills and steps, within the run's wall time
    assert 0 < run.elapsed_s <= wall and run.tokens_per_s == pytest.approx(sum(news) / run.elapsed_s)
    assert all(r.token_ids == want[r.index] and r.prompt_ids == ps[r.index] for r in results)
    assert (run.decode_steps, run.prefills) == (6, 5)

    static = generate_batch(model, reqs, batch_size=2, eos=[], continuous=False)
    assert sorted((r.index, r.token_ids) for r in static) == sorted((r.index, r.token_ids) for r in results)
    assert static.decode_steps == 9 > run.decode_steps


def test_sequence_ending_at_prefill_frees_its_place(checkpoints):
    path = checkpoints["qwen3_moe"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ps = prompts((4, 6, 5))
    first = alone(path, torch.float32, ps, 1)
    run = generate_batch(model, [Request(ps[0], 1), Request(ps[1], 3), Request(ps[2], 3)], batch_size=2, eos=[])
    results = list(run)
    assert results[0].index == 0 and results[0].token_ids == first[0]
    assert run.decode_steps == 2  # rows 1 and 2 decode together from the first step


def test_joining_prompts_prefill_together(checkpoints):
    """Three prompts of 5, 9 and 3 tokens join an empty batch of 3 in one left-padded prefill forward (so
    the engine copies each expert they need once for the three), then decode together; a fourth and fifth
    join one forward each as places free up. Tokens equal each prompt alone (the first test)."""
    path = checkpoints["olmoe"]
    model = mo.load(path, gpu_memory=budget(path, torch.float32, 10), dtype=torch.float32, cuda_graph=False)
    shapes, masks = [], []

    def record(module, args, kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        masks.append(kwargs["attention_mask"][:, -kwargs["input_ids"].shape[1]:].tolist())

    model.register_forward_pre_hook(record, with_kwargs=True)
    ps = prompts()
    news = [2, 4, 6, 3, 3]
    run = generate_batch(model, [Request(p, n) for p, n in zip(ps, news)], batch_size=3, eos=[])
    got = {r.index: r.token_ids for r in run}
    want = alone(path, torch.float32, ps, max(news))
    assert [got[i] for i in range(5)] == [w[:n] for w, n in zip(want, news)]
    assert shapes[0] == (3, 9)  # one forward for the first three prompts, left-padded to the longest
    assert masks[0] == [[0] * 4 + [1] * 5, [1] * 9, [0] * 6 + [1] * 3]
    prefills = [s for s in shapes if s[1] > 1]
    assert prefills == [(3, 9), (1, 12), (1, 7)] and run.prefills == 5


@pytest.mark.slow
def test_prefill_groups_stay_within_the_activation_reserve(checkpoints, monkeypatch):
    """With room for 18 padded prompt tokens per prefill forward, prompts of 5, 9, 3, 12 and 7 tokens joining
    a batch of 5 prefill as [5, 9] (2 x 9 = 18: exactly full), [3] (3 and 12 would pad to 24), [12] and [7];
    tokens as each prompt alone. The loader sizes the activation reserve with the same constant."""
    from moesys.offload import batch, loader

    assert batch.PREFILL_RESERVE_TOKENS is loader.PREFILL_RESERVE_TOKENS
    monkeypatch.setattr(batch, "PREFILL_RESERVE_TOKENS", 18)
    path = checkpoints["olmoe"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    shapes = []
    model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    ps = prompts()
    got = {r.index: r.token_ids for r in generate_batch(model, ps, max_new_tokens=3, batch_size=5, eos=[])}
    assert [got[i] for i in range(5)] == alone(path, torch.float32, ps, 3)
    assert [s for s in shapes if s[1] > 1] == [(2, 9), (1, 3), (1, 12), (1, 7)]


def test_cache_keyword_follows_the_transformers_version(checkpoints):
    """transformers renamed the forward's past_key_values to cache; older versions swallow an unknown
    cache= in **kwargs and build their own, so the batch's KV cache would stay empty."""
    from moesys.offload.batch_kv import cache_kwarg


    class Old(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, past_key_values=None, **kwargs):
            return None

    assert cache_kwarg(Old()) == "past_key_values"
    # the installed transformers fills the cache it is given under that name
    model = AutoModelForCausalLM.from_pretrained(checkpoints["olmoe"], dtype=torch.float32)
    kv = PaddedBatchKV(model.config, torch.device("cpu"), cache_name=cache_kwarg(model))
    group = kv.prefill_inputs([[3, 4, 5], [6, 7]])
    model(**group, use_cache=True)
    assert group[kv.cache_name].get_seq_length() == 3


def test_batch_forwards_keep_cudnn_attention_off(checkpoints):
    """cuDNN's sdpa rebuilds its graph whenever the key length changes (every decode step); the batch's
    forwards run with it disabled, and the setting is restored afterwards."""
    model = AutoModelForCausalLM.from_pretrained(checkpoints["olmoe"], dtype=torch.float32)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    before = torch.backends.cuda.cudnn_sdp_enabled()
    list(generate_batch(model, prompts((3, 5)), max_new_tokens=3, batch_size=2, eos=[]))
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_batch_over_the_planned_kv_cache_is_refused(checkpoints):
    path = checkpoints["olmoe"]
    model = mo.load(path, gpu_memory=budget(path, torch.float32, 10, max_context=40), dtype=torch.float32,
                    max_context=40, cuda_graph=False)
    ps = prompts((12, 12, 12))
    with pytest.raises(ValueError, match=r"batch_size<=2 .*max_context>=60"):
        generate_batch(model, ps, max_new_tokens=8, batch_size=3)
    assert len(list(generate_batch(model, ps, max_new_tokens=8, batch_size=2))) == 3


@pytest.mark.parametrize("bad, msg", [(dict(batch_size=0), "batch_size=0"), (dict(max_new_tokens=0), "max_new"),
                                      (dict(prompts=[[1, 200]]), "outside the vocabulary"),
                                      (dict(prompts=[[]]), "non-empty"), (dict(prompts=["abc"]), "list of token")])
def test_bad_arguments_name_the_value(checkpoints, bad, msg):
    model = AutoModelForCausalLM.from_pretrained(checkpoints["olmoe"], dtype=torch.float32)
    kw = dict(prompts=[[3, 4]], max_new_tokens=2, batch_size=2) | bad
    with pytest.raises((ValueError, TypeError), match=msg):
        generate_batch(model, kw.pop("prompts"), **kw)


def test_each_needed_expert_is_copied_once_per_step(checkpoints):
    """4 rows whose top-2 overlap ({0,1,2} in all): 3 copies for the batch, not 8; the same step again hits."""
    path = checkpoints["olmoe"]
    model = mo.load(path, gpu_memory=budget(path, torch.float32, 10), dtype=torch.float32, prefetch="none",
                    cuda_graph=False)
    engine = model.moesys_offload
    layer = next(iter(engine.inner))
    ids_TK = torch.tensor([[0, 1], [1, 2], [0, 2], [1, 0]])
    x_TH, w_TK = torch.randn(4, 32), torch.full((4, 2), 0.5)
    out = engine.experts_forward(layer, x_TH, ids_TK, w_TK)
    s = engine.snapshot()
    assert (s.copies, s.misses, s.hits, s.bytes_copied) == (3, 3, 0, 3 * engine.store.expert_bytes)
    again = engine.experts_forward(layer, x_TH, ids_TK, w_TK)
    s = engine.snapshot()
    assert (s.copies, s.hits) == (3, 3)
    torch.testing.assert_close(again, out, rtol=0, atol=0)


@pytest.mark.slow
def test_host_kv_cache_with_cpu_attention_gives_the_same_tokens(checkpoints, monkeypatch):
    """kv="host": every layer's keys/values in HostKVLayer (host memory), attention through host_sdpa,
    tokens equal to the device KV path's; a batch over the planned KV budget is allowed (it is not on the
    device), and the model's attention implementation is restored after."""
    from moesys.offload import batch_kv, host_kv

    path = checkpoints["qwen3_moe"]
    model = mo.load(path, gpu_memory=budget(path, torch.float32, 10, max_context=30), dtype=torch.float32,
                    max_context=30, cuda_graph=False)
    ps = prompts()
    caches = []
    new_row_cache = batch_kv.PaddedBatchKV.new_row_cache
    monkeypatch.setattr(batch_kv.PaddedBatchKV, "new_row_cache",
                        lambda self: caches.append(new_row_cache(self)) or caches[-1])
    want = [(r.index, r.token_ids) for r in generate_batch(model, ps, max_new_tokens=6, batch_size=1, eos=[])]
    assert caches and not any(isinstance(layer, host_kv.HostKVLayer) for c in caches for layer in c.layers)
    calls, caches[:] = [], []
    monkeypatch.setattr(host_kv, "sdpa_attention_forward",
                        lambda *a, **k: calls.append(a[2].device) or host_kv_sdpa(*a, **k))
    before = model.config._attn_implementation
    got = [(r.index, r.token_ids) for r in generate_batch(model, ps, max_new_tokens=6, batch_size=4, eos=[],
                                                          kv="host")]
    assert sorted(got) == sorted(want)
    assert calls and all(d.type == "cpu" for d in calls)
    assert all(isinstance(layer, host_kv.HostKVLayer) for c in caches for layer in c.layers)
    assert model.config._attn_implementation == before
    with pytest.raises(ValueError, match="batch_size<=1"):  # the device path keeps the budget check
        generate_batch(model, ps, max_new_tokens=6, batch_size=4)
    with pytest.raises(ValueError, match="kv='disk' is unknown"):
        generate_batch(model, ps, kv="disk")


def host_kv_sdpa(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


@pytest.mark.slow
def test_batch_of_one_takes_the_decode_graph_and_keeps_the_tokens(checkpoints):
    """batch_size=1 on a model with the decode graph (load's cuda_graph=True) runs each prompt through
    generate(), whose one-token steps with a static cache take the graph (on the CPU: its sync-free device
    path, run eagerly); the tokens equal transformers' alone, EOS included and stopping there. eos=[] means
    no EOS at all, even when the generation config names one the sequence meets."""
    path, new = checkpoints["olmoe"], 8
    ps = prompts()[:3]
    want = alone(path, torch.float32, ps, new)
    eos = want[1][3]
    model = mo.load(path, gpu_memory=budget(path, torch.float32, 10), dtype=torch.float32, cuda_graph=True)
    model.generation_config.cache_implementation = "static"  # load() sets it on CUDA only
    decoder = model.moesys_decode_graph
    run = generate_batch(model, ps, max_new_tokens=new, batch_size=1, eos=eos)
    got = {r.index: r for r in run}
    cut = [truncate_at(w, eos) for w in want]
    assert [got[i].token_ids for i in range(3)] == cut
    assert [got[i].finish_reason for i in range(3)] == ["eos" if eos in w else "length" for w in cut]
    assert decoder.eager_steps + decoder.replays == run.decode_steps > 0  # every decode step: the graph's path
    assert run.prefills == 3 and run.generated_tokens == sum(map(len, cut))
    model.generation_config.eos_token_id = want[0][2]
    run = generate_batch(model, ps[:1], max_new_tokens=new, batch_size=1, eos=[])
    assert [r.token_ids for r in run] == [want[0]]


def test_next_visit_eviction_hits_where_lru_hits_nothing(checkpoints):
    """Eight rows under uniform routing need nearly all 8 experts of each of the 3 layers every step; 12 slots
    hold a layer and a half. LRU evicts the next layer's experts to make room for this one's, so no lookup
    (prefill's or decode's) hits; next-visit (cache_policy "auto") evicts from the layers visited furthest ahead and keeps
    the rest, as the performance model's replay of the engine's cache predicts."""
    from moesys.offload.perf_model import RoutingStats
    from moesys.offload.routing import RoutingOverride

    path = checkpoints["olmoe"]
    rates = {}
    for policy in ("lru", "auto"):
        model = mo.load(path, gpu_memory=budget(path, torch.float32, 12), dtype=torch.float32, cuda_graph=False,
                        cache_policy=policy, prefetch="none")
        engine = model.moesys_offload
        assert engine.cache.num_slots == 12 and engine.cache.policy == ("lru" if policy == "lru" else "next-visit")
        RoutingOverride(model, "uniform", seed=0)
        list(generate_batch(model, prompts(lengths=(4,) * 8), max_new_tokens=12, batch_size=8, eos=[]))
        rates[policy] = engine.snapshot().hit_rate  # prefill's and decode's lookups (no prefetch)
    assert rates["lru"] == 0.0
    predicted = RoutingStats.uniform(8, 2).hit_rate(12, 3, 8)
    assert rates["auto"] > 0.1 and rates["auto"] == pytest.approx(predicted, abs=0.1)

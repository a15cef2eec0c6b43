"""moesys.offload.perf_model against hand-computed cases (unique experts, LRU hit curve, step time, KV
placement) and a brute-force LRU simulation; measured routing statistics of a real run feed it."""

import json
import random
from dataclasses import replace

import pytest
import torch

import moesys.offload as mo
from moesys.offload.batch import generate_batch
from moesys.offload.cache_bytes import CacheBytes
from moesys.offload.perf_model import (Hardware, RoutingStats, Workload, auto_batch_size, best_plan, calibrate,
                                       calibrate_layers, calibrate_waves, dequant_waves, engine_cache_hits,
                                       lru_hit_curve, predict, workload_of)
from moesys.offload.routing import RoutingRecorder
from tests.test_offload import checkpoints  # noqa: F401  (the fixture: tiny random checkpoints per architecture)
from tests.test_offload_batch import budget, prompts

HW = Hardware(pcie_Bps=1e9, hbm_Bps=1e10, flops=1e12, cpu_mem_Bps=1e9, step_overhead_s=0.0, host_roundtrip_s=0.0)
W = Workload(num_layers=2, num_experts=8, top_k=2, expert_bytes=10**6, expert_flops_per_row=10**6,
             dense_bytes=10**7, cache=CacheBytes(full_per_token=1000, attention_layers=2), free_bytes=16 * 10**6)


def test_unique_experts_per_layer():
    uni = RoutingStats.uniform(8, 2)
    assert uni.unique(1) == pytest.approx(2.0) and uni.unique(2) == pytest.approx(8 * (1 - 0.75 ** 2))
    # 4 tokens, 1 layer, top-2; B=2 takes rows {0,2} ({0,1}: 2 unique) and {1,3} ({0,1,2,3}: 4)
    ids_NLK = torch.tensor([[0, 1], [2, 3], [0, 1], [0, 1]]).view(4, 1, 2)
    measured = RoutingStats.from_trace(ids_NLK, 8)
    assert measured.unique(2) == pytest.approx(3.0) and measured.unique(1) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="fewer than batch=5"):
        measured.unique(5)


def test_lru_hit_curve_by_hand_and_by_simulation():
    # lookups 0 1 0 2 1 (E=3): 3 cold, 0 at stack distance 1, 1 at distance 2
    curve = lru_hit_curve(torch.tensor([0, 1, 0, 2, 1]).view(5, 1, 1), 3)
    torch.testing.assert_close(curve, torch.tensor([0, 0, 0.2, 0.4], dtype=torch.float64))
    rng = random.Random(0)
    ids_NLK = torch.tensor([[rng.sample(range(6), 2) for _ in range(2)] for _ in range(40)])
    for batch in (1, 3):
        curve = lru_hit_curve(ids_NLK, 6, batch)
        for S in range(7):
            hits = lookups = 0
            for layer in range(2):
                cache = []  # most recent last
                for start in range(0, 40, batch):
                    step = sorted(set(ids_NLK[start:start + batch, layer].flatten().tolist()))
                    hits += sum(e in cache for e in step)
                    lookups += len(step)
                    for e in step:
                        if e in cache:
                            cache.remove(e)
                        cache.append(e)
                    del cache[:max(0, len(cache) - S)]
            assert curve[S].item() == pytest.approx(hits / lookups), (batch, S)


def test_engine_cache_replay_by_hand():
    """The replay counts the second half's lookups. One layer, lookups 0 1 0 2 1, 2 slots, LRU: steps 2-4 are
    counted; 0 hits, 2 misses (evicting 1), 1 misses (evicting 0): 1/3."""
    ids_SLR = torch.tensor([0, 1, 0, 2, 1]).view(5, 1, 1)
    assert engine_cache_hits(ids_SLR, 3, 2, "lru") == pytest.approx(1 / 3)
    # a step needing every expert of both layers (a large batch): with fewer slots than the 8 experts LRU has
    # evicted each layer's by the time the next step reaches it, so nothing hits; 8 slots hold them all
    every = torch.arange(4).repeat(6, 4, 1)  # 6 steps, 4 layers, each needing experts 0-3
    assert engine_cache_hits(every, 4, 12, "lru") == 0.0
    assert engine_cache_hits(every, 4, 16, "lru") == 1.0
    # a layer's own experts are protected, so with room for all but one expert each layer evicts one of the
    # layer after it: 3 of 4 hit
    assert engine_cache_hits(every, 4, 15, "lru") == 0.75
    # banks of 4 (bank_size 4): layers 0 and 3 share bank 0 and evict each other, 1 and 2 stay
    assert engine_cache_hits(every, 4, 12, "lru", bank_size=4) == 0.5
    # banks of 3 for 4 needed experts: waves [0, 1, 2] and [3]; the second evicts 0, the first 3: 2 of 4 hit
    assert engine_cache_hits(every, 4, 12, "lru", bank_size=3) == 0.5
    # fewer slots than layers: the engine does not run
    assert engine_cache_hits(every, 4, 3, "lru") == 0.0
    # next-visit on the same cyclic scan of 4 layers through room for k of them hits (k - 1) / (4 - 1), the
    # most any policy can (Belady's: each step streams one layer through the slots of the one just used)
    assert engine_cache_hits(every, 4, 8, "next-visit") == pytest.approx(1 / 3)
    assert engine_cache_hits(every, 4, 12, "next-visit") == pytest.approx(2 / 3)


def test_uniform_hit_rate_of_a_large_batch_is_zero_under_lru():
    """The OLMoE shape at int4 under 4 GiB (291 slots, 16 layers of 64 experts, top-8): one row a step hits
    about the share of experts the cache holds (18 of 64 per layer); from 8 rows on a step needs 42+ experts
    per layer, 672+ in all, and LRU keeps none of them until the next step (the engine measured 0 at 32 and
    128 rows: bench/results/offload_batch_int4_h100_b0df6cc.json). Next-visit (the default) keeps about
    (291 - the two layers in flight) / all a step needs."""
    uni = RoutingStats.uniform(64, 8)
    assert 0.15 < uni.hit_rate(291, 16, 1, "lru") < 0.3
    assert uni.hit_rate(291, 16, 8, "lru") == uni.hit_rate(291, 16, 128, "lru") == 0.0
    assert 0.2 < uni.hit_rate(291, 16, 128) < 0.3 and uni.hit_rate(291, 16, 128, "next-visit") == uni.hit_rate(
        291, 16, 128)
    assert uni.hit_rate(1024, 16, 128, "lru") == uni.hit_rate(1024, 16, 128) == 1.0  # every expert fits
    with pytest.raises(ValueError, match="3 layers, the model 16"):
        RoutingStats.from_trace(torch.zeros(8, 3, 2, dtype=torch.long), 64).hit_rate(291, 16, 2)


def half_hit(slots=8):
    """Uniform routing whose hit rate at `slots` is pinned to 1/2 (the engine-measured override), so that
    the step arithmetic below is checked by hand apart from the cache replay."""
    return RoutingStats.uniform(8, 2).with_engine_hit_rate(slots, 0.5)


def test_step_time_by_hand():
    # B=2, 8 slots (hit 1/2), context 100: U = 3.5, misses 2 x 3.5 x 0.5 = 3.5
    p = predict(W, HW, half_hit(), 2, 100, slots=8)
    assert p["misses_per_step"] == pytest.approx(3.5) and p["hit_rate"] == pytest.approx(0.5)
    assert p["copy_s"] == pytest.approx(3.5e-3)
    # dense 1e7 B / 1e10 = 1e-3; experts 2 x 3.5e6 / 1e10 = 7e-4; attention 2 x 100 x 1000 / 1e10 = 2e-5
    assert p["compute_s"] == pytest.approx(1.72e-3)
    assert p["tokens_per_s"] == pytest.approx(2 / 5.22e-3)
    assert p["bound_tokens_per_s"] == pytest.approx(2 / 3.5e-3)
    assert predict(W, HW, half_hit(), 2, 100, slots=8, overlap=True)["step_s"] == pytest.approx(3.5e-3)
    # the prefetch's share of the copies runs under the compute: max(p x 3.5e-3, 1.72e-3) + (1 - p) x 3.5e-3
    for p_, want in ((0.2, 1.72e-3 + 2.8e-3), (0.5, 1.75e-3 + 1.75e-3), (1.0, 3.5e-3)):
        step = predict(W, HW, half_hit().with_prefetched_share(p_), 2, 100, slots=8)["step_s"]
        assert step == pytest.approx(want), p_
    with pytest.raises(ValueError, match="a fraction, got 1.5"):
        half_hit().with_prefetched_share(1.5)
    assert p["bytes_copied_per_token"] == pytest.approx(3.5e6 / 2)
    # compute-bound rows: B=512, every expert resident (the replay hits all 16): experts 2 x max(8e6/1e10,
    # 512*2*1e6/1e12) = 2.048e-3
    q = predict(W, HW, RoutingStats.uniform(8, 2), 512, 0, slots=16)
    assert q["copy_s"] == 0 and q["compute_s"] == pytest.approx(max(1e-3, 512e7 / 1e12) + 2.048e-3)


def test_kv_placement_is_the_faster_prediction():
    """B=4 x 1000 tokens of KV (4 MB) on the device leave 12 of 16 slots (the replay's hit rate there); in
    host memory all 16 (hit 1) but attention reads 4 MB at the CPU's 1 GB/s."""
    uni = RoutingStats.uniform(8, 2)
    gpu, host = (predict(W, HW, uni, 4, 1000, kv) for kv in ("device", "host"))
    assert (gpu["slots"], host["slots"]) == (12, 16)
    u, hit = 8 * (1 - 0.75 ** 4), uni.hit_rate(12, 2, 4)
    assert 0 < hit < 1 and gpu["hit_rate"] == hit and host["hit_rate"] == 1.0
    assert gpu["copy_s"] == pytest.approx(2 * u * (1 - hit) * 1e6 / 1e9) and host["copy_s"] == 0
    assert host["compute_s"] - gpu["compute_s"] == pytest.approx(4e6 / 1e9 - 4e6 / 1e10)
    slow_cpu = best_plan(W, HW, uni, 4, 1000)
    assert slow_cpu["kv"] == ("device" if gpu["tokens_per_s"] > host["tokens_per_s"] else "host")
    fast_cpu = Hardware(**{**HW.__dict__, "cpu_mem_Bps": 1e12})
    assert best_plan(W, fast_cpu, uni, 4, 1000)["kv"] == "host"
    assert best_plan(W, HW, uni, 4, 1000, kv_places=("device",))["kv"] == "device"
    with pytest.raises(ValueError, match="no batch size fits"):
        best_plan(Workload(**{**W.__dict__, "free_bytes": 10**6}), HW, uni, 4, 1000)
    # each of the 2 attention layers with host KV adds a device-host round trip
    trips = Hardware(**{**HW.__dict__, "host_roundtrip_s": 1e-3})
    assert predict(W, trips, uni, 4, 1000, "host")["compute_s"] == pytest.approx(host["compute_s"] + 2e-3)


def test_one_slot_per_layer_is_the_least_that_runs():
    """The engine needs a slot per MoE layer: 2 slots for 2 layers run (each layer's 2 experts evict the
    other layer's: no hit), 1 does not (no hit rate, no throughput, no bound)."""
    uni = RoutingStats.uniform(8, 2)
    least = predict(W, HW, uni, 1, 10, slots=2)
    assert least["feasible"] and least["hit_rate"] == 0.0 and least["tokens_per_s"] > 0
    short = predict(W, HW, uni, 1, 10, slots=1)
    assert not short["feasible"]
    assert (short["hit_rate"], short["tokens_per_s"], short["bound_tokens_per_s"]) == (0.0, 0.0, 0.0)


@pytest.mark.slow
def test_measured_routing_of_a_run_feeds_the_model(checkpoints):
    path = checkpoints["olmoe"]
    model = mo.load(path, gpu_memory=budget(path, torch.float32, 10), dtype=torch.float32, cuda_graph=False)
    rec = RoutingRecorder(model)
    list(generate_batch(model, prompts((6, 9, 4, 7)), max_new_tokens=6, batch_size=2, eos=[]))
    engine = model.moesys_offload
    w = workload_of(engine)
    assert (w.num_layers, w.num_experts, w.top_k, w.expert_bytes) == (3, 8, 2, engine.store.expert_bytes)
    measured = RoutingStats.from_trace(rec.ids_NLK(decode_only=True), 8, batch_steps=True)
    uniform = RoutingStats.uniform(8, 2)
    # the model's own routing is not uniform: its unique experts for 2 rows differ from uniform draws
    assert measured.unique(2) != pytest.approx(uniform.unique(2))
    # its decode steps (2 rows each, as recorded) replayed through a cache like the engine's
    steps_SLR = measured.steps(2, 3)
    assert steps_SLR.shape[0] == len(rec.ids_NLK(decode_only=True)) // 2
    torch.testing.assert_close(steps_SLR[1, 2], rec.ids_NLK(decode_only=True)[2:4, 2].flatten().long())
    assert predict(w, HW, measured, 2, 10, slots=engine.cache.num_slots)["hit_rate"] == pytest.approx(
        engine_cache_hits(steps_SLR, 8, engine.cache.num_slots, engine.cache.policy, top_k=2))
    hit = engine.snapshot().hit_rate
    measured.with_engine_hit_rate(engine.cache.num_slots, hit)
    assert predict(w, HW, measured, 2, 10, slots=engine.cache.num_slots)["hit_rate"] == pytest.approx(hit)
    # auto: at most max_context // longest rows (4096 // 15), here the 4 prompts, when copies cost nothing
    free_copies = Hardware(**{**HW.__dict__, "pcie_Bps": 1e15})
    assert auto_batch_size(model, 4, 15, hardware=free_copies) == 4
    assert auto_batch_size(model, 4, 15, hardware=free_copies, routing=measured) == 4
    # otherwise the batch the model predicts fastest (context: half the longest row), the KV cache on the device
    for routing in (None, measured):
        want = best_plan(w, HW, routing or uniform, 4, 7, kv_places=("device",), slots=engine.cache.num_slots)
        assert auto_batch_size(model, 4, 15, hardware=HW, routing=routing) == want["batch"]


def test_calibrated_overheads_explain_resident_steps():
    """Resident steps measured as the roofline + 3 ms + 0.5 ms per row come back as those overheads."""
    bare = Hardware(**{**HW.__dict__, "step_overhead_s": 0.0})
    full = 2 * 8
    roofline = {b: predict(W, bare, RoutingStats.uniform(8, 2), b, 50, slots=full)["compute_s"] for b in (1, 4, 16)}
    hw = calibrate(W, HW, {b: t + 3e-3 + 5e-4 * b for b, t in roofline.items()}, 50)
    assert hw.step_overhead_s == pytest.approx(3e-3) and hw.row_overhead_s == pytest.approx(5e-4)
    assert predict(W, hw, RoutingStats.uniform(8, 2), 4, 50, slots=full)["compute_s"] == pytest.approx(
        roofline[4] + 3e-3 + 2e-3)
    one = calibrate(W, HW, {4: roofline[4] + 7e-3}, 50)
    assert (one.step_overhead_s, one.row_overhead_s) == (pytest.approx(7e-3), 0.0)
    # quantized experts' graph steps (read packed, no dequantization waves) fitted on their own path's roofline:
    # the host path's would take the waves for overhead and leave the graph's predictions too fast
    q = Workload(**{**W.__dict__, "dequant_bytes": 4 * 10**6})
    graph = {b: predict(q, bare, RoutingStats.uniform(8, 2), b, 50, slots=full, path="graph")["compute_s"]
             for b in (1, 4, 16)}
    measured = {b: t + 3e-3 + 5e-4 * b for b, t in graph.items()}
    fit = calibrate(q, HW, measured, 50, path="graph")
    assert fit.step_overhead_s == pytest.approx(3e-3) and fit.row_overhead_s == pytest.approx(5e-4)
    assert predict(q, fit, RoutingStats.uniform(8, 2), 16, 50, slots=full, path="graph")["compute_s"] == pytest.approx(
        measured[16])
    host_fit = calibrate(q, HW, measured, 50)
    assert predict(q, host_fit, RoutingStats.uniform(8, 2), 16, 50, slots=full, path="graph")["compute_s"] < (
        measured[16] - 1e-4)


def test_layer_overhead_fitted_to_one_row():
    """The step above (2 host-routed layers, copies 3.5 ms, compute 1.72 ms, nothing prefetched: 5.22 ms)
    measured at 7.22 ms: 1 ms per layer more compute. With all the copies prefetched the compute must take
    the whole 7.22 ms (2.75 ms a layer more); a step the prefetched copies alone explain fits nothing."""
    uni = half_hit()
    hw = calibrate_layers(W, HW, uni, 2, 100, 8, 5.22e-3 + 2e-3)
    assert hw.layer_overhead_s == pytest.approx(1e-3)
    p = predict(W, hw, uni, 2, 100, slots=8)
    assert p["compute_s"] == pytest.approx(1.72e-3 + 2e-3) and p["step_s"] == pytest.approx(7.22e-3)
    ahead = half_hit().with_prefetched_share(1.0)
    assert calibrate_layers(W, HW, ahead, 2, 100, 8, 7.22e-3).layer_overhead_s == pytest.approx(2.75e-3)
    assert calibrate_layers(W, HW, ahead, 2, 100, 8, 3.0e-3).layer_overhead_s == 0.0
    # every expert resident: no layer is host-routed, nothing to fit and nothing added
    assert calibrate_layers(W, HW, uni, 2, 100, 16, 1.0).layer_overhead_s == 0.0
    assert predict(W, replace(HW, layer_overhead_s=1.0), RoutingStats.uniform(8, 2), 2, 100, slots=16)[
        "compute_s"] == pytest.approx(predict(W, HW, RoutingStats.uniform(8, 2), 2, 100, slots=16)["compute_s"])


def test_quantized_experts_run_in_dequantization_waves():
    """Quantized W (dequantized expert 4e6 bytes): B=2 needs U = 3.5 experts per layer, so 2 waves of top_k = 2;
    each writes and reads 2 dequantized experts (2 x 2 x 4e6 / 1e10 = 1.6e-3 s, more than the 4 rows'
    4e6 FLOPs / 1e12) plus 2 ms of fitted overhead; one row reads its experts packed: no wave."""
    q = Workload(**{**W.__dict__, "dequant_bytes": 4 * 10**6})
    uni = RoutingStats.uniform(8, 2)
    assert [dequant_waves(q, u, 2) for u in (2.0, 3.5, 4.0, 8.0)] == [1, 2, 2, 4]
    assert dequant_waves(q, 2.0, 1) == 0 and dequant_waves(W, 3.5, 2) == 0
    hw = Hardware(**{**HW.__dict__, "wave_overhead_s": 2e-3})
    plain = predict(W, hw, uni, 2, 100, slots=8)
    p = predict(q, hw, uni, 2, 100, slots=8)
    # unquantized experts: 2 layers x 3.5e6 / 1e10 = 7e-4; quantized: 2 layers x 2 waves x (1.6e-3 + 2e-3)
    assert p["compute_s"] - plain["compute_s"] == pytest.approx(2 * 2 * 3.6e-3 - 7e-4)
    assert predict(q, hw, uni, 1, 100, slots=8)["compute_s"] == pytest.approx(
        predict(W, hw, uni, 1, 100, slots=8)["compute_s"])
    # where the rows' FLOPs dominate, the waves split them (each runs its own rows): only the overhead is extra
    slow = Hardware(**{**hw.__dict__, "flops": 1e6})
    assert (predict(q, slow, uni, 2, 100, slots=8)["compute_s"] - predict(W, slow, uni, 2, 100, slots=8)["compute_s"]
            == pytest.approx(2 * 2 * 2e-3))
    # the overhead comes back from one measured row
    fitted = calibrate_waves(q, HW, uni, 2, 100, 8, p["step_s"])
    assert fitted.wave_overhead_s == pytest.approx(2e-3)
    assert calibrate_waves(q, HW, uni, 1, 100, 8, 1.0).wave_overhead_s == 0.0  # no wave: nothing to fit
    # a row faster than the waves' roofline leaves no overhead, never a negative one
    assert calibrate_waves(q, HW, uni, 2, 100, 8, p["step_s"] / 10).wave_overhead_s == 0.0
    # the engine's chunk when the dequant_slots kernel quadruples it: 4 experts a chunk, 1 chunk for U = 3.5,
    # which writes and reads 4 experts (2 x 4 x 4e6 / 1e10 = 3.2e-3 s) plus one overhead, per layer
    q4 = Workload(**{**q.__dict__, "dequant_experts": 4})
    assert [dequant_waves(q4, u, 2) for u in (2.0, 3.5, 4.0, 8.0)] == [1, 1, 1, 2]
    assert predict(q4, hw, uni, 2, 100, slots=8)["compute_s"] - plain["compute_s"] == pytest.approx(
        2 * (3.2e-3 + 2e-3) - 7e-4)


def test_device_path_has_its_own_layer_cost_and_no_dequantization_waves():
    """path="device": no host-routed layer cost but the device bookkeeping's own per offloaded layer, and
    quantized experts read packed by one grouped GEMM (no waves): quantized W at B=2 (U = 3.5) computes like
    the unquantized one, 2 layers x 3.5e6 / 1e10; the fitted cost comes back from one device row and leaves
    the host path's alone."""
    q = Workload(**{**W.__dict__, "dequant_bytes": 4 * 10**6})
    hw = replace(HW, layer_overhead_s=5e-3, device_layer_overhead_s=1e-3, wave_overhead_s=2e-3)
    uni = half_hit()
    host, dev = (predict(q, hw, uni, 2, 100, slots=8, path=p) for p in ("host", "device"))
    bare = predict(W, HW, uni, 2, 100, slots=8)  # unquantized, no overheads
    assert dev["compute_s"] == pytest.approx(bare["compute_s"] + 2 * 1e-3)
    # host: 2 waves a layer of (1.6e-3 + 2e-3) instead of 7e-4 of packed reads, and 5 ms a layer
    assert host["compute_s"] == pytest.approx(bare["compute_s"] - 7e-4 + 2 * 2 * 3.6e-3 + 2 * 5e-3)
    assert dev["copy_s"] == host["copy_s"] and dev["tokens_per_s"] > host["tokens_per_s"]
    # a device row above batch 1 fits the device path's batch cost, leaving batch 1's and the host path's alone
    fitted = calibrate_layers(q, replace(hw, device_layer_overhead_s=0.0), uni, 2, 100, 8, dev["step_s"], path="device")
    assert fitted.device_batch_layer_overhead_s == pytest.approx(1e-3)
    assert fitted.device_layer_overhead_s == 0.0 and fitted.layer_overhead_s == 5e-3
    # every expert resident: nothing offloaded, no layer cost on either path
    full = RoutingStats.uniform(8, 2)
    assert predict(W, hw, full, 2, 100, slots=16, path="device")["compute_s"] == pytest.approx(
        predict(W, HW, full, 2, 100, slots=16)["compute_s"])
    with pytest.raises(ValueError, match="path='gpu' must be one of"):
        predict(W, HW, uni, 2, 100, slots=8, path="gpu")



def test_graph_path_copies_in_stream_order_without_layer_costs():
    """path="graph" (the batch's CUDA-graph step): no per-layer host or device-path cost, quantized experts read
    packed (no waves), and the misses copied in stream order with nothing beside them: step = compute + copy,
    whatever share the eager steps' prefetch would have issued ahead. calibrate_layers has nothing to fit there."""
    q = Workload(**{**W.__dict__, "dequant_bytes": 4 * 10**6})
    hw = replace(HW, layer_overhead_s=5e-3, device_layer_overhead_s=1e-3, device_batch_layer_overhead_s=2e-3,
                 wave_overhead_s=2e-3)
    uni = half_hit().with_prefetched_share(0.75)
    graph, dev = (predict(q, hw, uni, 2, 100, slots=8, path=p) for p in ("graph", "device"))
    bare = predict(W, HW, uni, 2, 100, slots=8)  # unquantized, no overheads
    assert graph["compute_s"] == pytest.approx(bare["compute_s"]) and graph["copy_s"] == dev["copy_s"] > 0
    assert graph["step_s"] == pytest.approx(graph["compute_s"] + graph["copy_s"])
    assert dev["compute_s"] == pytest.approx(graph["compute_s"] + 2 * 2e-3)
    assert dev["step_s"] == pytest.approx(max(0.75 * dev["copy_s"], dev["compute_s"]) + 0.25 * dev["copy_s"])
    with pytest.raises(ValueError, match="calibrate_layers fits the host or device path's per-layer cost"):
        calibrate_layers(q, hw, uni, 2, 100, 8, graph["step_s"], path="graph")
    # with the prefetch inside the capture (graph_prefetch): the graph's compute, the device path's overlap
    ahead = predict(q, hw, uni, 2, 100, slots=8, path="graph-prefetch")
    assert ahead["compute_s"] == graph["compute_s"] and ahead["copy_s"] == graph["copy_s"]
    assert ahead["step_s"] == pytest.approx(max(0.75 * ahead["copy_s"], ahead["compute_s"]) + 0.25 * ahead["copy_s"])
    assert ahead["step_s"] < graph["step_s"]

def test_dequant_workspace_holds_more_experts_with_the_kernel():
    """The memory plan reserves top_k experts of the torch dequantization (result, int32 widening and int4
    unpacking: 2 x elsize + 4 bytes a weight); the kernel writes only the result, so the same bytes hold 4 x
    the experts in bf16 (3 x in fp32), never more than the reserve."""
    from moesys.offload.dequant_slots import workspace_bytes, workspace_experts
    assert workspace_experts(8, torch.bfloat16, kernel=True) == 32
    assert workspace_experts(8, torch.float32, kernel=True) == 24
    assert workspace_experts(8, torch.bfloat16, kernel=False) == 8
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        elsize = torch.empty((), dtype=dtype).element_size()
        for kernel, per_weight in ((True, elsize), (False, 2 * elsize + 4)):
            assert workspace_experts(8, dtype, kernel) * 3000 * per_weight <= workspace_bytes(8, 3000, elsize)


def test_quantized_workload_counts_the_dequantized_expert(checkpoints):
    path = checkpoints["olmoe"]
    model = mo.load(path, gpu_memory=budget(path, torch.float32, 10), dtype=torch.float32, cuda_graph=False,
                    quantize_experts="int4")
    w = workload_of(model.moesys_offload)
    store = model.moesys_offload.store
    assert w.dequant_bytes == 3 * store.H * store.I * 4 and w.dequant_bytes > w.expert_bytes
    assert w.dequant_experts == model.moesys_offload.dequant_experts == (  # the kernel's chunk on a GPU
        3 * model.config.num_experts_per_tok if torch.cuda.is_available() else model.config.num_experts_per_tok)
    plain = mo.load(path, gpu_memory=budget(path, torch.float32, 10), dtype=torch.float32, cuda_graph=False)
    assert workload_of(plain.moesys_offload).dequant_bytes == 0


def test_workload_before_load_matches_the_loaded_engine(checkpoints):
    from transformers import AutoConfig

    from moesys.offload.perf_model import workload_before_load

    path = checkpoints["qwen3_moe"]
    gpu_memory = budget(path, torch.float32, 10, max_context=20)
    model = mo.load(path, gpu_memory=gpu_memory, dtype=torch.float32, max_context=20, cuda_graph=False)
    loaded = workload_of(model.moesys_offload)
    before = workload_before_load(AutoConfig.from_pretrained(path), torch.float32, gpu_memory, 20)
    assert {**before.__dict__, "free_bytes": 0} == {**loaded.__dict__, "free_bytes": 0}
    assert 0 <= before.free_bytes - loaded.free_bytes < loaded.expert_bytes  # the slots are whole experts
    assert before.cache.full_per_token == 2 * 3 * 2 * 8 * 4  # 2 (K, V) x 3 layers x 2 KV heads x head_dim 8 x fp32


def test_device_path_layer_cost_above_batch_1_is_its_own():
    """Above batch 1 the device path prefetches the next layer and runs quantized experts through another op:
    its per-layer cost is fitted apart (`device_batch_layer_overhead_s`) from a row above batch 1 and used at
    every batch above 1; batch 1 keeps `device_layer_overhead_s`; unfitted (None), batch 1's serves both."""
    uni = half_hit()
    bare = replace(HW, device_layer_overhead_s=0.0)
    hw = replace(HW, device_layer_overhead_s=1e-3)
    one, two, four = (predict(W, hw, uni, b, 100, slots=8, path="device")["compute_s"] for b in (1, 2, 4))
    assert two == pytest.approx(predict(W, bare, uni, 2, 100, slots=8, path="device")["compute_s"] + 2 * 1e-3)
    both = replace(hw, device_batch_layer_overhead_s=3e-3)
    assert predict(W, both, uni, 1, 100, slots=8, path="device")["compute_s"] == pytest.approx(one)
    for b, before in ((2, two), (4, four)):
        assert predict(W, both, uni, b, 100, slots=8, path="device")["compute_s"] == pytest.approx(before + 2 * 2e-3)
    # the two fits: a batch-1 row sets batch 1's cost, a batch-4 row the batch cost, each from its own step
    step1 = predict(W, both, uni, 1, 100, slots=8, path="device")["step_s"]
    step4 = predict(W, both, uni, 4, 100, slots=8, path="device")["step_s"]
    fit1 = calibrate_layers(W, bare, uni, 1, 100, 8, step1, path="device")
    fit4 = calibrate_layers(W, fit1, uni, 4, 100, 8, step4, path="device")
    assert fit1.device_layer_overhead_s == pytest.approx(1e-3) and fit1.device_batch_layer_overhead_s is None
    assert fit4.device_layer_overhead_s == pytest.approx(1e-3)
    assert fit4.device_batch_layer_overhead_s == pytest.approx(3e-3)
    assert fit4.layer_overhead_s == bare.layer_overhead_s  # the host path's cost is not the device's


def test_a_hybrids_states_take_slots_and_step_time():
    """Rows of a hybrid model keep recurrent states beside their KV: the expert cache gets fewer slots
    (whichever side the KV cache is on: host KV holds the full-attention layers only) and each step reads them."""
    hybrid = replace(W, cache=CacheBytes(full_per_token=1000, state_per_row=10**6, attention_layers=2))
    assert W.slots(4, 100, "device") - hybrid.slots(4, 100, "device") == 4
    assert W.slots(4, 100, "host") == 16 and hybrid.slots(4, 100, "host") == 12
    for kv in ("device", "host"):
        extra = predict(hybrid, HW, RoutingStats.uniform(8, 2), 4, 100, kv, slots=16)["compute_s"] - \
            predict(W, HW, RoutingStats.uniform(8, 2), 4, 100, kv, slots=16)["compute_s"]
        assert extra == pytest.approx(4 * 10**6 / HW.hbm_Bps)


def test_workload_records_round_trip_and_old_records_still_read():
    hybrid = replace(W, cache=CacheBytes(full_per_token=1000, windows=((127, 64),), state_per_row=5,
                                         attention_layers=2))
    assert Workload.from_record(json.loads(json.dumps(hybrid.to_record()))) == hybrid
    old = {k: v for k, v in W.__dict__.items() if k != "cache"} | {"kv_bytes_per_token": 1000, "attention_layers": 2}
    assert Workload.from_record(old) == W

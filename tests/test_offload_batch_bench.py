"""bench/offload_batch.py --smoke runs on the CPU and writes its records, the decode graph's batch rows
(--batch-graph) beside the host-routed ones with the same tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path, *args):
    """Runs bench/offload_batch.py --smoke with `args` in tmp_path (workdir tmp_path/w); asserts it succeeded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'bench'}"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "offload_batch.py"), "--smoke",
                           "--workdir", str(tmp_path / "w"), *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_offload_batch_bench_smoke_with_graph_rows(tmp_path):
    out = tmp_path / "ob.json"
    _bench(tmp_path, "--out", str(out), "--no-accelerate", "--batch-graph", "--routings", "model",
           "--batch-sizes", "1,4", "--experts-impl", "grouped_mm", "--graph-batch-sizes", "1,4", "--graph-resident",
           "--graph-prefetch", "off,on")
    records = json.loads(out.read_text())
    rows = [r for r in records if r["impl"] == "moesys" and not r.get("graph_section")]
    # the copy hit rate counts the prefetch's copies as misses: never above the lookups' hit rate, and
    # below it where the prefetch copied what a lookup then found (batch 1 here)
    # (it may go below 0 where prefetched guesses outnumber what the rows then used)
    assert rows and all(r["copy_hit_rate"] <= r["hit_rate"] for r in rows)
    assert any(r["copy_hit_rate"] < r["hit_rate"] for r in rows)
    # the prefetch copied a share of the decode copies ahead: recorded, and what the predictions were given
    assert all(0 <= r["prefetched_share"] <= 1 for r in rows) and any(r["prefetched_share"] > 0 for r in rows)
    assert all(r["cache_policy"] == "next-visit" for r in rows)
    for r in rows:  # each prediction's error against the measurement
        assert r["prediction_error"] == pytest.approx(r["predicted_with_measured_hit"] / r["tokens_per_s"] - 1)
        assert r["prediction_error_decode_routing"] == pytest.approx(
            r["predicted_tokens_per_s"] / r["tokens_per_s"] - 1)
    # the recorded rows predicted again offline (bench/offload_batch_repredict.py): every offloaded row, the
    # same with each row's Workload rebuilt from its shape (as for runs recorded before rows carried one)
    sys.path.insert(0, str(ROOT / "bench"))
    from offload_batch_repredict import repredict

    again = repredict(records)
    assert [(r["routing"], r["batch"]) for r in again] == [(r["routing"], r["batch"]) for r in rows]
    assert all(r["predicted"] > 0 and r["error"] == pytest.approx(r["predicted"] / r["tokens_per_s"] - 1)
               for r in again)
    rebuilt = repredict([{k: v for k, v in r.items() if k != "workload"} for r in records])
    assert [r["predicted"] for r in rebuilt] == pytest.approx([r["predicted"] for r in again])
    graph = [r for r in records if r.get("graph_section")]
    # batch 1 is one row per --graph-prefetch value (generate() replays the graph whichever path is asked for);
    # above 1, host then graph (--graph-resident: the same graph steps with every expert resident first, the
    # graph rows' bound)
    assert [(r["impl"], r["batch"], r.get("graph_prefetch")) for r in graph] == [
        ("moesys-batch-graph-all-resident", 1, None), ("moesys-batch-graph-all-resident", 4, None),
        ("moesys-batch-graph", 1, False), ("moesys-batch-graph", 1, True),
        ("moesys", 4, None), ("moesys-batch-graph", 4, False), ("moesys-batch-graph", 4, True)]
    assert all(r["tokens_per_s"] > 0 and "error" not in r for r in graph)
    from moesys.offload import perf_model as pm

    resident = {r["batch"]: r["tokens_per_s"] for r in graph if r["impl"].endswith("all-resident")}
    for r in (r for r in graph if r["impl"] == "moesys-batch-graph"):
        # bound = B / max(missed bytes at the pinned bandwidth, the all-resident graph step); the prediction's
        # error against the measurement (perf_model path "graph", its overheads fitted to the resident steps)
        missed_s = r["bytes_copied_per_token"] * r["batch"] / r["hardware"]["pcie_Bps"]
        assert r["bound_tokens_per_s"] == pytest.approx(min(resident[r["batch"]], r["batch"] / missed_s), rel=0.05)
        assert r["share_of_bound"] == pytest.approx(r["tokens_per_s"] / r["bound_tokens_per_s"])
        assert r["prediction_error"] == pytest.approx(r["predicted_with_measured_hit"] / r["tokens_per_s"] - 1)
        w, hw = pm.Workload.from_record(r["workload"]), pm.Hardware(**r["hardware"])
        routing = pm.RoutingStats.uniform(w.num_experts, w.top_k).with_engine_hit_rate(
            r["cache_slots"], r["copy_hit_rate"]).with_prefetched_share(r["prefetched_share"])
        path = "graph-prefetch" if r["graph_prefetch"] else "graph"
        assert r["predicted_with_measured_hit"] > 0 and r["predicted_with_measured_hit"] == pytest.approx(pm.predict(
            w, hw, routing, r["batch"], r["context"], slots=r["cache_slots"], path=path)["tokens_per_s"])
    # the graph's prefetch copied ahead on the batch row (graph_prefetch; on a CPU nothing is captured, so the
    # steps without it prefetch too: tests/test_offload_batch_graph.py tells them apart on a GPU)
    assert graph[6]["prefetched_share"] > 0
    assert graph[2]["path"] == "decode graph, generate() at batch 1"
    assert graph[5]["sequences_equal_to_host_path"] == graph[6]["sequences_equal_to_host_path"] == [4, 4]
    assert graph[5]["path"] == "decode graph, generate_batch(graph=True)"


def test_offload_batch_bench_graph_only_int4(tmp_path):
    """--graph-only --graph-quantize int4: the graph section's rows alone (no bound, no calibration), in int4,
    with the engine's copy grid from --copy-programs (the graph's prefetch takes it)."""
    out = tmp_path / "ob.json"
    _bench(tmp_path, "--out", str(out), "--graph-only", "--graph-quantize", "int4", "--graph-batch-sizes", "4",
           "--copy-programs", "3")
    records = json.loads(out.read_text())
    assert [(r["impl"], r["batch"], r["quantize"], r["copy_programs"]) for r in records] == [
        ("moesys", 4, "int4", 3), ("moesys-batch-graph", 4, "int4", 3)]
    assert records[1]["sequences_equal_to_host_path"] == [4, 4]


@pytest.mark.slow
def test_offload_batch_bench_profile_writes_where_a_rows_steps_go(tmp_path):
    """--profile runs the one row it names (int8 experts, uniform routing, batch 4 here) and writes the step's
    unprofiled time, torch.profiler's op tables and cProfile's Python functions, the engine's among them."""
    out = tmp_path / "profile.txt"
    _bench(tmp_path, "--out", str(tmp_path / "unused.json"), "--profile", str(out), "--profile-row", "int8:uniform:4",
           "--new-tokens", "4")
    text = out.read_text()
    assert text.startswith("profile of int8:uniform:4 (precision:routing:batch)")
    assert "ms per step" in text and "Quantized(" in text  # the int8 row ran the dequantizing strategy
    assert "aten::" in text and "engine.py" in text and "_run_dequant" in text
    assert not (tmp_path / "unused.json").exists()  # the profile is the only output: no rows were run


@pytest.mark.slow
def test_offload_batch_bench_qwen3_shape_loads_from_the_random_model_without_a_checkpoint(tmp_path):
    """--shape qwen3-30b-a3b (here its --smoke miniature) builds every model, bf16 and int4, all-resident and
    offloaded, from a seeded random model through a TensorSource: no checkpoint is written, and the
    accelerate rows say why they cannot run (accelerate loads from disk)."""
    out = tmp_path / "ob.json"
    _bench(tmp_path, "--out", str(out), "--shape", "qwen3-30b-a3b", "--routings", "uniform", "--batch-sizes", "1,4",
           "--quantize", "none,int4", "--experts-impl", "grouped_mm", "--bookkeeping", "device",
           "--batch-step-kernel", "on,off", "--copy-priority", "normal,high")
    records = json.loads(out.read_text())
    # the device path's per-layer cost is fitted at batch 1 and, apart, above it (perf_model.device_layer_s)
    calib = [r for r in records if r["impl"] == "moesys-calibration" and r["bookkeeping"] == "device"]
    assert [(r["quantize"], r["batch"]) for r in calib] == [("none", 1), ("none", 4), ("int4", 1), ("int4", 4)]
    assert all(r["hardware"]["device_batch_layer_overhead_s"] is None for r in calib if r["batch"] == 1)
    assert all(r["hardware"]["device_batch_layer_overhead_s"] is not None for r in calib if r["batch"] == 4)
    assert {r["shape"] for r in records} == {"qwen3-30b-a3b-smoke"}
    rows = [r for r in records if r["impl"] == "moesys"]
    # each row with the batch step kernel and with the torch reference (--batch-step-kernel on,off), and with the
    # copy stream at each priority (--copy-priority normal,high), side by side
    assert [(r["quantize"], r["batch"], r["batch_step_kernel"], r["copy_priority"]) for r in rows] == [
        (q, B, k, p) for q in ("none", "int4") for B in (1, 4) for k in (True, False) for p in ("normal", "high")]
    assert all(r["tokens_per_s"] > 0 and "error" not in r and r["cache_slots"] < 3 * 16 for r in rows)
    assert [r["batch"] for r in records if r["impl"] == "moesys-all-resident"] == [1, 4]
    accelerate = [r for r in records if r["impl"] == "accelerate-offload"]
    assert len(accelerate) == 2 and all("checkpoint" in r["error"] for r in accelerate)
    assert not list((tmp_path / "w").rglob("*.safetensors")) and not list((tmp_path / "w").rglob("config.json"))


def test_repredict_takes_the_copy_hit_rate_from_the_copied_bytes():
    """A row's copies per step over the model's lookups per step (layers x unique experts at its batch), which
    goes below 0 where the prefetch copied guesses no row used; rows without copied bytes keep their record."""
    sys.path.insert(0, str(ROOT / "bench"))
    from offload_batch_repredict import copy_hit_rate

    from moesys.offload import perf_model as pm

    w = pm.Workload(num_layers=4, num_experts=8, top_k=2, expert_bytes=1000, expert_flops_per_row=1,
                    dense_bytes=1, cache=pm.CacheBytes(full_per_token=1, attention_layers=4), free_bytes=1)
    lookups = 4 * pm.RoutingStats.uniform(8, 2).unique(2)  # per step at batch 2
    row = {"batch": 2, "copy_hit_rate": 0.0}
    for copies, want in ((0.5 * lookups, 0.5), (1.25 * lookups, -0.25)):
        row["bytes_copied_per_token"] = copies * 1000 / 2
        assert copy_hit_rate(row, w) == pytest.approx(want)
    assert copy_hit_rate({"batch": 2, "copy_hit_rate": 0.3}, w) == 0.3


def test_repredict_fits_the_device_batch_cost_on_a_recorded_row():
    """The Qwen3-30B-A3B int4 run recorded on an H100 (its device steps took 164-182 ms from batch 8 to 128
    against 67 at batch 1): with the device path's per-layer cost fitted at batch 1 only, every row above
    batch 1 is predicted at twice its speed; fitted apart on the uniform batch-8 row (--device-batch-row 8),
    the rows it was not fitted on come within 11%, and that row says it was fitted."""
    import json

    sys.path.insert(0, str(ROOT / "bench"))
    from offload_batch_repredict import repredict

    rows = json.loads((ROOT / "bench" / "results" / "offload_batch_qwen3_int4_h100_8061ee3.json").read_text())
    before = repredict(rows)
    assert all(r["error"] > 1.0 for r in before if r["batch"] > 1)
    after = repredict(rows, device_batch_row=8)
    fitted = [r for r in after if r["fitted_on_this_row"]]
    assert [(r["routing"], r["batch"]) for r in fitted] == [("uniform", 8)]
    assert all(abs(r["error"]) < 0.11 for r in after if not r["fitted_on_this_row"])
    assert [r["predicted"] for r in after if r["batch"] == 1] == pytest.approx(
        [r["predicted"] for r in before if r["batch"] == 1])  # batch 1 keeps its own fit
    with pytest.raises(SystemExit, match="no uniform device row"):
        repredict(rows, device_batch_row=16)


def test_device_step_bench_checks_the_kernel_against_the_reference(tmp_path):
    """bench/device_step.py on tiny tables (TRITON_INTERPRET on a CPU): each row records that the batch kernel's
    outputs and tables equal the reference's, and the time per call of both."""
    out = tmp_path / "ds.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'bench'}"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "device_step.py"), "--out", str(out), "--layers", "3",
                           "--experts", "8", "--top-k", "2", "--slots", "20,5", "--batch-sizes", "3", "--tokens", "1"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())
    assert [r["slots"] for r in records] == [20, 5]
    assert records[0]["equal_to_reference"] is True and records[0]["kernel_wall_us_per_call"] > 0
    assert "fewer slots" in records[1]["error"]  # 5 slots in banks: none holds a step's 6 ids

"""bench/fssdp_sim.py runs on the CPU and shows what FSSDP is for: under Zipf routing it moves fewer
bytes than FSDP over experts and has far less compute imbalance than EP."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "fssdp_sim.py"


@pytest.mark.slow
def test_simulator_small(tmp_path):
    spec = importlib.util.spec_from_file_location("fssdp_sim", BENCH)
    sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim)
    out = tmp_path / "sim.json"
    sim.main(["--ranks", "8", "16", "--experts", "32", "--layers", "2", "--tokens-per-rank", "512", "--out", str(out),
              "--plot", str(tmp_path / "sim.png")])
    assert (tmp_path / "sim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = json.loads(out.read_text())
    by = {(r["impl"], r["world_size"]): r for r in records}
    assert {r["impl"] for r in records} == {"ep", "fsdp_experts", "fssdp"}
    for W in (8, 16):
        assert by["fssdp", W]["imbalance_max_over_mean"] < by["ep", W]["imbalance_max_over_mean"] / 2
        assert by["fssdp", W]["bytes_per_rank"] < by["fsdp_experts", W]["bytes_per_rank"]
        assert by["fsdp_experts", W]["imbalance_max_over_mean"] < 1.1


@pytest.mark.slow
def test_gpu_bench_script_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(BENCH.parent / "fssdp_bench.py"), "--device", "cpu", "--nproc", "2",
                    "--warmup", "6", "--iters", "1", "--routing", "zipf", "--out", str(out)], check=True, timeout=600)
    records = json.loads(out.read_text())
    assert [r["policy"] for r in records] == ["ep", "fssdp", "fsdp"]
    assert all(r["world_size"] == 2 and r["tokens_per_s"] > 0 for r in records)
    by = {r["policy"]: r for r in records}
    assert by["fssdp"]["expert_rows_max_over_mean"] < by["ep"]["expert_rows_max_over_mean"]

"""bench/ep_bench.py runs on CPU/gloo with tiny sizes and writes records in the benchmark format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ep_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "ep.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NCCL_NVLS_ENABLE", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ep_bench.py"), "--device", "cpu", "--nproc", "2",
                           "--tokens", "32", "--hidden", "16", "--ffn", "16", "--shared-ffn", "16",
                           "--experts", "4", "--iters", "2", "--warmup", "1", "--rounds", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())
    assert [r["impl"] for r in records] == ["ep2-balanced-overlap_on", "ep2-balanced-overlap_off",
                                            "ep2-zipf-overlap_on", "ep2-zipf-overlap_off"]
    for r in records:
        for key in ("bench", "shape", "fwd_ms", "fwdbwd_ms", "step_ms", "tokens_per_s", "a2a_ms", "a2a_share",
                    "device", "torch", "date", "git_sha", "world_size"):
            assert key in r, f"record {r['impl']} lacks {key}"
        assert r["world_size"] == 2 and r["step_ms"] > 0 and 0 < r["a2a_share"]
    balanced, zipf = records[0], records[2]
    assert balanced["recv_rows_max_over_mean"] == 1.0 and zipf["recv_rows_max_over_mean"] > 1.0
    assert "overlap_saving_ms" in balanced

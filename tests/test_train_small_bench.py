"""bench/train_small.py --profile-trainer on the CPU: two profiled steps of the real trainer, under the torch
engine and under DeepSpeed's, written as a kernel/op table with the unprofiled step time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_profile_trainer_writes_the_steps_table_for_either_engine(tmp_path, engine):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed", reason="needs the optional extra moesys[deepspeed]")
    out = tmp_path / "profile.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'bench'}"}
    sets = ["--set", f"train.engine={engine}"]
    if engine == "deepspeed":
        sets += ["--set", "train.deepspeed_config=configs/deepspeed_zero2_autocast.json"]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_small.py"), "--cpu-smoke", "--config",
                           str(ROOT / "configs" / "tiny.yaml"), "--steps", "10", "--profile-trainer", str(out), *sets],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith(f"{engine} engine: step wall ") and "(synchronised each step, unprofiled)" in text
    wall_ms = float(text.split("step wall ")[1].split(" ms")[0])
    assert wall_ms > 0
    assert "aten::mm" in text and "ProfilerStep*" in text  # the profiled steps' ops (2 ProfilerStep rows)


@pytest.mark.slow
def test_deepspeed_row_says_how_many_zero_groups_step_unflattened(tmp_path):
    """The DeepSpeed row beside the torch engine's (--cpu-smoke, one process): it records how many of ZeRO's
    parameter groups the step took unflattened; at one rank every group is."""
    import json

    pytest.importorskip("deepspeed", reason="needs the optional extra moesys[deepspeed]")
    out = tmp_path / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'bench'}"}
    skips = [a for impl in ("moesys_triton", "moesys_eager", "hf_grouped_mm", "hf_eager") for a in ("--skip", impl)]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_small.py"), "--cpu-smoke", "--config",
                           str(ROOT / "configs" / "tiny.yaml"), "--steps", "10", *skips, "--set",
                           f"train.deepspeed_config={ROOT / 'configs' / 'deepspeed_zero2_autocast.json'}",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["impl"]: r for r in json.loads(out.read_text())}
    ds = rows["moesys_deepspeed"]
    assert ds["zero_groups"] > 0 and ds["zero_groups_unflattened"] == ds["zero_groups"]
    assert "zero_groups" not in rows["moesys"]
    assert ds["loss_first"] == pytest.approx(rows["moesys"]["loss_first"], rel=1e-5)

"""bench/offload_batch_equal.py: where a batch's sequence parts from its run alone, and the logit gap there;
its --smoke run on the CPU (every variant: fp32 batch steps equal the prompts alone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_spacing_is_the_gap_between_adjacent_values():
    from offload_batch_equal import spacing

    for dtype in (torch.bfloat16, torch.float32):
        for value in (3.7, -0.02, 1000.0):
            x = torch.tensor(value, dtype=dtype)
            assert spacing(value, dtype) == (torch.nextafter(x.abs(), torch.tensor(float("inf"), dtype=dtype))
                                             - x.abs()).item()


def test_parted_gives_the_first_difference_and_both_logits_there():
    from transformers import OlmoeConfig, OlmoeForCausalLM

    from offload_batch_equal import parted

    torch.manual_seed(0)
    model = OlmoeForCausalLM(OlmoeConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                         num_experts_per_tok=2)).eval()
    prompt, alone = [5, 9, 11], [3, 4, 7, 8]
    assert parted(model, prompt, alone, list(alone), torch.float32) is None
    batch = [3, 4, 20, 8]
    where = parted(model, prompt, alone, batch, torch.float32)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + alone[:2]])).logits[0, -1]
    assert where["position"] == 2 and (where["alone_token"], where["batch_token"]) == (7, 20)
    assert where["gap"] == pytest.approx((logits[7] - logits[20]).item())
    assert where["top_token"] == int(logits.argmax())
    assert parted(model, prompt, alone, alone[:3], torch.float32) == dict(position=3, lengths_differ=True)


@pytest.mark.slow
def test_offload_batch_equal_smoke(tmp_path):
    out = tmp_path / "equal.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'bench'}"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "offload_batch_equal.py"), "--smoke", "--out",
                           str(out), "--workdir", str(tmp_path / "w"), "--batch", "5"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert [v["variant"] for v in record["variants"]] == ["device", "device-no-prefetch", "device-rows", "host"]
    assert [v["bookkeeping"] for v in record["variants"]] == ["device", "device", "device", "host"]
    # fp32 on the CPU: every variant's batch equals its prompts alone
    assert all(v["equal"] == v["batch"] == 5 and v["diverged"] == [] for v in record["variants"])
    prefetched = {v["variant"]: v["prefetch_copies"] for v in record["variants"]}
    assert prefetched["device"] > 0 and prefetched["device-no-prefetch"] == 0


@pytest.mark.slow
def test_offload_batch_equal_exact_variant_smoke(tmp_path):
    """--variants host,exact: the exact variant loads its own model (exact=True) after the others."""
    out = tmp_path / "equal.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'bench'}"}
    cmd = [sys.executable, str(ROOT / "bench" / "offload_batch_equal.py"), "--smoke", "--out", str(out), "--workdir",
           str(tmp_path / "w"), "--batch", "2", "--new-tokens", "2", "--prompt-len", "4", "--variants", "host,exact"]
    run = dict(capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    proc = subprocess.run(cmd + ["--quantize", "int4"], **run)
    assert proc.returncode == 2 and "pass --quantize none" in proc.stderr
    proc = subprocess.run(cmd + ["--quantize", "none"], **run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert [(v["variant"], v["bookkeeping"], v["equal"]) for v in record["variants"]] == [("host", "host", 2),
                                                                                          ("exact", "host", 2)]
    assert all(v["seconds_batch_and_alone"] > 0 and v["batch_tokens_per_s"] > 0 and v["alone_tokens_per_s"] > 0
               for v in record["variants"])
    # both also compare a left-padded batch's prefill logits with each prompt's alone: exact mode's bit for bit (the
    # host path's were 1.2e-7 apart here, fp32 on the CPU: oneDNN's GEMMs and SDPA follow the batch's shape)
    host, exact = record["variants"]
    assert exact["prefill_logits_equal"] == 2 and exact["prefill_logits_max_abs_diff"] == 0
    assert 0 <= host["prefill_logits_equal"] <= 2 and host["prefill_logits_max_abs_diff"] >= 0

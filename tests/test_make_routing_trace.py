"""bench/make_routing_trace.py: its CPU smoke trains, records a 64-expert top-8 trace that
moesys.offload.routing replays id for id into a 3-layer model; its routing statistics against hand-made traces."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, OlmoeConfig

from moesys.offload.routing import RoutingOverride, RoutingRecorder, load_trace
from tests.test_offload import COMMON

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import make_routing_trace as mrt  # noqa: E402


def test_statistics_of_a_concentrated_and_a_uniform_trace():
    E, K, N = 64, 8, 200
    same_NLK = torch.arange(K).expand(N, 2, K)  # every token on experts 0..7, both layers
    s = mrt.routing_summary(same_NLK, E)
    assert s["entropy_per_layer"] == pytest.approx([math.log(K) / math.log(E)] * 2)
    assert s["load_max_mean_worst"] == pytest.approx(E / K)
    assert s["lru_hit_rate"]["8"] == pytest.approx((N - 1) / N)  # only the first token misses
    uni = mrt.routing_summary(mrt.uniform_trace(4000, 2, E, K), E)
    assert uni["entropy_mean"] > 0.99
    for slots in mrt.CACHE_SLOTS:  # iid uniform references: an LRU of S slots hits S/E of them
        assert uni["lru_hit_rate"][str(slots)] == pytest.approx(slots / E, abs=0.02)
    ids = mrt.uniform_trace(50, 3, E, K)
    assert all(len(set(row.tolist())) == K for row in ids.view(-1, K))


@pytest.mark.slow
def test_cpu_smoke_trace_replays_through_routing(tmp_path):
    out = tmp_path / "trace.safetensors"
    assert mrt.main(["--cpu-smoke", "--out", str(out), "--run-dir", str(tmp_path / "run")]) == 0
    ids_NLK, E = load_trace(out)
    assert E == 64 and ids_NLK.shape == (256, 2, 8)
    stats = json.loads(out.with_suffix(".json").read_text())
    assert stats["trace_bytes"] < 8 * 1024 and stats["data_source"] == "stdlib"
    assert {"init", "trained", "uniform"} <= stats.keys() and stats["training"]["last_step"] == 3
    # the ids the trained model routed are what the trace holds
    assert stats["trained"]["entropy_per_layer"] == pytest.approx(mrt.usage_entropy(ids_NLK, 64))

    # replayed into a 3-layer 64-expert top-8 model: layer r gets trace layer r mod 2, token after token
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(OlmoeConfig(**COMMON, num_experts=64, num_experts_per_tok=8)).eval()
    replay = RoutingOverride(model, "trace", trace=out)
    seen = RoutingRecorder(model)  # hooked after the override: sees the ids the experts receive
    with torch.no_grad():
        model(torch.randint(2, 100, (1, 100)))
        model(torch.randint(2, 100, (1, 200)))  # wraps past the trace's 256 tokens
    seen.remove()
    replay.remove()
    got_NLK = seen.ids_NLK().long()
    rows = torch.arange(300) % 256
    for r in range(3):
        assert torch.equal(got_NLK[:, r], ids_NLK[rows, r % 2])


def test_held_out_ids_are_the_validation_sequences_in_order():
    from moesys.config import load_config
    from moesys.data import load_tokens, pack
    config = load_config(ROOT / "configs/tiny.yaml", ["data.max_tokens=20000", "data.val_fraction=0.1"])
    splits = pack(load_tokens(config.data), config.data.seq_len, config.data.val_fraction)
    S, start = config.data.seq_len, splits.num_train * config.data.seq_len
    ids_BS = mrt.held_out_ids(config, 2 * S + 1)  # rounded up to whole sequences
    assert ids_BS.shape == (3, S)
    # the validation split, read as one stream: never a training token
    assert torch.equal(ids_BS.flatten(), splits.tokens[start:start + 3 * S].long())

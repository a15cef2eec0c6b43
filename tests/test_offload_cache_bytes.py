"""moesys.offload.cache_bytes: the generation cache measured on the meta device equals, byte for byte, what a
real forward of a tiny random model fills (B rows, lengths below and beyond a sliding window), for every
cache kind: full attention, MLA's compressed latent, sliding windows, linear-attention and Mamba states."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, OlmoeConfig

from moesys.offload import cache_bytes
from moesys.offload.cache_bytes import CacheBytes, from_config, measure
from moesys.offload.sizes import format_bytes
from tests.test_offload_generic import CONFIGS

ARCHS = sorted(CONFIGS) + ["olmoe"]


def config_of(arch):
    if arch == "olmoe":
        return OlmoeConfig(vocab_size=101, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2)
    return CONFIGS[arch]()


def real_cache_bytes(model, rows: int, tokens: int) -> int:
    ids = torch.randint(2, 100, (rows, tokens), generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    return cache_bytes._tensor_bytes(cache.layers)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("arch", ARCHS)
def test_measured_bytes_equal_a_real_forward(arch, dtype):
    config = config_of(arch)
    measured = measure(config, dtype)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    for tokens in (1, 3, 7):  # gpt_oss's window is 4 tokens: 3 is within it, 7 beyond
        assert real_cache_bytes(model, 3, tokens) == 3 * measured.row_bytes(tokens), (arch, tokens)
    kinds = {"jamba": "state", "qwen3_next": "state", "nemotron_h": "state", "gpt_oss": "window"}
    assert bool(measured.state_per_row) == (kinds.get(arch) == "state")
    assert bool(measured.windows) == (kinds.get(arch) == "window")


def test_the_config_estimate_was_wrong_where_it_matters():
    """Why the measurement: MLA caches a latent smaller than heads x head_dim; hybrids keep KV in some layers
    only, and states the estimate does not count."""
    for arch in ("deepseek_v3", "qwen3_next"):
        assert measure(config_of(arch), torch.bfloat16).full_per_token < from_config(config_of(arch),
                                                                                     torch.bfloat16).full_per_token
    assert from_config(config_of("qwen3_next"), torch.bfloat16).state_per_row == 0


def test_a_failed_probe_falls_back_to_the_estimate_with_a_warning(monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("no meta kernel")

    monkeypatch.setattr(cache_bytes, "_layer_bytes", broken)
    monkeypatch.setattr(cache_bytes, "_MEASURED", {})  # (another test may have measured this config)
    config = config_of("olmoe")
    with caplog.at_level(logging.WARNING, logger="moesys.offload.cache_bytes"):
        assert measure(config, torch.float32) == from_config(config, torch.float32)
    assert "no meta kernel" in caplog.text and "estimate" in caplog.text


def test_measured_once_per_config_and_dtype(monkeypatch):
    calls = []
    real = cache_bytes._layer_bytes
    monkeypatch.setattr(cache_bytes, "_layer_bytes", lambda *a: calls.append(a[1]) or real(*a))
    monkeypatch.setattr(cache_bytes, "_MEASURED", {})
    config = config_of("olmoe")
    first = measure(config, torch.float32)
    assert measure(config_of("olmoe"), torch.float32) == first and len(calls) == 2  # 1 and 2 tokens, once
    assert measure(config, torch.bfloat16).full_per_token == first.full_per_token // 2 and len(calls) == 4
    config.num_hidden_layers = 3  # another config: measured again
    assert measure(config, torch.float32).full_per_token == first.full_per_token * 3 // 2


def test_row_arithmetic():
    c = CacheBytes(full_per_token=10, windows=((4, 3), (4, 3)), state_per_row=100, attention_layers=1)
    assert c.row_bytes(2) == 20 + 12 + 100 and c.row_bytes(9) == 90 + 24 + 100
    assert c.per_token == 16
    assert c.device_bytes(3, 9) == 3 * 214 and c.device_bytes(3, 9, kv="host") == 3 * 124
    # max_context 100 reserves 100 x 16 + 100 = 1700 bytes; rows of 9 tokens take 214 each
    assert c.reserve_bytes(100) == 1700 and c.rows_fit(9, 100) == 7
    assert c.columns_for(7, 100) == 11 and 7 * c.row_bytes(12) > c.reserve_bytes(100) >= 7 * c.row_bytes(11)
    assert c.context_for(7, 9) == 88 and c.reserve_bytes(87) < 7 * 214 <= c.reserve_bytes(88)
    assert c.context_for(1, 9) == 9  # never below the row's own length
    attention_only = CacheBytes(full_per_token=10, attention_layers=2)
    assert attention_only.rows_fit(25, 100) == 4 and attention_only.context_for(4, 25) == 100
    assert attention_only.columns_for(3, 100) == 33
    # windows only (all layers sliding): a row pays its window, however long, so many rows share max_context
    windowed = CacheBytes(windows=((4, 3),))
    assert windowed.rows_fit(50, 100) == 25 and windowed.columns_for(2, 100) == 100


def test_no_kv_cache_cannot_grow_with_max_context():
    states_only = CacheBytes(state_per_row=100)
    assert states_only.context_for(1, 50) == 50
    with pytest.raises(ValueError, match="keeps no KV cache.*reserve="):
        states_only.context_for(2, 50)


def test_hybrid_rows_pay_their_states_in_the_plan_and_the_batch_check(tmp_path):
    """Qwen3-Next's rows each keep linear-attention states: two rows of 20 tokens fit max_context=40 by the
    token count, not by bytes (one row's states are in the reserve, not two). The batch is refused, with the
    max_context that holds it; loaded with that, it runs, and the decode graph's columns per row stay within the
    reserve. The plan's description (what `moesys generate` prints) names the states."""
    import argparse

    import moesys.offload as mo
    from moesys.offload.batch import generate_batch
    from moesys.offload.batch_cli import choose_batch
    from moesys.offload.cli import add_arguments
    from tests.test_offload_batch import budget, prompts
    from tests.test_offload_generic import _save_tiny

    config = config_of("qwen3_next")
    _save_tiny(config, tmp_path)
    cache = measure(config, torch.float32)
    assert cache.state_per_row > 0

    def load(max_context):
        return mo.load(tmp_path, gpu_memory=budget(tmp_path, torch.float32, 6, max_context=max_context),
                       dtype=torch.float32, max_context=max_context, cuda_graph=False)

    model = load(40)
    assert model.moesys_offload.plan.cache == cache
    said = model.moesys_offload.plan.describe()  # what `moesys generate` prints
    assert f"{format_bytes(cache.state_per_row)} of recurrent states per sequence" in said
    # the reserve grows by the measured bytes per token, not the config's estimate (beyond the prefill
    # activations' 1024 tokens, which grow with max_context below them)
    assert load(2100).moesys_offload.plan.reserve_bytes - load(2000).moesys_offload.plan.reserve_bytes == \
        100 * cache.full_per_token
    ps = prompts((12, 12))
    need = cache.context_for(2, 20)
    assert need > 40
    with pytest.raises(ValueError, match=rf"recurrent states.*batch_size<=1 .*max_context>={need}"):
        generate_batch(model, ps, max_new_tokens=8, batch_size=2)
    model = load(need)
    run = generate_batch(model, ps, max_new_tokens=8, batch_size=2, eos=[])
    assert len(list(run)) == 2
    # the decode graph's fixed-shape cache: 2 rows of as many columns as the reserve holds in bytes
    columns = run._graph_columns(2)
    assert 2 * cache.row_bytes(columns) <= cache.reserve_bytes(need) and columns < need // 2

    # the CLI sizes max_context for the batch it chose, states included
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(tmp_path), "--prompts", "p.jsonl", "--out", "o.jsonl", "--batch-size", "2",
                              "--max-context", "16", "--gpu-memory", "1GiB", "--max-new-tokens", "8"])
    from moesys.offload.batch import Request

    requests = [Request(token_ids=p, id=i) for i, p in enumerate(ps)]
    assert choose_batch(args, config, torch.float32, requests, torch.device("cpu")) == (2, "device", need)

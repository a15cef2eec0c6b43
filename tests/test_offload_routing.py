"""Routing modes (moesys.offload.routing): a recorded trace replayed reproduces the model's own generation
token for token; uniform routing is K distinct uniform experts per token, seeded; bad traces are refused."""

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import moesys.offload as mo
from moesys.offload.batch import generate_batch
from moesys.offload import routing
from moesys.offload.routing import RoutingOverride, RoutingRecorder, load_trace
from tests.test_offload import CONFIGS, checkpoints  # noqa: F401  (the fixture: tiny random checkpoints)
from tests.test_offload_batch import budget, prompts


@pytest.fixture(scope="module")
def strong_experts(tmp_path_factory):
    """A tiny OLMoE whose experts move the residual stream enough that routing decides the greedy tokens
    (at the default init their output is ~1% of it, and any routing gives the same tokens)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS["olmoe"]())
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
            layer.mlp.experts.gate_up_proj.normal_(0, 0.5)
            layer.mlp.experts.down_proj.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("strong")
    model.save_pretrained(path)
    return path


def _tokens(model, ps, batch_size=2):
    return sorted((r.index, r.token_ids) for r in generate_batch(model, ps, max_new_tokens=6, batch_size=batch_size,
                                                                 eos=[]))


@pytest.mark.slow
def test_replayed_trace_reproduces_the_models_own_generation(strong_experts, tmp_path):
    path = strong_experts
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ps = prompts((5, 8, 3))
    rec = RoutingRecorder(model)
    own = _tokens(model, ps)
    rec.remove()
    rec.save(tmp_path / "t.safetensors")
    ids_NLK, E = load_trace(tmp_path / "t.safetensors")
    # one prefill of the 5- and 8-token prompts together (left-padded: 2 x 8 rows), 5 steps of 2 rows (prompts
    # 0 and 1 end together), a prefill of 3, 5 steps of 1
    assert E == 8 and ids_NLK.shape == (2 * 8 + 5 * 2 + 3 + 5, 3, 2)

    # the same prompts replayed from the trace on the offloaded model under a budget that evicts
    off = mo.load(path, gpu_memory=budget(path, torch.float32, 10), dtype=torch.float32, cuda_graph=False)
    replay = RoutingOverride(off, "trace", trace=tmp_path / "t.safetensors")
    assert _tokens(off, ps) == own
    # a shifted replay routes differently, so the tokens change: the ids really come from the trace
    replay.cursor = [c + 1 for c in replay.cursor]
    assert _tokens(off, ps) != own
    replay.remove()
    assert _tokens(off, ps) == own


@pytest.mark.parametrize("flush", [256, 3])
def test_recorder_keeps_the_decode_steps_apart(checkpoints, monkeypatch, flush):
    """ids_NLK(decode_only=True) is the rows of the decode forwards only: the trace without the prefills (and
    a left-padded batch prefill's padding rows), which no decode step's cache sees. The same whether the ids
    reach the host at the end or every few calls (FLUSH_CALLS)."""
    monkeypatch.setattr(routing, "FLUSH_CALLS", flush)
    model = AutoModelForCausalLM.from_pretrained(checkpoints["olmoe"], dtype=torch.float32)
    rec = RoutingRecorder(model)
    _tokens(model, prompts((5, 8, 3)))
    rec.remove()
    assert (max(len(p) for p in rec._pending) == 12) == (flush == 256)  # 12 calls a layer: flushed at 3
    every, decode = rec.ids_NLK(), rec.ids_NLK(decode_only=True)
    # a prefill of 2 x 8 rows (left-padded), 5 steps of 2 rows, a prefill of 3, 5 steps of 1
    assert every.shape[0] == 2 * 8 + 5 * 2 + 3 + 5
    assert torch.equal(decode, torch.cat((every[16:26], every[29:34])))
    on_modules = RoutingRecorder.on_modules([model.model.layers[0].mlp.experts], 8, 2)
    model(torch.tensor([[3]]))
    with pytest.raises(ValueError, match="knows no forward's phase"):
        on_modules.ids_NLK(decode_only=True)
    on_modules.remove()


def test_uniform_routing_is_seeded_distinct_and_uniform(checkpoints):
    model = AutoModelForCausalLM.from_pretrained(checkpoints["qwen3_moe"], dtype=torch.float32)
    a, b, c = (RoutingOverride(model, "uniform", seed=s) for s in (3, 3, 4))
    ids_a = a.ids(0, 4000, torch.device("cpu"))
    assert torch.equal(ids_a, b.ids(0, 4000, torch.device("cpu")))
    assert not torch.equal(ids_a, c.ids(0, 4000, torch.device("cpu")))
    assert ids_a.shape == (4000, 3) and ids_a.min() >= 0 and ids_a.max() < 8
    assert (ids_a.sort(dim=1).values.diff(dim=1) > 0).all()  # K distinct per token
    share = torch.bincount(ids_a.flatten(), minlength=8) / ids_a.numel()
    torch.testing.assert_close(share, torch.full((8,), 1 / 8), atol=0.015, rtol=0)
    for o in (a, b, c):
        o.remove()


@pytest.mark.slow
def test_uniform_routing_reaches_the_experts(strong_experts):
    """The experts module receives the override's ids (a recorder hooked after it sees them), and they
    change the tokens."""
    model = AutoModelForCausalLM.from_pretrained(strong_experts, dtype=torch.float32)
    own = _tokens(model, prompts((4, 6)))
    uni = RoutingOverride(model, "uniform", seed=7)
    rec = RoutingRecorder(model)
    assert _tokens(model, prompts((4, 6))) != own
    got = rec.ids_NLK()
    again = RoutingOverride(model, "uniform", seed=7)  # replays the same draws call by call: layers in order
    sizes = [len(c) for c in rec.chunks[0]]
    want = [[again.ids(r, T, torch.device("cpu")) for r in range(3)] for T in sizes]
    want = torch.cat([torch.stack(per_layer, dim=1) for per_layer in want])
    assert sizes == [2 * 6] + [2] * 5 and torch.equal(got.long(), want)  # one padded prefill of both, 5 steps
    for o in (uni, rec, again):
        o.remove()


def test_bad_traces_are_refused(checkpoints, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(checkpoints["olmoe"], dtype=torch.float32)
    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a moesys routing trace"):
        RoutingOverride(model, "trace", trace=tmp_path / "other.safetensors")
    meta = {"format": "moesys-routing-trace", "version": "1", "num_experts": "16", "top_k": "2"}
    save_file({"ids_NLK": torch.zeros(4, 3, 2, dtype=torch.int16)}, tmp_path / "e16.safetensors", metadata=meta)
    with pytest.raises(ValueError, match="16 experts top-2 cannot drive a model of 8 experts top-2"):
        RoutingOverride(model, "trace", trace=tmp_path / "e16.safetensors")
    save_file({"ids_NLK": torch.full((4, 3, 2), 20, dtype=torch.int16)}, tmp_path / "big.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=r"outside \[0, 16\)"):
        load_trace(tmp_path / "big.safetensors")
    with pytest.raises(ValueError, match="routing='sticky' is unknown"):
        RoutingOverride(model, "sticky")
    with pytest.raises(ValueError, match="needs a trace file"):
        RoutingOverride(model, "trace")

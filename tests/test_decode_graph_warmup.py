"""moesys.offload.graph.DecodeGraph's way to a capture, on the CPU with the capture stood in for: warm-up
steps go on until one compiled nothing (a capture must never compile), a layout that keeps compiling or
whose capture fails decodes eagerly from then on (said once), and a step known not to be capturable
(float32 experts with transformers' grouped_mm under compile) is never tried."""

from __future__ import annotations

import contextlib
import types
import warnings

import pytest
import torch
from torch import nn

from moesys.offload import graph as decode_graph


class Layer:
    def __init__(self):
        self.max_cache_len, self.filled, self.warm = 8, 0, False


class StaticCache:  # what DecodeGraph recognises as a compileable cache
    is_compileable = True

    def __init__(self):
        self.layers = [Layer(), Layer()]

    def get_seq_length(self):
        return 0


class Toy(nn.Module):
    """`counts`: its second cache layer counts the tokens in a Python int, as transformers' sliding-window
    layers do; every step sets its first layer's `warm` flag (a once-only change)."""

    def __init__(self, impl=None, dtype=torch.float32, counts=False):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, dtype=dtype))
        self.config = types.SimpleNamespace(_experts_implementation=impl)
        self.calls, self.counts = 0, counts

    def forward(self, input_ids, past_key_values=None):
        self.calls += 1
        past_key_values.layers[0].warm = True
        if self.counts:
            past_key_values.layers[1].filled += 1
        return input_ids.float() * self.w[0]


class FakeGraph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


def decoder_with(monkeypatch, compiles_at_calls=(), capture_error=None, max_warmup=None, compile=False,
                 counts=False):
    """A DecodeGraph over Toy that believes it is on CUDA; dynamo's compile counter moves during the calls
    numbered in `compiles_at_calls` (1-based), and a capture records (or raises `capture_error`). `compile`
    sets the decoder's configuration only: the step itself always runs eagerly here."""
    model = Toy(counts=counts)
    decoder = decode_graph.install(model, compile=compile)
    decoder.cuda = True
    state = {"frames": 0}
    real_step = decoder.eager_forward

    def step(**kw):
        out = real_step(**kw)
        if model.calls in compiles_at_calls:
            state["frames"] += 1
        return out

    decoder.step_forward = step
    monkeypatch.setattr(decode_graph, "_frames_compiled", lambda: state["frames"])
    if max_warmup is not None:
        monkeypatch.setattr(decode_graph, "MAX_WARMUP_STEPS", max_warmup)

    def capture(kwargs):
        if capture_error is not None:
            raise capture_error
        decoder.static_output = step(**kwargs)
        decoder.static_inputs = {}
        decoder.graph = FakeGraph()
        decoder.captures += 1

    decoder._capture = capture
    return model, decoder


@torch.no_grad()  # decode: a step with autograd on is not the graph's
def steps(model, n, cache=None):
    cache = cache or StaticCache()
    return [model(input_ids=torch.tensor([[t]]), past_key_values=cache) for t in range(n)]


def test_warm_up_lasts_until_a_step_compiles_nothing(monkeypatch):
    model, decoder = decoder_with(monkeypatch, compiles_at_calls=(1, 2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say: the graph is captured
        steps(model, 8)
    # steps 1-3 compiled, step 4 compiled nothing: the 5th captures (and replays), the rest replay
    assert (decoder.eager_steps, decoder.captures, decoder.replays) == (4, 1, 4)
    assert decoder.fallback_reason is None


def test_compiled_step_warms_up_twice_its_first_step_compiles(monkeypatch):
    model, decoder = decoder_with(monkeypatch, compiles_at_calls=(1,), compile=True)
    steps(model, 6)
    assert (decoder.eager_steps, decoder.captures, decoder.replays) == (2, 1, 4)




def test_a_step_that_keeps_compiling_runs_eagerly_said_once(monkeypatch):
    model, decoder = decoder_with(monkeypatch, compiles_at_calls=range(1, 100), max_warmup=3)
    with pytest.warns(UserWarning, match="still recompiled at its warm-up step 3") as record:
        outs = steps(model, 7)
    assert len(record) == 1
    assert (decoder.eager_steps, decoder.captures, decoder.replays) == (7, 0, 0)
    assert [o.item() for o in outs] == list(range(7))
    assert "recompiled" in decoder.fallback_reason


def test_python_state_that_moves_at_every_step_is_never_captured(monkeypatch):
    """A cache layer counting tokens in a Python int (a sliding window's fill level) would be frozen by a
    replay: the warm-up never settles, and the steps run uncompiled without a graph, said once. Two warm-up
    steps in a row that change it are enough to tell (each compiled warm-up step after the first would
    recompile the whole model: minutes for GPT-OSS-20B on a fresh machine), not MAX_WARMUP_STEPS of them."""
    model, decoder = decoder_with(monkeypatch, counts=True, compile=True)
    with pytest.warns(UserWarning, match=r"the cache's layers\[1\]\.filled \(1 -> 2\) changes at every step .* "
                                         r"warm-up step 2$") as rec:
        outs = steps(model, 6)
    assert len(rec) == 1 and decoder.warm == 2
    assert (decoder.eager_steps, decoder.captures, decoder.replays) == (6, 0, 0)
    assert [o.item() for o in outs] == list(range(6))
    assert decoder.step_forward == decoder.eager_forward  # nothing left to compile at every token


def test_a_counter_found_among_other_changes_is_the_one_named(monkeypatch):
    """A scalar that counts down is a counter too, and the warning names the scalar that moved twice, not
    another one that changed once on the same step and sorts first."""
    toy_forward = Toy.forward

    def forward(self, input_ids, past_key_values=None):
        past_key_values.layers[1].room = getattr(past_key_values.layers[1], "room", 9) - 1
        if self.calls == 1:  # the second call: a once-only change that sorts before layers[1].room
            past_key_values.layers[0].late = True
        return toy_forward(self, input_ids, past_key_values)
    monkeypatch.setattr(Toy, "forward", forward)
    model, decoder = decoder_with(monkeypatch, compile=True)
    with pytest.warns(UserWarning, match=r"the cache's layers\[1\]\.room \(8 -> 7\) changes at every step .* "
                                         r"warm-up step 2$"):
        steps(model, 4)
    assert decoder.warm == 2 and decoder.captures == 0


def test_uncompiled_settled_step_captures_after_one_warm_up(monkeypatch):
    model, decoder = decoder_with(monkeypatch)
    cache = StaticCache()
    cache.layers[0].warm = True  # as the step leaves it: nothing moves
    steps(model, 5, cache)
    assert (decoder.eager_steps, decoder.captures, decoder.replays) == (1, 1, 4)


def test_a_once_only_change_costs_one_more_warm_up(monkeypatch):
    model, decoder = decoder_with(monkeypatch)  # the first step sets layers[0].warm; the second changes nothing
    steps(model, 5)
    assert (decoder.eager_steps, decoder.captures, decoder.replays) == (2, 1, 3)


def test_a_failed_capture_runs_the_step_eagerly_from_then_on(monkeypatch):
    err = RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture")
    model, decoder = decoder_with(monkeypatch, capture_error=err)
    with pytest.warns(UserWarning, match="its capture failed: Cannot copy") as record:
        outs = steps(model, 5)
    assert len(record) == 1
    assert [o.item() for o in outs] == list(range(5))  # the failed capture's step still gave its output
    assert (decoder.eager_steps, decoder.captures, decoder.replays) == (5, 0, 0)
    assert decoder.graph is None and decoder.static_inputs == {}



def test_a_failed_capture_forgets_the_prefetches_it_forked(monkeypatch):
    """A batch step's capture that failed after forking the copy stream (engine.graph_prefetch) leaves pending
    prefetches whose events were recorded under the capture: the engine forgets them before the step runs
    eagerly, whose joins would otherwise wait for those events outside the capture."""
    from moesys.offload.engine import OffloadEngine

    model, decoder = decoder_with(monkeypatch, capture_error=RuntimeError("operation failed during capture"))
    engine = types.SimpleNamespace(device_path_unsupported=None, _device_prefetched={},
                                   ensure_device_tables=lambda: None, note_device_step=lambda rows: None,
                                   graph_step=contextlib.nullcontext)
    engine.forget_captured_prefetches = types.MethodType(OffloadEngine.forget_captured_prefetches, engine)
    decoder.engine = engine
    failing = decoder._capture

    def capture(kwargs):
        engine._device_prefetched[1] = ("an event recorded under the capture", None, None)
        failing(kwargs)

    decoder._capture = capture
    with pytest.warns(UserWarning, match="its capture failed: operation failed during capture"):
        outs = steps(model, 3)
    assert [o.item() for o in outs] == [0, 1, 2] and engine._device_prefetched == {}

def test_capture_blocker_reads_a_composite_models_text_config():
    model = Toy(None, torch.float32)
    model.config.get_text_config = lambda: types.SimpleNamespace(_experts_implementation="grouped_mm")
    assert decode_graph.capture_blocker(model, compile=True) is not None


@pytest.mark.parametrize("impl,dtype,compile,blocked", [
    ("grouped_mm", torch.float32, True, True),
    ("grouped_mm", torch.float16, True, True),
    ("grouped_mm", torch.bfloat16, True, False),
    ("grouped_mm", torch.float32, False, False),
    ("moesys", torch.float32, True, False),
    (None, torch.float32, True, False),
])
def test_capture_blocker(impl, dtype, compile, blocked):
    why = decode_graph.capture_blocker(Toy(impl, dtype), compile)
    assert (why is not None) == blocked
    if blocked:
        assert "grouped_mm" in why and "bfloat16" in why


class OnCuda(Toy):
    """Toy whose parameters say CUDA (all DecodeGraph asks of them: device and dtype)."""

    def parameters(self, recurse=True):
        yield types.SimpleNamespace(device=torch.device("cuda"), dtype=self.w.dtype)


def test_a_blocked_model_on_cuda_never_tries_a_capture():
    model = OnCuda("grouped_mm", torch.float32)
    with pytest.warns(UserWarning, match="grouped_mm runs torch.float32 experts under torch.compile"):
        decoder = decode_graph.install(model, compile=True)
    decoder.step_forward = decoder.eager_forward  # (no compile needed to count the steps)
    decoder._capture = lambda kwargs: pytest.fail("a blocked model was captured")
    assert [o.item() for o in steps(model, 4)] == [0, 1, 2, 3]
    assert (decoder.eager_steps, decoder.captures) == (4, 0)
    # a CPU model has no capture to block: nothing said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_graph.DecodeGraph(Toy("grouped_mm"), compile=True).fallback_reason is None

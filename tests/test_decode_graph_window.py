"""DecodeGraph over a cache with sliding-window layers (transformers' StaticSlidingWindowLayer counts its tokens
in a Python int, which a CUDA graph replay would freeze): once every window is full, one-token steps run with
the counters pinned and their masks and positions built outside the step, so the step reads the same Python
values at every token (a compiled step's guards hold, a replay is right); while a window fills, steps run
eagerly. On the CPU the eligible steps take the same path without a graph, so the logits here are the ones a
replay computes."""

from __future__ import annotations

import inspect
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, GptOssConfig, StaticCache

from moesys.offload import graph as decode_graph

WINDOW = 4


def tiny_gpt_oss():
    torch.manual_seed(0)
    config = GptOssConfig(vocab_size=101, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                          num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW, pad_token_id=0,
                          layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return AutoModelForCausalLM.from_config(config).eval()


def _kwargs(model, cache, positions):
    """As bench/offload.py calls a model: the cache, and cache_position where the model still takes one."""
    kw = {"past_key_values": cache, "use_cache": True}
    if "cache_position" in inspect.signature(model.forward).parameters:
        kw["cache_position"] = positions
    return kw


@torch.no_grad()
def forced_decode(model, prompt_len: int, steps: int):
    """Logits of a prefill of `prompt_len` tokens and `steps` one-token steps (fixed random tokens), and
    the cache's window counters after them."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(2, 101, (1, prompt_len), generator=g)
    toks = torch.randint(2, 101, (steps, 1, 1), generator=g)
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + steps)
    out = [model(prompt, **_kwargs(model, cache, torch.arange(prompt_len))).logits[:, -1]]
    for i in range(steps):
        out.append(model(toks[i], **_kwargs(model, cache, torch.tensor([prompt_len + i]))).logits[:, -1])
    return torch.cat(out), [layer.cumulative_length_int for _, layer in decode_graph._window_layers(cache)]


@pytest.mark.parametrize("prompt_len", [9, 2], ids=["windows-full", "windows-filling"])
def test_full_window_steps_equal_the_models_own(prompt_len):
    """The steps whose masks and positions DecodeGraph builds (counters pinned at the window size) give the
    model's own logits, and leave the counters where the model would; a prompt shorter than the window
    decodes eagerly until it is full."""
    model = tiny_gpt_oss()
    want, want_counts = forced_decode(model, prompt_len, 7)
    assert want_counts == [prompt_len + 7] * 2
    decoder = decode_graph.install(model)
    got, counts = forced_decode(model, prompt_len, 7)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert counts == want_counts
    assert decoder.filling_steps == max(WINDOW - prompt_len, 0)
    assert decoder.eager_steps == 7 and decoder.fallback_reason is None


def test_a_stale_counter_would_change_the_logits():
    """What the pinning guards against: the same steps with the model building its own masks and positions
    from a frozen counter (as a replay without DecodeGraph's inputs would) give other logits."""
    model = tiny_gpt_oss()
    want, _ = forced_decode(model, 9, 4)
    layer_cls = type(decode_graph._window_layers(StaticCache(config=model.config, max_cache_len=16))[0][1])
    real_update = layer_cls.update

    def update(self, *args, **kwargs):  # every step sees the count of the first decode step
        if self.cumulative_length_int > 9:
            self.cumulative_length_int = 9
        return real_update(self, *args, **kwargs)

    layer_cls.update = update
    try:
        stale, _ = forced_decode(model, 9, 4)
    finally:
        layer_cls.update = real_update
    torch.testing.assert_close(stale[:2], want[:2])
    assert not torch.allclose(stale[2:], want[2:], atol=1e-3)


class FakeGraph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


@torch.no_grad()
def test_full_windows_settle_capture_and_replays_keep_counting(monkeypatch):
    """On a (stood-in) GPU: the warm-up settles (the pinned counters are not taken for moving Python state),
    one capture, then replays; the counters advance by one token per step, replayed or not, never twice."""
    model = tiny_gpt_oss()
    decoder = decode_graph.install(model)
    decoder.cuda = True
    monkeypatch.setattr(decode_graph, "_frames_compiled", lambda: 0)
    seen, read, windows = [], [], []

    def capture(kwargs):  # a capture records (runs the Python once) without computing
        seen.append({k: v for k, v in kwargs.items() if k != "past_key_values"})
        read.append([layer.cumulative_length_int for layer in windows])
        decoder.static_output = types.SimpleNamespace(logits=None)
        decoder.static_inputs = {}
        decoder.graph = FakeGraph()
        decoder.captures += 1

    decoder._capture = capture
    cache = StaticCache(config=model.config, max_cache_len=20)
    model(torch.randint(2, 101, (1, 9)), **_kwargs(model, cache, torch.arange(9)))
    windows += [layer for _, layer in decode_graph._window_layers(cache)]
    real_step = decoder.step_forward

    def step(**kw):  # the counters the step reads: a compiled step guards on them, a replay freezes them
        read.append([layer.cumulative_length_int for layer in windows])
        return real_step(**kw)

    decoder.step_forward = step
    for i in range(6):
        model(torch.tensor([[5]]), **_kwargs(model, cache, torch.tensor([9 + i])))
        assert [layer.cumulative_length_int for layer in windows] == [10 + i] * 2
    assert decoder.fallback_reason is None
    assert (decoder.eager_steps, decoder.captures, decoder.replays) == (1, 1, 5)
    assert read == [[WINDOW] * 2] * 2  # the warm-up step's and the capture's: pinned, the same
    assert isinstance(seen[0]["attention_mask"], dict)  # the masks are inputs of the captured step
    assert any(k in seen[0] for k in ("cache_position", "position_ids"))


def test_a_mask_builder_that_refuses_leaves_the_steps_eager_said_once():
    """A model whose own create_masks_for_generate wants arguments generate() does not pass: its
    sliding-window steps run eagerly with the model's own masks (the same logits), and a warning says so
    once."""
    model = tiny_gpt_oss()
    want, _ = forced_decode(model, 9, 4)

    def create_masks_for_generate(config, inputs_embeds, attention_mask, cache, position_ids, token_type_ids):
        raise AssertionError("not reached: the call lacks token_type_ids")

    model.create_masks_for_generate = create_masks_for_generate
    decoder = decode_graph.install(model)
    with pytest.warns(UserWarning, match="building their masks outside the step failed") as rec:
        got, _ = forced_decode(model, 9, 4)
    assert len([w for w in rec if "masks outside" in str(w.message)]) == 1
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert decoder.filling_steps == 4 and "token_type_ids" in decoder.window_mask_error

"""Upcycling: tiny random Llama/Mistral/Qwen2/Qwen3 checkpoints against their upcycled MoE checkpoints."""

from __future__ import annotations

import dataclasses
import errno
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

import moesys  # noqa: E402
from moesys import cli  # noqa: E402
from moesys.upcycling import io as upio  # noqa: E402
from moesys.upcycling import load_dense_config, upcycle_state_dict  # noqa: E402
from moesys.upcycling.plan import (UpcycleOptions, _generator, check_source_tensors,  # noqa: E402
                                   expected_source_tensors, parse_moe_layers, plan_upcycle)

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _build(kind: str):
    T = transformers
    if kind == "llama":  # tied embeddings and llama3 rope scaling must survive
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        return T.LlamaForCausalLM(T.LlamaConfig(**COMMON, tie_word_embeddings=True, rope_parameters=rope))
    if kind == "mistral":  # a window shorter than the test prompt, and head_dim != hidden/heads
        return T.MistralForCausalLM(T.MistralConfig(**COMMON, sliding_window=5, head_dim=32))
    if kind == "qwen2":  # q/k/v biases
        return T.Qwen2ForCausalLM(T.Qwen2Config(**COMMON, rms_norm_eps=1e-5))
    if kind == "qwen3":  # q/k norms
        return T.Qwen3ForCausalLM(T.Qwen3Config(**COMMON, head_dim=16))
    raise AssertionError(kind)


def _save_dense(kind: str, path: Path, **save_kwargs):
    torch.manual_seed({"llama": 0, "mistral": 1, "qwen2": 2, "qwen3": 3}[kind])
    model = _build(kind)
    with torch.no_grad():  # weights large enough that a wrong expert or scale shows in the logits
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model.eval().save_pretrained(path, **save_kwargs)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return model


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return {kind: (root / kind, _save_dense(kind, root / kind)) for kind in ("llama", "mistral", "qwen2", "qwen3")}


def _ids(n=2, t=12):
    return torch.randint(3, COMMON["vocab_size"], (n, t), generator=torch.Generator().manual_seed(0))


def _load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _assert_same_function(dense_model, out_dir, atol=1e-5):
    moe = _load(out_dir)
    ids = _ids()
    with torch.no_grad():
        ref, got = dense_model(ids).logits, moe(ids).logits
    assert (ref - got).abs().max().item() <= atol
    gen_ref = dense_model.generate(ids[:1, :6], max_new_tokens=4, do_sample=False)
    gen_got = moe.generate(ids[:1, :6], max_new_tokens=4, do_sample=False)
    assert torch.equal(gen_ref, gen_got)
    return moe


def _leftovers(parent: Path):
    return [p.name for p in parent.iterdir() if ".upcycle-" in p.name or ".old-" in p.name]


CASES = [  # (source, target, options)
    ("llama", "mixtral", {}),
    ("llama", "qwen2_moe", {"moe_layers": "every-other"}),
    ("mistral", "mixtral", {"granularity": 2, "num_experts": 8, "top_k": 4}),
    ("mistral", "qwen2_moe", {"granularity": 2, "num_experts": 8, "top_k": 2, "shared_expert": True}),
    ("qwen2", "qwen2_moe", {"moe_layers": [0, 2]}),
    ("qwen3", "qwen3_moe", {}),
    ("qwen3", "qwen3_moe", {"granularity": 4, "num_experts": 8, "top_k": 4, "moe_layers": "1"}),
]


@pytest.mark.parametrize("source,target,opts", CASES, ids=[f"{s}-{t}-{i}" for i, (s, t, _) in enumerate(CASES)])
def test_upcycled_model_matches_dense(dense, tmp_path, source, target, opts):
    src_dir, model = dense[source]
    kw = {"num_experts": 4, "top_k": 2, **opts}
    out = tmp_path / "moe"
    result = moesys.upcycle(src_dir, out, target=target, progress=False, **kw)
    assert result.function_preserving
    moe = _assert_same_function(model, out)
    assert type(moe).__name__ == {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                                  "qwen3_moe": "Qwen3MoeForCausalLM"}[target]
    cfg = json.loads((out / "config.json").read_text())
    src_cfg = json.loads((src_dir / "config.json").read_text())
    for key in ("rope_parameters", "rms_norm_eps", "tie_word_embeddings", "vocab_size", "head_dim", "eos_token_id"):
        if key in src_cfg:
            assert cfg[key] == src_cfg[key], key
    assert (out / "generation_config.json").exists() and (out / "tokenizer_config.json").exists()
    # On-disk names are the per-expert ones HF checkpoints use, for every MoE layer.
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    E = kw["num_experts"]
    moe_layers = [i for i in range(3) if i not in cfg.get("mlp_only_layers", [])]
    for i in range(3):
        if target == "mixtral":
            expected = {f"model.layers.{i}.block_sparse_moe.experts.{E - 1}.{w}.weight" for w in ("w1", "w2", "w3")}
        else:
            expected = {f"model.layers.{i}.mlp.experts.{E - 1}.{p}.weight"
                        for p in ("gate_proj", "up_proj", "down_proj")}
        assert (expected <= keys) == (i in moe_layers)
        assert (f"model.layers.{i}.mlp.gate_proj.weight" in keys) == (i not in moe_layers)
    # transformers writes the very same names when it saves the model it loaded from our files.
    moe.save_pretrained(tmp_path / "resaved")
    with safe_open(str(tmp_path / "resaved" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == keys
    if target == "qwen2_moe":
        assert any(".mlp.shared_expert.gate_proj.weight" in k for k in keys)
        assert any(".mlp.shared_expert_gate.weight" in k for k in keys)
    assert _leftovers(tmp_path) == []


def test_state_dict_api_matches_file_output(dense, tmp_path):
    src_dir, model = dense["qwen3"]
    opts = UpcycleOptions(num_experts=4, top_k=2, granularity=2, seed=7)
    cfg, sd, plan = upcycle_state_dict(load_dense_config(src_dir), model.state_dict(), opts)
    moesys.upcycle(src_dir, tmp_path / "moe", num_experts=4, top_k=2, granularity=2, seed=7, progress=False)
    with safe_open(str(tmp_path / "moe" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(sd) - {"lm_head.weight"} | ({"lm_head.weight"} & set(f.keys()))
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), sd[k]), k
    assert cfg == json.loads((tmp_path / "moe" / "config.json").read_text())


def test_sharded_input_and_output(tmp_path):
    model = _save_dense("llama", tmp_path / "dense", max_shard_size="100KB")
    assert (tmp_path / "dense" / "model.safetensors.index.json").exists()
    out = tmp_path / "moe"
    result = moesys.upcycle(tmp_path / "dense", out, num_experts=4, top_k=2, max_shard_size="300KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(result.files) > 2 and set(index["weight_map"].values()) == set(result.files)
    assert index["metadata"]["total_size"] == result.bytes_written
    _assert_same_function(model, out)


def test_legacy_config_keys(tmp_path):
    # Older checkpoints spell RoPE as rope_theta + rope_scaling and the dtype as torch_dtype.
    model = _save_dense("llama", tmp_path / "dense")
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    cfg["torch_dtype"] = cfg.pop("dtype")
    (tmp_path / "dense" / "config.json").write_text(json.dumps(cfg))
    moesys.upcycle(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=2, progress=False)
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    _assert_same_function(model, tmp_path / "moe")


def test_moesys_experts_implementation_loads(dense, tmp_path):
    integ = pytest.importorskip("moesys.integrations.transformers", reason="moesys transformers integration missing")
    integ.register()
    src_dir, model = dense["qwen3"]
    moesys.upcycle(src_dir, tmp_path / "moe", num_experts=4, top_k=2, progress=False)
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32,
                                                            experts_implementation="moesys").eval()
    assert moe.config._experts_implementation == "moesys"
    with torch.no_grad():
        assert (model(_ids()).logits - moe(_ids()).logits).abs().max().item() <= 1e-5


def test_no_renormalisation_and_drop_upcycling(dense, tmp_path, capsys):
    src_dir, model = dense["qwen3"]
    # Softmax without renormalisation: the E*G/K scale is exact when the router is uniform (zeros).
    r = moesys.upcycle(src_dir, tmp_path / "nonorm", num_experts=8, top_k=2, granularity=2, norm_topk_prob=False,
                       router_init="zeros", progress=False)
    assert r.function_preserving
    assert json.loads((tmp_path / "nonorm" / "config.json").read_text())["norm_topk_prob"] is False
    _assert_same_function(model, tmp_path / "nonorm")
    r = moesys.upcycle(src_dir, tmp_path / "nonorm2", num_experts=8, top_k=2, norm_topk_prob=False, progress=False)
    assert not r.function_preserving and "approximately" in capsys.readouterr().err

    r = moesys.upcycle(src_dir, tmp_path / "drop", num_experts=4, top_k=2, drop_ratio=0.5, progress=False)
    assert not r.function_preserving and "NOT function preserving" in capsys.readouterr().err
    dense_w = model.model.layers[0].mlp.gate_proj.weight.detach()
    with safe_open(str(tmp_path / "drop" / "model.safetensors"), "pt") as f:
        experts = [f.get_tensor(f"model.layers.0.mlp.experts.{e}.gate_proj.weight") for e in range(4)]
        downs = [f.get_tensor(f"model.layers.0.mlp.experts.{e}.down_proj.weight") for e in range(4)]
    for w, d in zip(experts, downs):
        changed_rows = (w != dense_w).any(dim=1)
        assert changed_rows.sum().item() == 64  # half of I=128, the same neurons in gate and down
        assert torch.equal(changed_rows, (d != model.model.layers[0].mlp.down_proj.weight).any(dim=0))
    assert not torch.equal(experts[0], experts[1])
    _load(tmp_path / "drop")


def test_interrupted_run_leaves_nothing(dense, tmp_path, monkeypatch):
    src_dir, _ = dense["llama"]
    calls = []

    def flaky_flush(self, f):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C halfway through the weights
        return original(self, f)

    original = upio.ShardWriter._flush
    monkeypatch.setattr(upio.ShardWriter, "_flush", flaky_flush)
    with pytest.raises(KeyboardInterrupt):
        moesys.upcycle(src_dir, tmp_path / "moe", num_experts=4, top_k=2, memory_budget=1, progress=False)
    assert not (tmp_path / "moe").exists() and _leftovers(tmp_path) == []
    # An existing output survives a failed --overwrite run untouched.
    (tmp_path / "moe").mkdir()
    (tmp_path / "moe" / "keep").write_text("x")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        moesys.upcycle(src_dir, tmp_path / "moe", num_experts=4, top_k=2, memory_budget=1, overwrite=True,
                       progress=False)
    assert [p.name for p in (tmp_path / "moe").iterdir()] == ["keep"] and _leftovers(tmp_path) == []


def test_streaming_memory_is_bounded_by_budget(tmp_path, monkeypatch):
    # A model whose output is ~100x the budget: the writer must never hold more than budget + one tensor,
    # and each dense tensor is read once although the shared expert and 8 experts copy it.
    T = transformers
    cfg = T.LlamaConfig(**{**COMMON, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4})
    T.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    reads = []
    real_safe_open = upio.safe_open
    monkeypatch.setattr(upio, "safe_open", lambda *a, **k: (reads.append(a[0]), real_safe_open(*a, **k))[1])
    budget = 64 * 1024
    r = moesys.upcycle(tmp_path / "dense", tmp_path / "moe", num_experts=8, top_k=2, memory_budget=budget,
                       target="qwen2_moe", granularity=2, progress=False)
    largest = 512 * 128 * 4
    assert r.bytes_written > 100 * budget
    assert r.peak_held_bytes <= budget + largest
    with safe_open(str(tmp_path / "dense" / "model.safetensors"), "pt") as f:
        assert 3 * 4 <= len(reads) <= len(f.keys())  # the MLP matrices are sliced, so read; none twice


def test_file_to_file_copy_and_its_fallback_write_the_same_bytes(dense, tmp_path, monkeypatch):
    src_dir, _ = dense["llama"]
    moesys.upcycle(src_dir, tmp_path / "fast", num_experts=4, top_k=2, progress=False)

    def refuse(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    moesys.upcycle(src_dir, tmp_path / "slow", num_experts=4, top_k=2, progress=False)
    fast, slow = ((tmp_path / d / "model.safetensors").read_bytes() for d in ("fast", "slow"))
    assert fast == slow


BAD_CASES = {
    "missing_safetensors": (lambda d: (d / "model.safetensors").unlink(), [], "missing|no model.safetensors"),
    "truncated_safetensors": (lambda d: _truncate(d / "model.safetensors"), [], "truncated"),
    "unsupported_arch": (lambda d: _edit_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"]), [], "gpt2"),
    "pickle_only": (lambda d: _to_pickle_name(d), [], "pickle"),
    "topk_gt_experts": (None, ["--top-k", "5"], "top-k 5"),
    "granularity_not_dividing": (None, ["--num-experts", "6", "--top-k", "3", "--granularity", "3"], "granularity 3"),
    "mixtral_dense_layers": (None, ["--moe-layers", "every-other"], "Mixtral has no per-layer dense"),
    "incompatible_target": (None, ["--target", "qwen3_moe"], "q_norm"),
    "shared_expert_on_mixtral": (None, ["--target", "mixtral", "--shared-expert"], "shared expert"),
    "bad_layer_list": (None, ["--target", "qwen2_moe", "--moe-layers", "0,7"], "layer ids"),
    "out_exists": (None, ["--overwrite-test"], "already exists"),
}


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])


def _edit_config(d: Path, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _to_pickle_name(d: Path):
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys, case):
    breaker, extra, message = BAD_CASES[case]
    src = tmp_path / "dense"
    _save_dense("mistral", src)
    if breaker:
        breaker(src)
    out = tmp_path / "out"
    if extra == ["--overwrite-test"]:
        out.mkdir()
        extra = []
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["upcycle", str(src), str(out), "--num-experts", "4", "--top-k", "2", "--no-progress", *extra]
    assert cli.main(argv) != 0
    err = capsys.readouterr().err
    assert "error" in err
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temp dir left
    # The Python API raises ValueError with the same message.
    opts = {"num_experts": 4, "top_k": 2}
    for flag, value in zip(extra[::2], extra[1::2]):
        key = flag.lstrip("-").replace("-", "_")
        opts[key] = True if value is None else (int(value) if value.isdigit() else value)
    if "--shared-expert" in extra:
        opts = {"num_experts": 4, "top_k": 2, "target": "mixtral", "shared_expert": True}
    with pytest.raises(ValueError, match=message):
        moesys.upcycle(src, out, progress=False, **opts)


@pytest.mark.slow
def test_cli_success_and_lazy_import(dense, tmp_path, capsys):
    src_dir, model = dense["qwen2"]
    assert cli.main(["upcycle", str(src_dir), str(tmp_path / "moe"), "--num-experts", "4", "--top-k", "2",
                     "--granularity", "2", "--no-progress"]) == 0
    assert "Qwen2MoeForCausalLM" in capsys.readouterr().out
    _assert_same_function(model, tmp_path / "moe")
    code = "import sys, moesys; assert 'transformers' not in sys.modules; assert callable(moesys.upcycle)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


_RSS_CHILD = r"""
import json, sys
import torch, transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # imported before the baseline
import moesys

def hwm_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2)
transformers.LlamaForCausalLM(cfg).save_pretrained(sys.argv[1] + "/dense")
import gc; gc.collect()
before = hwm_bytes()
r = moesys.upcycle(sys.argv[1] + "/dense", sys.argv[1] + "/moe", num_experts=8, top_k=2, memory_budget=1,
                   progress=False)
print(json.dumps({"growth": hwm_bytes() - before, "written": r.bytes_written}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the peak RSS")
def test_peak_rss_does_not_grow_with_output_size(tmp_path):
    # The real bound, measured: the process's peak resident set grows by far less than the output size.
    # The building of the dense model sets the baseline high-water mark (it holds every tensor), so any
    # growth past it comes from upcycling; the output is 100 MB, its largest tensor 1 MB.
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(tmp_path)], check=True, capture_output=True,
                         text=True, cwd=Path(__file__).parent.parent).stdout
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["written"] > 90e6
    assert stats["growth"] < 32e6, stats


def _in_memory_source(seed: int, shift: float = 0.0, scale: float = 0.15):
    """A tiny Llama config (defaults filled in) and a state dict whose MLP matrices have mean `shift`
    and std `scale`, each layer different."""
    config = transformers.LlamaConfig(**COMMON)
    torch.manual_seed(seed)
    sd = {k: (shift + scale * torch.randn_like(v)) if ".mlp." in k else 0.1 * torch.randn_like(v)
          for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    return config.to_dict(), sd


def test_every_moe_layer_gets_its_own_router():
    src, sd = _in_memory_source(0)
    _, out, _ = upcycle_state_dict(src, sd, UpcycleOptions(num_experts=4, top_k=2, target="mixtral",
                                                           router_std=0.05))
    routers = [out[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(3)]
    for i in range(3):
        assert routers[i].shape == (4, 64) and float(routers[i].std()) == pytest.approx(0.05, rel=0.2)
        for j in range(i):
            assert not torch.equal(routers[i], routers[j]), (i, j)
    again = upcycle_state_dict(src, sd, UpcycleOptions(num_experts=4, top_k=2, target="mixtral", router_std=0.05))[1]
    assert all(torch.equal(again[f"model.layers.{i}.block_sparse_moe.gate.weight"], routers[i]) for i in range(3))


def test_drop_upcycling_redraws_with_the_dense_weights_statistics():
    # Dense MLP weights ~ N(0.3, 0.02): the re-drawn neurons must look like them, not like N(0, 1).
    src, sd = _in_memory_source(1, shift=0.3, scale=0.02)
    _, out, _ = upcycle_state_dict(src, sd, UpcycleOptions(num_experts=4, top_k=2, target="mixtral", drop_ratio=0.5))
    for i in range(3):
        dense = sd[f"model.layers.{i}.mlp.gate_proj.weight"]
        new = []
        for e in range(4):
            w = out[f"model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight"]
            changed = (w != dense).any(dim=1)
            assert changed.sum().item() == 64
            new.append(w[changed])
        new = torch.cat(new)  # 4 experts x 64 neurons x 64 inputs, all re-drawn
        assert float(new.mean()) == pytest.approx(float(dense.mean()), abs=0.002)
        assert float(new.std()) == pytest.approx(float(dense.std()), rel=0.05)


def test_kaiming_router_is_uniform_within_one_over_sqrt_hidden():
    # nn.Linear's default init: U(-1/sqrt(H), 1/sqrt(H)); a wrong affine map shifts or scales the range.
    src, sd = _in_memory_source(0)
    _, out, _ = upcycle_state_dict(src, sd, UpcycleOptions(num_experts=8, top_k=2, router_init="kaiming"))
    w = torch.cat([out[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(3)])  # 3 x 8 x 64 draws
    bound = 1 / 64 ** 0.5
    assert float(w.abs().max()) <= bound
    assert float(w.min()) < -0.9 * bound and float(w.max()) > 0.9 * bound
    assert abs(float(w.mean())) < 0.1 * bound


def test_notes_say_what_is_not_function_preserving_and_why():
    src, sd = _in_memory_source(0)
    notes = lambda **kw: upcycle_state_dict(src, sd, UpcycleOptions(target="qwen2_moe", **kw))[2].notes  # noqa: E731
    nonorm = notes(num_experts=8, top_k=2, granularity=2, norm_topk_prob=False, router_init="zeros")
    assert any("E*G/K = 8;" in n and "exact with a zero router" in n for n in nonorm)
    assert any(n.startswith("zero router") for n in nonorm)
    plain = notes(num_experts=4, top_k=2)  # qwen2_moe: a shared expert, so a note about its 0.5 gate
    assert not any(n.startswith("zero router") for n in plain)
    assert any(n.startswith("shared expert") for n in plain)


# ---------------------------------------------------------------- the plan alone: config dicts and shapes, no files

def _config(kind: str, **changes) -> dict:
    """A tiny dense model's config as a full dict (every default filled in, as load_dense_config gives)."""
    T = transformers
    cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config, "qwen3": T.Qwen3Config}[kind]
    return cls(**{**COMMON, **changes}).to_dict()


def _plan(src: dict, **opts):
    shapes = {name: (shape, torch.float32) for name, shape in expected_source_tensors(src).items()}
    return plan_upcycle(src, shapes, UpcycleOptions(**{"num_experts": 4, "top_k": 2, **opts}))


def test_moe_layer_specs():
    assert parse_moe_layers("every-other", 6) == [1, 3, 5]
    assert parse_moe_layers("every-other", 7) == [1, 3, 5]
    assert parse_moe_layers(" 5, 0,5 ,", 6) == [0, 5]
    assert parse_moe_layers((4, 2), 6) == [2, 4]
    for spec, got in (("6", "[6]"), ([-1, 2], "[-1]"), (",", "none"), ((), "none")):
        with pytest.raises(ValueError, match=re.escape(f"layer ids must be in 0..5 and at least one; got {got}")):
            parse_moe_layers(spec, 6)
    for spec in ("1,x", "every-third"):
        with pytest.raises(ValueError, match=f"'{spec}' is not 'all', 'every-other' or a comma list"):
            parse_moe_layers(spec, 6)


def test_options_at_their_bounds():
    src = _config("llama")
    plan = _plan(src, num_experts=1, top_k=1)  # one expert, always picked: the dense MLP itself
    assert plan.config["num_local_experts"] == 1 and plan.config["num_experts_per_tok"] == 1
    assert plan.function_preserving
    one_layer = _plan(_config("mistral", num_hidden_layers=1, sliding_window=5))  # the smallest model
    assert one_layer.moe_layers == [0] and one_layer.config["sliding_window"] == 5
    for opts, message in [
        (dict(num_experts=0, top_k=1), "--num-experts (0) and --top-k (1) must be at least 1"),
        (dict(num_experts=2, top_k=0), "--num-experts (2) and --top-k (0) must be at least 1"),
        (dict(drop_ratio=1.0), "--drop-ratio 1.0 must be in [0, 1)"),
        (dict(drop_ratio=1.5), "--drop-ratio 1.5 must be in [0, 1)"),
        (dict(drop_ratio=-0.5), "--drop-ratio -0.5 must be in [0, 1)"),
        (dict(target="qwen3_moe", shared_expert=True),
         "--shared-expert needs --target qwen2_moe; target qwen3_moe has no shared expert"),
        (dict(granularity=0), "--granularity 0 must divide the dense intermediate size (128)"),
        (dict(granularity=2, num_experts=4, top_k=1), "--granularity 2 must divide the dense intermediate size (128), "
                                                      "--num-experts (4) and --top-k (1)"),
        (dict(granularity=2, num_experts=3, top_k=2), "--num-experts (3) and --top-k (2) so that top-k selects whole"),
        (dict(target="mixtral", norm_topk_prob=False), "Mixtral always renormalises the top-k weights"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            _plan(src, **opts)


@pytest.mark.parametrize("kind,changes,target,message", [
    ("llama", {"mlp_bias": True}, "qwen2_moe", "has MLP biases (mlp_bias=true)"),
    ("qwen3", {}, "qwen2_moe", "a qwen3 model has q_norm/k_norm, which target qwen2_moe lacks"),
    ("qwen3", {}, "mixtral", "a qwen3 model has q_norm/k_norm, which target mixtral lacks"),
    ("qwen2", {}, "mixtral", "a qwen2 model has q/k/v biases, which Mixtral attention lacks"),
    ("llama", {"attention_bias": True}, "mixtral", "attention biases (attention_bias=true) including o_proj's, "
                                                   "which target mixtral cannot hold"),
    ("llama", {"attention_bias": True}, "qwen2_moe", "which target qwen2_moe cannot hold"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, "qwen3_moe",
     "mixes sliding-window and full-attention layers; target qwen3_moe applies one window"),
])
def test_sources_a_target_cannot_hold_are_clear_errors(kind, changes, target, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _plan(_config(kind, **changes), target=target)


def test_qwen2_sliding_window_layers_carry_over():
    src = _config("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert src["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]
    cfg = _plan(src).config
    assert cfg["layer_types"] == src["layer_types"]
    assert cfg["sliding_window"] == 8 and cfg["use_sliding_window"] is True
    moe = transformers.Qwen2MoeConfig(**cfg)  # and transformers reads the same layers back
    assert moe.layer_types == src["layer_types"] and moe.sliding_window == 8
    # a config without layer_types (as older transformers wrote them): every layer has full attention
    old = {k: v for k, v in _config("qwen2").items() if k != "layer_types"}
    assert _plan(old).config["layer_types"] == ["full_attention"] * 3


def test_qwen3_moe_config_has_one_window_and_the_attention_biases():
    # qwen3_moe takes one window for every layer: none, or the one all layers share.
    full = _plan(_config("qwen3")).config
    assert full["use_sliding_window"] is False and full["sliding_window"] is None
    src = _config("qwen3", use_sliding_window=True, sliding_window=8, max_window_layers=0)
    assert set(src["layer_types"]) == {"sliding_attention"}
    sliding = _plan(src).config
    assert sliding["use_sliding_window"] is True and sliding["sliding_window"] == 8
    assert _plan(_config("qwen3", num_hidden_layers=1)).config["use_sliding_window"] is False  # one layer
    # and the attention biases qwen3_moe can hold; no Qwen2-MoE fields (shared expert, q/k/v biases)
    biased = _plan(_config("qwen3", attention_bias=True)).config
    assert biased["attention_bias"] is True and full["attention_bias"] is False
    assert not {"shared_expert_intermediate_size", "qkv_bias", "layer_types"} & set(biased)


def test_source_only_fields_are_not_carried_over():
    # Fields the targets lack (or set their own way) stay behind; the rest of the dense config comes along.
    src = _config("llama", pretraining_tp=2)
    for target in ("mixtral", "qwen2_moe"):
        cfg = _plan(src, target=target).config
        assert not {"mlp_bias", "pretraining_tp", "attention_bias"} & set(cfg), target
        assert cfg["rms_norm_eps"] == src["rms_norm_eps"] and cfg["rope_parameters"] == src["rope_parameters"]


def test_custom_labels_are_kept_and_the_default_pair_dropped():
    src = _config("llama")
    assert len(src["id2label"]) == 2  # transformers' default pair, LABEL_0 and LABEL_1
    cfg = _plan(src).config
    assert "id2label" not in cfg and "label2id" not in cfg
    for labels in (["yes"], ["neg", "pos"], ["red", "green", "blue"]):
        id2label, label2id = dict(enumerate(labels)), {name: i for i, name in enumerate(labels)}
        cfg = _plan({**src, "id2label": id2label, "label2id": label2id}).config
        assert cfg["id2label"] == id2label and cfg["label2id"] == label2id


@pytest.mark.parametrize("opts", [dict(target="mixtral"), dict(target="mixtral", granularity=2),
                                  dict(target="qwen2_moe", num_experts=8, norm_topk_prob=False),
                                  dict(target="qwen2_moe", drop_ratio=0.5), dict(target="qwen2_moe")],
                         ids=["plain", "granularity", "no-renormalisation", "drop", "shared"])
def test_outputs_marked_as_copies_are_their_source_byte_for_byte(opts):
    # A writer copies an output marked `copy_of` file to file without computing it; the mark must be
    # exact: set on every output equal to a source tensor (plain experts too), and on no other.
    src, sd = _in_memory_source(0)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
    plan = plan_upcycle(src, shapes, UpcycleOptions(**{"num_experts": 4, "top_k": 2, **opts}))
    for t in plan.tensors:
        made = t.make(sd.__getitem__)
        same = [k for k, v in sd.items() if v.shape == made.shape and torch.equal(v, made)]
        assert (t.copy_of is not None) == bool(same), t.name
        assert t.copy_of is None or t.copy_of in same, t.name
    experts = [t for t in plan.tensors if ".experts." in t.name]
    assert all(t.copy_of for t in experts) == (opts == dict(target="mixtral"))


def test_generators_differ_for_every_key():
    # Each (seed, tensor key) seeds its own random stream: 1000 keys, 1000 different seeds.
    seeds = {_generator(seed, "router", layer).initial_seed() for seed in range(5) for layer in range(200)}
    assert len(seeds) == 1000


def test_seeded_generators_are_the_same_in_every_version():
    # Golden values: the seed each (seed, key) derives and the first numbers drawn from it. Changing
    # them (the hash, the bytes it keeps, the mask) gives every user's seeded upcycle other weights
    # for the same --seed: a checkpoint can no longer be rebuilt from its recipe. Do not update them.
    golden = {(0, "router", 3): 5483752761391099197, (0, "drop", 1, 0, 1): 7365939258842604879,
              (7, "w", "up_proj", 2, 5): 32628318755077937}
    assert {key: _generator(*key).initial_seed() for key in golden} == golden
    drawn = torch.rand(3, generator=_generator(0, "router", 3), dtype=torch.float64).tolist()
    assert drawn == pytest.approx([0.5245398078472422, 0.4007386673439365, 0.5200973058050145], abs=1e-12)
    assert torch.randperm(16, generator=_generator(0, "drop", 1, 0, 1)).tolist() == \
        [4, 12, 13, 6, 5, 1, 15, 7, 11, 2, 8, 3, 14, 9, 10, 0]


def test_options_cannot_change_under_a_plan():
    # A plan computes its tensors later (`make`) from the options it was given, so they are frozen.
    opts = UpcycleOptions(num_experts=4, top_k=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.seed = 1


def test_in_memory_options_default_like_upcycle():
    # UpcycleOptions (upcycle_state_dict's options) and moesys.upcycle must give the same weights for the
    # same arguments, so their defaults (the seed above all) must agree.
    params = inspect.signature(moesys.upcycle).parameters
    defaults = {f.name: f.default for f in dataclasses.fields(UpcycleOptions) if f.default is not dataclasses.MISSING}
    assert defaults and defaults == {name: params[name].default for name in defaults}


@pytest.mark.parametrize("kind,changes", [("llama", {}), ("llama", {"attention_bias": True}),
                                          ("mistral", {"head_dim": 32}), ("qwen2", {}), ("qwen3", {}),
                                          ("qwen3", {"attention_bias": True}), ("qwen2", {"hidden_size": 66})])
def test_expected_source_tensors_are_what_transformers_builds(kind, changes):
    src = _config(kind, **changes)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**src))
    built = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert expected_source_tensors(src) == built


def test_source_tensor_checks_name_what_is_wrong():
    src = _config("llama")  # untied embeddings: lm_head is expected
    shapes = {name: (shape, torch.float32) for name, shape in expected_source_tensors(src).items()}
    shapes["lm_head.weight"] = ((96, 64), torch.float32)
    check_source_tensors(src, shapes)
    for name, shape, want in (("model.layers.1.mlp.up_proj.weight", (127, 64), (128, 64)),
                              ("model.layers.0.self_attn.o_proj.weight", (64, 65), (64, 64))):
        with pytest.raises(ValueError, match=re.escape(f"tensor {name} has shape {shape}, config.json implies {want}")):
            check_source_tensors(src, {**shapes, name: (shape, torch.float32)})
    untied = {k: v for k, v in shapes.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match=re.escape("lacks 1 tensor(s) its config needs, e.g. ['lm_head.weight']")):
        check_source_tensors(src, untied)
    check_source_tensors(_config("llama", tie_word_embeddings=True), untied)  # tied: the embedding serves
    extra = {**shapes, **{f"extra.{c}": ((1,), torch.float32) for c in "dcba"}}
    with pytest.raises(ValueError, match=re.escape("holds 4 tensor(s) a llama model does not have, "
                                                   "e.g. ['extra.a', 'extra.b', 'extra.c']; is config.json")):
        check_source_tensors(src, extra)
    lacking = {k: v for k, v in shapes.items() if not k.startswith("model.layers.2.self_attn.")}
    with pytest.raises(ValueError, match=re.escape(
            "lacks 4 tensor(s) its config needs, e.g. ['model.layers.2.self_attn.k_proj.weight', "
            "'model.layers.2.self_attn.o_proj.weight', 'model.layers.2.self_attn.q_proj.weight']")):
        check_source_tensors(src, lacking)

"""`model.hf_model` (transformers' own class, moesys experts) against transformers itself and against its own
runs: logits at load, training, bit-exact resume, the aux-loss-free bias, export back, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moesys.config import load_config
from moesys.models.hf_experts_layout import to_moesys
from tests._hf_model_helpers import OTHER_FAMILIES, deepseek_v3, gpt_oss, other_family, qwen3_moe, write_config
from tests._train_helpers import metrics


def _train(cfg_path, run_dir, *items, resume=False):
    from moesys.train import main
    args = ["--config", str(cfg_path), "--run-dir", str(run_dir)]
    for item in items:
        args += ["--set", item]
    return main(args + (["--resume"] if resume else []))


def _load(hf_dir, *items):
    from moesys.models.hf_source import load_hf_causal_lm, resolve_config
    config = resolve_config(load_config(None, [f"model.hf_model={hf_dir}", "moe.backend=loop", *items]))
    return config, load_hf_causal_lm(config)


@pytest.mark.parametrize("family", [deepseek_v3, qwen3_moe, gpt_oss])
def test_logits_and_gradients_equal_transformers(tmp_path, family):
    from transformers import AutoModelForCausalLM
    hf_dir = family(tmp_path / "src")
    config, model = _load(hf_dir)
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(ids, ids)
    ref_logits = ref(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-5, atol=1e-5)
    # Gradients of the experts agree too, in moe_mlp's layout (GPT-OSS's are transposed and interleaved).
    out.logits.square().mean().backward()
    ref_logits.square().mean().backward()
    holder = next(n for n, _ in ref.named_modules() if n.endswith(".mlp") and n in model.layouts)
    ref_experts = ref.get_submodule(holder + ".experts")
    want = to_moesys({n: p.grad for n, p in ref_experts.named_parameters()}, model.layouts[holder])
    for n, g in want.items():
        torch.testing.assert_close(model.hf.get_submodule(holder + ".experts").get_parameter(n).grad, g,
                                   rtol=1e-4, atol=1e-6)
    name = holder + ".experts.down_proj"
    # The config's shape keys come from the checkpoint; each block's load is counted.
    assert config.moe.num_experts == ref.get_parameter(name).shape[0] and config.model.vocab_size == 300
    assert [int(s.tokens_per_expert.sum()) for s in out.moe_stats] == [24 * config.moe.top_k] * len(out.moe_stats)


@pytest.mark.slow
@pytest.mark.parametrize("name", OTHER_FAMILIES)
def test_more_families_give_transformers_logits(tmp_path, name):
    from transformers import AutoModelForCausalLM
    hf_dir = other_family(name, tmp_path / "src")
    _, model = _load(hf_dir)
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids).logits, ref(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def test_qwen3_moe_uses_its_own_load_balancing_loss(tmp_path):
    from transformers import AutoModelForCausalLM
    hf_dir = qwen3_moe(tmp_path / "src")
    _, model = _load(hf_dir, "moe.aux_loss_coef=0.5")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    expected = ref(input_ids=ids, use_cache=False, output_router_logits=True).aux_loss
    assert model(ids, ids).aux_loss.item() == pytest.approx(0.5 * expected.item(), rel=1e-5)


def _train_resume_export(tmp_path, hf_dir, *items):
    """Train 5 steps (checkpoints at 2 and 4), resume from step 2, export; checks what every family shares.
    Returns the final checkpoint's tensors and the exported directory."""
    from transformers import AutoModelForCausalLM
    from moesys.checkpoint import merge_experts
    from moesys.export import export
    cfg = write_config(tmp_path / "hf.yaml", hf_dir, "checkpoint:", "  every: 2", "  keep: 3")
    assert _train(cfg, tmp_path / "run", "train.steps=5", *items) == 0
    full = metrics(tmp_path / "run")
    assert full[-1]["loss"] < full[0]["loss"] - 0.1

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed)
    for d in (resumed / "ckpt").iterdir():
        if d.name != "step_2":
            shutil.rmtree(d)
    assert _train(cfg, resumed, "train.steps=5", *items, resume=True) == 0
    again = metrics(resumed)
    assert [(r["loss"], r["grad_norm"]) for r in again] == [(r["loss"], r["grad_norm"]) for r in full]

    # Export: transformers' own directory and on-disk names, with the trained model's logits exactly.
    flat = load_file(str(tmp_path / "run" / "ckpt" / "step_5" / "model.safetensors"))
    out = export(tmp_path / "run", tmp_path / "exported")
    source_config = json.loads((hf_dir / "config.json").read_text())
    assert json.loads((out / "config.json").read_text())["architectures"] == source_config["architectures"]
    assert set(load_file(str(out / "model.safetensors"))) == set(load_file(str(hf_dir / "model.safetensors")))
    # Loaded back by moesys, the export holds the checkpoint's tensors bit for bit; transformers' own
    # class computes the trained model's logits (to fp32 rounding: its experts sum in another order).
    _, trained = _load(hf_dir)
    trained.load_state_dict(merge_experts(flat, trained.state_dict()))
    _, reloaded = _load(out)
    want = trained.state_dict()
    got = reloaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(v, want[k]) for k, v in got.items())
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(exported(input_ids=ids, use_cache=False).logits, trained(ids).logits,
                               rtol=1e-5, atol=1e-6)
    return flat, out, full


@pytest.mark.slow
def test_deepseek_v3_trains_resumes_bit_for_bit_and_exports(tmp_path):
    hf_dir = deepseek_v3(tmp_path / "src")
    flat, out, full = _train_resume_export(tmp_path, hf_dir, "moe.router.aux_free_bias=true",
                                           "moe.router.bias_update_rate=0.01")
    assert len(full[0]["expert_load_fraction"]) == 1 and len(full[0]["expert_load_fraction"][0]) == 8
    bias = flat["hf.model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.abs().max() > 0  # the aux-loss-free update moved DeepSeek-V3's selection bias
    on_disk = load_file(str(out / "model.safetensors"))
    assert torch.equal(on_disk["model.layers.1.mlp.experts.5.up_proj.weight"],
                       flat["hf.model.layers.1.mlp.experts.5.gate_up_proj"][16:])
    assert torch.equal(on_disk["model.layers.1.mlp.gate.e_score_correction_bias"], bias)


@pytest.mark.slow
def test_gpt_oss_trains_resumes_bit_for_bit_and_exports(tmp_path):
    """Biases, clamped SwiGLU, transposed interleaved experts (converted at load, converted back at export)."""
    flat, out, full = _train_resume_export(tmp_path, gpt_oss(tmp_path / "src"), "moe.aux_loss_coef=0.01")
    assert full[0]["aux_loss"] > 0  # GPT-OSS's own load-balancing loss
    on_disk = load_file(str(out / "model.safetensors"))
    ours_IH = flat["hf.model.layers.0.mlp.experts.1.gate_up_proj"]  # [gate; up] rows
    assert torch.equal(on_disk["model.layers.0.mlp.experts.gate_up_proj"][1][:, 1::2], ours_IH[16:].T)


def _export_untrained(tmp_path, hf_dir, **kwargs):
    """Load `hf_dir`, save its state as a step-0 checkpoint (no training step), export it."""
    from moesys import checkpoint as ckpt
    from moesys.export import export
    config, model = _load(hf_dir)
    step = tmp_path / "untrained" / "ckpt" / "step_0"
    step.mkdir(parents=True, exist_ok=True)
    save_file(ckpt._contiguous(ckpt.split_experts(model.state_dict())), str(step / "model.safetensors"))
    (step / "manifest.json").write_text(json.dumps({"format_version": ckpt.FORMAT_VERSION, "step": 0,
                                                    "config": config.model_dump(mode="json")}))
    return export(tmp_path / "untrained", tmp_path / "exported_untrained", force=True, **kwargs)


@pytest.mark.parametrize("family", [deepseek_v3, gpt_oss])
def test_export_of_an_untrained_checkpoint_reproduces_every_tensor(tmp_path, family):
    hf_dir = family(tmp_path / "src")
    out = _export_untrained(tmp_path, hf_dir)
    src, back = load_file(str(hf_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(src) == set(back)
    for k in src:
        assert torch.equal(src[k], back[k]), k


def test_bad_directories_fail_before_any_weight_is_read(tmp_path):
    from moesys.models.hf_source import resolve_config
    from transformers import LlamaConfig, LlamaForCausalLM

    def resolve(d, *items):
        return resolve_config(load_config(None, [f"model.hf_model={d}", *items]))

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        resolve(tmp_path / "empty")
    src = deepseek_v3(tmp_path / "src")
    pickled = tmp_path / "pickled"
    shutil.copytree(src, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only pickled weights \(pytorch_model.bin\)"):
        resolve(pickled)
    remote = tmp_path / "remote"
    shutil.copytree(src, remote)
    raw = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps(raw | {"auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    with pytest.raises(ValueError, match="auto_map"):
        resolve(remote)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="no experts module"):
        resolve(tmp_path / "dense")
    with pytest.raises(ValueError, match=r"moe.num_experts=4 contradicts .* gives 8"):
        resolve(src, "moe.num_experts=4")
    with pytest.raises(ValueError, match=r"moe.shared_ffn_size=16 has no effect"):
        resolve(src, "moe.shared_ffn_size=16")


def test_tensors_that_do_not_match_the_config_are_named(tmp_path):
    from moesys.models.hf_source import load_hf_causal_lm, resolve_config
    src = deepseek_v3(tmp_path / "src")
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.3.down_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    config = resolve_config(load_config(None, [f"model.hf_model={src}"]))
    with pytest.raises(ValueError, match=r"mismatched_keys: 1, the first .*model.layers.1.mlp.experts.down_proj"):
        load_hf_causal_lm(config)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing_keys: 1, the first model.layers.0.mlp.up_proj.weight"):
        load_hf_causal_lm(config)


def _plain_and_with(tmp_path, steps, *items):
    """The metrics of a tiny DeepSeek-V3 hf_model run, plain and with `items` set."""
    cfg = write_config(tmp_path / "hf.yaml", deepseek_v3(tmp_path / "src"))
    assert _train(cfg, tmp_path / "plain", f"train.steps={steps}") == 0
    assert _train(cfg, tmp_path / "with", f"train.steps={steps}", *items) == 0
    return metrics(tmp_path / "plain"), metrics(tmp_path / "with")


def test_activation_checkpointing_keeps_the_losses(tmp_path):
    plain, recomputed = _plain_and_with(tmp_path, 2, "train.activation_checkpointing=true")
    assert [(r["loss"], r["grad_norm"], r["expert_load_fraction"]) for r in recomputed] == \
        [(r["loss"], r["grad_norm"], r["expert_load_fraction"]) for r in plain]


def test_the_checkpoint_tokenizer_is_the_default_and_is_exported(tmp_path):
    from moesys.models.hf_source import resolve_config
    src = deepseek_v3(tmp_path / "src")
    (src / "tokenizer.json").write_text('{"stand-in": "copied byte for byte"}')
    assert resolve_config(load_config(None, [f"model.hf_model={src}"])).data.tokenizer == str(src)
    other = tmp_path / "other_tokenizer"
    chosen = resolve_config(load_config(None, [f"model.hf_model={src}", f"data.tokenizer={other}"]))
    assert chosen.data.tokenizer == str(other)
    with pytest.raises(ValueError, match="exports as its source's class"):
        _export_untrained(tmp_path, src, arch="mixtral")
    out = _export_untrained(tmp_path, src)
    assert (out / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()


@pytest.mark.slow
def test_compiled_run_gives_the_eager_losses(tmp_path):
    eager, compiled = _plain_and_with(tmp_path, 3, "train.compile=true")
    assert len(compiled) == len(eager) == 3
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_compile_parts_compiles_each_decoder_layer(tmp_path):
    _, model = _load(deepseek_v3(tmp_path / "src"))
    model.compile_parts()
    assert all(layer._compiled_call_impl is not None for layer in model.blocks)
    _, whole = _load(tmp_path / "src")
    whole.compile_parts(scope="model")
    assert whole.hf._compiled_call_impl is not None

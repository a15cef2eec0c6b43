"""Checks `model.init_from` against transformers: step-0 fp32 logits of tiny random Mixtral, Qwen2-MoE,
Qwen3-MoE and OLMoE checkpoints equal transformers' own model's; config contradictions and bad
checkpoints fail before any weight is read, naming the key or tensor."""

import json
import shutil

import pytest
import torch

from moesys.config import load_config
from moesys.hf.load import CountingReader, load_init_weights
from moesys.hf.resolve import resolve_init_from
from moesys.models.transformer import MoETransformer
from tests._init_from_helpers import FAMILIES, hf_logits, moesys_model, save_hf_model


def _ids(seq: int = 13, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_step0_logits_equal_transformers(tmp_path, family):
    model_dir = save_hf_model(family, tmp_path / family)
    model, config = moesys_model(model_dir)
    ids = _ids()
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, hf_logits(model_dir, ids), rtol=1e-5, atol=1e-5)


def test_features_reach_the_config(tmp_path):
    """The features the families exercise land in the moesys config (so parity above tests them)."""
    _, q2 = moesys_model(save_hf_model("qwen2_moe", tmp_path / "q2"))
    assert (q2.model.qkv_bias, q2.moe.shared_gate, q2.moe.dense_layers) == (True, True, [1])
    assert (q2.model.sliding_window, q2.model.sliding_layers) == (4, [0])  # Qwen2's layer_types below max_window_layers
    _, q3 = moesys_model(save_hf_model("qwen3_moe", tmp_path / "q3"))
    assert (q3.moe.first_dense, q3.moe.every, q3.model.o_bias, q3.model.tie_embeddings) == (1, 2, True, True)
    _, ol = moesys_model(save_hf_model("olmoe", tmp_path / "ol"))
    assert (ol.model.qk_norm, ol.model.qk_norm_span) == (True, "all")


def test_contradicting_key_names_both_values(tmp_path):
    model_dir = save_hf_model("mixtral", tmp_path / "m")
    with pytest.raises(ValueError, match=r"model.hidden_size=64 contradicts .*config.json hidden_size=32"):
        resolve_init_from(load_config(None, [f"model.init_from={model_dir}", "model.hidden_size=64"]))
    with pytest.raises(ValueError, match=r"moe.num_experts=8 contradicts .*num_local_experts=4"):
        resolve_init_from(load_config(None, [f"model.init_from={model_dir}", "moe.num_experts=8"]))
    agreeing = resolve_init_from(load_config(None, [f"model.init_from={model_dir}", "model.hidden_size=32"]))
    assert agreeing.model.hidden_size == 32


class _NoReads(CountingReader):
    def __call__(self, name):
        raise AssertionError(f"read {name} before the checks")


def _load_fails(model_dir, match):
    """The error comes from resolving the config, which reads config.json and the safetensors headers only."""
    with pytest.raises(ValueError, match=match):
        resolve_init_from(load_config(None, [f"model.init_from={model_dir}"]))


def test_bad_directories(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_init_from(load_config(None, [f"model.init_from={tmp_path}"]))
    with pytest.raises(ValueError, match="is not a directory"):
        resolve_init_from(load_config(None, [f"model.init_from={tmp_path / 'nope'}"]))
    model_dir = save_hf_model("mixtral", tmp_path / "m")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(model_dir / "config.json", pickled / "config.json")
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    _load_fails(pickled, "only pickle")


def test_unsupported_architecture_and_features(tmp_path):
    model_dir = save_hf_model("mixtral", tmp_path / "m")
    cfg = json.loads((model_dir / "config.json").read_text())
    for key, value, match in (("model_type", "deepseek_v3", "model_type='deepseek_v3' is not supported"),
                              ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
                               "rope_type='yarn'"),
                              ("hidden_act", "relu", "hidden_act='relu'"),
                              ("router_jitter_noise", 0.1, "router_jitter_noise=0.1")):
        bad = tmp_path / f"bad_{key}"
        shutil.copytree(model_dir, bad)
        (bad / "config.json").write_text(json.dumps({**cfg, key: value}))
        _load_fails(bad, match)


def test_tensors_not_matching_the_config_are_named(tmp_path):
    from safetensors.torch import load_file, save_file
    model_dir = save_hf_model("qwen2_moe", tmp_path / "q")
    tensors = load_file(str(model_dir / "model.safetensors"))
    name = "model.layers.2.mlp.experts.3.up_proj.weight"
    for label, change, match in (
            ("missing", lambda t: t.pop(name), f"tensor {name} is missing"),
            ("shape", lambda t: t.__setitem__(name, t[name][:5]), f"tensor {name} has shape \\[5, 32\\]"),
            ("extra", lambda t: t.__setitem__("model.layers.0.mlp.experts.9.up_proj.weight", t[name].clone()),
             "tensor model.layers.0.mlp.experts.9.up_proj.weight matches nothing")):
        bad = tmp_path / label
        shutil.copytree(model_dir, bad)
        t = dict(tensors)
        change(t)
        save_file(t, str(bad / "model.safetensors"))
        _load_fails(bad, match)
        config = load_config(None, [f"model.init_from={model_dir}"])
        config = resolve_init_from(config)
        config.model.init_from = str(bad)
        with pytest.raises(ValueError, match=match):
            load_init_weights(MoETransformer.from_config(config), config, reader=_NoReads({}))


def test_sharded_index_checkpoint_loads(tmp_path):
    """A checkpoint split over several files by model.safetensors.index.json loads the same weights."""
    from transformers import AutoModelForCausalLM
    model_dir = save_hf_model("olmoe", tmp_path / "one")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    one, _ = moesys_model(model_dir)
    sharded, _ = moesys_model(tmp_path / "sharded")
    for (k, a), (_, b) in zip(one.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), k


def test_text_data_defaults_to_the_checkpoints_tokenizer(tmp_path):
    from moesys.hf.tokenizer import save_byte_tokenizer
    bare = save_hf_model("mixtral", tmp_path / "bare")
    assert resolve_init_from(load_config(None, [f"model.init_from={bare}"])).data.tokenizer is None  # bytes
    with_tok = save_hf_model("mixtral", tmp_path / "tok")
    save_byte_tokenizer(with_tok)
    assert resolve_init_from(load_config(None, [f"model.init_from={with_tok}"])).data.tokenizer == str(with_tok)
    explicit = resolve_init_from(load_config(None, [f"model.init_from={with_tok}", "data.tokenizer=null"]))
    assert explicit.data.tokenizer is None  # the user's explicit choice stands


def test_trainer_reports_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    from tests._init_from_helpers import train_from
    assert train_from(tmp_path / "run", tmp_path, "train.steps=1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no config.json" in err[0]
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.slow
def test_resume_continues_an_init_from_run_exactly(tmp_path):
    from tests._init_from_helpers import train_from
    from tests._train_helpers import metrics
    source = save_hf_model("qwen2_moe", tmp_path / "src", vocab_size=256)
    items = ("train.steps=3", "checkpoint.every=1", "checkpoint.keep=3", "log.every=1", "log.val_every=0",
             "data.batch_size=2", "train.lr=1e-3")
    assert train_from(tmp_path / "a", source, *items) == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "ckpt" / "step_3")
    assert train_from(tmp_path / "b", source, *items, resume=True) == 0
    assert [r["loss"] for r in metrics(tmp_path / "b")] == [r["loss"] for r in metrics(tmp_path / "a")]

"""Checks `moesys export` against transformers: the exported Mixtral / Qwen3-MoE directory loads with
AutoModelForCausalLM and gives the logits of our model; features HF lacks are refused by name."""

import json
import random

import pytest
import torch

from moesys import cli
from moesys.checkpoint import latest_checkpoint, load_checkpoint
from moesys.config import load_config
from moesys.export import export
from moesys.models.transformer import MoETransformer
from tests._init_from_helpers import save_hf_model, train_from
from tests._train_helpers import TINY, train_inproc

CASES = {
    "mixtral": (),
    "qwen3_moe": ("model.qk_norm=true", "moe.first_dense=1", "moe.router.renormalize=false",
                  "model.tie_embeddings=true", "model.head_dim=32"),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(CASES))
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, arch, capsys):
    from transformers import AutoModelForCausalLM
    items = ("train.steps=3", "model.num_layers=3", *CASES[arch])
    assert train_inproc(tmp_path / "run", *items) == 0
    if arch == "mixtral":  # through the command line: `moesys export RUN_DIR OUT_DIR`
        out = tmp_path / "hf"
        assert cli.main(["export", str(tmp_path / "run"), str(out)]) == 0
        assert f"wrote {out}" in capsys.readouterr().out
        assert cli.main(["export", str(tmp_path / "run"), str(out)]) == 2  # no silent overwrite
        assert "--force" in capsys.readouterr().err
        assert cli.main(["export", str(tmp_path / "run"), str(out), "--force", "--arch", "mixtral"]) == 0
    else:
        out = export(tmp_path / "run", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[arch]

    config = load_config(TINY, list(items))
    ours = MoETransformer.from_config(config)
    load_checkpoint(latest_checkpoint(tmp_path / "run" / "ckpt"), model=ours, optimizer=None, rank=0,
                    device=torch.device("cpu"))
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours.eval()(ids).logits
        got = hf(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_features_without_hf_equivalent_are_named(tmp_path, capsys):
    assert train_inproc(tmp_path / "run", "train.steps=1", "moe.router.score_func=sigmoid",
                        "moe.router.aux_free_bias=true") == 0
    with pytest.raises(ValueError, match="score_func='sigmoid'.*aux_free_bias"):
        export(tmp_path / "run", tmp_path / "hf")
    with pytest.raises(ValueError, match="qk_norm=false"):
        export(tmp_path / "run", tmp_path / "hf", arch="qwen3_moe")
    assert cli.main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    assert "moesys export: error:" in capsys.readouterr().err and not (tmp_path / "hf").exists()


# ---- runs started from a Hugging Face checkpoint (model.init_from) ----------------------------------

def _read_all(model_dir):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("family,dtype", [pytest.param("mixtral", torch.float32, marks=pytest.mark.slow),
                                          ("qwen2_moe", torch.bfloat16),
                                          pytest.param("qwen3_moe", torch.float32, marks=pytest.mark.slow),
                                          pytest.param("olmoe", torch.float32, marks=pytest.mark.slow)])
def test_import_then_export_gives_back_every_tensor_bit_for_bit(tmp_path, family, dtype):
    """A step at lr=0 changes no weight; what export writes is then the source, tensor for tensor and
    bit for bit, in the source's family, dtype and config."""
    source = save_hf_model(family, tmp_path / "src", dtype=dtype, vocab_size=256)
    assert train_from(tmp_path / "run", source, "train.steps=1", "train.lr=0") == 0
    out = export(tmp_path / "run", tmp_path / "hf")
    want, got = _read_all(source), _read_all(out)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert (out / "config.json").read_text() == (source / "config.json").read_text()
    assert (out / "generation_config.json").is_file()


@pytest.mark.slow
def test_export_copies_the_source_tokenizer_which_the_run_used(tmp_path):
    from moesys.hf.tokenizer import save_byte_tokenizer
    source = save_hf_model("mixtral", tmp_path / "src", vocab_size=256)
    save_byte_tokenizer(source)  # the checkpoint's own tokenizer
    assert train_from(tmp_path / "run", source, "train.steps=1") == 0
    assert load_config(tmp_path / "run" / "config.yaml").data.tokenizer == str(source)
    out = export(tmp_path / "run", tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()


@pytest.mark.parametrize("init_from", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_byte_runs_export_a_byte_tokenizer_that_round_trips_text(tmp_path, init_from):
    from transformers import AutoTokenizer
    if init_from:
        source = save_hf_model("olmoe", tmp_path / "src", vocab_size=256)
        assert train_from(tmp_path / "run", source, "train.steps=1") == 0
    else:
        assert train_inproc(tmp_path / "run", "train.steps=1") == 0
    tok = AutoTokenizer.from_pretrained(export(tmp_path / "run", tmp_path / "hf"))
    text = "def f(x):\n\treturn x  # héllo wörld €\n"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # the ids the run trained on (moesys.data's bytes)
    assert tok.decode(ids) == text


def test_a_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, capsys):
    """Verified as `train --resume` verifies it (the manifest's SHA-256), then by its safetensors header when
    the manifest predates checksums; neither way a safetensors traceback, and nothing written."""
    assert train_inproc(tmp_path / "run", "train.steps=1") == 0
    capsys.readouterr()
    step = latest_checkpoint(tmp_path / "run" / "ckpt")
    model = step / "model.safetensors"
    model.write_bytes(random.Random(0).randbytes(model.stat().st_size))  # same size: only the digest tells
    argv = ["export", str(tmp_path / "run"), str(tmp_path / "hf")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moesys export: error: {model} does not match the SHA-256"), err
    assert err.count("\n") == 1 and "export an intact checkpoint" in err
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"] = list(manifest["files"])  # a manifest from before checksums: names only
    (step / "manifest.json").write_text(json.dumps(manifest))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moesys export: error: {model} is not a readable safetensors file"), err
    assert err.count("\n") == 1 and "export an intact checkpoint" in err
    assert not (tmp_path / "hf").exists()

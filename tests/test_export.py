"""Checks `moesys export` against transformers: the exported Mixtral / Qwen3-MoE directory loads with
AutoModelForCausalLM and gives the logits of our model; features HF lacks are refused by name."""

import pytest
import torch

from moesys import cli
from moesys.checkpoint import latest_checkpoint, load_checkpoint
from moesys.config import load_config
from moesys.export import export
from moesys.models.transformer import MoETransformer
from tests._train_helpers import TINY, train_inproc

CASES = {
    "mixtral": (),
    "qwen3_moe": ("model.qk_norm=true", "moe.first_dense=1", "moe.router.renormalize=false",
                  "model.tie_embeddings=true", "model.head_dim=32"),
}


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

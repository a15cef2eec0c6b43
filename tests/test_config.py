"""Config tree: YAML loading, --set overrides, and errors that name the key, the file and the nearest valid key."""

from pathlib import Path

import pytest

from moesys.config import Config, ConfigError, load_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_tiny_loads_and_overrides_are_typed():
    cfg = load_config(TINY, ["train.steps=7", "moe.capacity_factor=1.25", "train.lr=1e-4",
                                            "moe.router.score_func=sigmoid"])
    assert cfg.train.steps == 7 and cfg.moe.capacity_factor == 1.25 and cfg.train.lr == 1e-4
    assert cfg.moe.router.score_func == "sigmoid" and cfg.model.vocab_size == 256
    assert isinstance(load_config(), Config)


def test_unknown_key_in_file_names_file_key_and_nearest(tmp_path):
    p = write(tmp_path, "moe:\n  num_expert: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "'moe.num_expert'" in str(e.value) and "'moe.num_experts'" in str(e.value)


def test_unknown_section_and_nested_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trian'; did you mean 'train'"):
        load_config(write(tmp_path, "trian:\n  steps: 3\n"))
    with pytest.raises(ConfigError, match="'moe.router.scor_func'; did you mean 'moe.router.score_func'"):
        load_config(write(tmp_path, "moe:\n  router:\n    scor_func: softmax\n"))


def test_bad_override():
    with pytest.raises(ConfigError, match="--set train.step=3: unknown key 'train.step'; did you mean 'train.steps'"):
        load_config(TINY, ["train.step=3"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.steps"])


def test_wrong_type_names_key_and_file(tmp_path):
    p = write(tmp_path, "train:\n  steps: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "train.steps" in str(e.value) and str(p) in str(e.value) and "'many'" in str(e.value)
    with pytest.raises(ConfigError, match="moe.router.score_func"):
        load_config(None, ["moe.router.score_func=tanh"])


def test_cross_field_checks(tmp_path):
    with pytest.raises(ConfigError, match="top_k=9 must be between 1 and num_experts=4"):
        load_config(TINY, ["moe.top_k=9"])
    with pytest.raises(ConfigError, match="num_heads=4 must be a multiple of num_kv_heads=3"):
        load_config(TINY, ["model.num_kv_heads=3"])
    # refused when the config is read, before any data or weight: 0 would zero every MoE layer's output
    for item, key in (("moe.router.scale=0", "moe.router.scale"), ("moe.router.scale=-2", "moe.router.scale"),
                      ("moe.router.bias_update_rate=-1", "moe.router.bias_update_rate"),
                      ("moe.router.jitter=1", "moe.router.jitter")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(TINY, [item])
    assert load_config(TINY, ["moe.router.scale=2.5"]).moe.router.scale == 2.5


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "model: 3\n"))


@pytest.mark.parametrize("path", sorted(TINY.parent.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    """A shipped config that fails validation is a broken quick start: each must load as it is."""
    cfg = load_config(path)
    assert cfg.model.num_layers > 0 and cfg.moe.num_experts >= cfg.moe.top_k

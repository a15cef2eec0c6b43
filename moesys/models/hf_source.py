"""Reading a `model.hf_model` directory: checks before any weight is read, the config it implies, loading.

- `check_hf_dir`: a directory with config.json and safetensors weights (pickled `.bin`/`.pt` weights
  are refused, as is remote code: `auto_map` in config.json or an architecture transformers lacks).
- `resolve_config`: the moesys config with `model.*` / `moe.*` shape keys taken from the checkpoint
  (an explicitly set key that disagrees is an error naming both values; keys with no meaning for a
  transformers class are refused when set to anything but their default), and the checkpoint's tokenizer as the default tokenizer.
  The experts' shapes come from the class built on the meta device, so no weight is read.
- `load_hf_causal_lm`: every weight in `train.param_dtype` (safetensors only), every tensor name and shape checked
  against the class first, wrapped in `HFCausalLM`; `moesys.hf.hf_model_load` reads the tensors the way
  transformers' from_pretrained converts them, and under EP/FSSDP only each rank's experts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moesys.config import Config
from moesys.hub import resolve_model_dir
from moesys.models.hf_causal_lm import HFCausalLM, decoder_layers
from moesys.models.hf_experts_layout import experts_spec, find_hf_experts

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# Keys a user may set with model.hf_model: where the trainer reads them, not the architecture.
_FREE_KEYS = {"model": {"hf_model", "init_from", "init_std", "max_seq_len"},
              "moe": {"backend", "aux_loss_coef", "router"},
              "moe.router": {"aux_free_bias", "bias_update_rate"}}


def check_hf_dir(path: str | Path) -> Path:
    """The checkpoint directory, or a ValueError saying what is wrong with it (reads no weights)."""
    d = Path(path)
    if not d.is_dir():
        raise ValueError(f"model.hf_model={str(path)!r} is not a directory; give a transformers checkpoint directory")
    if not (d / "config.json").is_file():
        raise ValueError(f"model.hf_model={str(path)!r} has no config.json; it is not a transformers checkpoint")
    safetensors = sorted(d.glob("*.safetensors"))
    pickled = sorted(p.name for p in d.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if not safetensors:
        what = f"only pickled weights ({', '.join(pickled)})" if pickled else "no *.safetensors weights"
        raise ValueError(f"model.hf_model={str(path)!r} has {what}; moesys reads safetensors only (convert with "
                         "transformers: from_pretrained(...).save_pretrained(dir, safe_serialization=True))")
    raw = json.loads((d / "config.json").read_text())
    if "auto_map" in raw:
        raise ValueError(f"model.hf_model={str(path)!r}: config.json has auto_map (custom modeling code); moesys "
                         "never runs remote code, use an architecture built into transformers")
    return d


def hf_config(path: str | Path):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    d = check_hf_dir(path)
    try:
        cfg = AutoConfig.from_pretrained(d, trust_remote_code=False)
    except (ValueError, KeyError) as e:
        raise ValueError(f"model.hf_model={str(path)!r}: transformers cannot read its config.json ({e})") from None
    if type(cfg) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"model.hf_model={str(path)!r}: model_type {cfg.model_type!r} has no causal-LM class in "
                         "transformers; use a decoder-only MoE checkpoint")
    return cfg


def describe(path: str | Path) -> dict:
    """Shape facts of the checkpoint's class: built on the meta device, so no weight is read and an
    unsupported experts class fails here."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    found = find_hf_experts(model)
    if not found:
        raise ValueError(f"model.hf_model={str(path)!r}: {type(model).__name__} has no experts module of "
                         "transformers' experts interface, so it is not an MoE model moesys can train this way")
    sizes = set()
    for _, _, module in found:
        layout, _ = experts_spec(module)
        E = module.down_proj.shape[0]
        ffn = module.down_proj.shape[1 if layout.is_transposed else 2]
        sizes.add((E, ffn))
    if len(sizes) != 1:
        raise ValueError(f"model.hf_model={str(path)!r}: MoE blocks of different sizes {sorted(sizes)}; the trainer "
                         "needs one (num_experts, ffn_size) for all of them")
    (E, ffn), = sizes
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    model_keys = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
                  "num_layers": cfg.num_hidden_layers, "num_heads": heads,
                  "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or heads, "head_dim": head_dim,
                  "tie_embeddings": bool(getattr(cfg, "tie_word_embeddings", False))}
    moe_keys = {"num_experts": E, "top_k": cfg.num_experts_per_tok, "ffn_size": ffn}
    return {"model": model_keys, "moe": moe_keys, "moe_layers": len(found), "meta_model": model}


def _explicit(section, prefix: str) -> dict:
    """{dotted key: value} of the keys set explicitly (by the file or --set) in a config section."""
    out = {}
    for key in section.model_fields_set:
        value = getattr(section, key)
        if hasattr(value, "model_fields_set"):
            out.update(_explicit(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _default(key: str):
    node = Config()
    for part in key.split("."):
        node = getattr(node, part)
    return node


def resolve_config(config: Config) -> Config:
    """The config a `model.hf_model` run trains with (module docstring); ValueError on a contradiction."""
    path = config.model.hf_model
    local = str(resolve_model_dir(path, what="model.hf_model"))  # a hub id: its cached snapshot
    if local != path:
        config = config.model_copy(deep=True)
        config.model.hf_model = path = local
    facts = describe(path)
    derived = {f"model.{k}": v for k, v in facts["model"].items()} | {f"moe.{k}": v for k, v in facts["moe"].items()}
    explicit = _explicit(config.model, "model.") | _explicit(config.moe, "moe.")
    for key, value in sorted(explicit.items()):
        section, _, name = key.rpartition(".")
        if key in derived:
            if value != derived[key]:
                raise ValueError(f"{key}={value!r} contradicts the checkpoint model.hf_model={path!r}, whose config "
                                 f"gives {derived[key]!r}; remove the key (the checkpoint decides it)")
        elif name not in _FREE_KEYS.get(section, ()) and value != _default(key):
            raise ValueError(f"{key}={value!r} has no effect with model.hf_model (the checkpoint's transformers "
                             "class decides its architecture); remove the key")
    if config.train.activation_checkpointing or (config.train.compile and config.train.compile_scope == "blocks"):
        decoder_layers(facts["meta_model"])  # the layers it wraps must exist
    raw = config.model_dump(mode="json")
    for key, value in derived.items():
        section, name = key.split(".")
        raw[section][name] = value
    d = Path(path)
    if raw["data"]["tokenizer"] is None and any((d / f).is_file() for f in _TOKENIZER_FILES):
        raw["data"]["tokenizer"] = str(d)
    return Config.model_validate(raw)


def fp32_strict_names(model) -> tuple[str, ...]:
    """The class's `_keep_in_fp32_modules_strict`: name parts of the tensors that transformers keeps in fp32
    in a bf16 or fp16 model too (DeepSeek-V3: `gate.weight`, `e_score_correction_bias`)."""
    return tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())


def load_hf_causal_lm(config: Config, device: torch.device | str = "cpu") -> HFCausalLM:
    """The checkpoint's transformers class with all its weights (`train.param_dtype`) and moesys experts, on `device`
    (one process; under EP/FSSDP the trainer reads each rank's experts after `parallelize`: moesys.hf.hf_model_load)."""
    from moesys.hf.hf_model_load import HFModelLoader

    loader = HFModelLoader(config)
    model = loader.build(device)
    loader.load_experts(model)
    return model

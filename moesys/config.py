"""The typed config tree (model, moe, parallel, data, train, checkpoint, log): YAML loading and
`--set a.b=c` overrides.

Every key is typed and validated by pydantic; an unknown key fails naming the key, the file (or
`--set`) and the nearest valid key, before anything else runs.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or override is wrong; the message says where and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None          # default hidden_size // num_heads
    ffn_size: int = 128                     # the dense MLP's intermediate size (dense layers)
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qk_norm: bool = False                   # RMSNorm on per-head queries and keys (Qwen3, OLMoE)
    tie_embeddings: bool = False
    init_std: float = 0.02
    # A transformers v5 checkpoint directory trained as transformers' own class with moesys experts
    # (moesys.models.hf_source); its config.json decides the architecture.
    hf_model: Optional[str] = None

    @model_validator(mode="after")
    def _check(self):
        if self.hf_model is not None and getattr(self, "init_from", None) is not None:
            raise ValueError(f"model.hf_model={self.hf_model!r} and model.init_from={self.init_from!r} both name a "
                             "checkpoint; set one (init_from: the moesys model, hf_model: transformers' class)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                             "set model.head_dim")
        return self


class RouterConfig(_Section):
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = True
    n_groups: int = 1
    topk_groups: Optional[int] = None
    aux_free_bias: bool = False
    bias_update_rate: float = 1e-3
    scale: float = 1.0
    jitter: float = 0.0


class MoEConfig(_Section):
    num_experts: int = 8
    top_k: int = 2
    ffn_size: int = 64
    activation: Literal["silu", "gelu_tanh", "gelu", "relu"] = "silu"
    expert_bias: bool = False
    shared_ffn_size: int = 0                # 0 = no shared expert
    shared_gate: bool = False               # Qwen2-MoE's sigmoid gate on the shared expert
    every: int = 1                          # sparse step: every n-th layer (after first_dense) is MoE
    first_dense: int = 0                    # leading dense layers (DeepSeek)
    capacity_factor: Optional[float] = None  # None = dropless
    backend: Literal["auto", "loop", "grouped_mm", "triton"] = "auto"
    aux_loss_coef: float = 0.01
    seq_aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    router: RouterConfig = RouterConfig()

    @model_validator(mode="after")
    def _check(self):
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if self.every < 1:
            raise ValueError(f"every={self.every} must be >= 1")
        return self

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_dense and (layer - self.first_dense) % self.every == 0


class FSSDPConfig(_Section):
    """Fully Sharded Sparse Data Parallelism (parallel.expert_sharding: fssdp | fsdp)."""
    rematerialize: bool = False             # free gathered experts after forward, gather again in backward
    reshard_every: int = 100                # re-plan expert ownership every N steps (0 = never)
    window: int = 5                         # steps of load history the plan predicts from
    gather_budget: Union[int, Literal["auto"], None] = "auto"  # experts received per layer and step; auto:
                                            # what the preceding attention hides at bandwidth_gbs; None: all
    memory_cap: Optional[int] = None        # extra expert copies a rank may hold per layer (None: no cap)
    bandwidth_gbs: float = 100.0            # point-to-point bandwidth assumed by gather_budget=auto
    prefetch: bool = True                   # start each layer's gather before its block's attention


class ParallelConfig(_Section):
    ep: int = 1                                        # expert-parallel degree; divides the world size
    # How experts are spread over ranks: "ep" = all-to-all expert parallelism over parallel.ep ranks;
    # "fssdp" = experts sharded over all ranks and materialised where their tokens are (Hecate);
    # "fsdp" = the same executor with every expert materialised on every rank (FSDP over experts).
    expert_sharding: Literal["ep", "fssdp", "fsdp"] = "ep"
    fssdp: FSSDPConfig = FSSDPConfig()
    ep_overlap: bool = True                 # run the shared expert while EP tokens are in flight
    timeout_s: float = 600.0                # collective timeout: a dead or stuck rank fails the job

    @model_validator(mode="after")
    def _check(self):
        if self.expert_sharding != "ep" and self.ep != 1:
            raise ValueError(f"expert_sharding={self.expert_sharding!r} shards experts over all ranks; "
                             f"leave parallel.ep at 1 (got {self.ep})")
        return self


class DataConfig(_Section):
    source: str = "stdlib"                  # "stdlib" (the Python standard library's sources) or a path
    tokenizer: Optional[str] = None         # local HF tokenizer directory; None = bytes
    seq_len: int = 64
    batch_size: int = 4                     # sequences per micro-batch per data-parallel rank
    val_fraction: float = 0.02
    text_field: str = "text"                # the JSONL field / parquet column holding the text
    max_tokens: Optional[int] = 8_000_000   # cap on the corpus read (tokens); None = all of it
    val_batches: int = 4                    # micro-batches per rank in each validation-loss evaluation


class TrainConfig(_Section):
    steps: int = 20
    seed: int = 0
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 2
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0)     # max global gradient norm (clipping is always on)
    grad_accum: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"   # auto: bf16 autocast on GPU, fp32 on CPU
    compile: bool = False
    # torch.compile mode for the blocks and head: "reduce-overhead" replays each compiled part as a CUDA
    # graph (fewer host launches; more memory for the graphs' private pools)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    # "blocks": each block and the head compiled apart (one graph serves every layer, quick to compile);
    # "model": the whole forward as one graph (fusion across blocks; compiles every layer)
    compile_scope: Literal["blocks", "model"] = "blocks"
    activation_checkpointing: bool = False
    eps: float = 1e-8                       # AdamW epsilon


class CheckpointConfig(_Section):
    every: int = 0                          # 0 = only at the end
    keep: int = 2
    save_final: bool = True                 # also save after the last step


class LogConfig(_Section):
    every: int = 1
    tensorboard: bool = True
    val_every: Optional[int] = None         # validation loss every N steps; None = at every log step, 0 = never
    progress_bar: bool = True               # tqdm bar on rank 0
    peak_tflops: Optional[float] = None     # the device's dense bf16 peak for MFU; None = built-in table


class Config(_Section):
    model: ModelConfig = ModelConfig()
    moe: MoEConfig = MoEConfig()
    parallel: ParallelConfig = ParallelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()


def _section_type(annotation) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _all_paths(model_cls: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model_cls.model_fields.items():
        out.append(prefix + name)
        sub = _section_type(field.annotation)
        if sub is not None:
            out.extend(_all_paths(sub, prefix + name + "."))
    return out


def _nearest(key: str, prefix: str, model_cls: type[BaseModel]) -> str:
    siblings = list(model_cls.model_fields)
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.5)
    if close:
        return prefix + close[0]
    close = difflib.get_close_matches(prefix + key, _all_paths(Config), n=1, cutoff=0.3)
    return close[0] if close else prefix + siblings[0]


def _check_keys(raw: Any, model_cls: type[BaseModel], source: str, prefix: str = "") -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<root>'}' must be a mapping of keys, "
                          f"got {type(raw).__name__}")
    for key, value in raw.items():
        if key not in model_cls.model_fields:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'; did you mean "
                              f"'{_nearest(str(key), prefix, model_cls)}'?")
        sub = _section_type(model_cls.model_fields[key].annotation)
        if sub is not None and value is not None:
            _check_keys(value, sub, source, f"{prefix}{key}.")


def _validation_message(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        lines.append(f"  {loc or '<root>'}: {e['msg']}{got}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.steps=20' -> (['train', 'steps'], 20); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=20")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty key component in {key!r}")
    try:
        return parts, yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        parts, value = parse_override(item)
        _check_keys(_key_tree(parts), Config, f"--set {item}")
        node = raw
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return raw


def _key_tree(parts: list[str]) -> dict:
    """['train', 'steps'] -> {'train': {'steps': None}}: the key path alone, for checking names."""
    out: Any = None
    for p in reversed(parts):
        out = {p: out}
    return out


def config_from_dict(raw: dict, source: str = "<dict>") -> Config:
    _check_keys(raw, Config, source)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_validation_message(e, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply `KEY=VALUE` overrides."""
    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {source} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        _check_keys(raw, Config, source)
    raw = apply_overrides(raw, list(overrides))
    if overrides:
        source += " with --set " + " ".join(overrides)
    return config_from_dict(raw, source)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

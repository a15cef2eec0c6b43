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


class RopeScalingConfig(_Section):
    """RoPE frequency scaling as transformers' rope_parameters name it (Llama-3.x uses "llama3")."""
    rope_type: Literal["default", "linear", "llama3"] = Field(
        "default", description="how RoPE frequencies are rescaled for longer contexts")
    factor: float = Field(1.0, description="context extension factor (linear, llama3)")
    low_freq_factor: float = Field(1.0, description="llama3 only")
    high_freq_factor: float = Field(4.0, description="llama3 only")
    original_max_position_embeddings: int = Field(8192, description="llama3 only: the context length before scaling")


class ModelConfig(_Section):
    init_from: Optional[str] = Field(
        None, description="a transformers checkpoint directory or hub id org/name to start from: the model "
        "shape comes from its config.json (keys set here must agree with it), the weights from its safetensors "
        "files (moesys.hf)")
    vocab_size: int = Field(256, description="token ids the embedding holds (256: bytes)")
    hidden_size: int = Field(64, description="the model width")
    num_layers: int = Field(2, description="decoder blocks")
    num_heads: int = Field(4, description="query heads")
    num_kv_heads: int = Field(2, description="key/value heads (grouped-query attention); divides num_heads")
    head_dim: Optional[int] = Field(None, description="default hidden_size // num_heads")
    ffn_size: int = Field(128, description="the dense MLP's intermediate size (dense layers)")
    max_seq_len: int = Field(
        2048, description="the context length the model is meant for (exported as max_position_embeddings)")
    rope_theta: float = Field(10000.0, description="RoPE base")
    norm_eps: float = Field(1e-6, description="RMSNorm epsilon")
    qk_norm: bool = Field(False, description="RMSNorm on queries and keys (Qwen3, OLMoE)")
    qk_norm_span: Literal["head", "all"] = Field(
        "head", description="what one q/k norm spans: 'head' = each head's D features (Qwen3); 'all' = the "
        "whole projection, num_heads * D for queries, num_kv_heads * D for keys, before the head split (OLMoE)")
    qkv_bias: bool = Field(False, description="biases on the q, k, v projections (Qwen2)")
    o_bias: bool = Field(False, description="a bias on the output projection (Llama/OLMoE attention_bias)")
    rope_scaling: RopeScalingConfig = RopeScalingConfig()
    sliding_window: Optional[int] = Field(
        None, description="attend to at most this many latest tokens (None: full causal)")
    sliding_layers: Optional[list[int]] = Field(
        None, description="the layers that use the window; None: every layer")
    tie_embeddings: bool = Field(False, description="the output head shares the input embedding's weight")
    init_std: float = Field(0.02, description="std of the normal weight initialisation")
    hf_model: Optional[str] = Field(
        None, description="a transformers v5 checkpoint directory or hub id org/name trained as transformers' "
        "own class with moesys experts (moesys.models.hf_source); its config.json decides the architecture")

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
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1, or null for full attention")
        bad = [i for i in self.sliding_layers or [] if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"sliding_layers {bad} are not layers of a {self.num_layers}-layer model")
        return self

    def uses_window(self, layer: int) -> bool:
        return self.sliding_window is not None and (self.sliding_layers is None or layer in self.sliding_layers)


class RouterConfig(_Section):
    score_func: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="router scores: softmax over experts, or sigmoid per expert (DeepSeek-V3)")
    renormalize: bool = Field(True, description="divide the top-k weights by their sum")
    n_groups: int = Field(
        1, description="group-limited top-k: experts in this many groups (1 = off); divides num_experts")
    topk_groups: Optional[int] = Field(
        None, description="group-limited top-k: experts chosen only from the best this many groups (None: all groups)")
    aux_free_bias: bool = Field(
        False, description="DeepSeek-V3's aux-loss-free balancing: a per-expert selection bias updated after each step")
    bias_update_rate: float = Field(1e-3, ge=0, allow_inf_nan=False, description="aux-loss-free bias step")
    scale: float = Field(1.0, gt=0, allow_inf_nan=False, description="routed weights' factor (DeepSeek's "
                                                                      "routed_scaling_factor)")
    jitter: float = Field(0.0, ge=0, lt=1, description="multiplicative noise on the router input in training")


class MoEConfig(_Section):
    num_experts: int = Field(8, description="routed experts per MoE layer")
    top_k: int = Field(2, description="experts per token")
    ffn_size: int = Field(64, description="each routed expert's intermediate size")
    activation: Literal["silu", "gelu_tanh", "gelu", "relu"] = Field(
        "silu", description="expert activation: silu and gelu_tanh gated, gelu and relu not")
    expert_bias: bool = Field(False, description="biases in the expert projections")
    shared_ffn_size: int = Field(0, description="0 = no shared expert")
    shared_gate: bool = Field(False, description="Qwen2-MoE's sigmoid gate on the shared expert")
    every: int = Field(1, description="sparse step: every n-th layer (after first_dense) is MoE")
    first_dense: int = Field(0, description="leading dense layers (DeepSeek)")
    dense_layers: list[int] = Field([], description="further dense layers by index (Qwen-MoE mlp_only_layers)")
    capacity_factor: Optional[float] = Field(None, description="None = dropless")
    backend: Literal["auto", "loop", "grouped_mm", "triton"] = Field(
        "auto", description="the moe_mlp backend that computes the experts")
    aux_loss_coef: float = Field(0.01, description="weight of the Switch load-balancing loss over the micro-batch")
    seq_aux_loss_coef: float = Field(0.0, description="weight of the same loss per sequence")
    z_loss_coef: float = Field(0.0, description="weight of the router z-loss, mean(logsumexp(logits)^2)")
    router: RouterConfig = RouterConfig()

    @model_validator(mode="after")
    def _check(self):
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if self.every < 1:
            raise ValueError(f"every={self.every} must be >= 1")
        return self

    def is_moe_layer(self, layer: int) -> bool:
        return (layer >= self.first_dense and (layer - self.first_dense) % self.every == 0
                and layer not in self.dense_layers)


class FSSDPConfig(_Section):
    """Fully Sharded Sparse Data Parallelism (parallel.expert_sharding: fssdp | fsdp)."""
    rematerialize: bool = Field(False, description="free gathered experts after forward, gather again in backward")
    reshard_every: int = Field(100, description="re-plan expert ownership every N steps (0 = never)")
    window: int = Field(5, description="steps of load history the plan predicts from")
    gather_budget: Union[int, Literal["auto"], None] = Field(
        "auto", description="experts received per layer and step; auto: what the preceding attention hides at "
                            "bandwidth_gbs; None: all")
    memory_cap: Optional[int] = Field(None, description="extra expert copies a rank may hold per layer (None: no cap)")
    bandwidth_gbs: float = Field(100.0, description="point-to-point bandwidth assumed by gather_budget=auto")
    prefetch: bool = Field(True, description="start each layer's gather before its block's attention")


class ParallelConfig(_Section):
    ep: int = Field(1, description="expert-parallel degree; divides the world size")
    expert_sharding: Literal["ep", "fssdp", "fsdp"] = Field(
        "ep", description="how experts are spread over ranks: 'ep' = all-to-all expert parallelism over "
                          "parallel.ep ranks; 'fssdp' = experts sharded over all ranks and materialised where "
                          "their tokens are (Hecate); 'fsdp' = the same executor with every expert materialised "
                          "on every rank (FSDP over experts)")
    fssdp: FSSDPConfig = FSSDPConfig()
    ep_overlap: bool = Field(True, description="run the shared expert while EP tokens are in flight")
    timeout_s: float = Field(600.0, description="collective timeout: a dead or stuck rank fails the job")

    @model_validator(mode="after")
    def _check(self):
        if self.expert_sharding != "ep" and self.ep != 1:
            raise ValueError(f"expert_sharding={self.expert_sharding!r} shards experts over all ranks; "
                             f"leave parallel.ep at 1 (got {self.ep})")
        return self


class DataConfig(_Section):
    source: str = Field("stdlib", description="'stdlib' (the Python standard library's sources) or a path")
    tokenizer: Optional[str] = Field(None, description="local HF tokenizer directory; None = bytes")
    seq_len: int = Field(64, description="tokens per training sequence")
    batch_size: int = Field(4, description="sequences per micro-batch per data-parallel rank")
    val_fraction: float = Field(
        0.02, description="the last fraction of the sequences, held out for the validation loss")
    text_field: str = Field("text", description="the JSONL field / parquet column holding the text")
    max_tokens: Optional[int] = Field(8_000_000, description="cap on the corpus read (tokens); None = all of it")
    val_batches: int = Field(4, description="micro-batches per rank in each validation-loss evaluation")


class TrainConfig(_Section):
    steps: int = Field(20, description="optimizer steps")
    seed: int = Field(0, description="seeds the initial weights, the data order and the router jitter")
    lr: float = Field(3e-3, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, description="the cosine decay ends at lr * this at the last step")
    warmup_steps: int = Field(2, description="linear warm-up steps")
    weight_decay: float = Field(0.1, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm (clipping is always on)")
    grad_accum: int = Field(1, description="micro-batches per optimizer step")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda if available, else cpu")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU (bf16 autocast there too with param_dtype "
                            "bfloat16); the forward's compute dtype")
    param_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="the dtype of parameters, gradients and AdamW state. float32: fp32 masters under "
                               "bf16 autocast (pre-training). bfloat16: pure bf16, as transformers' Trainer on a bf16 "
                               "model: half the weight and optimizer memory and traffic, but an update below bf16's "
                               "resolution (1/512 to 1/256 of the weight) rounds away, so use it for fine-tuning. "
                               "Needs train.dtype auto or bfloat16 and train.engine torch")
    compile: bool = Field(False, description="torch.compile the model (see compile_mode, compile_scope)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode for the blocks and head: 'reduce-overhead' replays each "
                               "compiled part as a CUDA graph (fewer host launches; more memory for the graphs' "
                               "private pools)")
    compile_scope: Literal["blocks", "model"] = Field(
        "blocks", description="'blocks': each block and the head compiled apart (one graph serves every layer, "
                              "quick to compile); 'model': the whole forward as one graph (fusion across blocks; "
                              "compiles every layer)")
    activation_checkpointing: bool = Field(
        False, description="recompute each block's activations in backward (less memory, more compute)")
    eps: float = Field(1e-8, description="AdamW epsilon")
    cpu_threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads on the CPU; None: "
                                       "OMP_NUM_THREADS if set, else usable cores / ranks on the node")
    engine: Literal["torch", "deepspeed"] = Field(
        "torch", description="'torch': moesys's own data-parallel step; 'deepspeed': the same model, placement and "
                             "schedule under deepspeed.initialize with ZeRO stage 1 or 2 (pip install moesys[deepspeed])")
    deepspeed_config: str = Field(
        "configs/deepspeed_zero2_bf16.json",
        description="DeepSpeed JSON for train.engine=deepspeed (relative: to the working directory, else to the "
                    "moesys checkout); batch size, accumulation, clipping and bf16 are filled from this config")

    @model_validator(mode="after")
    def _check(self):
        if self.param_dtype == "bfloat16" and self.dtype == "float32":
            raise ValueError("train.param_dtype=bfloat16 keeps the parameters in bf16, but train.dtype=float32 asks "
                             "for an fp32 forward; set train.dtype to auto or bfloat16 (bf16 compute), or "
                             "train.param_dtype to float32 (fp32 masters)")
        if self.param_dtype == "bfloat16" and self.engine == "deepspeed":
            raise ValueError("train.param_dtype=bfloat16 with train.engine=deepspeed: DeepSpeed sets the precision "
                             "itself; leave train.param_dtype at float32 and use the bf16 section of "
                             "train.deepspeed_config")
        return self


class CheckpointConfig(_Section):
    every: int = Field(0, description="0 = only at the end")
    keep: int = Field(2, description="newest checkpoints kept (0 = all)")
    save_final: bool = Field(True, description="also save after the last step")


class LogConfig(_Section):
    every: int = Field(1, description="a metrics record and log line every N steps")
    tensorboard: bool = Field(True, description="also write TensorBoard logs to RUN_DIR/tb")
    val_every: Optional[int] = Field(
        None, description="validation loss every N steps; None = at every log step, 0 = never")
    progress_bar: bool = Field(True, description="tqdm bar on rank 0")
    peak_tflops: Optional[float] = Field(
        None, description="the device's dense bf16 peak for MFU; None = built-in table")


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

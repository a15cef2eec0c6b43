"""Dense -> MoE upcycling as a pure function of a config dict and tensor shapes (no files here).

`plan_upcycle` validates the options against the dense config, builds the target config and returns
one `OutTensor` per output tensor: its on-disk Hugging Face name, shape, dtype and a `make(get)` that
computes it from source tensors fetched with `get(name)`. Shapes are known before any tensor is read,
so a writer can lay out every shard header first and then stream tensors one at a time.

Function preservation (the default). A dense MLP is f(x) = D (act(Gx) * Ux), a sum over its I
intermediate neurons. With granularity G each of the C = E/G copies is split into G pieces of I/G
neurons; piece g of copy c is expert e = c*G + g, and all G pieces of a copy share one router row
("virtual groups", He et al. 2024, "Upcycling Large Language Models into Mixture of Experts"). Then
the softmax gives the G pieces of a copy equal probability, top-k (k a multiple of G) takes whole
copies, and after renormalisation the k selected pieces carry weights summing to 1, i.e. 1/G per
whole copy. Scaling every piece's down projection by G makes the routed output exactly f(x).
Qwen2-MoE adds a shared expert scaled by sigmoid(shared_expert_gate x); its gate starts at zero, so
the scale is exactly 0.5: the shared expert is a full dense copy and the routed down projections are
halved as well, giving f/2 + f/2. Both halves start non-zero, so the router and every expert get
gradients from the first step (zeroing one half would leave it, or the router, without any).

Legend: H hidden, I dense intermediate, Ig = I/G expert intermediate, E experts, C = E/G copies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

SOURCES = ("llama", "mistral", "qwen2", "qwen3")
TARGETS = ("mixtral", "qwen2_moe", "qwen3_moe")
ROUTER_INITS = ("normal", "kaiming", "zeros")
DEFAULT_TARGET = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
ARCHITECTURE = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}

# Generic PreTrainedConfig fields that save_pretrained does not write unless they were set.
_GENERIC_KEYS = {
    "transformers_version", "architectures", "model_type", "_name_or_path", "output_hidden_states",
    "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type",
    "id2label", "label2id",
}
# Source fields that no target has, or that the target sets its own way below.
_SOURCE_ONLY_KEYS = {"mlp_bias", "pretraining_tp", "attention_bias", "layer_types", "max_window_layers",
                     "use_sliding_window", "sliding_window", "qkv_bias"}


@dataclasses.dataclass(frozen=True)
class UpcycleOptions:
    """What to build. `moe_layers`: "all", "every-other" (layers 1, 3, 5, ...) or a list of layer ids."""

    num_experts: int
    top_k: int
    target: str | None = None
    granularity: int = 1
    moe_layers: str | tuple[int, ...] = "all"
    router_init: str = "normal"
    router_std: float | None = None
    drop_ratio: float = 0.0
    shared_expert: bool | None = None
    norm_topk_prob: bool = True
    seed: int = 0


@dataclasses.dataclass
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[Callable[[str], torch.Tensor]], torch.Tensor]
    # Set when the output is byte-for-byte the named source tensor, so a writer may copy the bytes
    # file to file (copy_file_range) instead of reading them into memory.
    copy_of: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclasses.dataclass
class Plan:
    config: dict[str, Any]
    tensors: list[OutTensor]
    notes: list[str]  # what the user must know, e.g. why the output is not function preserving
    function_preserving: bool
    moe_layers: list[int]


def parse_moe_layers(spec: str | list[int] | tuple[int, ...], num_layers: int) -> list[int]:
    if isinstance(spec, str):
        if spec == "all":
            return list(range(num_layers))
        if spec == "every-other":
            return list(range(1, num_layers, 2))
        try:
            layers = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--moe-layers {spec!r} is not 'all', 'every-other' or a comma list like '1,3,5'"
                             ) from None
    else:
        layers = [int(i) for i in spec]
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise ValueError(f"--moe-layers {spec!r}: layer ids must be in 0..{num_layers - 1} and at least one; "
                         f"got {bad or 'none'}")
    return sorted(set(layers))


def _layer_windows(src: dict) -> list[int | None]:
    """Per layer: the sliding-window size, or None for full attention."""
    n, mt = src["num_hidden_layers"], src["model_type"]
    if mt == "llama":
        return [None] * n
    if mt == "mistral":
        return [src.get("sliding_window")] * n
    types = src.get("layer_types") or ["full_attention"] * n
    return [src.get("sliding_window") if t == "sliding_attention" else None for t in types]


def _check_compatible(src: dict, target: str) -> None:
    mt = src["model_type"]
    if src.get("mlp_bias"):
        raise ValueError("the dense model has MLP biases (mlp_bias=true); no MoE target has expert biases")
    if target == "qwen3_moe" and mt != "qwen3":
        raise ValueError(f"target qwen3_moe normalises q and k per head (q_norm/k_norm), which a {mt} model lacks, "
                         f"so the upcycled model could not match it; use --target {DEFAULT_TARGET[mt]}")
    if target != "qwen3_moe" and mt == "qwen3":
        raise ValueError(f"a qwen3 model has q_norm/k_norm, which target {target} lacks; use --target qwen3_moe")
    if mt == "qwen2" and target == "mixtral":
        raise ValueError("a qwen2 model has q/k/v biases, which Mixtral attention lacks; use --target qwen2_moe")
    if mt == "llama" and src.get("attention_bias"):  # (qwen3_moe needs a qwen3 source: refused above)
        raise ValueError(f"this llama model has attention biases (attention_bias=true) including o_proj's, which "
                         f"target {target} cannot hold")
    windows = _layer_windows(src)
    if target in ("mixtral", "qwen3_moe") and len(set(windows)) > 1:
        raise ValueError(f"the dense model mixes sliding-window and full-attention layers; target {target} applies "
                         f"one window to every layer; use --target qwen2_moe (Qwen2 sources) instead")


def _default_labels(mapping: dict) -> bool:
    """Whether an id2label / label2id map is transformers' default pair (LABEL_0, LABEL_1), which to_dict
    writes for every config; keys read from JSON are strings, so compare as strings."""
    pairs = {str(a): str(b) for a, b in mapping.items()}
    return pairs in ({"0": "LABEL_0", "1": "LABEL_1"}, {"LABEL_0": "0", "LABEL_1": "1"})


def build_config(src: dict, opts: UpcycleOptions, target: str, moe_layers: list[int]) -> dict[str, Any]:
    """The target config: every non-MoE field of `src` carried over, MoE fields added."""
    n, g = src["num_hidden_layers"], opts.granularity
    cfg = {k: v for k, v in src.items() if k not in _GENERIC_KEYS | _SOURCE_ONLY_KEYS}
    for k in ("id2label", "label2id"):  # keep only if the dense checkpoint customised them
        if k in src and not _default_labels(src[k]):
            cfg[k] = src[k]
    cfg.update(architectures=[ARCHITECTURE[target]], model_type=target, num_experts_per_tok=opts.top_k)
    windows = _layer_windows(src)
    if target == "mixtral":
        cfg.update(num_local_experts=opts.num_experts, intermediate_size=src["intermediate_size"] // g,
                   sliding_window=windows[0], router_jitter_noise=0.0)
        return cfg
    cfg.update(num_experts=opts.num_experts, intermediate_size=src["intermediate_size"],
               moe_intermediate_size=src["intermediate_size"] // g, norm_topk_prob=opts.norm_topk_prob,
               decoder_sparse_step=1, mlp_only_layers=[i for i in range(n) if i not in moe_layers])
    if target == "qwen3_moe":
        cfg.update(attention_bias=bool(src.get("attention_bias")), use_sliding_window=windows[0] is not None,
                   sliding_window=windows[0])
    else:
        window = next((w for w in windows if w is not None), None)
        cfg.update(qkv_bias=src["model_type"] == "qwen2", shared_expert_intermediate_size=src["intermediate_size"],
                   use_sliding_window=window is not None, sliding_window=window, max_window_layers=n,
                   layer_types=["full_attention" if w is None else "sliding_attention" for w in windows])
    return cfg


def _generator(seed: int, *keys: object) -> torch.Generator:
    """A generator seeded by (seed, keys), so every tensor is reproducible whatever the write order."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _router(opts: UpcycleOptions, layer: int, hidden: int, std: float, dtype: torch.dtype) -> torch.Tensor:
    copies = opts.num_experts // opts.granularity
    gen = _generator(opts.seed, "router", layer)
    if opts.router_init == "zeros":
        rows_CH = torch.zeros(copies, hidden)
    elif opts.router_init == "kaiming":  # nn.Linear's default: U(-1/sqrt(H), 1/sqrt(H))
        rows_CH = (torch.rand(copies, hidden, generator=gen) * 2 - 1) / math.sqrt(hidden)
    else:
        rows_CH = torch.randn(copies, hidden, generator=gen) * std
    # Virtual groups: the G pieces of one copy share a router row, so top-k picks whole copies.
    return rows_CH.repeat_interleave(opts.granularity, dim=0).to(dtype)


def _drop_reinit(piece: torch.Tensor, full: torch.Tensor, rows: torch.Tensor, dim: int,
                 gen: torch.Generator) -> torch.Tensor:
    """Drop-Upcycling (Nakamura et al., ICLR 2025): re-draw the chosen neurons from N(mean, std) of the
    dense matrix, so the new weights have the statistics of the old ones."""
    full32 = full.float()
    mean, std = full32.mean().item(), full32.std().item()
    piece = piece.clone()
    shape = list(piece.shape)
    shape[dim] = len(rows)
    piece.index_copy_(dim, rows, (torch.randn(shape, generator=gen) * std + mean).to(piece.dtype))
    return piece


def plan_upcycle(src: dict, shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]], opts: UpcycleOptions) -> Plan:
    """Validate, build the target config and list every output tensor. `src` is the dense config as a
    full dict (all defaults filled in); `shapes` maps each source tensor name to (shape, dtype)."""
    mt = src.get("model_type")
    if mt not in SOURCES:
        raise ValueError(f"unsupported dense architecture model_type={mt!r}; supported: {', '.join(SOURCES)}")
    target = opts.target or ("qwen2_moe" if opts.shared_expert else DEFAULT_TARGET[mt])
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    E, K, G = opts.num_experts, opts.top_k, opts.granularity
    n, H, I = src["num_hidden_layers"], src["hidden_size"], src["intermediate_size"]
    if E < 1 or K < 1:
        raise ValueError(f"--num-experts ({E}) and --top-k ({K}) must be at least 1")
    if K > E:
        raise ValueError(f"--top-k {K} is larger than --num-experts {E}; choose top_k <= num_experts")
    if G < 1 or I % G or E % G or K % G:
        raise ValueError(f"--granularity {G} must divide the dense intermediate size ({I}), --num-experts ({E}) "
                         f"and --top-k ({K}) so that top-k selects whole copies; pick a common divisor")
    if not 0.0 <= opts.drop_ratio < 1.0:
        raise ValueError(f"--drop-ratio {opts.drop_ratio} must be in [0, 1)")
    if opts.router_init not in ROUTER_INITS:
        raise ValueError(f"--router-init {opts.router_init!r}; choose from {', '.join(ROUTER_INITS)}")
    if opts.shared_expert and target != "qwen2_moe":
        raise ValueError(f"--shared-expert needs --target qwen2_moe; target {target} has no shared expert")
    if target == "mixtral" and not opts.norm_topk_prob:
        raise ValueError("Mixtral always renormalises the top-k weights; drop --no-norm-topk or pick a qwen target")
    _check_compatible(src, target)
    moe_layers = parse_moe_layers(opts.moe_layers, n)
    if target == "mixtral" and len(moe_layers) != n:
        raise ValueError("Mixtral has no per-layer dense MLP option, so every layer must be MoE; use "
                         "--moe-layers all, or --target qwen2_moe/qwen3_moe (they list dense layers in "
                         "mlp_only_layers)")

    notes: list[str] = []
    shared = target == "qwen2_moe"
    # Routed down-projection scale; see the module docstring. Without renormalisation the k selected
    # pieces carry softmax probabilities, K/E in total when the router is uniform; NVIDIA's upcycling
    # paper scales experts by E/K for that (exact with --router-init zeros, approximate otherwise).
    down_scale = float(G) if opts.norm_topk_prob else float(E * G) / K
    if shared:
        down_scale *= 0.5
    preserving = opts.norm_topk_prob or opts.router_init == "zeros"
    if not opts.norm_topk_prob:
        notes.append(f"softmax without top-k renormalisation: routed experts scaled by E*G/K = {E * G / K:g}; "
                     + ("exact with a zero router" if preserving
                        else "logits only approximately match the dense model"))
    if opts.drop_ratio > 0:
        preserving = False
        notes.append(f"drop-upcycling: {opts.drop_ratio:.0%} of each expert's neurons re-initialised from N(mean, std) "
                     f"of the dense weights; the model is NOT function preserving by design")
    if opts.router_init == "zeros":
        notes.append("zero router: every token picks the same experts until the router learns; "
                     "--router-init normal breaks the tie")
    if shared:
        notes.append("shared expert = dense MLP copy gated by sigmoid(0) = 0.5; routed experts carry the other half")

    config = build_config(src, opts, target, moe_layers)
    std = opts.router_std if opts.router_std is not None else src.get("initializer_range", 0.02)
    Ig = I // G
    n_drop = int(round(opts.drop_ratio * Ig))
    router_dtype = shapes["model.embed_tokens.weight"][1]

    def expert_piece(dense: torch.Tensor, proj: str, layer: int, e: int) -> torch.Tensor:
        """Expert e's slice of one dense matrix: rows of gate/up [I, H], columns of down [H, I]."""
        c, g = divmod(e, G)
        dim = 1 if proj == "down_proj" else 0
        piece = dense.narrow(dim, g * Ig, Ig)
        if n_drop:
            # The same neurons in gate, up and down of one expert; different ones in every expert.
            rows = torch.randperm(Ig, generator=_generator(opts.seed, "drop", layer, c, g))[:n_drop].sort().values
            piece = _drop_reinit(piece, dense, rows, dim, _generator(opts.seed, "w", proj, layer, e))
        if proj != "down_proj" or down_scale == 1.0:
            return piece
        # Scaling by a power of two (G = 2, 4, ...; the shared expert's 0.5) is exact in any float format.
        return (piece.float() * down_scale).to(piece.dtype)

    out: list[OutTensor] = []

    def passthrough(name: str) -> None:
        shape, dtype = shapes[name]
        out.append(OutTensor(name, shape, dtype, lambda get, name=name: get(name), copy_of=name))

    passthrough("model.embed_tokens.weight")
    for i in range(n):
        prefix = f"model.layers.{i}"
        for name in sorted(k for k in shapes if k.startswith(prefix + ".") and ".mlp." not in k):
            passthrough(name)
        if i not in moe_layers:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                passthrough(f"{prefix}.mlp.{proj}.weight")
            continue
        if target == "mixtral":
            moe, names = f"{prefix}.block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
        else:
            moe, names = f"{prefix}.mlp", {p: p for p in ("gate_proj", "up_proj", "down_proj")}
        out.append(OutTensor(f"{moe}.gate.weight", (E, H), router_dtype,
                             lambda get, i=i: _router(opts, i, H, std, router_dtype)))
        # Projection-major order: the E experts (and the shared expert) read one dense matrix in a row,
        # so the reader's one-tensor cache serves them all from a single read.
        for proj in ("gate_proj", "up_proj", "down_proj"):
            src_name = f"{prefix}.mlp.{proj}.weight"
            dtype = shapes[src_name][1]
            shape = (H, Ig) if proj == "down_proj" else (Ig, H)
            verbatim = G == 1 and not n_drop and (proj != "down_proj" or down_scale == 1.0)
            for e in range(E):
                out.append(OutTensor(f"{moe}.experts.{e}.{names[proj]}.weight", shape, dtype,
                                     lambda get, n=src_name, p=proj, i=i, e=e: expert_piece(get(n), p, i, e),
                                     copy_of=src_name if verbatim else None))
            if shared:
                out.append(OutTensor(f"{moe}.shared_expert.{proj}.weight", shapes[src_name][0], dtype,
                                     lambda get, n=src_name: get(n), copy_of=src_name))
        if shared:
            out.append(OutTensor(f"{moe}.shared_expert_gate.weight", (1, H), router_dtype,
                                 lambda get: torch.zeros(1, H, dtype=router_dtype)))
    passthrough("model.norm.weight")
    if "lm_head.weight" in shapes:
        passthrough("lm_head.weight")
    return Plan(config, out, notes, preserving, moe_layers)


def expected_source_tensors(src: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a dense checkpoint of this config must hold (lm_head excluded)."""
    H, I, V, n = src["hidden_size"], src["intermediate_size"], src["vocab_size"], src["num_hidden_layers"]
    heads, kv = src["num_attention_heads"], src.get("num_key_value_heads") or src["num_attention_heads"]
    d = src.get("head_dim") or H // heads
    mt = src["model_type"]
    names: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(n):
        p = f"model.layers.{i}"
        names.update({f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,),
                      f"{p}.self_attn.q_proj.weight": (heads * d, H), f"{p}.self_attn.k_proj.weight": (kv * d, H),
                      f"{p}.self_attn.v_proj.weight": (kv * d, H), f"{p}.self_attn.o_proj.weight": (H, heads * d),
                      f"{p}.mlp.gate_proj.weight": (I, H), f"{p}.mlp.up_proj.weight": (I, H),
                      f"{p}.mlp.down_proj.weight": (H, I)})
        qkv_bias = mt == "qwen2" or (mt in ("llama", "qwen3") and src.get("attention_bias"))
        if qkv_bias:
            names.update({f"{p}.self_attn.q_proj.bias": (heads * d,), f"{p}.self_attn.k_proj.bias": (kv * d,),
                          f"{p}.self_attn.v_proj.bias": (kv * d,)})
        if mt in ("llama", "qwen3") and src.get("attention_bias"):
            names[f"{p}.self_attn.o_proj.bias"] = (H,)
        if mt == "qwen3":
            names.update({f"{p}.self_attn.q_norm.weight": (d,), f"{p}.self_attn.k_norm.weight": (d,)})
    return names


def check_source_tensors(src: dict, shapes: Mapping[str, tuple[tuple[int, ...], Any]]) -> None:
    """Every expected tensor present with its shape, nothing unknown (nanochat's converter rule)."""
    expected = expected_source_tensors(src)
    H, V = src["hidden_size"], src["vocab_size"]
    if "lm_head.weight" in shapes or not src.get("tie_word_embeddings"):
        expected["lm_head.weight"] = (V, H)
    missing = sorted(set(expected) - set(shapes))
    unknown = sorted(set(shapes) - set(expected))
    if missing:
        raise ValueError(f"the dense checkpoint lacks {len(missing)} tensor(s) its config needs, e.g. {missing[:3]}")
    if unknown:
        raise ValueError(f"the dense checkpoint holds {len(unknown)} tensor(s) a {src['model_type']} model does not "
                         f"have, e.g. {unknown[:3]}; is config.json the right one?")
    for name, shape in expected.items():
        if tuple(shapes[name][0]) != shape:
            raise ValueError(f"tensor {name} has shape {tuple(shapes[name][0])}, config.json implies {shape}")


def upcycle_state_dict(src: dict, state_dict: Mapping[str, torch.Tensor],
                       opts: UpcycleOptions) -> tuple[dict, dict[str, torch.Tensor], Plan]:
    """In-memory upcycling: (target config, target state dict with on-disk names, plan)."""
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    check_source_tensors(src, shapes)
    plan = plan_upcycle(src, shapes, opts)
    return plan.config, {t.name: t.make(state_dict.__getitem__) for t in plan.tensors}, plan

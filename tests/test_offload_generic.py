"""moesys.offload's generic adapter (read off transformers' checkpoint conversion mapping) on tiny random
checkpoints of architectures without an explicit entry: greedy tokens and prefill logits of the offloaded
model (experts evicted and reloaded) against transformers' from_pretrained of the same files, on CPU."""

import pytest
import torch
import transformers
from transformers import (AutoConfig, AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config, DynamicCache,
                          Glm4MoeConfig, GptOssConfig, JambaConfig, NemotronHConfig, PhimoeConfig, Qwen2MoeConfig,
                          Qwen3NextConfig, cache_utils)

import moesys.offload as mo
from moesys.offload.adapters import ADAPTERS, adapter_for, find_moe_blocks, from_conversion_mapping, router_of
from moesys.offload.loader import build_skeleton

COMMON = dict(vocab_size=101, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=None)
MOE = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, first_k_dense_replace=1)
CONFIGS = {
    # MLA attention, shared experts, group-limited sigmoid routing with a score-correction bias
    "deepseek_v3": lambda: DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, **MOE, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                                            qk_nope_head_dim=8, v_head_dim=8, n_group=2, topk_group=1),
    # DeepSeek-V2-Lite's shape in small: MLA without a query LoRA, two shared experts, greedy softmax routing
    "deepseek_v2": lambda: DeepseekV2Config(**{**COMMON, "num_key_value_heads": 4}, **MOE, n_shared_experts=2,
                                            kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                                            qk_nope_head_dim=8, v_head_dim=8),
    "glm4_moe": lambda: Glm4MoeConfig(**COMMON, **MOE, head_dim=8),
    # block_sparse_moe.gate on disk, mlp.router in memory
    "phimoe": lambda: PhimoeConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2),
    # Mamba layers (their conv/SSM state in the cache), experts under feed_forward with a `router`
    "jamba": lambda: JambaConfig(**COMMON, num_experts=8, num_experts_per_tok=2, expert_layer_period=1,
                                 expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8,
                                 mamba_dt_rank=4),
    # hybrid linear attention (gated delta rule) and full attention, shared expert with its own gate
    "qwen3_next": lambda: Qwen3NextConfig(**COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                                          shared_expert_intermediate_size=20, head_dim=8, linear_num_value_heads=4,
                                          linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                                          layer_types=["linear_attention", "full_attention", "linear_attention"]),
    # experts fused on disk in the transposed, gate/up-interleaved layout with biases; clamped SwiGLU (a low
    # limit so the clamp bites on these random weights), attention sinks, sliding-window layers
    "gpt_oss": lambda: GptOssConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=4,
                                    swiglu_limit=0.5, layer_types=["sliding_attention", "full_attention",
                                                                   "sliding_attention"]),
    # non-gated experts (up/down, relu2) stored per expert under backbone.*, Mamba-2 and attention layers
    "nemotron_h": lambda: NemotronHConfig(**{k: v for k, v in COMMON.items() if k not in ("intermediate_size",
                                                                                          "num_hidden_layers")},
                                          intermediate_size=40, head_dim=8, ssm_state_size=8, mamba_num_heads=4,
                                          mamba_head_dim=8, n_groups=2, chunk_size=8, n_routed_experts=8,
                                          num_experts_per_tok=2, moe_intermediate_size=24,
                                          moe_shared_expert_intermediate_size=20,
                                          layers_block_type=["mamba", "moe", "attention", "moe"]),
}
NEW_TOKENS = 8


@pytest.fixture(autouse=True)
def host_routed_path(monkeypatch):
    from moesys.offload import loader

    monkeypatch.setitem(loader._OPTIONS, "cuda_graph", False)


def test_mapping_gives_the_explicit_adapters():
    """The adapter read off the conversion mapping names Mixtral's experts as the hand-written entry does."""
    assert from_conversion_mapping("mixtral") == ADAPTERS["mixtral"]
    assert from_conversion_mapping("gpt_oss") is None  # fused on disk: no per-expert names to map
    assert adapter_for(GptOssConfig()).disk_block == "model.layers.{i}.mlp"  # the in-memory names, fused
    nemotron = from_conversion_mapping("nemotron_h")  # non-gated, under backbone. on disk
    assert (nemotron.disk_block, nemotron.module_block) == ("backbone.layers.{i}.mixer", "model.layers.{i}.mixer")
    assert nemotron.proj_names == (None, "up_proj", "down_proj")


def test_quantized_checkpoints_are_refused_with_how_to_proceed():
    """A quantized checkpoint (GPT-OSS's MXFP4) is refused naming the method and how to proceed."""
    from types import SimpleNamespace

    mxfp4 = SimpleNamespace(model_type="gpt_oss", quantization_config={"quant_method": "mxfp4"})
    with pytest.raises(ValueError, match="quant_method='mxfp4'.*dequantize it first"):
        adapter_for(mxfp4)


def _save_tiny(config, path):
    """A tiny random model of `config` saved to `path`, its routers scaled up so that routing depends on the
    token (the cache churns) and its expert biases non-zero."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for block in find_moe_blocks(model, adapter_for(model.config)).values():
            router_of(block).weight.normal_(0, 1.0)
            for name, p in block.experts.named_parameters():
                if name.endswith("_bias"):  # initialised to zero: make them count
                    p.normal_(0, 0.5)
    model.save_pretrained(path)


def _offloaded_matches(arch, tmp_path, generate_kw=(), **options):
    """Save a tiny random `arch`, load it offloaded with room for 5 of 16 experts (eviction forced) and
    check greedy tokens (generate() with `generate_kw`) and logits against transformers' from_pretrained of
    the same files."""
    generate_kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, **dict(generate_kw))
    config = CONFIGS[arch]()
    assert config.model_type not in ADAPTERS
    _save_tiny(config, tmp_path)
    # on the device moesys.offload.load picks (CUDA where there is one), so the two compare like with like
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).to(device)
    prompt = torch.randint(2, 101, (1, 9), generator=torch.Generator().manual_seed(1)).to(device)
    want = ref.generate(prompt, **generate_kw)

    skel_config = AutoConfig.from_pretrained(tmp_path)
    skel = build_skeleton(skel_config, torch.float32)
    plan = mo.plan_memory(skel, find_moe_blocks(skel, adapter_for(skel_config)), torch.float32, 1 << 40)
    slots = 5  # of 16 experts
    off = mo.load(tmp_path, gpu_memory=plan.resident_bytes + plan.reserve_bytes + slots * plan.slot_bytes,
                  dtype=torch.float32, **options)
    got = off.generate(prompt, **generate_kw)
    assert torch.equal(got, want)
    with torch.no_grad():
        # fp32 rounding, not bit equality: with torch's default CPU threads the engine's per-expert GEMMs split
        # their reductions differently from the model's batched ones (seen: 6e-8 apart with 2 threads).
        torch.testing.assert_close(off(want).logits, ref(want).logits, rtol=1e-5, atol=1e-6)
    stats = off.moesys_offload.snapshot()
    assert stats.evictions > 0 and stats.misses > 0
    return off


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_generic_adapter_greedy_and_logits_equal(arch, tmp_path):
    _offloaded_matches(arch, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"experts_implementation": "eager"}, {"cpu_experts": "on"},
                                     {"host_memory": "mmap"}], ids=["eager-loop", "host-experts", "mmap"])
@pytest.mark.parametrize("arch", ["gpt_oss", "nemotron_h"])
def test_other_layouts_per_expert_paths(arch, options, tmp_path):
    """Experts in GPT-OSS's layout (bias, transposed interleaved weights, the module's clamped SwiGLU) and
    Nemotron-H's (non-gated, relu2) through the engine's own per-expert loop from cache slots, from the host
    store, and read from the mapped file."""
    off = _offloaded_matches(arch, tmp_path, **options)
    if "cpu_experts" in options:
        assert off.moesys_offload.snapshot().cpu_experts > 0


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt_oss", "nemotron_h"])
def test_other_layouts_device_path(arch, tmp_path, monkeypatch):
    """Batch-1 decode with a StaticCache (GPT-OSS: sliding-window and full layers; Nemotron-H: Mamba and
    attention) on the device path: bookkeeping and misses on the device, the model's own experts (biases and
    clamped SwiGLU; non-gated relu2) over the slots."""
    from moesys.offload import loader

    monkeypatch.setitem(loader._OPTIONS, "cuda_graph", True)
    off = _offloaded_matches(arch, tmp_path, {"cache_implementation": "static", "disable_compile": True})
    engine, decoder = off.moesys_offload, off.moesys_decode_graph
    assert engine.device_path_unsupported is None
    assert decoder.eager_steps + decoder.replays == NEW_TOKENS - 1  # every decode step took the device path
    assert engine.snapshot().decode_tokens == NEW_TOKENS - 1


@pytest.mark.parametrize("arch", ["gpt_oss", "nemotron_h"])
def test_quantized_experts_of_other_layouts_are_refused(arch, tmp_path):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIGS[arch]()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="quantize_experts='int8' supports only plain gated experts.*biases"):
        mo.load(tmp_path, gpu_memory=1 << 30, dtype=torch.float32, quantize_experts="int8")


# Qwen2-MoE has an explicit adapter (the other three explicit ones are tests/test_offload_batch.py's)
BATCH_CONFIGS = {**CONFIGS, "qwen2_moe": lambda: Qwen2MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2,
                                                                moe_intermediate_size=24,
                                                                shared_expert_intermediate_size=20)}
# 3-6 s each on 2 cores; the quick subset keeps MLA (DeepSeek-V3) and the Mamba layers (Jamba, Nemotron-H),
# and test_offload_batch_graph's sliding-window Mixtral
SLOW_BATCH = {"deepseek_v2", "glm4_moe", "gpt_oss", "phimoe", "qwen2_moe", "qwen3_next"}


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in SLOW_BATCH else a
                                  for a in sorted(BATCH_CONFIGS)])
def test_batch_equals_each_sequence_alone(arch, tmp_path, monkeypatch):
    """generate_batch of five prompts of different lengths, three rows at a time (continuous batching; one
    sequence stops at an EOS mid-way, so rows leave and join while others decode) gives each sequence the
    tokens transformers' own model generates for it alone: left-padded rows in every cache kind these
    models have (full attention; GPT-OSS's sliding windows, narrower here than the prompts; the recurrent
    states of Jamba's and Nemotron-H's Mamba layers and Qwen3-Next's linear attention)."""
    from moesys.offload.batch import generate_batch
    from moesys.offload.batch_kv import PaddedBatchKV, layer_kind
    from tests.test_offload_batch import budget

    # before every decode step each cache layer counts the batch's cached columns: transformers reads that
    # count (layer 0's) for the step's positions and masks
    counts, step_inputs = [], PaddedBatchKV.step_inputs

    def counted_step_inputs(kv):
        before = kv.length
        seen = {int(layer.get_seq_length()) for layer in kv.cache.layers if layer_kind(layer) != "none"}
        counts.append(seen == {before})
        return step_inputs(kv)

    monkeypatch.setattr(PaddedBatchKV, "step_inputs", counted_step_inputs)
    config = BATCH_CONFIGS[arch]()
    if not hasattr(cache_utils, "LinearAttentionLayer"):
        other = {type(layer).__name__ for layer in DynamicCache(config=config).layers if layer_kind(layer) is None}
        if other:  # (perhaps the GPU image's transformers 5.17; CI's 5.25 runs them)
            pytest.skip(f"transformers {transformers.__version__} keeps these recurrent layers in {sorted(other)}, "
                        "model-specific caches a padded batch does not take (5.25: LinearAttentionLayer)")
    _save_tiny(config, tmp_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where moesys.offload.load puts the model
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).to(device)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 101, (n,), generator=g).tolist() for n in (5, 9, 3, 12, 7)]
    want = [ref.generate(torch.tensor([p], device=device), max_new_tokens=NEW_TOKENS,
                         do_sample=False)[0, len(p):].tolist() for p in prompts]
    eos = want[1][3]
    want = [w[:w.index(eos) + 1] if eos in w else w for w in want]
    model = mo.load(tmp_path, gpu_memory=budget(tmp_path, torch.float32, 5, max_context=512), dtype=torch.float32,
                    max_context=512)  # 5 of 16 experts
    run = generate_batch(model, prompts, max_new_tokens=NEW_TOKENS, batch_size=3, eos=eos)
    got = {r.index: r.token_ids for r in run}
    assert [got[i] for i in range(len(prompts))] == want
    assert run.prefills == len(prompts) and sum(map(len, want)) == run.generated_tokens
    assert model.moesys_offload.snapshot().evictions > 0
    assert counts and all(counts)

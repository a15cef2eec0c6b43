"""Exact mode (moesys.offload.load(..., exact=True)): the batch-invariant matmul and row sums and the
padding-invariant attention (TRITON_INTERPRET=1 on a CPU, CUDA on a GPU) against their torch references, a row's
result bit for bit the same in any batch; the dispatch mode that routes a model's ops to them; an offloaded
bf16 model whose prefill logits and greedy tokens in a left-padded batch equal each prompt's alone, bit for bit;
the options exact mode refuses."""

import pytest
import torch
import torch.nn.functional as F

import moesys.offload as mo
from moesys.kernels.batch_invariant import BatchInvariantMode, mm, mm_reference, row_sum, row_sum_reference
from moesys.kernels.exact_attention import attention, attention_reference
from tests.test_offload import checkpoints  # noqa: F401
from tests.test_offload_batch import budget

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_mm_row_does_not_depend_on_its_batch(dtype, bias):
    """M = 70 rows (two row tiles), K = 75 (three K tiles, the last partial), N = 45, the weight transposed (as
    nn.Linear passes it): each row equals itself multiplied alone and within 5 rows at an odd offset."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(70, 75, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(45, 75, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(45, generator=g).to(dtype).to(DEVICE) if bias else None
    out = mm(a, w.t(), b)
    assert out.dtype == dtype and out.shape == (70, 45)
    want = mm_reference(a, w.t(), b)
    # (bf16: the interpreter truncates where the GPU rounds)
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.15, rtol=0.05)
    torch.testing.assert_close(out.float(), want.float(), **tol)
    for r in (0, 13, 64, 69):
        assert torch.equal(mm(a[r:r + 1], w.t(), b), out[r:r + 1]), r
    assert torch.equal(mm(a[37:42], w.t(), b), out[37:42])


def test_row_sum_does_not_depend_on_the_rows_beside_it():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(9, 1500, generator=g) * 100).to(DEVICE)  # two column blocks of 1024 lanes
    s = row_sum(x)
    torch.testing.assert_close(s, row_sum_reference(x), atol=1e-2, rtol=1e-5)
    for r in range(9):
        assert torch.equal(row_sum(x[r:r + 1]), s[r:r + 1]), r


def _qkv(B, Hq, Hkv, Tq, L, D, Dv, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Tq, D, generator=g).to(dtype), torch.randn(B, Hkv, L, D, generator=g).to(dtype),
            torch.randn(B, Hkv, L, Dv, generator=g).to(dtype))


@pytest.mark.parametrize("Tq", [1, 5])  # decode; a prefill of 5 queries (causal within them)
@pytest.mark.parametrize("sinks", [False, True])
def test_attention_matches_reference_and_ignores_left_padding(Tq, sinks):
    """GQA (4 query heads on 2 key/value heads), key width 12 and value width 6 (MLA's unequal widths), 75 keys
    (three blocks, the last partial), a sliding window of 50 columns, optional sinks: equal to the torch
    reference, and the same query with 41 masked columns of noise padded on the left, in a batch of 3 whose
    other rows differ, gives the same output bit for bit."""
    Hq, Hkv, L, D, Dv, pad = 4, 2, 75, 12, 6, 41
    q, k, v = _qkv(1, Hq, Hkv, Tq, L, D, Dv, seed=2)
    qpos = L - Tq + torch.arange(Tq)
    cols = torch.arange(L)
    window = (cols[None, :] <= qpos[:, None]) & (cols[None, :] > qpos[:, None] - 50)
    mask = window.view(1, 1, Tq, L)
    s = torch.randn(Hq) if sinks else None
    out = attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), mask.to(DEVICE), scale=0.3,
                    sinks_H=None if s is None else s.to(DEVICE)).cpu()
    assert out.shape == (1, Tq, Hq, Dv)
    torch.testing.assert_close(out, attention_reference(q, k, v, mask, scale=0.3, sinks_H=s), atol=2e-6, rtol=1e-5)

    qb, kb, vb = _qkv(3, Hq, Hkv, Tq, L + pad, D, Dv, seed=3)
    qb[1], kb[1, :, pad:], vb[1, :, pad:] = q[0], k[0], v[0]
    mask_b = torch.zeros(3, 1, Tq, L + pad, dtype=torch.bool)
    mask_b[:, :, :, pad:] = window
    mask_b[0, :, :, :7] = True  # another row sees other columns
    got = attention(qb.to(DEVICE), kb.to(DEVICE), vb.to(DEVICE), mask_b.to(DEVICE), scale=0.3,
                    sinks_H=None if s is None else s.to(DEVICE)).cpu()
    assert torch.equal(got[1:2], out)


def test_attention_without_a_mask_is_causal_and_a_query_that_sees_nothing_is_zero():
    q, k, v = _qkv(2, 2, 2, 3, 9, 8, 8, seed=4)
    torch.testing.assert_close(attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)).cpu(),
                               attention_reference(q, k, v), atol=2e-6, rtol=1e-5)
    none = torch.zeros(2, 1, 3, 9, dtype=torch.bool)
    assert torch.equal(attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), none.to(DEVICE)).cpu(),
                       torch.zeros(2, 3, 2, 8))


def test_mode_routes_linear_and_norm_and_refuses_batch_dependent_kernels():
    """Inside BatchInvariantMode nn.Linear (3D input, with a bias) and an RMSNorm's mean run the kernels (equal
    to calling them directly); SDPA and cuBLAS's grouped GEMM are refused with a message; float64 passes through."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 33, generator=g).to(DEVICE)
    w, b = torch.randn(20, 33, generator=g).to(DEVICE), torch.randn(20, generator=g).to(DEVICE)
    with BatchInvariantMode() as mode:
        y = F.linear(x, w, b)
        ms = x.pow(2).mean(-1, keepdim=True)
        f64 = torch.arange(6., device=DEVICE, dtype=torch.float64).view(2, 3) @ torch.ones(3, 2, dtype=torch.float64,
                                                                                           device=DEVICE)
        # a shape a fused SDPA kernel takes (its math fallback decomposes into ops the mode cannot tell apart)
        qkv = torch.randn(1, 2, 8, 64, generator=g).to(DEVICE, torch.bfloat16)
        with pytest.raises(RuntimeError, match="exact_attention"):
            F.scaled_dot_product_attention(qkv, qkv, qkv)
    assert mode.calls >= 2
    assert torch.equal(y, mm(x.reshape(14, 33), w.t(), b).view(2, 7, 20))
    assert torch.equal(ms, (row_sum(x.pow(2).reshape(14, 33)) / 33).view(2, 7, 1))
    assert f64.tolist() == [[3, 3], [12, 12]]  # other dtypes pass through (float64: the usual kernel)


@pytest.mark.slow
# GPT-OSS: attention sinks, sliding-window layers, expert biases, clamped SwiGLU; DeepSeek-V3: MLA (query/key and
# value head dims differ), sigmoid group-limited routing, shared experts (tests.test_offload_generic's tiny ones)
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "deepseek_v3",
                                  pytest.param("mixtral", marks=pytest.mark.skipif(
                                      DEVICE == "cpu", reason="the same engine path as qwen3_moe on the CPU; 1 min "
                                                              "under the interpreter"))])
def test_exact_batch_equals_each_prompt_alone_bit_for_bit(checkpoints, arch, tmp_path):
    """bf16, 6 experts cached (evictions and waves): the last position's prefill logits of three left-padded
    prompts equal each prompt's alone, bit for bit, and so do generate_batch's greedy tokens (continuous
    batching: two rows, three prompts) and each prompt generated alone."""
    from moesys.offload.batch import generate_batch
    from moesys.offload.batch_kv import PaddedBatchKV, cache_kwarg
    from tests.test_offload_generic import CONFIGS as GENERIC, _save_tiny

    if arch in GENERIC:
        _save_tiny(GENERIC[arch](), tmp_path)
    path, dtype = checkpoints.get(arch, tmp_path), torch.bfloat16
    model = mo.load(path, gpu_memory=budget(path, dtype, 6), dtype=dtype, exact=True)
    engine = model.moesys_offload
    assert model.config._attn_implementation == "moesys_exact" and not engine.grouped
    prompts = [[5, 17, 3, 99, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15], [60, 2, 33]]
    device = engine.device
    with torch.no_grad():
        # generate_batch's own prefill inputs: left-padded, positions from the mask, a fresh cache
        group = PaddedBatchKV(model.config, device, cache_name=cache_kwarg(model)).prefill_inputs(prompts)
        batch = model(**group).logits[:, -1]
        for i, p in enumerate(prompts):
            alone = model(input_ids=torch.tensor([p], device=device)).logits[0, -1]
            assert torch.equal(alone, batch[i]), i
    assert model.moesys_exact_calls > 0
    run = {r.index: r.token_ids for r in generate_batch(model, prompts, max_new_tokens=4, batch_size=2, eos=[])}
    alone = [next(iter(generate_batch(model, [p], max_new_tokens=4, batch_size=1, eos=[]))).token_ids
             for p in prompts]
    assert [run[i] for i in range(3)] == alone
    assert engine.snapshot().evictions > 0
    with pytest.raises(ValueError, match="kv='device'"):
        generate_batch(model, prompts, max_new_tokens=2, kv="host")


def test_exact_refuses_what_it_cannot_make_batch_invariant(checkpoints, tmp_path):
    from tests.test_offload_generic import CONFIGS as GENERIC, _save_tiny

    path = checkpoints["qwen3_moe"]
    gib = budget(path, torch.float32, 6)
    with pytest.raises(ValueError, match="quantize_experts='none'"):
        mo.load(path, gpu_memory=gib, exact=True, quantize_experts="int4")
    with pytest.raises(ValueError, match="experts_implementation='eager'"):
        mo.load(path, gpu_memory=gib, exact=True, experts_implementation="grouped_mm")
    with pytest.raises(ValueError, match="cuda_graph"):
        mo.load(path, gpu_memory=gib, exact=True, cuda_graph=True)
    with pytest.raises(ValueError, match="must be True or False"):
        mo.load(path, gpu_memory=gib, exact="yes")
    _save_tiny(GENERIC["jamba"](), tmp_path)
    with pytest.raises(ValueError, match="recurrent"):
        mo.load(tmp_path, gpu_memory=1 << 30, exact=True)


def test_generate_cli_exact(checkpoints, tmp_path, monkeypatch, capsys):
    """`moesys generate --exact --prompts`: the model loads with exact=True (no CUDA graph unless asked, which
    is refused in one line) and its results are generate_batch's under exact mode."""
    import json

    from moesys.cli import main
    from moesys.offload import loader

    loaded = []
    build = loader.build
    monkeypatch.setattr(loader, "build", lambda *a, **kw: loaded.append(kw) or build(*a, **kw))
    path = checkpoints["olmoe"]
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"token_ids": [5, 6, 7]}) + "\n" + json.dumps({"token_ids": [9, 3]}) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", str(path), "--gpu-memory", "1GiB", "--dtype", "float32", "--max-new-tokens", "2",
            "--prompts", str(src), "--out", str(out), "--exact", "--batch-size", "2"]
    assert main(args) == 0, capsys.readouterr().err
    assert loaded[-1]["exact"] is True and loaded[-1]["cuda_graph"] is False
    got = [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]
    assert sorted(map(len, got)) == [2, 2]
    capsys.readouterr()
    assert main(args + ["--cuda-graph", "on"]) == 2
    err = capsys.readouterr().err
    assert "exact=True decodes without the CUDA-graph step" in err and len(err.strip().splitlines()) == 1, err
    assert main(args + ["--kv", "host"]) == 2
    assert "drop --kv host" in capsys.readouterr().err

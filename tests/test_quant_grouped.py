"""moesys.offload.quant_grouped: the grouped W4A16 / W8A16 decode op (TRITON_INTERPRET=1 on a CPU, CUDA on a
GPU) against its torch reference on odd shapes, both scale layouts (a tile inside one scale group, and groups
narrower than a tile), slots shared by many rows (several blocks of one slot); a row's output does not depend
on the rows beside it (batch equals alone, bit for bit); the device-side grouping."""

import pytest
import torch

from moesys.offload import quant
from moesys.offload.quant_grouped import kernel_consts, quant_moe_mlp, quant_moe_mlp_reference
from tests.test_offload import checkpoints  # noqa: F401

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pools(mode, S, H, I, group_h, group_i, seed=0):
    g = torch.Generator().manual_seed(seed)
    pools = {}
    for name, (R, C, group) in {"gate_up": (2 * I, H, group_h), "down": (H, I, group_i)}.items():
        w = torch.randn(S, R, C, generator=g) * torch.rand(S, R, 1, generator=g) / C ** 0.5 * 3
        qs, ss = zip(*(quant.quantize(w[s], mode, group_size=group) for s in range(S)))
        pools[f"{name}.q"], pools[f"{name}.scale"] = torch.stack(qs), torch.stack(ss)
    return pools


def _routing(T, K, S, seed=1):
    """(ids, slots, weights): K distinct experts of S per token, expert e in slot SLOT_OF[e] (a permutation:
    the cache's lookup), expert 2 in every token's rows (more than a block of one expert, BM = 16)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(T)])
    ids[:, 1:] = torch.where(ids[:, 1:] == 2, ids[:, :1], ids[:, 1:])
    ids[:, 0] = 2
    slot_of = torch.randperm(S, generator=g)
    w = torch.rand(T, K, generator=g)
    return ids, slot_of[ids], w / w.sum(1, keepdim=True)


@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_h,group_i", [(16, 20), (12, 40)])  # a tile (BK 16) in one group; groups < a tile
def test_kernel_matches_the_reference(mode, dtype, group_h, group_i):
    S, H, I, T, K = 6, 48, 40, 19, 3
    pools = _pools(mode, S, H, I, group_h, group_i)
    assert pools["gate_up.scale"].shape[-1] == H // group_h and pools["down.scale"].shape[-1] == I // group_i
    ids, slots, w = _routing(T, K, S)
    assert all(len(set(r)) == K for r in ids.tolist())
    x = torch.randn(T, H).to(dtype)
    want = quant_moe_mlp_reference(x, pools, slots, w, mode, "silu")
    dev = {k: v.to(DEVICE) for k, v in pools.items()}
    got = quant_moe_mlp(x.to(DEVICE), dev, ids.to(DEVICE), slots.to(DEVICE), w.to(DEVICE), mode, "silu", S,
                        use_kernel=True).cpu()
    assert got.dtype == dtype and got.shape == (T, H)
    # fp32 summation order differs (tiles of BK columns vs one bmm); 16-bit types also round h and a
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        # Triton's interpreter rounds float32 -> bfloat16 by truncation (the weights, h and a: a bias of a few
        # percent toward zero); the GPU rounds to nearest and meets the tolerance above
        assert (got.float() - want.float()).norm() < 0.05 * want.float().norm()
    else:
        torch.testing.assert_close(got.float(), want.float(), **tol)
    if dtype != torch.float32:
        return
    # the reference is the dequantized experts' product (quant.dequantize: the host path's weights)
    deq = {n: quant.dequantize(pools[f"{n}.q"], pools[f"{n}.scale"], mode, torch.float32) for n in ("gate_up", "down")}
    xf, ref = x.float(), torch.zeros(T, H)
    for t in range(T):
        for j in range(K):
            gate, up = (deq["gate_up"][slots[t, j]] @ xf[t]).chunk(2)
            ref[t] += w[t, j] * (deq["down"][slots[t, j]] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(want.float(), ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_decodes_the_same_in_a_batch_as_alone(dtype):
    """Each token's output in a batch of 19 equals the token run alone, bit for bit on a GPU: fixed block shape,
    a row's products never mix with another row's, a fixed combine order (no atomics)."""
    S, H, I, T, K = 6, 48, 40, 19, 3
    pools = {k: v.to(DEVICE) for k, v in _pools("int4", S, H, I, 16, 20).items()}
    ids, slots, w = (t.to(DEVICE) for t in _routing(T, K, S))
    x = torch.randn(T, H).to(DEVICE, dtype)
    batch = quant_moe_mlp(x, pools, ids, slots, w, "int4", "silu", S, use_kernel=True)
    for t in (0, 7, 18):
        alone = quant_moe_mlp(x[t:t + 1], pools, ids[t:t + 1], slots[t:t + 1], w[t:t + 1], "int4", "silu", S,
                              use_kernel=True)
        if DEVICE == "cuda":
            assert torch.equal(batch[t:t + 1], alone), t
        else:  # the interpreter's dot is numpy's matmul, whose rounding moves with a row's place in the tile
            torch.testing.assert_close(batch[t:t + 1], alone, atol=1e-6, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_bad_input():
    pools = _pools("int4", 2, 16, 8, 16, 8)
    x, ids, w = torch.randn(1, 16), torch.tensor([[0, 1]]), torch.rand(1, 2)
    with pytest.raises(ValueError, match="mode='none'"):
        quant_moe_mlp(x, pools, ids, ids, w, "none", "silu", 2)
    with pytest.raises(ValueError, match="not a gated one"):
        quant_moe_mlp(x, pools, ids, ids, w, "int4", "relu", 2)
    # CPU tensors default to the reference
    assert torch.equal(quant_moe_mlp(x, pools, ids, ids, w, "int4", "silu", 2),
                       quant_moe_mlp_reference(x, pools, ids, w, "int4", "silu"))


def test_no_routed_rows_add_nothing():
    """No tokens, or tokens routed to no expert (K = 0): the kernel path returns [T, H] zeros, launching nothing."""
    pools = _pools("int4", 2, 16, 8, 16, 8)
    for T, K in ((0, 2), (3, 0)):
        ids, w = torch.zeros(T, K, dtype=torch.long, device=DEVICE), torch.rand(T, K, device=DEVICE)
        x = torch.randn(T, 16, device=DEVICE)
        out = quant_moe_mlp(x, {n: p.to(DEVICE) for n, p in pools.items()}, ids, ids, w, "int4", "silu", 2,
                            use_kernel=True)
        assert out.shape == (T, 16) and not out.any()


@pytest.mark.parametrize("kernel", [False, True])
def test_device_batch_of_int4_experts_runs_grouped_and_decodes_as_alone(checkpoints, kernel, monkeypatch):
    """generate_batch(bookkeeping="device") of int4 experts with the grouped op from the first routed row on:
    every decode step's layers go through quant_moe_mlp (the Triton kernel under the interpreter when
    `kernel`), each sequence's tokens equal the same prompt decoded alone on the same path, and equal the host
    path's (dequantized waves through moe_mlp: the same weights, fp32)."""
    import moesys.offload as mo
    import moesys.offload.engine as engine_mod
    from moesys.offload.batch import generate_batch
    from tests.test_offload_batch import budget, prompts

    path, dtype, new = checkpoints["olmoe"], torch.float32, 3 if kernel else 6
    ps = prompts()[:2 if kernel else 4]  # the interpreter runs each kernel program in Python: fewer steps
    model = mo.load(path, gpu_memory=budget(path, dtype, 16), dtype=dtype, cuda_graph=False, quantize_experts="int4")
    engine = model.moesys_offload
    engine.quant_grouped_min_rows = 1
    calls = []
    real = engine_mod.quant_moe_mlp

    def spy(x_TH, *args, **kwargs):
        calls.append(x_TH.shape[0])
        return real(x_TH, *args, use_kernel=kernel, **kwargs)
    monkeypatch.setattr(engine_mod, "quant_moe_mlp", spy)
    batch = {r.index: r.token_ids for r in generate_batch(model, ps, max_new_tokens=new, batch_size=4,
                                                         bookkeeping="device")}
    assert calls and max(calls) == len(ps)  # the decode steps' rows, each layer
    if not kernel:
        solo = [next(iter(generate_batch(model, [p], max_new_tokens=new, batch_size=1, bookkeeping="device")))
                .token_ids for p in ps]
        assert [batch[i] for i in range(len(ps))] == solo
    calls.clear()
    host = {r.index: r.token_ids for r in generate_batch(model, ps, max_new_tokens=new, batch_size=4,
                                                        bookkeeping="host")}
    assert not calls and host == batch


@pytest.mark.parametrize("up", [True, False])
def test_a_block_writes_its_own_experts_rows_only(up):
    """A block is BM rows from its expert's start in the sorted order, cut at the expert's end; the rows past
    it belong to the next expert's block, and writing them too would race with it on a GPU (the interpreter
    runs blocks in order, so the later block would hide it). Launched alone, the first block leaves the other
    expert's rows untouched."""
    from moesys.kernels.routing import sort_routing
    from moesys.offload.quant_grouped import _project

    S, H, I = 3, 32, 16
    pools = {k: v.to(DEVICE) for k, v in _pools("int4", S, H, I, 16, 16).items()}
    ids = torch.tensor([[0, 1], [0, 1], [1, 0], [1, 2]], device=DEVICE)  # expert 0: routed rows 0, 2, 5
    slots = torch.tensor([2, 0, 1], device=DEVICE)[ids]
    _, perm_N, offsets_E = sort_routing(ids, S)
    assert offsets_E.tolist() == [3, 7, 8]
    N, w_N = ids.numel(), torch.rand(8, device=DEVICE)
    part = "gate_up" if up else "down"
    a = torch.randn(4, H, device=DEVICE) if up else torch.randn(N, I, device=DEVICE)  # x (T = 4, K = 2), or a
    out = torch.full((N, I if up else H), float("nan"), device=DEVICE)
    _project(a, pools[f"{part}.q"], pools[f"{part}.scale"], (perm_N, offsets_E), slots.reshape(-1), w_N, out, 2, up,
             kernel_consts("int4", "silu", torch.float32), blocks=1)
    written = out.isfinite().all(1).cpu()
    mine = torch.tensor([0, 1, 2]) if up else torch.tensor([0, 2, 5])  # expert 0's rows: sorted, or as routed
    want = torch.zeros(N, dtype=torch.bool)
    want[mine] = True
    assert torch.equal(written, want)


def test_engine_takes_the_grouped_op_from_its_row_limit(checkpoints, monkeypatch):
    """_quantized_rows: quant_gemv's rows below QUANT_GROUPED_MIN_ROWS routed rows (one token always), the
    grouped op from there; both give the reference's result for the same rows."""
    import moesys.offload as mo
    import moesys.offload.engine as engine_mod
    from tests.test_offload_batch import budget

    path = checkpoints["olmoe"]
    model = mo.load(path, gpu_memory=budget(path, torch.float32, 16), dtype=torch.float32, cuda_graph=False,
                    quantize_experts="int4")
    engine = model.moesys_offload
    E, K = engine.cache.num_experts, engine.top_k
    assert engine.quant_grouped_min_rows == engine_mod.QUANT_GROUPED_MIN_ROWS > K
    ran = []
    for name in ("quant_gemv", "quant_moe_mlp"):
        def spy(*a, _real=getattr(engine_mod, name), _name=name, **k):
            ran.append(_name)
            return _real(*a, **k)
        monkeypatch.setattr(engine_mod, name, spy)
    layer = next(iter(engine.inner))
    engine._ensure(layer, list(range(E)))
    engine._wait_all()
    g = torch.Generator().manual_seed(0)
    outs = {}
    for T in (engine.quant_grouped_min_rows // K - 1, engine.quant_grouped_min_rows // K):
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        x, w = torch.randn(T, engine.store.H, generator=g), torch.rand(T, K, generator=g)
        slots = engine._table_slots(layer, ids.reshape(-1), global_slots=True)
        ran.clear()
        outs[T] = engine._quantized_rows(x, ids, slots, w)
        assert ran == (["quant_moe_mlp"] if T * K >= engine.quant_grouped_min_rows else ["quant_gemv", "quant_gemv"])
        ref = quant_moe_mlp_reference(x, engine.cache.pools, slots.view(T, K), w, "int4", engine.activation)
        torch.testing.assert_close(outs[T], ref, atol=1e-5, rtol=1e-4)

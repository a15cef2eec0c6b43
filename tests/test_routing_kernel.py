"""sort_routing's Triton kernel (the CPU interpreter without a GPU) against sort_routing_reference, bit for bit:
odd and edge shapes, int32 and int64 ids, empty experts, several blocks; a CUDA-graph replay on a GPU."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesys.kernels import routing
from moesys.kernels.launch import is_interpreted, unavailable_reason
from moesys.kernels.routing import sort_routing, sort_routing_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(unavailable_reason(DEVICE) is not None,
                                reason=f"Triton kernels cannot run: {unavailable_reason(DEVICE)}")
BLOCK = routing.BLOCK_INTERPRETED if is_interpreted() else routing.BLOCK_GPU


def make_ids(T, K, E, dtype, seed, distinct=True, empty_expert=None):
    """[T, K] ids on DEVICE; distinct experts per token (as a top-k router gives) or drawn with repeats."""
    g = torch.Generator().manual_seed(seed)
    if distinct:
        scores = torch.rand(T, E, generator=g)
        if empty_expert is not None:
            scores[:, empty_expert] = -1.0
        ids = scores.topk(K, dim=1).indices
    else:
        ids = torch.randint(0, E, (T, K), generator=g)
        if empty_expert is not None:
            ids[ids == empty_expert] = (empty_expert + 1) % E
    return ids.to(device=DEVICE, dtype=dtype)


def assert_same(ids, E):
    got, want = sort_routing(ids, E), sort_routing_reference(ids, E)
    for name, g, w in zip(("token_N", "perm_N", "offsets_E"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and g.device == w.device, (name, g, w)
        assert torch.equal(g, w), f"{name}: kernel {g.tolist()} != reference {w.tolist()}"


DTYPES = pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["int32", "int64"])


@DTYPES
@pytest.mark.parametrize("T,K,E", [(0, 2, 4), (1, 1, 1), (1, 3, 3), (37, 2, 5), (13, 6, 6), (50, 1, 1),
                                   (BLOCK + 17, 2, 3)],
                         ids=["T0", "T1-E1", "T1-K=E", "odd-T", "K=E", "E1", "several-blocks"])
def test_matches_reference(T, K, E, dtype):
    assert_same(make_ids(T, K, E, dtype, seed=T + K + E), E)


@DTYPES
def test_empty_experts(dtype):
    """Expert 3 of 7 gets no rows (so do experts past the largest id drawn, in the second case)."""
    assert_same(make_ids(29, 2, 7, dtype, seed=1, empty_expert=3), 7)
    assert_same(make_ids(29, 2, 3, dtype, seed=2), 9)


def test_one_expert_takes_every_row_across_blocks():
    """The running count carries one expert's ranks from block to block."""
    ids = torch.full((2 * BLOCK + 5, 1), 2, dtype=torch.int64, device=DEVICE)
    ids[::7] = 0
    assert_same(ids, 4)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(0, 70), E=st.integers(1, 9), data=st.data(), distinct=st.booleans(),
       int32=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes(T, E, data, distinct, int32, seed):
    K = data.draw(st.integers(1, E))
    assert_same(make_ids(T, K, E, torch.int32 if int32 else torch.int64, seed, distinct), E)


def test_non_contiguous_ids():
    ids = make_ids(23, 4, 6, torch.int64, seed=3)[:, ::2]
    assert not ids.is_contiguous()
    assert_same(ids, 6)


def test_uses_the_reference_where_the_kernel_cannot_run(monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the kernel was launched")

    monkeypatch.setattr(routing, "unavailable_reason", lambda device: "no kernels here")
    monkeypatch.setattr(routing, "sort_routing_kernel", NoLaunch())
    ids = make_ids(11, 2, 5, torch.int64, seed=4)
    for g, w in zip(sort_routing(ids, 5), sort_routing_reference(ids, 5)):
        assert torch.equal(g, w)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: real sizes and CUDA-graph capture")
@pytest.mark.parametrize("T,K,E", [(8192, 8, 128), (8192, 2, 8), (1, 8, 128)], ids=["qwen3", "mixtral", "decode"])
def test_gpu_real_sizes_and_cuda_graph(T, K, E):
    """Real sizes bit for bit; then captured in a CUDA graph, replayed on new ids (no host sync inside)."""
    ids = make_ids(T, K, E, torch.int64, seed=5)
    assert_same(ids, E)
    sort_routing(ids, E)  # compiled before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = sort_routing(ids, E)
    ids.copy_(make_ids(T, K, E, torch.int64, seed=6))
    graph.replay()
    for g, w in zip(outs, sort_routing_reference(ids, E)):
        assert torch.equal(g, w)

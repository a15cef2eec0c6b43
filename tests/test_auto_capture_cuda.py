"""backend="auto" under a real CUDA-graph capture (GPU only): a captured call whose Triton kernels never ran
keeps grouped_mm and the capture succeeds; after an eager warm-up inside `moesys.backends.capture_warmup()`
the capture takes Triton, and each replay gives the eager result of the backend it took."""

import sys
import types

import pytest
import torch

import moesys.backends as backends
from moesys.ops import moe_mlp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA-graph capture)")


@pytest.fixture
def counted(monkeypatch):
    """Both backends as themselves, with each call counted as (backend, capturing)."""
    calls = []
    mod = types.ModuleType("counted_backends")
    for name in ("triton", "grouped_mm"):
        real = backends.backend_impl(name)

        def impl(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, torch.cuda.is_current_stream_capturing()))
            return _real(*args, **kwargs)

        setattr(mod, name, impl)
        monkeypatch.setitem(backends._BACKENDS, name, ("counted_backends", name))
    monkeypatch.setitem(sys.modules, "counted_backends", mod)
    monkeypatch.setattr(backends, "_TRITON_RAN", set())
    return calls


def _inputs(T, H=256, I=128, E=16, K=4, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    w_gu = (torch.randn(E, 2 * I, H, device="cuda", generator=g) / H ** 0.5).bfloat16()
    w_d = (torch.randn(E, H, I, device="cuda", generator=g) / I ** 0.5).bfloat16()
    ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:K] for _ in range(T)])
    tw = torch.rand(T, K, device="cuda", generator=g).softmax(-1).bfloat16()
    return x, w_gu, w_d, ids, tw


def _capture(step, warmup_context):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), warmup_context:
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


@pytest.mark.parametrize("T", [3, 37])  # 0.75 and 9.25 rows per expert: grouped_mm when eager
@torch.no_grad()
def test_capture_takes_triton_only_after_a_capture_warmup(counted, T):
    import contextlib

    args = _inputs(T)
    assert backends.resolve_backend("auto", args[0], rows_per_expert=T * 4 / 16, needs_grad=False) == "grouped_mm"
    ref = {name: moe_mlp(*args, backend=name) for name in ("grouped_mm", "triton")}
    backends._TRITON_RAN.clear()  # the reference run above readied Triton: start again from nothing

    counted.clear()
    graph, out = _capture(lambda: moe_mlp(*args), contextlib.nullcontext())
    assert counted == [("grouped_mm", False), ("grouped_mm", True)]  # never ran Triton: grouped_mm captured
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref["grouped_mm"], rtol=0, atol=0)

    counted.clear()
    graph, out = _capture(lambda: moe_mlp(*args), backends.capture_warmup())
    # the warm-up ran Triton once (dropped) beside its own grouped_mm; the capture took Triton
    assert counted == [("triton", False), ("grouped_mm", False), ("triton", True)]
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref["triton"], rtol=0, atol=0)
    torch.testing.assert_close(out.float(), ref["grouped_mm"].float(), rtol=2e-2, atol=2e-2)

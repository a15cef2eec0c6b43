"""The backend registry (moesys/backends/__init__.py): what get_backend resolves a name to, what decides
"auto"'s `triton_ok`, why Triton cannot run, and which modules `preload` imports. CPU-only: a stand-in
for a CUDA tensor (get_backend reads only `is_cuda`, `dtype` and `device`) and a stand-in `_import`
reach the branches a GPU machine takes."""

from types import SimpleNamespace

import pytest
import torch

import moesys.backends as backends
from moesys.backends.grouped_mm import moe_mlp_grouped_mm
from moesys.backends.loop import moe_mlp_loop


def _cuda_like(dtype):
    return SimpleNamespace(is_cuda=True, dtype=dtype, device=torch.device("cuda", 0))


@pytest.fixture
def picks(monkeypatch):
    """Record what get_backend passes to pick_auto; "auto" then resolves to grouped_mm."""
    seen = []

    def spy(rows_per_expert, needs_grad, triton_ok, thresholds=None, capturing=False, triton_ready=False):
        seen.append((rows_per_expert, needs_grad, triton_ok))
        return "grouped_mm"

    monkeypatch.setattr(backends, "pick_auto", spy)
    return seen


@pytest.mark.parametrize("x, reason, triton_ok", [
    (_cuda_like(torch.bfloat16), None, True),
    (_cuda_like(torch.float32), None, True),
    (_cuda_like(torch.bfloat16), "no Triton", False),  # CUDA, but the kernels cannot run
    (_cuda_like(torch.float64), None, False),  # a dtype the kernels do not take
    (torch.zeros(2, 2), None, False),  # CPU, even where the interpreter could run the kernels
])
def test_auto_offers_triton_only_on_cuda_with_a_supported_dtype_and_runnable_kernels(
        monkeypatch, picks, x, reason, triton_ok):
    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda device: reason)
    assert backends.get_backend("auto", x, rows_per_expert=1e6, needs_grad=True) is moe_mlp_grouped_mm
    assert picks == [(1e6, True, triton_ok)]


def test_auto_defaults_to_a_large_training_call(monkeypatch, picks):
    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda device: None)
    backends.get_backend("auto", _cuda_like(torch.bfloat16))
    assert picks == [(float("inf"), True, True)]


@pytest.mark.parametrize("name", ["Auto", "AUTO", ""])
def test_names_are_exact(name):
    # "Auto" and "" sort before "auto": they must be rejected, not taken for it
    with pytest.raises(ValueError, match=f"backend={name!r} is unknown"):
        backends.get_backend(name, torch.zeros(2, 2))


def test_only_triton_asks_whether_triton_can_run(monkeypatch):
    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda device: "no GPU")
    x = torch.zeros(2, 2)
    assert backends.get_backend("grouped_mm", x) is moe_mlp_grouped_mm
    assert backends.get_backend("loop", x) is moe_mlp_loop
    with pytest.raises(RuntimeError, match="cannot run here: no GPU"):
        backends.get_backend("triton", x)


def _imports(monkeypatch, modules):
    """Make `_import` return `modules[name]` (or raise the ImportError given there) and log its calls."""
    calls = []

    def fake_import(name):
        calls.append(name)
        if isinstance(modules.get(name), ImportError):
            raise modules[name]
        return modules.get(name, SimpleNamespace())

    monkeypatch.setattr(backends, "_import", fake_import)
    return calls


def test_triton_unavailable_reason_asks_the_kernels(monkeypatch):
    cpu = torch.device("cpu")
    _imports(monkeypatch, {"moesys.kernels": SimpleNamespace(unavailable_reason=lambda d: f"nothing on {d}")})
    assert backends.triton_unavailable_reason(cpu) == "nothing on cpu"
    _imports(monkeypatch, {"moesys.kernels": SimpleNamespace()})  # no check offered: assume it runs
    assert backends.triton_unavailable_reason(cpu) is None
    _imports(monkeypatch, {"moesys.kernels": ImportError("no module named triton")})
    assert backends.triton_unavailable_reason(cpu) == \
        "the Triton kernels could not be imported (no module named triton)"


@pytest.mark.parametrize("name, imported", [
    ("auto", ["moesys.backends.grouped_mm", "moesys.kernels"]),
    ("loop", ["moesys.backends.loop"]),
    ("grouped_mm", ["moesys.backends.grouped_mm"]),
    ("triton", ["moesys.kernels"]),
    ("cuda_magic", []),  # unknown: left to get_backend to report
])
def test_preload_imports_what_the_backend_may_dispatch_to(monkeypatch, name, imported):
    calls = _imports(monkeypatch, {})
    backends.preload(name)
    assert calls == imported


def test_preload_leaves_a_triton_that_cannot_be_imported_to_get_backend(monkeypatch):
    calls = _imports(monkeypatch, {"moesys.kernels": ImportError("no module named triton")})
    backends.preload("auto")  # does not raise
    assert calls == ["moesys.backends.grouped_mm", "moesys.kernels"]

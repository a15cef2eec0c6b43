"""backend="auto" (moesys/backends/auto.py) picks per its threshold table at the thresholds, moe_mlp feeds it
T*K/E and whether a gradient is needed, and the sweep's suggested table minimises the worst ratio."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moesys.backends as backends
from moesys.backends import auto
from moesys.backends.auto import AUTO_TRITON_MIN_ROWS_PER_EXPERT, pick_auto
from moesys.ops import moe_mlp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from moe_auto_sweep import suggest_thresholds  # noqa: E402


@pytest.mark.parametrize("needs_grad, capturing, mode", [(False, False, "inference"), (True, False, "training"),
                                                          (True, True, "training")])
def test_pick_follows_the_table_at_its_threshold(needs_grad, capturing, mode):
    thr = AUTO_TRITON_MIN_ROWS_PER_EXPERT[mode]
    assert pick_auto(thr, needs_grad, triton_ok=True, capturing=capturing) == "triton"
    assert pick_auto(thr * 0.999, needs_grad, triton_ok=True, capturing=capturing) == "grouped_mm"
    assert pick_auto(1e9, needs_grad, triton_ok=False, capturing=capturing) == "grouped_mm"  # no Triton, no choice


def test_a_captured_call_takes_triton_only_once_its_kernels_ran_outside_a_capture():
    # inside a capture Triton can neither load a kernel module nor time its configs: a call whose kernels
    # did not run before keeps grouped_mm there, at every size; one whose kernels did follows the graph entry
    for rpe in (0.06, 64.0, 1e6):
        assert pick_auto(rpe, False, triton_ok=True, capturing=True, triton_ready=False) == "grouped_mm"
    thr = AUTO_TRITON_MIN_ROWS_PER_EXPERT["graph"]
    assert thr < AUTO_TRITON_MIN_ROWS_PER_EXPERT["inference"]  # captured calls take Triton sooner (the sweep)
    assert pick_auto(max(thr, 0.06), False, triton_ok=True, capturing=True, triton_ready=True) == "triton"
    assert pick_auto(1e6, False, triton_ok=False, capturing=True, triton_ready=True) == "grouped_mm"
    # the graph entry is the one consulted under capture
    table = {"graph": 1.0, "inference": 100.0, "training": 100.0}
    assert pick_auto(2.0, False, True, thresholds=table, capturing=True, triton_ready=True) == "triton"
    assert pick_auto(0.5, False, True, thresholds=table, capturing=True, triton_ready=True) == "grouped_mm"
    assert pick_auto(2.0, False, True, thresholds=table, capturing=False) == "grouped_mm"
    assert pick_auto(2.0, True, True, thresholds=table, capturing=True, triton_ready=True) == "grouped_mm"


@pytest.fixture
def fake_cuda_backends(monkeypatch):
    """moe_mlp on CPU tensors as if they were CUDA ones, with counting stand-ins for both backends, a capture
    switch (`state["capturing"]`) and an empty record of the calls whose Triton kernels ran."""
    import types

    state = {"capturing": False, "calls": []}
    fake = types.ModuleType("fake_backends")

    def make(name):
        def impl(x, w_gu, w_d, ids, tw, *, activation, b_gate_up, b_down):
            state["calls"].append((name, state["capturing"]))
            return torch.zeros_like(x)
        return impl

    fake.triton, fake.grouped_mm = make("triton"), make("grouped_mm")
    monkeypatch.setitem(sys.modules, "fake_backends", fake)
    monkeypatch.setitem(backends._BACKENDS, "triton", ("fake_backends", "triton"))
    monkeypatch.setitem(backends._BACKENDS, "grouped_mm", ("fake_backends", "grouped_mm"))
    monkeypatch.setattr(backends, "_triton_ok", lambda x: True)
    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda device: None)
    monkeypatch.setattr(backends, "remembers_triton", lambda x: True)
    monkeypatch.setattr(backends, "_capturing", lambda x: state["capturing"])
    monkeypatch.setattr(backends, "_TRITON_RAN", set())
    return state


def _call(T=3, backend="auto", grad=False, H=8, I=4, E=4, K=2, offset=0):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T * H + offset, generator=g)[offset:].view(T, H)  # offset: the same shape at another address
    w_gu, w_d = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    ids, tw = torch.randint(0, E, (T, K), generator=g), torch.rand(T, K, generator=g)
    with torch.set_grad_enabled(grad):
        return moe_mlp(x, w_gu.requires_grad_(grad), w_d, ids, tw, backend=backend)


def test_capture_warmup_readies_triton_for_the_captured_call(fake_cuda_backends):
    state = fake_cuda_backends
    calls = state["calls"]
    x_args = dict(T=3)  # 1.5 rows per expert: eager inference takes grouped_mm

    def run(capturing, **kw):
        state["capturing"] = capturing
        calls.clear()
        _call(**{**x_args, **kw})
        return list(calls)

    assert run(False) == [("grouped_mm", False)]  # eager, no warm-up context: nothing extra
    assert run(True) == [("grouped_mm", True)]  # captured before its Triton kernels ran: grouped_mm
    with backends.capture_warmup():
        assert backends.warming_for_capture()
        # the warm-up runs Triton once (result dropped), then the eager choice
        assert run(False) == [("triton", False), ("grouped_mm", False)]
        assert run(False) == [("grouped_mm", False)]  # once per call signature
    assert not backends.warming_for_capture()
    assert run(True) == [("triton", True)]  # now the capture takes Triton
    assert run(True, T=5) == [("grouped_mm", True)]  # another shape: its kernels never ran
    assert run(True, offset=1) == [("grouped_mm", True)]  # the same shape, misaligned: another specialization
    # an explicit Triton call readies its signature too; a training call records nothing
    assert run(False, T=5, backend="triton") == [("triton", False)]
    assert run(True, T=5) == [("triton", True)]
    assert run(False, T=7, grad=True, backend="triton") == [("triton", False)]
    assert run(True, T=7) == [("grouped_mm", True)]
    # a capture inside a warm-up context readies nothing (Triton cannot run there)
    with backends.capture_warmup():
        assert run(True, T=9) == [("grouped_mm", True)]
    assert run(True, T=9) == [("grouped_mm", True)]


def test_the_record_of_ready_calls_is_bounded(fake_cuda_backends, monkeypatch):
    monkeypatch.setattr(backends, "TRITON_RAN_MAX", 2)
    for T in (1, 2, 3, 4):
        _call(T=T, backend="triton")
    assert len(backends._TRITON_RAN) == 2


def test_the_signature_tells_apart_what_triton_specializes_on():
    a = torch.randn(64)
    sig = backends.triton_signature
    base = sig((a[:32].view(4, 8), None), "silu")
    assert base == sig((a[:32].clone().view(4, 8), None), "silu")  # another aligned tensor of the same layout
    assert base != sig((a[1:33].view(4, 8), None), "silu")  # 4-byte offset: not 16-byte aligned
    assert base != sig((a[:32].view(8, 4), None), "silu")  # shape
    assert base != sig((a[:32].view(4, 8).t(), None), "silu")  # strides
    assert base != sig((a[:32].view(4, 8).double(), None), "silu")  # dtype
    assert base != sig((a[:32].view(4, 8), a[:4]), "silu")  # a bias
    assert base != sig((a[:32].view(4, 8), None), "gelu")  # activation


def test_the_table_is_what_decides(monkeypatch):
    # the module-level dict is consulted at call time: editing it changes the choice
    monkeypatch.setitem(auto.AUTO_TRITON_MIN_ROWS_PER_EXPERT, "inference", 2.0)
    monkeypatch.setitem(auto.AUTO_TRITON_MIN_ROWS_PER_EXPERT, "training", 100.0)
    assert pick_auto(3.0, False, True) == "triton"
    assert pick_auto(3.0, True, True) == "grouped_mm"
    assert pick_auto(1.0, False, True) == "grouped_mm"
    assert pick_auto(3.0, False, True, thresholds={"inference": 4.0, "training": 0.0}) == "grouped_mm"


def test_measured_decode_is_grouped_mm_and_large_calls_are_triton():
    # the case: Qwen3-30B-A3B (E=128, K=8) eager decode at T=64 measured 2.2x faster on grouped_mm
    # (H100 sweep: 0.96 ms against 2.05 ms); T=1024 eager (64 rows) and training (64 rows) also grouped_mm;
    # T=4096 (256 rows) Triton in every mode; OLMoE (E=64, K=8) training at T=1024 (128 rows) Triton
    assert pick_auto(64 * 8 / 128, False, True) == "grouped_mm"
    assert pick_auto(1024 * 8 / 128, False, True) == "grouped_mm"
    assert pick_auto(1024 * 8 / 128, True, True) == "grouped_mm"
    assert pick_auto(4096 * 8 / 128, False, True) == "triton"
    assert pick_auto(4096 * 8 / 128, True, True) == "triton"
    assert pick_auto(1024 * 8 / 64, True, True) == "triton"
    assert pick_auto(8192 * 8 / 128, True, True) == "triton"


def test_moe_mlp_passes_rows_per_expert_and_grad_need(monkeypatch):
    seen = []

    def spy(rows_per_expert, needs_grad, triton_ok, thresholds=None, capturing=False, triton_ready=False):
        seen.append((rows_per_expert, needs_grad))
        assert capturing is False  # CPU tensors are never captured
        return "grouped_mm"

    monkeypatch.setattr(backends, "pick_auto", spy)
    T, H, I, E, K = 6, 8, 4, 4, 2
    x = torch.randn(T, H)
    w_gu, w_d = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    ids, tw = torch.randint(0, E, (T, K)), torch.rand(T, K)
    with torch.no_grad():
        moe_mlp(x, w_gu, w_d, ids, tw)
    moe_mlp(x, w_gu, w_d, ids, tw)  # nothing requires grad
    moe_mlp(x, w_gu.requires_grad_(), w_d, ids, tw)
    with torch.no_grad():
        moe_mlp(x, w_gu, w_d, ids, tw)  # requires_grad, but no graph is recorded
    moe_mlp(x, w_gu, w_d, ids, tw, backend="grouped_mm")  # an explicit backend asks nothing
    assert seen == [(3.0, False), (3.0, False), (3.0, True), (3.0, False)]


def _rec(mode, rpe, g, t):
    return {"mode": mode, "rows_per_expert": rpe, "ms": {"grouped_mm": g, "triton": t}}


def test_suggested_threshold_minimises_the_worst_ratio():
    # inference: grouped_mm wins up to 4 rows/expert, Triton from 16; training: Triton wins everywhere
    recs = [_rec("fwd_eager", 1, 1.0, 2.0), _rec("fwd_eager", 4, 1.0, 1.5), _rec("fwd_eager", 16, 2.0, 1.0),
            _rec("fwd_eager", 64, 4.0, 3.0), _rec("fwdbwd", 1, 3.0, 2.0), _rec("fwdbwd", 64, 9.0, 6.0)]
    sug = suggest_thresholds(recs)
    assert 4 < sug["inference"]["threshold"] <= 16 and sug["inference"]["worst_ratio"] == 1.0
    assert sug["training"]["threshold"] == 0.0 and sug["training"]["worst_ratio"] == 1.0
    assert "graph" not in sug  # no fwd_graph points, no suggestion


def test_graph_points_get_their_own_threshold():
    # captured calls are timed apart from eager ones: Triton wins every captured point, grouped_mm every
    # eager one, so the table says "graph": 0 and "inference": inf, each with a worst ratio of 1
    recs = [_rec("fwd_graph", 1, 0.10, 0.06), _rec("fwd_graph", 64, 0.50, 0.40), _rec("fwd_eager", 1, 0.5, 1.1),
            _rec("fwd_eager", 64, 0.9, 2.0)]
    sug = suggest_thresholds(recs)
    assert sug["graph"]["threshold"] == 0.0 and sug["graph"]["worst_ratio"] == 1.0
    assert sug["inference"]["threshold"] == float("inf") and sug["inference"]["worst_ratio"] == 1.0
    # a point where neither side is perfect: the threshold with the smaller worst ratio wins
    # (all grouped_mm has the lower mean ratio, 1.05, but a worst of 1.2; switching at 4 rows caps it at 1.15)
    recs = [_rec("fwd_eager", 1, 1.0, 2.0), _rec("fwd_eager", 4, 1.2, 1.0), _rec("fwd_eager", 8, 1.0, 1.15),
            _rec("fwd_eager", 16, 1.0, 1.15)]
    sug = suggest_thresholds(recs)["inference"]
    assert 1 < sug["threshold"] <= 4 and sug["worst_ratio"] == pytest.approx(1.15)


@pytest.mark.slow
def test_sweep_cpu_smoke_writes_records(tmp_path):
    out = tmp_path / "sweep.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)  # interpreted Triton takes minutes here; grouped_mm alone is timed
    run = subprocess.run([sys.executable, "bench/moe_layer.py", "--sweep-auto", "--cpu-smoke", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    recs = json.loads(out.read_text())
    assert {(r["T"], r["mode"]) for r in recs} == {(T, m) for T in (1, 4, 16) for m in ("fwd_eager", "fwdbwd")}
    assert all(r["auto_choice"] == "grouped_mm" and r["ms"]["auto"] > 0 for r in recs)
    assert "worst auto/best over the sweep" in run.stdout


def test_capture_is_asked_of_cuda_calls_only_and_not_while_compiling(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert backends._capturing(SimpleNamespace(is_cuda=True)) is True
    assert backends._capturing(SimpleNamespace(is_cuda=False)) is False
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert backends._capturing(SimpleNamespace(is_cuda=True)) is False
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert backends._capturing(SimpleNamespace(is_cuda=True)) is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only build cannot be asked
    assert backends._capturing(SimpleNamespace(is_cuda=True)) is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert backends._capturing(SimpleNamespace(is_cuda=True)) is False


def test_get_backend_passes_the_capture_state_to_the_choice(monkeypatch):
    seen = []

    def spy(rows_per_expert, needs_grad, triton_ok, thresholds=None, capturing=False, triton_ready=False):
        seen.append(capturing)
        return "grouped_mm"

    monkeypatch.setattr(backends, "pick_auto", spy)
    monkeypatch.setattr(backends, "_capturing", lambda x: True)
    backends.get_backend("auto", torch.zeros(2, 2), rows_per_expert=1.0, needs_grad=False)
    monkeypatch.setattr(backends, "_capturing", lambda x: False)
    backends.get_backend("auto", torch.zeros(2, 2), rows_per_expert=1.0, needs_grad=False)
    assert seen == [True, False]

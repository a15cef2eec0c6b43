"""moe_mlp: every reference backend against the float64 per-token oracle (forward and every gradient),
the edge cases (T = 0, K = E, E = 1, experts with no tokens) and the documented input errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moesys import moe_mlp
from moesys.activations import ACTIVATIONS, Activation, clamped_swiglu, is_gated
from tests.moe_oracle import moe_mlp_oracle, rel_err

BACKENDS = ["loop", "grouped_mm"]


def make_inputs(T, H, I, E, K, activation, bias, dtype, seed, skew=False):
    g = torch.Generator().manual_seed(seed)
    rows = 2 * I if is_gated(activation) else I
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    w_gate_up = torch.randn(E, rows, H, generator=g, dtype=torch.float64) / H ** 0.5
    w_down = torch.randn(E, H, I, generator=g, dtype=torch.float64) / I ** 0.5
    if skew:  # every token picks from the first K experts: the others get no tokens
        ids = torch.stack([torch.randperm(K, generator=g) for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    else:
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    weights = torch.rand(T, K, generator=g, dtype=torch.float64)
    b_gate_up = torch.randn(E, rows, generator=g, dtype=torch.float64) if bias else None
    b_down = torch.randn(E, H, generator=g, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_()
    return dict(x=cast(x), w_gate_up=cast(w_gate_up), w_down=cast(w_down), topk_ids=ids,
                topk_weights=cast(weights), b_gate_up=cast(b_gate_up), b_down=cast(b_down))


DIFF_INPUTS = ["x", "w_gate_up", "w_down", "topk_weights", "b_gate_up", "b_down"]


def run(fn, inp, grad_out, **kw):
    leaves = {k: inp[k].detach().clone().requires_grad_() for k in DIFF_INPUTS if inp[k] is not None}
    y = fn(leaves["x"], leaves["w_gate_up"], leaves["w_down"], inp["topk_ids"], leaves["topk_weights"],
           b_gate_up=leaves.get("b_gate_up"), b_down=leaves.get("b_down"), **kw)
    if y.requires_grad:
        (y.double() * grad_out).sum().backward()
    grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in leaves.items()}
    return y, grads


def check_against_oracle(backend, inp, activation, tol):
    T, H = inp["x"].shape
    grad_out = torch.randn(T, H, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y, grads = run(moe_mlp, inp, grad_out, activation=activation, backend=backend)
    y_ref, grads_ref = run(moe_mlp_oracle, inp, grad_out, activation=activation)
    assert y.dtype == inp["x"].dtype and y.shape == (T, H)
    if T == 0:
        return
    assert rel_err(y, y_ref) < tol, f"forward rel err {rel_err(y, y_ref)}"
    for k in grads_ref:
        err = rel_err(grads[k], grads_ref[k]) if grads_ref[k].abs().sum() > 0 else float(grads[k].abs().max())
        assert err < tol, f"grad {k}: rel err {err}"


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(T=st.integers(0, 9), H=st.integers(1, 9), I=st.integers(1, 7), E=st.integers(1, 5),
       k_frac=st.floats(0, 1), activation=st.sampled_from(sorted(ACTIVATIONS)), bias=st.booleans(),
       skew=st.booleans(), seed=st.integers(0, 2**16))
def test_backend_matches_float64_oracle(backend, T, H, I, E, k_frac, activation, bias, skew, seed):
    K = 1 + int(k_frac * (E - 1))
    inp = make_inputs(T, H, I, E, K, activation, bias, torch.float64, seed, skew)
    check_against_oracle(backend, inp, activation, 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("shape", [(13, 16, 8, 5, 2), (7, 9, 5, 3, 3), (1, 8, 4, 1, 1)])  # aligned and odd sizes
def test_low_precision_against_oracle(backend, dtype, tol, shape):
    T, H, I, E, K = shape
    inp = make_inputs(T, H, I, E, K, "silu", True, dtype, seed=T * 31 + H)
    check_against_oracle(backend, inp, "silu", tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend):
    # K = E: every token visits every expert; E = 1; T = 0 keeps shapes and dtype.
    for T, E, K in [(5, 4, 4), (6, 1, 1), (0, 3, 2)]:
        inp = make_inputs(T, 6, 3, E, K, "silu", False, torch.float64, seed=E)
        check_against_oracle(backend, inp, "silu", 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_ids_and_non_contiguous_weights(backend):
    inp = make_inputs(9, 8, 4, 4, 2, "gelu_tanh", False, torch.float64, seed=3)
    ref = moe_mlp_oracle(inp["x"], inp["w_gate_up"], inp["w_down"], inp["topk_ids"], inp["topk_weights"], "gelu_tanh")
    w_down_t = inp["w_down"].detach().transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    y = moe_mlp(inp["x"], inp["w_gate_up"], w_down_t, inp["topk_ids"].int(), inp["topk_weights"],
                activation="gelu_tanh", backend=backend)
    assert rel_err(y, ref) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needs_grad", [("x", "w_gate_up", "w_down", "b_gate_up", "b_down"), ("topk_weights",)])
def test_gradients_when_only_some_inputs_need_them(backend, needs_grad):
    """A frozen router (combine weights without grad) and the reverse (only the combine weights train):
    the gradients that are asked for still match the oracle's."""
    inp = make_inputs(9, 6, 4, 3, 2, "silu", True, torch.float64, seed=5)
    grad_out = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = {}
    for fn, kw in ((moe_mlp, dict(backend=backend)), (moe_mlp_oracle, {})):
        leaves = {k: inp[k].detach().clone().requires_grad_(k in needs_grad) for k in DIFF_INPUTS}
        y = fn(leaves["x"], leaves["w_gate_up"], leaves["w_down"], inp["topk_ids"], leaves["topk_weights"],
               activation="silu", b_gate_up=leaves["b_gate_up"], b_down=leaves["b_down"], **kw)
        needed = [leaves[k] for k in needs_grad]
        grads[fn] = torch.autograd.grad((y * grad_out).sum(), needed)
    for k, g, g_ref in zip(needs_grad, grads[moe_mlp], grads[moe_mlp_oracle]):
        assert rel_err(g, g_ref) < 1e-10, k


@pytest.mark.slow
def test_grouped_mm_compiles_as_one_graph_and_matches_the_oracle():
    """torch.compile(fullgraph=True) traces the backend's gather/combine autograd functions (a graph break
    would fail here); forward and every gradient against the float64 oracle, in bf16 as in training."""
    from moesys.backends import preload
    preload("grouped_mm")
    inp = make_inputs(37, 32, 16, 5, 2, "silu", True, torch.bfloat16, seed=4, skew=True)  # idle experts
    compiled = torch.compile(moe_mlp, fullgraph=True)
    grad_out = torch.randn(37, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y, grads = run(compiled, inp, grad_out, activation="silu", backend="grouped_mm")
    y_ref, grads_ref = run(moe_mlp_oracle, inp, grad_out, activation="silu")
    assert y.dtype == torch.bfloat16 and rel_err(y, y_ref) < 3e-2
    for k in grads_ref:
        assert rel_err(grads[k], grads_ref[k]) < 3e-2, k
    torch._dynamo.reset()


def test_auto_backend_on_cpu_is_grouped_mm():
    inp = make_inputs(4, 8, 4, 3, 2, "silu", False, torch.float32, seed=0)
    a = moe_mlp(inp["x"], inp["w_gate_up"], inp["w_down"], inp["topk_ids"], inp["topk_weights"])
    b = moe_mlp(inp["x"], inp["w_gate_up"], inp["w_down"], inp["topk_ids"], inp["topk_weights"], backend="grouped_mm")
    assert torch.equal(a, b)


def _good():
    return make_inputs(4, 8, 4, 3, 2, "silu", True, torch.float32, seed=0)


def _call(**changes):
    inp = _good()
    inp.update(changes)
    kw = {k: inp.pop(k) for k in ("b_gate_up", "b_down")}
    extra = {k: inp.pop(k) for k in ("activation", "backend") if k in inp}
    return moe_mlp(inp["x"], inp["w_gate_up"], inp["w_down"], inp["topk_ids"], inp["topk_weights"], **kw, **extra)


@pytest.mark.parametrize("changes,exc,match", [
    (dict(topk_ids=torch.tensor([[0, 3]] * 4)), ValueError, "expert id 3, outside \\[0, 2\\]"),
    (dict(topk_ids=torch.tensor([[0, -1]] * 4)), ValueError, "expert id -1"),
    (dict(x=torch.randn(4, 7)), ValueError, "w_gate_up has shape"),
    (dict(x=torch.randn(2, 4, 8)), ValueError, "must be 2-D"),
    (dict(w_down=torch.randn(3, 8, 5)), ValueError, "w_gate_up has shape"),
    (dict(x=torch.randn(4, 8, dtype=torch.float64)), TypeError, "dtype"),
    (dict(topk_ids=torch.zeros(4, 2)), TypeError, "integer"),
    (dict(topk_ids=torch.zeros(3, 2, dtype=torch.long)), ValueError, "topk_ids must be"),
    (dict(topk_weights=torch.ones(4, 3)), ValueError, "topk_weights"),
    (dict(b_down=torch.zeros(3, 7)), ValueError, "b_down must have shape"),
    (dict(activation="swish"), ValueError, "activation='swish' is not supported"),
    (dict(backend="cuda_magic"), ValueError, "backend='cuda_magic' is unknown"),
    (dict(w_gate_up=torch.randn(3, 4, 8)), ValueError,
     r"need w_gate_up \[3, 2\*4, 8\] for activation='silu' \(gated: gate rows then up rows\)"),
    (dict(activation="relu"), ValueError, r"need w_gate_up \[3, 4, 8\] for activation='relu'$"),  # not gated
    (dict(w_gate_up=torch.randn(3, 8)), ValueError, "w_gate_up and w_down must be 3-D"),
    (dict(w_down=torch.randn(3, 8, 4, 1)), ValueError, "w_gate_up and w_down must be 3-D"),
    (dict(w_down=torch.randn(3, 7, 4)), ValueError, "w_gate_up has shape"),  # w_down's H alone is wrong
    # from the mutation run of ops.py (TESTING.md): each bound checked from both sides, each check reached
    (dict(topk_ids=torch.tensor([[0, 4]] * 4)), ValueError, "expert id 4, outside"),
    (dict(topk_ids=torch.tensor([[1, 3]] * 4)), ValueError, "expert id 3, outside"),  # the bad id, not the lowest
    (dict(x=torch.randn(8)), ValueError, "must be 2-D"),
    (dict(w_gate_up=torch.randn(3, 8, 8, 1)), ValueError, "w_gate_up and w_down must be 3-D"),
    (dict(w_down=torch.randn(3, 8)), ValueError, "w_gate_up and w_down must be 3-D"),
    (dict(w_down=torch.randn(3, 9, 4)), ValueError, "w_gate_up has shape"),
    (dict(topk_ids=torch.zeros(4, dtype=torch.long)), ValueError, "topk_ids must be"),
    (dict(topk_ids=torch.zeros(4, 2, 1, dtype=torch.long)), ValueError, "topk_ids must be"),
    (dict(topk_ids=torch.zeros(5, 2, dtype=torch.long)), ValueError, "topk_ids must be"),
    (dict(topk_weights=torch.ones(4, 1)), ValueError, "must have the shape of topk_ids"),
    (dict(b_down=torch.zeros(3, 9)), ValueError, "b_down must have shape"),
    (dict(b_gate_up=None, b_down=torch.zeros(3, 7)), ValueError, "b_down must have shape"),
    (dict(x=[[0.0] * 8] * 4), TypeError, "x must be a torch.Tensor"),
    (dict(w_gate_up=torch.randn(3, 8, 8, dtype=torch.float64), b_gate_up=None, b_down=None), TypeError,
     "w_gate_up has dtype"),
    (dict(b_down=torch.zeros(3, 8, device="meta")), ValueError, "all inputs must be on one device"),
    (dict(x=torch.zeros(0, 8), w_gate_up=torch.zeros(0, 8, 8), w_down=torch.zeros(0, 8, 4),
          topk_ids=torch.zeros(0, 2, dtype=torch.long), topk_weights=torch.zeros(0, 2), b_gate_up=None, b_down=None),
     ValueError, "at least one expert"),
])
def test_bad_inputs_raise_clear_errors(changes, exc, match):
    with pytest.raises(exc, match=match):
        _call(**changes)


def test_options_are_keyword_only():
    inp = _good()
    with pytest.raises(TypeError):
        moe_mlp(inp["x"], inp["w_gate_up"], inp["w_down"], inp["topk_ids"], inp["topk_weights"], "silu")


class _CudaLookingIds(torch.Tensor):
    """topk_ids as the id check sees a CUDA tensor, with its values on the CPU: the check must take the
    device-side assert (no host read), which on CPU data fires at once."""

    @property
    def device(self):
        return torch.device("cuda")


@pytest.mark.parametrize("ids,ok", [([[0, 2], [1, 0]], True), ([[0, 3]], False), ([[4, 0]], False), ([[-1, 1]], False)])
def test_ids_on_an_accelerator_are_checked_by_a_device_side_assert(ids, ok):
    from moesys.ops import _check_ids_in_range
    ids_TK = torch.tensor(ids).as_subclass(_CudaLookingIds)
    if ok:
        _check_ids_in_range(ids_TK, 3)
    else:
        with pytest.raises(RuntimeError, match=r"topk_ids outside \[0, 2\]"):
            _check_ids_in_range(ids_TK, 3)


def test_triton_backend_says_why_it_cannot_run(monkeypatch):
    import moesys.backends as backends
    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda device: "no GPU and TRITON_INTERPRET unset")
    with pytest.raises(RuntimeError, match="cannot run here: no GPU"):
        _call(backend="triton")


@pytest.mark.parametrize("fn,ref", [
    ("silu", torch.nn.functional.silu), ("gelu", torch.nn.functional.gelu),
    ("gelu_tanh", lambda x: torch.nn.functional.gelu(x, approximate="tanh")), ("relu", torch.relu),
    ("relu2", lambda x: torch.relu(x) ** 2), ("sigmoid", torch.sigmoid), ("mish", torch.nn.functional.mish),
    ("quick_gelu", lambda x: x * torch.sigmoid(1.702 * x))])
def test_oracle_formulas_match_torch(fn, ref):
    """The oracle's own formulas (written from the definitions) against torch's functions, float64."""
    from tests.moe_oracle import FUNCTIONS
    x = torch.linspace(-9, 9, 301, dtype=torch.float64)
    assert torch.allclose(FUNCTIONS[fn](x), ref(x), rtol=1e-12, atol=1e-12)


PARAM_SPECS = [clamped_swiglu(limit=0.6), clamped_swiglu(alpha=1.3, limit=0.4, up_shift=0.5, interleaved=False),
               Activation("silu", False, alpha=1.702), Activation("mish", True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", PARAM_SPECS, ids=lambda a: a.key)
def test_parameterized_activations_match_oracle(backend, spec):
    """Activations with parameters (GPT-OSS's clamped SwiGLU with a limit that clamps both halves, in either
    gate/up layout; silu's alpha) as Activation objects, forward and every gradient, float64."""
    inp = make_inputs(11, 7, 5, 4, 2, spec, True, torch.float64, seed=21)
    check_against_oracle(backend, inp, spec, 1e-10)
    assert Activation.from_key(spec.key) == spec


@pytest.mark.parametrize("kwargs,match", [
    (dict(fn="swish", gated=True), "fn='swish' is unknown"),
    (dict(fn="gelu", gated=True, alpha=2.0), "alpha=2.0 applies to fn='silu' only"),
    (dict(fn="relu", gated=False, limit=1.0), "set gated=True"),
    (dict(fn="silu", gated=True, limit=-1.0), "limit=-1.0 must be positive"),
])
def test_bad_activation_specs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Activation(**kwargs)

"""Registry of `moe_mlp` backends: name -> implementation, and the "auto" choice.

Each backend is `fn(x_TH, w_gate_up, w_down, topk_ids_TK, topk_weights_TK, *, activation, b_gate_up, b_down)`
with inputs already checked by `moesys.ops.check_moe_mlp_inputs` and `activation` resolved to a
`moesys.activations.Activation`.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

import torch

from moesys.backends.auto import pick_auto

# name -> (module, function); imported lazily so that `import moesys` stays cheap and Triton optional.
_BACKENDS = {
    "loop": ("moesys.backends.loop", "moe_mlp_loop"),
    "grouped_mm": ("moesys.backends.grouped_mm", "moe_mlp_grouped_mm"),
    "triton": ("moesys.kernels", "moe_mlp_triton"),
}


def available_backends() -> list[str]:
    return list(_BACKENDS)


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton backend can run on `device`, else a sentence saying why not."""
    try:
        mod = _import("moesys.kernels")
    except ImportError as e:
        return f"the Triton kernels could not be imported ({e})"
    reason = getattr(mod, "unavailable_reason", None)
    return reason(device) if reason is not None else None


def resolve_backend(name: str, x: torch.Tensor, *, rows_per_expert: float = float("inf"), needs_grad: bool = True,
                    signature: tuple | None = None, capturing: bool | None = None) -> str:
    """The backend a call with backend `name` runs: `name` itself, or for "auto" the choice from the table in
    `moesys.backends.auto` by `rows_per_expert` (T*K/E), `needs_grad` and whether a CUDA graph is being
    captured (`capturing`, asked of the stream when None); under capture Triton only if the call's
    `signature` (`triton_signature`) has run on Triton outside a capture. The defaults (a large training
    call) keep the choice of a caller that knows neither."""
    if name == "auto":
        capturing = _capturing(x) if capturing is None else capturing
        name = pick_auto(rows_per_expert, needs_grad, _triton_ok(x), capturing=capturing,
                         triton_ready=signature is not None and signature in _TRITON_RAN)
    if name not in _BACKENDS:
        raise ValueError(f"moe_mlp: backend={name!r} is unknown; use 'auto' or one of {available_backends()}")
    if name == "triton":
        reason = triton_unavailable_reason(x.device)
        if reason is not None:
            raise RuntimeError(f"moe_mlp: backend='triton' cannot run here: {reason}. "
                               "Use backend='grouped_mm' or 'auto'.")
    return name


def backend_impl(name: str):
    """The implementation of a resolved backend name (`resolve_backend`)."""
    module, fn = _BACKENDS[name]
    return getattr(_import(module), fn)


def get_backend(name: str, x: torch.Tensor, *, rows_per_expert: float = float("inf"), needs_grad: bool = True):
    """The implementation of backend `name` for inputs like `x` (`resolve_backend`, then `backend_impl`)."""
    return backend_impl(resolve_backend(name, x, rows_per_expert=rows_per_expert, needs_grad=needs_grad))


# Inference calls whose Triton kernels ran outside a CUDA-graph capture in this process, by `triton_signature`.
# Triton compiles and loads a kernel for each specialization at its first launch and tunes its tiles by timing
# them; a capture allows neither (the driver refuses cuModuleLoadData while a stream captures), so under
# capture "auto" takes Triton only for these calls. Bounded: past the cap nothing new is recorded (those calls
# keep grouped_mm under capture).
_TRITON_RAN: set[tuple] = set()
TRITON_RAN_MAX = 4096
_capture_warmup = 0


def triton_signature(tensors, activation_key: str) -> tuple:
    """What selects the compiled Triton kernels a moe_mlp call launches: every tensor's shape, strides, dtype
    and whether its address is 16-byte aligned (Triton specializes pointers on that, and integers on being
    1 or a multiple of 16), and the activation. None stands for an absent bias."""
    return (activation_key,) + tuple(
        None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.data_ptr() % 16 == 0) for t in tensors)


def remembers_triton(x: torch.Tensor) -> bool:
    """Whether moe_mlp keeps track of this call's Triton kernels: CUDA inputs, not while torch.compile traces
    (a compiled graph's choice is made at trace time, where no capture is running)."""
    return x.is_cuda and not torch.compiler.is_compiling()


def note_triton_ran(signature: tuple) -> None:
    if len(_TRITON_RAN) < TRITON_RAN_MAX:
        _TRITON_RAN.add(signature)


def triton_ran(signature: tuple) -> bool:
    return signature in _TRITON_RAN


@contextlib.contextmanager
def capture_warmup():
    """Run the eager warm-up of calls that a CUDA graph will capture inside this context: each moe_mlp call
    with backend="auto" whose capture would take Triton (`AUTO_TRITON_MIN_ROWS_PER_EXPERT["graph"]`) but whose
    eager choice is grouped_mm also runs its Triton kernels once (result dropped) so they compile, load and
    tune before the capture, where they cannot. Without it such a captured call keeps grouped_mm: correct,
    up to 1.8x slower below a few hundred rows per expert (H100, bench/results/moe_auto_sweep_h100_40a1754.json).

        with moesys.backends.capture_warmup():
            out = step(*args)            # eager warm-up
        with torch.cuda.graph(g):
            out = step(*args)            # the capture takes Triton where it is faster
    """
    global _capture_warmup
    _capture_warmup += 1
    try:
        yield
    finally:
        _capture_warmup -= 1


def warming_for_capture() -> bool:
    """Whether a `capture_warmup()` context is open."""
    return _capture_warmup > 0


def would_capture_triton(x: torch.Tensor, rows_per_expert: float) -> bool:
    """Whether a captured no-grad call of this size takes Triton once its kernels are ready."""
    return pick_auto(rows_per_expert, False, _triton_ok(x), capturing=True, triton_ready=True) == "triton"


def _triton_ok(x: torch.Tensor) -> bool:
    """Whether the Triton backend can take inputs like `x` (CUDA, a dtype it supports)."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32) \
        and triton_unavailable_reason(x.device) is None


def _capturing(x: torch.Tensor) -> bool:
    """Whether this call is being captured into a CUDA graph (torch.cuda.graph, triton's do_bench_cudagraph).
    While torch.compile traces, capture has not begun (reduce-overhead captures the compiled graph later):
    the eager choice is kept there."""
    if not x.is_cuda or torch.compiler.is_compiling() or not torch.cuda.is_available():
        return False
    return torch.cuda.is_current_stream_capturing()


def _import(module: str):
    # sys.modules first: torch.compile can trace a dict lookup but not importlib (a graph break there split
    # every compiled block in two). `preload` makes sure the lookup hits before anything is traced.
    return sys.modules.get(module) or importlib.import_module(module)


def preload(name: str) -> None:
    """Import the modules backend `name` may dispatch to, so that a later traced call finds them loaded.
    Called when an experts module is built; a Triton that cannot be imported is left to `get_backend`
    to report."""
    names = ["grouped_mm", "triton"] if name == "auto" else [name]
    for n in names:
        if n in _BACKENDS:
            try:
                _import(_BACKENDS[n][0])
            except ImportError:
                pass

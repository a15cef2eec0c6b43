"""Registry of `moe_mlp` backends: name -> implementation, and the "auto" choice.

Each backend is `fn(x_TH, w_gate_up, w_down, topk_ids_TK, topk_weights_TK, *, activation, b_gate_up, b_down)`
with inputs already checked by `moesys.ops.check_moe_mlp_inputs` and `activation` resolved to a
`moesys.activations.Activation`.
"""

from __future__ import annotations

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


def get_backend(name: str, x: torch.Tensor, *, rows_per_expert: float = float("inf"), needs_grad: bool = True):
    """The implementation of backend `name` for inputs like `x`. For "auto", `rows_per_expert` (T*K/E),
    `needs_grad` and whether a CUDA graph is being captured pick it from the table in
    `moesys.backends.auto`; the defaults (a large training call)
    keep the choice of a caller that knows neither."""
    if name == "auto":
        triton_dtypes = (torch.bfloat16, torch.float16, torch.float32)
        triton_ok = x.is_cuda and x.dtype in triton_dtypes and triton_unavailable_reason(x.device) is None
        name = pick_auto(rows_per_expert, needs_grad, triton_ok, capturing=_capturing(x))
    if name not in _BACKENDS:
        raise ValueError(f"moe_mlp: backend={name!r} is unknown; use 'auto' or one of {available_backends()}")
    if name == "triton":
        reason = triton_unavailable_reason(x.device)
        if reason is not None:
            raise RuntimeError(f"moe_mlp: backend='triton' cannot run here: {reason}. "
                               "Use backend='grouped_mm' or 'auto'.")
    module, fn = _BACKENDS[name]
    return getattr(_import(module), fn)


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

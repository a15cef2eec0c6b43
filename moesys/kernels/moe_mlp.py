"""The Triton expert MLP as torch custom ops (`moesys::moe_mlp_triton_fwd` / `_bwd`, with fake impls so
torch.compile(fullgraph=True) traces through them) plus their autograd; `moe_mlp_triton` is the
backend entry point. The readable reference of the same contract is `moesys.backends.loop`.

Legend: T tokens, H hidden, I expert intermediate, F = 2I (gated) or I, E experts, K top-k,
N = T*K routed rows in expert order.

Forward (2 launches + routing): h = x[token] W_gu^T (+b) -> a = act(h) [fused epilogue];
y[token] += w * (a W_d^T + b) [fused top-k combine]. Saved for backward: h_NF and the routing (a_NI
is recomputed from h in backward, which saves N*I elements of activation memory).
Backward (5 launches): g = dy[token] W_d; the activation backward (w*a, dh, d topk_weights) as one
bandwidth-bound pass over g in place; dx[token] += dh W_gu; dW_gu and dW_d as grouped X^T.dY.
Nothing reads device values on the host (no sync), so a decode step can be captured in a CUDA graph (run it once first: Triton autotunes on the first call of each shape).
"""

from typing import Optional

import torch
from torch import Tensor
from torch.profiler import record_function

from moesys.activations import is_gated
from moesys.kernels.act import ACT_CODES
from moesys.kernels.grouped_gemm import EPI_ACT_FWD, EPI_SCATTER, EPI_STORE
from moesys.kernels.launch import act_backward, expert_wgrad, grouped_gemm, unavailable_reason
from moesys.kernels.routing import sort_routing

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _dims(x, w_gate_up, w_down, topk_ids):
    T, H = x.shape
    E, _, I = w_down.shape
    return T, H, E, I, topk_ids.shape[1], w_gate_up.shape[1]


@torch.library.custom_op("moesys::moe_mlp_triton_fwd", mutates_args=())
def moe_mlp_fwd(x: Tensor, w_gate_up: Tensor, w_down: Tensor, topk_ids: Tensor, topk_weights: Tensor,
                b_gate_up: Optional[Tensor], b_down: Optional[Tensor], activation: str,
                save_h: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (y_TH, h_NF or an empty [0, F] when not save_h, token_N, perm_N, offsets_E)."""
    T, H, E, I, K, F = _dims(x, w_gate_up, w_down, topk_ids)
    N = T * K
    token_N, perm_N, offsets_E = sort_routing(topk_ids, E)
    rw_N = topk_weights.reshape(-1)[perm_N].float()
    a_NI = x.new_empty(N, I)
    h_NF = x.new_empty(N if save_h else 0, F)
    with record_function("moesys::fwd_gate_up_act"):
        grouped_gemm(x, w_gate_up, (w_gate_up.stride(0), w_gate_up.stride(2), w_gate_up.stride(1)), H, I,
                     token_N, offsets_E, epilogue=EPI_ACT_FWD, out=a_NI, gather_a=True, gated=F == 2 * I, I=I,
                     h=h_NF if save_h else None, bias=b_gate_up, save_h=save_h, act=ACT_CODES[activation])
    with record_function("moesys::fwd_down_combine"):
        y32_TH = torch.zeros(T, H, dtype=torch.float32, device=x.device)
        grouped_gemm(a_NI, w_down, (w_down.stride(0), w_down.stride(2), w_down.stride(1)), I, H,
                     token_N, offsets_E, epilogue=EPI_SCATTER, out=y32_TH, gather_a=False, bias=b_down, rw_N=rw_N)
    return y32_TH.to(x.dtype), h_NF, token_N, perm_N, offsets_E


@moe_mlp_fwd.register_fake
def _(x, w_gate_up, w_down, topk_ids, topk_weights, b_gate_up, b_down, activation, save_h):
    T, H, E, I, K, F = _dims(x, w_gate_up, w_down, topk_ids)
    N = T * K
    return (x.new_empty(T, H), x.new_empty(N if save_h else 0, F), x.new_empty(N, dtype=torch.int32),
            x.new_empty(N, dtype=torch.int64), x.new_empty(E, dtype=torch.int32))


@torch.library.custom_op("moesys::moe_mlp_triton_bwd", mutates_args=())
def moe_mlp_bwd(dy: Tensor, x: Tensor, w_gate_up: Tensor, w_down: Tensor, topk_ids: Tensor, topk_weights: Tensor,
                b_gate_up: Optional[Tensor], b_down: Optional[Tensor], h_NF: Tensor, token_N: Tensor, perm_N: Tensor,
                offsets_E: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dw_gate_up, dw_down, dtopk_weights, db_gate_up, db_down); a bias grad is [0] without the bias."""
    T, H, E, I, K, F = _dims(x, w_gate_up, w_down, topk_ids)
    N = T * K
    dy = dy.contiguous()
    rw_N = topk_weights.reshape(-1)[perm_N].float()
    wa_NI = x.new_empty(N, I)  # g = dy[token] W_d first, then w * act(h) in place
    dh_NF = x.new_empty(N, F)
    drw_N = torch.empty(N, dtype=torch.float32, device=x.device)
    with record_function("moesys::bwd_down"):
        grouped_gemm(dy, w_down, (w_down.stride(0), w_down.stride(1), w_down.stride(2)), H, I, token_N, offsets_E,
                     epilogue=EPI_STORE, out=wa_NI, gather_a=True)
    with record_function("moesys::bwd_act"):
        act_backward(h_NF, wa_NI, dh_NF, rw_N, drw_N, gated=F == 2 * I, I=I, act=ACT_CODES[activation])
    # Order chosen for peak memory: dh_NF dies before dw_down is allocated, wa_NI right after it is used.
    with record_function("moesys::bwd_dx"):
        dx32_TH = torch.zeros(T, H, dtype=torch.float32, device=x.device)
        grouped_gemm(dh_NF, w_gate_up, (w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2)), F, H,
                     token_N, offsets_E, epilogue=EPI_SCATTER, out=dx32_TH, gather_a=False)
        dx_TH = dx32_TH.to(x.dtype)
        del dx32_TH
    with record_function("moesys::bwd_dw_gate_up"):
        dw_gate_up = torch.empty(w_gate_up.shape, dtype=w_gate_up.dtype, device=x.device)
        expert_wgrad(dh_NF, x, token_N, offsets_E, dw_gate_up, gather_p=False, gather_q=True)
    db_gate_up = x.new_empty(0)
    if b_gate_up is not None:
        sorted_ids_N = topk_ids.reshape(-1).long()[perm_N]
        db_gate_up = torch.zeros(E, F, dtype=torch.float32, device=x.device).index_add_(
            0, sorted_ids_N, dh_NF.float()).to(b_gate_up.dtype)
    del dh_NF
    with record_function("moesys::bwd_dw_down"):
        dw_down = torch.empty(w_down.shape, dtype=w_down.dtype, device=x.device)
        expert_wgrad(dy, wa_NI, token_N, offsets_E, dw_down, gather_p=True, gather_q=False)
    del wa_NI

    drw_TK = torch.empty_like(drw_N).index_copy_(0, perm_N, drw_N).view(T, K)
    db_down = x.new_empty(0)
    if b_down is not None:
        # dy[t] . b_down[e] enters d topk_weights[t, j] too: one [T, E] product, then pick e = topk_ids[t, j].
        drw_TK = drw_TK + (dy.float() @ b_down.float().T).gather(1, topk_ids.long())
        # db_down[e] = sum_t (sum of t's weights for e) dy[t]: a [E, T] routing matrix times dy.
        route_ET = torch.zeros(E, T, dtype=torch.float32, device=x.device)
        route_ET.index_put_((topk_ids.long().reshape(-1), torch.arange(T, device=x.device).repeat_interleave(K)),
                            topk_weights.reshape(-1).float(), accumulate=True)
        db_down = (route_ET @ dy.float()).to(b_down.dtype)
    return dx_TH, dw_gate_up, dw_down, drw_TK.to(topk_weights.dtype), db_gate_up, db_down


@moe_mlp_bwd.register_fake
def _(dy, x, w_gate_up, w_down, topk_ids, topk_weights, b_gate_up, b_down, h_NF, token_N, perm_N, offsets_E,
      activation):
    return (torch.empty_like(x), torch.empty_like(w_gate_up), torch.empty_like(w_down), torch.empty_like(topk_weights),
            x.new_empty(b_gate_up.shape if b_gate_up is not None else (0,)),
            x.new_empty(b_down.shape if b_down is not None else (0,)))


def _setup_context(ctx, inputs, output):
    x, w_gate_up, w_down, topk_ids, topk_weights, b_gate_up, b_down, activation, save_h = inputs
    _, h_NF, token_N, perm_N, offsets_E = output
    ctx.activation = activation
    ctx.save_h = save_h
    ctx.save_for_backward(x, w_gate_up, w_down, topk_ids, topk_weights, b_gate_up, b_down, h_NF, token_N, perm_N,
                          offsets_E)


def _backward(ctx, dy, *_unused_output_grads):
    if not ctx.save_h:
        raise RuntimeError("moe_mlp (triton): backward needs the forward run with save_h=True; "
                           "moe_mlp_triton sets it whenever an input requires grad")
    x, w_gate_up, w_down, topk_ids, topk_weights, b_gate_up, b_down, h_NF, token_N, perm_N, offsets_E = ctx.saved_tensors
    dx, dw_gu, dw_d, dtw, db_gu, db_d = moe_mlp_bwd(dy, x, w_gate_up, w_down, topk_ids, topk_weights, b_gate_up,
                                                    b_down, h_NF, token_N, perm_N, offsets_E, ctx.activation)
    return (dx, dw_gu, dw_d, None, dtw, db_gu if b_gate_up is not None else None,
            db_d if b_down is not None else None, None, None)


moe_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


def moe_mlp_triton(x_TH, w_gate_up, w_down, topk_ids_TK, topk_weights_TK, *, activation, b_gate_up=None,
                   b_down=None):
    """Backend "triton" of `moesys.ops.moe_mlp` (inputs already checked by `check_moe_mlp_inputs`)."""
    reason = unavailable_reason(x_TH.device)
    if reason is not None:
        raise RuntimeError(f"moe_mlp: backend='triton' cannot run on {x_TH.device}: {reason}")
    if x_TH.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"moe_mlp: backend='triton' supports dtypes {[str(d) for d in SUPPORTED_DTYPES]}, got "
                        f"{x_TH.dtype}; use backend='loop' or 'grouped_mm' for it")
    if activation not in ACT_CODES:
        raise ValueError(f"moe_mlp: backend='triton' has no kernel for activation={activation!r}; "
                         f"supported: {sorted(ACT_CODES)}")
    assert is_gated(activation) == (w_gate_up.shape[1] == 2 * w_down.shape[2])
    b_gate_up = b_gate_up.contiguous() if b_gate_up is not None else None
    b_down = b_down.contiguous() if b_down is not None else None
    tensors = (x_TH, w_gate_up, w_down, topk_weights_TK, b_gate_up, b_down)
    save_h = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y_TH, *_ = moe_mlp_fwd(x_TH, w_gate_up, w_down, topk_ids_TK, topk_weights_TK, b_gate_up, b_down, activation,
                           save_h)
    return y_TH

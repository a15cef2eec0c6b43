"""The Triton expert MLP as torch custom ops, one per projection (`moesys::moe_mlp_triton_up` / `_down`,
their backward ops `_up_bwd` / `_down_bwd`, all with fake impls so torch.compile(fullgraph=True) traces
through them) plus their autograd; `moe_mlp_triton` is the backend entry point. The readable reference
of the same contract is `moesys.backends.loop`.

Legend: T tokens, H hidden, I expert intermediate, F = 2I (gated) or I, E experts, K top-k,
N = T*K routed rows in expert order.

Forward: routing sorted once, then
  up:   h = x[token] W_gu^T (+b) -> a = act(h)            [gather GEMM, activation in the epilogue]
  down: y[token] += w * (a W_d^T + b)                      [top-k combine fused: atomic scatter-add]
Saved for backward: h_NF (by `down`) and x plus the routing (by `up`); a_NI is recomputed from h.
Backward, `down` first:  g = dy[token] W_d; one bandwidth-bound pass turns g into w*a, writes
  d topk_weights and dh *over h in place*; dW_d = dy[token]^T (w a).  Then `up`: dx[token] += dh W_gu;
  dW_gu = dh^T x[token]. The two dW GEMMs either gather inside a Triton kernel or, bf16 on Hopper, gather
  the token-ordered operand into a transient copy for cuBLAS's grouped GEMM (`launch.wgrad_impl`); the
  two data-gradient GEMMs likewise gather dy inside the Triton GEMM and scatter-add dx in its epilogue, or
  run as cuBLAS's grouped GEMM over the gathered dy (the copy dW_d then uses) and over dh, with each
  token's K dx rows summed afterwards by `token_sum` (`launch.dgrad_impl`).
Why two autograd nodes and not one: autograd frees each node's saved tensors and accumulates its weight
gradient once the node is done, so dW_d and the w*a buffer are gone before dW_gu is allocated; with one
node for the whole MLP both weight gradients, h, dh and w*a were alive together (Mixtral: +1.6 GB over
the grouped_mm backend's peak). The `up` node receives dh as the gradient of h and a None gradient for
a (its gradient flows through h: `down` differentiates w.r.t. h directly, recomputing a).
Nothing reads device values on the host (no sync), so a decode step can be captured in a CUDA graph
(run it once first: Triton autotunes on the first call of each shape).
"""

from typing import Optional

import torch
from torch import Tensor
from torch.profiler import record_function

from moesys.activations import Activation, resolve_activation
from moesys.backends.grouped_mm import inverse_permutation
from moesys.kernels.act import act_constexprs
from moesys.kernels.grouped_gemm import EPI_ACT_FWD, EPI_SCATTER, EPI_STORE
from moesys.kernels.launch import (act_backward, act_forward, dgrad_impl, fwd_impl, grouped_gemm, token_sum,
                                  unavailable_reason, weight_grad)
from moesys.kernels.routing import sort_routing

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _strides(w: Tensor, transpose: bool) -> tuple[int, int, int]:
    """(stride_e, stride_k, stride_n) reading w[e] [R, C] as the GEMM's B: [C, R] when `transpose`."""
    return (w.stride(0), w.stride(2), w.stride(1)) if transpose else (w.stride(0), w.stride(1), w.stride(2))


# ------------------------------------------------------------------------------------------ up projection
@torch.library.custom_op("moesys::moe_mlp_triton_up", mutates_args=())
def moe_mlp_up(x: Tensor, w_gate_up: Tensor, b_gate_up: Optional[Tensor], topk_ids: Tensor, I: int,
               activation: str, save_h: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (a_NI, h_NF or an empty [0, F] when not save_h, token_N, perm_N, offsets_E). `activation` is
    an `Activation.key`; h_NF's columns are in w_gate_up's row order (gate/up interleaved if its rows are)."""
    E, F, H = w_gate_up.shape
    act = act_constexprs(Activation.from_key(activation))
    N = topk_ids.numel()
    token_N, perm_N, offsets_E = sort_routing(topk_ids, E)
    a_NI = x.new_empty(N, I)
    with record_function("moesys::fwd_gate_up_act"):
        if fwd_impl(x, w_gate_up, save_h=save_h, has_bias=b_gate_up is not None) == "grouped_mm":
            h_NF = torch._grouped_mm(x.index_select(0, token_N), w_gate_up.transpose(1, 2), offs=offsets_E)
            act_forward(h_NF, a_NI, gated=F == 2 * I, I=I, act=act)
        else:
            h_NF = x.new_empty(N if save_h else 0, F)
            grouped_gemm(x, w_gate_up, _strides(w_gate_up, True), H, I, token_N, offsets_E, epilogue=EPI_ACT_FWD,
                         out=a_NI, gather_a=True, gated=F == 2 * I, I=I, h=h_NF if save_h else None,
                         bias=b_gate_up, save_h=save_h, act=act)
    return a_NI, h_NF, token_N, perm_N, offsets_E


@moe_mlp_up.register_fake
def _(x, w_gate_up, b_gate_up, topk_ids, I, activation, save_h):
    E, F, _ = w_gate_up.shape
    N = topk_ids.numel()
    return (x.new_empty(N, I), x.new_empty(N if save_h else 0, F), x.new_empty(N, dtype=torch.int32),
            x.new_empty(N, dtype=torch.int64), x.new_empty(E, dtype=torch.int32))


@torch.library.custom_op("moesys::moe_mlp_triton_up_bwd", mutates_args=())
def moe_mlp_up_bwd(dh_NF: Tensor, x: Tensor, w_gate_up: Tensor, has_bias: bool, topk_ids: Tensor, token_N: Tensor,
                   perm_N: Tensor, offsets_E: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dw_gate_up, db_gate_up or an empty [0] without the bias)."""
    T, H = x.shape
    E, F, _ = w_gate_up.shape
    with record_function("moesys::bwd_dx"):
        if dgrad_impl(dh_NF, w_gate_up) == "grouped_mm":
            # each routed row's dx in expert order by cuBLAS, then each token's K rows summed in fp32
            dx_NH = torch._grouped_mm(dh_NF, w_gate_up, offs=offsets_E)
            dx_TH = token_sum(dx_NH, inverse_permutation(perm_N), T, topk_ids.shape[1])
            del dx_NH
        else:
            dx32_TH = torch.zeros(T, H, dtype=torch.float32, device=x.device)
            grouped_gemm(dh_NF, w_gate_up, _strides(w_gate_up, False), F, H, token_N, offsets_E,
                         epilogue=EPI_SCATTER, out=dx32_TH, gather_a=False)
            dx_TH = dx32_TH.to(x.dtype)
            del dx32_TH
    with record_function("moesys::bwd_dw_gate_up"):
        dw_gate_up = weight_grad(dh_NF, x, token_N, offsets_E, gather_p=False)
    db_gate_up = x.new_empty(0)
    if has_bias:
        sorted_ids_N = topk_ids.reshape(-1).long()[perm_N]
        db_gate_up = torch.zeros(E, F, dtype=torch.float32, device=x.device).index_add_(
            0, sorted_ids_N, dh_NF.float()).to(w_gate_up.dtype)
    return dx_TH, dw_gate_up, db_gate_up


@moe_mlp_up_bwd.register_fake
def _(dh_NF, x, w_gate_up, has_bias, topk_ids, token_N, perm_N, offsets_E):
    return (torch.empty_like(x), torch.empty_like(w_gate_up),
            x.new_empty(w_gate_up.shape[:2] if has_bias else (0,)))


def _up_setup(ctx, inputs, output):
    x, w_gate_up, b_gate_up, topk_ids, _I, _activation, _save_h = inputs
    _, _, token_N, perm_N, offsets_E = output
    ctx.has_bias = b_gate_up is not None
    ctx.set_materialize_grads(False)  # a_NI gets no gradient (it flows through h): no [N, I] of zeros
    ctx.save_for_backward(x, w_gate_up, topk_ids, token_N, perm_N, offsets_E)


def _up_backward(ctx, _da, dh_NF, *_unused_routing_grads):
    if dh_NF is None:  # nothing downstream of this layer's output needed a gradient
        return None, None, None, None, None, None, None
    x, w_gate_up, topk_ids, token_N, perm_N, offsets_E = ctx.saved_tensors
    dx, dw_gu, db_gu = moe_mlp_up_bwd(dh_NF, x, w_gate_up, ctx.has_bias, topk_ids, token_N, perm_N, offsets_E)
    return dx, dw_gu, db_gu if ctx.has_bias else None, None, None, None, None


moe_mlp_up.register_autograd(_up_backward, setup_context=_up_setup)


# ---------------------------------------------------------------------------------------- down projection
@torch.library.custom_op("moesys::moe_mlp_triton_down", mutates_args=())
def moe_mlp_down(a_NI: Tensor, h_NF: Tensor, w_down: Tensor, b_down: Optional[Tensor], topk_ids: Tensor,
                 topk_weights: Tensor, token_N: Tensor, perm_N: Tensor, offsets_E: Tensor,
                 activation: str) -> Tensor:
    """y_TH = sum over each token's routed rows of w * (a W_d^T + b). `h_NF` is only saved (a is recomputed
    from it in backward, and backward differentiates with respect to it)."""
    T = topk_weights.shape[0]
    E, H, I = w_down.shape
    rw_N = topk_weights.reshape(-1)[perm_N].float()
    with record_function("moesys::fwd_down_combine"):
        y32_TH = torch.zeros(T, H, dtype=torch.float32, device=a_NI.device)
        grouped_gemm(a_NI, w_down, _strides(w_down, True), I, H, token_N, offsets_E, epilogue=EPI_SCATTER,
                     out=y32_TH, gather_a=False, bias=b_down, rw_N=rw_N)
    return y32_TH.to(a_NI.dtype)


@moe_mlp_down.register_fake
def _(a_NI, h_NF, w_down, b_down, topk_ids, topk_weights, token_N, perm_N, offsets_E, activation):
    return a_NI.new_empty(topk_weights.shape[0], w_down.shape[1])


@torch.library.custom_op("moesys::moe_mlp_triton_down_bwd", mutates_args=("h_NF",))
def moe_mlp_down_bwd(dy: Tensor, h_NF: Tensor, w_down: Tensor, b_down: Optional[Tensor], topk_ids: Tensor,
                     topk_weights: Tensor, token_N: Tensor, perm_N: Tensor, offsets_E: Tensor,
                     activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """Overwrites h_NF with dh (the gradient of h); returns (dw_down, dtopk_weights, db_down or [0])."""
    T, K = topk_weights.shape
    E, H, I = w_down.shape
    N = T * K
    dy = dy.contiguous()
    rw_N = topk_weights.reshape(-1)[perm_N].float()
    drw_N = torch.empty(N, dtype=torch.float32, device=dy.device)
    dy_NH = None  # dy gathered into expert order, when cuBLAS computes g (dW_down's cuBLAS path reuses it)
    with record_function("moesys::bwd_down"):  # wa_NI: g = dy[token] W_d first, then w * act(h) in place
        if dgrad_impl(dy, w_down) == "grouped_mm":
            dy_NH = dy.index_select(0, token_N)
            wa_NI = torch._grouped_mm(dy_NH, w_down, offs=offsets_E)
        else:
            wa_NI = dy.new_empty(N, I)
            grouped_gemm(dy, w_down, _strides(w_down, False), H, I, token_N, offsets_E, epilogue=EPI_STORE,
                         out=wa_NI, gather_a=True)
    with record_function("moesys::bwd_act"):
        act_backward(h_NF, wa_NI, h_NF, rw_N, drw_N, gated=h_NF.shape[1] == 2 * I, I=I,
                     act=act_constexprs(Activation.from_key(activation)))
    with record_function("moesys::bwd_dw_down"):
        dw_down = weight_grad(dy, wa_NI, token_N, offsets_E, gather_p=True, gathered=dy_NH)
    del wa_NI, dy_NH
    drw_TK = torch.empty_like(drw_N).index_copy_(0, perm_N, drw_N).view(T, K)
    db_down = dy.new_empty(0)
    if b_down is not None:
        # dy[t] . b_down[e] enters d topk_weights[t, j] too: one [T, E] product, then pick e = topk_ids[t, j].
        drw_TK = drw_TK + (dy.float() @ b_down.float().T).gather(1, topk_ids.long())
        # db_down[e] = sum_t (sum of t's weights for e) dy[t]: a [E, T] routing matrix times dy.
        route_ET = torch.zeros(E, T, dtype=torch.float32, device=dy.device)
        route_ET.index_put_((topk_ids.long().reshape(-1), torch.arange(T, device=dy.device).repeat_interleave(K)),
                            topk_weights.reshape(-1).float(), accumulate=True)
        db_down = (route_ET @ dy.float()).to(b_down.dtype)
    return dw_down, drw_TK.to(topk_weights.dtype), db_down


@moe_mlp_down_bwd.register_fake
def _(dy, h_NF, w_down, b_down, topk_ids, topk_weights, token_N, perm_N, offsets_E, activation):
    return (torch.empty_like(w_down), torch.empty_like(topk_weights),
            dy.new_empty(b_down.shape if b_down is not None else (0,)))


def _down_setup(ctx, inputs, output):
    _a, h_NF, w_down, b_down, topk_ids, topk_weights, token_N, perm_N, offsets_E, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(h_NF, w_down, b_down, topk_ids, topk_weights, token_N, perm_N, offsets_E)


def _down_backward(ctx, dy):
    h_NF, w_down, b_down, topk_ids, topk_weights, token_N, perm_N, offsets_E = ctx.saved_tensors
    if h_NF.shape[0] != topk_ids.numel():
        raise RuntimeError("moe_mlp (triton): backward needs the forward run with save_h=True; "
                           "moe_mlp_triton sets it whenever an input requires grad")
    dw_d, dtw, db_d = moe_mlp_down_bwd(dy, h_NF, w_down, b_down, topk_ids, topk_weights, token_N, perm_N,
                                       offsets_E, ctx.activation)
    # h_NF now holds dh: the gradient of h, handed to the `up` node without a copy. A second backward
    # through this graph (retain_graph=True) is refused by autograd's version check on h_NF.
    return (None, h_NF, dw_d, db_d if b_down is not None else None, None, dtw, None, None, None, None)


moe_mlp_down.register_autograd(_down_backward, setup_context=_down_setup)


def moe_mlp_triton(x_TH, w_gate_up, w_down, topk_ids_TK, topk_weights_TK, *, activation, b_gate_up=None,
                   b_down=None):
    """Backend "triton" of `moesys.ops.moe_mlp` (inputs already checked by `check_moe_mlp_inputs`)."""
    reason = unavailable_reason(x_TH.device)
    if reason is not None:
        raise RuntimeError(f"moe_mlp: backend='triton' cannot run on {x_TH.device}: {reason}")
    if x_TH.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"moe_mlp: backend='triton' supports dtypes {[str(d) for d in SUPPORTED_DTYPES]}, got "
                        f"{x_TH.dtype}; use backend='loop' or 'grouped_mm' for it")
    activation = resolve_activation(activation)
    assert activation.gated == (w_gate_up.shape[1] == 2 * w_down.shape[2])
    b_gate_up = b_gate_up.contiguous() if b_gate_up is not None else None
    b_down = b_down.contiguous() if b_down is not None else None
    tensors = (x_TH, w_gate_up, w_down, topk_weights_TK, b_gate_up, b_down)
    save_h = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    a_NI, h_NF, token_N, perm_N, offsets_E = moe_mlp_up(x_TH, w_gate_up, b_gate_up, topk_ids_TK, w_down.shape[2],
                                                        activation.key, save_h)
    return moe_mlp_down(a_NI, h_NF, w_down, b_down, topk_ids_TK, topk_weights_TK, token_N, perm_N, offsets_E,
                        activation.key)

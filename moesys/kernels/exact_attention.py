"""Attention whose result for a query does not depend on its batch: not on the other rows, and not on the
masked (padding) columns in front of its keys.

A batch left-pads its sequences to one key length, so the same query sees its keys at other column indices
and more of them than alone. Any kernel that tiles the keys from column 0 (SDPA, flash) then groups the
keys' partial sums differently and rounds differently. Here every query walks its keys in blocks anchored at
its own column (L - Tq + t: the queries are the last Tq columns, as in transformers' caches) going left, with
an online softmax over the blocks: a key at a given distance from the query always lands in the same lane of
the same block, and the blocks of padding a batch adds on the left are exact no-ops (every score -inf: the
running max stays, the rescale is exp(0) = 1, the added terms are 0). Scores, softmax and the value sum run in
float32; masked columns are skipped whatever their position (sliding windows, padding), and optional
per-head sinks (GPT-OSS) join the softmax's denominator.

`attention` is the op; `attention_reference` the same arithmetic in torch (batch-dependent, for tests);
`transformers_forward` the function moesys registers with transformers' AttentionInterface.

Legend: B batch, Hq query heads, Hkv key/value heads, Tq queries, L keys, D query/key width, Dv value width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_KEYS = 32  # fixed: the anchored blocks are what make a query's sums independent of its padding


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, sink_ptr, o_ptr, Hq, Tq, L, group, scale,
                      s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
                      s_mb, s_mh, s_mt, s_ml, s_ob, s_ot, s_oh, s_od,
                      D, DV, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
                      HAS_MASK: tl.constexpr, HAS_SINK: tl.constexpr):
    pid, t = tl.program_id(0), tl.program_id(1)
    b, h = (pid // Hq).to(tl.int64), pid % Hq
    hk = (h // group).to(tl.int64)
    h = h.to(tl.int64)
    d, dv = tl.arange(0, BD), tl.arange(0, BDV)
    q = tl.load(q_ptr + b * s_qb + h * s_qh + t * s_qt + d * s_qd, mask=d < D, other=0.0).to(tl.float32)
    anchor = L - Tq + t
    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.zeros((), tl.float32)
    acc = tl.zeros((BDV,), tl.float32)
    for j in range(0, tl.cdiv(anchor + 1, BN)):
        cols = anchor - j * BN - tl.arange(0, BN)  # lane i: the key i columns left of this block's start
        valid = cols >= 0
        cols = tl.where(valid, cols, 0).to(tl.int64)
        if HAS_MASK:
            allowed = tl.load(mask_ptr + b * s_mb + h * s_mh + t * s_mt + cols * s_ml, mask=valid, other=0)
            valid = valid & (allowed != 0)
        k = tl.load(k_ptr + b * s_kb + hk * s_kh + cols[:, None] * s_kl + d[None, :] * s_kd,
                    mask=valid[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
        s = tl.where(valid, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: keep exp() away from -inf - -inf
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref)
        v = tl.load(v_ptr + b * s_vb + hk * s_vh + cols[:, None] * s_vl + dv[None, :] * s_vd,
                    mask=valid[:, None] & (dv[None, :] < DV), other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    if HAS_SINK:  # a per-head logit that takes part in the softmax's denominator only
        sink = tl.load(sink_ptr + h).to(tl.float32)
        m_new = tl.maximum(m_i, sink)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.exp(sink - m_new)
        acc = acc * alpha
    out = tl.where(l_i > 0, acc / tl.where(l_i > 0, l_i, 1.0), 0.0)  # a query that sees no key: 0, never NaN
    tl.store(o_ptr + b * s_ob + t * s_ot + h * s_oh + dv * s_od, out.to(o_ptr.dtype.element_ty), mask=dv < DV)


def _check(q, k, v, mask):
    B, Hq, Tq, D = q.shape
    if k.dim() != 4 or v.dim() != 4 or k.shape[0] != B or v.shape[:3] != k.shape[:3] or k.shape[3] != D:
        raise ValueError(f"attention: query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)} do not "
                         "match ([B, Hq, Tq, D], [B, Hkv, L, D], [B, Hkv, L, Dv])")
    if Hq % k.shape[1]:
        raise ValueError(f"attention: {Hq} query heads are not a multiple of {k.shape[1]} key/value heads")
    if Tq > k.shape[2]:
        raise ValueError(f"attention: {Tq} queries but {k.shape[2]} keys; the queries are the last keys' columns")
    if mask is not None and (mask.dim() != 4 or mask.dtype != torch.bool):
        raise ValueError(f"attention: the mask must be a 4D boolean tensor (True: attend), got {mask.dtype} "
                         f"{tuple(mask.shape)}")


def attention(q_BHTD, k_BHLD, v_BHLV, mask=None, *, scale=None, sinks_H=None) -> torch.Tensor:
    """[B, Tq, Hq, Dv] in q's dtype: softmax(q k^T * scale, masked) v per head (GQA: query head h reads
    key/value head h // (Hq / Hkv)). mask: boolean, broadcast to [B, Hq, Tq, L] (True: attend); None: causal
    with the queries as the last Tq columns."""
    _check(q_BHTD, k_BHLD, v_BHLV, mask)
    B, Hq, Tq, D = q_BHTD.shape
    Hkv, L, Dv = k_BHLD.shape[1], k_BHLD.shape[2], v_BHLV.shape[3]
    scale = D ** -0.5 if scale is None else float(scale)
    out = torch.empty(B, Tq, Hq, Dv, dtype=q_BHTD.dtype, device=q_BHTD.device)
    if out.numel() == 0:
        return out
    if mask is not None:
        mask = mask.expand(B, Hq, Tq, mask.shape[-1])[..., :L]
        if mask.shape[-1] < L:
            raise ValueError(f"attention: the mask covers {mask.shape[-1]} columns of {L} keys")
    m = mask if mask is not None else out  # any pointer; not read
    s_m = mask.stride() if mask is not None else (0, 0, 0, 0)
    sinks = sinks_H.to(torch.float32).contiguous() if sinks_H is not None else out
    _attention_kernel[(B * Hq, Tq)](
        q_BHTD, k_BHLD, v_BHLV, m, sinks, out, Hq, Tq, L, Hq // Hkv, scale,
        *q_BHTD.stride(), *k_BHLD.stride(), *v_BHLV.stride(), *s_m, *out.stride(),
        D, Dv, BD=triton.next_power_of_2(D), BDV=triton.next_power_of_2(Dv), BN=BLOCK_KEYS,
        HAS_MASK=mask is not None, HAS_SINK=sinks_H is not None)
    return out


def attention_reference(q_BHTD, k_BHLD, v_BHLV, mask=None, *, scale=None, sinks_H=None) -> torch.Tensor:
    """The same in torch, float32 (its sums' order follows the shapes: batch-dependent)."""
    _check(q_BHTD, k_BHLD, v_BHLV, mask)
    B, Hq, Tq, D = q_BHTD.shape
    group, L = Hq // k_BHLD.shape[1], k_BHLD.shape[2]
    k = k_BHLD.float().repeat_interleave(group, dim=1)
    v = v_BHLV.float().repeat_interleave(group, dim=1)
    s = q_BHTD.float() @ k.transpose(2, 3) * (D ** -0.5 if scale is None else scale)
    if mask is None:
        cols = torch.arange(L, device=s.device)
        mask = cols[None, :] <= (L - Tq + torch.arange(Tq, device=s.device))[:, None]
    mask = mask[..., :L].expand_as(s)
    s = s.masked_fill(~mask, float("-inf"))
    if sinks_H is not None:
        s = torch.cat([s, sinks_H.float().view(1, Hq, 1, 1).expand(B, Hq, Tq, 1)], dim=-1)
    m = s.amax(-1, keepdim=True).clamp_min(-3e38)  # a fully masked row: 0 out, not NaN
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    p = p[..., :L] / torch.where(den > 0, den, torch.ones_like(den))
    return (p @ v).transpose(1, 2).to(q_BHTD.dtype)


def transformers_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                         softcap=None, s_aux=None, **kwargs):
    """transformers' attention-function signature (AttentionInterface): (output [B, Tq, Hq, Dv], no weights).
    The mask is transformers' boolean SDPA mask (moesys.offload.exact registers that mask maker with it)."""
    if dropout and module.training:
        raise ValueError("attn_implementation='moesys_exact' runs inference only (attention dropout is on)")
    if softcap is not None:
        raise ValueError("attn_implementation='moesys_exact' does not apply an attention logit softcap")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise ValueError(f"attn_implementation='moesys_exact' takes transformers' boolean mask, got "
                         f"{attention_mask.dtype}; the model's mask maker was not registered")
    sinks = s_aux if s_aux is not None else kwargs.get("sinks")
    return attention(query, key, value, attention_mask, scale=scaling, sinks_H=sinks), None

"""Weight-only int8 / int4 expert quantization with per-group scales (symmetric, groups along the input dim).

Legend: R output rows, C input columns, G = C / group_size groups per row.
int8 keeps q_RC int8 and scale_RG fp32; int4 packs two 4-bit values per byte (low nibble = even column) as
q_R(C/2) uint8 with the same scale_RG. Error bound per weight: |w - deq(w)| <= scale / 2, scale = absmax / qmax.
"""

from __future__ import annotations

import torch

QUANT_MODES = ("none", "int8", "int4")
_QMAX = {"int8": 127, "int4": 7}


def group_size_for(cols: int, group_size: int = 128) -> int:
    """The largest group size <= group_size that divides cols (and is even for int4 packing)."""
    g = min(group_size, cols)
    while cols % g or g % 2:
        g -= 1
        if g <= 1:
            return cols
    return g


def quantized_shapes(rows: int, cols: int, mode: str, group_size: int = 128):
    """[(suffix, shape, dtype)] of the tensors one [rows, cols] weight becomes."""
    g = group_size_for(cols, group_size)
    qcols = cols // 2 if mode == "int4" else cols
    qdtype = torch.uint8 if mode == "int4" else torch.int8
    return [("q", (rows, qcols), qdtype), ("scale", (rows, cols // g), torch.float32)]


def quantize(w_RC: torch.Tensor, mode: str, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (q, scale_RG) for mode "int8" or "int4"."""
    if mode not in _QMAX:
        raise ValueError(f"quantize: mode={mode!r} is not supported; use 'int8' or 'int4'")
    R, C = w_RC.shape
    g = group_size_for(C, group_size)
    w = w_RC.float().reshape(R, C // g, g)
    qmax = _QMAX[mode]
    scale_RG = (w.abs().amax(dim=-1) / qmax).clamp_min(1e-12)
    q = torch.round(w / scale_RG[..., None]).clamp_(-qmax - (mode == "int4"), qmax).to(torch.int8).reshape(R, C)
    if mode == "int4":
        u = (q + 8).to(torch.uint8)  # [0, 15]
        q = u[:, 0::2] | (u[:, 1::2] << 4)
    return q, scale_RG


_INT4_PAIRS: dict = {}


def _int4_pairs(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 2]: the (even, odd) column values a packed int4 byte holds, in `dtype` (exact: -8..7)."""
    key = (device, dtype)
    if key not in _INT4_PAIRS:
        byte = torch.arange(256, dtype=torch.int16)
        _INT4_PAIRS[key] = torch.stack(((byte & 0xF) - 8, (byte >> 4) - 8), dim=-1).to(device, dtype)
    return _INT4_PAIRS[key]


def dequantize(q: torch.Tensor, scale_RG: torch.Tensor, mode: str, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize`, in `dtype`, on q's device; leading batch dims ([n, R, C]) are kept.
    Works in `dtype` (int8 and int4 values are exact in bf16) to keep the workspace small. int4 unpacks
    through a 256-entry table of byte -> value pairs: one gather instead of a kernel per nibble step
    (decode launches these per layer and token)."""
    if mode == "int4":
        w = _int4_pairs(q.device, dtype)[q.int()].flatten(-2)
    else:
        w = q.to(dtype)
    *lead, R, C = w.shape
    G = scale_RG.shape[-1]
    w = w.view(*lead, R, G, C // G) * scale_RG.to(dtype)[..., None]
    return w.reshape(*lead, R, C)

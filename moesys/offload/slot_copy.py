"""Copy experts from the host store into cache slots with the choice made on the device.

The graph decode path (moesys.offload.device_cache) decides on the GPU which experts a token misses and
which slots they go to; a cudaMemcpy needs those addresses on the host (a sync, and impossible inside a
CUDA graph). This Triton kernel instead reads the pinned host arena directly (zero-copy over PCIe: pinned
memory is mapped into the device's address space) at rows given by a device index tensor, so a captured
graph copies whatever each replay's routing misses. On the H200 machine it moved 49.7 GB/s against
cudaMemcpy's 53.2 (bench/results/offload_graph_probe.json). `copy_rows_reference` is the readable
definition, used on CPU tensors.

Legend: N source rows (experts in the store), S destination rows (cache slots), K rows to copy, W words.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference covers CPU tensors; the kernel needs triton
    triton = None

_BLOCK = 4096  # words per program: 32 KiB of int64 in flight per program, enough to saturate PCIe reads


def copy_rows_reference(src_NW: torch.Tensor, dst_SW: torch.Tensor, src_K: torch.Tensor,
                        dst_K: torch.Tensor) -> None:
    """dst_SW[dst_K[k]] = src_NW[src_K[k]] for every k with src_K[k] >= 0 (no host sync: rows not copied
    are written back with their own values)."""
    take_K1 = (src_K >= 0).unsqueeze(1)
    rows = src_NW[src_K.clamp(min=0).to(src_NW.device)].to(dst_SW.device)
    dst_SW[dst_K] = torch.where(take_K1, rows, dst_SW[dst_K])


if triton is not None:
    @triton.jit
    def _copy_rows_kernel(src_ptr, dst_ptr, src_idx_ptr, dst_idx_ptr, src_row_words, src_offset, row_words,
                          BLOCK: tl.constexpr):
        k = tl.program_id(0)
        s = tl.load(src_idx_ptr + k)
        if s >= 0:
            d = tl.load(dst_idx_ptr + k)
            offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            m = offs < row_words
            v = tl.load(src_ptr + s * src_row_words + src_offset + offs, mask=m)
            tl.store(dst_ptr + d * row_words + offs, v, mask=m)


def _word_dtype(*nbytes: int) -> torch.dtype:
    for size, dt in ((8, torch.int64), (4, torch.int32), (2, torch.int16)):
        if all(n % size == 0 for n in nbytes):
            return dt
    return torch.uint8


def copy_part(arena_NB: torch.Tensor, offset: int, nbytes: int, pool: torch.Tensor, src_K: torch.Tensor,
              dst_K: torch.Tensor, use_kernel: bool | None = None) -> None:
    """Copy bytes [offset, offset + nbytes) of arena rows src_K (uint8 [N, row bytes], host memory) into
    rows dst_K of `pool` ([S, ...], nbytes per row); entries with src_K < 0 are skipped.
    use_kernel: None = the Triton kernel for CUDA pools, the reference otherwise."""
    S = pool.shape[0]
    wdt = _word_dtype(arena_NB.shape[1], offset, nbytes)
    size = torch.empty((), dtype=wdt).element_size()
    src_NW = arena_NB.view(wdt)
    dst_SW = pool.view(S, -1).view(torch.uint8).view(wdt)
    if use_kernel is None:
        use_kernel = pool.is_cuda and triton is not None
    if not use_kernel:
        return copy_rows_reference(src_NW[:, offset // size:(offset + nbytes) // size], dst_SW, src_K, dst_K)
    words = nbytes // size
    grid = (src_K.numel(), triton.cdiv(words, _BLOCK))
    _copy_rows_kernel[grid](src_NW, dst_SW, src_K, dst_K, src_NW.shape[1], offset // size, words, BLOCK=_BLOCK)

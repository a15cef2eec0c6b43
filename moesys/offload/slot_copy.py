"""Copy experts from the host store into cache slots with the choice made on the device.

The graph decode path (moesys.offload.device_cache) decides on the GPU which experts a token misses and
which slots they go to; a cudaMemcpy needs those addresses on the host (a sync, and impossible inside a
CUDA graph). This Triton kernel instead reads the pinned host arena directly (zero-copy over PCIe: pinned
memory is mapped into the device's address space) at rows given by a device index tensor, so a captured
graph copies whatever each replay's routing misses. On the H200 machine it moved 49.7 GB/s against
cudaMemcpy's 53.2 (bench/results/offload_graph_probe.json). One launch copies all of an expert's tensors
(its parts). `copy_rows_reference` is the readable definition, used on CPU tensors.

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
_NUM_WARPS = 4  # per program (bench/offload_graph_probe.py --copy-sweep times other block/warp shapes)


def copy_rows_reference(src_NW: torch.Tensor, dst_SW: torch.Tensor, src_K: torch.Tensor,
                        dst_K: torch.Tensor) -> None:
    """dst_SW[dst_K[k]] = src_NW[src_K[k]] for every k with src_K[k] >= 0; the others are not written (a
    batch's repeated expert shares its first occurrence's slot: writing it back could race that copy).
    Selecting the rows to write syncs, which only a CUDA pool without triton would notice."""
    take_K = (src_K >= 0).to(dst_K.device)
    dst_SW[dst_K[take_K]] = src_NW[src_K[src_K >= 0].to(src_NW.device)].to(dst_SW.device)


_MAX_PARTS = 4  # parts per launch (an expert's tensors: gate/up and down, each with its scales when quantized)

if triton is not None:
    @triton.jit
    def _copy_block(src_ptr, dst_ptr, s, d, src_row_words, src_offset, row_words, blk, BLOCK: tl.constexpr):
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        m = offs < row_words
        v = tl.load(src_ptr + s * src_row_words + src_offset + offs, mask=m)
        tl.store(dst_ptr + d * row_words + offs, v, mask=m)

    @triton.jit
    def _copy_row_block(src_ptr, src_idx_ptr, dst_idx_ptr, src_row_words, k, b,
                        dst0, off0, words0, dst1, off1, words1, dst2, off2, words2, dst3, off3, words3,
                        end0, end1, end2, PARTS: tl.constexpr, BLOCK: tl.constexpr):
        """Block b of the parts' blocks laid end to end (part j ends before block end_j), of routed row k; a
        row whose src index is < 0 is skipped."""
        s = tl.load(src_idx_ptr + k)
        if s >= 0:
            d = tl.load(dst_idx_ptr + k)
            if b < end0:
                _copy_block(src_ptr, dst0, s, d, src_row_words, off0, words0, b, BLOCK)
            if PARTS > 1:
                if (b >= end0) & (b < end1):
                    _copy_block(src_ptr, dst1, s, d, src_row_words, off1, words1, b - end0, BLOCK)
            if PARTS > 2:
                if (b >= end1) & (b < end2):
                    _copy_block(src_ptr, dst2, s, d, src_row_words, off2, words2, b - end1, BLOCK)
            if PARTS > 3:
                if b >= end2:
                    _copy_block(src_ptr, dst3, s, d, src_row_words, off3, words3, b - end2, BLOCK)

    @triton.jit
    def _copy_rows_kernel(src_ptr, src_idx_ptr, dst_idx_ptr, src_row_words,
                          dst0, off0, words0, dst1, off1, words1, dst2, off2, words2, dst3, off3, words3,
                          end0, end1, end2, end3, PARTS: tl.constexpr, BLOCK: tl.constexpr):
        """Program (k, b) copies block b of row k."""
        _copy_row_block(src_ptr, src_idx_ptr, dst_idx_ptr, src_row_words, tl.program_id(0), tl.program_id(1),
                        dst0, off0, words0, dst1, off1, words1, dst2, off2, words2, dst3, off3, words3,
                        end0, end1, end2, PARTS, BLOCK)

    @triton.jit
    def _copy_rows_persistent_kernel(src_ptr, src_idx_ptr, dst_idx_ptr, src_row_words,
                                     dst0, off0, words0, dst1, off1, words1, dst2, off2, words2, dst3, off3, words3,
                                     end0, end1, end2, end3, rows, PARTS: tl.constexpr, BLOCK: tl.constexpr):
        """A fixed number of programs, each looping over (row, block) work items with the grid's stride."""
        for w in range(tl.program_id(0), rows * end3, tl.num_programs(0)):
            _copy_row_block(src_ptr, src_idx_ptr, dst_idx_ptr, src_row_words, w // end3, w % end3,
                            dst0, off0, words0, dst1, off1, words1, dst2, off2, words2, dst3, off3, words3,
                            end0, end1, end2, PARTS, BLOCK)


def _word_dtype(*nbytes: int) -> torch.dtype:
    for size, dt in ((8, torch.int64), (4, torch.int32), (2, torch.int16)):
        if all(n % size == 0 for n in nbytes):
            return dt
    return torch.uint8


def copy_parts(arena_NB: torch.Tensor, parts: list, src_K: torch.Tensor, dst_K: torch.Tensor,
               use_kernel: bool | None = None, programs: int | None = None) -> None:
    """For each (offset, nbytes, pool) of `parts`: copy bytes [offset, offset + nbytes) of arena rows src_K
    (uint8 [N, row bytes], host memory) into rows dst_K of `pool` ([S, ...], nbytes per row); entries with
    src_K < 0 are skipped. One kernel launch per 4 parts: decode replays this per layer and token, and when
    every expert hits, the launches are all it costs. use_kernel: None = the Triton kernel for CUDA pools,
    the reference otherwise. `programs`: None = one program per block of each row (the copy has the GPU to
    itself, as in the decode graph); a number = at most that many programs, each looping over blocks (the
    host path's copies run beside the compute of the waves: a full grid would hold every SM while it waits
    on PCIe, and a few programs already keep enough reads in flight)."""
    wdt = _word_dtype(arena_NB.shape[1], *(n for offset, nbytes, _ in parts for n in (offset, nbytes)))
    size = torch.empty((), dtype=wdt).element_size()
    src_NW = arena_NB.view(wdt)
    dst = [pool.view(pool.shape[0], -1).view(torch.uint8).view(wdt) for _, _, pool in parts]
    if use_kernel is None:
        use_kernel = all(pool.is_cuda for _, _, pool in parts) and triton is not None
    if not use_kernel:
        for (offset, nbytes, _), dst_SW in zip(parts, dst):
            copy_rows_reference(src_NW[:, offset // size:(offset + nbytes) // size], dst_SW, src_K, dst_K)
        return
    for first in range(0, len(parts), _MAX_PARTS):
        group = list(zip(parts[first:first + _MAX_PARTS], dst[first:first + _MAX_PARTS]))
        args, ends = [], []
        for (offset, nbytes, _), dst_SW in group:
            args += [dst_SW, offset // size, nbytes // size]
            ends.append((ends[-1] if ends else 0) + triton.cdiv(nbytes // size, _BLOCK))
        while len(args) < 3 * _MAX_PARTS:  # unused parts: never read (PARTS is their count)
            args += [group[0][1], 0, 0]
        while len(ends) < _MAX_PARTS:
            ends.append(ends[-1])
        common = (src_NW, src_K, dst_K, src_NW.shape[1], *args, *ends)
        if programs is None:
            _copy_rows_kernel[(src_K.numel(), ends[-1])](*common, PARTS=len(group), BLOCK=_BLOCK,
                                                         num_warps=_NUM_WARPS)
        else:
            grid = (max(1, min(programs, src_K.numel() * ends[-1])),)
            _copy_rows_persistent_kernel[grid](*common, src_K.numel(), PARTS=len(group), BLOCK=_BLOCK,
                                               num_warps=_NUM_WARPS)

"""Host expert store: every expert's weights in host memory, one contiguous buffer per expert, in the slot
layout the GPU cache uses (so a miss is a few straight H2D copies), optionally quantized.

Modes: "pinned" (page-locked arena, the fast path to CUDA), "memory" (ordinary RAM, used on CPU-only
hosts), "mmap" (views into the memory-mapped checkpoint, for hosts whose RAM is short; a miss then goes
through a small ring of pinned staging buffers).
Legend: I expert intermediate, H hidden.
"""

from __future__ import annotations

import torch

from moesys.offload import quant
from moesys.offload.layout import ExpertLayout

HOST_MODES = ("auto", "pinned", "memory", "mmap")
_ALIGN = 256


def slot_parts(I: int, H: int, dtype: torch.dtype, quantize: str, group_size: int = 128,
               layout: ExpertLayout = ExpertLayout()):
    """[(name, shape, dtype)] of one expert as the cache holds it (unquantized: in the module's `layout`)."""
    if quantize == "none":
        return [(name, shape, dtype) for name, shape in layout.shapes(I, H)]
    if layout != ExpertLayout():
        raise ValueError(f"quantize_experts={quantize!r} supports only plain gated experts (gate_up_proj "
                         f"[E, 2I, H] without biases); these are {layout}: use quantize_experts='none'")
    parts = []
    for name, (rows, cols) in (("gate_up", (2 * I, H)), ("down", (H, I))):
        for suffix, shape, dt in quant.quantized_shapes(rows, cols, quantize, group_size):
            parts.append((f"{name}.{suffix}", shape, dt))
    return parts


def parts_nbytes(parts) -> int:
    return sum(_nbytes(shape, dt) for _, shape, dt in parts)


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


class HostExpertStore:
    """Experts of `layers` x `num_experts`, filled from a weight source (see moesys.offload.source)."""

    def __init__(self, source, layers: list[int], num_experts: int, I: int, H: int, dtype: torch.dtype, *,
                 mode: str, quantize: str = "none", group_size: int = 128,
                 work_device: torch.device | None = None, staging_buffers: int = 4,
                 layout: ExpertLayout = ExpertLayout()):
        if mode not in ("pinned", "memory", "mmap"):
            raise ValueError(f"host memory mode={mode!r} is unknown; use 'pinned', 'memory' or 'mmap'")
        if mode == "mmap" and quantize != "none":
            raise ValueError("quantized experts are kept in host RAM; use host_memory='pinned' or 'memory' "
                             f"with quantize_experts={quantize!r}, or quantize_experts='none' with 'mmap'")
        self.source, self.layers, self.num_experts = source, list(layers), num_experts
        self.I, self.H, self.dtype, self.mode, self.quantize = I, H, dtype, mode, quantize
        self.group_size, self.layout = group_size, layout
        self.parts = slot_parts(I, H, dtype, quantize, group_size, layout)
        self.offsets = []
        off = 0
        for _, shape, dt in self.parts:
            self.offsets.append(off)
            off += -(-_nbytes(shape, dt) // _ALIGN) * _ALIGN
        self.stride = off
        # (name, byte offset in an expert's row of the arena, bytes) per part: what the device-side copy reads
        self.spans = [(name, o, _nbytes(shape, dt)) for (name, shape, dt), o in zip(self.parts, self.offsets)]
        self.expert_bytes = parts_nbytes(self.parts)  # bytes moved per miss
        self._row = {layer: r for r, layer in enumerate(self.layers)}
        self._staging = []
        if mode == "mmap":
            if torch.cuda.is_available():
                for _ in range(staging_buffers):
                    self._staging.append([torch.empty(self.stride, dtype=torch.uint8, pin_memory=True), None])
            self._next_staging = 0
            self.arena = None
        else:
            n = len(self.layers) * num_experts
            self.arena = torch.empty((n, self.stride), dtype=torch.uint8, pin_memory=(mode == "pinned"))
            # each part of every expert as one strided view [N, *shape] of the arena: a miss selects its row
            # of each (a copy_to per miss is on the host's critical path; building views per call cost
            # 50-90 us of it on the CPU)
            self._arena_parts = {name: self.arena[:, off:off + _nbytes(shape, dt)].view(dt).view(n, *shape)
                                 for (name, shape, dt), off in zip(self.parts, self.offsets)}
            self._fill(work_device or torch.device("cpu"))
            # the arena holds every expert now: let go of the source, whose tensors may be a model in memory
            # (bench/offload.py's source_of_model: on a GPU, the Qwen3-30B-A3B shape's last layer of random
            # experts, 1.1 GiB, outlived the load through it and put the B=128 rows over their 16 GiB budget)
            self.source = None

    def _views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: buf[off:off + _nbytes(shape, dt)].view(dt).view(shape)
                for (name, shape, dt), off in zip(self.parts, self.offsets)}

    def _arena_row(self, row: int) -> dict[str, torch.Tensor]:
        """The parts of arena row `row` (one expert), as views."""
        return {name: part[row] for name, part in self._arena_parts.items()}

    def _put(self, layer: int, e: int, dst: dict[str, torch.Tensor]) -> None:
        """Write one unquantized expert from the source into `dst` (its parts in the slot layout)."""
        if self.layout != ExpertLayout():  # fused on disk in the module's own layout: one slice per part
            for name, t in self.source.expert_parts(layer, e).items():
                dst[name].copy_(t)
            return
        gate, up, down = self.source.expert(layer, e)
        dst["gate_up"][:self.I].copy_(gate)
        dst["gate_up"][self.I:].copy_(up)
        dst["down"].copy_(down)

    # Without autograd: a source of parameters (a model in memory) would make the arena part of its graph, each
    # copy into it keeping the expert's quantization temporaries alive (on an H100 the int4 fill of the
    # Qwen3-30B-A3B shape from such a source held ~13 MB of GPU memory per expert until it ran out,
    # bench/results/offload_batch_qwen3_int4_h100_18ce573.log)
    @torch.no_grad()
    def _fill(self, work_device: torch.device) -> None:
        for layer in self.layers:
            for e in range(self.num_experts):
                dst = self._arena_row(self.row_index(layer, e))
                if self.quantize == "none":
                    self._put(layer, e, dst)
                    continue
                gate, up, down = self.source.expert(layer, e)
                # quantize where it is fast (the GPU when there is one), keep the result on the host
                gate_up = torch.cat((gate.to(work_device), up.to(work_device)))
                for name, w in (("gate_up", gate_up), ("down", down.to(work_device))):
                    q, scale = quant.quantize(w, self.quantize, self.group_size)
                    dst[f"{name}.q"].copy_(q)
                    dst[f"{name}.scale"].copy_(scale)

    def row_index(self, layer: int, e: int) -> int:
        """The arena row of expert `e` of `layer`."""
        return self._row[layer] * self.num_experts + e

    def host_parts(self, layer: int, e: int) -> dict[str, torch.Tensor]:
        """The expert's parts as CPU tensors (for computing an expert on the CPU)."""
        if self.mode != "mmap":
            return self._arena_row(self.row_index(layer, e))
        parts = {name: torch.empty(shape, dtype=dt) for name, shape, dt in self.parts}
        self._put(layer, e, parts)
        return parts

    def copy_to(self, layer: int, e: int, dst: dict[str, torch.Tensor]) -> None:
        """Copy one expert into destination tensors (a cache slot) on the current stream; non-blocking for
        CUDA destinations: the caller records an event after it."""
        on_cuda = next(iter(dst.values())).is_cuda
        if self.mode != "mmap":
            row = self.row_index(layer, e)
            for name, t in dst.items():
                t.copy_(self._arena_parts[name][row], non_blocking=on_cuda)
            return
        if not on_cuda:
            self._put(layer, e, dst)
            return
        # pageable mmap pages -> pinned staging (CPU memcpy) -> async H2D; a staging buffer is reused only
        # after the copy that read it has finished
        slot = self._staging[self._next_staging]
        self._next_staging = (self._next_staging + 1) % len(self._staging)
        if slot[1] is not None:
            slot[1].synchronize()
        stage = self._views(slot[0])
        self._put(layer, e, stage)
        for name, t in dst.items():
            t.copy_(stage[name], non_blocking=True)
        slot[1] = torch.cuda.Event()
        slot[1].record()

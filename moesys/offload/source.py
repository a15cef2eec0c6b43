"""Weight sources: where the engine reads tensors from. A safetensors directory (memory-mapped; headers
read and checked against the file size by upcycling.io.read_header, so nothing is read before the budget
check), or tensors already in memory (benchmarks).

A source provides `non_expert_items()` -> (on-disk name, tensor) pairs and
`expert(layer, e)` -> (gate_IH, up_IH, down_HI) tensors, views where possible.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import torch

from moesys.offload.layout import PARAM_OF_PART, ExpertLayout
from moesys.upcycling.io import read_header

_REMEDY = "re-download or re-export the model"


class SafetensorsSource:
    """All `*.safetensors` files of a directory, mapped read-only (copy-on-write, never written)."""

    def __init__(self, model_dir: str | os.PathLike, adapter):
        self.adapter = adapter
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors files in {str(model_dir)!r}; save the model with "
                             "save_pretrained(..., safe_serialization=True)")
        self._entries = {}  # name -> (file index, dtype, shape, begin, end)
        self._files = files
        self._maps: list[mmap.mmap | None] = [None] * len(files)
        for i, path in enumerate(files):
            for name, (shape, dtype, begin) in read_header(path, _REMEDY).items():
                self._entries[name] = (i, dtype, shape, begin, begin + math.prod(shape) * dtype.itemsize)

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][2]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][1]

    def get(self, name: str) -> torch.Tensor:
        """A CPU view into the mapped file (pages are read on first touch)."""
        if name not in self._entries:
            raise KeyError(f"tensor {name!r} is not in the safetensors files of this model")
        i, dtype, shape, begin, end = self._entries[name]
        if self._maps[i] is None:
            with open(self._files[i], "rb") as f:
                self._maps[i] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._maps[i], dtype=torch.uint8, count=end - begin, offset=begin)
        return flat.view(dtype).view(shape)

    def non_expert_items(self):
        for name in self._entries:
            if not self.adapter.is_expert_key(name):
                yield name, self.get(name)

    def has_fused(self, layer: int) -> bool:
        return self.adapter.fused_keys(layer)[0] in self._entries

    def expert(self, layer: int, e: int):
        if self.has_fused(layer):
            gu_key, d_key = self.adapter.fused_keys(layer)
            gate_up = self.get(gu_key)[e]
            I = gate_up.shape[0] // 2
            return gate_up[:I], gate_up[I:], self.get(d_key)[e]
        return tuple(self.get(self.adapter.expert_key(layer, e, p)) for p in range(3))

    def expert_parts(self, layer: int, e: int) -> dict:
        """Expert e in the module's own layout, cache part name -> a view into the file: its slices of a
        layer's fused tensors (GPT-OSS's transposed, interleaved gate_up_proj [E, H, 2I] with its biases),
        or a non-gated expert's own up/down tensors."""
        base = f"{self.adapter.disk_block.format(i=layer)}.experts"
        if f"{base}.up_proj" not in self._entries and self.adapter.expert_key(layer, 0, 1) in self._entries:
            # non-gated experts stored per expert (Nemotron-H)
            return {"up": self.get(self.adapter.expert_key(layer, e, 1)),
                    "down": self.get(self.adapter.expert_key(layer, e, 2))}
        return {part: self.get(f"{base}.{param}")[e] for part, param in PARAM_OF_PART.items()
                if f"{base}.{param}" in self._entries}

    def check_experts(self, layer: int, num_experts: int, I: int, H: int, layout=None) -> None:
        """Every expert tensor exists with the shape the config implies (checked before anything loads)."""
        base = f"{self.adapter.disk_block.format(i=layer)}.experts"
        if layout is not None and not layout.gated and f"{base}.up_proj" not in self._entries:
            want = {self.adapter.expert_key(layer, e, p): shape for e in range(num_experts)
                    for p, shape in ((1, (I, H)), (2, (H, I)))}
        elif layout is not None and layout != ExpertLayout():
            want = {f"{base}.{PARAM_OF_PART[part]}": (num_experts, *shape) for part, shape in layout.shapes(I, H)}
        elif self.has_fused(layer):
            gu_key, d_key = self.adapter.fused_keys(layer)
            want = {gu_key: (num_experts, 2 * I, H), d_key: (num_experts, H, I)}
        else:
            want = {}
            for e in range(num_experts):
                for p, shape in enumerate(((I, H), (I, H), (H, I))):
                    want[self.adapter.expert_key(layer, e, p)] = shape
        for name, shape in want.items():
            if name not in self._entries:
                raise ValueError(f"expert tensor {name!r} is missing from the checkpoint; is config.json's "
                                 f"model_type right for these files?")
            if self.shape(name) != shape:
                raise ValueError(f"expert tensor {name!r} has shape {list(self.shape(name))}, "
                                 f"config.json implies {list(shape)}")


class TensorSource:
    """Weights already in memory: `non_expert` maps on-disk names to tensors and
    `expert_fn(layer, e)` returns (gate_IH, up_IH, down_HI); used by benchmarks that never touch disk."""

    def __init__(self, non_expert: dict[str, torch.Tensor], expert_fn):
        self._non_expert = non_expert
        self._expert_fn = expert_fn

    def non_expert_items(self):
        yield from self._non_expert.items()

    def expert(self, layer: int, e: int):
        return self._expert_fn(layer, e)

    def check_experts(self, layer, num_experts, I, H, layout=None) -> None:
        return None

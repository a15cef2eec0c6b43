"""Weights of a Hugging Face checkpoint into a (possibly parallelized) moesys model.

`check_checkpoint` compares the safetensors headers (single file or index-sharded; pickle-only
directories are refused) with the tensor names and shapes the config implies and names the first
offending tensor, reading no weight. `load_init_weights` then fills the model: dense tensors on
every rank, and of the experts only those this rank holds under expert parallelism or FSSDP
(`ep.local_expert_ids`), each read through `safe_open` (memory-mapped: only that tensor's bytes are
touched), so no rank reads the whole model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from moesys.checkpoint import merge_experts, split_experts
from moesys.config import Config
from moesys.hf.names import hf_shapes, tensor_map
from moesys.models.transformer import MoETransformer
from moesys.upcycling.io import SourceReader, source_tensors


class CountingReader(SourceReader):
    """A SourceReader that records the name and bytes of every tensor it reads (tests count them)."""

    def __init__(self, where, keep_open: bool = False):
        super().__init__(where, keep_open)
        self.names_read: list[str] = []
        self.rows_read: dict[str, list[int]] = {}  # fused tensors read in part: their rows
        self.bytes_read = 0

    def __call__(self, name: str) -> torch.Tensor:
        cached = self._last is not None and self._last[0] == name
        t = super().__call__(name)
        if not cached:
            self.names_read.append(name)
            self.bytes_read += t.numel() * t.element_size()
        return t

    def rows(self, name: str, ids) -> torch.Tensor:
        t = super().rows(name, ids)
        self.names_read.append(name)
        self.rows_read.setdefault(name, []).extend(ids)
        self.bytes_read += t.numel() * t.element_size()
        return t


class _HFState(Mapping):
    """moesys checkpoint names -> tensors, each read from the HF files only when asked for."""

    def __init__(self, names: dict[str, tuple[str, ...]], read):
        self.names, self.read = names, read

    def __getitem__(self, key: str) -> torch.Tensor:
        parts = [self.read(name) for name in self.names[key]]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def __contains__(self, key) -> bool:  # Mapping's default would read the tensor to find out
        return key in self.names

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def family_of(model_dir: str | Path) -> str:
    return json.loads((Path(model_dir) / "config.json").read_text())["model_type"]


def model_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """moesys checkpoint name -> shape, from a model built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = MoETransformer(config.model, config.moe)
    return {k: tuple(v.shape) for k, v in split_experts(model.state_dict()).items()}


def check_checkpoint(model_dir: str | Path, config: Config) -> tuple[dict, dict[str, tuple[str, ...]]]:
    """(where each HF tensor is, the moesys -> HF name map) after checking names and shapes against
    `config`; raises ValueError naming the first missing, mis-shaped or unexpected tensor."""
    model_dir = Path(model_dir)
    family = family_of(model_dir)
    where, disk = source_tensors(model_dir)
    names = tensor_map(config, family)
    want = hf_shapes(model_shapes(config), names)
    for name, shape in want.items():
        if name not in disk:
            raise ValueError(f"{model_dir}: tensor {name} is missing; its config.json ({family}) implies it. Is "
                             "the checkpoint complete, and does config.json belong to these weights?")
        if tuple(disk[name][0]) != shape:
            raise ValueError(f"{model_dir}: tensor {name} has shape {list(disk[name][0])} but its config.json "
                             f"implies {list(shape)}; config.json does not belong to these weights")
    tied = config.model.tie_embeddings
    extra = [n for n in disk if n not in want and not (tied and n == "lm_head.weight")]
    if extra:
        raise ValueError(f"{model_dir}: tensor {extra[0]} matches nothing in a {family} model of its config.json "
                         f"({len(extra)} such tensors); config.json does not describe these weights")
    return where, names


@torch.no_grad()
def load_init_weights(model: torch.nn.Module, config: Config, ep=None, reader=None) -> CountingReader:
    """Fill `model` (after `parallelize`; `ep` is its handle) from `config.model.init_from`; returns the
    reader, which counted what this rank read. `reader(name)` may be passed to instrument the reads."""
    where, names = check_checkpoint(config.model.init_from, config)
    reader = CountingReader(where, keep_open=True) if reader is None else reader
    expert_ids = None if ep is None else ep.local_expert_ids
    try:
        state = merge_experts(_HFState(names, reader), model.state_dict(), expert_ids=expert_ids)
    finally:
        reader.close()
    model.load_state_dict(state, strict=True)
    return reader

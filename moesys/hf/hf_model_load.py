"""`model.hf_model` weights, read so that each rank touches only the experts it holds.

    loader = HFModelLoader(config)             # plans every read from the safetensors headers
    model = loader.build(device)               # non-expert weights on `device`, experts on the meta device
    handle = parallelize(model, config)        # EP / FSSDP decide which experts this rank holds
    loader.load_experts(model, handle)         # only those experts' bytes are read (memory-mapped)

Names. Each on-disk tensor is renamed as transformers' `from_pretrained` renames it: its checkpoint
conversion mapping (`get_model_conversion_mapping`), then `rename_source_key` (renamings, then at most
one converter, such as Mixtral's per-expert w1/w3 -> gate_up_proj: MergeModulelist then Concatenate).
The converter's own ops build each tensor, so the values are transformers' own, bit for bit.

Experts are read in one of three ways, chosen per tensor from the mapping:
- per expert on disk (the converter starts with MergeModulelist): only the owned experts' tensors; the
  k-th tensor of a pattern in transformers' key order is expert k (its `tensor_idx`);
- fused [E, ...] on disk: only the owned rows, through safetensors' `get_slice`;
- both need the remaining ops to act within an expert (dims >= 1: Concatenate, Interleave, Transpose
  without check_dims). A mapping with another op reads every expert of that tensor and keeps the owned
  rows after converting, with a warning naming the op.
Before any weight is read the names and shapes are checked (the converters run on meta tensors of the
disk shapes), naming the first missing, mis-shaped or unexpected tensor.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from moesys.config import Config
from moesys.hf.load import CountingReader
from moesys.hf.meta import materialize_meta_buffers, still_meta
from moesys.models.hf_causal_lm import HFCausalLM
from moesys.models.hf_experts_layout import find_hf_experts, to_moesys
from moesys.models.hf_source import fp32_strict_names
from moesys.train_precision import kept_in_fp32, param_dtype
from moesys.upcycling.io import source_tensors

_WITHIN_EXPERT_OPS = ("Concatenate", "Interleave", "Transpose")


@dataclass
class _Target:
    """What fills one parameter: its converter (None: one tensor, renamed only) and its on-disk sources as
    (source pattern, disk key), in transformers' key order."""
    converter: object | None
    sources: list[tuple[str, str]] = field(default_factory=list)
    how: str = "whole"  # experts: "per_expert", "rows" or "whole"


def _within_expert(op) -> bool:
    name = type(op).__name__
    if name == "Transpose":
        return min(op.dim0, op.dim1) >= 1 and not op.check_dims
    return name in _WITHIN_EXPERT_OPS and op.dim >= 1


def _how(target: _Target) -> str:
    ops = list(getattr(target.converter, "operations", []))
    if ops and type(ops[0]).__name__ == "MergeModulelist" and ops[0].dim == 0:
        return "per_expert" if all(_within_expert(op) for op in ops[1:]) else "whole"
    return "rows" if all(_within_expert(op) for op in ops) else "whole"


def _ignored(name: str, patterns) -> bool:
    return any(re.search(p, name) for p in patterns or ())


class HFModelLoader:
    """Plans the reads of a `model.hf_model` checkpoint (module docstring) and performs them."""

    def __init__(self, config: Config, reader: CountingReader | None = None):
        from transformers import AutoModelForCausalLM

        from moesys.models.hf_source import check_hf_dir, hf_config

        self.config = config
        self.dir = check_hf_dir(config.model.hf_model)
        with torch.device("meta"):
            self.hf = AutoModelForCausalLM.from_config(hf_config(self.dir), dtype=torch.float32,
                                                       trust_remote_code=False)
        where, self.disk = source_tensors(self.dir)
        # files stay open from build() to the end of load_experts(): thousands of per-expert tensors
        self.reader = CountingReader(where, keep_open=True) if reader is None else reader
        # Parameters are read straight into train.param_dtype (a bf16 checkpoint never goes through fp32),
        # except those the class keeps in fp32 as a bf16 from_pretrained does; buffers keep their dtype.
        dtype = param_dtype(config)
        self.keep_fp32 = fp32_strict_names(self.hf) if dtype != torch.float32 else ()
        params = {n for n, _ in self.hf.named_parameters(remove_duplicate=False)}
        self.meta = {k: (tuple(v.shape), dtype if k in params and not kept_in_fp32(k, self.keep_fp32) else v.dtype)
                     for k, v in self.hf.state_dict().items()}
        self.expert_params = {f"{holder}.experts.{n}" for holder, _, m in find_hf_experts(self.hf)
                              for n, _ in m.named_parameters(recurse=False)}
        self.targets, self.missing = self._plan()
        self.device: torch.device | None = None

    # -- planning (headers only) ---------------------------------------------------------------
    def _plan(self) -> tuple[dict[str, _Target], set[str]]:
        """(parameter name -> what fills it, the names no tensor fills: tied weights, filled by tie_weights);
        ValueError naming the first missing, mis-shaped or unexpected tensor."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key

        mapping = get_model_conversion_mapping(self.hf)
        renamings = [m for m in mapping if not isinstance(m, WeightConverter)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        prefix, meta_state = self.hf.base_model_prefix, self.meta
        ignore_unexpected = set(self.hf._keys_to_ignore_on_load_unexpected or ()) | {r"(^|\.)position_ids$"}
        targets: dict[str, _Target] = {}
        unexpected = []
        for key in sorted(self.disk, key=dot_natural_key):
            # exactly from_pretrained's renaming (convert_and_load_state_dict_in_model)
            name, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
            if name not in meta_state and key in meta_state:
                name, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta_state)
            if name not in meta_state:
                if not _ignored(name, ignore_unexpected):
                    unexpected.append(name)
                continue
            target = targets.setdefault(name, _Target(by_pattern[pattern] if pattern else None))
            target.sources.append((pattern or key, key))
        ties = getattr(self.hf, "all_tied_weights_keys", None) or {}
        partner = {**ties, **{source: target for target, source in ties.items()}}  # either side may be on disk
        filled, mismatched = set(), []
        for name, target in targets.items():
            tensors = [torch.empty(self.disk[key][0], dtype=self.disk[key][1], device="meta")
                       for _, key in target.sources]
            for out, t in self._convert(name, target, tensors).items():
                filled.add(out)
                if out not in meta_state or tuple(t.shape) != meta_state[out][0]:
                    mismatched.append(out)
            if name in self.expert_params:
                target.how = _how(target)
        missing = [k for k in meta_state if k not in filled and partner.get(k) not in filled]
        for kind, bad in (("missing_keys", missing), ("mismatched_keys", mismatched), ("unexpected_keys", unexpected)):
            if bad:
                raise ValueError(f"model.hf_model={str(self.dir)!r}: its tensors do not match its config.json ({kind}: "
                                 f"{len(bad)}, the first {bad[0]}); the checkpoint is damaged or its config is wrong")
        return targets, {k for k in meta_state if k not in filled}

    def _convert(self, name: str, target: _Target, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The parameter tensor(s) `target`'s sources make, by transformers' own converter ops."""
        if target.converter is None:
            return {name: tensors[0]}
        converter = copy.deepcopy(target.converter)
        for (pattern, key), t in zip(target.sources, tensors):
            converter.add_tensor(name, key, pattern, t)
        out = converter.convert(name, model=self.hf, config=self.hf.config)
        return {k: v[0] if isinstance(v, list) else v for k, v in out.items()}

    # -- reading -------------------------------------------------------------------------------
    def build(self, device: torch.device | str = "cpu") -> HFCausalLM:
        """(Once per loader.) transformers' class with every non-expert weight read whole onto `device` (in
        `train.param_dtype`), buffers computed, tied weights tied; its experts (moesys `Experts`) stay on
        the meta device until `load_experts`."""
        self.device = torch.device(device)
        state = {}
        for name, target in self.targets.items():
            if name in self.expert_params:
                continue
            dtype = self.meta[name][1]
            tensors = [self.reader(key).to(dtype=dtype) for _, key in target.sources]
            for out, t in self._convert(name, target, tensors).items():
                state[out] = t.to(self.device, dtype=self.meta[out][1])
        with torch.no_grad():
            self.hf.load_state_dict(state, strict=False, assign=True)
        del state
        self.hf.tie_weights(missing_keys=set(self.missing), recompute_mapping=False)
        materialize_meta_buffers(self.hf, self.device)
        expert_ids = {id(p) for n, p in self.hf.named_parameters() if n in self.expert_params}
        left = still_meta(self.hf, expert_ids)
        if left:
            raise ValueError(f"model.hf_model={str(self.dir)!r}: {left[0]} (and {len(left) - 1} more) got no value "
                             "from the checkpoint; the checkpoint is incomplete")
        self.hf.eval()  # as from_pretrained leaves it
        r = self.config.moe.router
        return HFCausalLM(self.hf, backend=self.config.moe.backend, aux_loss_coef=self.config.moe.aux_loss_coef,
                          aux_free_bias=r.aux_free_bias, bias_update_rate=r.bias_update_rate)

    def expert_rows(self, name: str, ids: list[int]) -> torch.Tensor:
        """Rows `ids` (global expert ids, ascending) of the HF expert parameter `name`, in transformers'
        in-memory layout, reading only those experts where the mapping allows (module docstring)."""
        target = self.targets[name]
        shape, dtype = self.meta[name]
        if not ids:
            return torch.empty((0, *shape[1:]), dtype=dtype)
        if target.how == "per_expert":
            patterns = list(dict.fromkeys(p for p, _ in target.sources))
            keys = {p: [k for q, k in target.sources if q == p] for p in patterns}
            sub = _Target(target.converter, [(p, keys[p][e]) for p in patterns for e in ids])
            tensors = [self.reader(key).to(dtype=dtype) for _, key in sub.sources]
            return self._convert(name, sub, tensors)[name]
        if target.how == "rows":
            tensors = [self.reader.rows(key, ids).to(dtype=dtype) for _, key in target.sources]
            return self._convert(name, target, tensors)[name]
        ops = [type(op).__name__ for op in getattr(target.converter, "operations", [])]
        warnings.warn(f"model.hf_model: {name} is converted by {ops}, which mixes experts, so every rank reads all "
                      f"{shape[0]} experts of it and keeps its own", stacklevel=2)
        tensors = [self.reader(key).to(dtype=dtype) for _, key in target.sources]
        return self._convert(name, target, tensors)[name][ids]

    @torch.no_grad()
    def load_experts(self, model: HFCausalLM, handle=None) -> CountingReader:
        """Fill the experts `model` holds (after `parallelize`; `handle` is its result, None: all of them) from
        the checkpoint, swapping the meta parameters for real ones in place (the handle keeps the same objects).
        Returns the reader, which counted every tensor and byte read."""
        try:
            self._load_experts(model, handle)
        finally:
            self.reader.close()
        return self.reader

    def _load_experts(self, model: HFCausalLM, handle) -> None:
        for holder_name, layout in model.layouts.items():
            module = model.hf.get_submodule(holder_name).experts
            full = f"hf.{holder_name}.experts.gate_up_proj"
            ids = handle.local_expert_ids(full) if handle is not None else None
            ids = list(range(module.num_experts)) if ids is None else list(ids)
            hf_names = [n.rpartition(".")[2] for n in self.expert_params if n.startswith(holder_name + ".experts.")]
            rows = {n: self.expert_rows(f"{holder_name}.experts.{n}", ids) for n in hf_names}
            for n, t in to_moesys(rows, layout).items():
                param = getattr(module, n)
                assert tuple(param.shape) == tuple(t.shape), (holder_name, n, param.shape, t.shape)
                torch.utils.swap_tensors(param, nn.Parameter(t.to(self.device), requires_grad=param.requires_grad))

"""Training checkpoints: safetensors files plus a JSON manifest, written atomically, experts by global id.

Layout of `RUN_DIR/ckpt/step_N/`:
- `model.safetensors`: the model's state dict with every fused expert tensor split per expert and
  named by its global expert id: `blocks.{l}.ffn.experts.gate_up_proj [E, 2I, H]` is stored as
  `blocks.{l}.ffn.experts.{e}.gate_up_proj [2I, H]` (likewise `down_proj [H, I]` and the biases), so a
  run can resume with another expert-parallel layout;
- `optimizer.safetensors`: AdamW state as `{state}/{parameter name}` (`exp_avg/...`, `exp_avg_sq/...`,
  `step/...`), experts split the same way;
- `rng_rank{r}.safetensors`: each rank's torch CPU (and CUDA) generator state;
- `manifest.json` (written last): step, data-sampler position, scheduler state, optimizer
  hyper-parameters, world size, the config and each file's size and SHA-256
  (`moesys.checkpoint_integrity` verifies them on resume and falls back past damaged checkpoints).

A checkpoint is written into `ckpt/.tmp-step_N` and renamed to `ckpt/step_N` once complete, so a
crash never leaves a half-written `step_N`; the newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moesys.checkpoint_integrity import file_records
from moesys import owned_tmp

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
# A fused expert tensor in the model: "<prefix>experts.<name>" whose first dim is the expert count.
_EXPERT_PARAM = re.compile(r"^(?P<prefix>.*\.experts\.)(?P<name>gate_up_proj|down_proj|gate_up_proj_bias|down_proj_bias)$")
_SPLIT_EXPERT = re.compile(r"^(?P<prefix>.*\.experts\.)(?P<e>\d+)\.(?P<name>[a-z_]+)$")


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- expert naming ---------------------------------------------------------------------------------

def split_experts(state: dict[str, torch.Tensor], expert_offset: int = 0) -> dict[str, torch.Tensor]:
    """Fused [E_local, ...] expert tensors -> one tensor per expert named by global id (offset + e)."""
    out = {}
    for name, t in state.items():
        m = _EXPERT_PARAM.match(name)
        if m is None:
            out[name] = t
            continue
        for e in range(t.shape[0]):
            out[f"{m['prefix']}{expert_offset + e}.{m['name']}"] = t[e]
    return out


def merge_experts(flat: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor],
                  expert_ids=None) -> dict[str, torch.Tensor]:
    """The inverse of split_experts for the names and shapes in `wanted` (a state dict of this rank):
    gathers, for each fused expert tensor `name`, the experts `expert_ids(name)` (global ids; None or
    a None result: 0..E_local-1). Raises ValueError naming missing or mis-shaped tensors."""
    out, missing = {}, []
    for name, ref in wanted.items():
        m = _EXPERT_PARAM.match(name)
        if m is None:
            if name not in flat:
                missing.append(name)
                continue
            out[name] = flat[name]
        else:
            ids = expert_ids(name) if expert_ids is not None else None
            keys = [f"{m['prefix']}{e}.{m['name']}" for e in (range(ref.shape[0]) if ids is None else ids)]
            absent = [k for k in keys if k not in flat]
            if absent:
                missing.extend(absent)
                continue
            out[name] = torch.stack([flat[k] for k in keys])
        if tuple(out[name].shape) != tuple(ref.shape):
            raise ValueError(f"checkpoint tensor {name} has shape {list(out[name].shape)} but the model "
                             f"needs {list(ref.shape)}; the checkpoint was written for another model config")
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}; "
                         "it was written for another model config")
    return out


# ---- finding checkpoints ---------------------------------------------------------------------------

def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a manifest) as (step, path), oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "manifest.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def read_manifest(ckpt_dir: Path) -> dict:
    return json.loads((Path(ckpt_dir) / "manifest.json").read_text())


# ---- optimizer state -------------------------------------------------------------------------------

def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]) -> dict[str, torch.Tensor]:
    """AdamW-style per-parameter state as {"{state}/{param name}": tensor} (0-d tensors included)."""
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    out[f"{key}/{names[p]}"] = value
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str],
                           flat: dict[str, torch.Tensor]) -> None:
    """Fill the optimizer's state from `optimizer_tensors`-style entries through `load_state_dict`
    (which puts `step` where the fused/foreach kernels expect it)."""
    sd = optimizer.state_dict()
    by_key: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        state_key, pname = k.split("/", 1)
        by_key.setdefault(pname, {})[state_key] = v
    index = 0
    state = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if names[p] in by_key:
                state[index] = {k: v.to(p.device) if v.dim() else v for k, v in by_key[names[p]].items()}
            index += 1
    sd["state"] = state
    optimizer.load_state_dict(sd)


# ---- save / load -----------------------------------------------------------------------------------

def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A copy per tensor: tied weights share storage, which safetensors refuses to write.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["torch_cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"], device)


def save_checkpoint(ckpt_root: Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    manifest: dict, rank: int, world_size: int, device: torch.device,
                    barrier=lambda: None, keep: int = 2, ep=None, states: tuple[dict, dict] | None = None) -> Path:
    """Write checkpoint `step` atomically. Every rank calls it (each writes its RNG state); rank 0
    writes the model, the optimizer and the manifest, renames the directory and prunes old ones.
    `barrier` synchronises the ranks (the temp directory must be on a file system they share).
    `ep`: the `moesys.parallel.parallelize` handle; with expert parallelism every rank then takes part
    in gathering all experts (model and optimizer state) so rank 0 writes them by global id.
    `states`: (model state, optimizer state as `optimizer_tensors` names it) to write instead of
    reading them from `model` and `optimizer` (the DeepSpeed engine's fp32 masters and ZeRO's state)."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step_{step}"
    tmp = ckpt_root / f".tmp-step_{step}"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        owned_tmp.remove_stale(ckpt_root, ".tmp-step_")  # what a killed run left at other steps
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        owned_tmp.claim(tmp)
    try:
        barrier()
        save_file(_contiguous(rng_state(device)), str(tmp / f"rng_rank{rank}.safetensors"))
        if states is None:
            names = {p: n for n, p in model.named_parameters()}
            states = model.state_dict(), optimizer_tensors(optimizer, names)
        model_state, optim_state = states
        if ep is not None:
            model_state = ep.gather_expert_state(model_state)
            optim_state = ep.gather_expert_state(optim_state, param_name=_optim_param_name)
        if rank == 0:
            save_file(_contiguous(split_experts(model_state)), str(tmp / "model.safetensors"))
            save_file(_contiguous(split_experts_optim(optim_state)), str(tmp / "optimizer.safetensors"))
        barrier()
    except BaseException:   # an error or Ctrl-C while writing: no temp directory stays behind (a
        if rank == 0:       # SIGKILL's is removed by a later save, its owner being gone)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        owned_tmp.disown(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        full = {"format_version": FORMAT_VERSION, "step": step, "world_size": world_size, **manifest,
                "files": file_records(tmp, files)}  # size and SHA-256 per file: resume verifies them
        write_json_atomic(tmp / "manifest.json", full)
        if final.exists():                      # a re-run of the same step: replace it
            trash = ckpt_root / f".old-step_{step}"
            os.replace(final, trash)
            shutil.rmtree(trash)
        os.replace(tmp, final)
        for _, old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _optim_param_name(key: str) -> str:
    """'exp_avg/blocks.0.ffn.experts.down_proj' -> 'blocks.0.ffn.experts.down_proj'."""
    return key.split("/", 1)[1]


def split_experts_optim(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """split_experts for `{state}/{param name}` keys (0-d `step` entries stay whole)."""
    out = {}
    for k, v in flat.items():
        state_key, pname = k.split("/", 1)
        if v.dim() == 0 or _EXPERT_PARAM.match(pname) is None:
            out[k] = v
        else:
            for name, t in split_experts({pname: v}).items():
                out[f"{state_key}/{name}"] = t
    return out


def merge_experts_optim(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of split_experts_optim: per-expert `{state}/{prefix}{e}.{name}` entries are stacked
    back into `{state}/{prefix}{name}` in global-id order (all experts: one rank holds them all)."""
    out, experts = {}, {}
    for k, v in flat.items():
        state_key, pname = k.split("/", 1)
        m = _SPLIT_EXPERT.match(pname)
        if m is None:
            out[k] = v
        else:
            experts.setdefault(f"{state_key}/{m['prefix']}{m['name']}", {})[int(m["e"])] = v
    for k, by_id in experts.items():
        ids = sorted(by_id)
        out[k] = torch.stack([by_id[e] for e in ids])
    return out


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} cannot be read ({e}): the checkpoint is damaged; resume from another "
                         "one (moesys.train --resume picks the newest intact checkpoint)") from e


def read_model_state(ckpt_dir: Path, model: torch.nn.Module, ep=None) -> dict[str, torch.Tensor]:
    """The checkpoint's model state for this rank: `model.state_dict()`'s names and shapes, with this
    rank's experts (`ep`: the parallelize handle; None: all)."""
    flat = _load_tensors(Path(ckpt_dir) / "model.safetensors")
    return merge_experts(flat, model.state_dict(), expert_ids=None if ep is None else ep.local_expert_ids)


def read_optimizer_state(ckpt_dir: Path, ep=None) -> dict[str, torch.Tensor]:
    """The checkpoint's optimizer state as `{state}/{parameter name}`, fused experts restricted to this
    rank's (`ep`: the parallelize handle; None: all)."""
    merged = merge_experts_optim(_load_tensors(Path(ckpt_dir) / "optimizer.safetensors"))
    return merged if ep is None else ep.local_expert_state(merged, param_name=_optim_param_name)


def load_checkpoint(ckpt_dir: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    rank: int, device: torch.device, ep=None) -> dict:
    """Load model (and optimizer) state and this rank's RNG state; returns the manifest. With `ep`
    (the parallelize handle) each rank takes only its own experts, so any ep / FSSDP layout can
    resume any run."""
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{ckpt_dir}: checkpoint format_version={manifest.get('format_version')} but this "
                         f"moesys reads version {FORMAT_VERSION}")
    model.load_state_dict(read_model_state(ckpt_dir, model, ep), strict=True)
    if optimizer is not None:
        names = {p: n for n, p in model.named_parameters()}
        load_optimizer_tensors(optimizer, names, read_optimizer_state(ckpt_dir, ep))
    rng_file = ckpt_dir / f"rng_rank{rank}.safetensors"
    if rng_file.is_file():
        set_rng_state(_load_tensors(rng_file), device)
    return manifest

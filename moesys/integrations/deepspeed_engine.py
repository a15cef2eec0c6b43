"""`train.engine: deepspeed`: the moesys trainer's model, placement, data, schedule and metrics, with the
backward, gradient reduction, clipping and optimizer step done by a DeepSpeed ZeRO-1/2 engine.

How moesys's experts become DeepSpeed MoE parameters:
- `parallelize()` places the experts first (expert parallelism over `parallel.ep` consecutive ranks;
  FSSDP is refused: it moves experts and their optimizer state between ranks every few steps, which
  ZeRO's flat partitions cannot follow);
- every expert parameter gets DeepSpeed's marks `allreduce=False`, `group_name="ep_size_{ep}"` (what
  `deepspeed.moe.experts.Experts` sets), and the AdamW groups go through
  `split_params_into_different_moe_groups_for_optimizer`, so ZeRO reduces and partitions expert
  gradients and states only over the expert-data-parallel group (ranks holding the same experts), the
  dense ones over all ranks;
- `deepspeed.initialize` treats a model as MoE only if it contains a `deepspeed.moe.layer.MoE`; the
  engine gets a wrapper holding the moesys model plus `_ExpertGroups`, a parameter-free `MoE` whose
  `set_deepspeed_parallelism` creates DeepSpeed's expert groups and checks they are moesys's.

Gradient math equals the torch engine's: DeepSpeed divides the loss by gradient_accumulation_steps
and every reduced gradient by the data-parallel world size (expert gradients are already summed over
their ep group by the all-to-all's backward), computes the global norm over all experts, and steps
moesys's own AdamW (the `torch.optim.AdamW` from `moesys.train.build_optimizer`). With fused AdamW the
norm and the clip are the torch engine's, taken where it takes them: the norm in fp32 over ZeRO's reduced
gradient partitions (one foreach norm, one all-reduce of its square over all ranks: every dense element
lives in one rank's partition, every expert element in one rank of its expert-data-parallel group),
the clip inside AdamW's kernel (`grad_scale`, set by a step pre-hook), a non-finite norm skipping the
update (`found_inf`). DeepSpeed then gets gradient_clipping 0 and compute_grad_norm false: its own norm
converts every gradient to fp64 first and its clip is another pass over the fp32 partition, 6-8 ms of a
93 ms step of configs/small.yaml on an H100 (bench/results/train_small_deepspeed_profile_h100_fd052fb.txt).
Otherwise (foreach AdamW, or DeepSpeed's BF16_Optimizer: ZeRO-1 with bf16 parameters and fp32 gradient
accumulation) DeepSpeed computes the norm and clips.

Where the parameters are fp32 (torch_autocast mode, fp32 training) ZeRO's fp32 master partitions are made
views of the parameters' own partitions (`share_masters_with_parameters`): no clone, no copy back. Where
a group's parameters lie whole in this rank's partition, the reduced gradients are copied into the
partition's own layout and the step takes them unflattened (`flat_gradient_partitions`).

Checkpoints stay moesys's (moesys.checkpoint): the fp32 master weights and the AdamW moments are
gathered from ZeRO's partitions per parameter (`deepspeed.utils.safe_get_full_*`, collectives over
each parameter's group) and written by global expert id like the torch engine's, so a run resumes
under either engine and `moesys export` reads it. On resume the masters and moments are scattered
back (`safe_set_full_*`) after `deepspeed.initialize`.

DeepSpeed reads LOCAL_RANK from the environment (set by torchrun and the deepspeed launcher; set here
from moesys's bootstrap otherwise) and needs a process group: one process alone gets a one-rank group.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import deepspeed
import deepspeed.moe.layer as ds_layer
import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer, GradPartitionBufferGroup
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state)
from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

from moesys import checkpoint as ckpt
from moesys.integrations.deepspeed import expert_mesh
from moesys.integrations.deepspeed_config import resolve_deepspeed_config
from moesys.layers.experts import Experts
from moesys.parallel.bootstrap import _free_port
from moesys.parallel.ep import ExpertParallelExperts
from moesys.parallel.handle import ParallelHandle, total_norm
from moesys.train import clip_in_fused_step

__all__ = ["DeepSpeedEngine"]

_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


class _ExpertGroups(ds_layer.MoE):
    """Makes `deepspeed.initialize` see an MoE model (it looks for `deepspeed.moe.layer.MoE` modules)
    and creates DeepSpeed's expert groups for moesys's expert parallelism. No parameters; never called."""

    def __init__(self, num_experts: int, ep_size: int, ep_ranks: list[int]):
        nn.Module.__init__(self)  # DeepSpeed's __init__ would build a gate and experts
        self.num_experts, self.ep_size, self.ep_ranks = num_experts, ep_size, ep_ranks
        self.expert_group_name = f"ep_size_{ep_size}"

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        mesh = expert_mesh(self.ep_size, use_data_before_expert_parallel_, "train.engine=deepspeed")
        if mesh.ep_ranks() != self.ep_ranks:
            raise ValueError(f"train.engine=deepspeed: DeepSpeed's expert-parallel group {mesh.ep_ranks()} differs "
                             f"from moesys's {self.ep_ranks}")

    def forward(self, *args, **kwargs):
        raise RuntimeError("_ExpertGroups only marks the model as MoE for deepspeed.initialize; it has no forward")


class _EngineModule(nn.Module):
    """What deepspeed.initialize wraps: the moesys model and the MoE marker. The forward returns the
    model's output inside a dict beside its loss tensors: DeepSpeed's engine registers its backward
    prologue (ZeRO's backward_prologue/enter_backward, the gradient-accumulation boundary, the backward
    timers) as hooks on the tensors it finds in tuples, lists and dicts, and a dataclass output hides them
    (the prologue then never ran, and `wall_clock_breakdown` failed with "timer is not started")."""

    def __init__(self, model: nn.Module, marker: _ExpertGroups | None):
        super().__init__()
        self.model, self.expert_groups = model, marker

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        return {"output": out, "loss": out.loss, "aux_loss": out.aux_loss}


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every experts module (`Experts`, or `ExpertParallelExperts` after parallelize)."""
    out, seen = [], set()
    for m in model.modules():
        if isinstance(m, (Experts, ExpertParallelExperts)):
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def _bf16_optimizer(ds: dict) -> bool:
    """Whether deepspeed.initialize builds its BF16_Optimizer (ZeRO-1 with bf16 parameters and fp32 gradient
    accumulation), which keeps no `averaged_gradients` and refuses compute_grad_norm false."""
    accum = str((ds.get("data_types") or {}).get("grad_accum_dtype", "")).lower()
    return bool(ds["bf16"].get("enabled")) and ds["zero_optimization"]["stage"] == 1 and accum in (
        "fp32", "float32", "float", "torch.float32")


def share_masters_with_parameters(zero: DeepSpeedZeroOptimizer) -> int:
    """Where the parameters are fp32 already (torch_autocast mode, fp32 training), ZeRO's fp32 master
    partition of a group is a clone of the parameters' own partition, copied back into them after every
    step: a pass over every weight (about 2 ms of an 84 ms step of configs/small.yaml on an H100) and 4
    bytes per parameter. Here each such master becomes a view of the parameters' partition itself: AdamW
    updates the weights in place, and DeepSpeed's copy back is a copy of a tensor onto itself, which torch
    skips. ZeRO's per-parameter views of the masters (the checkpoint's gather and scatter) are linked again
    onto the shared storage. Returns how many groups now share."""
    if zero.cpu_offload:  # the masters live in host memory then
        return 0
    shared = 0
    for i, master in enumerate(zero.single_partition_of_fp32_groups):
        own = zero.parallel_partitioned_bit16_groups[i][dist.get_rank(group=zero.real_dp_process_group[i])]
        if own.dtype == master.dtype and own.device == master.device and own.shape == master.shape:
            master.data = own.data
            shared += 1
    if shared:
        zero._link_all_hp_params()
    return shared


def flat_gradient_partitions(zero: DeepSpeedZeroOptimizer) -> list[int]:
    """ZeRO with contiguous gradients copies each reduced gradient of its partition into one buffer in the
    order the reductions come (backward order), then at the step flattens them again into the partition's
    own order for AdamW: a pass over every gradient of the partition (about 2 ms of an 80 ms step of
    configs/small.yaml on an H100) and a transient partition-sized buffer. Here, for each parameter group
    whose parameters all lie whole in this rank's partition (every group at one rank, the expert groups
    under full expert parallelism), that copy goes to the gradient's own place in a buffer laid out as the
    partition, padding zeroed; `adopt_flat_partitions` then hands it to the step as DeepSpeed's
    pre-flattened partition, so nothing is flattened. Returns the groups handled so."""
    if zero.cpu_offload or not zero.contiguous_gradients or zero.use_grad_accum_attribute:
        return []
    eligible, ends, starts = [], {}, {}  # starts: a parameter's place in its group's partition, by id(param)
    for i, params in enumerate(zero.params_in_partition):
        if zero._use_compact_grad_partition_buffer(i) or (params and zero._is_muon_group(params)):
            continue
        rank = dist.get_rank(group=zero.real_dp_process_group[i])
        size, end, whole, places = int(zero.partition_size[i]), 0, True, {}
        for p in params:
            pid = zero.get_param_id(p)
            places[id(p)] = start = int(zero.grad_partition_insertion_offset[i][rank][pid])
            whole &= int(zero.grad_start_offset[i][rank][pid]) == 0 and start + p.numel() <= size
            end = max(end, start + p.numel())
        if whole:
            eligible.append(i)
            ends[i] = end
            starts.update(places)
    if not eligible:
        return []
    copy_in_order, release = zero.copy_grads_in_partition, zero._release_ipg_buffers
    flats: dict[int, torch.Tensor] = {}

    def copy_grads_in_partition(param, group_idx=None):
        i = zero._get_param_group_idx(param) if group_idx is None else group_idx
        if i not in ends:
            return copy_in_order(param, group_idx)
        flat = flats.get(i)
        if flat is None:  # one per backward, as DeepSpeed's buffer: accumulation keeps the first one's views
            flat = flats[i] = torch.empty(int(zero.partition_size[i]), dtype=zero.dtype, device=param.device)
            flat[ends[i]:].zero_()
        grad = zero.get_gradient_for_reduction(param)
        place = flat.narrow(0, starts[id(param)], param.numel())
        place.copy_(grad.view(-1))
        grad.data = place.view_as(grad)

    def release_ipg_buffers():
        release()
        flats.clear()

    zero.copy_grads_in_partition, zero._release_ipg_buffers = copy_grads_in_partition, release_ipg_buffers
    return eligible


def adopt_flat_partitions(zero: DeepSpeedZeroOptimizer, groups: list[int]) -> int:
    """After a step's last backward: each of `groups` (`flat_gradient_partitions`) whose gradient list is
    views of one buffer at consecutive places covering the partition (a last entry outside it may be zeros
    of padding) becomes DeepSpeed's pre-flattened partition (`GradPartitionBufferGroup`), which the step hands
    to AdamW as it is. Any other layout stays a list, which DeepSpeed flattens. Returns the groups adopted."""
    adopted = 0
    for i in groups:
        grads = zero.averaged_gradients.get(i)
        if not grads or getattr(grads, "flat_partition", None) is not None:
            continue
        size, first = int(zero.partition_size[i]), grads[0]
        if not first.is_contiguous() or first.untyped_storage().nbytes() < (first.storage_offset() + size) * \
                first.element_size():
            continue
        flat = first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (size,))
        at, ok = 0, True
        for k, g in enumerate(grads):
            in_place = g.data_ptr() == flat.data_ptr() + at * flat.element_size()
            if g.is_contiguous() and g.dtype == flat.dtype and in_place:
                at += g.numel()
            elif k == len(grads) - 1 and at + g.numel() == size:  # DeepSpeed's padding: zeros, and so is ours
                at += g.numel()
            else:
                ok = False
                break
        if ok and at == size:
            zero.averaged_gradients[i] = GradPartitionBufferGroup(list(grads), flat)
            adopted += 1
    return adopted


def clip_in_fused_step_checked(optimizer: torch.optim.Optimizer, norm: torch.Tensor | float | None,
                               max_norm: float) -> None:
    """moesys.train.clip_in_fused_step, with the marks of a norm that is not there: a negative one (ZeRO's
    mark of a non-finite norm) skips the update as a non-finite norm does under the torch engine; None (no
    norm yet, e.g. the lr-0 step that creates AdamW's state on resume, or no clipping) leaves the
    gradients as they are."""
    if norm is None:
        optimizer.grad_scale = optimizer.found_inf = None
        return
    norm = torch.as_tensor(norm, dtype=torch.float32)
    invalid = (norm < 0) | ~torch.isfinite(norm)
    clip_in_fused_step(optimizer, torch.where(invalid, torch.full_like(norm, float("inf")), norm), max_norm)


class DeepSpeedEngine:
    """The trainer's hook (moesys.train): `prepare` before the optimizer is built, `start` after the
    weights are loaded, then per micro-batch `forward` / `backward`, per step `grad_norm`, and
    `checkpoint_states` / `close`."""

    def __init__(self, model: nn.Module, ep, config, ctx):
        self.ds_config = resolve_deepspeed_config(config, ctx.world_size)  # refuses FSSDP, among others
        assert isinstance(ep, ParallelHandle), type(ep)
        self.model, self.ep, self.ctx = model, ep, ctx
        experts = expert_parameters(model)
        ep_size = ep.mesh.ep
        marker = None
        if experts:  # a model without MoE layers runs as a dense DeepSpeed model
            for p in experts:
                # deepspeed.moe.experts.Experts' marks: reduce and partition over the expert-data-parallel group
                p.allreduce, p.group_name = False, f"ep_size_{ep_size}"
            marker = _ExpertGroups(config.moe.num_experts, ep_size, ep.mesh.ep_ranks())
        self.module = _EngineModule(model, marker)
        self.engine = None
        self._own_group = False
        self._own_norm = False  # moesys computes the norm and clips (start)
        self._norm: torch.Tensor | None = None  # the last step's, with _own_norm
        self.flat_groups: list[int] = []  # ZeRO groups whose gradients land in partition order (start)
        self.adopted_groups = 0  # of those, how many the last step took unflattened

    @staticmethod
    def split_groups(groups: list[dict]) -> list[dict]:
        """AdamW's groups with the expert parameters moved into DeepSpeed MoE groups (`moe: True`,
        `name: ep_size_{ep}`, the other settings of the group they came from)."""
        named = [{**g, "name": g.get("name", f"group{i}")} for i, g in enumerate(groups)]
        return split_params_into_different_moe_groups_for_optimizer(named)

    def start(self, optimizer: torch.optim.Optimizer, resume_from: Path | None) -> None:
        """deepspeed.initialize over the model and moesys's AdamW (built on `split_groups`); with
        `resume_from`, the checkpoint's fp32 masters and AdamW state go into ZeRO's partitions."""
        os.environ.setdefault("LOCAL_RANK", str(self.ctx.local_rank))
        if not dist.is_initialized():  # one process: DeepSpeed still needs a (one-rank) process group
            backend = "nccl" if self.ctx.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                    timeout=self.ctx.timeout or timedelta(minutes=10))
            self._own_group = True
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        ds_config = self.ds_config
        self._own_norm = bool(optimizer.defaults.get("fused")) and not _bf16_optimizer(ds_config)
        if self._own_norm:  # the norm and the clip as the torch engine takes them (the module docstring)
            zero = {**ds_config["zero_optimization"], "compute_grad_norm": False}
            ds_config = {**ds_config, "gradient_clipping": 0.0, "zero_optimization": zero}
            optimizer.register_step_pre_hook(self._clip_in_step)
        # In bf16 DeepSpeed casts the parameters only: buffers (rotary tables, the aux-loss-free router
        # bias) stay fp32, as under the torch engine's autocast (tests/test_deepspeed_engine_job.py).
        self.engine, _, _, _ = deepspeed.initialize(model=self.module, optimizer=optimizer, config=ds_config)
        if self._own_norm and not isinstance(self.zero, DeepSpeedZeroOptimizer):
            raise RuntimeError(f"train.engine=deepspeed: expected DeepSpeed's ZeRO-1/2 optimizer, got "
                               f"{type(self.zero).__name__}; moesys reads the gradient partitions of the former")
        if isinstance(self.zero, DeepSpeedZeroOptimizer):
            share_masters_with_parameters(self.zero)
            self.flat_groups = flat_gradient_partitions(self.zero)
        if resume_from is not None:
            self._restore(resume_from, optimizer)

    @property
    def zero(self):
        """DeepSpeed's ZeRO optimizer (holds the fp32 partitions; `.optimizer` is moesys's AdamW)."""
        return self.engine.optimizer

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)["output"]

    def backward(self, loss: torch.Tensor) -> None:
        """One micro-batch's backward. DeepSpeed divides the loss by gradient_accumulation_steps and,
        after the step's last micro-batch, reduces the gradients into ZeRO's partitions (inside its
        backward), then clips and steps AdamW (then zeroes the gradients)."""
        self.engine.backward(loss)
        if self.engine.is_gradient_accumulation_boundary():
            self.adopted_groups = adopt_flat_partitions(self.zero, self.flat_groups) if self.flat_groups else 0
            if self._own_norm:
                self._norm = self._partition_norm()
        self.engine.step()

    def _partition_norm(self) -> torch.Tensor:
        """The global gradient norm (fp32) from ZeRO's reduced gradient partitions on every rank: this rank's
        partition of each parameter group (padding is zeros), its square summed over all ranks."""
        grads = []
        for group in self.zero.averaged_gradients.values():
            flat = getattr(group, "flat_partition", None)  # bf16 parameters: one fp32 buffer per group
            grads += [flat] if flat is not None else [g for g in group or () if g is not None]
        sumsq = total_norm(grads).square() if grads else torch.zeros((), device=self.ctx.device)
        if dist.get_world_size() > 1:
            dist.all_reduce(sumsq)
        return sumsq.sqrt()

    def _clip_in_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        """AdamW's step pre-hook: the step's clip from moesys's norm (None, before any backward: unclipped)."""
        max_norm = self.ds_config["gradient_clipping"]
        clip_in_fused_step_checked(optimizer, self._norm if max_norm > 0 else None, max_norm)

    def grad_norm(self) -> torch.Tensor:
        """The step's global gradient norm before clipping (over every rank's experts)."""
        norm = self._norm if self._own_norm else self.engine.get_global_grad_norm()
        assert norm is not None, "no gradient norm: grad_norm() is read after a step's last backward"
        return torch.as_tensor(norm, dtype=torch.float64, device=self.ctx.device)

    def checkpoint_states(self) -> tuple[dict, dict]:
        """(model state with the fp32 masters, AdamW state as `{state}/{name}`) for moesys.checkpoint;
        a collective (every rank, the same parameters in the same order)."""
        model_state = self.model.state_dict()
        optim_state = {}
        step = self._adam_step()
        self._link_adam_state()
        for names, p in self._trainable():
            master = safe_get_full_fp32_param(p)
            moments = {key: safe_get_full_optimizer_state(p, key) for key in _ADAM_MOMENTS}
            for name in names:
                model_state[name] = master
                optim_state.update({f"{key}/{name}": v for key, v in moments.items()})
                optim_state[f"step/{name}"] = step
        return model_state, optim_state

    def _trainable(self) -> list[tuple[list[str], nn.Parameter]]:
        """(every name of a parameter (tied ones have several), parameter) for the parameters ZeRO holds."""
        by_id: dict[int, tuple[list[str], nn.Parameter]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if p.requires_grad:
                by_id.setdefault(id(p), ([], p))[0].append(name)
        return list(by_id.values())

    def _adam_step(self) -> torch.Tensor:
        states = list(self.zero.optimizer.state.values())
        assert states, "AdamW has no state before the first step"
        return states[0]["step"]

    @torch.no_grad()
    def _restore(self, ckpt_dir: Path, optimizer: torch.optim.Optimizer) -> None:
        masters = ckpt.read_model_state(ckpt_dir, self.model, self.ep)
        moments = ckpt.read_optimizer_state(ckpt_dir, self.ep)
        self._create_adam_state(optimizer)
        for names, p in self._trainable():
            safe_set_full_fp32_param(p, masters[names[0]].to(p.device, torch.float32))
            for key in _ADAM_MOMENTS:
                safe_set_full_optimizer_state(p, moments[f"{key}/{names[0]}"].to(p.device), key)
        step = moments[f"step/{self._trainable()[0][0][0]}"]
        for state in optimizer.state.values():
            state["step"].copy_(step)

    def _create_adam_state(self, optimizer: torch.optim.Optimizer) -> None:
        """AdamW creates its state on its first step: take one with zero gradients and lr 0 (which leaves
        the weights exactly as they are), then link ZeRO's per-parameter views to it."""
        lrs = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = 0.0
            for flat in g["params"]:
                flat.grad = torch.zeros_like(flat)
        optimizer.step()
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
            for flat in g["params"]:
                flat.grad = None
        self._link_adam_state()

    def _link_adam_state(self) -> None:
        """Point each parameter's ZeRO fragment at its slice of AdamW's state. DeepSpeed links once, after
        the first parameter group's step, when the later groups have no state yet (their fragments stay
        empty); linking again is cheap (views)."""
        zero = self.zero
        for i, params in enumerate(zero.bit16_groups):
            lazy_init_hp_params_optimizer_state(params, zero.single_partition_of_fp32_groups[i], zero.optimizer.state)

    def close(self) -> None:
        if self._own_group:
            dist.destroy_process_group()
            self._own_group = False

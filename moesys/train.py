"""The training entry point: `python -m moesys.train --config FILE --run-dir DIR [--set K=V]... [--resume]`,
alone, under torchrun or under mpirun (`moesys train ...` is the same for one process).

Order of a run: parse and validate the config and the data source (errors here name the bad value and
happen before any process group exists), create the process group, build the model on the device,
restore the latest checkpoint when resuming, then per optimizer step: `grad_accum` micro-batches of
forward/backward (bf16 autocast on GPU over fp32 masters, or pure bf16 with `train.param_dtype: bfloat16`:
moesys.train_precision; cross-entropy plus the MoE aux losses), one all-reduce of the
step's statistics (loss, expert load, SIGTERM flag), the data-parallel gradient all-reduce, clipping,
AdamW with warmup + cosine, and the aux-loss-free router-bias update from the load summed over
micro-batches and ranks. Metrics go to `metrics.jsonl`, TensorBoard and a tqdm bar; checkpoints to
`ckpt/step_N` (see moesys.checkpoint).

With `train.engine: deepspeed` (moesys.integrations.deepspeed_engine) the same loop runs the model
under `deepspeed.initialize` (ZeRO-1/2): DeepSpeed's backward and step replace the reduction, clipping
and AdamW step; schedule, statistics, metrics and checkpoints stay as they are. The deepspeed launcher
(`deepspeed --num_gpus N -m moesys.train ...`) sets torchrun's variables and passes `--local_rank`.

The host reads a step's loss, gradient norm and SIGTERM flag one step late (moesys.train_step_values),
so it never waits for the device mid-step; before a log line or a checkpoint it reads up to the
current step, so a run stops at the first non-finite step without saving weights that step touched.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.utils.checkpoint

from moesys import checkpoint as ckpt
from moesys import checkpoint_integrity as ckpt_integrity
from moesys import train_report
from moesys.cli import one_line
from moesys.config import Config, ConfigError, dump_config, load_config
from moesys.data import PackedSplits, ShardedSampler, build_data, val_batches, validate_source
from moesys.hf.load import load_init_weights
from moesys.hf.resolve import resolve_init_from
from moesys.hf.source import save_source
from moesys.models.transformer import MoETransformer
from moesys.parallel import CollectiveError, bootstrap, data_parallel, parallelize
from moesys.parallel.handle import clip_to_norm, total_norm
from moesys.parallel.handle_api import PlacementHandle
from moesys.run_lock import RunDirLock
from moesys.train_metrics import MetricsWindow, MetricsWriter, flops_per_token, peak_flops
from moesys.train_precision import autocast_dtype, cast_parameters, check_resume, param_dtype
from moesys.train_sigterm import SigtermFlag
from moesys.train_step_values import PendingStepValues, StepStats, StepValues, TrainingStopped

if TYPE_CHECKING:  # the DeepSpeed integration is imported only when train.engine asks for it
    from moesys.integrations.deepspeed_engine import DeepSpeedEngine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file (configs/tiny.yaml, ...)")
    parser.add_argument("--run-dir", default=None,
                        help="where metrics, TensorBoard logs and checkpoints go (None: runs/<config name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=20 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in the run directory (start fresh if none)")
    # The deepspeed launcher passes --local_rank=N (and sets LOCAL_RANK, which the bootstrap reads).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def lr_at(step: int, config: Config) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `lr * min_lr_ratio` at `steps` (step is 1-based)."""
    t = config.train
    if t.warmup_steps > 0 and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    span = max(t.steps - t.warmup_steps, 1)
    progress = min(max(step - t.warmup_steps, 0) / span, 1.0)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_optimizer(model: torch.nn.Module, config: Config, split_groups=None) -> tuple[torch.optim.AdamW, str]:
    """AdamW without weight decay on vectors (norms) and biases; fused kernels where torch has them.
    Experts' biases are [E, F] matrices, so a bias is known by its name, not only by its dimension.
    `split_groups` rewrites the parameter groups first (the DeepSpeed engine's MoE groups)."""
    t = config.train
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.dim() >= 2 and not n.endswith("bias")]
    no_decay = [p for n, p in trainable if p.dim() < 2 or n.endswith("bias")]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if split_groups is not None:
        groups = split_groups(groups)
    kwargs = dict(lr=t.lr, betas=tuple(t.betas), eps=t.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs), "fused"
    except (RuntimeError, ValueError) as e:  # fused needs floating-point params on a supported device
        print(f"moesys train: fused AdamW unavailable ({e}); using the foreach implementation", file=sys.stderr)
        return torch.optim.AdamW(groups, foreach=True, **kwargs), "foreach"


def clip_in_fused_step(optimizer: torch.optim.Optimizer, norm: torch.Tensor, max_norm: float) -> None:
    """Gradient clipping folded into fused AdamW's kernel: it divides every gradient by `grad_scale` and
    skips the whole update when `found_inf` is 1 (the hooks torch.amp's GradScaler uses). Same clip as
    clip_grad_norm_ (factor max_norm / (norm + 1e-6), at most 1) without its own pass over the gradients,
    and a non-finite step leaves weights and optimizer state untouched. `norm` is the global gradient
    norm, a device tensor: nothing here syncs."""
    optimizer.grad_scale = torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0)
    optimizer.found_inf = (~torch.isfinite(norm)).float()


def clip_gradients(optimizer, opt_impl: str, params, norm: torch.Tensor, max_norm: float) -> None:
    """Clip `params`' gradients to the global norm `norm`: inside the optimizer step when AdamW is fused,
    else by scaling them now (`clip_to_norm`, also sync-free)."""
    if opt_impl == "fused":
        clip_in_fused_step(optimizer, norm, max_norm)
    else:
        clip_to_norm(params, norm, max_norm)


def autocast_context(config: Config, device: torch.device):
    dtype = autocast_dtype(config, device)
    if dtype is not None:
        return functools.partial(torch.autocast, device.type, dtype=dtype)
    return contextlib.nullcontext


def apply_activation_checkpointing(model: MoETransformer) -> None:
    """Recompute each block's activations in the backward. The instance's forward is wrapped (not the
    module replaced) so parameter names, and therefore checkpoints, stay the same."""
    for block in model.blocks:
        inner = block.forward
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, inner, use_reentrant=False)


def prepare_run_dir(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None = fresh start); refuses to overwrite a run without --resume."""
    latest = ckpt.latest_checkpoint(run_dir / "ckpt")
    if latest is not None and not resume:
        raise ValueError(f"--run-dir {run_dir} already holds checkpoints (latest {latest.name}); pass --resume "
                         "to continue that run, or choose another --run-dir")
    return latest if resume else None


def choose_checkpoint(ckpt_root: Path) -> Path:
    """The newest checkpoint whose files match their manifest; each newer damaged one is named with
    what is wrong and renamed to `damaged-step_N`. ValueError when none is intact."""
    intact, damaged = ckpt_integrity.newest_intact(ckpt_root)
    for path, problem in damaged:
        moved = ckpt_integrity.set_aside(path)
        print(f"moesys train: checkpoint {path.name} is damaged: {problem}; renamed it to {moved.name}",
              file=sys.stderr)
    if intact is None:
        raise ValueError(f"--resume: no intact checkpoint in {ckpt_root} (the damaged ones are named above and "
                         "were renamed to damaged-step_N); start a fresh run in another --run-dir")
    if damaged:
        print(f"moesys train: resuming from {intact.name}, the newest intact checkpoint", file=sys.stderr)
    return intact


def evaluate(model, splits, config: Config, ctx: bootstrap.DistContext, autocast) -> float | None:
    """Mean validation cross-entropy over `data.val_batches` held-out micro-batches on every rank."""
    if splits.num_val == 0 or config.data.val_batches == 0:
        return None
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    with torch.no_grad():
        for input_ids, labels in val_batches(splits, config.data.batch_size, config.data.val_batches,
                                             ctx.rank, ctx.world_size):
            with autocast():
                out = model(input_ids.to(ctx.device), labels.to(ctx.device), return_logits=False)
            total += torch.stack([out.loss.double(), torch.ones((), dtype=torch.float64, device=ctx.device)])
    model.train()
    data_parallel.all_reduce_sum(total, ctx.group, what="validation-loss all-reduce", timeout=ctx.timeout)
    return float(total[0] / total[1]) if total[1] > 0 else None


def build_model(config: Config, ctx: bootstrap.DistContext, run_dir: Path | None = None,
                resume_from: Path | None = None):
    """(model on ctx.device after `parallelize`, training FLOPs per token, parallel handle, parameter
    counts before parallelize for the start-up block). With
    `model.init_from` the weights come from that checkpoint (each rank reads only its own experts;
    skipped when resuming, the checkpoint has them) and rank 0 keeps its config and tokenizer in
    RUN_DIR/hf_source for `moesys export`. With `model.hf_model` the non-expert weights are read before
    `parallelize` and each rank's experts after it (moesys.hf.hf_model_load), so no rank reads them all."""
    torch.manual_seed(config.train.seed)  # the same initial weights on every rank
    hf_loader = None
    if config.model.hf_model is not None:  # transformers' own class, experts through moe_mlp
        from moesys.hf.hf_model_load import HFModelLoader
        hf_loader = HFModelLoader(config)
        model = hf_loader.build(ctx.device)  # experts stay on the meta device until parallelize placed them
    else:
        with ctx.device:
            model = MoETransformer.from_config(config)
    flops_tok = flops_per_token(model, config)  # before parallelize: it counts every expert
    params = train_report.param_counts(model)
    # train.param_dtype: before parallelize (its expert copies), the init_from weights (a bf16 checkpoint
    # is copied as it is) and the optimizer (its state follows the parameters). hf_model's non-expert
    # weights were already read in this dtype; its experts are still on the meta device.
    cast_parameters(model, param_dtype(config), keep_fp32=() if hf_loader is None else hf_loader.keep_fp32)
    # Expert parallelism (parallel.ep > 1) keeps this rank's E/ep experts per MoE layer; ep=1 changes nothing.
    ep = parallelize(model, config)
    if hf_loader is not None:  # each rank reads only the experts it holds (also when resuming: no meta left)
        hf_loader.load_experts(model, ep)
    if config.model.init_from is not None:
        if ctx.is_main and run_dir is not None:
            save_source(config.model.init_from, run_dir)
        if resume_from is None:
            load_init_weights(model, config, ep)
    return model, flops_tok, ep, params


@dataclasses.dataclass
class _Run:
    """What the loop's parts share, built once by `_setup`."""
    config: Config
    ctx: bootstrap.DistContext
    run_dir: Path
    model: torch.nn.Module
    ep: PlacementHandle             # how experts are placed (EP, FSSDP, or all local)
    engine: DeepSpeedEngine | None  # with train.engine: deepspeed, else None
    optimizer: torch.optim.Optimizer
    opt_impl: str                   # "fused" or "foreach"
    splits: PackedSplits
    sampler: ShardedSampler         # this rank's micro-batches of each step; its position is checkpointed
    writer: MetricsWriter
    flops_tok: float
    params: dict[str, int]
    peak: float | None              # the device's peak FLOP/s, for MFU (None: unknown)
    moe_layers: list = dataclasses.field(default_factory=list)
    autocast: object = contextlib.nullcontext
    graphs: bool = False            # CUDA-graph replays (compile_mode reduce-overhead)

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def micro_batches(self) -> int:
        """Micro-batches summed into a step's statistics over all ranks: the divisor of their means."""
        return self.config.train.grad_accum * self.ctx.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.config.data.batch_size * self.config.data.seq_len * self.micro_batches


class _Due(NamedTuple):
    """What a step ends with besides the update."""
    last: bool
    log: bool
    validate: bool
    save: bool

    @classmethod
    def at(cls, step: int, config: Config) -> "_Due":
        last = step == config.train.steps
        log = step % config.log.every == 0 or last
        val_every = config.log.every if config.log.val_every is None else config.log.val_every
        every = config.checkpoint.every
        return cls(last=last, log=log, validate=bool(log and val_every and (step % val_every == 0 or last)),
                   save=bool((every and step % every == 0) or (last and config.checkpoint.save_final)))


def train(config: Config, run_dir: Path, resume_from: Path | None, ctx: bootstrap.DistContext, *,
          resume: bool = False, threads: str = "") -> int:
    """Set up, restore, then per step: learning rate, forward/backward with the statistics all-reduced,
    the update, the end-of-step hooks, and what the step ends with (reading its values, a log line, a
    checkpoint, a stop on SIGTERM); the final line. Returns 0 (errors raise)."""
    run = _setup(config, run_dir, resume_from, ctx)
    start_step = _restore(run, resume_from)
    _announce(run, resume, resume_from, threads)
    _prepare_step_path(run)
    last_saved = resume_from  # verified by its checksums (fresh runs start with no checkpoint)
    progress = train_report.progress_bar(config.train.steps, start_step) \
        if ctx.is_main and config.log.progress_bar else None
    pending = PendingStepValues(run.micro_batches, None if resume_from is None else (resume_from, start_step))
    window = MetricsWindow(len(run.moe_layers), config.moe.num_experts, run.device, run.micro_batches)
    run_start = window.start
    run.model.train()
    step = start_step
    with SigtermFlag() as sigterm, _closing(run, progress):
        for step in range(start_step + 1, config.train.steps + 1):
            lr = _set_lr(run.optimizer, step, config)
            stats = _forward_backward(run, sigterm)
            pending.push(step, stats, _optimizer_step(run))
            _end_step(run, stats)
            window.add(stats.load_LE, stats.dropped_L)
            due = _Due.at(step, config)
            stop = _read_values(pending, step, due, last_saved)
            _show_progress(progress, pending.latest, lr)
            if due.log:
                _log_step(run, step, lr, pending.latest, window, due, progress)
            if stop or due.save:
                last_saved = _save(run, step, "sigterm" if stop else ("final" if due.last else "every"))
                if progress is not None:
                    progress.write(f"checkpoint {last_saved}")
            if stop:
                if progress is not None:
                    progress.write(f"SIGTERM: saved step {step} to {last_saved}; exiting")
                break
    if ctx.is_main:
        latest = pending.latest
        print(train_report.final_line(steps_run=step - start_step, last_step=step,
                                      elapsed_s=time.perf_counter() - run_start,
                                      tokens=(step - start_step) * run.tokens_per_step,
                                      last_loss=latest.loss if latest is not None else None, checkpoint=last_saved),
              flush=True)
    return 0


def _setup(config: Config, run_dir: Path, resume_from: Path | None, ctx: bootstrap.DistContext) -> _Run:
    """The model (parallelized), the DeepSpeed engine when asked for, the optimizer, the data, the writer."""
    model, flops_tok, ep, params = build_model(config, ctx, run_dir, resume_from)
    torch.manual_seed(config.train.seed * 1000 + ctx.rank + 1)  # per-rank noise (router jitter)
    engine = None
    if config.train.engine == "deepspeed":  # backward, reduction, clipping and step inside DeepSpeed
        from moesys.integrations.deepspeed_engine import DeepSpeedEngine
        engine = DeepSpeedEngine(model, ep, config, ctx)
    optimizer, opt_impl = build_optimizer(model, config, None if engine is None else engine.split_groups)
    splits, sampler = build_data(config, ctx.rank, ctx.world_size)
    writer = MetricsWriter(run_dir, config.log.tensorboard, enabled=ctx.is_main)
    return _Run(config=config, ctx=ctx, run_dir=run_dir, model=model, ep=ep, engine=engine, optimizer=optimizer,
                opt_impl=opt_impl, splits=splits, sampler=sampler, writer=writer, flops_tok=flops_tok, params=params,
                peak=peak_flops(ctx.device, config.log.peak_tflops))


def _restore(run: _Run, resume_from: Path | None) -> int:
    """Weights, optimizer state, FSSDP placement and data position from `resume_from`; the step to
    continue after (0 for a fresh run). The DeepSpeed engine starts here, from the loaded weights."""
    start_step = 0
    if resume_from is not None:
        if hasattr(run.ep, "load_state_dict"):  # FSSDP: the saved owners and re-shard schedule (exact resume)
            run.ep.load_state_dict(ckpt.read_manifest(resume_from).get("fssdp", {}), run.optimizer)
        manifest = ckpt.load_checkpoint(resume_from, model=run.model,
                                        optimizer=run.optimizer if run.engine is None else None,
                                        rank=run.ctx.rank, device=run.device, ep=run.ep)
        start_step = manifest["step"]
        run.sampler.load_state_dict(manifest["data"])
        if run.ctx.is_main:
            run.writer.truncate_after(start_step)
    if run.engine is not None:  # it loads its optimizer state itself
        run.engine.start(run.optimizer, resume_from)
    return start_step


def _announce(run: _Run, resume: bool, resume_from: Path | None, threads: str) -> None:
    """The resolved config in the run directory, the metrics files opened, the start-up block (rank 0)."""
    if run.ctx.is_main:
        ckpt.write_text_atomic(run.run_dir / "config.yaml", dump_config(run.config))
    run.writer.open()
    if run.ctx.is_main:
        splits = run.splits
        print(train_report.startup_block(
            run.config, params=run.params, device=run.device, world_size=run.ctx.world_size,
            launcher=run.ctx.launcher, num_tokens=splits.tokens.numel(), num_train=splits.num_train,
            num_val=splits.num_val, run_dir=run.run_dir, threads=threads,
            start=train_report.resume_line(run.run_dir, resume, resume_from)), flush=True)


def _prepare_step_path(run: _Run) -> None:
    """Activation checkpointing, torch.compile, autocast; the MoE layers whose load the step reads."""
    t = run.config.train
    if t.activation_checkpointing:
        apply_activation_checkpointing(run.model)
    if t.compile:
        run.model.compile_parts(t.compile_mode, t.compile_scope)
    run.graphs = t.compile and t.compile_mode == "reduce-overhead"
    run.autocast = autocast_context(run.config, run.device)
    run.moe_layers = run.model.moe_layers()


@contextlib.contextmanager
def _closing(run: _Run, progress):
    """Closes the metrics writer, the engine and the progress bar however the loop ends."""
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(run.writer.close)
        if run.engine is not None:
            cleanup.callback(run.engine.close)
        if progress is not None:
            cleanup.callback(progress.close)
        yield


def _set_lr(optimizer: torch.optim.Optimizer, step: int, config: Config) -> float:
    lr = lr_at(step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _forward_backward(run: _Run, sigterm: SigtermFlag) -> StepStats:
    """The step's `grad_accum` micro-batches, forward and backward; returns their statistics summed over
    micro-batches and ranks (one all-reduce, no host sync), SIGTERM flag included: read after the
    micro-batches, so a signal that arrived during them is in this step. With DeepSpeed the last
    micro-batch's backward also reduces, clips and steps."""
    stats = StepStats(len(run.moe_layers), run.config.moe.num_experts, run.device)
    if run.graphs:  # CUDA-graph replays of the last step's outputs may be overwritten from here on
        torch.compiler.cudagraph_mark_step_begin()
    run.ep.begin_step()  # FSSDP: this step's materialisation plan (a no-op otherwise)
    forward = run.model if run.engine is None else run.engine.forward
    device, A = run.device, run.config.train.grad_accum
    for micro in run.sampler.next_step():
        input_ids, labels = run.splits.sequences(micro)
        if device.type == "cuda":  # from pageable memory the copy would wait for the device: a sync
            input_ids, labels = input_ids.pin_memory(), labels.pin_memory()
        input_ids = input_ids.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with run.autocast():
            out = forward(input_ids, labels, return_logits=False)
        if run.engine is None:
            ((out.loss + out.aux_loss) / A).backward()
        else:  # divided by A inside
            run.engine.backward(out.loss + out.aux_loss)
        stats.add_micro_batch(out)
    stats.set_sigterm(sigterm.raised)
    data_parallel.all_reduce_sum(stats.packed, run.ctx.group, what="step-statistics all-reduce",
                                 timeout=run.ctx.timeout)
    return stats


def _optimizer_step(run: _Run) -> torch.Tensor:
    """The update; returns the global gradient norm (a device tensor, not read here)."""
    if run.engine is not None:  # the step was taken in the last micro-batch's engine.backward
        return run.engine.grad_norm()
    return _reduce_clip_step(run.model, run.ep, run.optimizer, run.opt_impl, run.config, run.ctx)


def _end_step(run: _Run, stats: StepStats) -> None:
    """After the update: FSSDP observes the load and re-shards when due; the aux-loss-free router
    biases move by the load summed over micro-batches and ranks."""
    run.ep.end_step(run.optimizer)  # a no-op unless FSSDP
    for layer, layer_load_E in zip(run.moe_layers, stats.load_LE):
        layer.router.update_bias(layer_load_E)


def _read_values(pending: PendingStepValues, step: int, due: _Due, last_saved: Path | None) -> bool:
    """Read the step values that are due on the host; True when some rank saw SIGTERM (stop now).

    The previous step's values are ready by now (this step is already queued on the device); this
    step's are waited for only when logged or saved: a checkpoint must never hold weights that a
    non-finite step touched. Every rank reads at the same steps, so all see a SIGTERM at the same step."""
    pending.read_through(step - 1, last_saved)
    if due.log or due.save or pending.sigterm:
        pending.read_through(step, last_saved)
    return pending.sigterm


def _show_progress(progress, latest: StepValues | None, lr: float) -> None:
    if progress is None:
        return
    if latest is not None:  # possibly the previous step's loss; this step's own at a log step
        progress.set_postfix(loss=f"{latest.loss:.4f}", lr=f"{lr:.2e}")
    progress.update(1)  # after the postfix: a plain line is printed here and must carry the value just read


def _log_step(run: _Run, step: int, lr: float, values: StepValues, window: MetricsWindow, due: _Due,
              progress) -> None:
    """One metrics record (validation loss when due) to metrics.jsonl, TensorBoard and the progress
    output; the window starts again."""
    assert values.step == step, (values, step)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    tokens_per_s = window.tokens_per_s(run.tokens_per_step)
    peak = run.peak
    record = {"step": step, "loss": values.loss, "aux_loss": values.aux_loss, "lr": lr,
              "grad_norm": values.grad_norm,
              "tokens_per_s": tokens_per_s,
              "mfu": tokens_per_s * run.flops_tok / (peak * run.ctx.world_size) if peak else None,
              "tokens_seen": step * run.tokens_per_step}
    if due.validate:
        record["val_loss"] = evaluate(run.model, run.splits, run.config, run.ctx, run.autocast)
    record.update(window.load_stats())
    run.writer.write(record)
    if progress is not None:
        progress.write(train_report.log_line(record))
    window.reset()


def _save(run: _Run, step: int, reason: str) -> Path:
    """A checkpoint of every rank's state at `step` (collective), with the manifest resume reads."""
    config = run.config
    manifest = {"reason": reason, "data": run.sampler.state_dict(),
                "scheduler": {"kind": "warmup_cosine", "step": step, "lr": lr_at(max(step, 1), config)},
                "optimizer": {"kind": "AdamW", "impl": run.opt_impl, "betas": list(config.train.betas),
                              "weight_decay": config.train.weight_decay, "eps": config.train.eps},
                "tokens_seen": step * run.tokens_per_step, "num_experts": config.moe.num_experts,
                "config": config.model_dump(mode="json")}
    if hasattr(run.ep, "state_dict"):
        manifest["fssdp"] = run.ep.state_dict()
    if run.engine is not None:
        manifest["engine"] = {"kind": "deepspeed", "zero_stage": run.engine.ds_config["zero_optimization"]["stage"]}
    return ckpt.save_checkpoint(run.run_dir / "ckpt", step, model=run.model, optimizer=run.optimizer,
                                manifest=manifest, rank=run.ctx.rank, world_size=run.ctx.world_size,
                                device=run.device,
                                barrier=functools.partial(bootstrap.barrier, run.ctx, "checkpoint barrier"),
                                keep=config.checkpoint.keep, ep=run.ep,
                                states=None if run.engine is None else run.engine.checkpoint_states())


def _reduce_clip_step(model, ep, optimizer, opt_impl: str, config: Config, ctx: bootstrap.DistContext) -> torch.Tensor:
    """The torch engine's end of a step: the data-parallel and expert gradient reductions, clipping to
    train.grad_clip by the global norm, AdamW; returns the norm (a device tensor, not read here)."""
    if ep.shards_experts:  # expert gradients reduce over their replicas only; the norm spans all experts
        data_parallel.sync_gradients(ep.dense_parameters(), ctx.group, timeout=ctx.timeout)
        ep.reduce_expert_gradients()
        clip_params, grad_norm = ep.dense_parameters() + ep.expert_parameters(), ep.grad_norm()
    else:
        data_parallel.sync_gradients([p for p in model.parameters() if p.requires_grad], ctx.group,
                                     timeout=ctx.timeout)
        clip_params = [p for p in model.parameters() if p.grad is not None]
        grad_norm = total_norm([p.grad for p in clip_params])
    clip_gradients(optimizer, opt_impl, clip_params, grad_norm, config.train.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def run(args: argparse.Namespace) -> int:
    try:
        config = resolve_init_from(load_config(args.config, args.overrides))
        if config.model.hf_model is not None:  # the checkpoint decides the shape keys and the tokenizer
            from moesys.models.hf_source import resolve_config
            config = resolve_config(config)
        validate_source(config.data)
        if config.train.engine == "deepspeed":  # the extra and its JSON, before any process group exists
            from moesys.integrations.deepspeed_config import require_deepspeed, resolve_deepspeed_config
            resolve_deepspeed_config(config)
            require_deepspeed()
        run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
        resume_from = prepare_run_dir(run_dir, args.resume)
    except (ConfigError, ValueError) as e:
        print(f"moesys train: error: {one_line(e)}", file=sys.stderr)
        return 2
    ctx = bootstrap.init_distributed(config)
    lock, refused = None, None
    threads = train_report.configure_threads(config, ctx.device, ctx.world_size)
    if ctx.is_main:
        try:
            lock = RunDirLock(run_dir)
            note = lock.acquire()
            if note:
                print(f"moesys train: {note}", file=sys.stderr)
            if resume_from is not None:
                resume_from = choose_checkpoint(run_dir / "ckpt")
                check_resume(config, ckpt.read_manifest(resume_from), resume_from)
        except ValueError as e:  # RunDirBusy, no intact checkpoint, or one of another train.param_dtype
            refused = e
            if lock is not None:
                lock.release()
    # Rank 0's verdict for every rank (also the barrier after which the run directory exists):
    # the step to resume from, -1 for a fresh start, -2 for a refusal.
    mine = -3  # below every verdict: other ranks take rank 0's
    if ctx.is_main:
        mine = -2 if refused is not None else (-1 if resume_from is None else ckpt.read_manifest(resume_from)["step"])
    verdict = int(bootstrap.max_over_ranks(ctx, mine))
    if verdict == -2:
        if refused is not None:
            print(f"moesys train: error: {one_line(refused)}", file=sys.stderr)
        bootstrap.teardown(ctx)
        return 2
    resume_from = None if verdict == -1 else run_dir / "ckpt" / f"step_{verdict}"
    peer_failed, rc = False, 1
    try:
        rc = train(config, run_dir, resume_from, ctx, resume=args.resume, threads=threads)
        return rc
    except TrainingStopped as e:
        if ctx.is_main:
            print(f"moesys train: error: {one_line(e)}", file=sys.stderr)
        return 1
    except ValueError as e:
        # Found once the data is read (a token id beyond model.vocab_size, too few sequences for the
        # global batch): every rank reads the same data and fails alike, so the teardown is safe.
        if ctx.is_main:
            print(f"moesys train: error: {one_line(e)}", file=sys.stderr)
        rc = 2
        return 2
    except CollectiveError as e:
        # A peer is dead or stuck (the message names this rank and the operation): every rank reports,
        # naming the ranks whose heartbeat stopped, and none waits in the teardown barrier for them.
        peers = f"; {ctx.peers.report()}" if ctx.peers is not None else ""
        print(f"moesys train: error: {one_line(e)}{peers}", file=sys.stderr)
        peer_failed = True
        return 1
    finally:
        if not peer_failed:
            bootstrap.teardown(ctx)
        if lock is not None:  # a failed job that never logged nor saved leaves no run directory behind
            lock.release(remove_unused_dir=rc != 0)


def main(argv: list[str] | None = None) -> int:
    from moesys.cli import Parser, guarded

    # The same prog as `moesys train`, so every message of the job (argparse's included) reads
    # `moesys train: error: ...` whether it was started as `moesys train` or `torchrun -m moesys.train`.
    parser = Parser(prog="moesys train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return guarded("moesys train", lambda: run(args), sigterm=False)


if __name__ == "__main__":
    bootstrap.exit_skipping_shutdown(main())

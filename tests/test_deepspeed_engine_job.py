"""The training job under train.engine=deepspeed (ZeRO-2 / ZeRO-1 through the shipped JSON, 2 gloo ranks
under torchrun, and one process alone) against moesys's own torch engine on the same batches: losses and
gradient norms to fp32 rounding, final weights and AdamW state close, with clipping active; a resumed
DeepSpeed run continues bit for bit (fp32 with ep=2; bf16 alone, where the fp32 masters matter);
`moesys export` reads a DeepSpeed run's checkpoint."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed", reason="needs the optional extra moesys[deepspeed] (pip install deepspeed)")

from moesys import cli  # noqa: E402
from tests._train_helpers import REPO, TINY, env, metrics, sets, torchrun_cmd  # noqa: E402

# grad_clip far below the gradient norms (2.5-4.5 here): every step is clipped, so skipping the clip shows.
COMMON = ("train.steps=4", "log.every=1", "log.val_every=0", "data.batch_size=4", "train.grad_clip=0.05",
          "checkpoint.every=2", "checkpoint.keep=3", "parallel.timeout_s=120")
DEEPSPEED = ("train.engine=deepspeed",)  # configs/deepspeed_zero2_bf16.json: ZeRO-2, bf16 off on the CPU
ZERO1 = ("train.engine=deepspeed", "train.deepspeed_config=configs/deepspeed_zero1_bf16.json")
AUTOCAST = ("train.engine=deepspeed", "train.deepspeed_config=configs/deepspeed_zero2_autocast.json")


def _run(run_dir, *items, nproc=2, resume=False):
    if nproc == 2:
        cmd = torchrun_cmd(2, run_dir, *COMMON, *items)
    else:  # alone, with the argument the deepspeed launcher passes
        cmd = [sys.executable, "-m", "moesys.train", "--local_rank=0", "--config", TINY, "--run-dir", str(run_dir),
               *sets(*COMMON, *items)]
    cmd += ["--resume"] if resume else []
    proc = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return metrics(run_dir)


def _same_curve(a, b, what, rel=1e-5):
    """`rel`: the losses' tolerance (fp32 rounding); gradient norms get 10x it."""
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4], what
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=rel), (what, x["step"])
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=10 * rel), (what, x["step"])
        assert x["grad_norm"] > 20 * 0.05, "the test needs clipping active"


def _close_checkpoints(a, b, what, step=4):
    for name, tol in (("model", 1e-5), ("optimizer", 1e-5)):
        ta, tb = (load_file(str(d / "ckpt" / f"step_{step}" / f"{name}.safetensors")) for d in (a, b))
        assert sorted(ta) == sorted(tb), (what, name)
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=tol, atol=tol, msg=lambda m: f"{what}: {name} {k}\n{m}")


@pytest.mark.slow
def test_zero2_with_ep2_equals_the_torch_engine_resumes_exactly_and_exports(tmp_path):
    ds = _run(tmp_path / "ds", "parallel.ep=2", *DEEPSPEED)
    ref = _run(tmp_path / "torch", "parallel.ep=2")
    _same_curve(ds, ref, "deepspeed ep=2 vs torch ep=2")
    _close_checkpoints(tmp_path / "ds", tmp_path / "torch", "deepspeed ep=2 vs torch ep=2")

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ds", resumed)
    shutil.rmtree(resumed / "ckpt" / "step_4")
    again = _run(resumed, "parallel.ep=2", *DEEPSPEED, resume=True)
    timing = ("tokens_per_s", "mfu")
    assert [{k: v for k, v in r.items() if k not in timing} for r in again] == \
        [{k: v for k, v in r.items() if k not in timing} for r in ds]  # every other logged value, bit for bit
    for name in ("model", "optimizer"):
        a, b = (load_file(str(d / "ckpt" / "step_4" / f"{name}.safetensors")) for d in (tmp_path / "ds", resumed))
        assert all(torch.equal(a[k], b[k]) for k in a), name

    out = tmp_path / "hf"
    assert cli.main(["export", str(tmp_path / "ds"), str(out)]) == 0
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))


@pytest.mark.slow
def test_zero2_data_parallel_and_zero1_alone_equal_the_torch_engine(tmp_path):
    """ep=1 on 2 ranks (experts in DeepSpeed's MoE group over all ranks), and one process without a
    launcher (a one-rank group; --local_rank accepted) with grad_accum=2: the same global batch."""
    ref = _run(tmp_path / "torch", "parallel.ep=1")
    _same_curve(_run(tmp_path / "ds", "parallel.ep=1", *DEEPSPEED), ref, "deepspeed dp=2 vs torch dp=2")
    _close_checkpoints(tmp_path / "ds", tmp_path / "torch", "deepspeed dp=2 vs torch dp=2")
    alone = _run(tmp_path / "alone", "train.grad_accum=2", *ZERO1, nproc=1)
    _same_curve(alone, ref, "deepspeed ZeRO-1 in one process (grad_accum=2) vs torch dp=2")


@pytest.mark.slow
def test_engine_backward_prologue_runs_and_wall_clock_breakdown_works(tmp_path):
    """DeepSpeed hooks its backward prologue (ZeRO's backward_prologue, the accumulation boundary, the
    timers) onto the tensors of the forward's output: with `wall_clock_breakdown` the timers it starts
    there are stopped after backward, which failed ("timer is not started") while the dataclass output hid
    the loss from DeepSpeed. ZeRO-2 alone, grad_accum=2, against the torch engine on the same batches."""
    import json

    config = json.loads((REPO / "configs" / "deepspeed_zero2_bf16.json").read_text())
    config.update(wall_clock_breakdown=True, steps_per_print=1)
    (tmp_path / "ds.json").write_text(json.dumps(config))
    ref = _run(tmp_path / "torch", "train.grad_accum=2", nproc=1)
    got = _run(tmp_path / "ds", "train.grad_accum=2", *DEEPSPEED, f"train.deepspeed_config={tmp_path / 'ds.json'}",
               nproc=1)
    _same_curve(got, ref, "deepspeed ZeRO-2 with wall_clock_breakdown (grad_accum=2) vs torch")


@pytest.mark.slow
def test_bf16_zero2_alone_saves_fp32_masters_and_resumes_exactly(tmp_path):
    """bf16 (DeepSpeed casts the module; ZeRO keeps fp32 masters): the checkpoint holds the masters and
    fp32 buffers (the aux-loss-free router bias), and a resumed run is bit for bit the uninterrupted one."""
    items = ("train.dtype=bfloat16", "moe.router.aux_free_bias=true", *DEEPSPEED)
    full = _run(tmp_path / "full", *items, nproc=1)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed)
    shutil.rmtree(resumed / "ckpt" / "step_4")
    again = _run(resumed, *items, nproc=1, resume=True)
    timing = ("tokens_per_s", "mfu")
    assert [{k: v for k, v in r.items() if k not in timing} for r in again] == \
        [{k: v for k, v in r.items() if k not in timing} for r in full]
    for name in ("model", "optimizer"):
        a, b = (load_file(str(d / "ckpt" / "step_4" / f"{name}.safetensors")) for d in (tmp_path / "full", resumed))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    model = load_file(str(tmp_path / "full" / "ckpt" / "step_4" / "model.safetensors"))
    assert {t.dtype for t in model.values()} == {torch.float32}
    weights = [t for k, t in model.items() if k.endswith("weight")]
    assert any((t != t.bfloat16().float()).any() for t in weights), "the bf16 weights were saved, not the masters"
    bias = model["blocks.0.ffn.router.expert_bias"]
    assert bias.abs().max() > 0 and (bias != bias.bfloat16().float()).any(), "the router bias went through bf16"


@pytest.mark.slow
def test_torch_autocast_zero2_equals_the_torch_engine_in_bf16(tmp_path):
    """configs/deepspeed_zero2_autocast.json: fp32 parameters with the forward under bf16 autocast, the torch
    engine's own precision (bf16 mode casts the parameters instead): the same losses and gradient norms as
    the torch engine with train.dtype=bfloat16, fp32 weights and AdamW state close after 4 clipped steps."""
    items = ("train.dtype=bfloat16",)
    ref = _run(tmp_path / "torch", *items, nproc=1)
    got = _run(tmp_path / "ds", *items, *AUTOCAST, nproc=1)
    # bf16 rounding: weights that differ in the last fp32 bit after a step may round to another bf16 value
    _same_curve(got, ref, "deepspeed ZeRO-2 torch_autocast vs torch, bf16", rel=1e-4)
    # AdamW's normalised step can turn such a difference in a near-zero gradient into one of up to 2 x lr
    # in a single weight, so the weights and moments are compared as whole tensors (relative L2; 4 steps at
    # lr 3e-3 move a 64 x 64 weight by up to ~0.8 in norm, differences here are ~1e-3; the moments of an
    # expert that saw few tokens are gradients of ~1e-7, where bf16's rounding differs by ~2%)
    for name, tol in (("model", 5e-3), ("optimizer", 5e-2)):
        ta, tb = (load_file(str(d / "ckpt" / "step_4" / f"{name}.safetensors")) for d in (tmp_path / "ds",
                                                                                           tmp_path / "torch"))
        assert sorted(ta) == sorted(tb) and all(ta[k].dtype == torch.float32 for k in ta), name
        for k in ta:
            assert (ta[k] - tb[k]).norm() <= tol * tb[k].norm() + 1e-9, (name, k)
    bf16 = _run(tmp_path / "bf16", *items, *DEEPSPEED, nproc=1)  # bf16 parameters: another precision
    with pytest.raises(AssertionError):
        _same_curve(bf16, ref, "the tolerance tells bf16 parameters apart", rel=1e-4)


def test_clip_in_the_fused_step_skips_a_non_finite_norm():
    """With fused AdamW the engine hands DeepSpeed gradient_clipping 0 and clips inside AdamW's kernel from
    its own norm: the torch engine's factor; a non-finite norm, or ZeRO's -1 (its mark of one), skips the
    update (weights untouched), None (no norm yet, or no clipping) leaves the step unclipped."""
    from moesys.integrations.deepspeed_engine import clip_in_fused_step_checked

    def step(norm):
        w = torch.nn.Parameter(torch.ones(4))
        opt = torch.optim.AdamW([w], lr=0.1, fused=True, weight_decay=0.0)
        w.grad = torch.full((4,), 3.0)
        clip_in_fused_step_checked(opt, norm, max_norm=2.0)
        opt.step()
        return w.detach(), opt

    w, opt = step(torch.tensor(6.0))
    assert float(opt.grad_scale) == pytest.approx(3.0) and float(opt.found_inf) == 0.0
    assert (w < 1).all()
    for invalid in (torch.tensor(-1.0), torch.tensor(float("nan")), float("inf")):
        w, opt = step(invalid)
        assert float(opt.found_inf) == 1.0 and torch.equal(w, torch.ones(4)), invalid
    w, opt = step(None)
    assert opt.grad_scale is None and opt.found_inf is None and (w < 1).all()


def test_deepspeeds_bf16_optimizer_keeps_its_own_norm_and_clip():
    """ZeRO-1 with bf16 parameters and fp32 gradient accumulation is DeepSpeed's BF16_Optimizer, which has no
    gradient partitions for moesys to read and refuses compute_grad_norm false: only there (and with foreach
    AdamW) DeepSpeed keeps computing the norm and clipping."""
    from moesys.integrations.deepspeed_engine import _bf16_optimizer

    def ds(stage, bf16, accum=None):
        return {"bf16": {"enabled": bf16}, "zero_optimization": {"stage": stage},
                **({"data_types": {"grad_accum_dtype": accum}} if accum else {})}

    assert _bf16_optimizer(ds(1, True, "fp32")) and _bf16_optimizer(ds(1, True, "float32"))
    assert not _bf16_optimizer(ds(2, True, "fp32"))  # ZeRO-2: DeepSpeedZeroOptimizer's compact fp32 buffer
    assert not _bf16_optimizer(ds(1, True)) and not _bf16_optimizer(ds(1, True, "bf16"))
    assert not _bf16_optimizer(ds(1, False, "fp32"))


@pytest.mark.slow
def test_bf16_zero2_with_fp32_gradient_accumulation_takes_the_norm_from_the_flat_buffer(tmp_path):
    """bf16 parameters with `data_types.grad_accum_dtype: fp32`: ZeRO-2 keeps each group's gradients in one flat
    fp32 buffer, which moesys's norm reads (`flat_partition`). One micro-batch per step: the gradients are
    the bf16 ones either way, so the losses and clipped norms equal the bf16-accumulation run's."""
    import json

    config = json.loads((REPO / "configs" / "deepspeed_zero2_bf16.json").read_text())
    config["data_types"] = {"grad_accum_dtype": "fp32"}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    items = ("train.dtype=bfloat16", *DEEPSPEED)
    ref = _run(tmp_path / "bf16", *items, nproc=1)
    got = _run(tmp_path / "fp32acc", *items, f"train.deepspeed_config={tmp_path / 'ds.json'}", nproc=1)
    _same_curve(got, ref, "bf16 ZeRO-2, fp32 vs bf16 gradient accumulation", rel=1e-4)


_SHARED_MASTERS = r'''
import json, os, sys
import torch, torch.distributed as dist, deepspeed
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
from moesys.integrations.deepspeed_engine import share_masters_with_parameters

os.environ.setdefault("LOCAL_RANK", "0")
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=0, world_size=1)
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
out = {}
for share in (False, True):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9})
    zero = engine.optimizer
    shared = share_masters_with_parameters(zero) if share else 0
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        loss = engine(x).square().mean()
        engine.backward(loss)
        engine.step()
    params = list(model.parameters())
    masters = [safe_get_full_fp32_param(p) for p in params]
    r = dict(shared=shared, weights=[p.detach().flatten().tolist() for p in params],
             masters_are_weights=all(torch.equal(m, p.detach()) for m, p in zip(masters, params)),
             same_storage=[m.data_ptr() == zero.parallel_partitioned_bit16_groups[i][0].data_ptr()
                           for i, m in enumerate(zero.single_partition_of_fp32_groups)])
    # a checkpoint's masters scattered back land in the weights the forward reads
    safe_set_full_fp32_param(params[0], torch.zeros_like(params[0]))
    r["set_reaches_weights"] = bool(params[0].detach().eq(0).all())
    out[str(share)] = r
print(json.dumps(out))
'''


@pytest.mark.slow
def test_fp32_masters_share_the_parameters_storage_and_train_the_same():
    """fp32 parameters: ZeRO's master partition becomes the parameters' own (no clone, no copy back after each
    step); three ZeRO-2 steps give the same weights bit for bit as DeepSpeed's own clone, and the checkpoint's
    per-parameter views of the masters (safe_get/set_full_fp32_param) read and write the weights."""
    import json

    from moesys.parallel.bootstrap import _free_port

    proc = subprocess.run([sys.executable, "-c", _SHARED_MASTERS, str(_free_port())], env=env(), cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    clone, shared = out["False"], out["True"]
    assert clone["shared"] == 0 and clone["same_storage"] == [False]
    assert shared["shared"] == 1 and shared["same_storage"] == [True]
    assert shared["weights"] == clone["weights"]
    assert shared["masters_are_weights"] and shared["set_reaches_weights"]
    assert clone["masters_are_weights"] and not clone["set_reaches_weights"]  # DeepSpeed copies back at its step


_FLAT_PARTITIONS = r'''
import json, os, sys
import torch, torch.distributed as dist, deepspeed
from moesys.integrations.deepspeed_engine import adopt_flat_partitions, flat_gradient_partitions

os.environ.setdefault("LOCAL_RANK", "0")
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=0, world_size=1)
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
out = {}
for stage in (1, 2):
    for accum in (1, 2):
        for flat in (False, True):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
            decay = [p for p in model.parameters() if p.dim() == 2]
            rest = [p for p in model.parameters() if p.dim() != 2]
            opt = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=0.1)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
                "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": accum,
                "zero_optimization": {"stage": stage, "contiguous_gradients": True,
                                      "reduce_bucket_size": 100},  # several buckets a backward
                "steps_per_print": 10**9})
            zero = engine.optimizer
            groups = flat_gradient_partitions(zero) if flat else []
            adopted, flat_norms = [], []
            g = torch.Generator().manual_seed(1)
            for _ in range(3 * accum):
                loss = engine(torch.randn(2, 8, generator=g)).square().mean()
                engine.backward(loss)
                if engine.is_gradient_accumulation_boundary():
                    adopted.append(adopt_flat_partitions(zero, groups) if flat else 0)
                    # what the step hands AdamW: the adopted buffer, or DeepSpeed's list flattened (padding
                    # included: it enters the gradient norm moesys takes from the partitions)
                    flat_norms.append([float(zero.averaged_gradients[i].flat_partition.norm()) if flat else
                                       float(torch.cat([t.flatten() for t in zero.averaged_gradients[i]]).norm())
                                       for i in range(len(zero.averaged_gradients))])
                engine.step()
            out[f"{stage}-{accum}-{flat}"] = dict(
                groups=groups, adopted=adopted, flat_norms=flat_norms,
                weights=[p.detach().flatten().tolist() for p in model.parameters()])
print(json.dumps(out))
'''


@pytest.mark.slow
def test_gradients_land_in_partition_order_and_train_the_same():
    """ZeRO-1 and -2 at one rank, one and two micro-batches a step, two parameter groups, small reduction
    buckets: with `flat_gradient_partitions` every group's reduced gradients are copied into their places in
    a partition-shaped buffer, every step adopts it unflattened, and three steps give DeepSpeed's own
    weights bit for bit."""
    import json

    from moesys.parallel.bootstrap import _free_port

    proc = subprocess.run([sys.executable, "-c", _FLAT_PARTITIONS, str(_free_port())], env=env(), cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for stage in (1, 2):
        for accum in (1, 2):
            own, flat = out[f"{stage}-{accum}-False"], out[f"{stage}-{accum}-True"]
            what = f"ZeRO-{stage}, {accum} micro-batches"
            assert flat["groups"] == [0, 1], what
            assert flat["adopted"] == [2, 2, 2], what
            assert all(n > 0 for norms in flat["flat_norms"] for n in norms), what
            for got, ref in zip(flat["flat_norms"], own["flat_norms"], strict=True):
                assert got == pytest.approx(ref, rel=1e-6), what
            assert flat["weights"] == own["weights"], what

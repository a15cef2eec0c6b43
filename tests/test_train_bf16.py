"""train.param_dtype=bfloat16 (pure bf16) against its contract: bf16 parameters and AdamW state with fp32
buffers, a step equal to AdamW's formula computed by hand on the same gradients, an fp32 gradient norm, a
falling loss, bit-exact resume, refusals before any work, EP=2 and FSSDP on gloo against ep=1, init_from
and hf_model weights read straight into bf16, export in bf16."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from moesys.config import load_config
from tests._train_helpers import TINY, metrics, train_inproc

BF16 = "train.param_dtype=bfloat16"
SMALL = ("data.max_tokens=50000", "data.batch_size=4", "log.every=1", "log.val_every=0")


def _config(*items):
    return load_config(TINY, ["log.progress_bar=false", "log.tensorboard=false", *SMALL, *items])


def _build(*items):
    from moesys.parallel.bootstrap import DistContext
    from moesys.train import build_model
    model, _, ep, _ = build_model(_config(*items), DistContext())
    return model, ep


def _files(step_dir: Path):
    return load_file(str(step_dir / "model.safetensors")), load_file(str(step_dir / "optimizer.safetensors"))


def test_parameters_are_bf16_and_buffers_stay_fp32():
    """Every parameter bf16; the router's aux-free bias and load counts and scaled RoPE's inv_freq stay fp32
    (module docstring of moesys.train_precision), and a 1e-3 bias step at a bias of 0.75 is not lost."""
    model, _ = _build(BF16, "moe.router.aux_free_bias=true", "model.rope_scaling.rope_type=linear",
                      "model.rope_scaling.factor=2.0")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    buffers = dict(model.named_buffers())
    assert {n.rpartition(".")[2] for n in buffers} == {"expert_bias", "load_since_update", "inv_freq"}
    assert {b.dtype for b in buffers.values()} == {torch.float32}
    router = model.moe_layers()[0].router
    router.expert_bias.fill_(0.75)
    router.update_bias(torch.tensor([4.0, 0.0, 0.0, 0.0]))
    assert router.expert_bias[0] < 0.75 and router.expert_bias[1] > 0.75
    fp32, _ = _build()
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    # the bf16 model starts from the fp32 one's initial weights, rounded
    for (name, a), b in zip(fp32.named_parameters(), model.parameters()):
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_dtype_auto_means_bf16_autocast_with_bf16_parameters_on_the_cpu():
    from moesys.train_precision import autocast_dtype
    cpu = torch.device("cpu")
    assert autocast_dtype(_config(BF16), cpu) is torch.bfloat16
    assert autocast_dtype(_config(BF16, "train.dtype=bfloat16"), cpu) is torch.bfloat16
    assert autocast_dtype(_config(), cpu) is None
    assert autocast_dtype(_config(), torch.device("cuda")) is torch.bfloat16


def test_total_norm_of_bf16_gradients_is_fp32_accurate():
    """get_total_norm would give bf16 gradients' norm in bf16; total_norm's is the fp64 norm to fp32 rounding,
    and for fp32 gradients it is get_total_norm's, bit for bit."""
    from moesys.parallel.handle import total_norm
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(300, 7, generator=g).bfloat16(), torch.randn(33, generator=g).bfloat16()]
    exact = math.sqrt(sum(float(t.double().square().sum()) for t in grads))
    got = total_norm(grads)
    assert got.dtype == torch.float32 and float(got) == pytest.approx(exact, rel=1e-6)
    assert float(torch.nn.utils.get_total_norm(grads)) != pytest.approx(exact, rel=1e-4)  # what it replaces
    fp32 = [t.float() for t in grads]
    assert torch.equal(total_norm(fp32), torch.nn.utils.get_total_norm(fp32))


def _adamw_by_hand(p, g, m, v, step, lr, b1, b2, eps, wd, scale):
    """torch's AdamW (decoupled decay, bias correction) in fp64 from the bf16 tensors before the step, the
    gradients divided by `scale` (the clip): the new (parameter, exp_avg, exp_avg_sq), unrounded."""
    p, g, m, v = (t.double() for t in (p, g, m, v))
    g = g / scale
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = (v / (1 - b2 ** step)).sqrt() + eps
    return p * (1 - lr * wd) - lr * (m / (1 - b1 ** step)) / denom, m, v


def _rounded_once(got, exact, *operands):
    """`got` (bf16) is `exact` rounded to bf16 (within one bf16 spacing: rtol 2^-7), give or take the fp32
    rounding of the kernel's arithmetic, which shows where a result cancels to near zero (atol)."""
    assert got.dtype == torch.bfloat16
    atol = 2 ** -20 * sum(float(o.double().abs().max()) for o in operands)
    torch.testing.assert_close(got.double(), exact, rtol=2 ** -7, atol=atol)


def test_two_trainer_steps_equal_adamw_by_hand_with_bf16_state():
    """The trainer's own build, optimizer and reduce/clip/step on one micro-batch: parameters, exp_avg and
    exp_avg_sq are bf16 and, after each of two steps, equal AdamW by hand on the step's gradients rounded to
    bf16, the clip (active: grad_clip 0.05) and a weight decay large enough to show (2.0) included."""
    from moesys.parallel.bootstrap import DistContext
    from moesys.train import _reduce_clip_step, build_model, build_optimizer
    config = _config(BF16, "train.grad_clip=0.05", "train.weight_decay=2.0")
    ctx = DistContext()
    model, _, ep, _ = build_model(config, ctx)
    optimizer, _ = build_optimizer(model, config)
    t, lr = config.train, 0.01
    decay = {id(p) for p in optimizer.param_groups[0]["params"]}
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    for step in (1, 2):
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids[:, :-1], ids[:, 1:], return_logits=False)
        (out.loss + out.aux_loss).backward()
        params = [p for p in model.parameters() if p.grad is not None]
        zeros = torch.zeros_like
        before = [(p.detach().clone(), p.grad.clone(), optimizer.state[p]["exp_avg"].clone() if step > 1 else zeros(p),
                   optimizer.state[p]["exp_avg_sq"].clone() if step > 1 else zeros(p)) for p in params]
        norm = math.sqrt(sum(float(g.double().square().sum()) for _, g, _, _ in before))
        scale = max(1.0, (norm + 1e-6) / t.grad_clip)
        assert scale > 2  # the clip is active
        got_norm = _reduce_clip_step(model, ep, optimizer, "fused", config, ctx)
        assert float(got_norm) == pytest.approx(norm, rel=1e-5)
        for p, (p0, g, m0, v0) in zip(params, before):
            wd = t.weight_decay if id(p) in decay else 0.0
            p1, m1, v1 = _adamw_by_hand(p0, g, m0, v0, step, lr, *t.betas, t.eps, wd, scale)
            state = optimizer.state[p]
            _rounded_once(p.detach(), p1, p0, torch.tensor(lr))
            _rounded_once(state["exp_avg"], m1, m0, g / scale)
            _rounded_once(state["exp_avg_sq"], v1, v0, g / scale * g / scale)


def test_bf16_run_trains_and_saves_bf16_weights_and_optimizer_state(tmp_path):
    assert train_inproc(tmp_path, BF16, "train.steps=8", *SMALL, "moe.router.aux_free_bias=true") == 0
    m = metrics(tmp_path)
    assert m[-1]["loss"] < m[0]["loss"] - 0.5, [r["loss"] for r in m]
    assert all(math.isfinite(r["grad_norm"]) for r in m)
    step = tmp_path / "ckpt" / "step_8"
    model, optim = _files(step)
    assert {k for k, v in model.items() if v.dtype != torch.bfloat16} == \
        {"blocks.0.ffn.router.expert_bias", "blocks.1.ffn.router.expert_bias"}  # fp32 buffers
    assert {v.dtype for k, v in optim.items() if not k.startswith("step/")} == {torch.bfloat16}
    assert json.loads((step / "manifest.json").read_text())["config"]["train"]["param_dtype"] == "bfloat16"


def test_bf16_resume_is_bit_exact_with_grad_accum(tmp_path):
    common = (BF16, "train.steps=6", *SMALL, "checkpoint.every=3", "checkpoint.keep=3", "train.grad_accum=2",
              "moe.router.aux_free_bias=true", "moe.router.jitter=0.1")
    assert train_inproc(tmp_path / "full", *common) == 0
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "ckpt" / "step_6")
    assert train_inproc(tmp_path / "cut", *common, resume=True) == 0
    full, cut = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    values = [(r["step"], r["loss"], r["grad_norm"]) for r in full]
    assert values == [(r["step"], r["loss"], r["grad_norm"]) for r in cut]
    for a, b in zip(_files(tmp_path / "full" / "ckpt" / "step_6"), _files(tmp_path / "cut" / "ckpt" / "step_6")):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("items, words", [
    ((BF16, "train.dtype=float32"), ("train.param_dtype=bfloat16", "train.dtype=float32", "auto or bfloat16")),
    ((BF16, "train.engine=deepspeed"), ("train.param_dtype=bfloat16", "train.engine=deepspeed", "bf16 section")),
])
def test_contradictions_are_refused_before_any_work(tmp_path, capsys, items, words):
    assert train_inproc(tmp_path / "run", *items) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not dist.is_initialized() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("saved, resumed", [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_resume_with_another_param_dtype_is_refused_before_the_model_is_built(tmp_path, capsys, monkeypatch,
                                                                                 saved, resumed):
    import moesys.train
    assert train_inproc(tmp_path, f"train.param_dtype={saved}", "train.steps=1", *SMALL) == 0
    capsys.readouterr()

    def no_build(*args, **kwargs):
        raise AssertionError("build_model was called")
    monkeypatch.setattr(moesys.train, "build_model", no_build)
    assert train_inproc(tmp_path, f"train.param_dtype={resumed}", "train.steps=2", *SMALL, resume=True) == 2
    err = capsys.readouterr().err
    assert f"trained with train.param_dtype={saved}" in err and f"sets train.param_dtype={resumed}" in err, err
    assert f"resume with train.param_dtype={saved}" in err


def test_init_from_reads_a_bf16_checkpoint_into_bf16_parameters_and_exports_it(tmp_path, monkeypatch):
    """The checkpoint's tensors go into parameters that are already bf16 (load_init_weights sees no fp32
    parameter), equal the file bit for bit, and export writes them back as bf16, bit for bit."""
    import moesys.train
    from moesys.export import export
    from tests._init_from_helpers import FINETUNE, save_hf_model
    src = save_hf_model("qwen3_moe", tmp_path / "src", dtype=torch.bfloat16)
    seen = []
    real = moesys.train.load_init_weights

    def spy(model, config, ep=None, **kwargs):
        seen.append({p.dtype for p in model.parameters()})
        return real(model, config, ep, **kwargs)
    monkeypatch.setattr(moesys.train, "load_init_weights", spy)
    config = load_config(FINETUNE, [f"model.init_from={src}", BF16, "data.max_tokens=20000", "data.seq_len=16"])
    from moesys.hf.resolve import resolve_init_from
    from moesys.parallel.bootstrap import DistContext
    (tmp_path / "run").mkdir()
    model, *_ = moesys.train.build_model(resolve_init_from(config), DistContext(), run_dir=tmp_path / "run")
    assert seen == [{torch.bfloat16}]
    step = tmp_path / "run" / "ckpt" / "step_0"
    step.mkdir(parents=True)
    from moesys import checkpoint as ckpt
    from safetensors.torch import save_file
    save_file(ckpt._contiguous(ckpt.split_experts(model.state_dict())), str(step / "model.safetensors"))
    (step / "manifest.json").write_text(json.dumps({"format_version": ckpt.FORMAT_VERSION, "step": 0,
                                                    "config": resolve_init_from(config).model_dump(mode="json")}))
    out = export(tmp_path / "run", tmp_path / "out")
    exported, original = load_file(str(out / "model.safetensors")), load_file(str(src / "model.safetensors"))
    assert exported.keys() == original.keys()
    assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], original[k]) for k in original)


def test_export_of_a_bf16_run_writes_bf16(tmp_path):
    from transformers import AutoModelForCausalLM
    from moesys.export import export
    assert train_inproc(tmp_path / "run", BF16, "train.steps=2", *SMALL) == 0
    out = export(tmp_path / "run", tmp_path / "out")
    tensors = load_file(str(out / "model.safetensors"))
    assert {v.dtype for v in tensors.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    trained, _ = _files(tmp_path / "run" / "ckpt" / "step_2")
    assert torch.equal(tensors["model.embed_tokens.weight"], trained["embed.weight"])
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_hf_model_parameters_have_from_pretrained_bf16_dtypes_and_values(tmp_path):
    """model.hf_model with bf16 parameters: each parameter has the dtype and value transformers'
    from_pretrained(dtype=bfloat16) gives it (DeepSeek-V3 keeps its router weight fp32), buffers too."""
    from transformers import AutoModelForCausalLM
    from moesys.models.hf_source import load_hf_causal_lm, resolve_config
    from tests._hf_model_helpers import deepseek_v3
    src = deepseek_v3(tmp_path / "src")
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model = load_hf_causal_lm(resolve_config(load_config(None, [f"model.hf_model={src}", "moe.backend=loop", BF16])))
    ours = dict(model.named_parameters())
    assert ours["hf.model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert ours["hf.model.layers.1.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    for name, p in ref.named_parameters():
        if "experts" in name:  # converted to moe_mlp's layout: dtype only
            continue
        assert ours[f"hf.{name}"].dtype == p.dtype and torch.equal(ours[f"hf.{name}"], p), name
    buffers = dict(model.named_buffers())
    for name, b in ref.named_buffers():
        assert buffers[f"hf.{name}"].dtype == b.dtype, name


def _ep_worker(rank, world, run_root):
    from moesys.parallel.bootstrap import DistContext
    from moesys.train import train
    ctx = DistContext(rank=rank, world_size=world)
    for name, items in (("ep1", ()), ("ep2", ("parallel.ep=2",)), ("fssdp", ("parallel.expert_sharding=fssdp",))):
        config = _config(BF16, "train.steps=3", "data.max_tokens=20000", "moe.shared_ffn_size=32", *items)
        run_dir = Path(run_root) / name
        run_dir.mkdir(exist_ok=True)  # (moesys.train.run makes it)
        assert train(config, run_dir, None, ctx) == 0


@pytest.mark.slow
def test_ep2_and_fssdp_train_in_bf16_like_ep1(tmp_path):
    """2 gloo ranks: bf16 gradients all-reduced (dense), reduced over replicas (EP) or sent to their owners
    (FSSDP); the losses and gradient norms equal plain data parallelism's within bf16 rounding, and the
    checkpoints hold bf16 experts by global id."""
    from moesys.parallel.testing import spawn
    spawn(_ep_worker, 2, str(tmp_path))
    ep1 = metrics(tmp_path / "ep1")
    for name in ("ep2", "fssdp"):
        other = metrics(tmp_path / name)
        assert [r["step"] for r in other] == [1, 2, 3]
        for a, b in zip(other, ep1):  # seen: 5e-6 and 3e-4 (another summation order, in bf16)
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (name, a["step"])
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-3), (name, a["step"])
        model, optim = _files(tmp_path / name / "ckpt" / "step_3")
        assert model["blocks.1.ffn.experts.3.gate_up_proj"].dtype == torch.bfloat16
        assert optim["exp_avg/blocks.1.ffn.experts.3.gate_up_proj"].dtype == torch.bfloat16
        assert {v.dtype for v in model.values()} == {torch.bfloat16}

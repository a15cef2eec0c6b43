"""Checks the trainer end to end on the tiny config: the loss falls on the built-in corpus, 2 gloo ranks
equal 1 rank with the same global batch, NaN stops name the first bad step (also when read a step late)
and save nothing after it, SIGTERM checkpoints, bad configs fail early."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from moesys.models.transformer import MoETransformer
from tests._train_helpers import REPO, TINY, env, metrics, run_torchrun, sets, train_inproc


@pytest.mark.slow
def test_loss_falls_on_the_default_corpus(tmp_path):
    assert train_inproc(tmp_path, "train.steps=40", "log.every=1", "log.val_every=40") == 0
    m = metrics(tmp_path)
    first, last = m[0]["loss"], sum(r["loss"] for r in m[-5:]) / 5
    assert first > 5.0 and last < first - 1.5, (first, last)
    assert m[-1]["val_loss"] < first - 1.0
    for key in ("step", "loss", "tokens_per_s", "mfu", "grad_norm", "expert_load_max_mean", "expert_load_cv",
                "dropped_fraction"):
        assert key in m[-1]
    assert len(m[-1]["expert_load_cv"]) == 2 and (tmp_path / "ckpt" / "step_40" / "manifest.json").is_file()


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_the_same_global_batch(tmp_path):
    common = ("train.steps=6", "log.every=1", "log.val_every=0", "data.batch_size=4",
              "moe.router.aux_free_bias=true", "moe.router.bias_update_rate=0.01", "checkpoint.save_final=false")
    proc = run_torchrun(2, tmp_path / "dp2", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The 1-rank side also recomputes activations (checkpointing must not change the math).
    assert train_inproc(tmp_path / "dp1", *common, "train.grad_accum=2", "train.activation_checkpointing=true") == 0
    two, one = metrics(tmp_path / "dp2"), metrics(tmp_path / "dp1")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 7))
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["expert_load_fraction"] == b["expert_load_fraction"]


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_the_last_checkpoint(tmp_path, capsys):
    rc = train_inproc(tmp_path, "train.lr=1.0e+30", "train.warmup_steps=0", "checkpoint.every=1",
                      "checkpoint.keep=5")
    assert rc == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "at step 2" in err and str(tmp_path / "ckpt" / "step_1") in err
    assert not (tmp_path / "ckpt" / "step_2").exists()


def _at_training_forward(monkeypatch, step: int, action) -> None:
    """Call action(out) on the output of the step-th training forward (one micro-batch per step)."""
    forward, calls = MoETransformer.forward, []

    def patched(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls.append(None)
            if len(calls) == step:
                action(self, out)
        return out
    monkeypatch.setattr(MoETransformer, "forward", patched)


def _nan_loss(model, out):
    out.loss = out.loss * float("nan")


def _nan_gradient(model, out):
    w = model.lm_head.weight  # sqrt at 0: the value adds 0, the gradient is inf * 0 = nan
    out.loss = out.loss + (w - w.detach()).square().sum().sqrt()


@pytest.mark.parametrize("bad_step", [3, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("what, poison", [("loss", _nan_loss), ("gradient norm", _nan_gradient)])
def test_non_finite_step_is_named_and_never_saved(tmp_path, capsys, monkeypatch, what, poison, bad_step):
    # Checkpoints at steps 2 and 4, no log line before 5. A bad step 3 is read a step late, during step 4
    # (itself bad by then: nan weights); a bad step 4 must be read before its checkpoint is written.
    _at_training_forward(monkeypatch, bad_step, poison)
    rc = train_inproc(tmp_path, "log.every=5", "checkpoint.every=2", "checkpoint.keep=5")
    assert rc == 1
    err = capsys.readouterr().err
    assert f"non-finite {what}" in err and f"at step {bad_step}" in err, err
    assert str(tmp_path / "ckpt" / "step_2") in err
    assert sorted(d.name for d in (tmp_path / "ckpt").iterdir()) == ["step_2"]


@pytest.mark.slow
def test_sigterm_read_a_step_late_saves_and_exits(tmp_path, monkeypatch):
    _at_training_forward(monkeypatch, 3, lambda model, out: os.kill(os.getpid(), signal.SIGTERM))
    assert train_inproc(tmp_path, "log.every=5", "log.val_every=0", "checkpoint.every=0") == 0
    (step_dir,) = (tmp_path / "ckpt").glob("step_*")
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert manifest["reason"] == "sigterm" and manifest["step"] in (3, 4)  # at most one step late


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    cmd = [sys.executable, "-m", "moesys.train", "--config", TINY, "--run-dir", str(tmp_path),
           *sets("train.steps=100000", "log.every=1", "log.val_every=0")]
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((tmp_path / "metrics.jsonl").is_file() and (tmp_path / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    (step_dir,) = (tmp_path / "ckpt").glob("step_*")
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert manifest["reason"] == "sigterm" and manifest["step"] == metrics(tmp_path)[-1]["step"] < 100000


@pytest.mark.slow
def test_bad_config_and_missing_data_fail_before_any_process_group(tmp_path, capsys):
    assert train_inproc(tmp_path, "train.stepz=3") == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err
    assert train_inproc(tmp_path, f"data.source={tmp_path}/nothing.jsonl") == 2
    assert "nothing.jsonl" in capsys.readouterr().err
    assert not dist.is_initialized()
    # torchrun: every rank fails at once, none waits in a rendezvous that never completes.
    proc = run_torchrun(2, tmp_path / "tr", f"data.source={tmp_path}/nothing.jsonl", timeout=90)
    assert proc.returncode != 0 and "does not exist" in proc.stderr


def test_clip_folded_into_fused_adamw_matches_clip_grad_norm():
    """clip_in_fused_step (the clip as fused AdamW's grad_scale) updates like clip_grad_norm_ + AdamW, and a
    non-finite gradient leaves the weights and the step count untouched (found_inf)."""
    import torch
    from moesys.train import clip_in_fused_step
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(7, 5, generator=g), torch.randn(3, generator=g)]
    grads = [torch.randn(7, 5, generator=g) * 4, torch.randn(3, generator=g) * 4]
    params = {}
    for mode in ("folded", "reference"):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        opt = torch.optim.AdamW(ps, lr=0.1, fused=True)
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        if mode == "folded":
            norm = torch.nn.utils.get_total_norm([p.grad for p in ps])
            clip_in_fused_step(opt, norm, 1.0)
        else:
            norm = torch.nn.utils.clip_grad_norm_(ps, 1.0)
        assert float(norm) > 1.0  # the clip is active
        opt.step()
        params[mode] = ps
    for a, b in zip(params["folded"], params["reference"]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    ps = params["folded"]
    opt = torch.optim.AdamW(ps, lr=0.1, fused=True)
    before = [p.detach().clone() for p in ps]
    ps[0].grad = torch.full_like(ps[0], float("nan"))
    ps[1].grad = torch.ones_like(ps[1])
    norm = torch.nn.utils.get_total_norm([p.grad for p in ps])
    assert not torch.isfinite(norm)
    clip_in_fused_step(opt, norm, 1.0)
    opt.step()
    for p, b in zip(ps, before):
        assert torch.equal(p.detach(), b)
    assert all(float(opt.state[p]["step"]) == 0 for p in ps)


def test_clip_to_norm_matches_clip_grad_norm_without_a_sync():
    """The sharded-model clip (a device-side factor): as clip_grad_norm_ for a finite norm (one below
    max_norm leaves the gradients as they are); a NaN norm leaves the gradients alone, an infinite one
    zeroes them."""
    import torch
    from moesys.parallel.handle import clip_to_norm
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(4, 3, generator=g) * 3, torch.randn(5, generator=g) * 3]
    ref = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
    got = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
    for p, t in zip(ref + got, grads + grads):
        p.grad = t.clone()
    norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    clip_to_norm(got, torch.nn.utils.get_total_norm([p.grad for p in got]), 1.0)
    for a, b in zip(got, ref):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    assert float(norm) > 1.0
    clipped = [p.grad.clone() for p in got]
    clip_to_norm(got, torch.nn.utils.get_total_norm(clipped), 2.0)  # norm 1 < 2: no scaling up
    assert all(torch.equal(a.grad, b) for a, b in zip(got, clipped))
    tiny = [p.grad.clone() * 1e-7 for p in got]
    for p, t in zip(got, tiny):
        p.grad = t.clone()
    clip_to_norm(got, torch.nn.utils.get_total_norm(tiny), 1.0)  # a norm below the 1e-6 guard: unchanged
    assert all(torch.equal(a.grad, b) for a, b in zip(got, tiny))
    for p, t in zip(got, clipped):
        p.grad = t.clone()
    clip_to_norm(got, torch.tensor(float("nan")), 1.0)
    assert all(torch.allclose(a.grad, b.grad) for a, b in zip(got, ref))
    clip_to_norm(got, torch.tensor(float("inf")), 1.0)
    assert all(torch.count_nonzero(a.grad) == 0 for a in got)

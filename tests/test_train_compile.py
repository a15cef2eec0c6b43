"""train.compile=true: the tiny job runs with every block compiled and gives the eager job's losses
(within float32 reordering by the compiler)."""

import pytest
import torch

from moesys.config import load_config
from moesys.models.transformer import MoETransformer
from tests._train_helpers import TINY, metrics, train_inproc

ITEMS = ("train.steps=3", "log.every=1", "log.val_every=0", "checkpoint.save_final=false", "data.batch_size=2",
         "data.seq_len=32")


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    assert train_inproc(tmp_path / "eager", *ITEMS) == 0
    assert train_inproc(tmp_path / "compiled", *ITEMS, "train.compile=true") == 0
    eager, compiled = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    assert [r["step"] for r in compiled] == [1, 2, 3]
    for a, b in zip(compiled, eager):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


@pytest.mark.slow
def test_reduce_overhead_mode_trains_like_eager(tmp_path):
    """train.compile_mode=reduce-overhead (CUDA graphs on a GPU; on the CPU torch.compile skips the graphs
    and the step-begin marks are no-ops) gives the eager losses."""
    assert train_inproc(tmp_path / "eager", *ITEMS) == 0
    assert train_inproc(tmp_path / "ro", *ITEMS, "train.compile=true", "train.compile_mode=reduce-overhead") == 0
    for a, b in zip(metrics(tmp_path / "ro"), metrics(tmp_path / "eager")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


@pytest.mark.slow
def test_compile_parts_compiles_blocks_and_head():
    config = load_config(TINY, ["train.device=cpu"])
    torch.manual_seed(0)
    model = MoETransformer.from_config(config)
    ids = torch.randint(0, config.model.vocab_size, (2, 17))
    want = model(ids[:, :-1], ids[:, 1:])
    model.compile_parts()
    got = model(ids[:, :-1], ids[:, 1:])
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None for b in model.blocks)
    assert hasattr(model._head, "_torchdynamo_orig_callable")  # the head is a compiled function now
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_whole_model_compile_and_loss_only_forward():
    """compile_scope="model" compiles the forward as one graph with the same loss; return_logits=False gives
    the same loss and aux loss without logits."""
    config = load_config(TINY, ["train.device=cpu"])
    torch.manual_seed(0)
    model = MoETransformer.from_config(config)
    ids = torch.randint(0, config.model.vocab_size, (2, 17))
    want = model(ids[:, :-1], ids[:, 1:])
    lean = model(ids[:, :-1], ids[:, 1:], return_logits=False)
    assert lean.logits is None and torch.equal(lean.loss, want.loss) and torch.equal(lean.aux_loss, want.aux_loss)
    model.compile_parts(scope="model")
    assert model._compiled_call_impl is not None
    got = model(ids[:, :-1], ids[:, 1:], return_logits=False)
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
    assert got.aux_loss.item() == pytest.approx(want.aux_loss.item(), rel=1e-5)


@pytest.mark.slow
def test_forward_traces_without_graph_breaks():
    """The whole forward is one graph for dynamo, in a fresh process (nothing imported beforehand): the MoE
    backend lookup once imported its module while being traced, which split every block in two. Under bf16
    autocast, as on a GPU (fp32 experts on the CPU take grouped_mm's per-expert fallback, which reads the
    offsets on the host)."""
    import subprocess
    import sys
    code = ("import torch, torch._dynamo\n"
            "from moesys.config import load_config\n"
            "from moesys.models.transformer import MoETransformer\n"
            f"m = MoETransformer.from_config(load_config({str(TINY)!r}, ['train.device=cpu']))\n"
            "ids = torch.randint(0, 64, (2, 9))\n"
            "with torch.autocast('cpu', dtype=torch.bfloat16):\n"  # bf16 experts, as on a GPU: grouped_mm
            "    e = torch._dynamo.explain(m)(ids[:, :-1], ids[:, 1:], return_logits=False)\n"
            "print(e.graph_count, e.graph_break_count, [b.reason[:200] for b in e.break_reasons])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:2] == ["1", "0"], out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA graphs (on the CPU the mode is plain compile)")
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_cuda_graph_replays_train_like_plain_compile_on_gpu(tmp_path, grad_accum):
    """compile_mode=reduce-overhead on a GPU, also with several micro-batches per step (the second replay
    in a step must not overwrite the first one's gradients): the losses of compile_mode=default."""
    items = (*ITEMS, "train.compile=true", f"train.grad_accum={grad_accum}", "train.steps=6")
    assert train_inproc(tmp_path / "plain", *items, "train.compile_mode=default") == 0
    assert train_inproc(tmp_path / "graphs", *items, "train.compile_mode=reduce-overhead") == 0
    plain, graphs = metrics(tmp_path / "plain"), metrics(tmp_path / "graphs")
    assert [r["step"] for r in graphs] == list(range(1, 7))
    for a, b in zip(graphs, plain):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3), (a["step"], a["loss"], b["loss"])

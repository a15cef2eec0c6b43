"""`moesys train`'s start-up block, resume line, plain progress and final line, read from a real tiny run;
the CPU thread choice against the affinity mask, the local world size and the overrides."""

import io
import os

import pytest
import torch

from moesys import train_report
from tests._train_helpers import train_inproc


def test_cpu_threads_follow_affinity_ranks_and_overrides(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert train_report.choose_cpu_threads(None, 1, env={}) == (6, "6 usable cores / 1 rank(s) on this node")
    assert train_report.choose_cpu_threads(None, 8, env={"LOCAL_WORLD_SIZE": "4"})[0] == 1
    assert train_report.choose_cpu_threads(None, 2, env={"LOCAL_WORLD_SIZE": "2"})[0] == 3
    assert train_report.choose_cpu_threads(None, 4, env={"OMPI_COMM_WORLD_LOCAL_SIZE": "3"})[0] == 2
    assert train_report.choose_cpu_threads(None, 2, env={})[0] == 3      # no launcher said: all ranks local
    assert train_report.choose_cpu_threads(None, 1, env={"OMP_NUM_THREADS": "5"}) == (5, "OMP_NUM_THREADS")
    assert train_report.choose_cpu_threads(2, 1, env={"OMP_NUM_THREADS": "5"}) == (2, "train.cpu_threads")


def test_plain_progress_prints_lines_not_frames():
    out = io.StringIO()
    bar = train_report.PlainProgress(total=25, initial=0, file=out)
    for _ in range(25):
        bar.update(1)
        bar.set_postfix(loss="1.0000")
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["3/25", "6/25", "9/25", "12/25", "15/25", "18/25", "21/25",
                                                   "24/25", "25/25"]
    assert "\r" not in out.getvalue() and lines[-1].endswith(", loss 1.0000")


def test_plain_progress_line_carries_the_loss_read_at_its_step():
    """The plain line for step n shows the loss read by step n (at a log step: step n's own, the loss of
    the log line beside it), not the one read a step earlier."""
    from moesys.train import _show_progress
    from moesys.train_step_values import StepValues

    out = io.StringIO()
    bar = train_report.PlainProgress(total=2, initial=0, file=out)
    _show_progress(bar, StepValues(step=1, loss=5.0, aux_loss=0.0, grad_norm=1.0), 1e-3)
    _show_progress(bar, StepValues(step=2, loss=4.0, aux_loss=0.0, grad_norm=1.0), 2e-3)
    first, second = out.getvalue().splitlines()
    assert first.startswith("train 1/2 (50%)") and first.endswith(", loss 5.0000, lr 1.00e-03")
    assert second.startswith("train 2/2 (100%)") and second.endswith(", loss 4.0000, lr 2.00e-03")


@pytest.mark.slow
def test_start_up_block_resume_lines_and_final_line(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        items = ("train.steps=2", "log.every=1", "log.progress_bar=true", "train.cpu_threads=1")
        assert train_inproc(tmp_path, *items, resume=True) == 0
        out = capsys.readouterr().out
        ckpt = tmp_path / "ckpt"
        assert f"no checkpoint in {ckpt}: starting fresh" in out
        block = out[out.index("moesys train: 2 layers"):].splitlines()[:5]
        assert "parameters" in block[0] and "total" in block[0] and "active per token" in block[0] \
            and "embedding" in block[0]
        assert block[1].startswith("  device cpu (float32), world size 1 (single), mesh dp 1 x ep 1")
        assert block[2].startswith("  CPU threads: 1 (train.cpu_threads")
        assert block[3].startswith("  data stdlib: 400,000 tokens")
        assert block[4].startswith(f"  steps 2 x 512 tokens; run dir {tmp_path}")
        assert "train 2/2 (100%)" in out and "\r" not in out               # plain progress lines off a tty
        final = out.strip().splitlines()[-1]
        assert final.startswith("moesys train: done: 2 steps (to step 2) in ")
        assert final.endswith(f"; checkpoint {ckpt / 'step_2'}") and "last loss " in final
        assert torch.get_num_threads() == 1

        assert train_inproc(tmp_path, *items[:-1], "train.steps=3", resume=True) == 0
        out = capsys.readouterr().out
        assert "resumed from ckpt/step_2" in out
        assert out.strip().splitlines()[-1].startswith("moesys train: done: 1 steps (to step 3) in ")
    finally:
        torch.set_num_threads(threads)

"""bench/timeline.py: a decode step's GPU time split by stream (copy, compute, both, neither), on hand-made
intervals; and the decode-step ranges generate_batch marks for it, under torch.profiler on the CPU."""

import sys
from pathlib import Path

import pytest
import torch

import moesys.offload as mo
from moesys.offload.batch import generate_batch
from tests.test_offload import checkpoints  # noqa: F401
from tests.test_offload_batch import budget, prompts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from timeline import step_timeline  # noqa: E402


def test_step_timeline_splits_streams_per_window():
    events = [
        ("_copy_rows_persistent_kernel", 7, 0.0, 4.0),   # copy stream 7: [0, 4] and [6, 8]
        ("_copy_rows_persistent_kernel", 7, 6.0, 8.0),
        ("Memcpy HtoD (Pinned -> Device)", 7, 3.0, 5.0),  # on the copy stream too: copy [0, 5] U [6, 8]
        ("gemm", 1, 2.0, 3.0),                             # compute: [2, 3.5] U [7, 9]
        ("elementwise", 2, 2.5, 3.5),
        ("gemm", 1, 7.0, 9.0),
        ("gemm", 1, 20.0, 21.0),                           # outside every window
    ]
    got = step_timeline(events, [(0.0, 10.0), (10.0, 12.0)])
    assert got["copy_stream"] == 7 and got["steps"] == 2
    # window 1: copy 7, compute 3.5, overlap 1.5 + 1 = 2.5, idle 10 - 7 - 3.5 + 2.5 = 2; window 2: all idle
    assert got["wall"] == pytest.approx(6.0)
    assert got["copy"] == pytest.approx(3.5)
    assert got["compute"] == pytest.approx(1.75)
    assert got["overlap"] == pytest.approx(1.25)
    assert got["idle"] == pytest.approx(2.0)


def test_step_timeline_without_copies_is_all_compute():
    got = step_timeline([("gemm", 3, 1.0, 2.0)], [(0.0, 4.0)])
    assert got["copy_stream"] is None
    assert (got["copy"], got["compute"], got["overlap"], got["idle"]) == (0.0, 1.0, 0.0, 3.0)


def test_generate_batch_marks_each_decode_step_for_the_profiler(checkpoints):
    path, dtype = checkpoints["olmoe"], torch.float32
    model = mo.load(path, gpu_memory=budget(path, dtype, 10), dtype=dtype, cuda_graph=False)
    run = generate_batch(model, prompts((5, 9)), max_new_tokens=4, batch_size=2, eos=[])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        list(run)
    names = [ev.name for ev in prof.events()]
    # one prefill forward for both rows, then 3 decode steps (the prefill gives each row its first token)
    assert names.count("moesys.prefill") == 1
    assert names.count("moesys.decode_step") == run.decode_steps == 3

"""train.compile=true: the tiny job runs with every block compiled and gives the eager job's losses
(within float32 reordering by the compiler)."""

import pytest

from tests._train_helpers import metrics, train_inproc

ITEMS = ("train.steps=3", "log.every=1", "log.val_every=0", "checkpoint.save_final=false", "data.batch_size=2",
         "data.seq_len=32")


def test_compiled_training_matches_eager(tmp_path):
    assert train_inproc(tmp_path / "eager", *ITEMS) == 0
    assert train_inproc(tmp_path / "compiled", *ITEMS, "train.compile=true") == 0
    eager, compiled = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    assert [r["step"] for r in compiled] == [1, 2, 3]
    for a, b in zip(compiled, eager):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)

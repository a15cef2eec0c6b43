"""Checks `moesys plot RUN_DIR` against a real tiny run: it writes the loss and expert-load PNGs, and a
run directory without metrics is a clear error."""

import pytest

from moesys.cli import main
from tests._train_helpers import train_inproc

pytest.importorskip("matplotlib")


@pytest.mark.slow
def test_plot_writes_loss_and_expert_load_pngs(tmp_path, capsys):
    assert train_inproc(tmp_path, "train.steps=4", "log.every=1", "log.val_every=2",
                        "checkpoint.save_final=false") == 0
    assert main(["plot", str(tmp_path)]) == 0
    for name in ("loss.png", "expert_load.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err

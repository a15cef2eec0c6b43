"""Owned temp directories against real processes: a SIGTERM'd `moesys upcycle` cleans up like an exception,
a SIGKILL'd one's leftover is removed by the next run, and a live process's temp dir is never touched."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moesys import owned_tmp
from moesys.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]

# An upcycle whose writer stops before writing: the temp dir exists and holds config.json, then the
# script touches READY and sleeps until a signal arrives.
_UPCYCLE = r"""
import sys, time
from pathlib import Path
import transformers
from moesys.cli import main
from moesys.upcycling import io

cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1)
root = Path(sys.argv[1])
transformers.LlamaForCausalLM(cfg).save_pretrained(root / "dense")

def stuck_write(self, out_dir, *args, **kwargs):
    (root / "READY").write_text(str(out_dir))
    time.sleep(120)

io.ShardWriter.write = stuck_write
sys.exit(main(["upcycle", str(root / "dense"), str(root / "moe"), "--num-experts", "2", "--top-k", "1",
               "--no-progress"]))
"""


def _start_stuck_upcycle(root: Path) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _UPCYCLE, str(root)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (root / "READY").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the upcycle never reached its writer: {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)
    tmp = Path((root / "READY").read_text())
    assert tmp.parent == root and tmp.name.startswith(".moe.upcycle-") and (tmp / "config.json").is_file()
    return proc, tmp


def _hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


@pytest.mark.slow
def test_sigterm_during_upcycle_removes_its_temp_dir(tmp_path):
    proc, tmp = _start_stuck_upcycle(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "moesys upcycle: terminated (SIGTERM)"
    assert not tmp.exists() and _hidden(tmp_path) == [] and not (tmp_path / "moe").exists()


@pytest.mark.slow
def test_a_killed_upcycles_leftover_is_removed_by_the_next_run(tmp_path):
    proc, tmp = _start_stuck_upcycle(tmp_path)
    proc.kill()                                    # SIGKILL: no clean-up can run
    proc.communicate(timeout=60)
    assert tmp.is_dir() and owned_tmp.is_stale(tmp)
    live = owned_tmp.make_owned_dir(tmp_path, ".moe.upcycle-")   # this (live) process's: must stay
    import moesys
    # the next upcycle, into another directory beside it, removes the dead one's leftover, not the live one
    moesys.upcycle(tmp_path / "dense", tmp_path / "other", num_experts=2, top_k=1, progress=False)
    assert not tmp.exists() and live.is_dir()
    assert _hidden(tmp_path) == [live.name]
    assert (tmp_path / "other" / "config.json").is_file()
    assert not (tmp_path / "other" / owned_tmp.OWNER_FILE).exists()   # disowned before publishing


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def _owned_by(path: Path, **owner) -> Path:
    path.mkdir()
    (path / owned_tmp.OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "start": None, **owner}))
    return path


def test_only_dead_owners_on_this_host_are_stale(tmp_path):
    dead = _owned_by(tmp_path / ".x.export-dead", pid=_dead_pid())
    mine = owned_tmp.make_owned_dir(tmp_path, ".x.export-")
    elsewhere = _owned_by(tmp_path / ".x.export-far", pid=_dead_pid(), host="another-host")
    unowned = tmp_path / ".x.export-unowned"
    unowned.mkdir()
    other_kind = _owned_by(tmp_path / ".x.upcycle-dead", pid=_dead_pid())
    # A live pid whose start time differs: the pid was reused by another process, so the owner is gone.
    reused = _owned_by(tmp_path / ".x.export-reused", pid=os.getpid(), start="1")
    assert owned_tmp.remove_stale(tmp_path, ".x.export-") == sorted([dead, reused])
    assert mine.is_dir() and elsewhere.is_dir() and unowned.is_dir() and other_kind.is_dir()


def test_checkpoint_temp_dirs_of_dead_runs_are_removed(tmp_path):
    import torch

    ckpt_root = tmp_path / "ckpt"
    ckpt_root.mkdir()
    stale = _owned_by(ckpt_root / ".tmp-step_7", pid=_dead_pid())
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    final = save_checkpoint(ckpt_root, 3, model=model, optimizer=optimizer, manifest={}, rank=0, world_size=1,
                            device=torch.device("cpu"))
    assert not stale.exists()
    assert owned_tmp.OWNER_FILE not in json.loads((final / "manifest.json").read_text())["files"]
    assert sorted(p.name for p in ckpt_root.iterdir()) == ["step_3"]


def test_an_interrupted_checkpoint_write_leaves_no_temp_dir(tmp_path, monkeypatch):
    """Ctrl-C (or an error) while the checkpoint files are written removes ckpt/.tmp-step_N, as upcycle and
    export do; nothing is published."""
    import torch

    from moesys import checkpoint

    real_save = checkpoint.save_file

    def interrupted(tensors, path, *args, **kwargs):
        if path.endswith("model.safetensors"):
            raise KeyboardInterrupt
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", interrupted)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ckpt", 3, model=model, optimizer=torch.optim.AdamW(model.parameters()),
                        manifest={}, rank=0, world_size=1, device=torch.device("cpu"))
    assert list((tmp_path / "ckpt").iterdir()) == []


def test_export_temp_dir_is_owned_and_removed_on_error(tmp_path):
    out = tmp_path / "hf"
    with pytest.raises(RuntimeError):
        with owned_tmp.atomic_output_dir(out, overwrite=False, kind="export") as tmp:
            assert tmp.name.startswith(".hf.export-") and (tmp / owned_tmp.OWNER_FILE).is_file()
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

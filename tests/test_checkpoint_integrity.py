"""Checkpoint integrity against damaged files: the manifest's sizes and SHA-256 digests match the files;
a truncated, zero-filled or broken-manifest newest checkpoint is named with the bad file and resume
continues from the newest intact one exactly as the uninterrupted run did; a checkpoint saved with
non-finite weights is blamed, not the learning rate."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moesys.checkpoint import load_checkpoint
from moesys.checkpoint_integrity import file_records, verify_checkpoint
from tests._train_helpers import metrics, train_inproc

COMMON = ("train.steps=6", "log.every=1", "log.val_every=0", "checkpoint.every=2", "checkpoint.keep=3",
          "train.device=cpu")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    assert train_inproc(run, *COMMON) == 0
    return run


def _cut_after_step4(full_run, dst):
    shutil.copytree(full_run, dst)
    shutil.rmtree(dst / "ckpt" / "step_6")
    return dst / "ckpt" / "step_4"


def _truncate(step_dir):
    path = step_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "model.safetensors has", "(truncated)"


def _zero_fill(step_dir):
    path = step_dir / "optimizer.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 65536] = bytes(65536)
    path.write_bytes(bytes(data))
    return "optimizer.safetensors does not match the SHA-256", "zero-filled"


def _broken_manifest(step_dir):
    path = step_dir / "manifest.json"
    path.write_bytes(bytes(path.stat().st_size))
    return "manifest.json is not valid JSON", ""


def _missing_file(step_dir):
    (step_dir / "model.safetensors").unlink()
    return "model.safetensors is missing", "listed in its manifest"


@pytest.mark.slow
def test_manifest_records_size_and_sha256(full_run):
    step = full_run / "ckpt" / "step_6"
    files = json.loads((step / "manifest.json").read_text())["files"]
    assert set(files) == {p.name for p in step.iterdir()} - {"manifest.json"}
    for name, record in files.items():
        data = (step / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_checkpoint(step) is None


def test_only_the_named_files_are_verified(tmp_path):
    """`only`: a reader of one file (moesys export reads model.safetensors) is not refused for another's damage."""
    for name in ("model.safetensors", "optimizer.safetensors"):
        (tmp_path / name).write_bytes(b"x" * 64)
    records = file_records(tmp_path, ["model.safetensors", "optimizer.safetensors"])
    (tmp_path / "manifest.json").write_text(json.dumps({"files": records}))
    (tmp_path / "optimizer.safetensors").write_bytes(b"y" * 64)
    assert "optimizer.safetensors does not match the SHA-256" in verify_checkpoint(tmp_path)
    assert verify_checkpoint(tmp_path, only=("model.safetensors",)) is None
    assert "optimizer.safetensors does not match" in verify_checkpoint(tmp_path, only=("optimizer.safetensors",))


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_truncate, _zero_fill, _broken_manifest, _missing_file])
def test_damaged_newest_checkpoint_is_named_and_resume_falls_back(full_run, tmp_path, capsys, damage):
    step4 = _cut_after_step4(full_run, tmp_path / "cut")
    file_says, how = damage(step4)
    assert train_inproc(tmp_path / "cut", *COMMON, resume=True) == 0
    err = capsys.readouterr().err
    assert f"checkpoint step_4 is damaged: {step4}" in err and file_says in err and how in err, err
    assert "resuming from step_2, the newest intact checkpoint" in err, err
    assert (tmp_path / "cut" / "ckpt" / "damaged-step_4").is_dir()
    # Steps 3..6 again from step 2: the same losses and final weights as the uninterrupted run.
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in metrics(tmp_path / "cut")] == \
        [(r["step"], r["loss"], r["grad_norm"]) for r in metrics(full_run)]
    a = load_file(str(full_run / "ckpt" / "step_6" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "ckpt" / "step_6" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_intact_checkpoint_refuses(full_run, tmp_path, capsys):
    run = tmp_path / "cut"
    _cut_after_step4(full_run, run)
    for step in ("step_2", "step_4"):
        _truncate(run / "ckpt" / step)
    assert train_inproc(run, *COMMON, resume=True) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err and "step_2 is damaged" in err and "step_4 is damaged" in err, err


def test_truncated_file_loads_as_a_named_error(full_run, tmp_path):
    step = tmp_path / "step_6"
    shutil.copytree(full_run / "ckpt" / "step_6", step)
    _truncate(step)
    from moesys.config import load_config
    from moesys.models.transformer import MoETransformer
    from tests._train_helpers import TINY
    model = MoETransformer.from_config(load_config(TINY, []))
    with pytest.raises(ValueError, match=r"model.safetensors cannot be read .*the checkpoint is damaged"):
        load_checkpoint(step, model=model, optimizer=None, rank=0, device=torch.device("cpu"))


def test_nan_right_after_resume_blames_the_checkpoint_not_the_lr(full_run, tmp_path, capsys):
    step4 = _cut_after_step4(full_run, tmp_path / "cut")
    weights = load_file(str(step4 / "model.safetensors"))
    weights = {k: v.fill_(float("nan")) if k.endswith("lm_head.weight") else v for k, v in weights.items()}
    save_file(weights, str(step4 / "model.safetensors"))
    manifest = json.loads((step4 / "manifest.json").read_text())
    manifest["files"] = file_records(step4, sorted(manifest["files"]))  # saved that way: checksums match
    (step4 / "manifest.json").write_text(json.dumps(manifest))
    assert train_inproc(tmp_path / "cut", *COMMON, resume=True) == 1
    err = capsys.readouterr().err
    assert f"at step 5, the first step after resuming from {step4}" in err, err
    assert "last good" not in err and "rather than changing train.lr" in err, err

"""train.engine=deepspeed's JSON against the moesys config: values moesys owns are filled in, explicit
contradictions and what moesys cannot honour (ZeRO-3, fp16, optimizer/scheduler sections, offload) are
one-line errors naming the values, before any process starts; the launcher's --local_rank is accepted."""

from __future__ import annotations

import json
import sys

import pytest

from moesys.config import load_config
from moesys.integrations.deepspeed_config import resolve_deepspeed_config
from tests._train_helpers import train_inproc

SHIPPED = ("configs/deepspeed_zero2_bf16.json", "configs/deepspeed_zero1_bf16.json",
           "configs/deepspeed_zero2_autocast.json")


def _config(tmp_path, ds: dict | None, *items):
    path = tmp_path / "ds.json"
    if ds is not None:
        path.write_text(json.dumps(ds))
    return load_config("configs/tiny.yaml", ["train.engine=deepspeed", f"train.deepspeed_config={path}",
                                             "data.batch_size=3", "train.grad_accum=2", "train.grad_clip=0.5",
                                             "train.device=cpu", *items])


@pytest.mark.parametrize("shipped", SHIPPED)
def test_shipped_configs_are_filled_from_the_moesys_config(shipped):
    config = load_config("configs/tiny.yaml", ["train.engine=deepspeed", f"train.deepspeed_config={shipped}",
                                               "data.batch_size=3", "train.grad_accum=2", "train.grad_clip=0.5",
                                               "train.device=cpu"])
    ds = resolve_deepspeed_config(config, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False  # fp32 on the CPU
    assert ds["zero_optimization"]["stage"] == (2 if "zero2" in shipped else 1)
    assert "gradient_allreduce_op" not in ds  # DeepSpeed's mean over the 4 ranks
    # one rank: the sum (no division by 1 over every gradient); the jobs at one rank equal the torch engine
    # (tests/test_deepspeed_engine_job.py)
    assert resolve_deepspeed_config(config, world_size=1)["gradient_allreduce_op"] == "sum"
    bf16 = load_config("configs/tiny.yaml", ["train.engine=deepspeed", f"train.deepspeed_config={shipped}",
                                             "train.dtype=bfloat16"])
    autocast = "autocast" in shipped  # fp32 parameters under bf16 autocast instead of bf16 parameters
    resolved = resolve_deepspeed_config(bf16)
    assert resolved["bf16"]["enabled"] is not autocast
    if autocast:  # gradients reduced in fp32, as the torch engine reduces them
        assert resolved["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
        assert ds["torch_autocast"]["enabled"] is False  # "auto" in an fp32 run: no autocast, as bf16 follows


def test_matching_explicit_values_pass(tmp_path):
    ds = resolve_deepspeed_config(_config(tmp_path, {
        "zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.5, "bf16": {"enabled": False}, "train_batch_size": 12}), world_size=2)
    assert ds["train_batch_size"] == 12


BAD = [
    ({"zero_optimization": {"stage": 3}}, (), "stage=3"),
    ({}, (), "stage=None"),
    ({"zero_optimization": {"stage": 0}}, (), "stage=0"),
    ({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8}, (),
     "train_micro_batch_size_per_gpu=8 contradicts data.batch_size"),
    ({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 1}, (),
     "gradient_accumulation_steps=1 contradicts train.grad_accum"),
    ({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}, (),
     "gradient_clipping=1.0 contradicts train.grad_clip"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, ("train.dtype=float32",),
     "enabled=True contradicts train.dtype='float32'"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}, ("train.dtype=bfloat16",),
     "enabled=False contradicts train.dtype='bfloat16'"),
    ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, (), "fp16.enabled=true"),
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}, (), "'optimizer' section"),
    ({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}, (), "'scheduler' section"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, (), "offload_optimizer"),
    ({"zero_optimization": {"stage": 2, "reduce_scatter": False}}, (), "reduce_scatter=False"),
    ({"zero_optimization": {"stage": 2}}, ("parallel.expert_sharding=fssdp",), "expert_sharding='fssdp'"),
    ({"zero_optimization": {"stage": 2}, "torch_autocast": {"enabled": True}}, ("train.dtype=float32",),
     "torch_autocast: enabled=True contradicts train.dtype='float32'"),
    ({"zero_optimization": {"stage": 2}, "torch_autocast": {"enabled": True, "dtype": "fp16"}},
     ("train.dtype=bfloat16",), "torch_autocast.dtype='fp16'"),
    ({"zero_optimization": {"stage": 2}, "torch_autocast": {"enabled": True}, "bf16": {"enabled": True}},
     ("train.dtype=bfloat16",), "enabled=True contradicts train.dtype='bfloat16' .* with torch_autocast on"),
]


@pytest.mark.parametrize("ds,items,match", BAD, ids=[b[2] for b in BAD])
def test_contradictions_and_unsupported_settings_are_refused(tmp_path, ds, items, match):
    with pytest.raises(ValueError, match=match) as err:
        resolve_deepspeed_config(_config(tmp_path, ds, *items), world_size=2)
    assert "train.deepspeed_config=" in str(err.value) or "expert_sharding" in str(err.value)


def test_train_batch_size_is_checked_once_the_world_size_is_known(tmp_path):
    config = _config(tmp_path, {"zero_optimization": {"stage": 2}, "train_batch_size": 12})
    resolve_deepspeed_config(config)  # before the processes exist: not checkable yet
    with pytest.raises(ValueError, match=r"train_batch_size=12 contradicts .* x 4 ranks"):
        resolve_deepspeed_config(config, world_size=4)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        resolve_deepspeed_config(_config(tmp_path, None))
    (tmp_path / "ds.json").write_text("{stage: 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        resolve_deepspeed_config(load_config("configs/tiny.yaml", [
            "train.engine=deepspeed", f"train.deepspeed_config={tmp_path / 'ds.json'}"]))


def test_train_command_refuses_in_one_line_before_starting(tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert train_inproc(tmp_path / "run", "train.engine=deepspeed", f"train.deepspeed_config={path}") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "moesys train: error:" in err and "stage=3" in err, err
    assert not (tmp_path / "run").exists()


def test_missing_deepspeed_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` now raises ImportError
    assert train_inproc(tmp_path / "run", "train.engine=deepspeed") == 2
    err = capsys.readouterr().err
    assert "pip install 'moesys[deepspeed]'" in err and err.strip().count("\n") == 0, err


def test_the_deepspeed_launchers_local_rank_argument_is_accepted():
    from moesys.cli import Parser
    from moesys.train import add_arguments
    parser = Parser(prog="t")
    add_arguments(parser)
    for argv in (["--local_rank=1"], ["--local-rank", "0"]):
        args = parser.parse_args(["--config", "configs/tiny.yaml", *argv])
        assert args.config == "configs/tiny.yaml"

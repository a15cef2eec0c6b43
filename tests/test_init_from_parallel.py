"""Checks init_from under 2 gloo ranks against one process: with parallel.ep=2 or FSSDP each rank reads
from the safetensors files the dense tensors and only the expert tensors it owns (bytes counted), and a
few training steps of tiny Mixtral, Qwen3-MoE and Qwen2-MoE checkpoints give the single process's losses."""

from __future__ import annotations

import pytest
import torch

from moesys.parallel.testing import spawn
from tests._init_from_helpers import save_hf_model, torchrun_from, train_from
from tests._train_helpers import metrics


def _count_reads(rank, world, model_dir, sharding, out_dir):
    from moesys.config import load_config
    from moesys.hf.load import load_init_weights
    from moesys.hf.resolve import resolve_init_from
    from moesys.models.transformer import MoETransformer
    from moesys.parallel import parallelize
    items = [f"model.init_from={model_dir}"]
    items += ["parallel.ep=2"] if sharding == "ep" else ["parallel.expert_sharding=fssdp"]
    config = resolve_init_from(load_config(None, items))
    torch.manual_seed(0)
    model = MoETransformer.from_config(config)
    handle = parallelize(model, config)
    reader = load_init_weights(model, config, handle)
    owned = {name: handle.local_expert_ids(name) for name, _ in model.named_parameters()
             if handle.local_expert_ids(name) is not None}
    torch.save({"names": reader.names_read, "bytes": reader.bytes_read, "owned": owned,
                "state": {k: v.clone() for k, v in model.state_dict().items()}}, out_dir / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ep", "fssdp"])
def test_each_rank_reads_only_its_experts(tmp_path, sharding):
    from moesys.upcycling.io import source_tensors
    model_dir = save_hf_model("mixtral", tmp_path / "src", num_local_experts=8)
    spawn(_count_reads, 2, model_dir, sharding, tmp_path, timeout_s=120)
    _, disk = source_tensors(model_dir)
    nbytes = {n: torch.Size(shape).numel() * dtype.itemsize for n, (shape, dtype) in disk.items()}
    dense = {n for n in disk if ".experts." not in n}
    expert_reads = []
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        # the experts this rank holds, as on-disk names: layer l, global id e, w1/w2/w3
        want = set()
        for name, ids in got["owned"].items():
            layer = int(name.split(".")[1])
            for e in ids:
                want |= {f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight" for w in ("w1", "w2", "w3")}
        read = set(got["names"])
        assert read - dense == want, rank
        assert dense <= read
        assert len(got["names"]) == len(read)  # nothing read twice
        assert got["bytes"] == sum(nbytes[n] for n in read)
        assert got["bytes"] < sum(nbytes.values())  # never the whole model
        expert_reads.append(read - dense)
    assert expert_reads[0].isdisjoint(expert_reads[1]) and len(expert_reads[0]) == len(expert_reads[1]) > 0


def _losses(run_dir):
    return [r["loss"] for r in metrics(run_dir)]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_ep2_and_fssdp_train_like_one_process(tmp_path, family):
    model_dir = save_hf_model(family, tmp_path / "src", vocab_size=256)
    common = ("train.steps=3", "log.every=1", "log.val_every=0", "data.batch_size=2", "train.lr=1e-3")
    assert train_from(tmp_path / "one", model_dir, *common, "train.grad_accum=2") == 0
    one = _losses(tmp_path / "one")
    assert len(one) == 3 and one[-1] < one[0]
    for name, items in (("ep2", ["parallel.ep=2"]), ("fssdp", ["parallel.expert_sharding=fssdp"])):
        proc = torchrun_from(2, tmp_path / name, model_dir, *common, *items)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _losses(tmp_path / name) == pytest.approx(one, rel=1e-5, abs=1e-5), name

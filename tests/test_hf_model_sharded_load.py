"""`model.hf_model` loading (moesys.hf.hf_model_load) against transformers' from_pretrained, and under 2 gloo ranks
(EP and FSSDP) against the bytes each rank may read: only its own experts, per-expert on disk (DeepSeek-V3) or
fused per layer (GPT-OSS, read by rows), with the weights of the one-process load."""

from __future__ import annotations

import pytest
import torch

from moesys.config import load_config
from moesys.parallel.testing import spawn
from tests._hf_model_helpers import _save, deepseek_v3, gpt_oss

FAMILIES = {"deepseek_v3": deepseek_v3, "gpt_oss": gpt_oss}


def _config(hf_dir, *items):
    from moesys.models.hf_source import resolve_config
    return resolve_config(load_config(None, [f"model.hf_model={hf_dir}", "moe.backend=loop", *items]))


def _tied_qwen3_moe(path):
    from transformers import Qwen3MoeConfig
    return _save(Qwen3MoeConfig(vocab_size=300, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                num_experts=4, num_experts_per_tok=2, tie_word_embeddings=True), path, 0)


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "tied_qwen3_moe"])
def test_every_weight_and_buffer_equals_from_pretrained(tmp_path, family):
    from transformers import AutoModelForCausalLM

    from moesys.models.hf_causal_lm import HFCausalLM
    from moesys.models.hf_source import load_hf_causal_lm
    hf_dir = {**FAMILIES, "tied_qwen3_moe": _tied_qwen3_moe}[family](tmp_path / "src")
    model = load_hf_causal_lm(_config(hf_dir))
    ref = HFCausalLM(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), backend="loop")
    for ours, theirs in ((dict(model.named_parameters()), dict(ref.named_parameters())),
                         (dict(model.named_buffers()), dict(ref.named_buffers()))):  # rotary inv_freq included
        assert ours.keys() == theirs.keys()
        for name, t in theirs.items():
            assert torch.equal(ours[name], t) and ours[name].requires_grad == t.requires_grad, name
    assert any(n.endswith("inv_freq") for n, _ in model.named_buffers())
    tied = model.hf.get_output_embeddings().weight is model.hf.get_input_embeddings().weight
    assert tied == (family == "tied_qwen3_moe") and model.hf.training == ref.hf.training


def _count_reads(rank, world, hf_dir, out_dir):
    from moesys.hf.hf_model_load import HFModelLoader
    from moesys.parallel import parallelize
    got = {}
    for sharding, items in (("ep", ["parallel.ep=2"]), ("fssdp", ["parallel.expert_sharding=fssdp"])):
        config = _config(hf_dir, *items)
        loader = HFModelLoader(config)
        model = loader.build("cpu")
        handle = parallelize(model, config)
        reader = loader.load_experts(model, handle)
        owned = {name: handle.local_expert_ids(name) for name, _ in model.named_parameters()
                 if handle.local_expert_ids(name) is not None}
        assert not any(p.is_meta for p in model.parameters())
        got[sharding] = {"names": reader.names_read, "rows": reader.rows_read, "bytes": reader.bytes_read,
                         "owned": owned, "state": {k: v.clone() for k, v in model.state_dict().items()}}
    torch.save(got, out_dir / f"rank{rank}.pt")


def _expert_keys(disk_names, layer, ids):
    """On-disk per-expert tensors of experts `ids` in MoE layer `layer` (DeepSeek-V3's names)."""
    return {n for n in disk_names if f"layers.{layer}.mlp.experts." in n and int(n.split(".")[5]) in ids}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_each_rank_reads_only_its_experts(tmp_path, family):
    from moesys.models.hf_source import load_hf_causal_lm
    from moesys.upcycling.io import source_tensors
    hf_dir = FAMILIES[family](tmp_path / "src")
    spawn(_count_reads, 2, hf_dir, tmp_path, timeout_s=120)
    _, disk = source_tensors(hf_dir)
    nbytes = {n: torch.Size(shape).numel() * dtype.itemsize for n, (shape, dtype) in disk.items()}
    experts = {n for n in disk if ".experts." in n}
    dense = set(disk) - experts
    reference = load_hf_causal_lm(_config(hf_dir)).state_dict()
    for sharding in ("ep", "fssdp"):
        reads = []
        for rank in range(2):
            got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)[sharding]
            read = set(got["names"])
            assert dense <= read and len(got["names"]) == len(read), (sharding, rank)  # nothing read twice
            layers = {int(name.split(".")[3]): ids for name, ids in got["owned"].items()}
            if family == "deepseek_v3":  # one tensor per expert on disk: exactly the owned experts' tensors
                want = set().union(*(_expert_keys(disk, layer, ids) for layer, ids in layers.items()))
                assert read - dense == want and not got["rows"], (sharding, rank)
                assert got["bytes"] == sum(nbytes[n] for n in read)
            else:  # fused [E, ...] per layer on disk: exactly the owned rows of each
                assert read - dense == {n for n in experts if layers.get(int(n.split(".")[2]))}
                for name, ids in got["rows"].items():
                    assert ids == layers[int(name.split(".")[2])], (sharding, rank, name)
                expert_bytes = sum(nbytes[n] * len(ids) // disk[n][0][0] for n, ids in got["rows"].items())
                assert got["bytes"] == sum(nbytes[n] for n in dense) + expert_bytes
            assert got["bytes"] < sum(nbytes.values())  # never the whole model
            reads.append(read - dense)
            for name, t in got["state"].items():  # the one-process load's weights, this rank's rows of the experts
                ids = got["owned"].get(name)
                assert torch.equal(t, reference[name] if ids is None else reference[name][ids]), (sharding, name)
        if family == "deepseek_v3":
            assert reads[0].isdisjoint(reads[1]) and reads[0] and reads[1], sharding


def test_a_mapping_that_mixes_experts_reads_them_all_with_a_warning(tmp_path):
    """Reading rows by expert is chosen from the converter's ops; any op that may mix experts (dim 0, or a
    Transpose that checks the full shape) reads the whole tensor, warns, and gives the same rows."""
    from transformers.core_model_loading import Concatenate, Interleave, MergeModulelist, Transpose, WeightConverter

    from moesys.hf.hf_model_load import HFModelLoader, _how, _Target
    per_expert = WeightConverter(["e.*.g.weight", "e.*.u.weight"], "e.gate_up_proj",
                                 operations=[MergeModulelist(dim=0), Concatenate(dim=1)])
    assert _how(_Target(per_expert)) == "per_expert" and _how(_Target(None)) == "rows"
    assert _how(_Target(WeightConverter("e.w13", "e.gate_up_proj", operations=[Interleave(dim=1)]))) == "rows"
    assert _how(_Target(WeightConverter("e.w", "e.down_proj", operations=[Transpose(1, 2, check_dims=True)]))) == "whole"
    assert _how(_Target(WeightConverter("e.w", "e.down_proj", operations=[Concatenate(dim=0)]))) == "whole"
    loader = HFModelLoader(_config(deepseek_v3(tmp_path / "src")))
    name = "model.layers.1.mlp.experts.gate_up_proj"
    assert loader.targets[name].how == "per_expert"
    rows = loader.expert_rows(name, [1, 6])
    loader.targets[name].how = "whole"
    with pytest.warns(UserWarning, match="reads all 8 experts"):
        assert torch.equal(loader.expert_rows(name, [1, 6]), rows)


def test_rows_reads_only_the_rows_asked_for(tmp_path):
    """FSSDP may own experts that are not consecutive: one slice per run of ids, bytes counted."""
    from safetensors.torch import save_file

    from moesys.hf.load import CountingReader
    full = torch.randn(6, 3, 5)
    save_file({"w": full}, str(tmp_path / "model.safetensors"))
    reader = CountingReader({"w": (tmp_path / "model.safetensors", 0)})
    assert torch.equal(reader.rows("w", [0, 2, 3]), full[[0, 2, 3]])
    assert reader.rows("w", []).shape == (0, 3, 5)
    assert reader.rows_read == {"w": [0, 2, 3]} and reader.bytes_read == 3 * 3 * 5 * 4

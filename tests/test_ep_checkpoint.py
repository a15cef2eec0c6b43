"""Checkpoint resharding by global expert id (moesys.checkpoint's split/merge with the EP handle's offsets
and gathers): state saved with ep=4, 2 or 8 loads with any other ep or into the one-process model and
gives back the original weights and outputs; 4 gloo processes, and single-process layouts of ep=8."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from moesys.checkpoint import merge_experts, split_experts
from moesys.config import ModelConfig, MoEConfig, ParallelConfig
from moesys.models.transformer import MoETransformer
from moesys.parallel import parallelize
from moesys.parallel.mesh import EPMesh
from moesys.parallel.testing import spawn

E = 8


def _model(seed: int) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(ModelConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                                      ffn_size=16, max_seq_len=16),
                          MoEConfig(num_experts=E, top_k=2, ffn_size=8, expert_bias=True, shared_ffn_size=8,
                                    backend="grouped_mm"))


def _fake_mesh(ep: int, ep_rank: int) -> EPMesh:
    """The layout of one rank of an ep-way run, without processes (splitting and merging don't communicate)."""
    return EPMesh(ep, ep_rank, ep, ep_rank, 0, None, None, timedelta(seconds=60))


def _save(model, handle) -> dict:
    return split_experts(model.state_dict(), expert_offset=handle.expert_offset)


def _load(model, handle, flat: dict) -> None:
    model.load_state_dict(merge_experts(flat, model.state_dict(), expert_ids=handle.local_expert_ids))


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(a.keys() ^ b.keys())[:4]}"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def test_ep8_layout_round_trips_through_one_process():
    ref = _model(0).state_dict()
    flat = {}
    for r in range(8):
        m = _model(0)
        handle = parallelize(m, ParallelConfig(ep=8), mesh=_fake_mesh(8, r))
        assert [mod.global_expert_ids for mod in handle.ep_experts().values()] == [[r], [r]]
        assert handle.expert_offset == r
        flat.update(_save(m, handle))
    plain = _model(1)
    plain.load_state_dict(merge_experts(flat, plain.state_dict()))
    _assert_same(plain.state_dict(), ref, "ep=8 -> one process")
    for ep in (8, 4):                     # and back: one process -> ranks of ep=8 and ep=4 runs
        for r in range(ep):
            m = _model(2)
            handle = parallelize(m, ParallelConfig(ep=ep), mesh=_fake_mesh(ep, r))
            _load(m, handle, split_experts(plain.state_dict()))
            L = E // ep
            _assert_same(m.state_dict(), handle.local_expert_state(ref), f"one process -> ep={ep} rank {r}")
            for k, v in m.state_dict().items():
                want = ref[k][r * L:(r + 1) * L] if ".experts." in k else ref[k]
                assert torch.equal(v, want), f"one process -> ep={ep} rank {r}: {k}"


def test_missing_expert_is_named():
    flat = split_experts(_model(0).state_dict())
    del flat["blocks.1.ffn.experts.5.down_proj"]
    m = _model(1)
    handle = parallelize(m, ParallelConfig(ep=2), mesh=_fake_mesh(2, 1))
    with pytest.raises(ValueError, match="blocks.1.ffn.experts.5.down_proj"):
        _load(m, handle, flat)


def _reshard(rank, world, tmp):
    ref = _model(0)
    tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        ref_logits = ref(tokens).logits
    ref_sd = ref.state_dict()

    def save(model, handle, tag):
        if handle.mesh.dp_rank == 0:      # one replica of every expert is enough
            torch.save(_save(model, handle), f"{tmp}/{tag}_rank{rank}.pt")
        torch.distributed.barrier()

    def load_all(tag):
        out = {}
        for r in range(world):
            try:
                out.update(torch.load(f"{tmp}/{tag}_rank{r}.pt"))
            except FileNotFoundError:
                pass
        return out

    a = _model(0)
    save(a, parallelize(a, ParallelConfig(ep=4)), "ep4")
    for ep in (2, 4, 1):
        b = _model(10 + ep)
        hb = parallelize(b, ParallelConfig(ep=ep))
        _load(b, hb, load_all("ep4"))
        _assert_same(hb.gather_expert_state(b.state_dict()), ref_sd, f"ep=4 -> ep={ep}")
        with torch.no_grad():
            torch.testing.assert_close(b(tokens).logits, ref_logits, rtol=1e-5, atol=1e-6)
        if ep == 2:
            save(b, hb, "ep2")
    c = _model(20)
    hc = parallelize(c, ParallelConfig(ep=4))
    _load(c, hc, load_all("ep2"))
    _assert_same(hc.gather_expert_state(c.state_dict()), ref_sd, "ep=2 -> ep=4")
    plain = _model(30)
    plain.load_state_dict(merge_experts(load_all("ep2"), plain.state_dict()))
    _assert_same(plain.state_dict(), ref_sd, "ep=2 -> one process")


@pytest.mark.slow
def test_resharding_across_ep_4_ranks(tmp_path):
    spawn(_reshard, 4, str(tmp_path))

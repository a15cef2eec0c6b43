"""Expert parallelism with data parallelism across it (4 gloo ranks, ep=2, dp=2) against one process
that trains on the same global batch: the clipped gradient norm and gradients, and a checkpoint
written and resumed by the 4 ranks giving each rank back its own weights and AdamW state slice."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from moesys import checkpoint as ckpt
from moesys.config import ModelConfig, MoEConfig, ParallelConfig
from moesys.models.transformer import MoETransformer
from moesys.parallel import parallelize
from moesys.parallel.mesh import EPMesh
from moesys.parallel.testing import spawn

E, MAX_NORM = 4, 0.05


def _model(seed: int) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(ModelConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                                      ffn_size=16, max_seq_len=16),
                          MoEConfig(num_experts=E, top_k=2, ffn_size=8, shared_ffn_size=8, backend="grouped_mm"))


def _batches(world: int) -> torch.Tensor:
    return torch.randint(0, 32, (world, 2, 9), generator=torch.Generator().manual_seed(7))


def _state_of(opt, model) -> dict[str, dict[str, torch.Tensor]]:
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


def _ep2_dp2(rank, world, tmp):
    tokens = _batches(world)
    # The reference: one process, the mean loss over all ranks' micro-batches, torch's clip.
    ref = _model(0)
    sum(ref(t[:, :-1], t[:, 1:]).loss for t in tokens).div(world).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
    assert float(ref_norm) > 4 * MAX_NORM  # the clip is active

    model = _model(0)
    handle = parallelize(model, ParallelConfig(ep=2))
    assert (handle.mesh.dp, handle.mesh.ep_rank, handle.mesh.dp_rank) == (2, rank % 2, rank // 2)
    t = tokens[rank]
    model(t[:, :-1], t[:, 1:]).loss.backward()
    handle.reduce_gradients()
    norm = handle.clip_grad_norm_(MAX_NORM)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
    local = slice(handle.expert_offset, handle.expert_offset + E // 2)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        want = ref_params[name].grad[local] if ".experts." in name else ref_params[name].grad
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-7, msg=lambda m: f"rank {rank} {name}: {m}")

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt.step()
    saved = ckpt.save_checkpoint(tmp, 1, model=model, optimizer=opt, manifest={}, rank=rank, world_size=world,
                                 device=torch.device("cpu"), barrier=dist.barrier, ep=handle)
    fresh = _model(1)
    fresh_handle = parallelize(fresh, ParallelConfig(ep=2))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    ckpt.load_checkpoint(saved, model=fresh, optimizer=fresh_opt, rank=rank, device=torch.device("cpu"),
                         ep=fresh_handle)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), f"rank {rank}: {k}"
    want, got = _state_of(opt, model), _state_of(fresh_opt, fresh)
    assert want.keys() == got.keys()
    for name in want:
        for key in want[name]:
            assert torch.equal(got[name][key], want[name][key]), f"rank {rank}: {key} of {name}"


@pytest.mark.slow
def test_ep2_dp2_clips_like_one_process_and_resumes_each_ranks_slice(tmp_path):
    spawn(_ep2_dp2, 4, str(tmp_path))


def _missing_grads(rank, world):
    model = _model(0)
    handle = parallelize(model, ParallelConfig(ep=2))
    for p in model.parameters():
        p.grad = torch.full_like(p, rank + 1.0)
    dense, expert = handle.dense_parameters(), handle.expert_parameters()
    if rank == 1:  # no gradient here for one dense and one expert tensor (e.g. unused this step)
        dense[0].grad = expert[0].grad = None
    handle.reduce_gradients()
    # Dense: the world mean, a missing gradient counting as 0; experts (ep=2, dp=1): own / world.
    assert torch.equal(dense[0].grad, torch.full_like(dense[0], 0.5))
    assert all(torch.equal(p.grad, torch.full_like(p, 1.5)) for p in dense[1:])
    assert torch.equal(expert[0].grad, torch.full_like(expert[0], 0.0 if rank == 1 else 0.5))
    assert all(torch.equal(p.grad, torch.full_like(p, (rank + 1) / 2)) for p in expert[1:])


@pytest.mark.slow
def test_missing_gradients_count_as_zeros_in_the_reduction():
    """A rank without a gradient for some tensor still takes part in every all-reduce with the same sizes."""
    spawn(_missing_grads, 2)


def test_local_expert_state_slices_by_ep_rank_not_global_rank():
    """Rank 3 of a 4-rank ep=2 job (ep_rank 1, dp_rank 1) holds experts 2 and 3 and their state."""
    model = _model(0)
    mesh = EPMesh(4, 3, 2, 1, 1, None, None, timedelta(seconds=60))
    handle = parallelize(model, ParallelConfig(ep=2), mesh=mesh)
    assert handle.local_expert_ids("blocks.0.ffn.experts.down_proj") == [2, 3] and handle.expert_offset == 2
    full = torch.arange(E * 3.0).view(E, 3)
    state = {"exp_avg/blocks.0.ffn.experts.down_proj": full, "exp_avg/embed.weight": full}
    out = handle.local_expert_state(state, param_name=lambda k: k.split("/", 1)[1])
    assert torch.equal(out["exp_avg/blocks.0.ffn.experts.down_proj"], full[2:4])
    assert out["exp_avg/embed.weight"] is full


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_only_ep_above_one_shards_experts(ep):
    """The trainer reduces expert gradients over their replicas only (and takes the norm over all ranks'
    experts) when `shards_experts`; with ep=1 every rank holds every expert."""
    mesh = EPMesh(ep, 0, ep, 0, 0, None, None, timedelta(seconds=60))
    assert parallelize(_model(0), ParallelConfig(ep=ep), mesh=mesh).shards_experts == (ep > 1)


def test_grad_norm_without_gradients_is_a_zero_on_the_models_device():
    """Before any backward the norm is 0 on the parameters' device (meta here; a CUDA model's norm must
    not land on the host), not a host tensor."""
    model = _model(0).to("meta")
    handle = parallelize(model, ParallelConfig(ep=1), mesh=EPMesh(1, 0, 1, 0, 0, None, None, timedelta(seconds=60)))
    norm = handle.grad_norm()
    assert norm.device.type == "meta" and norm.shape == ()


def test_gradient_buckets_split_at_the_byte_bound_and_at_each_dtype_or_device_change():
    """The flat all-reduce buffers: consecutive parameters of one dtype and device, at most _BUCKET_BYTES
    each (a bucket may fill it exactly; a parameter past it starts the next). Meta tensors: only sizes,
    dtypes and devices are read."""
    from moesys.parallel.handle import _BUCKET_BYTES, _buckets

    def p(n, dtype=torch.float32, device="meta"):
        return torch.empty(n, dtype=dtype, device=device)

    n = _BUCKET_BYTES // 4  # float32 elements in a full bucket
    params = [p(1), p(1), p(n - 2),         # 4 + 4 + the rest: exactly full
              p(1), p(n),                   # a full-size tensor after a small one: a bucket of its own
              p(1), p(n - 1),               # exactly full again, after a split
              p(1, torch.bfloat16), p(1, torch.bfloat16), p(1), p(1, device="cpu")]
    index = {id(t): i for i, t in enumerate(params)}
    got = [[index[id(t)] for t in b] for b in _buckets(params)]
    assert got == [[0, 1, 2], [3], [4], [5, 6], [7, 8], [9], [10]]
    assert list(_buckets([])) == []

"""moesys.offload.dequant_slots: the Triton kernel that dequantizes cache slots straight from the pool
(TRITON_INTERPRET=1 on a CPU, CUDA on a GPU) equals the torch reference bit for bit. One exception: Triton's
interpreter rounds float32 -> bfloat16 by truncation (a GPU, and torch, round to nearest even), so there
bf16 results may sit up to two bf16 steps off (two roundings); everywhere else, and in float32, they are equal."""

import pytest
import torch

from moesys.offload import quant
from moesys.offload.dequant_slots import dequantize_slots, dequantize_slots_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pool(mode: str, S: int, R: int, C: int, group_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(S, R, C, generator=g) * torch.rand(S, R, 1, generator=g) * 3  # scales differ by row
    qs, ss = zip(*(quant.quantize(w[s], mode, group_size=group_size) for s in range(S)))
    return torch.stack(qs), torch.stack(ss)


@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("R,C,group", [(37, 36, 12), (19, 300, 100)])  # odd rows; C past one block (int4: 150 bytes)
def test_kernel_equals_the_reference_bit_for_bit(mode, dtype, R, C, group):
    q, scale = _pool(mode, 5, R, C, group)
    assert scale.shape[-1] == C // group
    slots = torch.tensor([3, 0, 3, 4, 1])  # repeated and out of order
    want = dequantize_slots_reference(q, scale, slots, mode, dtype)
    # the reference is quant.dequantize of the gathered slots (what the engine computed before)
    assert torch.equal(want, quant.dequantize(q[slots], scale[slots], mode, dtype))
    got = dequantize_slots(q.to(DEVICE), scale.to(DEVICE), slots.to(DEVICE), mode, dtype, use_kernel=True)
    assert got.shape == (5, R, C) and got.dtype == dtype
    if dtype == torch.bfloat16 and DEVICE == "cpu":  # the interpreter's truncating bf16 rounding
        step = want.float().abs() * 2.0 ** -6  # two roundings (the scale, the product), one step each
        assert ((got.float() - want.float()).abs() <= step).all()
        assert (got.float() - want.float()).abs().sum() > 0  # truncation, as said (else this test is stale)
        got = dequantize_slots(q.to(DEVICE), scale.to(DEVICE), slots.to(DEVICE), mode, torch.float32,
                               use_kernel=True)
        want = dequantize_slots_reference(q, scale, slots, mode, torch.float32)
    assert torch.equal(got.cpu(), want)


def test_no_slots_and_bad_input():
    q, scale = _pool("int4", 2, 4, 8, 4)
    empty = dequantize_slots(q.to(DEVICE), scale.to(DEVICE), torch.tensor([], dtype=torch.int64, device=DEVICE),
                             "int4", torch.bfloat16, use_kernel=True)
    assert empty.shape == (0, 4, 8)
    with pytest.raises(ValueError, match="mode='none'"):
        dequantize_slots(q, scale, torch.tensor([0]), "none", torch.bfloat16)
    # the CPU default is the reference (no kernel on CPU tensors unless asked)
    assert torch.equal(dequantize_slots(q, scale, torch.tensor([1]), "int4", torch.float32),
                       quant.dequantize(q[1:2], scale[1:2], "int4", torch.float32))

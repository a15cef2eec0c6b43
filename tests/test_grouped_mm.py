"""The grouped_mm backend's routing helpers (moesys/backends/grouped_mm.py): `sort_by_expert` at the
expert counts where its sort key changes width (the largest id must survive the narrow key), against
a plain stable sort of the int64 ids; the choice between `F.grouped_mm` and the per-expert loop; the
keyword-only options. The backend's math is tested against the oracle in test_ops.py."""

from types import SimpleNamespace

import pytest
import torch

from moesys.activations import apply_activation
from moesys.backends.grouped_mm import (_native_grouped_mm_ok, grouped_experts, grouped_linear, inverse_permutation,
                                        moe_mlp_grouped_mm, sort_by_expert)


@pytest.mark.parametrize("E", [1, 3, 256, 257, 2**15, 2**15 + 1])
def test_sort_by_expert_keeps_the_largest_expert_id(E):
    # the highest and lowest ids, a middle one, repeated (a uint8 key would wrap id 256 to 0)
    ids_TK = torch.tensor([[E - 1, 0], [E // 2, E - 1], [0, E // 2], [E - 1, E - 1]])
    perm_N, sorted_ids_N, offsets_E = sort_by_expert(ids_TK, E)
    want_ids_N, want_perm_N = torch.sort(ids_TK.reshape(-1), stable=True)
    assert torch.equal(sorted_ids_N, want_ids_N) and sorted_ids_N.dtype == torch.int64
    assert torch.equal(perm_N, want_perm_N)
    want_offsets_E = torch.bincount(ids_TK.reshape(-1), minlength=E).cumsum(0)
    assert offsets_E.dtype == torch.int32 and torch.equal(offsets_E.long(), want_offsets_E)
    assert torch.equal(inverse_permutation(perm_N)[perm_N], torch.arange(perm_N.numel()))


def _like(device, dtype, shape):
    """What `_native_grouped_mm_ok` reads of a tensor (no CUDA needed to ask about a CUDA one)."""
    return SimpleNamespace(device=torch.device(device), dtype=dtype, shape=torch.Size(shape),
                           element_size=lambda: torch.empty(0, dtype=dtype).element_size())


@pytest.mark.parametrize("device,dtype,a_NK,w_EMK,native", [
    ("cpu", torch.float32, (5, 8), (3, 12, 8), True),  # K, M 16-byte multiples; N = 5 and E = 3 do not count
    ("cpu", torch.bfloat16, (5, 8), (3, 16, 8), True),
    ("cpu", torch.float16, (7, 24), (1, 8, 24), True),
    ("cpu", torch.float64, (5, 8), (3, 12, 8), False),
    ("cpu", torch.float32, (5, 6), (3, 12, 6), False),  # K = 6: 24 bytes
    ("cpu", torch.float32, (5, 8), (3, 6, 8), False),  # M = 6
    ("cpu", torch.bfloat16, (5, 4), (3, 16, 4), False),  # K = 4: 8 bytes
    ("cuda", torch.float32, (5, 8), (3, 12, 8), False),  # CUDA's kernels take bf16 only
    ("cuda", torch.bfloat16, (5, 8), (3, 16, 8), True),
    ("cuda", torch.bfloat16, (5, 8), (3, 12, 8), False),
])
def test_native_grouped_mm_for_its_dtypes_and_16_byte_rows_only(device, dtype, a_NK, w_EMK, native):
    """`F.grouped_mm` (no host sync) where it takes the dtype and every row is a 16-byte multiple; elsewhere
    the per-expert loop. The row counts N and the expert count E need no alignment."""
    assert _native_grouped_mm_ok(_like(device, dtype, a_NK), _like(device, dtype, w_EMK)) is native


def test_grouped_linear_with_no_experts_is_empty():
    out = grouped_linear(torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, 5, 6, dtype=torch.float64),
                         torch.zeros(0, dtype=torch.int32))
    assert out.shape == (0, 5) and out.dtype == torch.float64


def test_backend_options_are_keyword_only():
    x, w_gate_up, w_down = torch.randn(2, 8), torch.randn(3, 8, 8), torch.randn(3, 8, 4)
    ids, weights = torch.tensor([[0, 1], [2, 0]]), torch.rand(2, 2)
    with pytest.raises(TypeError):
        moe_mlp_grouped_mm(x, w_gate_up, w_down, ids, weights, "silu")
    with pytest.raises(TypeError):
        grouped_experts(x, w_gate_up, w_down, ids, weights, lambda h: apply_activation(h, "silu"), torch.zeros(3, 8))
    y = moe_mlp_grouped_mm(x, w_gate_up, w_down, ids, weights, activation="silu")
    assert y.shape == (2, 8)

"""The grouped_mm backend's routing helpers (moesys/backends/grouped_mm.py): `sort_by_expert` at the
expert counts where its sort key changes width (the largest id must survive the narrow key), against
a plain stable sort of the int64 ids. The backend's math is tested against the oracle in test_ops.py."""

import pytest
import torch

from moesys.backends.grouped_mm import inverse_permutation, sort_by_expert


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

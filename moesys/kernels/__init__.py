"""moesys.kernels: Triton expert kernels (ScatterMoE-style grouped GEMMs with fused epilogues) and
their torch custom-op / autograd wrappers. Backend "triton" of `moesys.ops.moe_mlp`.

Importing this registers the custom ops `moesys::moe_mlp_triton_up`, `_down` and their backward ops.
Triton decides at import whether the kernels run compiled (CUDA) or in its CPU interpreter
(TRITON_INTERPRET=1), so set that variable before importing.
"""

from moesys.kernels.moe_mlp import moe_mlp_triton, unavailable_reason

__all__ = ["moe_mlp_triton", "unavailable_reason"]

"""moesys: Mixture-of-Experts training and inference for PyTorch.

Importing moesys changes nothing in other libraries; integrations register explicitly
(`moesys.integrations.transformers.register()`).
"""

from moesys.ops import moe_mlp

__version__ = "0.1.0"
__all__ = ["moe_mlp", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import moesys` stays cheap: the upcycler pulls in transformers only when used.
    if name == "upcycle":
        from moesys.upcycling import upcycle

        return upcycle
    raise AttributeError(f"module 'moesys' has no attribute {name!r}")

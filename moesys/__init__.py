"""moesys: Mixture-of-Experts training and inference for PyTorch.

Importing moesys changes nothing in other libraries; integrations register explicitly
(`moesys.integrations.transformers.register()`).
"""

__version__ = "0.1.0"
__all__ = ["moe_mlp", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import moesys` (and with it `moesys.cli`, the command's entry point) imports neither torch
    # nor transformers: the command handles Ctrl-C before its first heavy import, and the upcycler pulls in
    # transformers only when used.
    if name == "moe_mlp":
        from moesys.ops import moe_mlp

        return moe_mlp
    if name == "upcycle":
        from moesys.upcycling import upcycle

        return upcycle
    raise AttributeError(f"module 'moesys' has no attribute {name!r}")

"""Shared test setup: Triton runs in its interpreter on machines without a GPU."""

import os

import torch

if not torch.cuda.is_available():
    # Triton reads this when a kernel is decorated, so it must be set before moesys.kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/peer runs transformers' own test suites against moesys (opt-in: python tests/peer/run.py).
collect_ignore = ["peer"]

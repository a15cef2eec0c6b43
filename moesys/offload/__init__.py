"""Offloaded MoE inference: non-expert weights on the GPU, experts in host memory, a GPU expert cache,
copies on a side stream, speculative next-layer prefetch (docs/ARCHITECTURE.md, contracts, "Offload API").

    model = moesys.offload.load(MODEL_DIR, gpu_memory="16GiB")
    model.generate(...)
    print(model.moesys_offload.snapshot().summary())
    for result in moesys.offload.generate_batch(model, prompts, max_new_tokens=64, batch_size=16): ...
"""

from moesys.offload.batch import Request, Result, generate_batch
from moesys.offload.loader import MemoryPlan, build, load, plan_memory
from moesys.offload.sizes import parse_bytes
from moesys.offload.stats import OffloadStats

__all__ = ["load", "generate_batch", "Request", "Result", "build", "plan_memory", "MemoryPlan", "OffloadStats", "parse_bytes"]

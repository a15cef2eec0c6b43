"""What backend="auto" resolves to: one table of thresholds, kept here so that a benchmark sweep
(`python bench/moe_layer.py --sweep-auto`) can rewrite it from measurements.

The choice is between cuBLAS's grouped GEMM ("grouped_mm") and our Triton kernels ("triton"). Per call
it depends on the routed rows per expert, N/E = T*K/E (the average height of each expert's GEMM: the one
number that says whether a call is launch/latency bound, where grouped_mm's fewer, cheaper launches win,
or compute bound, where the fused Triton kernels win), and on whether a backward will follow (training
amortises the Triton kernels' extra launch cost over three GEMMs per projection and profits from their
fused gather/scatter). Legend: T tokens, K top-k, E experts, N = T*K routed rows.
"""

from __future__ import annotations

# mode -> the smallest routed rows per expert (T*K/E) at which "auto" takes "triton" on CUDA; below it,
# "grouped_mm". "inference": no gradient needed (eager or CUDA-graph decode, prefill); "training": a
# backward follows. Priors, to be replaced by the H200 sweep's suggestion (bench/moe_layer.py
# --sweep-auto prints a table in this form): decode (Qwen3-30B-A3B at T=64 is 4 rows per expert) measured
# 0.52 ms with grouped_mm against 1.16 ms with Triton.
AUTO_TRITON_MIN_ROWS_PER_EXPERT: dict[str, float] = {
    "inference": 32.0,
    "training": 4.0,
}


def auto_mode(needs_grad: bool) -> str:
    return "training" if needs_grad else "inference"


def pick_auto(rows_per_expert: float, needs_grad: bool, triton_ok: bool,
              thresholds: dict[str, float] | None = None) -> str:
    """The backend "auto" means for a call with `rows_per_expert` = T*K/E routed rows per expert.
    `triton_ok`: the Triton kernels can run on these inputs (CUDA, a supported dtype); otherwise
    grouped_mm, whatever the size. `thresholds` defaults to AUTO_TRITON_MIN_ROWS_PER_EXPERT."""
    table = AUTO_TRITON_MIN_ROWS_PER_EXPERT if thresholds is None else thresholds
    if not triton_ok:
        return "grouped_mm"
    return "triton" if rows_per_expert >= table[auto_mode(needs_grad)] else "grouped_mm"

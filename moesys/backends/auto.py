"""What backend="auto" resolves to: one table of thresholds, kept here so that a benchmark sweep
(`python bench/moe_layer.py --sweep-auto`) can rewrite it from measurements.

The choice is between cuBLAS's grouped GEMM ("grouped_mm") and our Triton kernels ("triton"). Per call
it depends on the routed rows per expert, N/E = T*K/E (the average height of each expert's GEMM: the one
number that says whether a call is launch/latency bound, where grouped_mm's fewer, cheaper launches win,
or compute bound, where the fused Triton kernels win), on whether a backward will follow (training
amortises the Triton kernels' extra launch cost over three GEMMs per projection and profits from their
fused gather/scatter), and on whether the call is being captured into a CUDA graph (its own entry in
the table: Triton's kernels, launched from a graph, no longer pay their host-side launch cost).
Legend: T tokens, K top-k, E experts, N = T*K routed rows.
"""

from __future__ import annotations

# mode -> the smallest routed rows per expert (T*K/E) at which "auto" takes "triton" on CUDA; below it,
# "grouped_mm". "graph": no gradient, the call is being captured into a CUDA graph; "inference": no
# gradient, eager (decode through transformers, prefill): below a few hundred rows per expert a call is
# bound by its host-side launch cost, lower for grouped_mm; "training": a backward follows.
# Measured by `bench/moe_layer.py --sweep-auto` on one H100 (torch 2.11, triton 3.6) at 40a1754, Qwen3-30B-A3B
# and OLMoE expert shapes, T = 1 .. 16384 (bench/results/moe_auto_sweep_h100_40a1754.json): eager,
# grouped_mm faster up to 128 rows per expert and Triton from 256; training, grouped_mm faster up to 64 and
# Triton from 128. Each threshold is the geometric midpoint between the two measured sizes (the sweep's
# suggestion). Under capture Triton was 1.24-1.81x faster at every point, so "graph" takes it at every size,
# but only for a call whose Triton kernels already ran outside a capture (`triton_ready`): inside a capture
# Triton can neither load a kernel it has not loaded yet (cuModuleLoadData is refused while a stream
# captures) nor time its tile configs. An eager warm-up inside `moesys.backends.capture_warmup()` runs them.
AUTO_TRITON_MIN_ROWS_PER_EXPERT: dict[str, float] = {
    "graph": 0.0,
    "inference": 181.0,
    "training": 90.5,
}


def auto_mode(needs_grad: bool, capturing: bool = False) -> str:
    if needs_grad:
        return "training"
    return "graph" if capturing else "inference"


def pick_auto(rows_per_expert: float, needs_grad: bool, triton_ok: bool,
              thresholds: dict[str, float] | None = None, capturing: bool = False, triton_ready: bool = False) -> str:
    """The backend "auto" means for a call with `rows_per_expert` = T*K/E routed rows per expert.
    `triton_ok`: the Triton kernels can run on these inputs (CUDA, a supported dtype); otherwise
    grouped_mm, whatever the size. `capturing`: the call is being captured into a CUDA graph; Triton is then
    taken only if `triton_ready` (this exact call's kernels ran outside a capture: loaded and tuned), else
    the capture would fail. `thresholds` defaults to AUTO_TRITON_MIN_ROWS_PER_EXPERT."""
    table = AUTO_TRITON_MIN_ROWS_PER_EXPERT if thresholds is None else thresholds
    mode = auto_mode(needs_grad, capturing)
    if not triton_ok or (mode == "graph" and not triton_ready):
        return "grouped_mm"
    return "triton" if rows_per_expert >= table[mode] else "grouped_mm"

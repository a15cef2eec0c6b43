"""Predict the rows of a recorded bench/offload_batch.py run again with the current performance model
(moesys.offload.perf_model), fitted the way the bench fits it, on that run's own measurements only: the
all-resident rows (per-step and per-row overheads), the uniform calibration rows (per host-routed layer at
the smallest batch, per dequantization wave at the next), then every offloaded row from its measured copy
hit rate and prefetched share. So a change to the model can be checked against GPU rows already recorded,
without a GPU.

    PYTHONPATH=.:bench python bench/offload_batch_repredict.py bench/results/offload_batch_int4_h100_96ed0f8.json \
        [--out FILE.json]

Rows recorded before the bench wrote each row's Workload (runs before 5e33710) get it rebuilt from their
shape (olmoe-1b-7b, qwen3-30b-a3b, the --smoke shapes), budget, precision and cache size; their calibration
rows, which did not record their prefetched share, take the share of the uniform row at the same batch.
Printed per row: measured tok/s, predicted, and predicted / measured - 1.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from moesys.offload import perf_model as pm
from run_meta import write_json


def config_of(shape: str):
    from offload import olmoe_config, qwen3_config

    if shape == "olmoe-1b-7b":
        return olmoe_config()
    if shape.startswith("qwen3-30b-a3b"):
        return qwen3_config(tiny=shape.endswith("-smoke"))
    if shape == "smoke-olmoe":
        from offload_batch import smoke_config

        return smoke_config()
    raise SystemExit(f"{shape!r}: no config known for this shape; record the run with a newer bench/offload_batch.py")


def workload_of_row(row: dict) -> pm.Workload:
    if "workload" in row:
        return pm.Workload.from_record(row["workload"])
    smoke = "smoke" in row["shape"]  # the --smoke runs: float32 on the CPU
    context = row["prompt_tokens"] + row["new_tokens"]
    w = pm.workload_before_load(config_of(row["shape"]), torch.float32 if smoke else torch.bfloat16, row["budget"],
                                context, quantize_experts=row["quantize"], device="cpu" if smoke else "cuda")
    return replace(w, cache_policy=row.get("cache_policy", w.cache_policy))


def copy_hit_rate(row: dict, w: pm.Workload) -> float:
    """1 - the row's copies per step / the model's lookups per step (MoE layers x unique experts at its batch),
    from its copied bytes; the recorded copy_hit_rate where it did not record them."""
    if "bytes_copied_per_token" not in row:
        return row["copy_hit_rate"]
    unique = pm.RoutingStats.uniform(w.num_experts, w.top_k).unique(row["batch"])
    return 1 - row["bytes_copied_per_token"] * row["batch"] / w.expert_bytes / (w.num_layers * unique)


def repredict(rows: list[dict], device_batch_row: int | None = None) -> list[dict]:
    """One record per offloaded row: measured, predicted with the current model, the error. A row's copy hit
    rate is taken from its copied bytes (rows recorded before it could go below 0 were clipped there).
    `device_batch_row`: for a run recorded before the bench calibrated the device path above batch 1, fit that
    cost (perf_model.device_batch_layer_overhead_s) on the run's uniform device row at this batch instead; that
    row is then fitted, not predicted (its record says so: `fitted_on_this_row`)."""
    main = [r for r in rows if r["impl"] == "moesys" and "error" not in r and not r.get("graph_section")]
    if not main:
        raise SystemExit("no offloaded rows (impl 'moesys') in this file")
    out = []
    for quantize in dict.fromkeys(r["quantize"] for r in main):
        mine = [r for r in main if r["quantize"] == quantize]
        w, slots = workload_of_row(mine[0]), mine[0]["cache_slots"]
        context = mine[0].get("context", mine[0]["prompt_tokens"] + mine[0]["new_tokens"] // 2)
        base = {k: v for k, v in mine[0]["hardware"].items() if k in pm.Hardware.__dataclass_fields__}
        hw = replace(pm.Hardware(**base), step_overhead_s=0.0, row_overhead_s=0.0)
        impl = next(r["experts_implementation"] for r in rows if r["impl"] == "moesys-all-resident")
        resident = {r["batch"]: r["batch"] / r["tokens_per_s"] for r in rows
                    if r["impl"] == "moesys-all-resident" and r["experts_implementation"] == impl}
        hw = pm.calibrate(w, hw, resident, context)
        uniform_share = {r["batch"]: r["prefetched_share"] for r in mine if r["routing"] == "uniform"}
        for cal in sorted((r for r in rows if r["impl"] == "moesys-calibration" and r["quantize"] == quantize),
                          key=lambda r: r["batch"]):
            B = cal["batch"]
            share = cal.get("prefetched_share", uniform_share.get(B, 0.0))
            uni = pm.RoutingStats.uniform(w.num_experts, w.top_k).with_prefetched_share(share)
            if cal.get("fitted", "calibrate_miss") in ("calibrate_miss", "calibrate_layers"):
                hw = pm.calibrate_layers(w, hw, uni, B, context, slots, B / cal["tokens_per_s"],
                                         path=cal.get("bookkeeping", "host"))
            else:
                hw = pm.calibrate_waves(w, hw, uni, B, context, slots, B / cal["tokens_per_s"])
        device = [r for r in mine if r.get("bookkeeping") == "device"]
        calibrated = [r for r in rows if r["impl"] == "moesys-calibration" and r["quantize"] == quantize
                      and r.get("bookkeeping") == "device"]
        if device and not calibrated:  # recorded before the bench calibrated the device path: its smallest
            cal = min((r for r in device if r["routing"] == "uniform"), key=lambda r: r["batch"])  # uniform row
            uni = (pm.RoutingStats.uniform(w.num_experts, w.top_k).with_engine_hit_rate(slots, cal["copy_hit_rate"])
                   .with_prefetched_share(cal["prefetched_share"]))
            hw = pm.calibrate_layers(w, hw, uni, cal["batch"], context, slots, cal["batch"] / cal["tokens_per_s"],
                                     path="device")

        def routing_of(r):
            return (pm.RoutingStats.uniform(w.num_experts, w.top_k)
                    .with_engine_hit_rate(slots, copy_hit_rate(r, w)).with_prefetched_share(r["prefetched_share"]))

        fit_row = None
        if device_batch_row is not None and device_batch_row > 1:
            fit_row = next((r for r in device if r["routing"] == "uniform" and r["batch"] == device_batch_row), None)
            if fit_row is None:
                raise SystemExit(f"--device-batch-row {device_batch_row}: no uniform device row at that batch")
            hw = pm.calibrate_layers(w, hw, routing_of(fit_row), device_batch_row, context, slots,
                                     device_batch_row / fit_row["tokens_per_s"], path="device")
        for r in mine:
            routing = routing_of(r)
            path = "device" if r.get("bookkeeping") == "device" else "host"
            p = pm.predict(w, hw, routing, r["batch"], context, slots=slots, path=path)
            out.append(dict(quantize=quantize, routing=r["routing"], batch=r["batch"], bookkeeping=path,
                            fitted_on_this_row=r is fit_row,
                            tokens_per_s=r["tokens_per_s"],
                            predicted=p["tokens_per_s"], error=p["tokens_per_s"] / r["tokens_per_s"] - 1,
                            copy_s=p["copy_s"], compute_s=p["compute_s"], prefetched_share=r["prefetched_share"],
                            hardware=hw.__dict__))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a JSON file bench/offload_batch.py wrote")
    ap.add_argument("--out", default=None, help="write the re-predicted rows here (JSON)")
    ap.add_argument("--device-batch-row", type=int, default=None, metavar="B",
                    help="a run without a device calibration row above batch 1: fit that cost on its uniform "
                         "device row at batch B (that row is then fitted, not predicted)")
    args = ap.parse_args()
    with open(args.results) as f:
        rows = json.load(f)
    out = repredict(rows, args.device_batch_row)
    for r in out:
        print(f"{r['quantize']:5s} {r['routing']:8s} B={r['batch']:4d} {r['bookkeeping']:6s} "
              f"measured {r['tokens_per_s']:8.1f} "
              f"predicted {r['predicted']:8.1f} ({r['error']:+.0%})"
              + ("  (fitted here)" if r["fitted_on_this_row"] else ""))
    print(f"largest |error|: {max(abs(r['error']) for r in out):.0%}; fitted:", out[-1]["hardware"])
    if args.out:
        write_json(args.out, out)


if __name__ == "__main__":
    main()

"""Where a decode step's wall time goes on the GPU, from a torch.profiler trace: per step, the time the copy
stream is busy, the time any other stream computes, both at once, and neither (the GPU idle, waiting for
the host). The performance model assumes copies and compute overlap perfectly; this measures how far they
do, so a gap between a row's prediction and its measurement can be named instead of fitted."""
from __future__ import annotations


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Disjoint, sorted cover of `intervals` (start, end)."""
    out: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


def _intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Intersection of two disjoint sorted interval lists."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _clip(intervals, lo: float, hi: float) -> list[tuple[float, float]]:
    return [(max(s, lo), min(e, hi)) for s, e in intervals if e > lo and s < hi]


def step_timeline(device_events: list[tuple[str, int, float, float]], windows: list[tuple[float, float]],
                  copy_kernel: str = "_copy_rows") -> dict:
    """Mean per-window (decode step) time, in the events' unit, split into: copy (the copy stream busy),
    compute (any other stream busy), overlap (both), idle (neither), with the window's wall time.

    device_events: (name, stream, start, end) of every GPU kernel and memcpy. The copy stream is the one the
    copy kernel (a name containing `copy_kernel`) ran on most; without one, copies are nothing.
    windows: (start, end) of each decode step (its host range: the step's last sync drains the GPU)."""
    counts: dict[int, int] = {}
    for name, stream, _, _ in device_events:
        if copy_kernel in name:
            counts[stream] = counts.get(stream, 0) + 1
    copy_stream = max(counts, key=counts.get) if counts else None
    copy = _union([(s, e) for _, st, s, e in device_events if st == copy_stream])
    compute = _union([(s, e) for _, st, s, e in device_events if st != copy_stream])
    total = {"wall": 0.0, "copy": 0.0, "compute": 0.0, "overlap": 0.0, "idle": 0.0}
    for lo, hi in windows:
        c, k = _clip(copy, lo, hi), _clip(compute, lo, hi)
        both = _length(_intersect(c, k))
        total["wall"] += hi - lo
        total["copy"] += _length(c)
        total["compute"] += _length(k)
        total["overlap"] += both
        total["idle"] += (hi - lo) - _length(c) - _length(k) + both
    n = max(1, len(windows))
    out = {key: value / n for key, value in total.items()}
    out["steps"] = len(windows)
    out["copy_stream"] = copy_stream
    return out


def profiler_timeline(prof, step_name: str = "moesys.decode_step") -> dict:
    """step_timeline of a torch.profiler run, in milliseconds: its device events and the host ranges
    recorded as `step_name` (BatchGeneration marks each decode step so)."""
    device, windows = [], []
    for ev in prof.events():
        if ev.name == step_name:  # the host range; its device-side annotation is no kernel
            if ev.device_type.name == "CPU":
                windows.append((ev.time_range.start / 1e3, ev.time_range.end / 1e3))
        elif ev.device_type.name == "CUDA":
            device.append((ev.name, ev.device_resource_id, ev.time_range.start / 1e3, ev.time_range.end / 1e3))
    return step_timeline(device, windows)

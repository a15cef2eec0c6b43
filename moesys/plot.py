"""`moesys plot RUN_DIR`: PNGs of a training run's loss curves and per-layer expert load, from metrics.jsonl.

Writes `RUN_DIR/plots/loss.png` (train and validation loss against step) and `expert_load.png` (left:
each MoE layer's load fraction per expert, averaged over the logged steps; right: each layer's
max/mean load against step). Needs matplotlib (`pip install 'moesys[plots]'`); figures are built
with matplotlib's object API, so no global backend is switched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a training run directory (holding metrics.jsonl)")
    parser.add_argument("--out-dir", default=None, help="where the PNGs go (default: RUN_DIR/plots)")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} does not exist; give a run directory written by moesys train")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path} is empty; the run logged no step yet")
    return records


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def plot_loss(records: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss")
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_expert_load(records: list[dict], path: Path) -> bool:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    with_load = [r for r in records if r.get("expert_load_fraction")]
    if not with_load:
        return False
    layers = len(with_load[0]["expert_load_fraction"])
    experts = len(with_load[0]["expert_load_fraction"][0])
    mean_LE = [[sum(r["expert_load_fraction"][layer][e] for r in with_load) / len(with_load)
                for e in range(experts)] for layer in range(layers)]
    fig = Figure(figsize=(12, max(3.0, 0.35 * layers + 1.5)))
    ax1, ax2 = fig.subplots(1, 2)
    im = ax1.imshow(mean_LE, aspect="auto", cmap="viridis", interpolation="nearest")
    ax1.set_xlabel("expert")
    ax1.set_ylabel("MoE layer")
    ax1.set_title("load fraction per expert (mean over logged steps)")
    fig.colorbar(im, ax=ax1)
    steps = [r["step"] for r in with_load]
    max_mean_LS = [[r["expert_load_max_mean"][layer] for r in with_load] for layer in range(layers)]
    im2 = ax2.imshow(max_mean_LS, aspect="auto", cmap="magma", interpolation="nearest",
                     extent=(steps[0], steps[-1], layers - 0.5, -0.5))
    ax2.set_xlabel("step")
    ax2.set_ylabel("MoE layer")
    ax2.set_title("max/mean expert load")
    fig.colorbar(im2, ax=ax2)
    for axis in (ax1.xaxis, ax1.yaxis, ax2.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, path)
    return True


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    records = read_metrics(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "loss.png"]
    plot_loss(records, written[0])
    if plot_expert_load(records, out_dir / "expert_load.png"):
        written.append(out_dir / "expert_load.png")
    return written


def run(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("moesys plot: error: matplotlib is not installed; pip install 'moesys[plots]'", file=sys.stderr)
        return 2
    for path in plot_run(Path(args.run_dir), args.out_dir):  # a ValueError: one line from cli.guarded
        print(f"wrote {path}")
    return 0

"""Helpers for the training tests: run the trainer in-process or as subprocesses, read metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
QUIET = ["log.progress_bar=false", "log.tensorboard=false", "data.max_tokens=400000"]


def sets(*items: str) -> list[str]:
    out = []
    for item in (*QUIET, *items):
        out += ["--set", item]
    return out


def train_inproc(run_dir: Path, *items: str, resume: bool = False) -> int:
    from moesys.train import main
    return main(["--config", TINY, "--run-dir", str(run_dir), *sets(*items)] + (["--resume"] if resume else []))


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


def torchrun_cmd(nproc: int, run_dir: Path, *items: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "moesys.train", "--config", TINY, "--run-dir", str(run_dir), *sets(*items)]


def run_torchrun(nproc: int, run_dir: Path, *items: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(nproc, run_dir, *items), env=env(), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]

"""The metadata every benchmark record carries (docs/ARCHITECTURE.md, contracts): device, library versions, date
and the commit measured. Imported by the scripts beside it (run as `python bench/X.py`, so this
folder is on sys.path)."""

from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def git_sha() -> str | None:
    """GIT_SHA from the environment (a copied checkout may have no .git), else HEAD of this repo."""
    sha = os.environ.get("GIT_SHA")
    if sha:
        return sha
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def run_meta(device: str | None = None) -> dict:
    import torch  # here, not at the top: git_sha() alone must not load torch (bench/upcycle.py's parent)

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "triton": _version("triton"),
            "transformers": _version("transformers"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_sha": git_sha()}


def write_json(path, obj) -> None:
    """`obj` as JSON at `path`, written to a temporary name and renamed: a run cut short (a time limit, a crash)
    never leaves half a file, and a bench that saves after every row keeps the rows it had."""
    import json

    from moesys.checkpoint import write_text_atomic

    write_text_atomic(Path(path), json.dumps(obj, indent=1, default=str) + "\n")

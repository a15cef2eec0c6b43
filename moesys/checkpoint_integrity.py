"""Checkpoint integrity: the manifest records each file's size and SHA-256; resume verifies them and
falls back to the newest intact checkpoint, naming each damaged one and the file that is wrong.

Why SHA-256 rather than a faster checksum (CRC32, xxHash): it is in the standard library (no new
dependency), `sha256sum FILE` checks a file by hand against the manifest, and with the CPU's SHA
instructions it hashes about 1-2 GB/s per core; the files of a checkpoint are hashed in parallel
threads (hashlib releases the GIL), right after they are written, so they are read from the page
cache. A 32-bit CRC would be faster, but SHA-256 also serves as the files' identity (two manifests
with equal digests hold equal files), and the cost stays small next to writing the checkpoint.

Damage this catches (each seen in fault tests): a truncated file (size), a zero-filled or
overwritten range (checksum), a missing file (e.g. pruned by another job), a broken or missing
`manifest.json`. Manifests written before checksums existed list file names only; for those only
the files' presence is checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_STEP_DIR = re.compile(r"^step_(\d+)$")
_CHUNK = 16 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_records(directory: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"bytes": size, "sha256": hex}} for files in `directory` (hashed in parallel)."""
    paths = [Path(directory) / n for n in names]
    with ThreadPoolExecutor(max_workers=min(8, max(len(paths), 1))) as pool:
        digests = list(pool.map(sha256_file, paths))
    return {n: {"bytes": p.stat().st_size, "sha256": d} for n, p, d in zip(names, paths, digests)}


def verify_checkpoint(ckpt_dir: Path, only: Collection[str] | None = None) -> str | None:
    """None when every file the manifest lists is there with its recorded size and checksum; else
    what is wrong, naming the file. `only`: check just these of the listed files (a reader that needs
    no others, like `moesys export`, neither hashes nor refuses on the rest)."""
    ckpt_dir = Path(ckpt_dir)
    manifest_path = ckpt_dir / "manifest.json"
    if not manifest_path.is_file():
        return f"{manifest_path} is missing"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, UnicodeDecodeError) as e:
        return f"{manifest_path} is not valid JSON ({e})"
    except (KeyError, TypeError):
        return f"{manifest_path} has no file list"
    if only is not None and isinstance(files, list):
        files = [n for n in files if n in only]
    elif only is not None:
        files = {n: r for n, r in files.items() if n in only}
    if isinstance(files, list):  # a manifest from before checksums: presence only
        missing = [n for n in files if not (ckpt_dir / n).is_file()]
        return f"{ckpt_dir / missing[0]} is missing (listed in its manifest)" if missing else None
    for name, record in files.items():
        path = ckpt_dir / name
        if not path.is_file():
            return f"{path} is missing (listed in its manifest)"
        size = path.stat().st_size
        if size != record["bytes"]:
            how = "truncated" if size < record["bytes"] else "grown"
            return f"{path} has {size} bytes but its manifest records {record['bytes']} ({how})"
    for name, record in files.items():
        if sha256_file(ckpt_dir / name) != record["sha256"]:
            return (f"{ckpt_dir / name} does not match the SHA-256 in its manifest (its contents changed "
                    "after it was saved: zero-filled, overwritten or bit rot)")
    return None


def step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Every `step_N` directory (complete or not) as (step, path), newest first."""
    if not Path(ckpt_root).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(ckpt_root).iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def newest_intact(ckpt_root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and the (path, problem) of each newer damaged one."""
    damaged = []
    for _, path in step_dirs(ckpt_root):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def set_aside(path: Path) -> Path:
    """Rename a damaged `step_N` to `damaged-step_N` (kept for inspection, no longer a candidate for
    resume or pruning); returns the new path."""
    target = path.with_name(f"damaged-{path.name}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"damaged-{path.name}.{n}")
    os.replace(path, target)
    return target

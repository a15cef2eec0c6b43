"""Temporary directories that name their owner, so a later run can remove the ones a dead process left.

A writer that must publish a directory atomically (an upcycled model, an export, a checkpoint) fills
a hidden temp directory beside the target and renames it at the end. If the process is killed
(SIGKILL, a node failure) that temp directory stays, possibly gigabytes large. Each one made here
holds an owner file (host, pid and the pid's start time); `remove_stale` deletes the directories of
one kind whose owner ran on this host and is gone. A live owner's directory, another host's (that
host may still be writing to a shared file system) and one without an owner file are never touched.
The start time guards against pid reuse: a recycled pid is a different process, so its directory
is stale too.

`atomic_output_dir` is the whole pattern: stale clean-up, an owned temp dir, rename on success,
removal on any exception (including KeyboardInterrupt and the `moesys` command's SIGTERM).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

OWNER_FILE = ".moesys-owner.json"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before ")" may hold spaces


def _owner() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid)}


def _alive(owner: dict) -> bool:
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True                                 # unreadable: assume alive, never delete it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                                        # exists, owned by another user
    start = owner.get("start")
    return start is None or _start_time(pid) in (None, start)


def claim(path: Path) -> Path:
    """Mark the existing directory `path` as owned by this process."""
    (Path(path) / OWNER_FILE).write_text(json.dumps(_owner()))
    return Path(path)


def make_owned_dir(parent: Path, prefix: str) -> Path:
    """A fresh directory `parent/<prefix>XXXXXXXX` owned by this process (mode 0755, not mkdtemp's
    0700, which would become the published directory's mode)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o755)
    return claim(tmp)


def disown(path: Path) -> None:
    """Remove the owner file before publishing `path`, so the published directory holds only its payload."""
    with contextlib.suppress(FileNotFoundError):
        (Path(path) / OWNER_FILE).unlink()


def is_stale(path: Path) -> bool:
    """True when `path`'s owner ran on this host and is no longer running."""
    try:
        owner = json.loads((Path(path) / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return False                                # no owner file yet (or being written): not ours to judge
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return False
    return not _alive(owner)


def remove_stale(parent: Path, prefix: str, pattern: str | None = None) -> list[Path]:
    """Delete the stale owned directories `parent/<prefix>*` (or matching the glob `pattern`); returns those
    removed."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    removed = []
    for path in sorted(parent.glob(pattern or glob.escape(prefix) + "*")):
        if path.is_dir() and not path.is_symlink() and is_stale(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path, overwrite: bool, kind: str) -> Iterator[Path]:
    """Yield an owned temp dir `.NAME.<kind>-XXXX` beside `out_dir`; rename it to `out_dir` only if
    the body finishes, so an interrupted run leaves nothing at `out_dir`. Stale temp dirs of the same
    kind beside it, whatever their target (and stale `.NAME.old-` dirs), from dead processes are removed
    first: a killed upcycle into ./x is cleaned up by the next upcycle into ./y."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"output directory {out_dir} already exists; pass --overwrite (overwrite=True) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix, old_prefix = f".{out_dir.name}.{kind}-", f".{out_dir.name}.old-"
    remove_stale(out_dir.parent, "", pattern=f".*.{glob.escape(kind)}-*")
    remove_stale(out_dir.parent, "", pattern=".*.old-*")
    tmp = make_owned_dir(out_dir.parent, tmp_prefix)
    try:
        yield tmp
        disown(tmp)
        if out_dir.exists():
            old = make_owned_dir(out_dir.parent, old_prefix)
            os.rename(out_dir, old / "x")
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
        _fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

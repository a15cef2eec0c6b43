"""One job per run directory: `RUN_DIR/moesys.lock` names the job that holds it (host, pid).

Two jobs writing into one run directory interleave their metrics and prune each other's checkpoints,
so the training job takes this lock (rank 0, for the whole run) and a second job refuses to start,
naming the holder. A lock left by a job that died is taken over, with a message saying so:
- on the same host, the holder is dead when its pid is gone or now belongs to a process that started
  later (pid reuse; Linux start time from /proc);
- from another host (a requeue lands on another node) the pid cannot be checked, so the holder
  refreshes the lock file's modification time every `heartbeat_s`, and a lock not refreshed for
  `stale_after_s` counts as dead.
Checking and replacing the lock happen under an flock on the directory, so two jobs starting at once
cannot both take it over.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

LOCK_NAME = "moesys.lock"


class RunDirBusy(ValueError):
    """Another live job holds the run directory."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22 of stat; fields before ")" may hold spaces


def _alive(pid: int, start_time: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # exists, owned by someone else
        return True
    now = _start_time(pid)
    return start_time is None or now is None or now == start_time


class RunDirLock:
    """`acquire()` takes the lock (creating the run directory), `release()` gives it back."""

    def __init__(self, run_dir: Path, *, heartbeat_s: float = 15.0, stale_after_s: float = 120.0):
        self.run_dir, self.path = Path(run_dir), Path(run_dir) / LOCK_NAME
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.created_dir = False   # whether this job created the run directory (release may remove it)
        self._held = None
        self._stop = threading.Event()
        self._thread = None

    def acquire(self) -> str | None:
        """Take the lock; returns a message when a stale lock was taken over (None otherwise).
        Raises RunDirBusy naming the holder when a live job holds it."""
        self.created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": _start_time(os.getpid()),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        fd = os.open(self.run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            note = self._check_holder(me)
            tmp = self.path.with_name(f"{LOCK_NAME}.{me['host']}.{me['pid']}.tmp")
            tmp.write_text(json.dumps(me) + "\n")
            os.replace(tmp, self.path)
        finally:
            os.close(fd)   # closing releases the flock
        self._held = me
        self._thread = threading.Thread(target=self._heartbeat, name="moesys-run-lock", daemon=True)
        self._thread.start()
        return note

    def _check_holder(self, me: dict) -> str | None:
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
            host, pid = str(holder["host"]), int(holder["pid"])
        except (ValueError, KeyError, TypeError):
            return f"replaced the unreadable lock file {self.path} ({text[:80]!r})"
        if host == me["host"]:
            if pid == me["pid"]:    # this process again (the trainer run twice in one process)
                return None
            if not _alive(pid, holder.get("start_time")):
                return (f"taking over the stale lock {self.path}: its job (pid {pid} on {host}, started "
                        f"{holder.get('started', '?')}) is no longer running")
        elif age > self.stale_after_s:
            return (f"taking over the stale lock {self.path}: its job (pid {pid} on {host}) has not "
                    f"refreshed it for {age:.0f}s (a live job refreshes it every {self.heartbeat_s:g}s)")
        raise RunDirBusy(
            f"--run-dir {self.run_dir} is in use by another job (pid {pid} on host {host}, started "
            f"{holder.get('started', '?')}); two jobs in one run directory overwrite each other's metrics "
            f"and checkpoints. Wait for it to finish, stop it, or choose another --run-dir"
            + ("" if host == me["host"] else f" (if that job is gone, the lock is taken over once it is "
                                              f"{self.stale_after_s:g}s old, or delete {self.path})"))

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self, remove_unused_dir: bool = False) -> None:
        """Remove the lock file if it is still ours. With `remove_unused_dir`, also remove the run
        directory when this job created it and left nothing of value in it (no checkpoint, no
        metrics line): a job that failed before its first step leaves no empty run directory."""
        if self._held is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if json.loads(self.path.read_text()).get("pid") == self._held["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self._held = None
        if remove_unused_dir and self.created_dir and not _holds_results(self.run_dir):
            shutil.rmtree(self.run_dir, ignore_errors=True)


def _holds_results(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return True
    ckpt = run_dir / "ckpt"
    return ckpt.is_dir() and any(ckpt.iterdir())

"""The run-directory lock against live, dead, reused-pid and other-host holders, and the training job
with it: a second job refuses naming the holder, a stale lock is taken over with a message, and a job
that fails before its first step leaves no run directory behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from moesys.run_lock import LOCK_NAME, RunDirBusy, RunDirLock, _start_time
from tests._train_helpers import train_inproc


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run_dir, host, pid, start_time=None, age_s=0.0):
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps({"host": host, "pid": pid, "start_time": start_time, "started": "then"}))
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def _holder(run_dir) -> dict:
    return json.loads((run_dir / LOCK_NAME).read_text())


def test_live_holder_on_this_host_is_refused_by_name(tmp_path, live_pid):
    _write_lock(tmp_path, socket.gethostname(), live_pid, _start_time(live_pid))
    with pytest.raises(RunDirBusy, match=f"pid {live_pid} on host {socket.gethostname()}"):
        RunDirLock(tmp_path).acquire()
    assert _holder(tmp_path)["pid"] == live_pid


def test_dead_holder_and_reused_pid_are_taken_over(tmp_path, live_pid):
    dead = _dead_pid()
    _write_lock(tmp_path, socket.gethostname(), dead)
    lock = RunDirLock(tmp_path)
    note = lock.acquire()
    assert f"stale lock {tmp_path / LOCK_NAME}" in note and f"pid {dead}" in note, note
    assert _holder(tmp_path)["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    # A live pid that started after the holder did is another process: the holder is gone.
    _write_lock(tmp_path, socket.gethostname(), live_pid, start_time="1")
    lock = RunDirLock(tmp_path)
    assert "no longer running" in lock.acquire()
    lock.release()


def test_other_host_holder_is_stale_only_without_heartbeat(tmp_path):
    _write_lock(tmp_path, "node-elsewhere", 4242)
    with pytest.raises(RunDirBusy, match="pid 4242 on host node-elsewhere"):
        RunDirLock(tmp_path, stale_after_s=60).acquire()
    _write_lock(tmp_path, "node-elsewhere", 4242, age_s=120)
    lock = RunDirLock(tmp_path, stale_after_s=60)
    assert "has not refreshed it for 120s" in lock.acquire()
    lock.release()


def test_heartbeat_refreshes_the_lock(tmp_path):
    lock = RunDirLock(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    path = tmp_path / LOCK_NAME
    os.utime(path, (time.time() - 1000, time.time() - 1000))
    time.sleep(0.5)
    assert time.time() - path.stat().st_mtime < 100
    lock.release()


def test_second_job_refuses_and_failed_job_leaves_no_run_dir(tmp_path, live_pid, capsys):
    run_dir = tmp_path / "run"
    _write_lock(run_dir, socket.gethostname(), live_pid, _start_time(live_pid))
    assert train_inproc(run_dir, "train.steps=1", "train.device=cpu") == 2
    err = capsys.readouterr().err
    assert f"is in use by another job (pid {live_pid} on host {socket.gethostname()}" in err, err
    assert not (run_dir / "metrics.jsonl").exists() and _holder(run_dir)["pid"] == live_pid
    # Fails once the data is read (a global batch larger than the corpus): nothing is left behind.
    fresh = tmp_path / "fresh"
    assert train_inproc(fresh, "train.steps=1", "train.device=cpu", "data.max_tokens=2000",
                        "data.batch_size=64") == 2
    assert "exceeds the" in capsys.readouterr().err
    assert not fresh.exists()

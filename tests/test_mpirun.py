"""mpirun launches the training job like torchrun: real MPI (the mpich wheel's mpirun, mpi4py for rank,
world size and the rendezvous address), 2 processes with parallel.ep=2, the same losses as the same
job under torchrun."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests._train_helpers import REPO, TINY, env, metrics, run_torchrun, sets
from tests.test_ep_train_job import _same

MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
ITEMS = ("train.steps=4", "log.every=1", "log.val_every=0", "data.batch_size=4", "parallel.ep=2")


@pytest.mark.slow
@pytest.mark.skipif(MPIRUN is None, reason="no mpirun: pip install 'moesys[mpi]' (mpi4py and the mpich wheel)")
def test_mpirun_job_matches_torchrun(tmp_path):
    pytest.importorskip("mpi4py", reason="pip install 'moesys[mpi]'")
    cmd = [MPIRUN, "-n", "2", sys.executable, "-m", "moesys.train", "--config", TINY, "--run-dir",
           str(tmp_path / "mpi"), *sets(*ITEMS)]
    e = env()
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    proc = subprocess.run(cmd, env=e, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = run_torchrun(2, tmp_path / "torchrun", *ITEMS)
    assert ref.returncode == 0, ref.stderr[-3000:]
    _same(metrics(tmp_path / "mpi"), metrics(tmp_path / "torchrun"), "mpirun vs torchrun")

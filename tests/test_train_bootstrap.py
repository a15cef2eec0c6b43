"""Checks the process bootstrap against the launchers' environments: torchrun variables, MPI (a fake
mpi4py standing in for mpirun) and a lone process; and the bucketed gradient all-reduce's bucketing."""

import sys
import types

import torch

from moesys.config import Config
from moesys.parallel import bootstrap
from moesys.parallel.data_parallel import _buckets


def test_detect_launcher():
    assert bootstrap.detect_launcher({"RANK": "0", "WORLD_SIZE": "2"}) == "torchrun"
    assert bootstrap.detect_launcher({"OMPI_COMM_WORLD_SIZE": "4"}) == "mpi"
    assert bootstrap.detect_launcher({"PMI_SIZE": "4"}) == "mpi"
    assert bootstrap.detect_launcher({}) == "single"


class _FakeComm:
    def __init__(self, rank, size, local_rank):
        self.rank, self.size, self.local_rank = rank, size, local_rank

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Split_type(self, kind):
        return _FakeComm(self.local_rank, 2, self.local_rank)

    def bcast(self, obj, root=0):
        return ("rank0-host", "12345")   # what rank 0 would have sent


def test_mpi_rendezvous_uses_mpi4py(monkeypatch):
    fake = types.ModuleType("mpi4py")
    fake.MPI = types.SimpleNamespace(COMM_WORLD=_FakeComm(3, 4, 1), COMM_TYPE_SHARED=0)
    monkeypatch.setitem(sys.modules, "mpi4py", fake)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert bootstrap._mpi_rendezvous() == (3, 4, 1, "rank0-host", "12345")


def test_single_process_needs_no_process_group(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"):
        monkeypatch.delenv(key, raising=False)
    ctx = bootstrap.init_distributed(Config.model_validate({"train": {"device": "cpu"}}))
    assert (ctx.rank, ctx.world_size, ctx.launcher, ctx.distributed) == (0, 1, "single", False)


def test_buckets_group_by_dtype_and_size():
    params = [torch.nn.Parameter(torch.zeros(100)) for _ in range(5)] + [torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))]
    buckets = list(_buckets(params, bucket_bytes=900))
    assert sorted(len(b) for b in buckets) == [1, 1, 2, 2]
    assert sum(len(b) for b in buckets) == 6 and all(len({p.dtype for p in b}) == 1 for b in buckets)

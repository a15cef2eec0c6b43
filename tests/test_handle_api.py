"""Both placement handles (expert parallelism and FSSDP) against the one declared interface,
moesys.parallel.handle_api.PlacementHandle: every member present, with compatible parameters."""

import inspect

import pytest
import torch

from moesys.parallel import FSSDPHandle, ParallelHandle, PlacementHandle, parallelize
from moesys.parallel.fssdp_runtime import fssdp_parallelize
from tests.test_ep_dp import _model

MEMBERS = [n for n in vars(PlacementHandle) if not n.startswith("_")]


@pytest.mark.parametrize("cls", [ParallelHandle, FSSDPHandle])
def test_handle_implements_every_member_with_its_parameters(cls):
    assert len(MEMBERS) >= 13
    for name in MEMBERS:
        declared, actual = getattr(PlacementHandle, name), getattr(cls, name, None)
        assert actual is not None, f"{cls.__name__} lacks {name}"
        if isinstance(declared, property):
            assert isinstance(actual, property), f"{cls.__name__}.{name} must be a property"
            continue
        want = list(inspect.signature(declared).parameters.values())
        got = inspect.signature(actual).parameters
        for p in want:
            assert p.name in got and got[p.name].kind == p.kind, f"{cls.__name__}.{name}: parameter {p.name}"
            assert (p.default is inspect.Parameter.empty) == (got[p.name].default is inspect.Parameter.empty), \
                f"{cls.__name__}.{name}: default of {p.name}"
        extra = [q for q in got.values() if q.name not in {p.name for p in want}]
        assert all(q.default is not inspect.Parameter.empty for q in extra), f"{cls.__name__}.{name}: {extra}"


def test_parallelize_returns_placement_handles():
    from moesys.config import ParallelConfig
    assert isinstance(parallelize(_model(0), ParallelConfig(ep=1)), PlacementHandle)
    assert isinstance(fssdp_parallelize(_model(0)), PlacementHandle)


def test_ep_handle_never_moves_experts():
    """end_step answers whether experts moved (FSSDP re-shards); expert parallelism keeps them in place."""
    from moesys.config import ParallelConfig
    model = _model(0)
    handle = parallelize(model, ParallelConfig(ep=1))
    assert handle.end_step() is False and handle.end_step(torch.optim.SGD(model.parameters(), lr=0.1)) is False

"""moesys.offload.strategies: which execution path each engine configuration runs in each phase, against a
table written out by hand (the paths themselves are checked against transformers by test_offload*.py)."""

from types import SimpleNamespace

import pytest

from moesys.offload.strategies import PHASES, phase_of, select_strategy


def _engine(quantize="none", activation="silu", grouped=True, cpu_mode="off", cpu_faster=False,
            unsupported=None):
    return SimpleNamespace(store=SimpleNamespace(quantize=quantize), activation=activation, grouped=grouped,
                           cpu_mode=cpu_mode, _cpu_faster=cpu_faster, device_path_unsupported=unsupported)


HOST = "HostRouted(resident=True)"
EAGER = "HostRouted(resident=False)"
QUANT = "Quantized(resident=True)"
GRAPH = "GraphDecode()"


@pytest.mark.parametrize("config, want", [
    (dict(), (HOST, HOST, GRAPH)),
    (dict(grouped=False, unsupported="eager loop"), (EAGER, EAGER, EAGER)),
    (dict(quantize="int8", grouped=False), (QUANT, QUANT, GRAPH)),
    (dict(quantize="int4", grouped=False, activation=None, unsupported="act"), (EAGER, EAGER, EAGER)),
    (dict(cpu_mode="on", unsupported="cpu"), (f"CpuExperts(gpu={HOST})",) * 3),
    (dict(cpu_mode="on", quantize="int8", grouped=False, unsupported="cpu"), (f"CpuExperts(gpu={QUANT})",) * 3),
    (dict(cpu_mode="auto", cpu_faster=True), (HOST, f"CpuExperts(gpu={HOST})", GRAPH)),
    (dict(cpu_mode="auto", cpu_faster=True, unsupported="pageable"),
     (HOST, f"CpuExperts(gpu={HOST})", f"CpuExperts(gpu={HOST})")),
    (dict(cpu_mode="auto", cpu_faster=False), (HOST, HOST, GRAPH)),
    (dict(cpu_mode="off", cpu_faster=True), (HOST, HOST, GRAPH)),  # the cost model counts only under "auto"
])
def test_each_configuration_and_phase_selects_its_path(config, want):
    engine = _engine(**config)
    assert tuple(repr(select_strategy(engine, phase)) for phase in PHASES) == want


def test_phase_of_a_call():
    assert [phase_of(1, False), phase_of(1, True), phase_of(5, False), phase_of(5, True)] == [
        "decode", "graph", "prefill", "graph"]  # a batch's step replayed by the decode graph is "graph"
    # a call with no rows is not a one-token call: the graph and decode paths read row 0
    assert [phase_of(0, False), phase_of(0, True)] == ["prefill", "prefill"]


def test_unknown_phase_is_refused():
    with pytest.raises(ValueError, match="phase='capture'"):
        select_strategy(_engine(), "capture")

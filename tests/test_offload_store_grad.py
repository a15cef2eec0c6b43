"""HostExpertStore filled from a source of parameters (a model in memory, as bench/offload.py's source_of_model
gives) keeps no autograd graph: before, every copy into the arena recorded one, holding each expert's
quantization temporaries (GPU memory when the store quantizes there) for as long as the store lived. And once
its arena holds every expert it lets go of the source, which would keep such a model alive."""

import pytest
import torch

from moesys.offload.source import TensorSource
from moesys.offload.store import HostExpertStore


@pytest.mark.parametrize("quantize", ["none", "int4"])
def test_a_store_filled_from_parameters_holds_no_graph(quantize):
    E, I, H, layers = 4, 64, 128, 2
    gate_up = torch.nn.Parameter(torch.randn(E, 2 * I, H))
    down = torch.nn.Parameter(torch.randn(E, H, I))
    source = TensorSource({}, lambda layer, e: (gate_up[e, :I], gate_up[e, I:], down[e]))
    store = HostExpertStore(source, list(range(layers)), E, I, H, torch.float32, mode="memory", quantize=quantize)
    for layer in range(layers):
        for e in range(E):
            for name, part in store.host_parts(layer, e).items():
                assert not part.requires_grad and part.grad_fn is None, (layer, e, name)
    if quantize == "none":  # the weights arrived all the same
        assert torch.equal(store.host_parts(1, 1)["gate_up"][:I], gate_up[1, :I].detach())


@pytest.mark.parametrize("mode, quantize, kept", [("memory", "none", False), ("memory", "int4", False),
                                                  ("mmap", "none", True)])
def test_a_filled_store_lets_go_of_its_source(mode, quantize, kept):
    """A store whose arena holds every expert drops its source (a model in memory would stay alive through
    it); a memory-mapped store reads its source at each miss and keeps it."""
    import gc
    import weakref

    E, I, H, layers = 4, 64, 128, 2

    def model_in_memory():  # its tensors live only in the source's closure
        gate_up, down = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
        return TensorSource({}, lambda layer, e: (gate_up[e, :I], gate_up[e, I:], down[e])), weakref.ref(gate_up)

    source, ref = model_in_memory()
    expected = source.expert(1, 1)[0].clone()
    store = HostExpertStore(source, list(range(layers)), E, I, H, torch.float32, mode=mode, quantize=quantize)
    del source
    gc.collect()
    assert (ref() is not None) == kept
    if quantize == "none":  # and the weights are still there to read
        assert torch.equal(store.host_parts(1, 1)["gate_up"][:I], expected)

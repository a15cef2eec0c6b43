"""OffloadEngine._wait, both ways of waiting for the copies a layer's compute reads (engine.copy_wait): the host
blocks on each run's event ("host", timed), or the compute stream waits for it ("device", the host goes on).
Fake events and a fake stream on the CPU; tests/test_gpu_survivors.py runs both on a GPU."""

from types import SimpleNamespace

import pytest
import torch

from moesys.offload.engine import COPY_WAITS, OffloadEngine
from moesys.offload.stats import OffloadStats


class FakeEvent:
    def __init__(self, done: bool):
        self.done, self.synced = done, 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.synced += 1
        self.done = True


class FakeStream:
    def __init__(self):
        self.waited = []

    def wait_event(self, event) -> None:
        self.waited.append(event)


def _engine(copy_wait, monkeypatch):
    """Slots 0-1 copied in one run (event a, in flight), slot 2 in another (b, landed), slot 3 in a third (c,
    in flight) that stays pending; slot 4 never copied."""
    a, b, c = FakeEvent(False), FakeEvent(True), FakeEvent(False)
    cache = SimpleNamespace(ready=[a, a, b, c, None])
    stream = FakeStream()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    engine = SimpleNamespace(copy_wait=copy_wait, cache=cache, pending={0: {0, 1, 2, 3}}, stats=OffloadStats(),
                             device=torch.device("cuda", 0))
    return engine, stream, (a, b, c)


@pytest.mark.parametrize("copy_wait", COPY_WAITS)
def test_wait_clears_the_listed_slots_and_waits_once_per_run(copy_wait, monkeypatch):
    engine, stream, (a, b, c) = _engine(copy_wait, monkeypatch)
    OffloadEngine._wait(engine, 0, [1, 0, 2, 4])
    assert engine.cache.ready == [None, None, None, c, None]
    assert engine.pending[0] == {3}
    if copy_wait == "device":  # the compute stream waits for each run once; the host never blocks
        assert stream.waited == [a, b] and a.synced == 0 and not a.done
        assert engine.stats.copy_wait_s == 0
    else:  # the host blocks on the run in flight (once), not on the one that landed; nothing on the stream
        assert stream.waited == [] and a.synced == 1 and b.synced == 0
        assert engine.stats.copy_wait_s >= 0
    assert c.synced == 0  # not listed: still in flight


def test_wait_refuses_an_unknown_mode(monkeypatch):
    engine, _, _ = _engine("stream", monkeypatch)
    with pytest.raises(ValueError, match="copy_wait='stream'.*'host', 'device'"):
        OffloadEngine._wait(engine, 0, [0])

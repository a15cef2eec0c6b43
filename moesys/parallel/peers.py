"""Which ranks are alive: each rank's heartbeat in the process group's key-value store, read when a
collective fails so that the message names the ranks that did not arrive.

A thread on every rank bumps `moesys/beat/{rank}` ("count pid host") every `interval_s` on its own
store connection; it keeps beating while the main thread waits inside a collective (the wait
releases the GIL). A rank that is stopped (SIGSTOP, a hung driver) or dead stops beating. When a
collective fails, `report()` reads every rank's beat twice, a few intervals apart: a rank whose count
did not move is named, as "exited" when it ran on this host and its pid is gone, else as "stopped or
hung". The store lives in torchrun's agent (or rank 0 without torchrun): if it cannot be reached,
the report says so instead.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import timedelta

__all__ = ["PeerMonitor"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PeerMonitor:
    def __init__(self, store, rank: int, world_size: int, interval_s: float = 0.5):
        self.rank, self.world_size, self.interval_s = rank, world_size, interval_s
        self._store = store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _key(rank: int) -> str:
        return f"moesys/beat/{rank}"

    def start(self) -> "PeerMonitor":
        me = f"{os.getpid()} {socket.gethostname()}"
        store = self._store.clone() if hasattr(self._store, "clone") else self._store  # its own connection
        store.set(self._key(self.rank), f"0 {me}")

        def beat():
            count = 0
            while not self._stop.wait(self.interval_s):
                count += 1
                try:
                    store.set(self._key(self.rank), f"{count} {me}")
                except Exception:  # the store is gone (its host died): nothing left to report to
                    return
        self._thread = threading.Thread(target=beat, name="moesys-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _read(self, store) -> list[tuple[int, int, str] | None]:
        out = []
        for r in range(self.world_size):
            try:
                count, pid, host = store.get(self._key(r)).decode().split(" ", 2)
                out.append((int(count), int(pid), host))
            except Exception:
                out.append(None)
        return out

    def report(self) -> str:
        """The ranks that are not beating, in words ("" when every rank is)."""
        try:
            store = self._store.clone() if hasattr(self._store, "clone") else self._store
            store.set_timeout(timedelta(seconds=max(2.0, 4 * self.interval_s)))
            first = self._read(store)
            time.sleep(4 * self.interval_s)
            second = self._read(store)
        except Exception as e:
            return f"the ranks' heartbeats could not be read ({type(e).__name__}: the store's host may be down)"
        here, silent = socket.gethostname(), []
        for r, (a, b) in enumerate(zip(first, second)):
            if r == self.rank:
                continue
            if b is None:
                silent.append(f"rank {r} (no heartbeat recorded)")
            elif a is not None and a[0] == b[0]:
                _, pid, host = b
                if host == here and not _pid_alive(pid):
                    silent.append(f"rank {r} (pid {pid} on {host}: exited)")
                else:
                    silent.append(f"rank {r} (pid {pid} on {host}: stopped or hung, no heartbeat "
                                  f"for {4 * self.interval_s:g}s)")
        return ("ranks that did not arrive: " + ", ".join(silent)) if silent else \
            "every other rank is alive (it is in another collective, or slower than the timeout)"

"""The trainer's SIGTERM handling: a flag the loop reads at the end of each step (it then saves a
checkpoint and exits cleanly), and a watcher that exits at once when the main thread is stuck."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time


class SigtermFlag:
    """Remembers a SIGTERM; the loop saves a checkpoint at the end of the step and exits cleanly.

    Python runs the handler only when the main thread returns to the interpreter, which a collective
    waiting for a stuck peer does not do until parallel.timeout_s. So the signal also wakes a thread
    (through signal.set_wakeup_fd); if the handler has not run `grace_s` later, the main thread is
    stuck in native code and the process exits at once (143) without a checkpoint, which would need
    every rank anyway, instead of ignoring the scheduler's stop until it is killed."""

    def __init__(self, grace_s: float = 5.0):
        self.raised = False
        self.grace_s = grace_s
        self._previous = None
        self._pipe = None
        self._old_wakeup = -1

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:              # not the main thread (an embedding application): no handler
            self._previous = None
            return self
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._pipe = (r, w)
        threading.Thread(target=self._watch, args=(r,), name="moesys-sigterm", daemon=True).start()
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def _watch(self, r: int) -> None:
        while data := os.read(r, 64):
            if signal.SIGTERM in data and not self.raised:
                deadline = time.monotonic() + self.grace_s
                while not self.raised and time.monotonic() < deadline:
                    time.sleep(0.05)
                if not self.raised:
                    print(f"moesys train: SIGTERM, but the main thread has been blocked for {self.grace_s:g}s "
                          "(a collective waiting for a stuck peer): exiting now without saving a checkpoint",
                          file=sys.stderr, flush=True)
                    os._exit(143)
        os.close(r)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        if self._pipe is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            os.close(self._pipe[1])  # the watcher reads end-of-file, closes its end and returns

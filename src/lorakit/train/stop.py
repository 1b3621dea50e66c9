"""Stopping a training run cleanly on Ctrl-C (SIGINT) or SIGTERM (``kill``, a job scheduler, ``docker stop``).

While the loop runs, the first of these signals only sets ``received``: the loop finishes the optimizer step
it is in, writes a complete checkpoint and raises ``lorakit.errors.Interrupted`` (exit status 130 for
SIGINT, 143 for SIGTERM). A second signal acts at once, as it always would (Ctrl-C twice: stop now). Before
the loop is ``armed`` (loading the model, checking data) nothing is trained yet, so a signal acts as usual.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """A context manager installing the handlers (main thread only: Python delivers signals there)."""

    def __init__(self) -> None:
        self.armed = False
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.armed and self.received is None:
            self.received = signum
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):  # e.g. Python's default SIGINT handler: KeyboardInterrupt
            previous(signum, frame)
            return
        # the default action (SIGTERM: terminate); an ignored signal stays ignored
        if previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

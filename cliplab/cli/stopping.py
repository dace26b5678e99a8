"""SIGINT and SIGTERM: one handler for a whole command, installed by ``cli.main`` before anything heavy imports."""
from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, stopping a run as Ctrl-C does (exit status 143 instead of 130)."""


def interruption(signum: int) -> KeyboardInterrupt:
    """What a stop raises: ``Terminated`` for SIGTERM, ``KeyboardInterrupt`` for Ctrl-C."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


class StopSignals:
    """While active (in the main thread), the first SIGINT raises KeyboardInterrupt and the first SIGTERM
    ``Terminated``, and ``received`` keeps the signal: an error that the stop causes further down (a kernel or a socket
    torn down half-way) is then reported as the interruption it is. A second signal ends the process at once, as it
    would without cliplab: the way out of a clean-up that hangs.

    While ``deferring``, the first signal is only kept: raised inside torch's C++ start-up (its import calls back into
    Python), an exception cannot get out and the process aborts; ``raise_deferred`` raises it once that is over."""

    def __init__(self):
        self.received = None
        self.deferring = False
        self.previous = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in STOP_SIGNALS:
                self.previous[signum] = signal.signal(signum, self._stop)
        return self

    def _stop(self, signum, frame):
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        if not self.deferring:
            raise interruption(signum)

    def raise_deferred(self) -> None:
        """Stop deferring, and raise the signal that came meanwhile, if one did."""
        self.deferring = False
        if self.received is not None:
            raise interruption(self.received)

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def status(self, error: BaseException | None = None) -> int:
        """The exit status of a stopped command: 143 for SIGTERM, 130 for Ctrl-C (as a shell reports them)."""
        return 143 if isinstance(error, Terminated) or self.received == signal.SIGTERM else 130

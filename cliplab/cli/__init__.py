"""The command line: ``commands`` (parsing, each command), ``reproduce`` (the notebooks, executed) and ``stopping``
(Ctrl-C and SIGTERM)."""
import os
import sys

from .._memory import keep_freed_memory
from .stopping import StopSignals

__all__ = ["console", "main"]


def main(argv: list[str] | None = None) -> int:
    """``cliplab``. The signal handler comes first, before torch and the commands import (seconds), so that a stop at
    any moment ends in one line and the exit status of the signal."""
    stop = StopSignals()
    try:
        with stop:
            stop.deferring = True  # torch imports here (a signal is said as soon as the import is over)
            from .commands import run

            keep_freed_memory()  # before the first pass, where a command runs on the CPU (cliplab._memory)

            stop.raise_deferred()
            return run(argv, stop)
    except BaseException:  # ``run`` reports its own: this one came while importing
        if stop.received is None:
            raise
        # a signal inside an import can surface as another error (a half-initialised numpy: AttributeError,
        # RecursionError)
        sys.stderr.write("cliplab: interrupted while starting; nothing was done\n")
        return stop.status()



def console() -> None:
    """The ``cliplab`` executable and ``python -m cliplab``: ``main``, its status the process's exit status.

    A stopped command ends the process here, its output flushed, instead of through Python's own exit: after a
    stop, about one ``python -m cliplab`` in ten was seen to end by SIGINT (exit -2) once its one line was printed,
    at interpreter shutdown (CPython's flag for an unhandled KeyboardInterrupt outlives the handled one)."""
    status = main()
    if status in (130, 143):  # everything that cleans up (kernels, temporary directories) has run by now
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)

"""The command line: ``commands`` (parsing, each command, Ctrl-C) and ``reproduce`` (the notebooks, executed)."""
from .commands import main

__all__ = ["main"]

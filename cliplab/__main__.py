"""``python -m cliplab`` (and ``torchrun -m cliplab``): the command line of ``cliplab.cli``."""
from .cli import console

console()

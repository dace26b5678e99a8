"""``python -m cliplab`` (and ``torchrun -m cliplab``): the command line of ``cliplab.cli``."""
import sys

from .cli import main

sys.exit(main())

"""Attacks on any classifier of [0, 1] images: the primitives every attack shares (``common``: objectives, the
projection, EOT), projected gradient descent (``pgd``), APGD and APGD-T (``apgd``) and the black-box Square attack
(``square``)."""
from .apgd import apgd, apgd_targeted
from .common import LOSSES, NORMS, AttackResult, attack_objective, eot_gradient
from .pgd import pgd
from .square import square

__all__ = ["LOSSES", "NORMS", "AttackResult", "apgd", "apgd_targeted", "attack_objective", "eot_gradient", "pgd",
           "square"]

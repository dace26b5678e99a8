"""The attacks a worst-case evaluation can run, in one registry (``ATTACKS``): each name, how it runs on a batch, the
``AttackBudget`` fields it reads, the norms it attacks in and the classes it needs. Adding an attack is one entry
here: the ensemble (``ensemble``), ``cliplab evaluate --attacks``, ``cliplab benchmark --attacks`` and their help
follow from it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..attacks.apgd import apgd, apgd_targeted
from ..attacks.common import NORMS, AttackResult
from ..attacks.pgd import pgd
from ..attacks.square import square


@dataclass(frozen=True)
class EnsembleAttack:
    """One attack of the worst-case ensemble.

    Attributes:
        about: what it is, in a few words (the command line's help).
        run: ``run(model, x, y, budget, *, eps, norm, seed, early_stop) -> AttackResult`` on one batch.
        budget_fields: the ``AttackBudget`` fields it reads (checked before any work).
        norms: the threat models it attacks in.
        min_classes: the fewest classes its loss is defined for.
        fewer_classes: what runs in its place on a task of fewer classes (None: nothing, it is left out).
    """

    about: str
    run: Callable[..., AttackResult]
    budget_fields: tuple[str, ...]
    norms: tuple[str, ...] = NORMS
    min_classes: int = 2
    fewer_classes: str | None = None


def _apgd(loss: str) -> Callable[..., AttackResult]:
    def run(model, x, y, budget, **common):
        return apgd(model, x, y, steps=budget.steps, loss=loss, restarts=budget.restarts,
                    eot_samples=budget.eot_samples, **common)
    return run


def _apgd_targeted(loss: str) -> Callable[..., AttackResult]:
    def run(model, x, y, budget, **common):
        return apgd_targeted(model, x, y, steps=budget.steps, num_targets=budget.num_targets, loss=loss,
                             eot_samples=budget.eot_samples, **common)
    return run


def _square(model, x, y, budget, *, norm, **common) -> AttackResult:
    return square(model, x, y, queries=budget.queries, **common)  # L-inf only: norms says so


def _pgd(model, x, y, budget, **common) -> AttackResult:
    return pgd(model, x, y, steps=budget.pgd_steps, restarts=budget.pgd_restarts, loss="margin",
               eot_samples=budget.eot_samples, **common)


APGD_FIELDS = ("steps", "restarts", "eot_samples")
APGD_T_FIELDS = ("steps", "num_targets", "eot_samples")
ATTACKS = {
    "apgd-ce": EnsembleAttack("APGD on the cross-entropy", _apgd("ce"), APGD_FIELDS),
    "apgd-dlr": EnsembleAttack("APGD on the DLR loss", _apgd("dlr"), APGD_FIELDS, min_classes=3),
    "apgd-t": EnsembleAttack("APGD-T on the targeted DLR loss", _apgd_targeted("dlr"), APGD_T_FIELDS, min_classes=4,
                             fewer_classes="apgd-t-ce"),
    "apgd-t-ce": EnsembleAttack("APGD-T on the targeted cross-entropy", _apgd_targeted("ce"), APGD_T_FIELDS),
    "square": EnsembleAttack("Square, a score-based search", _square, ("queries",), norms=("linf",)),
    "pgd": EnsembleAttack("PGD on the margin loss, the quick look", _pgd, ("pgd_steps", "pgd_restarts",
                                                                            "eot_samples")),
}
NORM_NAMES = {"linf": "L-inf", "l2": "L2"}

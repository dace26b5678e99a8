"""The worst case over an AutoAttack-style ensemble: ``evaluate_robustness`` at one radius,
``robustness_vs_eps`` at several (nested: each radius attacks only the survivors of the one below), their budget
(``AttackBudget``) and report (``RobustnessReport``), and the accuracy curve they give (``accuracy_curve``,
``accuracy_vs_eps``).

Under ``torchrun`` each process attacks every ``world``-th batch with the seed it has in one process and the counts
are summed, so every process returns exactly the single-process result (for a deterministic model).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .. import _distributed, _torch
from .._arguments import check_choice, check_images, check_int, check_labels, check_nonempty, check_seed
from ..attacks.common import check_radius
from .prediction import check_same_task, judge_all, judged, looks_like_probabilities, predict, progress_bar
from .registry import ATTACKS, NORM_NAMES
from .statistics import Proportion

# The named ensembles of the registry's attacks (AutoAttack's "standard" and "rand" versions, and the quick look)
ENSEMBLES = {"standard": ("apgd-ce", "apgd-t", "square"), "rand": ("apgd-ce", "apgd-dlr"), "pgd": ("pgd",)}
# robustness_vs_eps's name, in a report's per_attack, for the images already broken at a smaller radius
SMALLER_RADII = "smaller radii"


@dataclass(frozen=True)
class AttackBudget:
    """How hard each attack of ``evaluate_robustness`` tries (the defaults are AutoAttack's)."""

    steps: int = 100  # APGD iterations per run
    num_targets: int = 9  # target classes of APGD-T, the likeliest first
    queries: int = 5000  # Square's forward passes per image
    restarts: int = 1  # random restarts of APGD-CE and APGD-DLR
    eot_samples: int = 1  # gradient draws per APGD step (randomised defences: >= 20)
    pgd_steps: int = 10  # the quick look: PGD with a margin loss...
    pgd_restarts: int = 2  # ... and this many restarts


@dataclass(frozen=True)
class RobustnessReport:
    """Worst-case robustness of one model at one radius.

    Attributes:
        clean: accuracy on the clean images.
        robust: worst-case robust accuracy: correct when clean and after every attack of the ensemble.
        per_attack: robust accuracy after each attack, in the order run; each attack only ran on the images
            that all the earlier ones left standing (as in AutoAttack), so the last equals ``robust``. In a report
            of ``robustness_vs_eps`` the first entry, ``"smaller radii"``, leaves out the images already broken at
            a smaller radius.
        standing: (N,) bool on the CPU, the images that survived every attack.
        eps, norm: the threat model.
    """

    clean: Proportion
    robust: Proportion
    per_attack: dict[str, Proportion]
    standing: torch.Tensor = field(repr=False)
    eps: float = 0.0
    norm: str = "linf"

    def as_dict(self) -> dict:
        """Everything in the report, for a JSON file (``from_dict`` reads it back, equal)."""
        return {"clean": [self.clean.hits, self.clean.n], "robust": [self.robust.hits, self.robust.n],
                "per_attack": [[name, p.hits, p.n] for name, p in self.per_attack.items()],
                "standing": self.standing.int().tolist(), "eps": self.eps, "norm": self.norm}

    @classmethod
    def from_dict(cls, data: dict) -> RobustnessReport:
        """The report ``as_dict`` wrote (``study.shared`` reads a run's shared evaluations back with it)."""
        return cls(Proportion(*data["clean"]), Proportion(*data["robust"]),
                   {name: Proportion(hits, n) for name, hits, n in data["per_attack"]},
                   torch.tensor(data["standing"], dtype=torch.bool), data["eps"], data["norm"])


def evaluate_robustness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                        attacks: str | Sequence[str] = "standard", norm: str = "linf",
                        budget: AttackBudget = AttackBudget(), batch_size: int = 256, votes: int = 1,
                        judge: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
                        progress: bool = True) -> RobustnessReport:
    """Worst-case robust accuracy over an ensemble of attacks (Croce & Hein 2020, RobustBench's rule).

    An image counts as robust only if it is classified correctly when clean and after every attack. Like
    AutoAttack, each attack runs only on the images still standing, so the ensemble costs little more than its
    first attack on a model that is not robust.

    Args:
        model: the classifier, or a defence wrapping it, attacked end to end.
        x: (N, 3, H, W) images in [0, 1]; y: (N,) labels.
        eps: threat-model radius in [0, 1] pixel units.
        attacks: ``"standard"`` (APGD-CE, APGD-T, Square: deterministic models), ``"rand"`` (APGD-CE and
            APGD-DLR with EOT: randomised defences), ``"pgd"`` (the quick look: PGD with a margin loss), or a
            sequence of names from ``ATTACKS``.
        norm: ``"linf"`` or ``"l2"`` (Square is L-inf only).
        budget: steps, targets, queries, restarts and EOT draws of the attacks.
        batch_size: images per attack batch.
        votes: score every image by the majority vote of this many stochastic passes (a randomised defence,
            as deployed); 1 for deterministic models.
        judge: maps images (on the model's device) to predicted classes, replacing the vote, e.g. randomized
            smoothing's ``predict`` with abstention; None: ``predict`` with ``votes``.
        seed: seeds every attack (each batch gets its own seed derived from it).
        progress: a tqdm bar per attack.

    Returns:
        RobustnessReport with the clean, worst-case and per-attack accuracies, each with n and a 95% CI.
    """
    names, budget, early_stop, judge, correct = _prepare(model, x, y, eps=eps, attacks=attacks, norm=norm,
                                                         budget=budget, batch_size=batch_size, votes=votes,
                                                         judge=judge, seed=seed)
    return _worst_case(model, x, y, correct, judge, eps=eps, names=names, norm=norm, budget=budget,
                       batch_size=batch_size, early_stop=early_stop, seed=seed, progress=progress)


def _prepare(model, x, y, *, eps, attacks, norm, budget, batch_size, votes, judge, seed):
    """What an evaluation starts from: the checked attacks and budget (``_check_evaluation``), whether an attack may
    stop on an image it fooled, the judge of a prediction, and the clean images it gets right."""
    names, budget = _check_evaluation(model, x, y, eps=eps, attacks=attacks, norm=norm, budget=budget,
                                      batch_size=batch_size, votes=votes, seed=seed)
    early_stop = _success_is_final(votes, judge, budget)
    judge = judge or _vote(model, batch_size, votes)
    correct = judge_all(judge, x, batch_size, _torch.device_of(model, x.device)) == y.cpu()
    return names, budget, early_stop, judge, correct


def _success_is_final(votes, judge, budget: AttackBudget) -> bool:
    """Whether an attack may stop on an image as soon as the model misclassifies it: when the model is judged by one
    pass without EOT, the judge sees what the attack saw. A vote, a judge of its own or EOT draws judge a randomised
    model by other draws, where an adversarial image pushed further is likelier to survive the judgement."""
    return votes == 1 and judge is None and budget.eot_samples == 1


def _check_evaluation(model, x, y, *, eps, attacks, norm, budget, batch_size, votes, seed):
    """Every argument of ``evaluate_robustness`` checked in every process, the same task in every process, and a
    model that returns finite logits; returns the attack names and the budget, fitted to the number of classes
    (``fit_to_classes``)."""
    names, budget = _distributed.on_every_rank(lambda: _check_robustness_arguments(
        model, x, y, eps=eps, attacks=attacks, norm=norm, budget=budget, batch_size=batch_size, votes=votes,
        seed=seed), "the evaluation's arguments")
    check_same_task(x, eps=eps, attacks=names, norm=norm, budget=budget, batch_size=batch_size, votes=votes, seed=seed)
    _check_logits(model, x, _torch.computing_device(model, x.device))
    return names, budget


def _vote(model, batch_size, votes) -> Callable[[torch.Tensor], torch.Tensor]:
    """The default judge: ``predict`` with ``votes``."""
    return lambda images: predict(model, images, batch_size=batch_size, votes=votes)


def _worst_case(model, x, y, correct, judge, *, eps, names, norm, budget, batch_size, early_stop, seed,
                progress, standing=None) -> RobustnessReport:
    """The ensemble ``names`` at ``eps`` on the images ``standing`` (default: the ``correct`` ones, those the judge
    classifies right when clean); the others count as broken (under "smaller radii" when ``standing`` was given)."""
    device = _torch.device_of(model, x.device)
    labels = y.cpu()
    clean = Proportion(int(correct.sum()), len(y))
    per_attack = {}
    if standing is None:
        standing = correct.clone()
    else:
        standing = correct & standing
        per_attack[SMALLER_RADII] = Proportion(int(standing.sum()), len(y))
    for name in names:
        todo = standing.nonzero().squeeze(1)
        fell = torch.zeros(len(y), dtype=torch.bool)  # the images this process's batches brought down
        for start in progress_bar(_distributed.my_batches(range(0, len(todo), batch_size)), progress,
                                  f"{name} eps={255 * eps:g}/255"):
            index = todo[start:start + batch_size]
            x_adv = _run_attack(name, model, x[index].to(device), y[index].to(device), eps=eps, norm=norm,
                                budget=budget, seed=seed + start, early_stop=early_stop)
            fell[index] = judged(judge, x_adv, device) != labels[index]
        standing &= ~_distributed.sum_over_ranks(fell)
        per_attack[name] = Proportion(int(standing.sum()), len(y))
    robust = Proportion(int(standing.sum()), len(y))
    return RobustnessReport(clean, robust, per_attack, standing, eps, norm)


def robustness_vs_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_values: Sequence[float], *,
                      attacks: str | Sequence[str] = "standard", norm: str = "linf",
                      budget: AttackBudget = AttackBudget(), batch_size: int = 256, votes: int = 1,
                      judge: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
                      progress: bool = True) -> dict[float, RobustnessReport]:
    """``evaluate_robustness`` at each radius of ``eps_values`` (each > 0, in [0, 1] pixel units), the radii nested.

    The threat models are nested: an image broken at a radius is broken at every larger one by the same adversarial
    image, so, from the smallest radius up, each radius attacks only the images that survived the one below it (the
    others count as broken, reported as ``per_attack["smaller radii"]``) and the clean images are judged once. Each
    worst case is thus the same or lower than an evaluation of that radius alone would give, for less work.

    Keyword arguments as for ``evaluate_robustness``. Returns the reports in the order of ``eps_values``.
    """
    check_radii(eps_values, norm, "eps_values")
    names, budget, early_stop, judge, correct = _prepare(model, x, y, eps=max(eps_values), attacks=attacks, norm=norm,
                                                         budget=budget, batch_size=batch_size, votes=votes,
                                                         judge=judge, seed=seed)
    reports, standing = {}, None
    for eps in sorted(eps_values):
        reports[eps] = _worst_case(model, x, y, correct, judge, eps=eps, names=names, norm=norm, budget=budget,
                                   batch_size=batch_size, early_stop=early_stop, seed=seed, progress=progress,
                                   standing=standing)
        standing = reports[eps].standing
    return {eps: reports[eps] for eps in eps_values}


def _check_robustness_arguments(model, x, y, *, eps, attacks, norm, budget, batch_size, votes, seed):
    """Every argument checked before any attack runs; returns the attack names and the budget, fitted to the number
    of classes."""
    check_images(x)
    check_nonempty(x)
    check_radius(eps, norm)
    num_classes = _torch.num_classes(model, x)
    names = check_attack_plan(attacks, norm, budget, num_classes)
    check_labels(y, len(x), num_classes, "y")
    check_int(batch_size, "batch_size")
    check_int(votes, "votes")
    check_seed(seed)
    return fit_to_classes(names, budget, num_classes)


def accuracy_curve(reports: Mapping[float, RobustnessReport]) -> dict[float, Proportion]:
    """``{0: clean, eps: worst-case robust, ...}`` from the reports of ``robustness_vs_eps``."""
    return {0: next(iter(reports.values())).clean, **{eps: report.robust for eps, report in reports.items()}}


def accuracy_vs_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_values: Sequence[float],
                    **kwargs) -> dict[float, Proportion]:
    """Clean accuracy (key 0) and worst-case robust accuracy at each radius of ``eps_values``.

    Args:
        model, x, y: as for ``evaluate_robustness``.
        eps_values: threat-model radii (each > 0), in [0, 1] pixel units.
        **kwargs: go to ``evaluate_robustness`` (attacks, budget, batch size, votes, seed, progress).

    Returns:
        ``{0: clean, eps: robust, ...}``, each a ``Proportion`` of ``len(y)`` images.
    """
    return accuracy_curve(robustness_vs_eps(model, x, y, eps_values, **kwargs))


def check_attack_plan(attacks: str | Sequence[str], norm: str, budget: AttackBudget, num_classes: int) -> list[str]:
    """The attacks of an ensemble name or list, checked against the norm, the budget and the number of classes
    (also before any model is built: ``cliplab evaluate``); returns their names."""
    names = check_attacks(attacks, norm, budget)
    check_int(num_classes, "num_classes", minimum=2)
    return names


def check_attacks(attacks: str | Sequence[str], norm: str, budget: AttackBudget) -> list[str]:
    """The attacks of an ensemble name or list, checked against the norm and the budget; returns their names."""
    if isinstance(attacks, str):
        check_choice(attacks, "attacks", ENSEMBLES)
        names = list(ENSEMBLES[attacks])
    else:
        names = list(attacks)
        for name in names:
            check_choice(name, "each of attacks", ATTACKS)
        if len(set(names)) != len(names):  # a second run would look like a second attack in the report
            raise ValueError(f"attacks must not repeat an attack, got {', '.join(names)}")
    for name in names:
        if norm not in ATTACKS[name].norms:
            kinds = " and ".join(NORM_NAMES[kind] for kind in ATTACKS[name].norms)
            raise ValueError(f"attacks: {name} is an {kinds} attack; with norm={norm!r} leave it out")
    if not isinstance(budget, AttackBudget):
        raise TypeError(f"budget must be an AttackBudget, got {type(budget).__name__}")
    for field_name in sorted({field_name for name in names for field_name in ATTACKS[name].budget_fields}):
        check_int(getattr(budget, field_name), f"budget.{field_name}")
    return names


def check_radii(eps_values: Sequence[float], norm: str = "linf", name: str = "eps") -> tuple[float, ...]:
    """One or more distinct radii, each > 0 and one the norm allows (at most 1 in L-inf: pixels are in [0, 1])."""
    if isinstance(eps_values, (str, bytes)) or not isinstance(eps_values, Sequence) or not eps_values or any(
            isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0 for eps in eps_values):
        raise ValueError(f"{name} must be one or more positive radii, got {eps_values!r}")
    for eps in eps_values:
        check_radius(eps, norm)
    if len(set(eps_values)) != len(eps_values):
        raise ValueError(f"{name} must not repeat a radius, got {', '.join(f'{255 * e:g}/255' for e in eps_values)}")
    return tuple(eps_values)


@dataclass(frozen=True)
class ThreatModel:
    """What a worst-case evaluation attacks with, as one value that checks itself when it is made: the radii (each
    an evaluation, nested as ``robustness_vs_eps`` nests them), the norm, the attacks (an ensemble name or names of
    the registry) and their budget. ``cliplab evaluate`` and ``cliplab benchmark`` make one from their arguments,
    notebooks 05-07 take the profile's (``Profile.threat_model``); ``evaluate`` runs it."""

    eps: tuple[float, ...]
    norm: str = "linf"
    attacks: str | tuple[str, ...] = "standard"
    budget: AttackBudget = field(default_factory=AttackBudget)

    def __post_init__(self):
        object.__setattr__(self, "eps", check_radii(self.eps, self.norm))
        if not isinstance(self.attacks, str):
            object.__setattr__(self, "attacks", tuple(self.attacks))
        check_attacks(self.attacks, self.norm, self.budget)

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> dict[float, RobustnessReport]:
        """``robustness_vs_eps`` of ``model`` on ``(x, y)`` under this threat model; ``kwargs``: batch_size, votes,
        judge, seed, progress."""
        attacks = self.attacks if isinstance(self.attacks, str) else list(self.attacks)
        return robustness_vs_eps(model, x, y, self.eps, attacks=attacks, norm=self.norm, budget=self.budget, **kwargs)


def check_targets(names: Sequence[str], budget: AttackBudget, num_classes: int) -> None:
    """Where the user names one task and its targets (``cliplab evaluate``): more APGD-T targets than the other
    classes is an error, not something to fit."""
    targeted = any("num_targets" in ATTACKS[name].budget_fields for name in names)
    if targeted and budget.num_targets > num_classes - 1:
        raise ValueError(f"budget.num_targets must be at most the number of classes - 1 ({num_classes - 1}), "
                         f"got {budget.num_targets}")


def fit_to_classes(names: Sequence[str], budget: AttackBudget, num_classes: int) -> tuple[list[str], AttackBudget]:
    """The ensemble ``names`` and its ``budget`` for a task of ``num_classes`` classes, as AutoAttack is run on few
    classes (AutoAttack's own check of the number of classes names the limits): APGD-T aims at no more than the
    C - 1 other classes; its targeted DLR loss needs the 4 largest logits, so with fewer classes APGD-T ascends the
    targeted cross-entropy instead (``apgd-t-ce``); the untargeted DLR needs 3, so with 2 classes APGD-DLR is left
    out (APGD-CE attacks the same images). The registry (``registry.ATTACKS``) holds each attack's limits. A report's
    ``per_attack`` names the attacks that ran."""
    fitted = []
    for name in names:
        while name is not None and num_classes < ATTACKS[name].min_classes:
            name = ATTACKS[name].fewer_classes
        if name is not None:
            fitted.append(name)
    if budget.num_targets > num_classes - 1 and any("num_targets" in ATTACKS[name].budget_fields for name in fitted):
        budget = replace(budget, num_targets=num_classes - 1)
    return fitted, budget


def _check_logits(model, x, device) -> None:
    """A model that returns NaN would make every attack and accuracy meaningless: refuse it at once. One that
    returns probabilities instead of logits is evaluated, with a warning: cross-entropy on probabilities is flat
    where the model is confident, so gradient attacks find less than they should (the worst case still counts every
    attack, but read its APGD-CE and PGD columns with care)."""
    with torch.no_grad(), _torch.eval_mode(model):
        logits = _torch.logits_of(model(x[:8].to(device)), len(x[:8])).float()
    if not torch.isfinite(logits).all():
        raise ValueError("model returned NaN or infinite logits on the clean images: no attack can be evaluated "
                         "against it")
    if looks_like_probabilities(logits):
        warnings.warn("model returns probabilities (every row in [0, 1], summing to 1), not logits: attacks on "
                      "cross-entropy understate what they can do; evaluate a model that returns logits (e.g. the "
                      "log of these probabilities)", stacklevel=3)


def _run_attack(name, model, x, y, *, eps, norm, budget: AttackBudget, seed, early_stop) -> torch.Tensor:
    """The adversarial images of attack ``name`` on one batch; ``early_stop``: each attack drops an image from its
    batch once fooled (for a model judged by one deterministic pass, where that success is final)."""
    return ATTACKS[name].run(model, x, y, budget, eps=eps, norm=norm, seed=seed, early_stop=early_stop).x_adv

"""Accuracy and attack success over many images, in batches, always with sample size and a 95% CI: ``predict``,
``accuracy``, ``attack_dataset`` (PGD over a data set, adversarial images returned), ``attack_success_rate``,
``robust_accuracy`` (a PGD quick look), and ``evaluate_robustness`` (the worst case over an attack ensemble).

Under ``torchrun`` the data-set level functions (all but ``predict`` and ``accuracy``) share the work: each process
attacks every ``world``-th batch, with the seed that batch has in a single process, and the results are summed over
the processes, so every process returns exactly the single-process result (for a deterministic model)."""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import _distributed, _torch
from ._checks import check_choice, check_images, check_int, check_labels, check_nonempty, check_positive, check_seed
from ._stats import clopper_pearson
from .apgd import apgd, apgd_targeted
from .attacks import check_radius, pgd
from .square import square


@dataclass(frozen=True)
class Proportion:
    """A measured proportion (accuracy, success rate) with its sample size.

    Attributes:
        hits: number of successes (correct predictions, successful attacks).
        n: number of trials.
    """

    hits: int
    n: int

    @property
    def value(self) -> float:
        return self.hits / self.n if self.n else float("nan")

    @property
    def ci95(self) -> tuple[float, float]:
        """Exact (Clopper-Pearson) two-sided 95% confidence interval."""
        if self.n == 0:
            return float("nan"), float("nan")
        low, high = clopper_pearson(self.hits, self.n, 0.025)
        return float(low), float(high)

    @classmethod
    def of(cls, hits: torch.Tensor) -> "Proportion":
        """The proportion of True in a boolean tensor (one entry per trial)."""
        return cls(int(hits.sum()), hits.numel())

    def as_dict(self) -> dict:
        """The proportion for a JSON file: value, hits, n, the 95% interval, and the text ``str`` gives."""
        return {"value": self.value, "hits": self.hits, "n": self.n, "ci95": list(self.ci95), "text": str(self)}

    def __str__(self) -> str:
        low, high = self.ci95
        return f"{100 * self.value:.1f}% [{100 * low:.1f}, {100 * high:.1f}] (n={self.n})"


@dataclass(frozen=True)
class RobustAccuracy:
    """Clean and adversarial accuracy on the same images.

    Attributes:
        clean: accuracy on the clean images.
        robust: accuracy on the adversarial images (a misclassified clean image counts as not robust).
        success: untargeted success rate among the images classified correctly when clean.
    """

    clean: Proportion
    robust: Proportion
    success: Proportion


def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256, votes: int = 1,
            autocast: bool = False, progress: bool = False) -> torch.Tensor:
    """Predicted classes, in batches, on the device of the model's parameters. (N,3,H,W) -> (N,) on the CPU.

    ``votes`` > 1 scores a randomised model (a defence with random transformations) as deployed: the
    majority vote of that many stochastic passes, batched together (ties go to the lowest class).
    """
    check_images(x)
    check_int(batch_size, "batch_size")
    check_int(votes, "votes")
    device = _torch.device_of(model, x.device)
    if device.type == "meta":
        raise ValueError("model is on the meta device, which holds no weights and computes no predictions: load it "
                         "on a real device (cpu, cuda)")
    out = []
    with torch.no_grad(), _torch.eval_mode(model), _torch.cast_cache(device):
        for start in tqdm(range(0, len(x), batch_size), disable=not progress, desc="predict"):
            batch = x[start:start + batch_size].to(device)
            with _torch.autocast(device, autocast):
                logits = model(batch.repeat(votes, 1, 1, 1) if votes > 1 else batch)  # (votes*B, C)
            choices = logits.argmax(dim=1).view(votes, len(batch))
            counts = F.one_hot(choices, logits.shape[1]).sum(dim=0)  # (B, C)
            out.append(counts.argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> Proportion:
    """Top-1 accuracy with its sample size. Keyword arguments go to ``predict``."""
    check_images(x)
    check_nonempty(x)
    prediction = predict(model, x, **kwargs)
    check_labels(y, len(x), _torch.num_classes(model, x), "y")
    return Proportion(int((prediction == y.cpu()).sum()), len(y))


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                    batch_size: int = 256, votes: int = 1, surrogate: nn.Module | None = None,
                    progress: bool = True, **attack_kwargs) -> RobustAccuracy:
    """Clean and robust accuracy under an untargeted PGD attack (``cliplab.pgd``), in batches.

    Only correctly classified images are attacked: the others are already errors.

    Args:
        model: the classifier (or a defence wrapping it) under attack, end to end.
        x: (N, 3, H, W) images in [0, 1]; y: (N,) labels.
        eps: threat-model radius; ``attack_kwargs`` (steps, restarts, loss, norm, eot_samples, ...) go
            to ``pgd``.
        batch_size: images per attack batch.
        votes: score clean and adversarial images by the majority vote of this many stochastic passes
            (randomised defences, as deployed); 1 for deterministic models.
        surrogate: craft the attack on this model instead and only evaluate it on ``model`` (a transfer
            attack, e.g. from the undefended classifier); None attacks ``model`` itself.
        progress: show a tqdm bar.
    """
    correct, fooled = _attack_batches(model, x, y, eps=eps, targeted=False, batch_size=batch_size,
                                      votes=votes, surrogate=surrogate, progress=progress, **attack_kwargs)
    n_correct = int(correct.sum())
    return RobustAccuracy(clean=Proportion(n_correct, len(y)),
                          robust=Proportion(n_correct - int(fooled.sum()), len(y)),
                          success=Proportion(int(fooled.sum()), n_correct))


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


def accuracy_curve(reports: Mapping[float, RobustnessReport]) -> dict[float, Proportion]:
    """``{0: clean, eps: worst-case robust, ...}`` from the reports of ``robustness_vs_eps``."""
    return {0: next(iter(reports.values())).clean, **{eps: report.robust for eps, report in reports.items()}}


def format_accuracy_table(rows: Mapping[str, Mapping[float, Proportion]]) -> str:
    """A plain-text table of ``accuracy_vs_eps`` results: one row per model, one column per radius.

    Each cell is ``value [low, high]`` in percent (95% Clopper-Pearson interval, rounded to whole
    points); the header names each radius in units of 1/255 and the sample size(s).
    """
    radii = list(next(iter(rows.values())))
    sizes = sorted({p.n for row in rows.values() for p in row.values()})
    header = ["clean" if eps == 0 else f"{255 * eps:g}/255" for eps in radii]
    cells = {name: [f"{100 * p.value:.0f} [{100 * p.ci95[0]:.0f}, {100 * p.ci95[1]:.0f}]" for p in row.values()]
             for name, row in rows.items()}
    width = max(len(c) for row in cells.values() for c in row)
    name_width = max(len(name) for name in rows)
    lines = [f"accuracy in % [95% CI], n={', '.join(map(str, sizes))} images",
             f"{'':>{name_width}}  " + "  ".join(f"{h:>{width}}" for h in header)]
    lines += [f"{name:<{name_width}}  " + "  ".join(f"{c:>{width}}" for c in row) for name, row in cells.items()]
    return "\n".join(lines)


def attack_success_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                        targets: torch.Tensor | None = None, batch_size: int = 256, votes: int = 1,
                        surrogate: nn.Module | None = None, progress: bool = True,
                        **attack_kwargs) -> Proportion:
    """Success rate of PGD among the images the model classifies correctly when clean.

    Untargeted (``targets`` None): the prediction leaves the label. Targeted: the prediction becomes the
    target; images whose label already is their target are left out. ``votes`` and ``surrogate`` as in
    ``robust_accuracy``.
    """
    targeted = targets is not None
    if targeted:
        check_labels(targets, len(x), _torch.num_classes(model, x), "targets")
    correct, hit = _attack_batches(model, x, y, eps=eps, targets=targets, targeted=targeted,
                                   batch_size=batch_size, votes=votes, surrogate=surrogate, progress=progress,
                                   **attack_kwargs)
    eligible = correct & (targets.cpu() != y.cpu()) if targeted else correct
    return Proportion(int((hit & eligible).sum()), int(eligible.sum()))


def _attack_batches(model, x, y, *, eps, targeted, batch_size, votes, surrogate, progress, targets=None,
                    **attack_kwargs):
    """Attack the correctly classified images (``attack_dataset``); judge success with ``predict`` (and its votes).

    Returns per-image boolean vectors (on the CPU): correct when clean, and attack succeeded.
    """
    _check_dataset_attack(model, x, y, eps, batch_size, attack_kwargs)
    autocast = attack_kwargs.get("autocast", False)

    def judge(images):
        return predict(model, images, batch_size=batch_size, votes=votes, autocast=autocast)

    correct = _judge_everything(judge, x, batch_size, x.device) == y.cpu()  # predict moves each batch itself
    success = torch.zeros(len(x), dtype=torch.bool)
    todo = correct.nonzero().squeeze(1)
    if len(todo):
        labels = (targets if targeted else y)[todo.to(y.device)]
        success[todo] = _attack_dataset(model, x[todo.to(x.device)], labels, eps=eps, targeted=targeted,
                                        batch_size=batch_size, votes=votes, surrogate=surrogate, progress=progress,
                                        **attack_kwargs).success
    return correct, success


@dataclass(frozen=True)
class DatasetAttack:
    """What ``attack_dataset`` returns, one entry per image.

    Attributes:
        x_adv: (N, 3, H, W) adversarial images, on the device of the images attacked.
        prediction: (N,) the model's predictions on ``x_adv`` (with its votes), on the CPU.
        success: (N,) bool on the CPU: the prediction is the target (targeted) or leaves the label (untargeted).
    """

    x_adv: torch.Tensor
    prediction: torch.Tensor
    success: torch.Tensor

    @property
    def success_rate(self) -> Proportion:
        """Successes among all the images attacked."""
        return Proportion.of(self.success)


def attack_dataset(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, targeted: bool = False,
                   batch_size: int = 256, votes: int = 1, surrogate: nn.Module | None = None, progress: bool = True,
                   **attack_kwargs) -> DatasetAttack:
    """PGD (``cliplab.pgd``) on every image of a data set, in batches of ``batch_size``, each batch with the same
    ``seed``; the adversarial images, the model's predictions on them and per-image success.

    Args:
        model: the classifier (or a defence wrapping it) that judges the attack, and is attacked unless
            ``surrogate`` is given.
        x: (N, 3, H, W) images in [0, 1]; y: (N,) labels (untargeted) or targets (``targeted``).
        eps: threat-model radius; ``attack_kwargs`` (steps, restarts, loss, norm, eot_samples, seed, ...) go
            to ``pgd``.
        batch_size: images per attack batch.
        votes: judge by the majority vote of this many stochastic passes (randomised defences, as deployed).
        surrogate: craft the attack on this model and only judge it on ``model`` (a transfer attack).
        progress: show a tqdm bar.
    """
    _check_dataset_attack(model, x, y, eps, batch_size, attack_kwargs)
    return _attack_dataset(model, x, y, eps=eps, targeted=targeted, batch_size=batch_size, votes=votes,
                           surrogate=surrogate, progress=progress, **attack_kwargs)


def _attack_dataset(model, x, y, *, eps, targeted, batch_size, votes, surrogate, progress,
                    **attack_kwargs) -> DatasetAttack:
    """``attack_dataset`` on arguments already checked (``_attack_batches`` checked them on the whole data set)."""
    device = _torch.device_of(model, x.device)
    autocast = attack_kwargs.get("autocast", False)
    x_adv, prediction = torch.zeros_like(x), torch.zeros(len(x), dtype=torch.int64)  # zero: summed over processes
    for start in _bar(_distributed.my_batches(range(0, len(x), batch_size)), progress, f"PGD eps={eps:.4f}"):
        batch = slice(start, start + batch_size)
        result = pgd(model if surrogate is None else surrogate, x[batch].to(device), y[batch].to(device), eps=eps,
                     targeted=targeted, **attack_kwargs)
        x_adv[batch] = result.x_adv.to(x.device)
        prediction[batch] = predict(model, result.x_adv, batch_size=batch_size, votes=votes, autocast=autocast)
    x_adv, prediction = _distributed.sum_over_ranks(x_adv), _distributed.sum_over_ranks(prediction)
    success = prediction == y.cpu() if targeted else prediction != y.cpu()
    return DatasetAttack(x_adv, prediction, success)


def _check_dataset_attack(model, x, y, eps, batch_size, attack_kwargs) -> None:
    """What ``pgd`` would check, checked before the first batch (and even when no image is attacked), in every
    process; and under torchrun, that every process was given the same task."""
    _distributed.on_every_rank(lambda: _check_attack_arguments(model, x, y, eps, batch_size, attack_kwargs),
                               "the attack's arguments")
    _same_task(x, eps=eps, batch_size=batch_size, **attack_kwargs)


def _check_attack_arguments(model, x, y, eps, batch_size, attack_kwargs) -> None:
    check_images(x)
    check_nonempty(x)
    check_labels(y, len(x), _torch.num_classes(model, x), "y")
    check_int(batch_size, "batch_size")
    check_positive(eps, "eps", allow_zero=True)
    for name in ("steps", "restarts", "eot_samples"):
        if name in attack_kwargs:
            check_int(attack_kwargs[name], name)


# The attacks of a worst-case evaluation, and the named ensembles (AutoAttack's "standard" and "rand" versions)
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "square", "pgd")
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


def evaluate_robustness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                        attacks: str | Sequence[str] = "standard", norm: str = "linf",
                        budget: AttackBudget = AttackBudget(), batch_size: int = 256, votes: int = 1,
                        judge: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
                        autocast: bool = False, progress: bool = True) -> RobustnessReport:
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
        autocast: bfloat16 autocast for the attacks.
        progress: a tqdm bar per attack.

    Returns:
        RobustnessReport with the clean, worst-case and per-attack accuracies, each with n and a 95% CI.
    """
    names = _check_evaluation(model, x, y, eps=eps, attacks=attacks, norm=norm, budget=budget, batch_size=batch_size,
                              votes=votes, seed=seed, autocast=autocast)
    early_stop = _success_is_final(votes, judge, budget)
    judge = judge or _vote(model, batch_size, votes, autocast)
    correct = _judge_everything(judge, x, batch_size, _torch.device_of(model, x.device)) == y.cpu()
    return _worst_case(model, x, y, correct, judge, eps=eps, names=names, norm=norm, budget=budget,
                       batch_size=batch_size, early_stop=early_stop, seed=seed, autocast=autocast, progress=progress)


def _success_is_final(votes, judge, budget: AttackBudget) -> bool:
    """Whether an attack may stop on an image as soon as the model misclassifies it: when the model is judged by one
    pass without EOT, the judge sees what the attack saw. A vote, a judge of its own or EOT draws judge a randomised
    model by other draws, where an adversarial image pushed further is likelier to survive the judgement."""
    return votes == 1 and judge is None and budget.eot_samples == 1


def _check_evaluation(model, x, y, *, eps, attacks, norm, budget, batch_size, votes, seed, autocast) -> list[str]:
    """Every argument of ``evaluate_robustness`` checked in every process, the same task in every process, and a
    model that returns finite logits; returns the attack names."""
    names = _distributed.on_every_rank(lambda: _check_robustness_arguments(
        model, x, y, eps=eps, attacks=attacks, norm=norm, budget=budget, batch_size=batch_size, votes=votes,
        seed=seed), "the evaluation's arguments")
    _same_task(x, eps=eps, attacks=names, norm=norm, budget=budget, batch_size=batch_size, votes=votes, seed=seed)
    _check_logits(model, x, _torch.device_of(model, x.device), autocast)
    return names


def _vote(model, batch_size, votes, autocast) -> Callable[[torch.Tensor], torch.Tensor]:
    """The default judge: ``predict`` with ``votes``."""
    return lambda images: predict(model, images, batch_size=batch_size, votes=votes, autocast=autocast)


def _worst_case(model, x, y, correct, judge, *, eps, names, norm, budget, batch_size, early_stop, seed, autocast,
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
        for start in _bar(_distributed.my_batches(range(0, len(todo), batch_size)), progress,
                          f"{name} eps={255 * eps:g}/255"):
            index = todo[start:start + batch_size]
            x_adv = _run_attack(name, model, x[index].to(device), y[index].to(device), eps=eps, norm=norm,
                                budget=budget, seed=seed + start, autocast=autocast, early_stop=early_stop)
            fell[index] = _judged(judge, x_adv, device) != labels[index]
        standing &= ~_distributed.sum_over_ranks(fell)
        per_attack[name] = Proportion(int(standing.sum()), len(y))
    robust = Proportion(int(standing.sum()), len(y))
    return RobustnessReport(clean, robust, per_attack, standing, eps, norm)


def robustness_vs_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_values: Sequence[float], *,
                      attacks: str | Sequence[str] = "standard", norm: str = "linf",
                      budget: AttackBudget = AttackBudget(), batch_size: int = 256, votes: int = 1,
                      judge: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
                      autocast: bool = False, progress: bool = True) -> dict[float, RobustnessReport]:
    """``evaluate_robustness`` at each radius of ``eps_values`` (each > 0, in [0, 1] pixel units), the radii nested.

    The threat models are nested: an image broken at a radius is broken at every larger one by the same adversarial
    image, so, from the smallest radius up, each radius attacks only the images that survived the one below it (the
    others count as broken, reported as ``per_attack["smaller radii"]``) and the clean images are judged once. Each
    worst case is thus the same or lower than an evaluation of that radius alone would give, for less work.

    Keyword arguments as for ``evaluate_robustness``. Returns the reports in the order of ``eps_values``.
    """
    if not eps_values or any(not isinstance(eps, (int, float)) or eps <= 0 for eps in eps_values):
        raise ValueError(f"eps_values must be a non-empty sequence of positive radii, got {eps_values!r}")
    if len(set(eps_values)) != len(eps_values):
        raise ValueError(f"eps_values must not repeat a radius, got {eps_values!r}")
    names = _check_evaluation(model, x, y, eps=max(eps_values), attacks=attacks, norm=norm, budget=budget,
                              batch_size=batch_size, votes=votes, seed=seed, autocast=autocast)
    early_stop = _success_is_final(votes, judge, budget)
    judge = judge or _vote(model, batch_size, votes, autocast)
    correct = _judge_everything(judge, x, batch_size, _torch.device_of(model, x.device)) == y.cpu()
    reports, standing = {}, None
    for eps in sorted(eps_values):
        reports[eps] = _worst_case(model, x, y, correct, judge, eps=eps, names=names, norm=norm, budget=budget,
                                   batch_size=batch_size, early_stop=early_stop, seed=seed, autocast=autocast,
                                   progress=progress, standing=standing)
        standing = reports[eps].standing
    return {eps: reports[eps] for eps in eps_values}


def robustness_table(reports: Mapping[str, RobustnessReport]) -> str:
    """A Markdown table, one row per report (e.g. per eps or per model): clean, each attack, the worst case.

    Each cell is ``value% [low, high]`` (95% Clopper-Pearson interval); the header gives n."""
    attacks = list(dict.fromkeys(name for report in reports.values() for name in report.per_attack))
    sizes = sorted({report.clean.n for report in reports.values()})
    header = ["", "clean", *[f"after {name}" for name in attacks], "worst case"]
    lines = [f"robust accuracy in % [95% CI], n={', '.join(map(str, sizes))} images; each attack runs on the "
             "images the earlier ones left standing", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, report in reports.items():
        cells = [report.clean, *[report.per_attack.get(name) for name in attacks], report.robust]
        lines.append(f"| {label} | " + " | ".join(_cell(p) for p in cells) + " |")
    return "\n".join(lines)


def _cell(proportion: Proportion | None) -> str:
    if proportion is None:
        return "-"
    low, high = proportion.ci95
    return f"{100 * proportion.value:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _check_robustness_arguments(model, x, y, *, eps, attacks, norm, budget, batch_size, votes, seed) -> list[str]:
    """Every argument checked before any attack runs; returns the attack names."""
    check_images(x)
    check_nonempty(x)
    check_radius(eps, norm)
    num_classes = _torch.num_classes(model, x)
    names = check_attack_plan(attacks, norm, budget, num_classes)
    check_labels(y, len(x), num_classes, "y")
    check_int(batch_size, "batch_size")
    check_int(votes, "votes")
    check_seed(seed)
    return names


def check_attack_plan(attacks: str | Sequence[str], norm: str, budget: AttackBudget, num_classes: int) -> list[str]:
    """The attacks of an ensemble name or list, checked against the norm, the budget and the number of classes
    (also before any model is built: ``cliplab evaluate``); returns their names."""
    if isinstance(attacks, str):
        check_choice(attacks, "attacks", ENSEMBLES)
        names = list(ENSEMBLES[attacks])
    else:
        names = list(attacks)
        for name in names:
            check_choice(name, "each of attacks", ATTACKS)
        if len(set(names)) != len(names):  # a second run would look like a second attack in the report
            raise ValueError(f"attacks must not repeat an attack, got {', '.join(names)}")
    if "square" in names and norm != "linf":
        raise ValueError(f"attacks: square is an L-inf attack; with norm={norm!r} leave it out")
    if not isinstance(budget, AttackBudget):
        raise TypeError(f"budget must be an AttackBudget, got {type(budget).__name__}")
    for name in ("steps", "num_targets", "queries", "restarts", "eot_samples", "pgd_steps", "pgd_restarts"):
        check_int(getattr(budget, name), f"budget.{name}")
    if "apgd-t" in names and budget.num_targets > num_classes - 1:
        raise ValueError(f"budget.num_targets must be at most the number of classes - 1 ({num_classes - 1}), "
                         f"got {budget.num_targets}")
    return names


def _check_logits(model, x, device, autocast) -> None:
    """A model that returns NaN would make every attack and accuracy meaningless: refuse it at once. One that
    returns probabilities instead of logits is evaluated, with a warning: cross-entropy on probabilities is flat
    where the model is confident, so gradient attacks find less than they should (the worst case still counts every
    attack, but read its APGD-CE and PGD columns with care)."""
    with torch.no_grad(), _torch.eval_mode(model), _torch.autocast(device, autocast):
        logits = model(x[:8].to(device)).float()
    if not torch.isfinite(logits).all():
        raise ValueError("model returned NaN or infinite logits on the clean images: no attack can be evaluated "
                         "against it")
    if looks_like_probabilities(logits):
        warnings.warn("model returns probabilities (every row in [0, 1], summing to 1), not logits: attacks on "
                      "cross-entropy understate what they can do; evaluate a model that returns logits (e.g. the "
                      "log of these probabilities)", stacklevel=3)


def looks_like_probabilities(outputs: torch.Tensor) -> bool:
    """Whether (N, C) model outputs are rows of probabilities rather than logits."""
    return bool(((outputs >= 0) & (outputs <= 1)).all() and torch.allclose(outputs.sum(dim=1),
                                                                          torch.ones(len(outputs), device=outputs.device),
                                                                          atol=1e-3))


def _judged(judge, images, device) -> torch.Tensor:
    return judge(images.to(device)).cpu()


def _judge_everything(judge, x, batch_size, device) -> torch.Tensor:
    """The judge's predictions on all of ``x``, on the CPU: one call in a single process (a judge may batch as it
    likes); under torchrun each process judges its batches of ``batch_size`` and the predictions are summed."""
    if _distributed.rank_and_size()[1] == 1:
        return _judged(judge, x, device)
    prediction = torch.zeros(len(x), dtype=torch.int64)
    for start in _distributed.my_batches(range(0, len(x), batch_size)):
        prediction[start:start + batch_size] = _judged(judge, x[start:start + batch_size], device)
    return _distributed.sum_over_ranks(prediction)


def _same_task(x, **settings) -> None:
    """Under torchrun: refuse to start unless every process was given the same images and settings (otherwise they
    would split different batch lists and wait for each other forever)."""
    _distributed.check_same_everywhere({"images": tuple(x.shape), **{k: v for k, v in settings.items()
                                                                      if not isinstance(v, torch.Tensor)}},
                                       "the evaluation's images and settings")


def _bar(batches, progress: bool, description: str):
    """A tqdm bar over this process's batches, shown by the main process only."""
    return tqdm(batches, disable=not (progress and _distributed.is_main()), desc=description)


def _run_attack(name, model, x, y, *, eps, norm, budget: AttackBudget, seed, autocast, early_stop) -> torch.Tensor:
    """The adversarial images of attack ``name`` on one batch; ``early_stop``: each attack drops an image from its
    batch once fooled (for a model judged by one deterministic pass, where that success is final)."""
    common = dict(eps=eps, seed=seed, autocast=autocast, early_stop=early_stop)
    if name == "square":
        return square(model, x, y, queries=budget.queries, **common).x_adv
    if name == "pgd":
        return pgd(model, x, y, steps=budget.pgd_steps, restarts=budget.pgd_restarts, loss="margin", norm=norm,
                   eot_samples=budget.eot_samples, **common).x_adv
    if name == "apgd-t":
        return apgd_targeted(model, x, y, steps=budget.steps, num_targets=budget.num_targets, norm=norm,
                             eot_samples=budget.eot_samples, **common).x_adv
    return apgd(model, x, y, steps=budget.steps, loss=name.removeprefix("apgd-"), norm=norm,
                restarts=budget.restarts, eot_samples=budget.eot_samples, **common).x_adv

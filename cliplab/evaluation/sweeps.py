"""PGD over a data set, in batches, always with sample size and a 95% CI: ``attack_success_rate``,
``attack_dataset`` (adversarial images returned), ``pgd_accuracy`` (a PGD quick look), and ``PGDSweep``, the typed PGD
settings of the study's sweeps. The worst case over an ensemble is ``ensemble``'s.

Under ``torchrun`` these functions share the work: each process attacks every ``world``-th batch, with the seed that
batch has in a single process, and the results are summed over the processes, so every process returns exactly the
single-process result (for a deterministic model).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import _distributed, _torch
from .._arguments import check_images, check_int, check_labels, check_nonempty, check_positive
from ..attacks.pgd import pgd
from .prediction import check_same_task, judge_all, predict, progress_bar
from .statistics import Proportion


@dataclass(frozen=True)
class RobustAccuracy:
    """Clean and adversarial accuracy on the same images: ``clean`` on the clean images, ``robust`` on the
    adversarial ones (a misclassified clean image counts as not robust), and ``success``, the untargeted success
    rate among the images classified correctly when clean."""

    clean: Proportion
    robust: Proportion
    success: Proportion


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
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


def attack_success_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                        targets: torch.Tensor | None = None, batch_size: int = 256, votes: int = 1,
                        surrogate: nn.Module | None = None, progress: bool = True,
                        **attack_kwargs) -> Proportion:
    """Success rate of PGD among the images the model classifies correctly when clean.

    Untargeted (``targets`` None): the prediction leaves the label. Targeted: the prediction becomes the
    target; images whose label already is their target are left out. ``votes`` and ``surrogate`` as in
    ``pgd_accuracy``.
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

    def judge(images):
        return predict(model, images, batch_size=batch_size, votes=votes)

    correct = judge_all(judge, x, batch_size, x.device) == y.cpu()  # predict moves each batch itself
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
    x_adv, prediction = torch.zeros_like(x), torch.zeros(len(x), dtype=torch.int64)  # zero: summed over processes
    for start in progress_bar(_distributed.my_batches(range(0, len(x), batch_size)), progress, f"PGD eps={eps:.4f}"):
        batch = slice(start, start + batch_size)
        result = pgd(model if surrogate is None else surrogate, x[batch].to(device), y[batch].to(device), eps=eps,
                     targeted=targeted, **attack_kwargs)
        x_adv[batch] = result.x_adv.to(x.device)
        prediction[batch] = predict(model, result.x_adv, batch_size=batch_size, votes=votes)
    x_adv, prediction = _distributed.sum_over_ranks(x_adv), _distributed.sum_over_ranks(prediction)
    success = prediction == y.cpu() if targeted else prediction != y.cpu()
    return DatasetAttack(x_adv, prediction, success)


def _check_dataset_attack(model, x, y, eps, batch_size, attack_kwargs) -> None:
    """What ``pgd`` would check, checked before the first batch (and even when no image is attacked), in every
    process; and under torchrun, that every process was given the same task."""
    _distributed.on_every_rank(lambda: _check_attack_arguments(model, x, y, eps, batch_size, attack_kwargs),
                               "the attack's arguments")
    check_same_task(x, eps=eps, batch_size=batch_size, **attack_kwargs)


def _check_attack_arguments(model, x, y, eps, batch_size, attack_kwargs) -> None:
    check_images(x)
    check_nonempty(x)
    check_labels(y, len(x), _torch.num_classes(model, x), "y")
    check_int(batch_size, "batch_size")
    check_positive(eps, "eps", allow_zero=True)
    for name in ("steps", "restarts", "eot_samples"):
        if name in attack_kwargs:
            check_int(attack_kwargs[name], name)


@dataclass(frozen=True)
class PGDSweep:
    """The PGD settings of the study's success-rate sweeps (01, 02) and data-set attacks (04).

    Attributes:
        steps: PGD steps.
        batch_size: images per attack batch.
        votes: judge each attack by the majority vote of this many stochastic passes (randomised defences).
        early_stop: stop updating an image once the attack succeeds (faster; the same success rate).
        seed: seed of every batch's random start.
    """

    steps: int
    batch_size: int
    votes: int = 1
    early_stop: bool = False
    seed: int = 0

    def _pgd(self) -> dict:
        return dict(steps=self.steps, batch_size=self.batch_size, votes=self.votes, early_stop=self.early_stop,
                    seed=self.seed, progress=False)

    def attack_success_rate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                            targets: torch.Tensor | None = None, eot_samples: int = 1,
                            surrogate: nn.Module | None = None) -> Proportion:
        """``attack_success_rate`` with these settings: among the images ``model`` classifies correctly."""
        return attack_success_rate(model, x, y, eps=eps, targets=targets, eot_samples=eot_samples,
                                   surrogate=surrogate, **self._pgd())

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, targeted: bool = False,
               eot_samples: int = 1) -> DatasetAttack:
        """``attack_dataset`` with these settings: every image, adversarial images and predictions returned."""
        return attack_dataset(model, x, y, eps=eps, targeted=targeted, eot_samples=eot_samples, **self._pgd())

"""Accuracy and attack success over many images, in batches, always with sample size and a 95% CI."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.stats import beta
from torch import nn
from tqdm.auto import tqdm

from ._checks import check_images, check_int, check_labels, check_nonempty, check_positive
from . import _torch
from .attacks import _num_classes, eval_mode, pgd


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
        low = beta.ppf(0.025, self.hits, self.n - self.hits + 1) if self.hits > 0 else 0.0
        high = beta.ppf(0.975, self.hits + 1, self.n - self.hits) if self.hits < self.n else 1.0
        return float(low), float(high)

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
    out = []
    with torch.no_grad(), eval_mode(model), _torch.cast_cache(device):
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
    check_labels(y, len(x), _num_classes(model, x), "y")
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
    """Clean accuracy (key 0) and robust accuracy at each radius of ``eps_values``, one attack per radius.

    Args:
        model, x, y: as for ``robust_accuracy``.
        eps_values: threat-model radii (each > 0), in [0, 1] pixel units.
        **kwargs: go to ``robust_accuracy`` (batch size, votes, progress) and on to ``pgd``.

    Returns:
        ``{0: clean, eps: robust, ...}``, each a ``Proportion`` of ``len(y)`` images.
    """
    if not eps_values or any(eps <= 0 for eps in eps_values):
        raise ValueError(f"eps_values must be a non-empty sequence of positive radii, got {eps_values!r}")
    results = {eps: robust_accuracy(model, x, y, eps=eps, **kwargs) for eps in eps_values}
    return {0: next(iter(results.values())).clean, **{eps: result.robust for eps, result in results.items()}}


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
        check_labels(targets, len(x), _num_classes(model, x), "targets")
    correct, hit = _attack_batches(model, x, y, eps=eps, targets=targets, targeted=targeted,
                                   batch_size=batch_size, votes=votes, surrogate=surrogate, progress=progress,
                                   **attack_kwargs)
    eligible = correct & (targets.cpu() != y.cpu()) if targeted else correct
    return Proportion(int((hit & eligible).sum()), int(eligible.sum()))


def _attack_batches(model, x, y, *, eps, targeted, batch_size, votes, surrogate, progress, targets=None,
                    **attack_kwargs):
    """Attack the correctly classified images batch by batch; judge success with ``predict`` (and its votes).

    Returns per-image boolean vectors (on the CPU): correct when clean, and attack succeeded.
    """
    check_images(x)
    check_nonempty(x)
    check_labels(y, len(x), _num_classes(model, x), "y")
    check_int(batch_size, "batch_size")
    # the attack's own checks run only if some image is classified correctly: its numbers are checked here too
    check_positive(eps, "eps", allow_zero=True)
    for name in ("steps", "restarts", "eot_samples"):
        if name in attack_kwargs:
            check_int(attack_kwargs[name], name)
    device = _torch.device_of(model, x.device)
    autocast = attack_kwargs.get("autocast", False)
    correct = predict(model, x, batch_size=batch_size, votes=votes, autocast=autocast) == y.cpu()
    success = torch.zeros(len(x), dtype=torch.bool)
    todo = correct.nonzero().squeeze(1)
    for start in tqdm(range(0, len(todo), batch_size), disable=not progress, desc=f"PGD eps={eps:.4f}"):
        index = todo[start:start + batch_size]
        labels = (targets if targeted else y)[index]
        result = pgd(model if surrogate is None else surrogate, x[index].to(device), labels.to(device), eps=eps, targeted=targeted,
                     **attack_kwargs)
        prediction = predict(model, result.x_adv, batch_size=batch_size, votes=votes, autocast=autocast)
        success[index] = prediction == labels.cpu() if targeted else prediction != labels.cpu()
    return correct, success

"""Square Attack (Andriushchenko et al. 2020): a black-box L-inf attack that never looks at a gradient.

It changes a random square window of the perturbation to a new corner of the eps-ball and keeps the change when
the margin drops. Needing only forward passes, it is blind to gradient masking: a model that holds out against
APGD but falls to Square has hidden its gradients, not become robust (AutoAttack's reason to include it).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import _torch
from .._arguments import check_int, check_labels
from .common import AttackResult, attack_objective, check_threat_model

P_INIT = 0.8  # fraction of the pixels the first windows cover (the paper's ImageNet setting)
# the window's fraction halves at these points of a 10,000-query run (rescaled to the run's length)
HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, queries: int = 5000,
           seed: int | None = None, early_stop: bool = False) -> AttackResult:
    """Untargeted Square Attack in L-inf: random search on the margin loss, one batch of windows per query.

    Args:
        model: maps (N, 3, H, W) images in [0, 1] to (N, C) logits; only its outputs are used.
        x: (N, 3, H, W) clean images in [0, 1]; y: (N,) labels to leave.
        eps: L-inf radius in [0, 1] pixel units.
        queries: forward passes per image (AutoAttack: 5,000), the stripes' initial one included.
        seed: seeds the windows and signs (None: the global generator).
        early_stop: stop querying a sample once it is fooled (its image no longer changes anyway): fewer passes,
            the same result; waits for the device once per query.

    Returns:
        AttackResult: success means misclassified; ``loss_history`` is (1, queries, N), the margin of the best
        logit over the label's (positive once fooled), at every query.

    Without ``early_stop``, samples already fooled keep being queried, masked rather than dropped, so the loop never
    waits for the device.
    """
    check_threat_model(model, x, eps, "linf", seed)
    check_int(queries, "queries")
    check_labels(y, len(x), _torch.num_classes(model, x), "y")
    y = y.to(device=x.device, dtype=torch.int64)
    generator = torch.Generator(x.device).manual_seed(seed) if seed is not None else None
    with _torch.eval_mode(model), _torch.cast_cache(x.device):
        return _square_run(model, x, y, eps=eps, queries=queries, generator=generator, early_stop=early_stop)


def _square_run(model, x, y, *, eps, queries, generator, early_stop) -> AttackResult:
    """The random search; every decision is a per-sample tensor mask, so the loop never waits for the device, except
    ``early_stop``: each query then asks which samples are still standing. The windows and signs are drawn for every
    sample either way, so that a sample's search is the same whatever else is in the batch."""
    n, channels, height, width = x.shape

    def margin(images, labels):
        with torch.no_grad():
            logits = _torch.logits_of(model(images), len(images)).float()
        return attack_objective(logits, labels, "margin", targeted=False), logits

    def signs(*shape):
        return torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1

    delta = (eps * signs(n, channels, 1, width)).expand_as(x).clone()  # vertical stripes: the paper's initialisation
    x_best = (x + delta).clamp(0, 1)
    best, logits = margin(x_best, y)
    history = [best]
    rows, cols = torch.arange(height, device=x.device), torch.arange(width, device=x.device)
    for query in range(1, queries):
        side = _window_side(query, queries, height * width, height)
        top = torch.randint(0, height - side + 1, (n, 1), generator=generator, device=x.device)
        left = torch.randint(0, width - side + 1, (n, 1), generator=generator, device=x.device)
        corner = eps * signs(n, channels, 1, 1)
        at = (best < 0).nonzero().squeeze(1) if early_stop else slice(None)  # the samples queried
        if early_stop and len(at) == 0:
            history.append(best)
            continue
        top, left = top[at], left[at]
        window = (((rows >= top) & (rows < top + side))[:, :, None]
                  & ((cols >= left) & (cols < left + side))[:, None, :])[:, None]  # (N, 1, H, W)
        candidate_delta = torch.where(window, corner[at], delta[at])
        candidate = (x[at] + candidate_delta).clamp(0, 1)
        value, candidate_logits = margin(candidate, y[at])
        better = (value > best[at]) & (best[at] < 0)  # a fooled sample keeps its adversarial image
        delta[at] = torch.where(better.view(-1, 1, 1, 1), candidate_delta, delta[at])
        x_best[at] = torch.where(better.view(-1, 1, 1, 1), candidate, x_best[at])
        logits[at] = torch.where(better[:, None], candidate_logits, logits[at])
        best = best.clone()
        best[at] = torch.where(better, value, best[at])
        history.append(best)
    return AttackResult(x_best, logits.argmax(dim=1) != y, torch.stack(history)[None], logits)


def _window_side(query: int, queries: int, pixels: int, height: int) -> int:
    """Side of the square window at ``query``: covering a fraction p of the image, halved on the paper's schedule."""
    progress = int(query / queries * 10_000)
    p = P_INIT / 2 ** sum(progress > h for h in HALVINGS)
    return min(max(round(math.sqrt(p * pixels)), 1), height - 1)

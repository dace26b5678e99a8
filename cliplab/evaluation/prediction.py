"""Predictions over many images, in batches: ``predict`` (optionally the majority vote of several stochastic
passes), ``accuracy``, and the helpers the sweeps and the ensemble share (judging images with any prediction rule,
progress bars, the check that every process of a torchrun job has the same task).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import _distributed, _torch
from .._arguments import check_images, check_int, check_labels, check_nonempty
from .statistics import Proportion


def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256, votes: int = 1,
            progress: bool = False) -> torch.Tensor:
    """Predicted classes, in batches, on the device of the model's parameters. (N,3,H,W) -> (N,) on the CPU.

    ``votes`` > 1 scores a randomised model (a defence with random transformations) as deployed: the
    majority vote of that many stochastic passes, batched together (ties go to the lowest class).
    """
    check_images(x)
    check_int(batch_size, "batch_size")
    check_int(votes, "votes")
    device = _torch.computing_device(model, x.device)
    out = []
    with torch.no_grad(), _torch.eval_mode(model), _torch.cast_cache(device):
        for start in tqdm(range(0, len(x), batch_size), disable=not progress, desc="predict"):
            batch = x[start:start + batch_size].to(device)
            logits = _torch.logits_of(model(batch.repeat(votes, 1, 1, 1) if votes > 1 else batch),
                                      votes * len(batch))  # (votes*B, C)
            choices = logits.argmax(dim=1).view(votes, len(batch))
            counts = F.one_hot(choices, logits.shape[1]).sum(dim=0)  # (B, C)
            out.append(counts.argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def predict_each(model: nn.Module, images: torch.Tensor, **kwargs) -> torch.Tensor:
    """``predict`` on a stack of image sets, e.g. one set per denoiser setting (``bilateral_sweep``), as one
    sequence of batches. (S, N, 3, H, W) -> (S, N); ``kwargs`` as for ``predict``."""
    if images.dim() != 5:
        raise ValueError(f"images must be a (S, N, 3, H, W) stack of image sets, got shape {tuple(images.shape)}")
    return predict(model, images.flatten(0, 1), **kwargs).view(images.shape[:2])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> Proportion:
    """Top-1 accuracy with its sample size. Keyword arguments go to ``predict``."""
    check_images(x)
    check_nonempty(x)
    prediction = predict(model, x, **kwargs)
    check_labels(y, len(x), _torch.num_classes(model, x), "y")
    return Proportion(int((prediction == y.cpu()).sum()), len(y))


def looks_like_probabilities(outputs: torch.Tensor) -> bool:
    """Whether (N, C) model outputs are rows of probabilities rather than logits."""
    return bool(((outputs >= 0) & (outputs <= 1)).all() and torch.allclose(outputs.sum(dim=1),
                                                                          torch.ones(len(outputs), device=outputs.device),
                                                                          atol=1e-3))


def judged(judge, images, device) -> torch.Tensor:
    return judge(images.to(device)).cpu()


def judge_all(judge, x, batch_size, device) -> torch.Tensor:
    """The judge's predictions on all of ``x``, on the CPU: one call in a single process (a judge may batch as it
    likes); under torchrun each process judges its batches of ``batch_size`` and the predictions are summed."""
    if _distributed.rank_and_size()[1] == 1:
        return judged(judge, x, device)
    prediction = torch.zeros(len(x), dtype=torch.int64)
    for start in _distributed.my_batches(range(0, len(x), batch_size)):
        prediction[start:start + batch_size] = judged(judge, x[start:start + batch_size], device)
    return _distributed.sum_over_ranks(prediction)


def check_same_task(x, **settings) -> None:
    """Under torchrun: refuse to start unless every process was given the same images and settings (otherwise they
    would split different batch lists and wait for each other forever)."""
    _distributed.check_same_everywhere({"images": tuple(x.shape), **{k: v for k, v in settings.items()
                                                                      if not isinstance(v, torch.Tensor)}},
                                       "the evaluation's images and settings")


def progress_bar(batches, progress: bool, description: str):
    """A tqdm bar over this process's batches, shown by the main process only."""
    return tqdm(batches, disable=not (progress and _distributed.is_main()), desc=description)

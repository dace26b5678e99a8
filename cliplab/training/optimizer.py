"""Optimisation pieces shared by the tiny-CLIP recipe and robust fine-tuning."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def adamw(parameters: Iterable[nn.Parameter], *, lr: float, weight_decay: float, warmup: int, total: int):
    """AdamW without weight decay on 1-D parameters (biases, norms, scales), with warm-up + cosine."""
    parameters = [p for p in parameters if p.requires_grad]
    groups = [{"params": [p for p in parameters if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
    return optimizer, schedule

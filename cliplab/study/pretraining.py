"""The recipe that trained the `shapes` profile's tiny CLIP from scratch: contrastive pre-training on Shapes-100
captions (``train_shapes_clip(ShapesCLIPConfig())``, ``cliplab train-shapes-clip``), whose output ships as
``cliplab/weights/cliplab-shapes-tiny.safetensors`` (``shapes_clip``)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._arguments import check_int
from ..data import load_dataset
from ..shapes100 import SHAPES100_CLASSES, SHAPES100_TEMPLATES
from ..shapes_clip import MODEL_NAME, register_model_configs
from ..training.optimizer import adamw


@dataclass
class ShapesCLIPConfig:
    steps: int = 2000  # optimiser steps
    batch_size: int = 256  # images per step
    lr: float = 1e-3  # peak AdamW learning rate
    warmup: int = 100  # linear warm-up steps before the cosine decay
    weight_decay: float = 0.05  # AdamW weight decay on matrices (not on 1-D parameters)
    train_images: int = 50_000  # size of the Shapes-100 training split used
    seed: int = 0  # seeds model initialisation, batch order and caption choice
    progress: bool = True  # show a tqdm bar


def caption_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor,
                 logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (Radford et al. 2021) where every caption of the same class is a positive.

    Plain CLIP treats the other images of a batch as negatives, but with 100 classes a batch of 256 holds
    many images of one class; their captions are true matches, so the targets spread over them.

    Shape: image_emb, text_emb (B, D) L2-normalised; labels (B,).
    """
    logits = logit_scale * image_emb @ text_emb.T  # (B, B)
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def train_shapes_clip(config: ShapesCLIPConfig = ShapesCLIPConfig()):
    """Train the tiny CLIP on Shapes-100 captions such as "a photo of a red triangle.".

    Returns:
        The trained open_clip model (on the CPU, in eval mode).
    """
    import open_clip

    for name in ("steps", "batch_size"):
        check_int(getattr(config, name), name)  # 0 steps would save an untrained model

    register_model_configs()
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    model = open_clip.create_model(MODEL_NAME)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    x, y, _ = load_dataset("shapes", split="train", n=config.train_images)
    optimizer, schedule = adamw(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                warmup=config.warmup, total=config.steps)
    model.train()
    bar = tqdm(range(config.steps), disable=not config.progress, desc="train shapes CLIP")
    for _ in bar:
        index = torch.randint(len(x), (config.batch_size,))
        labels = y[index]
        captions = [rng.choice(SHAPES100_TEMPLATES).format(SHAPES100_CLASSES[c]) for c in labels.tolist()]
        image_emb = model.encode_image(_normalise(model, x[index]), normalize=True)
        text_emb = model.encode_text(tokenizer(captions), normalize=True)
        loss = caption_loss(image_emb, text_emb, labels, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def _normalise(model, x: torch.Tensor) -> torch.Tensor:
    """Shapes-100 is already at the model's 32x32 input size: only normalisation is needed."""
    mean = torch.tensor(model.visual.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.image_std).view(1, 3, 1, 1)
    return (x - mean) / std

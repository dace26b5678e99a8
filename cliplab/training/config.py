"""``FinetuneConfig``: every setting of a robust fine-tuning run (``validate`` checks them all)."""
from __future__ import annotations

from dataclasses import dataclass, fields

from .. import _distributed
from .._arguments import check_choice, check_int, check_positive

METHODS, ADAPTERS = ("fare", "tecoa"), ("full", "oft", "lora", "last-k", "bitfit")
# each adapter's size setting (``training.adapters``); a run's settings leave out the others' (``runs.run_settings``)
ADAPTER_SIZES = {"oft": "block_size", "lora": "rank", "last-k": "blocks"}


def unused_sizes(adapter: str) -> set[str]:
    """The size settings of the adapters other than ``adapter``: they mean nothing to its run."""
    return {size for owner, size in ADAPTER_SIZES.items() if owner != adapter}


@dataclass
class FinetuneConfig:
    method: str = "fare"  # "fare" (unsupervised) or "tecoa" (supervised)
    adapter: str = "full"  # what is trained (training.adapters): full, oft, lora, last-k or bitfit
    block_size: int = 8  # OFT block size (must divide the encoder's widths)
    rank: int = 8  # LoRA rank (below every adapted weight's sides)
    blocks: int = 1  # last-k: the last this many transformer blocks (at most the depth)
    eps: float = 4 / 255  # L-inf radius of the inner attack, on [0, 1] images
    attack_steps: int = 10  # inner PGD steps
    clean_weight: float = 0.0  # FARE: weight of the clean term ||f(x) - f0(x)||^2
    steps: int = 300  # optimiser steps
    batch_size: int = 64  # images per step: the global batch, over all processes under torchrun
    lr: float = 1e-4  # peak AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay on matrices (not on 1-D parameters)
    warmup: int = 30  # linear warm-up steps before the cosine decay
    grad_clip: float = 1.0  # maximum gradient norm
    save_every: int = 50  # checkpoint period in steps
    eval_every: int = 0  # clean and robust accuracy on held-out images every this many steps (0: never)
    seed: int = 0  # seeds batch order and attack starts
    progress: bool = True  # tqdm bar with loss and running clean/robust accuracy

    def __str__(self) -> str:
        """The dataclass's repr without the size settings of the other adapters (``blocks=1`` beside
        ``adapter='full'`` would read as one block trained)."""
        unused = unused_sizes(self.adapter)
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name not in unused)
        return f"{type(self).__name__}({shown})"

    def validate(self) -> None:
        check_choice(self.method, "method", METHODS)
        check_choice(self.adapter, "adapter", ADAPTERS)
        for name in ADAPTER_SIZES.values():
            check_int(getattr(self, name), name)
        check_positive(self.eps, "eps", allow_zero=True)
        if not 0 < self.eps <= 1:  # radius 0 would train on clean images and call the result adversarial
            raise ValueError(f"eps must be in (0, 1] (pixel values are in [0, 1]; adversarial fine-tuning needs a "
                             f"radius), got {self.eps}")
        for name in ("attack_steps", "steps", "batch_size", "save_every"):
            check_int(getattr(self, name), name)
        check_int(self.warmup, "warmup", minimum=0)
        check_int(self.eval_every, "eval_every", minimum=0)
        check_positive(self.lr, "lr")
        check_positive(self.weight_decay, "weight_decay", allow_zero=True)
        check_positive(self.clean_weight, "clean_weight", allow_zero=True)
        check_positive(self.grad_clip, "grad_clip")
        world = _distributed.rank_and_size()[1]
        if self.batch_size % world:
            raise ValueError(f"batch_size is the global batch, split evenly over the {world} processes: it must be "
                             f"a multiple of {world}, got {self.batch_size}")

"""The two profiles: one code path, different model, data and budgets.

Notebooks call ``get_profile()``, which reads the settings ``cliplab reproduce`` passes to their kernels as
environment variables (``profile_environment`` writes them), so the same notebook runs the offline toy study,
the real one, or a smoke run of either. A profile is the study layer's configuration: ``load_classifier()`` and
``load_dataset()`` load what it names (weights, data directory, device, precision); ``sweep()``,
``attack_budget()`` and ``finetune_config()`` give the typed settings of its attacks, evaluations and fine-tuning;
``figures`` is where its notebooks save their figures. Only this module and the command line read the environment.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .._arguments import check_choice
from .._torch import PRECISIONS


@dataclass(frozen=True)
class Profile:
    name: str  # profile name; also the model (load_classifier) and data set (load_dataset) it uses
    n_eval: int  # test images behind every reported accuracy or success rate
    batch_size: int  # images per attack batch
    attack_steps: int  # PGD steps for the sweeps
    restarts: int  # restarts of the PGD quick look that 05 and 06 compare with the worst case
    eval_steps: int  # APGD iterations of every worst-case evaluation (AutoAttack: 100)
    eval_targets: int  # target classes of its APGD-T, the likeliest first (AutoAttack: 9)
    eval_queries: int  # queries per image of its black-box Square attack (AutoAttack: 5,000)
    eps_grid: tuple[float, ...]  # L-inf radii of the sweeps, in units of 1/255
    target_class: str  # the class the targeted attack of notebook 01 aims for
    n_defence: int  # test images behind the defence sweeps (02-04), where EOT multiplies the cost
    eot_samples: int  # EOT draws of every reported adaptive attack on a randomised defence (>= 20)
    eot_grid: tuple[int, ...]  # EOT draws compared in 02
    votes: int  # stochastic passes whose majority vote scores a randomised defence, as deployed
    smoothing_sigmas: tuple[float, ...]  # randomized-smoothing noise levels (pixel units)
    certify_n0: int  # Monte-Carlo draws that select the class to certify (Cohen et al.: 100)
    certify_n: int  # Monte-Carlo draws that bound its probability (Cohen et al.: 100,000)
    n_certify: int  # test images certified per sigma
    finetune_images: int  # training images robust fine-tuning draws its batches from
    finetune_steps: int  # optimiser steps of robust fine-tuning
    finetune_batch_size: int  # images per fine-tuning step
    finetune_attack_steps: int  # PGD steps of fine-tuning's inner attack
    finetune_lr: float  # peak AdamW learning rate of full fine-tuning
    oft_lr: float  # peak learning rate of orthogonal fine-tuning (its rotations start at the identity)
    oft_clean_weight: float  # weight of FARE's clean term in OFT runs (keeps clean embeddings in place)
    oft_block_sizes: tuple[int, ...]  # OFT block sizes compared in 06 (the first is the default)
    device: str  # "cuda" or "cpu"
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; "fp32" forces fp32 everywhere
    weights: str | None = None  # checkpoint path or open_clip tag; None: the profile's own (shipped / OpenAI)
    data_root: str | None = None  # directory holding cifar-100-python/; None: load_dataset's default
    checkpoints: str | None = None  # cache of 05/06's fine-tuned encoders; None: checkpoints/<name> (notebooks/)
    smoke: bool = False  # budgets shrunk to seconds (SMOKE_BUDGETS): runs every code path, measures nothing
    single_template: bool = False  # one prompt per class instead of the ensemble (a smoke run's text head)
    # where the notebook saves its PNG figures (cliplab reproduce sets it); None: nowhere. Not a setting of the
    # study, and a path of this machine: left out of the printed profile, so committed notebooks stay the same
    figures: str | None = field(default=None, repr=False)

    def sweep(self, *, votes: bool = False, early_stop: bool = False):
        """The ``study.Sweep`` (PGD settings of the success-rate sweeps): the profile's steps and batch size, seed 0;
        ``votes``: judged by the profile's vote (randomised defences); ``early_stop``: stop at success."""
        from ..evaluation.sweeps import Sweep

        return Sweep(steps=self.attack_steps, batch_size=self.batch_size, votes=self.votes if votes else 1,
                     early_stop=early_stop)

    def finetune_config(self, method: str = "fare", adapter: str = "full", *, block_size: int | None = None,
                        **overrides):
        """The study's ``FinetuneConfig`` (notebooks 05-06, defaults of ``cliplab finetune``).

        L-inf eps 4/255, the profile's inner-attack steps (PGD-10), optimiser steps, batch size and learning rate;
        OFT runs take the profile's OFT learning rate and clean-term weight, and its first block size unless
        ``block_size`` is given. ``overrides`` replace any other field. (Precision is the classifier's: bf16
        autocast on CUDA unless it was loaded with ``precision="fp32"``.)
        """
        from ..training.config import FinetuneConfig

        if block_size is not None and adapter != "oft":
            raise ValueError(f"block_size applies to adapter='oft' only, got it with adapter={adapter!r}")
        settings = dict(method=method, adapter=adapter, eps=4 / 255, attack_steps=self.finetune_attack_steps,
                        steps=self.finetune_steps, batch_size=self.finetune_batch_size, lr=self.finetune_lr)
        if adapter == "oft":
            settings.update(lr=self.oft_lr, clean_weight=self.oft_clean_weight,
                            block_size=self.oft_block_sizes[0] if block_size is None else block_size)
        return FinetuneConfig(**{**settings, **overrides})

    @property
    def eps_values(self) -> list[float]:
        """``eps_grid`` in [0, 1] pixel units."""
        return [e / 255 for e in self.eps_grid]

    def attack_budget(self, randomised: bool = False):
        """The ``AttackBudget`` of the worst-case evaluations; ``randomised``: with ``eot_samples`` EOT draws."""
        from ..evaluation.ensemble import AttackBudget

        return AttackBudget(steps=self.eval_steps, num_targets=self.eval_targets, queries=self.eval_queries,
                            eot_samples=self.eot_samples if randomised else 1, pgd_steps=self.attack_steps,
                            pgd_restarts=self.restarts)

    @property
    def checkpoint_dir(self) -> Path:
        """Where notebooks 05 and 06 cache their fine-tuned encoders."""
        return Path(self.checkpoints) if self.checkpoints else Path("checkpoints") / self.name

    @property
    def _pretrained(self) -> dict:
        """``pretrained=`` for load_classifier/check_weights: none when the profile keeps its own weights."""
        return {} if self.weights is None else {"pretrained": self.weights}

    def load_classifier(self):
        """The profile's zero-shot classifier: its weights, on its device, in its precision."""
        from .. import data
        from ..models import load_classifier

        templates = data.templates(self.name, single=self.single_template)
        return load_classifier(self.name, device=self.device, precision=self.precision, templates=templates,
                               **self._pretrained)

    def load_dataset(self, split: str = "test", n: int | None = None):
        """``(x, y, class_names)`` of the profile's data set, the tensors on the profile's device."""
        from ..data import load_dataset

        x, y, class_names = load_dataset(self.name, split=split, n=n, root=self.data_root)
        return x.to(self.device), y.to(self.device), class_names

    def check_inputs(self):
        """Fail within seconds, naming the file, when the weights or data this profile names cannot be loaded;
        return the open_clip model on the ``meta`` device (shapes only) for checks that need its architecture."""
        from ..data import check_dataset
        from ..models import check_weights

        model = check_weights(self.name, **self._pretrained)
        check_dataset(self.name, self.data_root)
        return model


PROFILES = {
    # The worst-case evaluation runs 10 APGD steps (torchattacks' AutoAttack default) and 100 Square queries so that
    # the notebooks run in minutes on a CPU: on this model it finds what AutoAttack's full budget of 100 steps finds
    # (the same 0.0% and 19.5% at 4/255 for the original and FARE-OFT b=128 cw=2, first 200 test images), and
    # Square stays a gradient-free sanity check.
    "shapes": Profile(name="shapes", n_eval=500, batch_size=250, attack_steps=10, restarts=2,
                      eval_steps=10, eval_targets=9, eval_queries=100,
                      eps_grid=(0.5, 1, 2, 3, 4, 6, 8, 12, 16), target_class="blue star",
                      n_defence=100, eot_samples=20, eot_grid=(1, 5, 20), votes=15,
                      smoothing_sigmas=(0.03, 0.06, 0.12, 0.25), certify_n0=64, certify_n=500, n_certify=100,
                      finetune_images=10_000, finetune_steps=1000, finetune_batch_size=64,
                      finetune_attack_steps=10, finetune_lr=5e-4,
                      oft_lr=2e-3, oft_clean_weight=1.0, oft_block_sizes=(128, 16),
                      device="cpu"),
    # Sized to run in 27 to 81 minutes on one H100 (docs/costs.md, "The real study": the worst-case evaluations
    # cost more the more images survive): 500 images for the defence sweeps (95% CI about +-4 points), 1,000 draws
    # per certificate (radii up to 2.5 sigma), one epoch of fine-tuning (400 steps of 128 images), AutoAttack's
    # APGD budget with 1,000 Square queries.
    "cifar100": Profile(name="cifar100", n_eval=1000, batch_size=250, attack_steps=20, restarts=2,
                        eval_steps=100, eval_targets=9, eval_queries=1000,
                        eps_grid=(0.5, 1, 2, 3, 4, 6, 8, 10), target_class="pickup truck",
                        n_defence=500, eot_samples=20, eot_grid=(1, 2, 5, 10, 20), votes=32,
                        smoothing_sigmas=(0.12, 0.25, 0.5), certify_n0=100, certify_n=1_000, n_certify=500,
                        finetune_images=50_000, finetune_steps=400, finetune_batch_size=128,
                        finetune_attack_steps=10, finetune_lr=1e-5,
                        oft_lr=1e-4, oft_clean_weight=1.0, oft_block_sizes=(128, 32),
                        device="cuda"),
}

# A smoke run: every budget shrunk so that all six notebooks run every cell and code path in minutes on a
# CPU, even with ViT-B/32. Its numbers mean nothing; it proves that the study runs.
SMOKE_BUDGETS = dict(n_eval=4, batch_size=4, attack_steps=1, restarts=1, eval_steps=2, eval_targets=2, eval_queries=2,
                     eps_grid=(1, 8), n_defence=2,
                     eot_samples=2, eot_grid=(1, 2), votes=2, certify_n0=2, certify_n=8, n_certify=2,
                     finetune_images=8, finetune_steps=2, finetune_batch_size=2, finetune_attack_steps=1,
                     single_template=True)

# get_profile's settings and the environment variables that carry them into a notebook's kernel
ENVIRONMENT = {"device": "CLIPLAB_DEVICE", "precision": "CLIPLAB_PRECISION", "weights": "CLIPLAB_PRETRAINED",
               "data_root": "CLIPLAB_DATA", "checkpoints": "CLIPLAB_CHECKPOINTS", "smoke": "CLIPLAB_SMOKE",
               "figures": "CLIPLAB_FIGURES"}


def get_profile(name: str | None = None, device: str | None = None, *, precision: str | None = None,
                weights: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None,
                checkpoints: str | os.PathLike | None = None, smoke: bool | None = None,
                figures: str | os.PathLike | None = None) -> Profile:
    """The profile ``name``, else ``$CLIPLAB_PROFILE``, else ``shapes``, with its settings.

    Each setting is the argument, else its environment variable (``ENVIRONMENT``), else the profile's
    default. The device falls back to the CPU, with a warning, when CUDA is asked for and absent.

    Args:
        name: ``"shapes"`` or ``"cifar100"``.
        device: ``"cuda"`` or ``"cpu"``.
        precision: ``"auto"`` (bf16 autocast on CUDA) or ``"fp32"``.
        weights: a checkpoint file or an open_clip tag instead of the profile's weights.
        data_root: the directory holding ``cifar-100-python/``.
        checkpoints: where 05 and 06 cache their fine-tuned encoders.
        smoke: shrink every budget to seconds (``SMOKE_BUDGETS``).
        figures: the directory the notebook saves its figures in.
    """
    # a bad setting is named as the user gave it: the argument, or the environment variable it came from
    label = {key: key for key in ENVIRONMENT} | {"name": "profile"}
    if name is None and os.environ.get("CLIPLAB_PROFILE"):
        name, label["name"] = os.environ["CLIPLAB_PROFILE"], "$CLIPLAB_PROFILE"
    name = name or "shapes"
    check_choice(name, label["name"], PROFILES)
    given = dict(device=device, precision=precision, weights=weights, data_root=data_root,
                 checkpoints=checkpoints, smoke=smoke, figures=figures)
    settings = {}
    for key, value in given.items():
        if value is None and os.environ.get(ENVIRONMENT[key]):
            value, label[key] = os.environ[ENVIRONMENT[key]], f"${ENVIRONMENT[key]}"
        if value is not None:
            settings[key] = str(value) if key != "smoke" else _flag(value, label[key])
    profile = replace(PROFILES[name], **settings)
    check_choice(profile.device, label["device"], ("cpu", "cuda"))
    check_choice(profile.precision, label["precision"], PRECISIONS)
    if profile.device == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"profile {name!r} wants a CUDA GPU and none is available: running on the CPU, slowly")
        profile = replace(profile, device="cpu")
    return replace(profile, **SMOKE_BUDGETS) if profile.smoke else profile


def _flag(value, name: str) -> bool:
    """A bool, or its spelling in an environment variable (1/true/yes, 0/false/no)."""
    if isinstance(value, bool):
        return value
    spelling = str(value).strip().lower()
    if spelling not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(f"{name} must be one of 1/true/yes or 0/false/no, got {value!r}")
    return spelling in ("1", "true", "yes")


def profile_environment(profile: Profile) -> dict[str, str]:
    """The environment variables that make ``get_profile()`` in another process return ``profile``: every one of
    them, so that nothing is inherited from the caller's environment (a ``CLIPLAB_SMOKE=1`` left in a shell must not
    shrink the budgets of a full run); an empty value means the profile's default."""
    environment = {"CLIPLAB_PROFILE": profile.name}
    for key, variable in ENVIRONMENT.items():
        value = getattr(profile, key)
        environment[variable] = "" if value is None else {True: "1", False: "0"}.get(value, str(value)) \
            if isinstance(value, bool) else str(value)
    return environment

"""The two profiles: one code path, different model, data and budgets.

A profile is configuration as data: frozen dataclasses for its PGD sweeps, its worst-case evaluation budget, its
defences, its certification and its fine-tuning, and a ``Runtime`` (device, precision, weights, data, caches) that
``cliplab evaluate`` shares. ``Profile.sweep()``, ``attack_budget()`` and ``finetune_config()`` turn them into the
kernels' typed settings; ``load_classifier()`` and ``load_dataset()`` load what the profile names.

Notebooks call ``get_profile()``, which reads the settings ``cliplab reproduce`` passes to their kernels as
environment variables (``profile_environment`` writes them), so the same notebook runs the offline toy study,
the real one, or a smoke run of either.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .._arguments import check_choice
from .._torch import PRECISIONS
from ..evaluation.ensemble import AttackBudget, ThreatModel
from ..evaluation.sweeps import PGDSweep
from ..training.config import ADAPTER_SIZES, ADAPTERS, FinetuneConfig, unused_sizes


@dataclass(frozen=True)
class Sweeps:
    """The PGD sweeps of 01-04 and the PGD quick look of 05 and 06."""

    images: int  # test images behind every reported accuracy or success rate
    batch_size: int  # images per attack batch
    steps: int  # PGD steps
    restarts: int  # restarts of the PGD quick look that 05 and 06 compare with the worst case
    eps_255: tuple[float, ...]  # L-inf radii, in units of 1/255
    target_class: str  # the class the targeted attack of notebook 01 aims for

    @property
    def eps(self) -> list[float]:
        """``eps_255`` in [0, 1] pixel units."""
        return [e / 255 for e in self.eps_255]


@dataclass(frozen=True)
class Evaluation:
    """The budget of every worst-case evaluation (AutoAttack: 100 steps, 9 targets, 5,000 queries)."""

    steps: int  # APGD iterations
    targets: int  # target classes of APGD-T, the likeliest first
    queries: int  # queries per image of the black-box Square attack


@dataclass(frozen=True)
class Defences:
    """The defence sweeps of 02-04, where EOT multiplies the cost."""

    images: int  # test images behind the defence sweeps
    eot_samples: int  # EOT draws of every reported adaptive attack on a randomised defence (>= 20)
    eot_grid: tuple[int, ...]  # EOT draws compared in 02
    votes: int  # stochastic passes whose majority vote scores a randomised defence, as deployed


@dataclass(frozen=True)
class Certification:
    """Randomized smoothing's certificates in 03 (Cohen et al.: 100 + 100,000 draws)."""

    sigmas: tuple[float, ...]  # noise levels (pixel units)
    n0: int  # Monte-Carlo draws that select the class to certify
    n: int  # Monte-Carlo draws that bound its probability
    images: int  # test images certified per sigma


@dataclass(frozen=True)
class Finetuning:
    """Robust fine-tuning in 05 and 06 (and ``cliplab finetune``'s defaults)."""

    images: int  # training images the batches are drawn from
    steps: int  # optimiser steps
    batch_size: int  # images per step
    attack_steps: int  # PGD steps of the inner attack
    lr: float  # peak AdamW learning rate of full fine-tuning (and of last-k's blocks)
    oft_lr: float  # peak learning rate of orthogonal fine-tuning, and of LoRA and BitFit (like OFT, few parameters)
    oft_clean_weight: float  # weight of FARE's clean term in OFT runs and every other restricted one
    oft_block_sizes: tuple[int, ...]  # OFT block sizes compared in 06 (the first is the default)


@dataclass(frozen=True)
class Runtime:
    """Where and how the work runs, and where its files are: not what it measures. ``cliplab evaluate`` uses it too."""

    device: str = "cpu"  # "cuda" or "cpu"
    precision: str = "auto"  # "auto": bf16 autocast where the device computes bf16 natively; "bf16"; "fp32"
    weights: str | None = None  # checkpoint path or open_clip tag; None: the model's own (shipped / OpenAI)
    data_root: str | None = None  # directory holding cifar-100-python/; None: load_dataset's default
    encoder_cache: str | None = None  # 05/06's fine-tuned encoders; None: encoders/<profile> (in notebooks/)
    # where a notebook saves its PNG figures (cliplab reproduce sets it); None: nowhere. A path of this machine, not
    # a setting of the study: left out of the printed profile, so committed notebooks stay the same everywhere
    figures: str | None = field(default=None, repr=False)
    # where the notebooks of one run share their worst-case evaluations (05 and 06 both evaluate the original and
    # FARE-full; cliplab reproduce and the test suite set it for the run); None: each notebook makes its own. Left
    # out of the printed profile for the same reason as figures
    evaluation_cache: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Profile:
    name: str  # profile name; also the model (load_classifier) and data set (load_dataset) it uses
    sweeps: Sweeps
    evaluation: Evaluation
    defences: Defences
    certification: Certification
    finetuning: Finetuning
    runtime: Runtime = Runtime()
    smoke: bool = False  # budgets shrunk to seconds (SMOKE_BUDGETS): runs every code path, measures nothing
    single_template: bool = False  # one prompt per class instead of the ensemble (a smoke run's text head)

    def __str__(self) -> str:
        """One section per line (a notebook prints its profile first)."""
        flags = ", ".join(name for name in ("smoke", "single_template") if getattr(self, name))
        sections = [f"  {name}: {getattr(self, name)}" for name in
                    ("sweeps", "evaluation", "defences", "certification", "finetuning", "runtime")]
        return "\n".join([f"profile {self.name!r}" + (f" ({flags})" if flags else ""), *sections])

    def with_runtime(self, **changes) -> Profile:
        """The same profile with some runtime settings changed (device, weights, figures, ...)."""
        return replace(self, runtime=replace(self.runtime, **changes))

    def sweep(self, *, votes: bool = False, early_stop: bool = False) -> PGDSweep:
        """The ``PGDSweep`` (PGD settings of the success-rate sweeps): the profile's steps and batch size, seed 0;
        ``votes``: judged by the profile's vote (randomised defences); ``early_stop``: stop at success."""
        return PGDSweep(steps=self.sweeps.steps, batch_size=self.sweeps.batch_size,
                        votes=self.defences.votes if votes else 1, early_stop=early_stop)

    def finetune_config(self, method: str = "fare", adapter: str = "full", **overrides) -> FinetuneConfig:
        """The study's ``FinetuneConfig`` (notebooks 05-06, defaults of ``cliplab finetune``).

        L-inf eps 4/255, the profile's inner-attack steps (PGD-10), optimiser steps, batch size and learning rate.
        A restricted adapter (all but ``full``) trains with the clean-term weight of the OFT runs, and LoRA and BitFit,
        which like OFT train few parameters, with OFT's learning rate; OFT's block size is the
        profile's first unless given, LoRA's rank and last-k's block count ``FinetuneConfig``'s. ``overrides``
        replace any field; a size of another adapter is an error. (Precision is the classifier's, from the
        runtime's ``precision``: by default bf16 autocast where the device computes bf16 natively, else fp32.)
        """
        check_choice(adapter, "adapter", ADAPTERS)
        for size in sorted(unused_sizes(adapter)):
            if overrides.get(size) is not None:
                owner = next(name for name, its in ADAPTER_SIZES.items() if its == size)
                raise ValueError(f"{size} applies to adapter={owner!r} only, got it with adapter={adapter!r}")
        tuning = self.finetuning
        settings = dict(method=method, adapter=adapter, eps=4 / 255, attack_steps=tuning.attack_steps,
                        steps=tuning.steps, batch_size=tuning.batch_size, lr=tuning.lr)
        if adapter != "full":
            settings["clean_weight"] = tuning.oft_clean_weight
        if adapter in ("oft", "lora", "bitfit"):
            settings["lr"] = tuning.oft_lr
        if adapter == "oft":
            settings["block_size"] = tuning.oft_block_sizes[0]
        return FinetuneConfig(**{**settings, **{k: v for k, v in overrides.items() if v is not None}})

    def attack_budget(self, randomised: bool = False) -> AttackBudget:
        """The ``AttackBudget`` of the worst-case evaluations; ``randomised``: with the defences' EOT draws."""
        return AttackBudget(steps=self.evaluation.steps, num_targets=self.evaluation.targets,
                            queries=self.evaluation.queries,
                            eot_samples=self.defences.eot_samples if randomised else 1,
                            pgd_steps=self.sweeps.steps, pgd_restarts=self.sweeps.restarts)

    def threat_model(self) -> ThreatModel:
        """The worst case of 05-07 (``FinetuneStudy``): PGD's quick look, the study's number before, then an
        AutoAttack-style ensemble, at 1, 2 and 4/255 (nested), with the profile's budget."""
        return ThreatModel((1 / 255, 2 / 255, 4 / 255), "linf", ("pgd", "apgd-ce", "apgd-t", "square"),
                           self.attack_budget())

    @property
    def encoder_cache_dir(self) -> Path:
        """Where notebooks 05 and 06 cache their fine-tuned encoders."""
        return Path(self.runtime.encoder_cache) if self.runtime.encoder_cache else Path("encoders") / self.name

    def load_classifier(self):
        """The profile's zero-shot classifier: its weights, on its device, in its precision."""
        from .. import data
        from ..models import load_classifier, own_weights_if_unset

        templates = data.templates(self.name, single=self.single_template)
        return load_classifier(self.name, device=self.runtime.device, precision=self.runtime.precision,
                               templates=templates, pretrained=own_weights_if_unset(self.runtime.weights))

    def load_dataset(self, split: str = "test", n: int | None = None):
        """``(x, y, class_names)`` of the profile's data set, the tensors on the profile's device."""
        from ..data import load_dataset

        x, y, class_names = load_dataset(self.name, split=split, n=n, root=self.runtime.data_root)
        return x.to(self.runtime.device), y.to(self.runtime.device), class_names

    def check_inputs(self):
        """Fail within seconds, naming the file, when the weights or data this profile names cannot be loaded;
        return the open_clip model on the ``meta`` device (shapes only) for checks that need its architecture."""
        from ..data import check_dataset
        from ..models import check_weights, own_weights_if_unset

        model = check_weights(self.name, pretrained=own_weights_if_unset(self.runtime.weights))
        check_dataset(self.name, self.runtime.data_root)
        return model


PROFILES = {
    # The worst-case evaluation runs 10 APGD steps (torchattacks' AutoAttack default) and 100 Square queries so that
    # the notebooks run in minutes on a CPU: on this model it finds what AutoAttack's full budget of 100 steps finds
    # (the same 0.0% and 19.5% at 4/255 for the original and FARE-OFT b=128 cw=2, first 200 test images), and
    # Square stays a gradient-free sanity check.
    "shapes": Profile(
        name="shapes",
        sweeps=Sweeps(images=500, batch_size=250, steps=10, restarts=2, eps_255=(0.5, 1, 2, 3, 4, 6, 8, 12, 16),
                      target_class="blue star"),
        evaluation=Evaluation(steps=10, targets=9, queries=100),
        defences=Defences(images=100, eot_samples=20, eot_grid=(1, 5, 20), votes=15),
        certification=Certification(sigmas=(0.03, 0.06, 0.12, 0.25), n0=64, n=500, images=100),
        finetuning=Finetuning(images=10_000, steps=1000, batch_size=64, attack_steps=10, lr=5e-4, oft_lr=2e-3,
                              oft_clean_weight=1.0, oft_block_sizes=(128, 16)),
        runtime=Runtime(device="cpu")),
    # Sized to run in 28 to 77 minutes on one H100 (docs/costs.md, "The real study": the worst-case evaluations
    # cost more the more images survive): 500 images for the defence sweeps (95% CI about +-4 points), 1,000 draws
    # per certificate (radii up to 2.5 sigma), one epoch of fine-tuning (400 steps of 128 images), AutoAttack's
    # APGD budget with 1,000 Square queries.
    "cifar100": Profile(
        name="cifar100",
        sweeps=Sweeps(images=1000, batch_size=250, steps=20, restarts=2, eps_255=(0.5, 1, 2, 3, 4, 6, 8, 10),
                      target_class="pickup truck"),
        evaluation=Evaluation(steps=100, targets=9, queries=1000),
        defences=Defences(images=500, eot_samples=20, eot_grid=(1, 2, 5, 10, 20), votes=32),
        certification=Certification(sigmas=(0.12, 0.25, 0.5), n0=100, n=1_000, images=500),
        finetuning=Finetuning(images=50_000, steps=400, batch_size=128, attack_steps=10, lr=1e-5, oft_lr=1e-4,
                              oft_clean_weight=1.0, oft_block_sizes=(128, 32)),
        runtime=Runtime(device="cuda")),
}

# A smoke run: every budget shrunk so that all six notebooks run every cell and code path in minutes on a
# CPU, even with ViT-B/32. Its numbers mean nothing; it proves that the study runs. (section -> its changes)
# One OFT block size: a second adds no code path, only an OFT and a LoRA model to train, time and attack.
SMOKE_BUDGETS = {
    "sweeps": dict(images=4, batch_size=4, steps=1, restarts=1, eps_255=(1, 8)),
    "evaluation": dict(steps=2, targets=2, queries=2),
    "defences": dict(images=2, eot_samples=2, eot_grid=(1, 2), votes=2),
    "certification": dict(n0=2, n=8, images=2),
    "finetuning": dict(images=8, steps=2, batch_size=2, attack_steps=1, oft_block_sizes=(128,)),
}

# get_profile's settings and the environment variables that carry them into a notebook's kernel: every runtime
# setting, and smoke
ENVIRONMENT = {"device": "CLIPLAB_DEVICE", "precision": "CLIPLAB_PRECISION", "weights": "CLIPLAB_PRETRAINED",
               "data_root": "CLIPLAB_DATA", "encoder_cache": "CLIPLAB_ENCODER_CACHE", "figures": "CLIPLAB_FIGURES",
               "evaluation_cache": "CLIPLAB_EVALUATION_CACHE", "smoke": "CLIPLAB_SMOKE"}


def get_profile(name: str | None = None, device: str | None = None, *, precision: str | None = None,
                weights: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None,
                encoder_cache: str | os.PathLike | None = None, smoke: bool | None = None,
                figures: str | os.PathLike | None = None,
                evaluation_cache: str | os.PathLike | None = None) -> Profile:
    """The profile ``name``, else ``$CLIPLAB_PROFILE``, else ``shapes``, with its settings.

    Each setting is the argument, else its environment variable (``ENVIRONMENT``), else the profile's
    default. The device falls back to the CPU, with a warning, when CUDA is asked for and absent.

    Args:
        name: ``"shapes"`` or ``"cifar100"``.
        device: ``"cuda"`` or ``"cpu"``.
        precision: ``"auto"`` (bf16 autocast where the device computes bf16 natively, fp32 elsewhere), ``"bf16"``
            or ``"fp32"``.
        weights: a checkpoint file or an open_clip tag instead of the profile's weights.
        data_root: the directory holding ``cifar-100-python/``.
        encoder_cache: where 05 and 06 cache their fine-tuned encoders.
        smoke: shrink every budget to seconds (``SMOKE_BUDGETS``).
        figures: the directory the notebook saves its figures in.
        evaluation_cache: the directory where the notebooks of one run share their worst-case evaluations.
    """
    # a bad setting is named as the user gave it: the argument, or the environment variable it came from
    label = {key: key for key in ENVIRONMENT} | {"name": "profile"}
    if name is None and os.environ.get("CLIPLAB_PROFILE"):
        name, label["name"] = os.environ["CLIPLAB_PROFILE"], "$CLIPLAB_PROFILE"
    name = name or "shapes"
    check_choice(name, label["name"], PROFILES)
    given = dict(device=device, precision=precision, weights=weights, data_root=data_root,
                 encoder_cache=encoder_cache, smoke=smoke, figures=figures, evaluation_cache=evaluation_cache)
    settings = {}
    for key, value in given.items():
        if value is None and os.environ.get(ENVIRONMENT[key]):
            value, label[key] = os.environ[ENVIRONMENT[key]], f"${ENVIRONMENT[key]}"
        if value is not None:
            settings[key] = str(value) if key != "smoke" else _flag(value, label[key])
    smoke = settings.pop("smoke", False)
    profile = PROFILES[name].with_runtime(**settings)
    check_choice(profile.runtime.device, label["device"], ("cpu", "cuda"))
    check_choice(profile.runtime.precision, label["precision"], PRECISIONS)
    if profile.runtime.device == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"profile {name!r} wants a CUDA GPU and none is available: running on the CPU, slowly")
        profile = profile.with_runtime(device="cpu")
    return shrunk(profile) if smoke else profile


def shrunk(profile: Profile) -> Profile:
    """``profile``'s smoke run: every budget shrunk (``SMOKE_BUDGETS``), one prompt per class."""
    sections = {section: replace(getattr(profile, section), **changes) for section, changes in SMOKE_BUDGETS.items()}
    return replace(profile, smoke=True, single_template=True, **sections)


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
        value = profile.smoke if key == "smoke" else getattr(profile.runtime, key)
        environment[variable] = "" if value is None else ("1" if value else "0") if isinstance(value, bool) \
            else str(value)
    return environment

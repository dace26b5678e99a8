"""The study layer: what the notebooks and the command line do with the kernels, for a profile.

The kernels (``attacks``, ``apgd``, ``square``, ``defences``, ``denoise``, ``oft``, ``finetune``, ``evaluation``)
know nothing of profiles or notebooks; this module does, and every number a notebook prints comes from a function
here or below, each tested:

- ``Sweep``: the PGD settings of the success-rate sweeps and data-set attacks, typed (``Profile.sweep()``);
- ``random_targets``: the seeded target classes of the targeted attacks;
- ``FinetuneStudy``: 05 and 06's shared setup (classifier, splits, worst-case evaluation, cached fine-tuned models);
- the encoder cache and export: ``load_or_finetune``, ``save_encoder``, ``load_encoder``, ``export_weights``;
- ``finetune_and_evaluate``: ``cliplab finetune``'s workflow (before, train, after, final weights, metrics);
- ``neuron_geometry`` / ``geometry_change``: 06's claim that OFT keeps the angles between neurons;
- ``certified_accuracy``: 03's certified-accuracy curve.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import _distributed
from ._io import atomic_write, save_tensors
from .classifier import ZeroShotClassifier
from .evaluation import (DatasetAttack, Proportion, RobustnessReport, attack_dataset, attack_success_rate,
                         robust_accuracy, robustness_vs_eps)
from .finetune import FinetuneConfig, check_run_directory, check_same_run, finetune, run_lock, run_settings
from .models import save_weights
from .oft import check_block_size, merge_oft

if TYPE_CHECKING:  # the profile calls into this module (Profile.sweep): no import back, no circle
    from .profiles import Profile

# ------------------------------------------------------------------------------------------ attack settings


@dataclass(frozen=True)
class Sweep:
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

    def success_rate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                     targets: torch.Tensor | None = None, eot_samples: int = 1,
                     surrogate: nn.Module | None = None) -> Proportion:
        """``attack_success_rate`` with these settings: among the images ``model`` classifies correctly."""
        return attack_success_rate(model, x, y, eps=eps, targets=targets, eot_samples=eot_samples,
                                   surrogate=surrogate, **self._pgd())

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, targeted: bool = False,
               eot_samples: int = 1) -> DatasetAttack:
        """``attack_dataset`` with these settings: every image, adversarial images and predictions returned."""
        return attack_dataset(model, x, y, eps=eps, targeted=targeted, eot_samples=eot_samples, **self._pgd())


def random_targets(y: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """A target class for each label, uniform over the other classes, drawn from a generator seeded ``seed`` on
    ``y``'s device (so a run is reproducible and independent of the global RNG). (N,) -> (N,)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 for a target other than the label, got {num_classes}")
    if len(y) and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
        raise ValueError(f"y must hold labels in [0, num_classes) = [0, {num_classes}), got labels from "
                         f"{int(y.min())} to {int(y.max())}")
    generator = torch.Generator(y.device).manual_seed(seed)
    return (y + torch.randint(1, num_classes, y.shape, device=y.device, generator=generator)) % num_classes


# ------------------------------------------------------------------------------------------ fine-tuning


class FinetuneStudy:
    """Notebooks 05 and 06's shared setup on ``profile``.

    Attributes:
        profile: the profile.
        original: the profile's classifier, never modified (fine-tuning works on copies).
        x_train, y_train: the ``finetune_images`` training images fine-tuning draws its batches from.
        x_test, y_test: the ``n_eval`` test images every accuracy is measured on.
        class_names: the data set's class names.
        eval_eps: the radii of the worst-case evaluation (1/255, 2/255, 4/255).
        attacks: its attacks, in order: the PGD quick look the study used to report, then an AutoAttack-style
            ensemble (``profile.attack_budget()``).
    """

    eval_eps = (1 / 255, 2 / 255, 4 / 255)
    attacks = ("pgd", "apgd-ce", "apgd-t", "square")

    def __init__(self, profile: Profile):
        self.profile = profile
        self.original = profile.load_classifier()
        self.x_train, self.y_train, self.class_names = profile.load_dataset("train", n=profile.finetune_images)
        self.x_test, self.y_test, _ = profile.load_dataset("test", n=profile.n_eval)

    def fine_tuned(self, name: str, config: FinetuneConfig) -> tuple[ZeroShotClassifier, list[dict]]:
        """A copy of the original fine-tuned with ``config`` and its training history: from the cache
        (``profile.checkpoint_dir/<name>``), else trained now and cached."""
        return load_or_finetune(copy.deepcopy(self.original), name, config, self.x_train, self.y_train,
                                self.profile.checkpoint_dir)

    def evaluate(self, models: Mapping[str, nn.Module]) -> dict[str, dict[float, RobustnessReport]]:
        """Each model's worst-case robustness reports at ``eval_eps`` on the test images (seed 0)."""
        return {name: robustness_vs_eps(model, self.x_test, self.y_test, self.eval_eps, attacks=list(self.attacks),
                                        budget=self.profile.attack_budget(), batch_size=self.profile.batch_size,
                                        seed=0, progress=False)
                for name, model in models.items()}


def save_encoder(classifier: ZeroShotClassifier, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> None:
    """Save only the image encoder (OFT merged), small enough to ship: the text side never changes."""
    merge_oft(classifier.model.visual)
    save_tensors(classifier.model.visual.state_dict(), path, dtype)


def load_encoder(classifier: ZeroShotClassifier, path: str | os.PathLike) -> ZeroShotClassifier:
    """Load an image encoder saved by ``save_encoder`` into ``classifier`` (cast to its precision)."""
    from safetensors.torch import load_file

    classifier.model.visual.load_state_dict(load_file(path))
    return classifier.eval()


def export_weights(classifier: ZeroShotClassifier, path: str | os.PathLike) -> None:
    """Save the fine-tuned model (OFT merged) so that ``load_classifier(profile, pretrained=path)`` loads it."""
    merge_oft(classifier.model.visual)
    save_weights(classifier, path)


def load_or_finetune(classifier: ZeroShotClassifier, name: str, config: FinetuneConfig, x: torch.Tensor,
                     y: torch.Tensor, directory: str | os.PathLike) -> tuple[ZeroShotClassifier, list[dict]]:
    """The notebooks' cache of fine-tuned encoders.

    Loads ``directory/<name>.safetensors`` (the image encoder, float16) and ``<name>.json`` (the config it
    was trained with and its training history) when they exist; otherwise fine-tunes ``classifier`` now
    (resuming ``<name>.run/`` if an earlier attempt was killed), saves both, and removes the run directory.

    Returns:
        The classifier with the fine-tuned encoder (as stored: float16 values), and the training history.

    Raises:
        ValueError: the cached encoder was trained with other settings than ``config`` (delete it to retrain).
    """
    directory = Path(directory)
    weights, record_file = directory / f"{name}.safetensors", directory / f"{name}.json"
    if weights.is_file() and record_file.is_file():
        record = json.loads(record_file.read_text())
        check_same_run(record["config"], config, f"cannot use {weights} (delete it and {record_file.name} to retrain)")
        return load_encoder(classifier, weights), record["history"]
    run_dir = directory / f"{name}.run"
    finetune(classifier, x, y, config, run_dir, resume=(run_dir / "latest.json").is_file())
    history = json.loads((run_dir / "history.json").read_text())
    save_encoder(classifier, weights)
    with atomic_write(record_file) as tmp:
        Path(tmp).write_text(json.dumps({"config": run_settings(config), "history": history}))
    shutil.rmtree(run_dir)  # its resumable checkpoints are no longer needed
    load_encoder(classifier, weights)  # the shipped (float16) weights, so a cached run reproduces this one
    return classifier, history


def finetune_and_evaluate(profile: Profile, config: FinetuneConfig, out: str | os.PathLike, *,
                          resume: bool = False) -> dict:
    """``cliplab finetune``: evaluate the profile's classifier, fine-tune it with checkpoints in ``out``, evaluate
    it again, write ``out/final.safetensors`` (OFT merged) and ``out/metrics.json`` (atomically).

    Both evaluations are PGD (the profile's steps and restarts, margin loss, seed 0) at ``config.eps`` on the
    first ``n_defence`` test images. Everything that can fail fast does (settings, ``out``, weights, data, OFT
    block size) before any model is loaded.

    Returns:
        The metrics written: the config, eps, and the clean and robust accuracy before and after.
    """
    out = Path(out)

    def check():  # before the model, the data and the "before" evaluation; in every process under torchrun
        config.validate()
        check_run_directory(out, config, resume)
        architecture = profile.check_inputs()
        if config.adapter == "oft":
            check_block_size(architecture.visual, config.block_size)

    _distributed.on_every_rank(check, "cliplab finetune's checks")
    # the run's lock, taken before anything loads: a second run into ``out`` fails at once (finetune re-enters it)
    with run_lock(out) if _distributed.is_main() else contextlib.nullcontext():
        classifier = profile.load_classifier()
        x, y, _ = profile.load_dataset("train", n=profile.finetune_images)
        x_test, y_test, _ = profile.load_dataset("test", n=profile.n_defence)

        def evaluate(model):
            result = robust_accuracy(model, x_test, y_test, eps=config.eps, steps=profile.attack_steps,
                                     restarts=profile.restarts, loss="margin", seed=0, progress=False)
            return {"clean": result.clean.as_dict(), "robust": result.robust.as_dict()}

        metrics = {"config": asdict(config), "eps": config.eps, "before": evaluate(classifier)}
        finetune(classifier, x, y, config, out, resume=resume, eval_data=(x_test, y_test))
        metrics["after"] = evaluate(classifier)
        if _distributed.is_main():  # the one process that writes
            export_weights(classifier, out / "final.safetensors")
            with atomic_write(out / "metrics.json") as tmp:
                Path(tmp).write_text(json.dumps(metrics, indent=2))
    return metrics


# ------------------------------------------------------------------------------------------ analyses


# the weight matrices OFT rotates in an open_clip ViT: attention in/out projections and the MLP's two layers
ADAPTED_WEIGHTS = ("in_proj_weight", "out_proj.weight", "c_fc.weight", "c_proj.weight")


def neuron_geometry(classifier: ZeroShotClassifier) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per adapted weight of the image encoder (``ADAPTED_WEIGHTS``): the norm of each neuron (row) and the angle
    in degrees between every pair of neurons, in float64 on the weight's device. OFT rotates every neuron by the
    same orthogonal matrix, so it keeps both; full fine-tuning changes them."""
    geometry = {}
    for name, weight in classifier.model.visual.state_dict().items():
        if name.endswith(ADAPTED_WEIGHTS):
            weight = weight.double()  # (out, in): one neuron per row
            directions = F.normalize(weight, dim=1)
            pairs = torch.triu_indices(len(weight), len(weight), offset=1, device=weight.device)
            cosines = (directions @ directions.T)[pairs[0], pairs[1]]
            geometry[name] = weight.norm(dim=1), torch.rad2deg(torch.arccos(cosines.clamp(-1, 1)))
    if not geometry:
        raise ValueError(f"no weight named *{', *'.join(ADAPTED_WEIGHTS)} in the image encoder: an open_clip ViT is "
                         f"needed, with OFT rotations merged (cliplab.merge_oft) if it has any")
    return geometry


def geometry_change(reference: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                    geometry: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """How far ``geometry`` is from ``reference`` (both from ``neuron_geometry``), over all adapted weights: the
    relative change of every neuron's norm (a fraction) and the absolute change of every angle (degrees)."""
    if reference.keys() != geometry.keys():
        raise ValueError("geometry and reference must come from the same architecture (different adapted weights)")
    norm_change = torch.cat([(geometry[k][0] / reference[k][0] - 1).abs() for k in reference])
    angle_change = torch.cat([(geometry[k][1] - reference[k][1]).abs() for k in reference])
    return norm_change, angle_change


def certified_accuracy(classes: torch.Tensor, radii: torch.Tensor, y: torch.Tensor,
                       at: Sequence[float]) -> list[Proportion]:
    """Certified accuracy at each L2 radius of ``at``: the images certified as their label with a radius at least
    that large (``RandomizedSmoothing.certify``'s classes and radii; an abstention, -1, is never right)."""
    if not classes.shape == radii.shape == y.shape or classes.dim() != 1:
        raise ValueError(f"classes, radii and y must be (N,) tensors of one length (one entry per image), got shapes "
                         f"{tuple(classes.shape)}, {tuple(radii.shape)} and {tuple(y.shape)}")
    right = classes.cpu() == y.cpu()
    radii = radii.cpu()
    return [Proportion.of(right & (radii >= r)) for r in at]

"""The robustness report card behind ``cliplab evaluate``: any classifier the package can load, on ``shapes`` or
``cifar100``, at several radii, scored by the worst case of an attack ensemble (``evaluate_robustness``).

``check`` validates everything and finds the weights and data within seconds; ``evaluate`` does the work;
``markdown`` and ``write_json`` render the result (the JSON atomically, with the settings, versions and seed).
"""
from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import _distributed
from .._arguments import check_choice, check_int, check_seed
from .._io import atomic_write
from .._torch import PRECISIONS
from ..evaluation.ensemble import RobustnessReport, ThreatModel, check_attack_plan, check_targets
from ..evaluation.tables import robustness_table
from .profiles import Runtime

DATASET_TEST_SIZES = {"shapes": 10_000, "cifar100": 10_000}


@dataclass(frozen=True)
class ReportSettings:
    """What ``cliplab evaluate`` evaluates, and how."""

    model: str = "shapes"  # a profile ("shapes", "cifar100") or an open_clip model name ("ViT-B-32")
    encoder: str | None = None  # an image encoder alone (finetune.save_encoder, the notebooks' cache) loaded on top
    dataset: str = "shapes"  # whose test split, class names and prompts: "shapes" or "cifar100"
    single_template: bool = False  # one prompt per class ("a photo of a {}.") instead of the data set's ensemble
    # the radii (L-inf, in [0, 1] pixel units), the ensemble (a name of ENSEMBLES or attack names) and its budget
    threat: ThreatModel = field(default_factory=lambda: ThreatModel((1 / 255, 2 / 255, 4 / 255)))
    n: int = 1000  # test images, a seeded sample of the split (data.sample_indices)
    votes: int = 1  # majority vote of this many stochastic passes scores each image (randomised models)
    batch_size: int = 256  # images per attack batch
    seed: int = 0  # seeds the sample of images and every attack
    # device, precision, weights (None: the model's own) and data directory, as a profile has them
    runtime: Runtime = Runtime()


def check(settings: ReportSettings) -> None:
    """Every setting, the weights and the data checked before any model is built (a bad one fails in seconds)."""
    from ..data import DATASETS, check_dataset, class_names
    from ..models import check_weights, own_weights_if_unset

    check_choice(settings.dataset, "dataset", DATASETS)
    classes = len(class_names(settings.dataset))
    threat = settings.threat
    if not isinstance(threat, ThreatModel):
        raise TypeError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    check_targets(check_attack_plan(threat.attacks, threat.norm, threat.budget, classes), threat.budget, classes)
    check_int(settings.n, "n")
    if settings.n > DATASET_TEST_SIZES[settings.dataset]:
        raise ValueError(f"n must be at most {DATASET_TEST_SIZES[settings.dataset]}, the size of the "
                         f"{settings.dataset} test split, got {settings.n}")
    check_int(settings.votes, "votes")
    check_int(settings.batch_size, "batch_size")
    check_seed(settings.seed)
    runtime = settings.runtime
    check_choice(runtime.device, "device", ("cpu", "cuda"))
    check_choice(runtime.precision, "precision", PRECISIONS)
    architecture = check_weights(settings.model, pretrained=own_weights_if_unset(runtime.weights))
    if settings.encoder is not None:
        check_encoder(settings.encoder, architecture)
    check_dataset(settings.dataset, runtime.data_root)


def check_encoder(path: str, architecture) -> None:
    """The file must hold exactly the image encoder's tensors, with their shapes."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"encoder: no such file: {path}")
    expected = {name: tuple(t.shape) for name, t in architecture.visual.state_dict().items()}
    try:
        with safe_open(path, framework="pt") as file:
            found = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"encoder: {path} is not a readable safetensors file ({error})") from None
    if found != expected:
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        raise ValueError(f"encoder: {path} does not hold this model's image encoder (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, or tensors of other shapes)")


def evaluate(settings: ReportSettings, progress: bool = True) -> dict[float, RobustnessReport]:
    """Load the model and ``n`` test images (``data.sample_indices``: the benchmark's images too), then the worst
    case at each radius (``robustness_vs_eps``: the radii nested, each attacking only the survivors of the one
    below)."""
    from .. import data
    from ..models import load_classifier, own_weights_if_unset

    check(settings)
    runtime = settings.runtime
    x, y, class_names = data.load_dataset(settings.dataset, "test", n=settings.n, root=runtime.data_root,
                                          seed=settings.seed)
    templates = data.templates(settings.dataset, single=settings.single_template)
    model = load_classifier(settings.model, class_names=class_names, templates=templates, device=runtime.device,
                            precision=runtime.precision, pretrained=own_weights_if_unset(runtime.weights))
    if settings.encoder is not None:
        from .finetuning import load_encoder

        load_encoder(model, settings.encoder)
    return settings.threat.evaluate(model, x, y, batch_size=settings.batch_size, votes=settings.votes,
                                    seed=settings.seed, progress=progress)


def markdown(reports: dict[float, RobustnessReport]) -> str:
    """One row per radius: clean, after each attack, worst case; n and the 95% CI in every cell."""
    return robustness_table({f"eps {255 * eps:g}/255": report for eps, report in reports.items()})


def write_json(path: str | os.PathLike, settings: ReportSettings, reports: dict[float, RobustnessReport]) -> Path:
    """Write the settings, versions and results to ``path`` atomically (a reader never sees half a file)."""
    path = Path(path)
    document = {"settings": asdict(settings), "versions": versions(), "processes": _distributed.rank_and_size()[1],
                "results": results_document(reports)}
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(document, indent=2) + "\n")
    return path


def results_document(reports: dict[float, RobustnessReport]) -> list[dict]:
    """The reports of ``robustness_vs_eps`` as JSON: per radius, clean, worst-case and per-attack counts."""
    return [{"eps": eps, "eps_255": 255 * eps, "clean": report.clean.as_dict(), "robust": report.robust.as_dict(),
             "per_attack": {name: p.as_dict() for name, p in report.per_attack.items()}}
            for eps, report in reports.items()]


def versions() -> dict[str, str]:
    from importlib.metadata import version

    import open_clip
    import torch

    return {"cliplab": version("cliplab"), "torch": torch.__version__, "open_clip": open_clip.__version__,
            "python": platform.python_version()}

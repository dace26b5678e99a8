"""cliplab: adversarial robustness of CLIP — attacks, inference-time defences, robust fine-tuning.

Images are float NCHW tensors in [0, 1] at native resolution; every classifier and defence maps them to
logits, so every attack here is end to end.

Layers (README, "Layout"), each a folder or a few modules, each importing only from its own layer or the ones below:
private helpers (``_*.py``); kernels (``attacks/``, ``defences/``, ``evaluation/``, ``training/``, ``classifier``);
loading (``models``, ``data``, ``shapes_clip``); the study (``study/``: profiles, 05/06's setup, the report card,
plots); the command line (``cli/``: commands and the notebook runner).
"""
from .attacks import AttackResult, apgd, apgd_targeted, attack_objective, eot_gradient, pgd, square
from .classifier import WithPrecision, ZeroShotClassifier, build_text_head
from .data import load_dataset
from .defences import ABSTAIN, Denoised, GaussianNoise, RandomizedSmoothing
from .evaluation import (AttackBudget, DatasetAttack, Proportion, RobustAccuracy, RobustnessReport, accuracy,
                         accuracy_vs_eps, attack_dataset, attack_success_rate, evaluate_robustness, predict,
                         robust_accuracy)
from .models import load_classifier, save_weights
from .study import Profile, get_profile
from .training import apply_oft, merge_oft
# modules the public API has always had under these names
from . import study
from .defences import denoise
from .evaluation import gradient_masking as checks
from . import training as finetune

__all__ = [
    "ABSTAIN", "AttackBudget", "AttackResult", "DatasetAttack", "Denoised", "GaussianNoise", "Profile", "Proportion",
    "RandomizedSmoothing", "RobustAccuracy", "RobustnessReport", "WithPrecision", "ZeroShotClassifier", "accuracy",
    "accuracy_vs_eps",
    "apgd", "apgd_targeted", "apply_oft", "attack_dataset", "attack_objective", "attack_success_rate", "build_text_head", "checks",
    "denoise", "eot_gradient", "evaluate_robustness", "finetune", "get_profile", "load_classifier", "load_dataset",
    "merge_oft", "pgd", "plots", "predict", "robust_accuracy", "save_weights", "square", "study",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``cliplab.plots`` on first use: the figures need matplotlib's pyplot, which ``import cliplab`` need not load."""
    if name == "plots":
        from .study import plots

        return plots
    raise AttributeError(f"module 'cliplab' has no attribute {name!r}")


"""cliplab: adversarial robustness of CLIP — attacks, inference-time defences, robust fine-tuning.

Images are float NCHW tensors in [0, 1] at native resolution; every classifier and defence maps them to
logits, so every attack here is end to end.

Layers (README, "Architecture"): kernels (attacks, defences, denoisers, OFT, the trainer, evaluation) below loading
(models, data) below the study (profiles, ``study``, ``report``, ``plots``) below the command line and its notebook
``runner``; a module imports only from its own layer or the ones below.
"""
from .apgd import apgd, apgd_targeted
from .attacks import AttackResult, attack_objective, eot_gradient, pgd
from . import checks, denoise, finetune, study
from .classifier import ZeroShotClassifier, build_text_head
from .data import load_dataset
from .defences import ABSTAIN, Denoised, GaussianNoise, RandomizedSmoothing
from .evaluation import (AttackBudget, DatasetAttack, Proportion, RobustAccuracy, RobustnessReport, accuracy,
                         accuracy_vs_eps, attack_dataset, attack_success_rate, evaluate_robustness, predict,
                         robust_accuracy)
from .models import load_classifier, save_weights
from .oft import apply_oft, merge_oft
from .profiles import Profile, get_profile
from .square import square

__all__ = [
    "ABSTAIN", "AttackBudget", "AttackResult", "DatasetAttack", "Denoised", "GaussianNoise", "Profile", "Proportion",
    "RandomizedSmoothing", "RobustAccuracy", "RobustnessReport", "ZeroShotClassifier", "accuracy", "accuracy_vs_eps",
    "apgd", "apgd_targeted", "apply_oft", "attack_dataset", "attack_objective", "attack_success_rate", "build_text_head", "checks",
    "denoise", "eot_gradient", "evaluate_robustness", "finetune", "get_profile", "load_classifier", "load_dataset",
    "merge_oft", "pgd", "predict", "robust_accuracy", "save_weights", "square", "study",
]
__version__ = "0.1.0"

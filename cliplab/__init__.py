"""cliplab: adversarial robustness of CLIP — attacks, inference-time defences, robust fine-tuning.

Images are float NCHW tensors in [0, 1] at native resolution; every classifier and defence maps them to
logits, so every attack here is end to end.
"""
from .attacks import AttackResult, attack_objective, eot_gradient, pgd
from . import checks, denoise
from .classifier import ZeroShotClassifier, build_text_head
from .data import load_dataset
from .defences import ABSTAIN, Denoised, GaussianNoise, RandomizedSmoothing
from .evaluation import Proportion, RobustAccuracy, accuracy, attack_success_rate, predict, robust_accuracy
from .models import load_classifier, save_weights
from .profiles import Profile, get_profile

__all__ = [
    "ABSTAIN", "AttackResult", "Denoised", "GaussianNoise", "Profile", "Proportion", "RandomizedSmoothing",
    "RobustAccuracy", "ZeroShotClassifier", "accuracy", "checks", "denoise",
    "attack_objective", "attack_success_rate", "eot_gradient", "build_text_head", "get_profile", "load_classifier",
    "load_dataset", "pgd", "predict", "robust_accuracy", "save_weights",
]
__version__ = "0.1.0"

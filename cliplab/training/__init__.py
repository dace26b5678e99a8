"""Robust fine-tuning of CLIP's image encoder: its settings (``config``), the FARE and TeCoA objectives
(``objectives``), the resumable trainer (``trainer``), its run directories and checkpoints (``runs``), orthogonal
fine-tuning (``oft``) and the optimiser with its schedule (``optimizer``)."""
from .config import ADAPTERS, METHODS, FinetuneConfig
from .objectives import TrainingObjective, adversarial_loss, training_objective
from .oft import apply_oft, merge_oft, oft_parameters
from .runs import check_run_directory, check_same_run, run_settings
from .trainer import finetune, prepare, train_step

__all__ = ["ADAPTERS", "METHODS", "FinetuneConfig", "TrainingObjective", "adversarial_loss", "apply_oft",
           "check_run_directory", "check_same_run", "finetune", "merge_oft", "oft_parameters", "prepare", "run_settings",
           "train_step", "training_objective"]

"""Robust fine-tuning of CLIP's image encoder: its settings (``config``), the FARE and TeCoA objectives
(``objectives``), the resumable trainer (``trainer``), its run directories and checkpoints (``runs``), what it trains
and how that merges (``adapters``; orthogonal fine-tuning in ``oft``) and the optimiser with its schedule
(``optimizer``)."""
from .adapters import apply_adapter, apply_lora, check_adapter, lora_parameters, merge_adapters
from .config import ADAPTERS, METHODS, FinetuneConfig
from .objectives import TrainingObjective, adversarial_loss, training_objective
from .oft import apply_oft, oft_parameters
from .runs import check_run_directory, check_same_run, run_settings
from .trainer import finetune, prepare, train_step

__all__ = ["ADAPTERS", "METHODS", "FinetuneConfig", "TrainingObjective", "adversarial_loss", "apply_adapter",
           "apply_lora", "apply_oft", "check_adapter", "check_run_directory", "check_same_run", "finetune",
           "lora_parameters", "merge_adapters", "oft_parameters", "prepare", "run_settings", "train_step",
           "training_objective"]

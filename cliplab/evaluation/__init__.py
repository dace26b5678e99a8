"""Measuring robustness, always with sample size and a 95% CI: ``statistics`` (``Proportion``), ``prediction``
(predictions and majority votes), ``sweeps`` (PGD over a data set: success rates, adversarial images, the quick
look), ``ensemble`` (the worst case over an AutoAttack-style ensemble), ``tables`` (plain-text and Markdown tables)
and ``gradient_masking`` (the checks that a robust number is not an artefact of broken gradients)."""
from .ensemble import (ATTACKS, ENSEMBLES, SMALLER_RADII, AttackBudget, RobustnessReport, accuracy_curve,
                       ThreatModel, accuracy_vs_eps, check_attack_plan, evaluate_robustness, fit_to_classes,
                       robustness_vs_eps)
from .gradient_masking import Check, MaskingReport, gradient_masking_report
from .prediction import accuracy, looks_like_probabilities, predict, predict_each
from .statistics import Proportion
from .sweeps import DatasetAttack, PGDSweep, RobustAccuracy, attack_dataset, attack_success_rate, pgd_accuracy
from .tables import format_accuracy_table, robustness_table

__all__ = ["ATTACKS", "ENSEMBLES", "SMALLER_RADII", "AttackBudget", "Check", "DatasetAttack", "MaskingReport",
           "PGDSweep", "Proportion", "RobustAccuracy", "RobustnessReport", "ThreatModel", "accuracy", "accuracy_curve",
           "accuracy_vs_eps", "attack_dataset", "attack_success_rate", "check_attack_plan", "evaluate_robustness",
           "fit_to_classes", "format_accuracy_table", "gradient_masking_report", "looks_like_probabilities",
           "pgd_accuracy", "predict", "predict_each", "robustness_table", "robustness_vs_eps"]

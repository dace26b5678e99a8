"""cliplab: adversarial robustness of CLIP — attacks, inference-time defences, robust fine-tuning.

Images are float NCHW tensors in [0, 1] at native resolution; every classifier and defence maps them to
logits, so every attack here is end to end.

Layers (README, "Layout"), each a folder or a few modules, each importing only from its own layer or the ones below:
private helpers (``_*.py``); kernels (``attacks/``, ``defences/``, ``evaluation/``, ``training/``, ``classifier``);
loading (``models``, ``data``, ``shapes_clip``); the study (``study/``: profiles, 05/06's setup, the report card,
plots); the command line (``cli/``: commands and the notebook runner).

Every public name is imported on first use (PEP 562), so that ``import cliplab`` and the command line start without
torch: ``cliplab``'s signal handlers are in place before the seconds of torch's import (a Ctrl-C then is one line,
not an import's traceback).
"""
from importlib import import_module

# public name -> the module (relative to this package) that defines it
_HOMES = {
    **dict.fromkeys(["AttackResult", "apgd", "apgd_targeted", "attack_objective", "eot_gradient", "pgd", "square"],
                    ".attacks"),
    **dict.fromkeys(["WithPrecision", "ZeroShotClassifier", "build_text_head"], ".classifier"),
    "load_dataset": ".data",
    **dict.fromkeys(["ABSTAIN", "Denoised", "GaussianNoise", "RandomizedSmoothing"], ".defences"),
    **dict.fromkeys(["AttackBudget", "DatasetAttack", "Proportion", "RobustAccuracy", "RobustnessReport", "accuracy",
                     "accuracy_vs_eps", "attack_dataset", "attack_success_rate", "evaluate_robustness",
                     "gradient_masking_report", "pgd_accuracy", "predict"], ".evaluation"),
    **dict.fromkeys(["load_classifier", "save_weights"], ".models"),
    **dict.fromkeys(["Profile", "get_profile"], ".study"),
    **dict.fromkeys(["apply_lora", "apply_oft", "merge_adapters"], ".training"),
}
# the modules a notebook imports by name (every other submodule is found as well: cliplab.training, ...)
_MODULES = {"plots": ".study.plots", "study": ".study"}

__all__ = sorted([*_HOMES, *_MODULES])
__version__ = "0.1.0"


def __getattr__(name: str):
    """A public name, or a submodule (``cliplab.models``), imported on first use and kept."""
    if name in _HOMES:
        value = getattr(import_module(_HOMES[name], __name__), name)
    elif name in _MODULES:
        value = import_module(_MODULES[name], __name__)
    elif not name.startswith("__"):
        try:
            value = import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":  # the submodule exists and failed to import something
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *__all__})

"""Notebooks 05 and 06's shared setup (``FinetuneStudy``: classifier, splits, worst-case evaluation, cached
fine-tuned encoders), the encoder cache and export (``load_or_finetune``, ``save_encoder``, ``load_encoder``,
``export_weights``), and ``finetune_and_evaluate``, ``cliplab finetune``'s workflow (before, train, after, final
weights, metrics).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import _distributed
from .._io import atomic_write, file_lock, run_lock, save_tensors
from ..classifier import ZeroShotClassifier
from ..evaluation.ensemble import RobustnessReport, ThreatModel
from ..evaluation.statistics import Proportion
from ..evaluation.sweeps import pgd_accuracy
from ..evaluation.tables import format_accuracy_table, robustness_table
from ..models import save_weights
from ..training.adapters import check_adapter, matching_lora_rank, merge_adapters
from ..training.config import FinetuneConfig
from ..training.objectives import training_objective
from ..training.runs import check_run_directory, check_same_run, run_settings
from ..training.trainer import finetune, prepare, train_step
from .conclusions import Markdown
from .measures import trainable_parameters
from .shared import fingerprint, shared

if TYPE_CHECKING:  # the profile calls into this module (Profile.sweep): no import back, no circle
    from .profiles import Profile


class FinetuneStudy:
    """Notebooks 05 and 06's shared setup on ``profile``.

    Attributes:
        profile: the profile.
        original: the profile's classifier, never modified (fine-tuning works on copies).
        x_train, y_train: the ``profile.finetuning.images`` training images fine-tuning draws its batches from.
        x_test, y_test: the ``profile.sweeps.images`` test images every accuracy is measured on.
        class_names: the data set's class names.
        threat: the worst-case evaluation's ``ThreatModel`` (``profile.threat_model()``: 1/255, 2/255 and 4/255;
            the PGD quick look the study used to report, then an AutoAttack-style ensemble).
    """

    def __init__(self, profile: Profile):
        self.profile = profile
        self.threat: ThreatModel = profile.threat_model()
        self.original = profile.load_classifier()
        for tensor in self._text_tower():  # frozen, as fine-tuning holds it: the fine-tuned copies share it
            tensor.requires_grad_(False)
        self.x_train, self.y_train, self.class_names = profile.load_dataset("train", n=profile.finetuning.images)
        self.x_test, self.y_test, _ = profile.load_dataset("test", n=profile.sweeps.images)

    def runs(self) -> dict[str, tuple[str, FinetuneConfig]]:
        """``finetune_runs`` of the profile: 05-07's fine-tuned models."""
        return finetune_runs(self.profile)

    def frontier(self) -> dict[str, tuple[str, FinetuneConfig]]:
        """``frontier_runs`` of the profile and its image encoder: 06's other restricted updates."""
        return frontier_runs(self.profile, self.original.model.visual)

    def every_run(self) -> dict[str, tuple[str, FinetuneConfig]]:
        """``runs`` and ``frontier``: every fine-tuned model of the study."""
        return self.runs() | self.frontier()

    def models(self, *names: str) -> tuple[dict[str, ZeroShotClassifier], dict[str, list[dict]]]:
        """The original and the fine-tuned models ``names`` (of ``runs`` or ``frontier``; every one of ``runs`` when
        none is named), each from the cache or trained now, and their training histories. The fine-tuned models
        share the original's text tower (``fine_tuned``): move or cast them all together, never one alone."""
        runs = self.every_run()
        unknown = set(names) - set(runs)
        if unknown:
            raise ValueError(f"names must be among {', '.join(runs)}, got {', '.join(sorted(unknown))}")
        models, histories = {"original": self.original}, {}
        for name in names or self.runs():
            models[name], histories[name] = self.fine_tuned(*runs[name])
        return models, histories

    def parameter_table(self, names) -> Markdown:
        """How many parameters each fine-tuned model of ``names`` trains, and their share of the image encoder."""
        runs = self.runs()
        encoder = trainable_parameters(self.original, self.profile.finetune_config("fare", "full"))
        rows = []
        for name in names:
            config = runs[name][1]
            count = trainable_parameters(self.original, config)
            adapter = adapter_label(config)
            rows.append(f"| {name} | {adapter} | {count:,} | {count / encoder:.1%} |")
        return Markdown("| model | adapter | trainable parameters | share of the image encoder |\n|---|---|---|---|\n"
                        + "\n".join(rows))

    def adversarial_views(self, models: Mapping[str, nn.Module], images: int = 4):
        """The first ``images`` test images attacked at the largest radius on each model (one untargeted PGD run of
        4x the profile's steps, seed 0: a picture, not the worst case), side by side with their perturbations."""
        from ..attacks import pgd
        from ..evaluation.prediction import predict
        from . import plots  # pyplot only when a figure is drawn

        x, y, eps = self.x_test[:images], self.y_test[:images], self.threat.eps[-1]
        views = {}
        for name, model in models.items():
            x_adv = pgd(model, x, y, eps=eps, steps=4 * self.profile.sweeps.steps, seed=0).x_adv
            views[name] = x_adv, predict(model, x_adv).cpu()
        return plots.show_adversarial_views(x, y.cpu(), views, self.class_names, eps=eps)

    def fine_tuned(self, name: str, config: FinetuneConfig) -> tuple[ZeroShotClassifier, list[dict]]:
        """A copy of the original fine-tuned with ``config`` and its training history: from the cache
        (``profile.encoder_cache_dir/<name>``), else trained now and cached. The copy's image encoder is its own, its
        text tower the original's (``_copy_of_original``)."""
        return load_or_finetune(self._copy_of_original(), name, config, self.x_train, self.y_train,
                                self.profile.encoder_cache_dir)

    def _copy_of_original(self) -> ZeroShotClassifier:
        """A copy of the original to fine-tune, with an image encoder of its own but the original's text tower, whose
        tensors it shares: fine-tuning never changes them, and 06 holds a dozen copies (ViT-B/32's text tower is 63M
        parameters, 250 MB in fp32). Every copy stays on the original's device (``.to`` would move them all)."""
        return copy.deepcopy(self.original, memo={id(tensor): tensor for tensor in self._text_tower()})

    def _text_tower(self) -> list[torch.Tensor]:
        """The original's parameters and buffers outside its image encoder: what fine-tuning never changes."""
        model = self.original.model
        return [tensor for name, tensor in [*model.named_parameters(), *model.named_buffers()]
                if not name.startswith("visual.")]

    def evaluate(self, models: Mapping[str, nn.Module], threat: ThreatModel | None = None
                 ) -> dict[str, dict[float, RobustnessReport]]:
        """Each model's worst-case robustness reports under ``threat`` (default: the study's) on the test images
        (seed 0).

        Where the runtime names an ``evaluation_cache``, the notebooks of a run share these evaluations (05 and 06
        both evaluate the original and FARE-full, with the same images and settings): one evaluated elsewhere is read,
        not made again. The models another notebook is evaluating at the time come last, so that neither waits
        while there is work of its own."""
        threat = threat or self.threat
        cache = self.profile.runtime.evaluation_cache
        if cache is None:
            return {name: self._evaluation(model, threat)() for name, model in models.items()}
        settings = dict(threat=asdict(threat), batch_size=self.profile.sweeps.batch_size, seed=0)
        keys = {name: fingerprint(model, self.x_test, self.y_test, settings) for name, model in models.items()}
        reports = {}
        for wait in (False, True):
            for name in [name for name in models if name not in reports]:
                found = shared(cache, keys[name], self._evaluation(models[name], threat), wait=wait)
                if found is not None:
                    reports[name] = found
        return {name: reports[name] for name in models}

    def _evaluation(self, model: nn.Module, threat: ThreatModel) -> Callable[[], dict[float, RobustnessReport]]:
        """``model``'s evaluation under ``threat``, to be made."""
        return lambda: threat.evaluate(model, self.x_test, self.y_test, batch_size=self.profile.sweeps.batch_size,
                                       seed=0, progress=False)

    def at_largest_radius(self) -> ThreatModel:
        """The study's threat model at its largest radius alone: the radius the frontier compares at."""
        return replace(self.threat, eps=self.threat.eps[-1:])

    def step_seconds(self, name: str, steps: int = 2) -> float:
        """Seconds per optimiser step of the fine-tuning run ``name`` (of ``runs`` or ``frontier``), measured here on
        a copy of the original: the shortest of ``steps`` steps after one to warm up (the one least disturbed by
        whatever else runs beside it), on the run's batch size. Timing a run trains no more steps than the run itself
        and no fewer than two, one to warm up and one timed (all a smoke run's two steps allow)."""
        config = (self.every_run())[name][1]
        steps = max(1, min(steps, config.steps - 1))
        model = self._copy_of_original()
        objective = training_objective(model, copy.deepcopy(model.model.visual).requires_grad_(False), config)
        trained = prepare(model, config)
        optimizer = torch.optim.AdamW(trained, lr=config.lr)
        x, y = self.x_train[:config.batch_size], self.y_train[:config.batch_size]
        times = []
        for seed in range(steps + 1):
            start = time.perf_counter()
            train_step(objective, x, y, optimizer, trained, seed)
            times.append(time.perf_counter() - start)
        return min(times[1:])

    def adapters(self, names) -> tuple[dict[str, str], dict[str, int]]:
        """For the fine-tuned models ``names`` (of ``runs`` or ``frontier``): each one's adapter ("full", "oft",
        "lora", ...) and its trainable parameters (``trainable_parameters``)."""
        runs = self.every_run()
        configs = {name: runs[name][1] for name in names}
        return ({name: config.adapter for name, config in configs.items()},
                {name: trainable_parameters(self.original, config) for name, config in configs.items()})

    def nearest_oft(self, names) -> dict[str, str]:
        """For each restricted model of ``names`` that is not OFT, the OFT model of ``names`` trained with the same
        clean-term weight whose trainable parameters are nearest to its own (by ratio): the pairs 06's frontier
        compares. The nearest there is may still differ in size (06 prints the ratio), never in clean weight."""
        runs, (families, parameters) = self.every_run(), self.adapters(names)
        weight = {name: runs[name][1].clean_weight for name in names}
        ofts = [name for name in names if families[name] == "oft"]

        def nearest(name):
            peers = [oft for oft in ofts if weight[oft] == weight[name]]
            return min(peers, key=lambda oft: abs(math.log(parameters[oft] / parameters[name]))) if peers else None
        pairs = {name: nearest(name) for name in names if families[name] not in ("oft", "full")}
        return {name: oft for name, oft in pairs.items() if oft is not None}

    def frontier_table(self, results: Mapping[str, Mapping[float, Proportion]], seconds: Mapping[str, float]
                       ) -> Markdown:
        """06's frontier as a table: per fine-tuned model of ``results`` (``accuracy_curve`` of its reports), its
        adapter, trainable parameters, clean and worst-case accuracy at each of the study's radii (-- where it was
        not evaluated), and the training time its ``seconds`` per step (``step_seconds``) give for its steps."""
        runs = self.every_run()
        radii = self.threat.eps
        head = ("| model | adapter | trainable parameters | clean | "
                + " | ".join(f"worst case at {255 * e:g}/255" for e in radii)
                + " | training, estimated (s/step x steps) |")
        rows = [head, "|" + "---|" * (5 + len(radii))]
        sizes = sorted({p.n for curve in results.values() for p in curve.values()})
        for name, curve in results.items():
            if name not in runs:
                continue
            config = runs[name][1]
            cells = [curve[0].percent(unit="%"), *(curve[e].percent(unit="%") if e in curve else "--" for e in radii)]
            rows.append(f"| {name} | {adapter_label(config)} | {trainable_parameters(self.original, config):,} | "
                        + " | ".join(cells) + f" | {_duration(round(seconds[name], 2) * config.steps)} "
                        f"({seconds[name]:.2f} s x {config.steps}) |")
        return Markdown(f"Accuracy in % [95% CI], n={', '.join(map(str, sizes))} test images.\n\n" + "\n".join(rows))

    def worst_case_table(self, curves: Mapping[str, Mapping[float, Proportion]]) -> str:
        """The table 05 and 06 check: each model's clean and worst-case accuracy per radius (``accuracy_curve``
        of its reports), under a line naming the attacks."""
        return (f"worst case over PGD-{self.profile.sweeps.steps}, APGD-CE, APGD-T and Square:\n"
                + format_accuracy_table(curves))

    def attack_table(self, reports: Mapping[str, Mapping[float, RobustnessReport]]) -> Markdown:
        """Each model at the largest radius, attack by attack (``robustness_table``), as a Markdown table under a
        heading that names the radius."""
        return Markdown(f"**At {255 * self.threat.eps[-1]:g}/255, attack by attack.** "
                        + robustness_table({name: by_eps[self.threat.eps[-1]] for name, by_eps in reports.items()}))


def _duration(seconds: float) -> str:
    """Seconds, or minutes to a tenth from two minutes on (the per-step seconds shown times the steps multiply out)."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def finetune_runs(profile: Profile) -> dict[str, tuple[str, FinetuneConfig]]:
    """The fine-tuned models of 05-07, name -> (cache name, config): FARE and TeCoA on the whole encoder (05), and
    FARE with OFT (06) at each of the profile's block sizes, then the largest blocks again at two and three times
    the clean term's weight, the knob between clean and robust accuracy. (06's frontier adds ``frontier_runs``.)"""
    finetuning, config = profile.finetuning, profile.finetune_config
    runs = {"FARE-full": ("fare-full", config("fare", "full")), "TeCoA-full": ("tecoa-full", config("tecoa", "full"))}
    largest = max(finetuning.oft_block_sizes)
    ofts = [config("fare", "oft", block_size=b) for b in sorted(finetuning.oft_block_sizes)]
    ofts += [config("fare", "oft", block_size=largest, clean_weight=k * finetuning.oft_clean_weight) for k in (2, 3)]
    for oft in ofts:
        weight = "" if oft.clean_weight == finetuning.oft_clean_weight else f"-cw{oft.clean_weight:g}"
        runs[f"FARE-OFT b={oft.block_size} cw={oft.clean_weight:g}"] = (f"fare-oft{oft.block_size}{weight}", oft)
    return runs


def frontier_runs(profile: Profile, visual: nn.Module) -> dict[str, tuple[str, FinetuneConfig]]:
    """06's frontier beside OFT, FARE with three other restricted updates of ``visual``: LoRA at the ranks whose
    parameter counts come nearest OFT's at each of the profile's block sizes (``matching_lora_rank``), the last
    block and the last two, and BitFit (the fewest parameters, and one size only: it has no knob). Each trains with
    the OFT runs' steps, batch, inner attack and clean-term weight (``Profile.finetune_config``)."""
    config = profile.finetune_config
    ranks = sorted({matching_lora_rank(visual, b) for b in profile.finetuning.oft_block_sizes})
    runs = {f"FARE-LoRA r={r}": (f"fare-lora{r}", config("fare", "lora", rank=r)) for r in ranks}
    runs |= {f"FARE-last-{k}": (f"fare-last{k}", config("fare", "last-k", blocks=k)) for k in (1, 2)}
    runs["FARE-BitFit"] = ("fare-bitfit", config("fare", "bitfit"))
    return runs


def adapter_label(config: FinetuneConfig) -> str:
    """The adapter and its size, e.g. ``"oft, b=128"``, ``"lora, r=4"``, ``"last-k, k=2"``, ``"bitfit"``."""
    size = {"oft": f"b={config.block_size}", "lora": f"r={config.rank}", "last-k": f"k={config.blocks}"}
    return f"{config.adapter}, {size[config.adapter]}" if config.adapter in size else config.adapter


def save_encoder(classifier: ZeroShotClassifier, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> None:
    """Save only the image encoder (adapters merged), small enough to ship: the text side never changes."""
    merge_adapters(classifier.model.visual)
    save_tensors(classifier.model.visual.state_dict(), path, dtype)


def load_encoder(classifier: ZeroShotClassifier, path: str | os.PathLike) -> ZeroShotClassifier:
    """Load an image encoder saved by ``save_encoder`` into ``classifier`` (cast to its precision)."""
    from safetensors.torch import load_file

    classifier.model.visual.load_state_dict(load_file(path))
    return classifier.eval()


def export_weights(classifier: ZeroShotClassifier, path: str | os.PathLike) -> None:
    """Save the fine-tuned model (adapters merged) so that ``load_classifier(profile, pretrained=path)`` loads it."""
    merge_adapters(classifier.model.visual)
    save_weights(classifier, path)


def load_or_finetune(classifier: ZeroShotClassifier, name: str, config: FinetuneConfig, x: torch.Tensor,
                     y: torch.Tensor, directory: str | os.PathLike) -> tuple[ZeroShotClassifier, list[dict]]:
    """The notebooks' cache of fine-tuned encoders.

    Loads ``directory/<name>.safetensors`` (the image encoder, float16) and ``<name>.json`` (the config it
    was trained with and its training history) when they exist; otherwise fine-tunes ``classifier`` now
    (resuming ``<name>.run/`` if an earlier attempt was killed), saves both, and removes the run directory. Another
    process (or thread) asking for the same encoder meanwhile waits for it and loads it.

    Returns:
        The classifier with the fine-tuned encoder (as stored: float16 values), and the training history.

    Raises:
        ValueError: the cached encoder was trained with other settings than ``config`` (delete it to retrain).
    """
    directory = Path(directory)
    weights, record_file = directory / f"{name}.safetensors", directory / f"{name}.json"
    if not (weights.is_file() and record_file.is_file()):
        # another kernel may be training this encoder (cliplab reproduce runs 05 and 06 at once): wait, then use it
        with file_lock(directory / f".{name}.lock"):
            if not (weights.is_file() and record_file.is_file()):
                _finetune_into(directory, name, classifier, config, x, y)
    record = json.loads(record_file.read_text())
    check_same_run(record["config"], config, f"cannot use {weights} (delete it and {record_file.name} to retrain)")
    # the stored (float16) weights, also right after training, so that a cached run reproduces a fresh one
    return load_encoder(classifier, weights), record["history"]


def _finetune_into(directory: Path, name: str, classifier: ZeroShotClassifier, config: FinetuneConfig,
                   x: torch.Tensor, y: torch.Tensor) -> None:
    """Fine-tune ``classifier`` (resuming ``<name>.run/`` if an earlier attempt was killed) and store its encoder and
    record in ``directory``; the run directory goes once both are written."""
    run_dir = directory / f"{name}.run"
    finetune(classifier, x, y, config, run_dir, resume=(run_dir / "latest.json").is_file())
    history = json.loads((run_dir / "history.json").read_text())
    save_encoder(classifier, directory / f"{name}.safetensors")
    with atomic_write(directory / f"{name}.json") as tmp:
        Path(tmp).write_text(json.dumps({"config": run_settings(config), "history": history}))
    shutil.rmtree(run_dir)  # its resumable checkpoints are no longer needed


def finetune_and_evaluate(profile: Profile, config: FinetuneConfig, out: str | os.PathLike, *,
                          resume: bool = False) -> dict:
    """``cliplab finetune``: evaluate the profile's classifier, fine-tune it with checkpoints in ``out``, evaluate
    it again, write ``out/final.safetensors`` (adapters merged) and ``out/metrics.json`` (atomically).

    Both evaluations are PGD (the profile's steps and restarts, margin loss, seed 0) at ``config.eps`` on the
    first ``profile.defences.images`` test images. Everything that can fail fast does (settings, ``out``, weights,
    data, the adapter's size) before any model is loaded.

    Returns:
        The metrics written: the config, eps, and the clean and robust accuracy before and after.
    """
    out = Path(out)

    def check():  # before the model, the data and the "before" evaluation; in every process under torchrun
        config.validate()
        check_run_directory(out, config, resume)
        architecture = profile.check_inputs()
        check_adapter(architecture.visual, config)

    _distributed.on_every_rank(check, "cliplab finetune's checks")
    # the run's lock, taken before anything loads: a second run into ``out`` fails at once (finetune re-enters it)
    with run_lock(out) if _distributed.is_main() else contextlib.nullcontext():
        classifier = profile.load_classifier()
        x, y, _ = profile.load_dataset("train", n=profile.finetuning.images)
        x_test, y_test, _ = profile.load_dataset("test", n=profile.defences.images)

        def evaluate(model):
            result = pgd_accuracy(model, x_test, y_test, eps=config.eps, steps=profile.sweeps.steps,
                                  restarts=profile.sweeps.restarts, loss="margin", seed=0, progress=False)
            return {"clean": result.clean.as_dict(), "robust": result.robust.as_dict()}

        metrics = {"config": asdict(config), "eps": config.eps, "before": evaluate(classifier)}
        finetune(classifier, x, y, config, out, resume=resume, eval_data=(x_test, y_test))
        metrics["after"] = evaluate(classifier)
        if _distributed.is_main():  # the one process that writes
            export_weights(classifier, out / "final.safetensors")
            with atomic_write(out / "metrics.json") as tmp:
                Path(tmp).write_text(json.dumps(metrics, indent=2))
    return metrics

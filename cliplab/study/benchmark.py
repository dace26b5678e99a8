"""``cliplab benchmark``: the worst-case zero-shot robustness of several CLIPs on the standard zero-shot suite
(``cliplab.suite``), one cell per (model, data set).

Each cell is the evaluation ``cliplab evaluate`` makes (``robustness_vs_eps``: clean, then the attack ensemble at
each radius, nested), written atomically to ``OUT/cells/`` as soon as it finishes, with its settings: a run that was
stopped, even by kill -9, resumes with the cells it has, and a cell made with other settings is refused instead of
mixed in. The text head of each (model, data set) is kept in ``OUT/text-heads/``. ``markdown``, ``write_csv`` and
``plot`` render the grid: rows models, columns data sets, clean and robust accuracy with n and the 95% CI.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import _distributed
from .._arguments import check_choice, check_directory, check_int, check_seed
from .._io import atomic_write
from .._torch import PRECISIONS
from ..evaluation.ensemble import AttackBudget, check_attack_plan, robustness_vs_eps
from ..evaluation.statistics import Proportion
from ..suite import IMAGE_SIZE, SUITE
from .profiles import Runtime
from .report import check_encoder, results_document, versions


@dataclass(frozen=True)
class ModelSpec:
    """One model of the grid, written ``[LABEL=]NAME[:PRETRAINED][+ENCODER]`` on the command line: a profile
    (``shapes``), an open_clip architecture with a tag or a checkpoint (``ViT-B-32:openai``,
    ``ViT-B-32:/ckpt/final.safetensors``), or a hub model (``hf-hub:chs20/fare2-clip``), with an image encoder that
    cliplab fine-tuned loaded on top after ``+``."""

    label: str  # the row's name (and its files')
    name: str  # a profile, an open_clip architecture or hf-hub:ORG/REPO
    pretrained: str | None = None  # a tag or a checkpoint path; None: the model's own weights
    encoder: str | None = None  # an image encoder alone (finetune.save_encoder), loaded on top

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        text = text.strip()
        label, _, rest = text.partition("=") if re.match(r"^[\w.-]+=", text) else ("", "", text)
        source, _, encoder = rest.partition("+")
        if source.startswith("hf-hub:"):
            name, pretrained = source, None
        else:
            name, _, pretrained = source.partition(":")
        if not name:
            raise ValueError(f"models: {text!r} names no model; write [LABEL=]NAME[:PRETRAINED][+ENCODER], e.g. "
                             "ViT-B-32:openai or fare=hf-hub:chs20/fare2-clip")
        return cls(label or text, name, pretrained or None, encoder or None)

    @property
    def slug(self) -> str:
        """The label as a file name."""
        return re.sub(r"[^\w.-]+", "_", self.label).strip("_") or "model"


@dataclass(frozen=True)
class BenchmarkSettings:
    """What ``cliplab benchmark`` evaluates, and how (the attack budget as ``cliplab evaluate`` has it)."""

    models: tuple[ModelSpec, ...]  # the rows
    datasets: tuple[str, ...]  # the columns: names of cliplab.suite.SUITE
    eps: tuple[float, ...] = (2 / 255, 4 / 255)  # L-inf radii in [0, 1] pixel units (the FARE paper's)
    n: int = 1000  # images per data set, a seeded sample of its test split
    attacks: str | tuple[str, ...] = "standard"  # an ensemble name (ENSEMBLES) or attack names
    budget: AttackBudget = field(default_factory=AttackBudget)  # steps, targets, queries
    batch_size: int = 128  # images per attack batch
    seed: int = 0  # seeds the sample of images and every attack
    single_template: bool = False  # one prompt per class ("a photo of a {}.") instead of the set's ensemble
    image_size: int = IMAGE_SIZE  # side of the photographs of many sizes, resized and centre-cropped
    runtime: Runtime = Runtime()  # device, precision and the data directory (weights are per model)

    def cell_settings(self, model: ModelSpec, dataset: str) -> dict:
        """What a cell's numbers depend on: a cell on disk is reused only when these are the same."""
        measured = {k: v for k, v in asdict(self).items() if k not in ("models", "datasets", "runtime")}
        return {"model": asdict(model), "dataset": dataset, **measured, "device": self.runtime.device,
                "precision": self.runtime.precision}


def cell_path(out: Path, model: ModelSpec, dataset: str) -> Path:
    return Path(out) / "cells" / f"{model.slug}--{dataset}.json"


def check(settings: BenchmarkSettings, out: str | os.PathLike) -> None:
    """Every setting, every data set (its files, its classes, one image) and every model's weights checked, and the
    cells already in ``out`` compared with these settings, before any model is built: a bad one fails in seconds."""
    from ..models import check_weights
    from ..suite import load_suite_set, open_set, suite_class_names

    if not settings.models or not settings.datasets:
        raise ValueError("models and datasets must each name at least one")
    check_directory(Path(out), "out")
    for name in settings.datasets:
        check_choice(name, "datasets", SUITE)
    for what, values in (("models", [m.slug for m in settings.models]), ("datasets", settings.datasets)):
        if len(set(values)) != len(values):
            raise ValueError(f"{what} must not repeat one, got {', '.join(values)}")
    if not settings.eps or any(not 0 < eps <= 1 for eps in settings.eps) or len(set(settings.eps)) != len(settings.eps):
        raise ValueError(f"eps must be distinct radii in (0, 1] (pixel values are in [0, 1]), got {settings.eps}")
    for name in ("n", "batch_size", "image_size"):
        check_int(getattr(settings, name), name)
    check_seed(settings.seed)
    check_choice(settings.runtime.device, "device", ("cpu", "cuda"))
    check_choice(settings.runtime.precision, "precision", PRECISIONS)
    for dataset in settings.datasets:
        opened = open_set(dataset, settings.runtime.data_root)
        check_attack_plan(settings.attacks, "linf", settings.budget, len(suite_class_names(dataset, opened)))
        if settings.n > len(opened):
            raise ValueError(f"n must be at most {len(opened)}, the size of {dataset}'s test split, got {settings.n}")
        load_suite_set(dataset, settings.runtime.data_root, 1, seed=settings.seed, image_size=settings.image_size)
    for model in settings.models:
        architecture = check_weights(model.name, **({} if model.pretrained is None else {"pretrained": model.pretrained}))
        if model.encoder is not None:
            check_encoder(model.encoder, architecture)
    for model in settings.models:
        for dataset in settings.datasets:
            _read_cell(cell_path(Path(out), model, dataset), settings.cell_settings(model, dataset))


def run(settings: BenchmarkSettings, out: str | os.PathLike, progress: bool = True, log=None,
        checked: bool = False) -> dict:
    """Evaluate every cell of the grid that ``out`` does not hold yet, writing each as it finishes.

    Args:
        log: called with one line per cell as it is done or resumed (the command line passes ``print``).
        checked: the caller already ran ``check(settings, out)`` (it loads every model's weights onto the meta
            device: not worth doing twice).

    Returns:
        ``{(model label, data set): cell}``, each cell as written (``settings``, ``results`` per radius, ``versions``).
    """
    if not checked:
        check(settings, out)
    out = Path(out)
    cells = {}
    for model in settings.models:
        classifier = None  # loaded once per model, for its first data set to evaluate
        for dataset in settings.datasets:
            path = cell_path(out, model, dataset)
            cell = _read_cell(path, settings.cell_settings(model, dataset))
            resumed = cell is not None
            if not resumed:
                classifier, cell = _evaluate_cell(settings, model, dataset, classifier, out, progress)
                if _distributed.is_main():
                    with atomic_write(path) as tmp:
                        Path(tmp).write_text(json.dumps(cell, indent=2) + "\n")
            if log is not None and _distributed.is_main():
                log(f"{model.label} x {dataset}: {_summary(cell)}" + (" (resumed)" if resumed else ""))
            cells[model.label, dataset] = cell
    return cells


def _evaluate_cell(settings: BenchmarkSettings, model: ModelSpec, dataset: str, classifier, out: Path,
                   progress: bool):
    from ..models import load_classifier
    from ..suite import load_suite_set, suite_templates

    runtime = settings.runtime
    x, y, names = load_suite_set(dataset, runtime.data_root, settings.n, seed=settings.seed,
                                 image_size=settings.image_size)
    templates = ["a photo of a {}."] if settings.single_template else suite_templates(dataset)
    head_path = out / "text-heads" / f"{model.slug}--{dataset}.safetensors"
    head = _read_text_head(head_path, names, templates)
    if classifier is None:
        weights = {} if model.pretrained is None else {"pretrained": model.pretrained}
        classifier = load_classifier(model.name, class_names=names, templates=templates, device=runtime.device,
                                     precision=runtime.precision, text_head=head, **weights)
        if model.encoder is not None:
            from .finetuning import load_encoder

            load_encoder(classifier, model.encoder)
    else:
        classifier = classifier.for_classes(names, templates, head)
    if head is None and _distributed.is_main():
        _write_text_head(head_path, classifier.text_head, names, templates)
    attacks = settings.attacks if isinstance(settings.attacks, str) else list(settings.attacks)
    reports = robustness_vs_eps(classifier, x, y, settings.eps, attacks=attacks, budget=settings.budget,
                                batch_size=settings.batch_size, seed=settings.seed, progress=progress)
    cell = {"settings": settings.cell_settings(model, dataset), "classes": len(names),
            "results": results_document(reports), "versions": versions()}
    return classifier, json.loads(json.dumps(cell))  # as it reads back from disk (tuples as lists)


def _read_cell(path: Path, expected: dict) -> dict | None:
    """The cell at ``path`` if it was made with ``expected``; None if there is none; an error if it differs."""
    if not path.is_file():
        return None
    try:
        cell = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable cell ({error}); delete it to evaluate that cell again") from None
    expected = json.loads(json.dumps(expected))
    if cell.get("settings") != expected:
        theirs = cell.get("settings") or {}
        differing = sorted(k for k in expected.keys() | theirs.keys() if expected.get(k) != theirs.get(k))
        raise FileExistsError(f"{path} was made with other settings ({', '.join(differing)} differ): write the "
                              "benchmark to another --out, or delete that file to evaluate the cell again")
    return cell


def _prompts_digest(names, templates) -> str:
    return hashlib.sha256(json.dumps([list(names), list(templates)]).encode()).hexdigest()


def _read_text_head(path: Path, names, templates):
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as file:
        if (file.metadata() or {}).get("prompts") != _prompts_digest(names, templates):
            return None  # made for other class names or templates: computed again
        return file.get_tensor("text_head")


def _write_text_head(path: Path, head, names, templates) -> None:
    from safetensors.torch import save_file

    with atomic_write(path) as tmp:
        save_file({"text_head": head.detach().cpu().contiguous()}, tmp,
                  metadata={"prompts": _prompts_digest(names, templates)})


def _proportion(entry: dict) -> Proportion:
    return Proportion(entry["hits"], entry["n"])


def _summary(cell: dict) -> str:
    results = cell["results"]
    return ", ".join([f"clean {_proportion(results[0]['clean'])}"] +
                     [f"{r['eps_255']:g}/255 {_proportion(r['robust']).percent(unit='%')}" for r in results])


def markdown(cells: dict, settings: BenchmarkSettings) -> str:
    """One Markdown table per radius: a row per model, a column per data set, ``clean / robust`` in % with their
    95% CIs; the header gives each data set's n."""
    tables = []
    for k, eps in enumerate(settings.eps):
        sizes = {d: cells[m.label, d]["results"][k]["clean"]["n"] for m in settings.models for d in settings.datasets}
        header = ["model", *[f"{d} (n={sizes[d]})" for d in settings.datasets]]
        lines = [f"clean / worst-case robust accuracy in % [95% CI] at eps {255 * eps:g}/255 (L-inf)", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for model in settings.models:
            row = [cells[model.label, d]["results"][k] for d in settings.datasets]
            lines.append(f"| {model.label} | " + " | ".join(
                f"{_proportion(r['clean']).percent()} / {_proportion(r['robust']).percent()}" for r in row) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


CSV_COLUMNS = ("model", "dataset", "eps_255", "n", "clean", "clean_low", "clean_high", "robust", "robust_low",
               "robust_high")


def csv_text(cells: dict) -> str:
    """One row per (model, data set, radius): accuracies as fractions with their 95% CIs."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for (label, dataset), cell in cells.items():
        for result in cell["results"]:
            clean, robust = _proportion(result["clean"]), _proportion(result["robust"])
            writer.writerow([label, dataset, f"{result['eps_255']:g}", clean.n,
                             *[f"{v:.4f}" for p in (clean, robust) for v in (p.value, *p.ci95)]])
    return buffer.getvalue()


def plot(cells: dict, settings: BenchmarkSettings):
    """Clean (x) against worst-case robust accuracy (y) at the largest radius: a colour per data set, a marker per
    model, the 95% CIs as error bars."""
    import matplotlib.pyplot as plt

    markers = "osD^vP*Xh<>"
    colours = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for j, model in enumerate(settings.models):
        for k, dataset in enumerate(settings.datasets):
            result = cells[model.label, dataset]["results"][-1]
            clean, robust = _proportion(result["clean"]), _proportion(result["robust"])
            ax.errorbar(100 * clean.value, 100 * robust.value, xerr=_ci_bars(clean), yerr=_ci_bars(robust),
                        fmt=markers[j % len(markers)], color=colours[k % len(colours)], markersize=7, capsize=2,
                        elinewidth=0.8)
        ax.plot([], [], markers[j % len(markers)], color="black", label=model.label)  # the legend: models...
    for k, dataset in enumerate(settings.datasets):
        ax.plot([], [], "-", linewidth=6, color=colours[k % len(colours)], label=dataset)  # ... and data sets
    ax.plot([0, 100], [0, 100], ":", color="grey", linewidth=0.8)
    ax.set(xlim=(-2, 102), ylim=(-2, 102), xlabel="clean accuracy (%)",
           ylabel=f"worst-case robust accuracy at {255 * settings.eps[-1]:g}/255 (%)")
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    return fig


def _ci_bars(p: Proportion) -> list[list[float]]:
    """Matplotlib's asymmetric error bar of a proportion's 95% CI, in points."""
    low, high = p.ci95
    return [[100 * (p.value - low)], [100 * (high - p.value)]]


def write_outputs(cells: dict, settings: BenchmarkSettings, out: str | os.PathLike) -> list[Path]:
    """``benchmark.md``, ``benchmark.csv`` and ``benchmark.png`` in ``out``, each written atomically."""
    import matplotlib.pyplot as plt

    out = Path(out)
    written = []
    for name, text in (("benchmark.md", markdown(cells, settings) + "\n"), ("benchmark.csv", csv_text(cells))):
        with atomic_write(out / name) as tmp:
            Path(tmp).write_text(text)
        written.append(out / name)
    fig = plot(cells, settings)
    with atomic_write(out / "benchmark.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return [*written, out / "benchmark.png"]

"""``cliplab benchmark``: the worst-case zero-shot robustness of several CLIPs on the standard zero-shot suite
(``cliplab.suite``), one cell per (model, data set).

Each cell is the evaluation ``cliplab evaluate`` makes (``robustness_vs_eps``: clean, then the attack ensemble at
each radius, nested), written atomically to ``OUT/cells/`` as soon as it finishes, with its settings: a run that was
stopped, even by kill -9, resumes with the cells it has, and a cell made with other settings is refused instead of
mixed in. The text head of each (model, data set) is kept in ``OUT/text-heads/``. ``markdown`` and ``plot`` render
the grid, ``write_outputs`` writes it: rows models, columns data sets, clean and robust accuracy with n and the 95% CI.
"""
from __future__ import annotations

import contextlib
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
from .._io import atomic_write, file_digest, run_lock, save_tensors, written_by_a_run
from .._torch import PRECISIONS, resolve_precision
from ..evaluation.ensemble import ENSEMBLES, ThreatModel, check_attack_plan, fit_to_classes
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
        named = re.match(r"^([^=:+]*)=", text)  # LABEL= before any ':' or '+' of the source
        if named and not re.fullmatch(r"[\w.-]{1,100}", named.group(1)):
            raise ValueError(f"models: the label {named.group(1)!r} of {text!r} may use letters, digits, '_', '.' and "
                             "'-' only, at most 100 of them (it names the row and its files)")
        label, _, rest = text.partition("=") if named else ("", "", text)
        source, _, encoder = rest.partition("+")
        if source.startswith("hf-hub:"):
            name, pretrained = source, None
        else:
            name, colon, pretrained = source.partition(":")
            if colon and not pretrained:
                raise ValueError(f"models: {text!r} names no weights after ':'; write NAME:TAG or NAME:/path/to/"
                                 f"checkpoint, or {name or 'NAME'} alone for the model's own weights")
        if not name:
            raise ValueError(f"models: {text!r} names no model; write [LABEL=]NAME[:PRETRAINED][+ENCODER], e.g. "
                             "ViT-B-32:openai or fare=hf-hub:chs20/fare2-clip")
        return cls(label or text, name, pretrained or None, encoder or None)

    @property
    def slug(self) -> str:
        """The label as a file name (a long one, a path given as the label, shortened and told apart by a digest of
        the label: a file name has at most 255 bytes)."""
        slug = re.sub(r"[^\w.-]+", "_", self.label).strip("_") or "model"
        return slug if len(slug) <= 100 else f"{slug[:80]}-{hashlib.sha256(self.label.encode()).hexdigest()[:12]}"

    def contents(self) -> dict:
        """The SHA-256 of the weights and of the encoder file this row loads (None: random initialisation, no
        encoder): a cell or a text head is the row's only while these are the same, whatever the paths."""
        from ..models import own_weights_if_unset, weights_file

        weights = weights_file(self.name, pretrained=own_weights_if_unset(self.pretrained))
        return {"weights_sha256": weights and file_digest(weights),
                "encoder_sha256": self.encoder and file_digest(self.encoder)}


@dataclass(frozen=True)
class BenchmarkSettings:
    """What ``cliplab benchmark`` evaluates, and how (the attack budget as ``cliplab evaluate`` has it)."""

    models: tuple[ModelSpec, ...]  # the rows
    datasets: tuple[str, ...]  # the columns: names of cliplab.suite.SUITE
    # the radii (L-inf, the FARE paper's 2 and 4/255), the ensemble and its budget, fitted to each set's classes
    threat: ThreatModel = field(default_factory=lambda: ThreatModel((2 / 255, 4 / 255)))
    n: int = 1000  # images per data set, a seeded sample of its test split
    batch_size: int = 128  # images per attack batch
    seed: int = 0  # seeds the sample of images and every attack
    single_template: bool = False  # one prompt per class ("a photo of a {}.") instead of the set's ensemble
    image_size: int = IMAGE_SIZE  # side of the photographs of many sizes, resized and centre-cropped
    runtime: Runtime = Runtime()  # device, precision and the data directory (weights are per model)

    def cell_settings(self, model: ModelSpec, dataset: str) -> dict:
        """What a cell's numbers depend on: a cell on disk is reused only when these are the same (the weights by
        their content, the precision as what it means on this device)."""
        measured = {k: v for k, v in asdict(self).items() if k not in ("models", "datasets", "runtime")}
        return {"model": asdict(model), **model.contents(), "dataset": dataset, **measured,
                "device": self.runtime.device,
                "precision": resolve_precision(self.runtime.device, self.runtime.precision)}


OUTPUTS = ("benchmark.md", "benchmark.csv", "benchmark.png")  # what write_outputs writes into OUT


def cell_path(out: Path, model: ModelSpec, dataset: str) -> Path:
    return Path(out) / "cells" / f"{model.slug}--{dataset}.json"


def check(settings: BenchmarkSettings, out: str | os.PathLike) -> None:
    """Every setting, every data set (its files, its classes, every image the run will read) and every model's
    weights checked, and the cells already in ``out`` compared with these settings, before any model is built: a bad
    one fails in seconds."""
    from ..models import check_weights, own_weights_if_unset
    from ..suite import check_suite_images, open_set, suite_class_names

    if not settings.models or not settings.datasets:
        raise ValueError("models and datasets must each name at least one")
    for where in (Path(out), Path(out) / "cells", Path(out) / "text-heads"):  # every folder a run writes in
        check_directory(where, "out")
    for name in settings.datasets:
        check_choice(name, "datasets", SUITE)
    slugs = {}
    for model in settings.models:  # two rows whose labels give one file name would share their cells
        if model.slug in slugs:
            raise ValueError(f"models: {slugs[model.slug]!r} and {model.label!r} would share the files {model.slug}--*;"
                             " give one of them a label (LABEL=NAME...)")
        slugs[model.slug] = model.label
    if len(set(settings.datasets)) != len(settings.datasets):
        raise ValueError(f"datasets must not repeat one, got {', '.join(settings.datasets)}")
    if not isinstance(settings.threat, ThreatModel):
        raise TypeError(f"threat must be a ThreatModel, got {type(settings.threat).__name__}")
    for name in ("n", "batch_size", "image_size"):
        check_int(getattr(settings, name), name)
    check_seed(settings.seed)
    check_choice(settings.runtime.device, "device", ("cpu", "cuda"))
    check_choice(settings.runtime.precision, "precision", PRECISIONS)
    for dataset in settings.datasets:
        opened = open_set(dataset, settings.runtime.data_root)
        check_attack_plan(settings.threat.attacks, settings.threat.norm, settings.threat.budget,
                          len(suite_class_names(dataset, opened)))
        if settings.n > len(opened):
            raise ValueError(f"n must be at most {len(opened)}, the size of {dataset}'s test split, got {settings.n}")
        check_suite_images(dataset, settings.runtime.data_root, settings.n, seed=settings.seed)
    for model in settings.models:
        architecture = check_weights(model.name, pretrained=own_weights_if_unset(model.pretrained))
        if model.encoder is not None:
            check_encoder(model.encoder, architecture)
    stale = [f"{path.name} ({difference})" for model in settings.models for dataset in settings.datasets
             if (difference := _cell_difference(path := cell_path(Path(out), model, dataset),
                                                settings.cell_settings(model, dataset)))]
    if stale:
        raise FileExistsError(f"{len(stale)} cell{'s' * (len(stale) > 1)} in {Path(out) / 'cells'} "
                              f"{'were' if len(stale) > 1 else 'was'} made with other settings: {'; '.join(stale)}. "
                              "Write the benchmark to another --out, or delete those files to evaluate them again")


def check_not_theirs(out: str | os.PathLike) -> None:
    """Before a run marks ``out`` as its own (``run_lock``): the table, CSV or figure files there must be a
    benchmark run's, never files a user had."""
    theirs = [name for name in OUTPUTS if (Path(out) / name).exists()]
    if theirs and not written_by_a_run(out):
        raise FileExistsError(f"out: {out} holds {', '.join(theirs)}, which no benchmark run wrote there; choose "
                              "another --out, or move those files away")


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
    out = Path(out)
    check_not_theirs(out)
    with run_lock(out, "benchmark run") if _distributed.is_main() else contextlib.nullcontext():
        if not checked:
            check(settings, out)
        return _run(settings, out, progress, log)


def _run(settings: BenchmarkSettings, out: Path, progress: bool, log) -> dict:
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
    from ..models import load_classifier, own_weights_if_unset
    from ..suite import load_suite_set, suite_templates

    runtime = settings.runtime
    x, y, names = load_suite_set(dataset, runtime.data_root, settings.n, seed=settings.seed,
                                 image_size=settings.image_size)
    templates = ["a photo of a {}."] if settings.single_template else suite_templates(dataset)
    head_path = out / "text-heads" / f"{model.slug}--{dataset}.safetensors"
    key = _text_head_key(names, templates, model.contents()["weights_sha256"])
    head = _read_text_head(head_path, key)
    if classifier is None:
        classifier = load_classifier(model.name, class_names=names, templates=templates, device=runtime.device,
                                     precision=runtime.precision, text_head=head,
                                     pretrained=own_weights_if_unset(model.pretrained))
        if model.encoder is not None:
            from .finetuning import load_encoder

            load_encoder(classifier, model.encoder)
    else:
        classifier = classifier.for_classes(names, templates, head)
    if head is None and _distributed.is_main():
        _write_text_head(head_path, classifier.text_head, key)
    threat = settings.threat
    reports = threat.evaluate(classifier, x, y, batch_size=settings.batch_size, seed=settings.seed, progress=progress)
    ran, budget = fit_to_classes(check_attack_plan(threat.attacks, threat.norm, threat.budget, len(names)),
                                 threat.budget, len(names))
    cell = {"settings": settings.cell_settings(model, dataset), "classes": len(names),
            "ensemble": {"attacks": ran, "num_targets": budget.num_targets}, "results": results_document(reports),
            "versions": versions()}
    return classifier, json.loads(json.dumps(cell))  # as it reads back from disk (tuples as lists)


def _read_cell(path: Path, expected: dict) -> dict | None:
    """The cell at ``path`` if it was made with ``expected``; None if there is none; an error if it differs."""
    if not path.is_file():
        return None
    cell = _read_cell_file(path)
    difference = _differing(cell, expected)
    if difference:
        raise FileExistsError(f"{path} was made with other settings ({difference}): write the benchmark to another "
                              "--out, or delete that file to evaluate the cell again")
    return cell


def _read_cell_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable cell ({error}); delete it to evaluate that cell again") from None


def _cell_difference(path: Path, expected: dict) -> str | None:
    """How the cell at ``path`` differs from ``expected`` ("n differ"), None if it does not or there is none."""
    return None if not path.is_file() else _differing(_read_cell_file(path), expected)


def _differing(cell: dict, expected: dict) -> str | None:
    expected = json.loads(json.dumps(expected))
    theirs = cell.get("settings") or {}
    differing = sorted(k for k in expected.keys() | theirs.keys() if expected.get(k) != theirs.get(k))
    return f"{', '.join(differing)} differ" if differing else None


def _text_head_key(names, templates, weights_sha256: str | None) -> str:
    """What a text head depends on: the class names, the prompts and the text tower's weights (the file's content;
    an image encoder loaded on top leaves the text tower as it is)."""
    return hashlib.sha256(json.dumps([list(names), list(templates), weights_sha256]).encode()).hexdigest()


def _read_text_head(path: Path, key: str):
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as file:
            if (file.metadata() or {}).get("key") != key:
                return None  # made for other weights, class names or prompts: computed again
            return file.get_tensor("text_head")
    except Exception:  # a cache of this command's own, truncated or damaged (safetensors' own error type): redone
        return None


def _write_text_head(path: Path, head, key: str) -> None:
    save_tensors({"text_head": head.cpu()}, path, metadata={"key": key})


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
    for k, eps in enumerate(settings.threat.eps):
        sizes = {d: cells[m.label, d]["results"][k]["clean"]["n"] for m in settings.models for d in settings.datasets}
        header = ["model", *[f"{d} (n={sizes[d]})" for d in settings.datasets]]
        lines = [f"clean / worst-case robust accuracy in % [95% CI] at eps {255 * eps:g}/255 (L-inf)", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for model in settings.models:
            row = [cells[model.label, d]["results"][k] for d in settings.datasets]
            lines.append(f"| {model.label} | " + " | ".join(
                f"{_proportion(r['clean']).percent()} / {_proportion(r['robust']).percent()}" for r in row) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables + _fitted_ensembles(cells, settings))


def _fitted_ensembles(cells: dict, settings: BenchmarkSettings) -> list[str]:
    """A line for each data set whose ensemble was fitted to its few classes (``fit_to_classes``): what ran."""
    attacks, budget = settings.threat.attacks, settings.threat.budget
    asked = list(ENSEMBLES[attacks]) if isinstance(attacks, str) else list(attacks)
    notes = []
    for dataset in settings.datasets:
        cell = cells[settings.models[0].label, dataset]
        ensemble = cell.get("ensemble", {"attacks": asked, "num_targets": budget.num_targets})
        if ensemble["attacks"] != asked or ensemble["num_targets"] != budget.num_targets:
            targets = f" ({ensemble['num_targets']} target{'s' * (ensemble['num_targets'] != 1)})"
            ran = [name + targets if name.startswith("apgd-t") else name for name in ensemble["attacks"]]
            notes.append(f"{dataset} has {cell['classes']} classes: the ensemble ran as {', '.join(ran)} "
                         "(AutoAttack's limits on few classes)")
    return notes


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
           ylabel=f"worst-case robust accuracy at {255 * settings.threat.eps[-1]:g}/255 (%)")
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
    for name, text in zip(OUTPUTS, (markdown(cells, settings) + "\n", csv_text(cells))):
        with atomic_write(out / name) as tmp:
            Path(tmp).write_text(text)
        written.append(out / name)
    fig = plot(cells, settings)
    with atomic_write(out / OUTPUTS[2]) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return [*written, out / OUTPUTS[2]]

"""Figures of the study, shared by the notebooks. Every rate is drawn with its 95% confidence band."""
from __future__ import annotations

import math

import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .._io import atomic_write
from ..evaluation.statistics import Proportion

BAND = "shaded: 95% Clopper-Pearson interval"  # what every band of plot_rates is, said in its legend
BARS = "bars: 95% Clopper-Pearson intervals"  # what plot_tradeoff's error bars are
# the top-5 bars: the true label, the attack's target, every other class (no colour a curve of the study uses)
LABEL_COLOUR, TARGET_COLOUR, OTHER_COLOUR = "tab:red", "tab:orange", "silver"
# the study's figures: large enough to read in a notebook on the web, small enough to keep the committed PNGs small
STYLE = {"figure.dpi": 100, "font.size": 9, "legend.fontsize": 8, "axes.titlesize": 9}


def use_style() -> None:
    """The study's figure style (``STYLE``), for the notebook that calls it."""
    plt.rcParams.update(STYLE)


# the study's models keep one colour in every notebook (05, 06, 07); OFT variants and other defences take the next
# free colour of their own list, in the order named (the same in 06 and 07)
MODEL_COLOURS = {"original": "tab:blue", "FARE-full": "tab:green", "TeCoA-full": "tab:purple"}
RESTRICTED_COLOURS = ("tab:brown", "tab:pink", "tab:olive", "tab:cyan", "darkgoldenrod", "teal", "navy", "lime")
OTHER_COLOURS = ("tab:gray", "black", "gold", "magenta", "darkkhaki", "slateblue")
# 06's frontier: the other restricted updates (FARE-LoRA, FARE-last-k, ...) in colours no model of 05-07 takes, and
# one marker shape per adapter family, so that no two points of the frontier figure look alike
FRONTIER_COLOURS = ("black", "darkviolet", "navy", "goldenrod", "teal", "slateblue", "deeppink")
FAMILY_MARKERS = {"full": "o", "oft": "s", "lora": "^", "last-k": "D", "bitfit": "v"}


def colours_for(names: Sequence[str]) -> dict[str, str]:
    """One colour per name (a model, a defence), the same in every figure of a notebook that passes it on and, for
    the study's models, in every notebook; none red or orange, which the top-5 bars keep for the label and target."""
    restricted, frontier, others = iter(RESTRICTED_COLOURS), iter(FRONTIER_COLOURS), iter(OTHER_COLOURS)
    return {name: MODEL_COLOURS.get(name) or next(restricted if name.startswith("FARE-OFT") else
                                                  frontier if name.startswith("FARE-") else others)
            for name in names}


def save_figure(fig: plt.Figure, name: str, directory: str | os.PathLike | None) -> Path | None:
    """Save ``fig`` as ``<directory>/<name>.png`` (atomically); nothing when ``directory`` is None (a notebook passes
    ``profile.runtime.figures``, which ``cliplab reproduce`` sets)."""
    if directory is None:
        return None
    path = Path(directory) / f"{name}.png"
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def plot_rates(ax: plt.Axes, x: Sequence[float], curves: Mapping[str, Sequence[Proportion]], *,
               xlabel: str, ylabel: str, colors: Mapping[str, str] | None = None, **plot_kwargs) -> None:
    """One line per curve with its Clopper-Pearson 95% band (the legend says so); the sample size goes in the
    legend, which sits beside the axes so that it never covers a curve. ``colors`` maps a curve to its colour, so
    that one meaning keeps one colour across a notebook's figures."""
    plot_kwargs.setdefault("marker", "o")
    for label, rates in curves.items():
        values = [100 * r.value for r in rates]
        low, high = zip(*[(100 * r.ci95[0], 100 * r.ci95[1]) for r in rates])
        n = sorted({r.n for r in rates})
        n_text = f"n={n[0]}" if len(n) == 1 else f"n={n[0]}-{n[-1]}"
        color = (colors or {}).get(label)
        line, = ax.plot(x, values, label=f"{label} ({n_text})", **({"color": color} if color else {}), **plot_kwargs)
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    legend_beside(ax)


def legend_beside(ax: plt.Axes, **kwargs) -> None:
    """The axes' legend beside them (never over the data), ending with what the shaded bands are."""
    handles, labels = ax.get_legend_handles_labels()
    if BAND not in labels:
        handles, labels = [*handles, Patch(color="grey", alpha=0.2)], [*labels, BAND]
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, **kwargs)


def plot_robust_vs_eps(ax: plt.Axes, curves: Mapping[str, Mapping[float, Proportion]], *,
                       colors: Mapping[str, str] | None = None) -> None:
    """Each model's clean and worst-case accuracy against the radius (``accuracy_curve``s), with their intervals."""
    radii = next(iter(curves.values()))
    plot_rates(ax, [255 * eps for eps in radii], {name: list(curve.values()) for name, curve in curves.items()},
               xlabel="eps (x 1/255, L-inf)", ylabel="accuracy (%)", colors=colors)


def plot_training_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], *, window: int = 20,
                         batch_size: int | None = None, colors: Mapping[str, str] | None = None) -> plt.Figure:
    """Loss and batch accuracies (clean, under the inner attack) of fine-tuning runs, smoothed over ``window``
    steps, with the periodic held-out evaluations as points; ``histories`` maps a run's name to its per-step
    history (``cliplab.training.finetune``), ``colors`` a run to its colour. A training diagnostic: no interval, and the
    caption says so."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
    titles = {"loss": "training loss (each method its own objective)", "clean": "batch accuracy, clean (%)",
              "robust": "batch accuracy under the inner attack (%)"}
    for name, history in histories.items():
        steps = torch.tensor([float(h["step"]) for h in history])
        for ax, key in zip(axes, titles):
            values = torch.tensor([float(h[key]) for h in history]) * (1 if key == "loss" else 100)
            width = min(window, len(values))  # a moving average: (steps - width + 1) points
            line, = ax.plot(steps[width - 1:], values.unfold(0, width, 1).mean(1), label=name,
                            **({"color": colors[name]} if colors and name in colors else {}))
            evaluated = [h for h in history if f"eval_{key}" in h]  # periodic held-out evaluation, if any
            if evaluated:
                ax.plot([h["step"] for h in evaluated], [100 * h[f"eval_{key}"] for h in evaluated], "o",
                        color=line.get_color(), label=f"{name}, held-out (n={evaluated[0]['eval_n']})")
    for ax, title in zip(axes, titles.values()):
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    fig.tight_layout()
    handles, labels = axes[0].get_legend_handles_labels()  # one legend for the three panels, below them
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=min(len(labels), 4))
    batches = f" of {batch_size}-image batches" if batch_size else ""
    width = min(window, *(len(history) for history in histories.values()))
    fig.suptitle(f"moving averages over {width} steps{batches}: a training diagnostic, without intervals", y=1.02)
    return fig


def plot_tradeoff(ax: plt.Axes, points: Mapping[str, tuple[Proportion, Proportion]], *, xlabel: str,
                  ylabel: str, colors: Mapping[str, str] | None = None, markers: Mapping[str, str] | None = None
                  ) -> None:
    """One point per model at (clean, robust) accuracy, with 95% intervals as error bars on both axes (the legend,
    beside the axes, says so); ``markers`` may set a point's marker (e.g. one per family of defences)."""
    for label, (clean, robust) in points.items():
        _point(ax, clean, robust, label=f"{label} (n={clean.n})", marker=(markers or {}).get(label, "o"),
               **({"color": colors[label]} if colors and label in colors else {}))
    _finish_points(ax, xlabel, ylabel)


def _point(ax: plt.Axes, clean: Proportion, robust: Proportion, **style) -> None:
    """One model at (clean, robust) accuracy in %, its 95% intervals as error bars on both axes."""
    x, y = 100 * clean.value, 100 * robust.value
    ax.errorbar(x, y, xerr=[[x - 100 * clean.ci95[0]], [100 * clean.ci95[1] - x]],
                yerr=[[y - 100 * robust.ci95[0]], [100 * robust.ci95[1] - y]], capsize=3, alpha=0.85, **style)


def _finish_points(ax: plt.Axes, xlabel: str, ylabel: str, **legend) -> None:
    """Labels, grid and the legend beside the axes (points fill the corners), ending on what the bars are."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], linestyle="none"))  # a line of text: what the bars are
    ax.legend(handles, [*labels, BARS], loc="upper left", bbox_to_anchor=(1.02, 1), **legend)


def plot_frontier(ax: plt.Axes, points: Mapping[str, tuple[Proportion, Proportion]], parameters: Mapping[str, int],
                  front: Sequence[str], families: Mapping[str, str], *, xlabel: str, ylabel: str,
                  colors: Mapping[str, str] | None = None) -> None:
    """``plot_tradeoff``'s points (95% intervals on both axes), one marker shape per adapter family (``families``:
    name -> "oft", "lora", ...; hollow for the families beside full fine-tuning and OFT, so that a point on top of
    another hides neither), each marker's size growing with the log of its trainable ``parameters`` (the legend
    gives them); the Pareto-optimal points ``front`` ringed, and the edge of the region they dominate drawn as a
    staircase to the axes: not a line of models one could train between them."""
    for label, (clean, robust) in points.items():
        hollow = {"markerfacecolor": "none", "markeredgewidth": 1.5} if families[label] not in ("full", "oft") else {}
        _point(ax, clean, robust, label=f"{label} ({parameters[label]:,} parameters, n={clean.n})",
               marker=FAMILY_MARKERS.get(families[label], "o"),
               markersize=4 + 3 * max(math.log10(max(parameters[label], 1)) - 3, 0), **hollow,
               **({"color": colors[label]} if colors and label in colors else {}))
    xs, ys = [100 * points[name][0].value for name in front], [100 * points[name][1].value for name in front]
    (left, right), (bottom, top) = ax.get_xlim(), ax.get_ylim()
    ax.step([left, *xs, xs[-1]], [ys[0], *ys, bottom], where="pre", color="dimgray", linestyle="--", linewidth=1.5,
            zorder=3, label="the frontier: its points ringed; below and left of the dashed edge, dominated")
    ax.plot(xs, ys, linestyle="none", marker="o", markersize=20, markerfacecolor="none", markeredgecolor="dimgray",
            zorder=3)
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    _finish_points(ax, xlabel, ylabel, fontsize=8)


def show_image(ax: plt.Axes, image: torch.Tensor, title: str = "") -> None:
    """Draw one (3, H, W) image in [0, 1]."""
    ax.imshow(image.detach().permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def show_top5(ax: plt.Axes, probabilities: torch.Tensor, class_names: Sequence[str], *, title: str = "",
              highlight: Sequence[int] = (), target: int | None = None) -> None:
    """Horizontal bars of the five most probable classes; ``highlight`` classes (the true label) are drawn in red and
    the ``target`` class in orange, both always shown (in place of the least likely when not among the five)."""
    probabilities = probabilities.detach().float().cpu()
    indices = probabilities.topk(5).indices.tolist()
    must_show = [*highlight, *([] if target is None else [target])]
    for slot, shown in zip(range(4, -1, -1), [c for c in must_show if c not in indices]):  # replace the least likely
        while indices[slot] in must_show:
            slot -= 1
        indices[slot] = shown
    indices.sort(key=lambda i: -probabilities[i].item())
    names = [class_names[i] for i in indices]
    colours = [LABEL_COLOUR if i in highlight else TARGET_COLOUR if i == target else OTHER_COLOUR for i in indices]
    ax.barh(range(5)[::-1], 100 * probabilities[indices].numpy(), color=colours)
    ax.set_yticks(range(5)[::-1], names, fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("probability (%)")
    ax.set_title(title, fontsize=9)


def show_attack(clean: torch.Tensor, adversarial: torch.Tensor, p_clean: torch.Tensor, p_adv: torch.Tensor,
                class_names: Sequence[str], *, label: int, target: int | None = None, eps: float) -> plt.Figure:
    """Clean image, amplified perturbation, adversarial image, and the top-5 probabilities of both."""
    fig, axes = plt.subplots(1, 5, figsize=(15, 3), gridspec_kw={"width_ratios": [1, 1, 1, 1.6, 1.6]})
    delta = adversarial - clean
    scale = 0.5 / max(delta.abs().max().item(), 1e-12)
    show_image(axes[0], clean, f"clean: {class_names[label]}")
    show_image(axes[1], 0.5 + scale * delta, f"perturbation x{scale:.0f}\n(L-inf {255 * delta.abs().max():.1f}/255)")
    goal = f"target: {class_names[target]}" if target is not None else "untargeted"
    show_image(axes[2], adversarial, f"adversarial ({goal})")
    show_top5(axes[3], p_clean, class_names, title="top-5, clean (red: the label)", highlight=[label])
    show_top5(axes[4], p_adv, class_names, title=f"top-5, adversarial (eps={255 * eps:g}/255; orange: the target)",
              highlight=[label], target=target)
    fig.tight_layout()
    return fig


def show_denoising(classifier: torch.nn.Module, image: torch.Tensor, label: int, class_names: Sequence[str], *,
                   sigma_space: float = 1.0, sigma_color: float = 0.1, kernel_size: int = 5,
                   name: str = "image", target: int | None = None) -> plt.Figure:
    """One (3, H, W) image before and after a bilateral filter, what the filter removed (amplified), and the
    classifier's top-5 probabilities on both, the true ``label`` in red and the attack's ``target`` (if any) in
    orange (notebook 04's explorer). ``name`` says what the image is (clean, or which attack made it)."""
    from ..defences.denoise import bilateral

    example = image[None]
    denoised = bilateral(example, sigma_space=sigma_space, sigma_color=sigma_color, kernel_size=kernel_size)
    with torch.no_grad():
        p_clean, p_denoised = classifier(example).softmax(1)[0], classifier(denoised).softmax(1)[0]
    fig, axes = plt.subplots(1, 5, figsize=(15, 3), gridspec_kw={"width_ratios": [1, 1, 1, 1.6, 1.6]})
    removed = image - denoised[0]
    aim = "" if target is None else f", target: {class_names[target]}"
    show_image(axes[0], image, f"{name}\n(label: {class_names[label]}{aim})")
    show_image(axes[1], denoised[0], f"denoised\ns={sigma_space:.2g}, c={sigma_color:.2g}, k={kernel_size}")
    scale = 0.5 / max(removed.abs().max().item(), 1e-8)
    show_image(axes[2], 0.5 + scale * removed, f"removed, x{scale:.0f}\n(L-inf {255 * removed.abs().max():.1f}/255)")
    key = "red: the label" + ("" if target is None else "; orange: the target")
    show_top5(axes[3], p_clean, class_names, title=f"top-5, image ({key})", highlight=[label], target=target)
    show_top5(axes[4], p_denoised, class_names, title=f"top-5, denoised ({key})", highlight=[label], target=target)
    fig.tight_layout()
    return fig


def show_smoothing(smoothed: torch.nn.Module, image: torch.Tensor, label: int, class_names: Sequence[str], *,
                   n: int = 100, alpha: float = 0.001, seed: int = 0) -> plt.Figure:
    """What randomized smoothing sees of one (3, H, W) image (notebook 03's explorer): the image, one noisy draw at
    the ``RandomizedSmoothing`` model's sigma, the share of ``n`` noisy draws each class wins (the vote, the true
    ``label`` in red) and Cohen et al.'s certificate from those draws (a class and an L2 radius, or an abstention)."""
    example = image[None]
    votes = smoothed.sample_counts(example, n, seed=seed)[0].float() / n
    classes, radii = smoothed.certify(example, n0=n, n=n, alpha=alpha, seed=seed)
    generator = torch.Generator(image.device).manual_seed(seed)
    noisy = image + smoothed.sigma * torch.randn(image.shape, generator=generator, device=image.device)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3), gridspec_kw={"width_ratios": [1, 1, 1.6]})
    show_image(axes[0], image, f"image: {class_names[label]}")
    show_image(axes[1], noisy, f"one noisy draw, sigma={smoothed.sigma:g}")
    verdict = ("abstains" if classes[0] < 0 else
               f"certifies {class_names[classes[0]]}, L2 radius {radii[0]:.2f}"
               + ("" if classes[0] == label else " (WRONG: a certificate for the wrong class)"))
    limit = smoothed.largest_certifiable_radius(n, alpha)
    show_top5(axes[2], votes, class_names, highlight=[label],
              title=f"vote of {n} draws (red: the label; the most {n} draws can certify: {limit:.2f})\n{verdict}")
    axes[2].set_xlabel("share of the draws (%)")
    fig.tight_layout()
    return fig



def show_adversarial_views(x: torch.Tensor, y: torch.Tensor, views: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                           class_names: Sequence[str], *, eps: float) -> plt.Figure:
    """The same images attacked on several models, side by side: for each model (a row) and image, the adversarial
    image and its perturbation (amplified by one factor for the whole figure), titled with the model's prediction.

    Args:
        x: (K, 3, H, W) clean images; y: (K,) labels.
        views: model name -> (adversarial images (K, 3, H, W), the model's predictions on them (K,)).
    """
    deltas = {name: x_adv - x for name, (x_adv, _) in views.items()}
    scale = 0.5 / max(max(d.abs().max().item() for d in deltas.values()), 1e-12)
    # 32x32 images need few pixels: a low dpi keeps the committed PNG small (noise compresses badly)
    fig, axes = plt.subplots(len(views) + 1, 2 * len(x), figsize=(1.5 * 2 * len(x), 1.7 * (len(views) + 1)),
                             squeeze=False, dpi=70)
    for k in range(len(x)):
        show_image(axes[0, 2 * k], x[k], f"clean: {class_names[y[k]]}")
        axes[0, 2 * k + 1].axis("off")
    for row, (name, (x_adv, predictions)) in enumerate(views.items(), start=1):
        for k in range(len(x)):
            verdict = "right" if predictions[k] == y[k] else "wrong"
            show_image(axes[row, 2 * k], x_adv[k], f"{name}:\n{class_names[predictions[k]]} ({verdict})")
            show_image(axes[row, 2 * k + 1], 0.5 + scale * deltas[name][k], f"perturbation x{scale:.0f}")
    fig.suptitle(f"the same images attacked on each model, eps={255 * eps:g}/255 (L-inf)")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # 0.4 inch above the panels' titles for its own
    return fig

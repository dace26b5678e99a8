"""What each notebook's results say, written from the results: every number and every judgement in a notebook's
conclusions comes from here, so that the same notebook reads true on ``shapes``, on ``cifar100`` and on a smoke run.

A judgement is decided by the numbers: two rates differ only where their 95% Clopper-Pearson intervals are
disjoint (``compare``), a target is met only where the measured value reaches it, and a maximum over a grid is
reported with an interval that accounts for the choice (``selected_interval``). Each function returns ``Markdown``,
which a notebook renders as Markdown and nbval compares as text.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from .._stats import clopper_pearson
from ..evaluation.ensemble import RobustnessReport
from ..evaluation.statistics import Proportion


class Markdown(str):
    """Text that a notebook renders as Markdown; its plain-text form (what nbval compares) is the same text."""

    def _repr_markdown_(self) -> str:
        return str(self)

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(str(self))


def _join(lines: Sequence[str]) -> Markdown:
    return Markdown("\n".join(line for line in lines if line))


def rate(p: Proportion) -> str:
    """``53.0% [48.5, 57.4] (n=500)``: a value with its 95% interval and sample size."""
    return str(p)


def compare(a: Proportion, b: Proportion) -> int:
    """1 when ``a`` is clearly above ``b`` (its 95% interval lies wholly above ``b``'s), -1 when clearly below, 0
    when the intervals overlap (no difference this sample size can show)."""
    (a_low, a_high), (b_low, b_high) = a.ci95, b.ci95
    return 1 if a_low > b_high else -1 if a_high < b_low else 0


def relation(a: Proportion, b: Proportion) -> str:
    """``compare`` in words: "clearly above", "clearly below" or "not distinguishable at this n from" (overlapping
    intervals: a difference this sample cannot show, not an equality)."""
    return {1: "clearly above", -1: "clearly below", 0: "not distinguishable at this n from"}[compare(a, b)]


def selected_interval(p: Proportion, candidates: int) -> tuple[float, float]:
    """A 95% interval for a value chosen as the best of ``candidates`` measured ones: Clopper-Pearson at the
    Bonferroni level 0.05 / candidates, which covers every candidate at once and so also the one chosen."""
    low, high = clopper_pearson(p.hits, p.n, 0.025 / candidates)
    return float(low), float(high)


def verdict(p: Proportion, threshold: float) -> str:
    """A target "at least ``threshold``" judged on ``p``'s 95% interval: "met" when the whole interval reaches it,
    "missed" when none of it does, otherwise "not settled at this n" with the side the point estimate falls on."""
    low, high = p.ci95
    if low >= threshold:
        return "met"
    if high < threshold:
        return "missed"
    side = "meets" if p.value >= threshold else "misses"
    return f"not settled at this n (the interval straddles it; the estimate {side} it)"


def best_of(values: Mapping, name: str) -> str:
    """The highest of several measured rates (key -> ``Proportion``), said as a choice among them: clearly best only
    when its interval lies above every other's, and with the Bonferroni interval that accounts for choosing it."""
    best = max(values, key=lambda key: values[key].value)
    low, high = selected_interval(values[best], len(values))
    clearly = all(compare(values[best], p) > 0 for key, p in values.items() if key != best)
    return (f"{name} {best:g} is " + ("clearly the best" if clearly else
                                      "the highest point estimate, not clearly the best (intervals overlap)")
            + f": {rate(values[best])}, or [{100 * low:.1f}, {100 * high:.1f}] once the choice among "
              f"{len(values)} is accounted for (Bonferroni)")


def _eps(eps: float) -> str:
    return f"{255 * eps:g}/255"


def _listing(items: Sequence[str], last: str = "and") -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" {last} " + items[-1]


# ------------------------------------------------------------------------------------------ 01: PGD


def attack_conclusions(rates: Mapping[str, Sequence[Proportion]], eps_255: Sequence[float]) -> Markdown:
    """01: untargeted and targeted PGD success against the radius (``rates`` maps "untargeted" and "targeted" to
    one ``Proportion`` per radius of ``eps_255``)."""
    untargeted, targeted = rates["untargeted"], rates["targeted"]
    lines = []
    for name, curve in rates.items():
        reach = [e for e, p in zip(eps_255, curve) if p.ci95[0] >= 0.9]
        lines.append(f"- **{name.capitalize()} PGD** succeeds on {rate(curve[0])} of the correctly classified images "
                     f"at {eps_255[0]:g}/255 and on {rate(curve[-1])} at {eps_255[-1]:g}/255; "
                     + (f"from {reach[0]:g}/255 on, even the lower end of its interval is at least 90%."
                        if reach else "within this grid the lower end of its interval never reaches 90%."))
    harder = [e for e, t, u in zip(eps_255, targeted, untargeted) if compare(t, u) < 0]
    lines.append("- Making the model say one chosen class is harder than making it wrong: targeted success is "
                 f"clearly below untargeted (disjoint intervals) at {len(harder)} of {len(eps_255)} radii "
                 f"({_listing([f'{e:g}/255' for e in harder])})." if harder else
                 "- At no radius does this sample show targeted success below untargeted success.")
    falls = []
    for name, curve in rates.items():
        points = list(zip(eps_255, curve))
        falls += [f"{name}, {a:g}/255 to {b:g}/255" for (a, p), (b, q) in zip(points, points[1:]) if compare(q, p) < 0]
    lines.append("- Both success rates grow with eps, as they must: no radius is clearly below a smaller one."
                 if not falls else f"- **Warning**: success falls clearly as eps grows ({_listing(falls)}): a sign "
                 "of a broken attack, not of a robust model.")
    return _join(lines)


# ------------------------------------------------------------------------------------------ 02: EOT


def eot_conclusions(samples: Sequence[int], by_samples: Mapping[str, Sequence[Proportion]],
                    transfer: Mapping[str, Proportion], transform: str, eps: float) -> Markdown:
    """02: EOT through ``transform`` (``by_samples`` maps untargeted/targeted to the success at each number of
    EOT ``samples``, the first being plain PGD; ``transfer`` the success of an attack crafted without the
    defence)."""
    lines = []
    for mode, curve in by_samples.items():
        plain, eot = curve[0], curve[-1]
        verdict = {1: f"EOT with {samples[-1]} draws is clearly stronger than plain PGD",
                   -1: f"EOT with {samples[-1]} draws is clearly weaker than plain PGD (**warning**: more samples "
                       "should never hurt; look for a bug)",
                   0: f"EOT with {samples[-1]} draws and plain PGD are not distinguishable at this n"}[compare(eot, plain)]
        highest = max(curve, key=lambda p: p.value)
        lines.append(f"- **{mode}**, {transform}, eps={_eps(eps)}: plain PGD {rate(plain)}, EOT {rate(eot)}: "
                     f"{verdict}. The transferred attack succeeds on {rate(transfer[mode])}, "
                     f"{relation(transfer[mode], highest)} the highest white-box rate "
                     f"({_white_box_attacks([n for n, p in zip(samples, curve) if p.value == highest.value])}, "
                     f"{rate(highest)}).")
    unchanged = [mode for mode, curve in by_samples.items() if compare(curve[-1], curve[0]) == 0
                 and max(p.ci95[0] for p in curve) > 0.05]  # a rate at the floor can show no change at all
    if unchanged:
        lines.append(f"- Not distinguishable ({_listing(unchanged)}) means: averaging the gradient over draws of the "
                     f"{transform} did not make the attack measurably stronger at this n. It does not mean the "
                     "defence resists: read the success rates themselves for that.")
    return _join(lines)


def _white_box_attacks(samples: Sequence[int]) -> str:
    """The white-box attacks of 02's curve by their numbers of EOT draws (1: plain PGD), in words."""
    draws = [str(n) for n in samples if n > 1]
    return " and ".join((["plain PGD"] if 1 in samples else [])
                        + ([f"EOT with {_listing(draws)} draws"] if draws else []))


def eot_by_eps_conclusions(eps_grid: Sequence[float], by_eps: Mapping[str, Sequence[Proportion]],
                           transform: str) -> Markdown:
    """02: plain PGD against EOT-PGD through ``transform`` at each radius (``by_eps``: two curves, plain first)."""
    (plain_name, plain), (eot_name, eot) = by_eps.items()
    stronger = [f"{e:g}/255" for e, p, q in zip(eps_grid, plain, eot) if compare(q, p) > 0]
    if not stronger:
        return _join([f"- Through the {transform}, {eot_name} is not clearly stronger than {plain_name} at any of "
                      f"{_listing([f'{e:g}/255' for e in eps_grid], 'or')}: their intervals overlap at every radius."])
    return _join([f"- Through the {transform}, {eot_name} is clearly stronger than {plain_name} at "
                  f"{_listing(stronger)} (disjoint intervals); at the other radii the two are not distinguishable at "
                  "this n."])


def worst_case_sentence(name: str, report: RobustnessReport) -> Markdown:
    """One defence's worst case at its radius, against its clean accuracy: how many of the images it classifies right
    when clean it gets wrong after the attacks (``_broken``; with a randomised judge, its fresh draws count too)."""
    right = report.clean.hits
    return Markdown(f"- **{name}**, eps={_eps(report.eps)}: clean {rate(report.clean)}, worst-case robust "
                    f"{rate(report.robust)}: after the attacks it is wrong on {_broken(report.clean, report.robust)} "
                    f"image{'s' * (right != 1)} it classifies right when clean.")


def _broken(clean: Proportion, robust: Proportion) -> str:
    """"k of the m": of the m images an evaluation's judge classifies right when clean, the k it gets wrong (or
    abstains from) after the attacks. A count, not a comparison of intervals: the worst case is judged on the
    clean-right images only, so the robust images are some of them."""
    return f"{clean.hits - robust.hits} of the {clean.hits}"


# ------------------------------------------------------------------------------------------ 03: smoothing


def smoothing_conclusions(sigmas: Sequence[float], clean: Sequence[Proportion], attacked: Sequence[Proportion],
                          undefended: Proportion, eps: float) -> Markdown:
    """03: the smoothed classifier's clean and worst-case accuracy per noise level, against the undefended one."""
    lines = []
    costly = [f"{s:g}" for s, c in zip(sigmas, clean) if compare(c, undefended) < 0]
    lines.append(f"- The undefended model is right on {rate(undefended)} of these images. The noise costs clean "
                 "accuracy clearly (disjoint intervals) at "
                 + (f"sigma = {_listing(costly)}." if costly else "no sigma of the grid."))
    lines.append(f"- Worst-case accuracy under the adaptive attacks at eps={_eps(eps)}: "
                 + best_of(dict(zip(sigmas, attacked)), "sigma") + ".")
    lines.append("- Of the images each smoothed model's vote classifies right when clean, it is wrong on or abstains "
                 "from " + _listing([f"{_broken(c, a)} at sigma = {s:g}" for s, c, a in zip(sigmas, clean, attacked)])
                 + " after the attacks: each worst case above is the clean accuracy, already cut by the noise, less "
                 "these images.")
    return _join(lines)


def certification_conclusions(sigmas: Sequence[float], limits: Sequence[float], needed: Mapping[str, float],
                              certified: Mapping[float, Mapping[str, Proportion | None]], n: int,
                              alpha: float) -> Markdown:
    """03: what the certificates say, with the limit the Monte-Carlo budget puts on them.

    Args:
        limits: per sigma, the largest radius ``n`` draws at ``alpha`` can certify (``largest_certifiable_radius``).
        needed: threat name (e.g. "L-inf 1/255") -> the L2 radius a certificate needs to cover it.
        certified: sigma -> threat name -> certified accuracy at that radius, None where it lies past the limit.
    """
    if max(limits) <= 0:
        return Markdown(f"- With n={n} draws at alpha={alpha:g} no image can be certified at all (alpha^(1/n) is "
                        "below one half): every certified accuracy here is zero because of the budget, not the model.")
    lines = [f"- With n={n} draws at alpha={alpha:g} no image can be certified beyond sigma x PhiInv(alpha^(1/n)) ("
             + ", ".join(f"{r:.2f} at sigma={s:g}" for s, r in zip(sigmas, limits))
             + "), however robust the model: past that radius a zero is the budget's, not the model's."]
    for threat, radius in needed.items():
        reachable = {s: p for s, p in ((s, certified[s][threat]) for s in sigmas) if p is not None}
        if not reachable:
            lines.append(f"- {threat} needs an L2 radius of {radius:.2f}: beyond every sigma's limit, so this budget "
                         "cannot certify it at all.")
            continue
        lines.append(f"- {threat} needs an L2 radius of {radius:.2f}: within the limit of sigma = "
                     f"{_listing([f'{s:g}' for s in reachable])}; certified there: "
                     + (f"{rate(next(iter(reachable.values())))}" if len(reachable) == 1 else
                        best_of(reachable, "sigma")) + ".")
    return _join(lines)


# ------------------------------------------------------------------------------------------ 04: denoising


def denoising_conclusions(sigma: float, static: Proportion, adaptive: Proportion, random_rates:
                          Mapping[str, Proportion]) -> Markdown:
    """04 (a)/(b): targeted success after denoising at spatial ``sigma``, attack made without and through the
    filter, and the same for the random-sigma filter (``random_rates``: non-adaptive, EOT adaptive)."""
    (static_name, random_static), (adaptive_name, random_adaptive) = random_rates.items()
    lines = [f"- At spatial sigma {sigma:g}, targeted success after denoising is {rate(static)} when the attack "
             f"ignores the filter and {rate(adaptive)} when it goes through it: the adaptive attack is "
             f"{relation(adaptive, static)} the non-adaptive one.",
             f"- The random-sigma filter: {static_name} {rate(random_static)}, {adaptive_name} "
             f"{rate(random_adaptive)}; the second is {relation(random_adaptive, random_static)} the first."]
    if compare(adaptive, static) > 0:
        lines.append("- What the filter undoes is an attack that did not know of it; the original study's figure (a) "
                     "measures that, not robustness.")
    return _join(lines)


def grid_conclusions(robust: Mapping[tuple[float, float], Proportion], clean: Mapping[tuple[float, float],
                     Proportion], quick_look: Proportion, quick_cell: tuple[float, float], eps: float, *,
                     steps: int) -> Markdown:
    """04 (c): the colour x spatial sigma grid of worst-case accuracy (cell -> ``Proportion``), its best cell with
    an interval that accounts for choosing it, and what the PGD-``steps`` quick look at ``quick_cell`` misses."""
    best = max(robust, key=lambda cell: robust[cell].value)
    low, high = selected_interval(robust[best], len(robust))
    colour, spatial = best
    kept = [cell for cell in robust if compare(robust[cell], clean[cell]) >= 0]  # no clear loss under attack
    lines = [f"- The best of the {len(robust)} cells (colour sigma {colour:g}, spatial sigma {spatial:g}) keeps "
             f"{rate(robust[best])} worst-case accuracy at eps={_eps(eps)}, against {rate(clean[best])} clean. "
             f"It was chosen on these very images: its honest interval, covering all {len(robust)} cells at once "
             f"(Bonferroni), is [{100 * low:.1f}, {100 * high:.1f}], and a new sample would tend to put it lower.",
             f"- So none of the {len(robust)} settings tried keeps its clean accuracy under attack." if not kept else
             f"- At {len(kept)} of the {len(robust)} cells the attack takes no accuracy this sample can show (worst "
             "case and clean accuracy have overlapping intervals); look at their clean accuracy before calling that "
             "robustness.",
             f"- A single untargeted PGD-{steps} run through the filter at (colour {quick_cell[0]:g}, spatial "
             f"{quick_cell[1]:g}) leaves {rate(quick_look)} standing; the ensemble leaves {rate(robust[quick_cell])}"
             + (f": PGD-{steps} alone would overstate the filter's robustness, as the rates of (a) and (b) may."
                if compare(quick_look, robust[quick_cell]) > 0 else
                ", not distinguishable at this n; only the ensemble's number is reported.")]
    return _join(lines)


# ------------------------------------------------------------------------------------------ 05, 06: fine-tuning


def finetune_conclusions(results: Mapping[str, Mapping[float, Proportion]],
                         reports: Mapping[str, Mapping[float, RobustnessReport]], *, reference: str = "original",
                         robust_target: tuple[str, float] | None = None,
                         masking: tuple[str, int, bool] | None = None) -> Markdown:
    """05: each fine-tuned model against ``reference`` (``results``: name -> {0: clean, eps: worst case}), the
    fine-tuned models against each other, what the ensemble found beyond PGD, and a robustness target (model name,
    lowest robust accuracy at the largest radius) and the gradient-masking checks (model name, images, passed)."""
    original = results[reference]
    radii = [eps for eps in original if eps]
    eps = radii[-1]
    tuned = [name for name in results if name != reference]
    lines = []
    for name in tuned:
        gains = [_eps(e) for e in radii if compare(results[name][e], original[e]) > 0]
        lines.append(f"- **{name}**: clean {rate(results[name][0])}, {relation(results[name][0], original[0])} the "
                     f"{reference}'s {rate(original[0])}; worst case at {_eps(eps)} {rate(results[name][eps])} "
                     f"against {rate(original[eps])}. Clearly more robust at "
                     + (f"{_listing(gains)}." if gains else "no radius."))
    for a, b in zip(tuned, tuned[1:]):
        same = [_eps(e) for e in [0, *radii] if compare(results[a][e], results[b][e]) == 0]
        lines.append(f"- {a} and {b} are not distinguishable at this n (overlapping 95% intervals) at "
                     + (f"{_listing(['clean' if e == '0/255' else e for e in same])}" if same else "no radius")
                     + (": no measurable difference between the unsupervised method, which never sees a label, and the "
                        "supervised one." if len(same) == len(radii) + 1 and "FARE" in a and "TeCoA" in b
                        else "."))
    lines += [_pgd_gap(name, by_eps[eps]) for name, by_eps in reports.items()]
    if robust_target is not None:
        name, target = robust_target
        lines.append(f"- Target: {name} at least {100 * target:.0f}% worst-case robust at {_eps(eps)}: "
                     f"**{verdict(results[name][eps], target)}** ({rate(results[name][eps])}).")
    if masking is not None:
        name, n, passed = masking
        lines.append(f"- The gradient-masking checks on {name} ({n} images) "
                     + ("all pass: nothing there suggests its robustness is an artefact of broken gradients (the "
                        "other models were not checked)." if passed else
                        "**fail**: its robust numbers cannot be trusted."))
    return _join(lines)


def _pgd_gap(name: str, report: RobustnessReport) -> str:
    """What the attacks after PGD found, for one model at one radius: how many of the images still standing after
    the smaller radii and PGD they broke. A count, not a comparison of intervals: both rates are of the same images,
    and stopping after PGD at this radius would have reported the first."""
    after_pgd = report.per_attack.get("pgd")
    if after_pgd is None:
        return ""
    broken = after_pgd.hits - report.robust.hits
    return (f"- {name} at {_eps(report.eps)}: {rate(after_pgd)} still standing after the smaller radii and PGD, "
            f"{rate(report.robust)} once APGD and Square have run too: the attacks after PGD broke "
            + (f"{broken} of the {after_pgd.hits} images still standing, so stopping after PGD at this radius would "
               f"have reported a worst case {100 * broken / report.robust.n:.1f} points higher."
               if broken else f"none of the {after_pgd.hits} images still standing."))


def oft_conclusions(results: Mapping[str, Mapping[float, Proportion]], *, candidates: Sequence[str],
                    full: str, reference: str = "original", clean_drop: float, robust_target: float) -> Markdown:
    """06: each restricted (OFT) model against the study's two targets (clean accuracy at most ``clean_drop`` below
    the ``reference``'s, worst-case robust accuracy at the largest radius at least ``robust_target``), and against
    full fine-tuning (``full``)."""
    original = results[reference]
    eps = [e for e in original if e][-1]
    lines, both, unsettled = [], [], []
    for name in candidates:
        clean_ok = verdict(results[name][0], original[0].value - clean_drop)
        robust_ok = verdict(results[name][eps], robust_target)
        if clean_ok == robust_ok == "met":
            both.append(name)
        elif "missed" not in (clean_ok, robust_ok):
            unsettled.append(name)
        lines.append(f"- **{name}**: clean {rate(results[name][0])} (target: at most {100 * clean_drop:g} points "
                     f"below the {reference}'s {100 * original[0].value:.1f}%: {clean_ok}), robust at {_eps(eps)} "
                     f"{rate(results[name][eps])} (target: at least {100 * robust_target:g}%: {robust_ok}).")
    lines.append("- **The targets**: "
                 + (f"{_listing(both)} meet{'s' if len(both) == 1 else ''} both" if both else
                    "no restricted model clearly meets both")
                 + (f"; for {_listing(unsettled)} this n cannot settle it" if unsettled else "")
                 + (", and every other misses at least one." if both or unsettled else ": each misses at least one."))
    most_robust = max(candidates, key=lambda name: results[name][eps].value)
    low, high = selected_interval(results[most_robust][eps], len(candidates))
    cleaner = [name for name in candidates if compare(results[name][0], results[full][0]) > 0]
    lines.append(f"- Against {full} ({rate(results[full][eps])} at {_eps(eps)}, clean {rate(results[full][0])}): "
                 f"the most robust restricted model here, {most_robust} (chosen among {len(candidates)}: "
                 f"[{100 * low:.1f}, {100 * high:.1f}] with Bonferroni), is "
                 f"{relation(results[most_robust][eps], results[full][eps])} it under attack; "
                 + (f"{_listing(cleaner)} {'is' if len(cleaner) == 1 else 'are'} clearly more accurate on clean "
                    "images." if cleaner else "none is clearly more accurate on clean images."))
    return _join(lines)


def pareto_front(points: Mapping[str, tuple[Proportion, Proportion]]) -> list[str]:
    """The points no other point dominates (at least as clean and as robust, and better in one), by point estimate,
    in order of clean accuracy: the frontier of the clean-vs-robust trade-off."""
    def dominated(name):
        clean, robust = (p.value for p in points[name])
        return any(c.value >= clean and r.value >= robust and (c.value, r.value) != (clean, robust)
                   for other, (c, r) in points.items() if other != name)
    return sorted((name for name in points if not dominated(name)), key=lambda name: points[name][0].value)


def frontier_conclusions(points: Mapping[str, tuple[Proportion, Proportion]], parameters: Mapping[str, int],
                         eps: float, *, full: str, nearest_oft: Mapping[str, str]) -> Markdown:
    """06's frontier: fine-tuned models (name -> (clean, worst-case robust at ``eps``)) with their trainable
    ``parameters``. Which lie on the frontier; each restricted update other than OFT against the OFT model nearest
    to it in size with the same clean-term weight (``nearest_oft``: name -> that OFT model), on both axes; whether
    any is clearly more robust than its OFT model once the number of such comparisons is accounted for
    (Bonferroni); and every restricted update against full fine-tuning (``full``)."""
    front = pareto_front(points)
    sizes = sorted({p.n for pair in points.values() for p in pair})
    lines = [f"- On the frontier (no other fine-tuned model is at least as clean and as robust at {_eps(eps)} and "
             "better on one, by point estimate), from the cleanest to the most robust: "
             + _listing([f"{name} ({parameters[name]:,} parameters; clean {100 * points[name][0].value:.1f}%, "
                         f"robust {100 * points[name][1].value:.1f}%)" for name in reversed(front)])
             + f". Below, every accuracy is in % with its 95% interval, n={', '.join(map(str, sizes))} test images."]
    for name, oft in nearest_oft.items():
        lines.append(f"- {name} against {oft}, the OFT model nearest in size ({parameters[name]:,} trainable "
                     f"parameters against {parameters[oft]:,}: {_size_ratio(parameters[name], parameters[oft])}): "
                     f"robust at {_eps(eps)} {_against(points[name][1], points[oft][1])}; clean "
                     f"{_against(points[name][0], points[oft][0])}.")
    pairs = len(nearest_oft)
    above = [name for name, oft in nearest_oft.items() if _clearly_above(points[name][1], points[oft][1], pairs)]
    only_alone = [name for name, oft in nearest_oft.items()
                  if compare(points[name][1], points[oft][1]) > 0 and name not in above]
    below = [name + ("" if parameters[name] >= 0.8 * parameters[oft] else
                     f" (with {_size_ratio(parameters[name], parameters[oft])} parameters)")
             for name, oft in nearest_oft.items() if compare(points[name][1], points[oft][1]) < 0]
    if above:
        answer = (f"{_listing(above)} {'is' if len(above) == 1 else 'are'} clearly more robust than the OFT model "
                  f"nearest in size, even with Bonferroni over the {pairs} pairs: what OFT lacks here is OFT's, "
                  "not every restricted update's.")
    else:
        answer = (f"No other restricted update is clearly more robust than the OFT model nearest in size at "
                  f"{_eps(eps)}" + (f"; clearly less: {_listing(below)}" if below else "")
                  + (f". On this evidence the robustness OFT gives up against {full} is not OFT's alone"
                     if all(compare(points[oft][1], points[full][1]) < 0 for oft in nearest_oft.values()) else
                     ". On this evidence no other restriction does better than OFT at its size")
                  + ", though a difference inside the intervals above is not ruled out.")
        if only_alone:
            answer += (f" ({_listing(only_alone)} {'is' if len(only_alone) == 1 else 'are'} above its OFT model on "
                       f"the pair's own intervals, but not once the {pairs} pairs are accounted for (Bonferroni): "
                       "not a finding.)")
    lines.append("- Is it OFT, or any restricted update? " + answer)
    restricted = [name for name in points if name != full]
    level = [name for name in restricted if compare(points[name][1], points[full][1]) >= 0]
    cleaner = [name for name in restricted if compare(points[name][0], points[full][0]) > 0]
    lines.append(f"- Against {full} ({rate(points[full][1])} at {_eps(eps)}, clean {rate(points[full][0])}): "
                 + (f"{_listing(level)} {'is' if len(level) == 1 else 'are'} not clearly less robust"
                    if level else "every restricted update is clearly less robust")
                 + "; " + (f"{_listing(cleaner)} {'is' if len(cleaner) == 1 else 'are'} clearly cleaner."
                           if cleaner else "none is clearly cleaner."))
    return _join(lines)


def _size_ratio(size: int, reference: int) -> str:
    """How many parameters one model trains against another's, in words: "about as many", "0.27 times as many"."""
    ratio = size / reference
    return "about as many" if abs(ratio - 1) < 0.05 else f"{ratio:.2g} times as many"


def _against(a: Proportion, b: Proportion) -> str:
    """``a`` against ``b`` in words: both rates, how they compare (``relation``) and the difference in points."""
    words = relation(a, b)
    return f"{a.percent(unit='%')}, {words} {b.percent(unit='%')} ({100 * (a.value - b.value):+.1f} points)"


def _clearly_above(a: Proportion, b: Proportion, comparisons: int) -> bool:
    """``compare(a, b) > 0`` with both intervals at the Bonferroni level for ``comparisons`` comparisons at once."""
    return selected_interval(a, comparisons)[0] > selected_interval(b, comparisons)[1]


# ------------------------------------------------------------------------------------------ 07: every defence


def summary_conclusions(points: Mapping[str, tuple[Proportion, Proportion]], eps: float, *,
                        references: Mapping[str, str] | None = None, reference: str = "original") -> Markdown:
    """07: every defence at one radius (name -> (clean, worst-case robust)), each against the undefended model
    measured on the same images (``references``: defence -> the name of that measurement; ``reference`` for the
    others): which are clearly more robust, which is the most robust and which cannot be told from it at this n, and
    what each clearly costs on clean images."""
    references = {name: (references or {}).get(name, reference) for name in points}
    undefended = set(references.values())
    defences = [name for name in points if name not in undefended]
    gains = [name for name in defences if compare(points[name][1], points[references[name]][1]) > 0]
    lines = [f"- Undefended ({name}): clean {rate(points[name][0])}, worst case at {_eps(eps)} {rate(points[name][1])}."
             for name in dict.fromkeys(references.values())]
    lines.append(f"- Clearly more robust than the undefended model on the same images at {_eps(eps)}: "
                 + (f"{_listing(gains)}." if gains else "no defence of the study."))
    if gains:
        top = max(gains, key=lambda name: points[name][1].value)
        peers = [name for name in gains if name != top and compare(points[name][1], points[top][1]) == 0]
        lines.append(f"- The most robust is {top} ({rate(points[top][1])})"
                     + (f"; not distinguishable from it at this n: {_listing(peers)}." if peers else
                        ", clearly above the others that help."))
    costly = [name for name in defences if compare(points[name][0], points[references[name]][0]) < 0]
    lines.append("- Clearly less accurate on clean images than the undefended model on the same images: "
                 + (f"{_listing(costly)}." if costly else "none."))
    return _join(lines)

"""The study reads true: the notebooks' markdown states no measured number and names only what exists, no output
shows a local path (notebook_prose's checks, each shown to fail on a planted case), and the conclusions that code
writes from the results say what invented results of either kind say."""
from pathlib import Path

import nbformat
import pytest

import cliplab
from cliplab import Proportion
from cliplab.evaluation import RobustnessReport
from cliplab.study import conclusions
from notebook_prose import measured_numbers, missing_names, problems

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
PROFILE = cliplab.get_profile("shapes")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_the_notebooks_prose_states_no_measured_number_and_names_what_exists(path):
    assert problems(nbformat.read(path, as_version=4), PROFILE) == []


@pytest.mark.parametrize("text", ["FARE gains 0% -> 53%", "it drops 5.6 points", "53.8% [49.3, 58.2]",
                                  "13 to 20 minutes per model", "robust accuracy near 12%", "from 12 → 55",
                                  "2.2x faster"])
def test_a_planted_measured_number_is_found(text):
    assert measured_numbers(f"Some prose. {text}. More prose.")


@pytest.mark.parametrize("text", ["eps in {1, 2, 4}/255 on images in [0, 1]", "every rate with its 95% interval",
                                  "PGD-10 with 2 restarts at 4/255", "Cohen et al. 2019, kernel 5, sigma 0.1"])
def test_settings_are_not_measured_numbers(text):
    assert measured_numbers(text) == []


def test_a_planted_missing_name_is_found():
    text = "`profile.defences.votes` exists, `profile.votes` does not; `cliplab.pgd` and `cliplab.no_such_attack`."
    assert missing_names(text, PROFILE) == ["profile.votes", "cliplab.no_such_attack"]


def test_a_planted_local_path_in_an_output_is_found():
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# fine"),
                                               nbformat.v4.new_code_cell("save()")])
    notebook.cells[1].outputs = [nbformat.v4.new_output(
        "execute_result", {"text/plain": "PosixPath('/work/main/results/figure.png')"}, execution_count=1)]
    assert problems(notebook, PROFILE) == ["cell 1: an output shows a local path: PosixPath("]


# ------------------------------------------------------------------------------------------ the conclusions
def p(percent: int, n: int = 500) -> Proportion:
    return Proportion(round(percent * n / 100), n)


def report(clean: int, robust: int, eps: float, after_pgd: int | None = None) -> RobustnessReport:
    per_attack = {} if after_pgd is None else {"pgd": p(after_pgd)}
    return RobustnessReport(p(clean), p(robust), {**per_attack, "square": p(robust)}, standing=None, eps=eps)


EPS = (1 / 255, 2 / 255, 4 / 255)


def curve(clean, *robust):
    return {0: p(clean), **dict(zip(EPS, map(p, robust)))}


def test_conclusions_render_as_markdown_and_compare_as_text():
    text = conclusions.Markdown("- **a** point")
    assert text._repr_markdown_() == "- **a** point"
    from IPython.lib.pretty import pretty

    assert pretty(text) == "- **a** point"  # what nbval compares: the text itself, not a quoted repr


def test_compare_goes_by_disjoint_intervals():
    assert conclusions.compare(p(60), p(40)) == 1 and conclusions.compare(p(40), p(60)) == -1
    assert conclusions.compare(p(52), p(50)) == 0
    assert conclusions.relation(p(52), p(50)) == "not distinguishable at this n from"


def test_fare_no_better_than_the_original_is_said_so_and_its_target_missed():
    results = {"original": curve(98, 40, 10, 1), "FARE-full": curve(97, 41, 11, 2)}
    reports = {name: {EPS[-1]: report(r[0].value * 100, r[EPS[-1]].value * 100, EPS[-1])}
               for name, r in results.items()}
    text = conclusions.finetune_conclusions(results, reports, robust_target=("FARE-full", 0.40),
                                            masking=("FARE-full", 100, True))
    assert "Clearly more robust at no radius." in text
    assert "**missed**" in text and "**met**" not in text
    assert "not distinguishable at this n from the original's" in text


def test_fare_that_gains_and_matches_tecoa_is_said_so():
    results = {"original": curve(98, 48, 7, 0), "FARE-full": curve(93, 86, 78, 53), "TeCoA-full": curve(92, 84, 75, 51)}
    reports = {"original": {EPS[-1]: report(98, 0, EPS[-1], after_pgd=12)},
               "FARE-full": {EPS[-1]: report(93, 53, EPS[-1], after_pgd=55)}}
    text = conclusions.finetune_conclusions(results, reports, robust_target=("FARE-full", 0.40),
                                            masking=("FARE-full", 100, False))
    assert "Clearly more robust at 1/255, 2/255 and 4/255." in text
    assert "not distinguishable at this n (overlapping 95% intervals)" in text and "never sees a label" in text and "**met**" in text
    # a count of the same images, not a comparison of intervals: 60 of 500 standing after PGD, none after the rest
    assert ("the attacks after PGD broke 60 of the 60 images still standing, so stopping after PGD at this radius "
            "would have reported a worst case 12.0 points higher") in text
    # 2 points apart, well inside each other's interval, yet 10 images standing after PGD fell to the rest
    assert "broke 10 of the 275 images still standing" in text and "a worst case 2.0 points higher" in text
    assert "**fail**" in text


def test_attacks_after_pgd_that_break_nothing_are_said_so():
    reports = {"FARE-full": {EPS[-1]: report(93, 53, EPS[-1], after_pgd=53)}}
    text = conclusions.finetune_conclusions({"original": curve(98, 48, 7, 0), "FARE-full": curve(93, 86, 78, 53)},
                                            reports)
    assert "the attacks after PGD broke none of the 265 images still standing." in text


def test_oft_meeting_its_targets_is_said_so():
    results = {"original": curve(98, 48, 7, 0), "FARE-full": curve(90, 86, 78, 53),
               "FARE-OFT b=128 cw=2": curve(97, 85, 75, 70), "FARE-OFT b=16 cw=1": curve(88, 60, 30, 9)}
    text = conclusions.oft_conclusions(results, candidates=["FARE-OFT b=128 cw=2", "FARE-OFT b=16 cw=1"],
                                       full="FARE-full", clean_drop=0.05, robust_target=0.25)
    assert "FARE-OFT b=128 cw=2 meets both, and every other misses at least one." in text
    assert "clearly above it under attack" in text and "FARE-OFT b=128 cw=2 is clearly more accurate on clean" in text


def test_oft_missing_its_targets_is_said_so():
    results = {"original": curve(98, 48, 7, 0), "FARE-full": curve(93, 86, 78, 53),
               "FARE-OFT b=128 cw=1": curve(88, 81, 63, 28)}
    text = conclusions.oft_conclusions(results, candidates=["FARE-OFT b=128 cw=1"], full="FARE-full",
                                       clean_drop=0.05, robust_target=0.25)
    assert "no restricted model clearly meets both: each misses" in text and "clearly below it under attack" in text
    assert "none is clearly more accurate on clean images" in text


PARAMETERS = {"FARE-full": 828_672, "FARE-OFT b=128": 227_584, "FARE-OFT b=16": 26_880, "FARE-LoRA r=28": 229_376,
              "FARE-BitFit": 7_168}
NEAREST_OFT = {"FARE-LoRA r=28": "FARE-OFT b=128", "FARE-BitFit": "FARE-OFT b=16"}


def test_the_frontier_is_the_points_no_other_beats_on_both_axes():
    points = {"a": (p(90), p(50)), "b": (p(95), p(30)), "c": (p(85), p(40)), "d": (p(95), p(20)), "e": (p(90), p(50))}
    assert conclusions.pareto_front(points) == ["a", "e", "b"]  # c is beaten by a, d by b; a and e tie, both stay


def test_a_restricted_update_clearly_above_its_oft_says_the_shortfall_is_ofts():
    points = {"FARE-full": (p(90), p(53)), "FARE-OFT b=128": (p(93), p(27)), "FARE-OFT b=16": (p(91), p(9)),
              "FARE-LoRA r=28": (p(94), p(40)), "FARE-BitFit": (p(96), p(5))}
    text = conclusions.frontier_conclusions(points, PARAMETERS, 4 / 255, full="FARE-full", nearest_oft=NEAREST_OFT)
    assert ("FARE-LoRA r=28 is clearly more robust than the OFT model nearest in size, even with Bonferroni over "
            "the 2 pairs: what OFT lacks here is OFT's") in text
    assert ("- FARE-LoRA r=28 against FARE-OFT b=128, the OFT model nearest in size (229,376 trainable parameters "
            "against 227,584: about as many): robust at 4/255 40.0% [35.7, 44.4], clearly above 27.0%") in text
    assert "(+13.0 points)" in text and "n=500 test images." in text
    assert "(7,168 trainable parameters against 26,880: 0.27 times as many)" in text
    assert ("from the cleanest to the most robust: FARE-BitFit (7,168 parameters; clean 96.0%, robust 5.0%), "
            "FARE-LoRA r=28") in text
    assert "every restricted update is clearly less robust" in text


def test_a_difference_only_one_comparison_shows_is_not_called_clear():
    """Clearly above on 95% intervals, but not once two comparisons are accounted for: not a finding."""
    points = {"FARE-full": (p(90), p(53)), "FARE-OFT b=128": (p(93), p(27)), "FARE-OFT b=16": (p(91), p(9)),
              "FARE-LoRA r=28": (p(94), p(36)), "FARE-BitFit": (p(96), p(5))}
    assert conclusions.compare(points["FARE-LoRA r=28"][1], points["FARE-OFT b=128"][1]) > 0
    text = conclusions.frontier_conclusions(points, PARAMETERS, 4 / 255, full="FARE-full", nearest_oft=NEAREST_OFT)
    assert "No other restricted update is clearly more robust than the OFT model nearest in size at 4/255" in text
    assert ("(FARE-LoRA r=28 is above its OFT model on the pair's own intervals, but not once the 2 pairs are "
            "accounted for (Bonferroni): not a finding.)") in text


def test_no_restricted_update_above_its_oft_claims_no_more_than_the_intervals_allow():
    points = {"FARE-full": (p(90), p(53)), "FARE-OFT b=128": (p(93), p(27)), "FARE-OFT b=16": (p(91), p(9)),
              "FARE-LoRA r=28": (p(94), p(25)), "FARE-BitFit": (p(96), p(2))}
    text = conclusions.frontier_conclusions(points, PARAMETERS, 4 / 255, full="FARE-full", nearest_oft=NEAREST_OFT)
    assert ("No other restricted update is clearly more robust than the OFT model nearest in size at 4/255; "
            "clearly less: FARE-BitFit (with 0.27 times as many parameters). On this evidence the robustness OFT "
            "gives up against FARE-full is not OFT's alone, though a difference inside the intervals above is not "
            "ruled out.") in text
    assert "robust at 4/255 25.0% [21.3, 29.0], not distinguishable at this n from 27.0%" in text
    assert "every restricted update is clearly less robust; FARE-BitFit is clearly cleaner." in text


def test_a_target_inside_the_interval_is_not_settled():
    assert conclusions.verdict(p(28), 0.25).startswith("not settled at this n") and "estimate meets" in \
        conclusions.verdict(p(28), 0.25)
    assert conclusions.verdict(p(40), 0.25) == "met" and conclusions.verdict(p(10), 0.25) == "missed"
    results = {"original": curve(98, 48, 7, 0), "FARE-full": curve(93, 86, 78, 53),
               "FARE-OFT b=128 cw=1": curve(93, 81, 63, 27)}
    text = conclusions.oft_conclusions(results, candidates=["FARE-OFT b=128 cw=1"], full="FARE-full",
                                       clean_drop=0.05, robust_target=0.25)
    assert "for FARE-OFT b=128 cw=1 this n cannot settle it" in text


def test_attack_conclusions_warn_when_success_falls_with_eps():
    good = conclusions.attack_conclusions({"untargeted": [p(10), p(50), p(99)], "targeted": [p(0), p(5), p(40)]},
                                          [1, 2, 8])
    assert "grow with eps, as they must" in good and "at 3 of 3 radii" in good
    bad = conclusions.attack_conclusions({"untargeted": [p(10), p(90), p(40)], "targeted": [p(0), p(5), p(6)]},
                                         [1, 2, 8])
    assert "**Warning**" in bad and "untargeted, 2/255 to 8/255" in bad


def test_eot_that_changes_nothing_is_explained_and_a_gain_is_not():
    same = conclusions.eot_conclusions((1, 20), {"untargeted": [p(70, 100), p(70, 100)]},
                                       {"untargeted": p(38, 100)}, "random blur", 4 / 255)
    assert "Not distinguishable (untargeted) means" in same and "does not mean the defence resists" in same
    # the transferred attack's rate set beside the white-box rate it is compared with, and which attack that was
    assert ("succeeds on 38.0% [28.5, 48.3] (n=100), clearly below the highest white-box rate (plain PGD and EOT "
            "with 20 draws, 70.0% [60.0, 78.8] (n=100))") in same
    gain = conclusions.eot_conclusions((1, 20), {"untargeted": [p(30, 100), p(90, 100)]},
                                       {"untargeted": p(20, 100)}, "noise", 4 / 255)
    assert "clearly stronger than plain PGD" in gain and "does not mean" not in gain
    assert "the highest white-box rate (EOT with 20 draws, 90.0%" in gain
    tied = conclusions.eot_conclusions((1, 5, 20), {"targeted": [p(2, 100), p(3, 100), p(3, 100)]},
                                       {"targeted": p(1, 100)}, "noise", 4 / 255)
    assert "not distinguishable at this n from the highest white-box rate (EOT with 5 and 20 draws, 3.0%" in tied


def test_a_defence_s_worst_case_is_told_as_the_images_the_attacks_broke():
    # 4 points apart with overlapping intervals (n=500), yet 20 of the 90 images classified right fell after the attacks
    text = conclusions.worst_case_sentence("noise", report(18, 14, 4 / 255))
    assert "after the attacks it is wrong on 20 of the 90 images it classifies right when clean." in text
    assert "wrong on 1 of the 1 image it" in conclusions.worst_case_sentence("noise", RobustnessReport(
        p(1, 100), p(0, 100), {}, standing=None, eps=4 / 255))


def test_smoothing_conclusions_count_what_the_attack_breaks_at_each_sigma():
    text = conclusions.smoothing_conclusions([0.12, 0.25], [p(18, 100), p(12, 100)], [p(14, 100), p(12, 100)],
                                             p(99, 100), 2 / 255)
    assert ("it is wrong on or abstains from 4 of the 18 at sigma = 0.12 and 0 of the 12 at sigma = 0.25 after the "
            "attacks: each worst case above is the clean accuracy, already cut by the noise, less these images.") in text
    assert "no accuracy this sample can show" not in text


def test_eot_by_eps_says_where_it_is_stronger_and_where_at_none():
    none = conclusions.eot_by_eps_conclusions([1, 2, 4], {"PGD": [p(50, 100)] * 3, "EOT-PGD": [p(55, 100)] * 3},
                                              "random blur")
    assert "is not clearly stronger than PGD at any of 1/255, 2/255 or 4/255" in none
    some = conclusions.eot_by_eps_conclusions([1, 2], {"PGD": [p(50, 100), p(50, 100)],
                                                       "EOT-PGD": [p(55, 100), p(90, 100)]}, "random blur")
    assert "is clearly stronger than PGD at 2/255 (disjoint intervals)" in some


def test_a_filter_grid_that_loses_everywhere_names_how_many_settings_it_tried():
    cells = [(0.05, 1.0), (0.1, 1.0)]
    text = conclusions.grid_conclusions({cell: p(10, 100) for cell in cells}, {cell: p(90, 100) for cell in cells},
                                        p(12, 100), cells[0], 4 / 255, steps=10)
    assert "none of the 2 settings tried keeps its clean accuracy under attack" in text


def test_the_certification_conclusions_draw_the_budgets_limit():
    text = conclusions.certification_conclusions(
        [0.03, 0.25], [0.07, 0.55], {"L-inf 1/255": 0.22, "L-inf 4/255": 0.87},
        {0.03: {"L-inf 1/255": None, "L-inf 4/255": None}, 0.25: {"L-inf 1/255": p(9, 100), "L-inf 4/255": None}},
        n=500, alpha=0.001)
    assert "the budget's, not the model's" in text
    assert "L-inf 4/255 needs an L2 radius of 0.87: beyond every sigma's limit" in text
    assert "within the limit of sigma = 0.25" in text


def test_the_best_cell_of_a_grid_gets_a_wider_interval_than_its_own():
    best = p(18, 100)
    low, high = conclusions.selected_interval(best, 16)
    assert low < best.ci95[0] and high > best.ci95[1]
    cells = {(c, s): p(v, 100) for (c, s), v in {(0.1, 1.0): 4, (0.2, 2.0): 18}.items()}
    text = conclusions.grid_conclusions(cells, {cell: p(50, 100) for cell in cells}, p(23, 100), (0.1, 1.0), 4 / 255,
                                        steps=20)
    assert "Bonferroni" in text and "PGD-20 alone would overstate" in text


def test_the_best_of_several_overlapping_rates_is_not_called_clearly_best():
    text = conclusions.best_of({0.03: p(10, 100), 0.12: p(14, 100)}, "sigma")
    assert text.startswith("sigma 0.12 is the highest point estimate, not clearly the best")
    assert conclusions.best_of({0.03: p(10, 100), 0.12: p(60, 100)}, "sigma").startswith("sigma 0.12 is clearly")


def test_the_summary_names_the_defences_that_help_and_what_they_cost():
    points = {"original": (p(98, 500), p(0, 500)), "original, 100 images": (p(98, 100), p(0, 100)),
              "bilateral": (p(98, 100), p(4, 100)), "FARE-full": (p(93, 500), p(53, 500)),
              "TeCoA-full": (p(92, 500), p(51, 500))}
    text = conclusions.summary_conclusions(points, 4 / 255, references={"bilateral": "original, 100 images"})
    # bilateral's 4% [1.1, 9.9] is clearly above the 0% [0, 0.7] of 500 images, but not above the same 100 images'
    assert "on the same images at 4/255: FARE-full and TeCoA-full." in text
    assert "The most robust is FARE-full" in text and "not distinguishable from it at this n: TeCoA-full." in text  # not bilateral
    assert "on the same images: FARE-full and TeCoA-full." in text
    nothing = conclusions.summary_conclusions({"original": (p(98), p(0)), "noise": (p(97), p(1))}, 4 / 255)
    assert "no defence of the study." in nothing and "same images: none." in nothing


def test_oft_level_with_full_fine_tuning_gives_up_nothing_the_conclusions_could_blame_on_it():
    points = {"FARE-full": (p(90), p(30)), "FARE-OFT b=128": (p(93), p(27)), "FARE-OFT b=16": (p(91), p(25)),
              "FARE-LoRA r=28": (p(94), p(25)), "FARE-BitFit": (p(96), p(22))}
    text = conclusions.frontier_conclusions(points, PARAMETERS, 4 / 255, full="FARE-full", nearest_oft=NEAREST_OFT)
    assert "On this evidence no other restriction does better than OFT at its size, though" in text
    assert "gives up" not in text and "are not clearly less robust" in text

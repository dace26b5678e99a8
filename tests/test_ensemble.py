"""The worst case over an attack ensemble (``cliplab.evaluation.ensemble``): below every attack, nested radii and
early stopping never weaker on the notebooks' models, the vote and the judge of randomised models, the table, and
bad input named before any attack."""
from __future__ import annotations

import copy

import pytest
import torch

import cliplab
from cliplab import evaluation
from cliplab.evaluation import ensemble
from cliplab.evaluation import AttackBudget, evaluate_robustness, robustness_table
from test_evaluation import Fixed  # a deterministic 4-class model


# ------------------------------------------------------------------------------ worst-case evaluation
SMALL = AttackBudget(steps=5, num_targets=2, queries=20, pgd_steps=3)


def test_worst_case_is_below_every_attack_and_per_attack_is_monotone(shapes_clf, shapes_test):
    x, y, _ = shapes_test
    x, y = x[:120], y[:120]
    report = evaluate_robustness(shapes_clf, x, y, eps=2 / 255, budget=SMALL, batch_size=50, progress=False)
    assert list(report.per_attack) == ["apgd-ce", "apgd-t", "square"]
    values = [report.clean.value, *(p.value for p in report.per_attack.values())]
    assert values == sorted(values, reverse=True)
    assert report.robust == report.per_attack["square"]
    assert report.robust.n == report.clean.n == len(y)
    assert report.standing.dtype == torch.bool and int(report.standing.sum()) == report.robust.hits
    # the worst case is at most any single attack run alone on the same images
    alone = evaluate_robustness(shapes_clf, x, y, eps=2 / 255, attacks=["apgd-ce"], budget=SMALL, batch_size=50,
                                progress=False)
    assert report.robust.value <= alone.robust.value
    assert report.clean == alone.clean


@pytest.mark.slow
def test_worst_case_beats_pgd_on_the_original_model(shapes_clf, shapes_test):
    """The measurement behind the worst-case rule: PGD-10 reports more robustness than the ensemble finds."""
    x, y, _ = shapes_test
    x, y = x[:100], y[:100]
    budget = AttackBudget(steps=20, num_targets=9, queries=20)
    ensemble = evaluate_robustness(shapes_clf, x, y, eps=4 / 255, budget=budget, progress=False)
    quick = evaluate_robustness(shapes_clf, x, y, eps=4 / 255, attacks="pgd", budget=budget, progress=False)
    assert ensemble.robust.value <= 0.02 < quick.robust.value


_NOTEBOOKS_EVALUATION = {}  # encoder -> (model, x, y, settings, the nested evaluation): made once for both tests


def _notebooks_evaluation(shapes_clf, shapes_test, encoder):
    """The committed model (the original, or ``encoder`` loaded on it), 48 test images, 05/06's evaluation settings,
    and that evaluation at 05/06's radii (nested, each attack stopping early), as the notebooks make it."""
    if encoder not in _NOTEBOOKS_EVALUATION:
        from pathlib import Path

        from cliplab.study import load_encoder

        model = copy.deepcopy(shapes_clf)
        if encoder:
            load_encoder(model, Path(__file__).parents[1] / "notebooks" / "encoders" / "shapes" /
                         f"{encoder}.safetensors")
        x, y, _ = shapes_test
        x, y = x[:48], y[:48]
        threat = cliplab.get_profile("shapes").threat_model()
        settings = dict(attacks=list(threat.attacks), budget=threat.budget, batch_size=250, seed=0, progress=False)
        nested = evaluation.robustness_vs_eps(model, x, y, threat.eps, **settings)
        _NOTEBOOKS_EVALUATION[encoder] = model, x, y, settings, nested
    return _NOTEBOOKS_EVALUATION[encoder]


@pytest.mark.slow
@pytest.mark.parametrize("encoder", [None, "fare-oft128-cw2"])
def test_stopping_early_and_nesting_the_radii_never_weaken_the_notebooks_evaluation(shapes_clf, shapes_test, encoder,
                                                                                     monkeypatch):
    """On the committed models with 05/06's evaluation (the shapes profile's budget, PGD quick look first): each
    attack stopping on the images it fooled finds the same images, and nesting the radii (each radius attacks only
    the survivors of the one below) gives a worst case at most the per-radius one at every radius."""
    model, x, y, settings, nested = _notebooks_evaluation(shapes_clf, shapes_test, encoder)
    for eps in nested:
        alone = evaluate_robustness(model, x, y, eps=eps, **settings)
        assert nested[eps].robust.hits <= alone.robust.hits, eps
        assert nested[eps].clean == alone.clean
    with monkeypatch.context() as patch:  # every attack runs every step on every image
        patch.setattr(ensemble, "_success_is_final", lambda *args: False)
        every_step = evaluate_robustness(model, x, y, eps=eps, **settings)
    assert torch.equal(alone.standing, every_step.standing)


@pytest.mark.slow
@pytest.mark.parametrize("encoder", [None, "fare-oft128-cw2"])
def test_cliplabs_attention_and_class_token_block_never_weaken_the_notebooks_evaluation(shapes_clf, shapes_test,
                                                                                        encoder):
    """On the committed models with 05/06's evaluation: the worst case through cliplab's SelfAttention and
    ClassTokenBlock (the same arithmetic in another order) leaves standing no image that the worst case through
    open_clip's own modules broke, at any radius."""
    from open_clip.transformer import ResidualAttentionBlock

    model, x, y, settings, ours = _notebooks_evaluation(shapes_clf, shapes_test, encoder)
    as_open_clip_built_it = copy.deepcopy(model)
    for module in as_open_clip_built_it.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            module.__class__ = torch.nn.MultiheadAttention
        elif isinstance(module, ResidualAttentionBlock):
            module.__class__ = ResidualAttentionBlock
    theirs = evaluation.robustness_vs_eps(as_open_clip_built_it, x, y, list(ours), **settings)
    for eps in ours:
        assert ours[eps].clean == theirs[eps].clean, eps
        assert not (ours[eps].standing & ~theirs[eps].standing).any(), eps


def test_nested_radii_attack_only_the_survivors_of_the_smaller_one(shapes_clf, batch):
    x, y = batch
    reports = evaluation.robustness_vs_eps(shapes_clf, x, y, [4 / 255, 1 / 255], budget=SMALL, progress=False)
    assert list(reports) == [4 / 255, 1 / 255]  # the order asked for
    small, large = reports[1 / 255], reports[4 / 255]
    assert "smaller radii" not in small.per_attack
    assert large.per_attack["smaller radii"] == small.robust  # the images broken at 1/255 count as broken at 4/255
    assert not (large.standing & ~small.standing).any()
    assert list(large.per_attack)[1:] == ["apgd-ce", "apgd-t", "square"]
    with pytest.raises(ValueError, match="eps_values must not repeat a radius"):
        evaluation.robustness_vs_eps(shapes_clf, x, y, [4 / 255, 4 / 255], budget=SMALL, progress=False)


def test_same_seed_same_report(shapes_clf, batch):
    x, y = batch
    first, second = (evaluate_robustness(shapes_clf, x, y, eps=2 / 255, budget=SMALL, progress=False)
                     for _ in range(2))
    assert first.per_attack == second.per_attack and torch.equal(first.standing, second.standing)


def test_rand_ensemble_scores_by_the_vote(shapes_clf, batch):
    x, y = batch
    model = cliplab.Denoised(shapes_clf, cliplab.GaussianNoise(0.03))
    report = evaluate_robustness(model, x, y, eps=4 / 255, attacks="rand", votes=3,
                                 budget=AttackBudget(steps=3, eot_samples=2), progress=False)
    assert list(report.per_attack) == ["apgd-ce", "apgd-dlr"]
    assert report.robust.value <= report.clean.value


def test_a_judge_replaces_the_vote(batch):
    x, y = batch
    model = Fixed()
    always_wrong = evaluate_robustness(model, x, y % 4, eps=1 / 255, attacks=["apgd-ce"], budget=SMALL,
                                       judge=lambda images: torch.full((len(images),), -1), progress=False)
    assert always_wrong.clean.hits == 0 and always_wrong.robust.hits == 0


def test_table_names_every_attack_n_and_interval(shapes_clf, batch):
    x, y = batch
    report = evaluate_robustness(shapes_clf, x, y, eps=2 / 255, budget=SMALL, progress=False)
    table = robustness_table({"2/255": report})
    assert "| 2/255 |" in table and "after apgd-t" in table and "worst case" in table
    assert f"n={len(y)}" in table and "[" in table


@pytest.mark.parametrize("kwargs, message", [
    (dict(attacks="autoattack"), "attacks must be one of"),
    (dict(attacks=["apgd-ce", "fab"]), "each of attacks must be one of"),
    (dict(attacks=["apgd-ce", "apgd-ce"]), "attacks must not repeat an attack, got apgd-ce, apgd-ce"),
    (dict(eps=2.0), "eps must be in [0, 1]"),
    (dict(eps=-0.1), "eps must be >= 0"),
    (dict(norm="l1"), "norm must be one of"),
    (dict(norm="l2", eps=0.5), "square is an L-inf attack"),
    (dict(budget=AttackBudget(steps=0)), "budget.steps must be >= 1"),
    (dict(votes=0), "votes must be >= 1"),
])
def test_bad_arguments_are_named_before_any_attack(batch, kwargs, message):
    x, y = batch
    arguments = dict(eps=1 / 255, budget=SMALL, progress=False) | kwargs
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        evaluate_robustness(Fixed(), x, y % 4, **arguments)


def test_labels_out_of_range_are_named(batch):
    x, y = batch
    with pytest.raises(ValueError, match=r"y must hold class indices in \[0, 3\]"):
        evaluate_robustness(Fixed(), x, y % 4 + 4, eps=1 / 255, budget=SMALL, progress=False)


def test_nan_logits_are_refused():
    class Broken(Fixed):
        def forward(self, x):
            return super().forward(x) * float("nan")

    with pytest.raises(ValueError, match="NaN or infinite logits"):
        evaluate_robustness(Broken(), torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.int64), eps=1 / 255,
                            budget=SMALL, progress=False)


@pytest.mark.parametrize("classes, standard, rand, targets", [
    (2, ["apgd-ce", "apgd-t-ce", "square"], ["apgd-ce"], 1),
    (3, ["apgd-ce", "apgd-t-ce", "square"], ["apgd-ce", "apgd-dlr"], 2),
    (4, ["apgd-ce", "apgd-t", "square"], ["apgd-ce", "apgd-dlr"], 3),
    (100, ["apgd-ce", "apgd-t", "square"], ["apgd-ce", "apgd-dlr"], 9)])
def test_the_ensemble_fits_a_task_of_few_classes(classes, standard, rand, targets):
    """As AutoAttack is run on few classes: at most C - 1 targets, APGD-T on the targeted cross-entropy below 4
    classes (the targeted DLR needs four logits), no APGD-DLR below 3."""
    budget = AttackBudget()
    names, fitted = evaluation.fit_to_classes(evaluation.check_attack_plan("standard", "linf", budget, classes),
                                              budget, classes)
    assert names == standard and fitted.num_targets == targets
    assert evaluation.fit_to_classes(evaluation.check_attack_plan("rand", "linf", budget, classes), budget,
                                     classes)[0] == rand


def test_a_two_class_task_is_evaluated_with_the_attacks_that_exist_for_it(shapes_clf, shapes_test):
    """The default ensemble and budget on a 2-class task run to the end and the report names what ran; the attacks
    whose loss a task of so few classes lacks say so when called alone."""
    x, y, names = shapes_test
    two = shapes_clf.for_classes(names[:2], ["a photo of a {}."])
    keep = y < 2
    x, y = x[keep][:16], y[keep][:16]
    report = evaluate_robustness(two, x, y, eps=4 / 255, budget=AttackBudget(steps=5, queries=10), progress=False)
    assert list(report.per_attack) == ["apgd-ce", "apgd-t-ce", "square"]
    assert report.robust.hits <= report.clean.hits
    with pytest.raises(ValueError, match=r"loss='dlr' needs at least 3 classes .* the model has 2: use loss='ce'"):
        cliplab.apgd(two, x, y, eps=4 / 255, steps=2, loss="dlr")
    three = shapes_clf.for_classes(names[:3], ["a photo of a {}."])
    with pytest.raises(ValueError, match=r"targeted DLR\) needs at least 4 classes .* the model has 3"):
        cliplab.apgd_targeted(three, x, y, eps=4 / 255, steps=2, num_targets=2)
    assert cliplab.apgd_targeted(two, x, y, eps=4 / 255, steps=2, num_targets=1, loss="ce").x_adv.shape == x.shape


def test_an_attack_added_to_the_registry_is_one_the_ensemble_and_the_command_line_run(shapes_clf, batch, monkeypatch):
    """One entry in ``registry.ATTACKS`` is all it takes: the ensemble runs it, ``--attacks`` accepts it and the help
    and docs name every attack of the registry."""
    from pathlib import Path

    from cliplab.cli import commands
    from cliplab.evaluation import registry

    x, y = batch
    ran = []

    def fgsm(model, x, y, budget, **common):  # one PGD step of the full radius
        ran.append(len(x))
        return cliplab.pgd(model, x, y, steps=1, alpha=common["eps"], random_start=False, **common)

    monkeypatch.setitem(registry.ATTACKS, "fgsm", registry.EnsembleAttack("one signed-gradient step", fgsm, ()))
    report = evaluate_robustness(shapes_clf, x, y, eps=8 / 255, attacks=["fgsm", "apgd-ce"], budget=SMALL,
                                 progress=False)
    assert list(report.per_attack) == ["fgsm", "apgd-ce"] and ran
    assert commands._attack_names("fgsm,square") == ("fgsm", "square")
    help_text = commands.build_parser()._subparsers._group_actions[0].choices["evaluate"].format_help()
    assert "fgsm (one signed-gradient step)" in " ".join(help_text.split())
    monkeypatch.delitem(registry.ATTACKS, "fgsm")
    documented = (Path(__file__).parents[1] / "docs" / "commands.md").read_text()
    assert all(name in documented for name in registry.ATTACKS)

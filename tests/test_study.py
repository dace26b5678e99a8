"""The study layer: typed attack settings, data-set attacks, random targets, the fine-tuning setup and cache, the
fine-tuning workflow, the neuron geometry of 06 and the certified accuracy of 03."""
from __future__ import annotations

import copy
import dataclasses
import json
import time

import pytest
import torch

import cliplab
from cliplab import study
from cliplab.evaluation import PGDSweep
from cliplab.training import apply_oft, merge_adapters, oft_parameters


def test_random_targets_are_seeded_other_classes_on_the_labels_device():
    y = torch.arange(1000) % 7
    targets = study.random_targets(y, 7, seed=1)
    assert targets.device == y.device and targets.shape == y.shape
    assert (targets != y).all() and targets.min() >= 0 and targets.max() < 7
    assert torch.equal(targets, study.random_targets(y, 7, seed=1))
    assert not torch.equal(targets, study.random_targets(y, 7, seed=2))
    assert len(torch.unique((targets - y) % 7)) == 6  # every other class is drawn
    state = torch.get_rng_state()
    study.random_targets(y, 7, seed=0)
    assert torch.equal(state, torch.get_rng_state()), "the global RNG must not be consumed"
    with pytest.raises(ValueError, match="num_classes"):
        study.random_targets(y, 1, seed=0)


def test_attack_dataset_equals_pgd_batch_by_batch(shapes_clf, shapes_test):
    x, y, _ = shapes_test
    x, y = x[:24], y[:24]
    targets = study.random_targets(y, 100, seed=1)
    attack = cliplab.attack_dataset(shapes_clf, x, targets, eps=8 / 255, targeted=True, steps=3, seed=0,
                                    batch_size=10, progress=False)
    by_hand = torch.cat([cliplab.pgd(shapes_clf, x[i:i + 10], targets[i:i + 10], eps=8 / 255, steps=3, targeted=True,
                                     seed=0).x_adv for i in range(0, 24, 10)])
    assert torch.equal(attack.x_adv, by_hand)
    assert torch.equal(attack.prediction, cliplab.predict(shapes_clf, by_hand))
    assert torch.equal(attack.success, attack.prediction == targets)
    assert attack.success_rate == cliplab.Proportion(int(attack.success.sum()), 24)
    assert 0 < attack.success_rate.value  # the attack does something on the trained model


def test_a_transfer_attack_is_crafted_on_the_surrogate_and_judged_on_the_model(shapes_clf, random_shapes_clf, batch):
    x, y = batch
    transfer = cliplab.attack_dataset(random_shapes_clf, x, y, eps=4 / 255, steps=2, seed=0, surrogate=shapes_clf,
                                      progress=False)
    crafted = cliplab.pgd(shapes_clf, x, y, eps=4 / 255, steps=2, seed=0).x_adv
    assert torch.equal(transfer.x_adv, crafted)
    assert torch.equal(transfer.prediction, cliplab.predict(random_shapes_clf, crafted))


def test_sweep_is_attack_success_rate_with_the_profiles_settings(shapes_clf, batch):
    x, y = batch
    profile = cliplab.get_profile("shapes")
    settings = profile.sweep(votes=True, early_stop=True)
    assert settings == PGDSweep(steps=profile.sweeps.steps, batch_size=profile.sweeps.batch_size, votes=profile.defences.votes,
                                   early_stop=True, seed=0)
    assert profile.sweep().votes == 1
    fast = PGDSweep(steps=2, batch_size=8, early_stop=True)
    assert fast.attack_success_rate(shapes_clf, x, y, eps=2 / 255) == cliplab.attack_success_rate(
        shapes_clf, x, y, eps=2 / 255, steps=2, batch_size=8, early_stop=True, seed=0, progress=False)
    attack = fast.attack(shapes_clf, x, y, eps=2 / 255)
    assert attack.x_adv.shape == x.shape and attack.success.dtype == torch.bool


def test_certified_accuracy_counts_right_classes_with_large_enough_radii():
    classes = torch.tensor([0, 1, 2, -1, 4])
    radii = torch.tensor([0.5, 0.1, 0.3, 0.0, 1.0])
    y = torch.tensor([0, 1, 0, 3, 4])  # image 2 certified as the wrong class; image 3 abstains
    curve = study.certified_accuracy(classes, radii, y, [0, 0.1, 0.4, 1.0, 2.0])
    assert [p.hits for p in curve] == [3, 3, 2, 1, 0] and {p.n for p in curve} == {5}


def test_bad_input_to_the_study_helpers_is_named():
    y = torch.tensor([0, 5, 9])
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, num_classes\) = \[0, 5\), got labels from 0 to 9"):
        study.random_targets(y, 5, seed=0)
    with pytest.raises(ValueError, match=r"classes, radii and y must be \(N,\) tensors of one length"):
        study.certified_accuracy(torch.tensor([0, 1]), torch.tensor([0.5, 0.5]), y, at=[0.0])


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 11])
def test_every_pair_of_neurons_is_read_once_in_row_order_block_by_block(rows):
    from cliplab.study.measures import _pair_cosines

    directions = torch.nn.functional.normalize(torch.randn(rows, 6, dtype=torch.float64), dim=1)
    i, j = torch.triu_indices(rows, rows, offset=1)
    expected = (directions[i] * directions[j]).sum(dim=1)
    torch.testing.assert_close(_pair_cosines(directions, block=4), expected, rtol=0, atol=1e-15)


def test_oft_keeps_the_neuron_geometry_that_full_fine_tuning_changes(random_shapes_clf):
    reference = study.neuron_geometry(random_shapes_clf)
    assert reference and all(name.endswith(study.ADAPTED_WEIGHTS) for name in reference)
    norms, angles = next(iter(reference.values()))
    assert norms.dtype == torch.float64 and (angles >= 0).all() and (angles <= 180).all()

    rotated = copy.deepcopy(random_shapes_clf)
    apply_oft(rotated.model.visual, block_size=8)
    with torch.no_grad():
        for parameter in oft_parameters(rotated.model.visual):
            parameter.normal_(0, 0.1)  # a real rotation of every block
    with pytest.raises(ValueError, match="merge_adapters"):
        study.neuron_geometry(rotated)  # the rotations are not in the weights yet
    merge_adapters(rotated.model.visual)
    norm_change, angle_change = study.geometry_change(reference, study.neuron_geometry(rotated))
    assert norm_change.max() < 1e-5 and angle_change.max() < 1e-3

    perturbed = copy.deepcopy(random_shapes_clf)
    with torch.no_grad():
        for parameter in perturbed.model.visual.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    norm_change, angle_change = study.geometry_change(reference, study.neuron_geometry(perturbed))
    assert norm_change.max() > 1e-3 and angle_change.max() > 0.1

    with pytest.raises(ValueError, match="same architecture"):
        study.geometry_change(reference, dict(list(reference.items())[1:]))


@pytest.fixture()
def smoke_profile(tmp_path):
    return cliplab.get_profile("shapes", smoke=True, encoder_cache=tmp_path / "cache")


def test_finetune_study_trains_once_then_loads_from_its_cache(smoke_profile):
    torch.manual_seed(0)
    setup = study.FinetuneStudy(smoke_profile)
    assert len(setup.x_train) == smoke_profile.finetuning.images and len(setup.x_test) == smoke_profile.sweeps.images
    config = smoke_profile.finetune_config("fare", "full")
    before = {k: v.clone() for k, v in setup.original.state_dict().items()}
    trained, history = setup.fine_tuned("fare-full", config)
    assert len(history) == config.steps
    assert (smoke_profile.encoder_cache_dir / "fare-full.safetensors").is_file()
    assert all(torch.equal(v, setup.original.state_dict()[k]) for k, v in before.items()), "original modified"
    again, cached_history = setup.fine_tuned("fare-full", config)
    assert cached_history == history
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), again.state_dict().values()))

    reports = setup.evaluate({"original": setup.original, "FARE": trained})
    assert list(reports) == ["original", "FARE"] and list(reports["FARE"]) == list(setup.threat.eps)
    report = reports["FARE"][setup.threat.eps[-1]]
    # the radii are nested: the largest first counts the images broken at the smaller ones, then runs every attack
    assert list(report.per_attack) == ["smaller radii", *setup.threat.attacks] and report.robust.n == smoke_profile.sweeps.images
    # the two tables 05 and 06 print: per radius, and at the largest attack by attack
    curves = {name: cliplab.evaluation.accuracy_curve(by_eps) for name, by_eps in reports.items()}
    table = setup.worst_case_table(curves).splitlines()
    assert table[0] == f"worst case over PGD-{smoke_profile.sweeps.steps}, APGD-CE, APGD-T and Square:"
    assert table[1:] == cliplab.evaluation.format_accuracy_table(curves).splitlines()
    attacks = setup.attack_table(reports)
    assert attacks.startswith("**At 4/255, attack by attack.**") and f"{report.robust.percent()} |" in attacks
    assert attacks._repr_markdown_() == attacks  # a notebook renders it as a Markdown table


def test_fine_tuned_copies_share_the_originals_text_tower_and_own_their_image_encoder(smoke_profile):
    """06 holds a dozen fine-tuned copies: the frozen text tower is the original's, never copied; fine-tuning a copy
    changes neither the original nor another copy, and the original is unchanged after timing a step."""
    setup = study.FinetuneStudy(smoke_profile)
    before = {k: v.clone() for k, v in setup.original.state_dict().items()}
    config = smoke_profile.finetune_config("fare", "full")
    trained, _ = setup.fine_tuned("fare-full", config)
    other = setup._copy_of_original()
    assert setup.step_seconds("FARE-full") > 0
    original = dict(setup.original.model.named_parameters())
    for copy_ in (trained, other):
        for name, parameter in copy_.model.named_parameters():
            assert (parameter is original[name]) == (not name.startswith("visual.")), name
    assert all(torch.equal(v, setup.original.state_dict()[k]) for k, v in before.items()), "original modified"
    assert all(p.requires_grad == name.startswith("visual.") for name, p in original.items()), "the text tower frozen"
    assert torch.equal(other(setup.x_test), setup.original(setup.x_test))


def test_timing_a_run_trains_no_more_steps_than_the_run_and_at_least_two(smoke_profile, monkeypatch):
    """06's frontier times each run: a smoke run trains 2 steps, so it is timed on one after one to warm up."""
    from cliplab.study import finetuning

    calls = []
    monkeypatch.setattr(finetuning, "train_step", lambda *args: calls.append(args))
    assert smoke_profile.finetuning.steps == 2
    longer = dataclasses.replace(smoke_profile, finetuning=dataclasses.replace(smoke_profile.finetuning, steps=5))
    for profile, expected in ((smoke_profile, {1: 2, 2: 2, 5: 2}), (longer, {1: 2, 2: 3, 5: 5})):
        setup = study.FinetuneStudy(profile)
        for steps, trained in expected.items():  # one to warm up, then at most the run's steps in all
            calls.clear()
            setup.step_seconds("FARE-OFT b=128 cw=1", steps=steps)
            assert len(calls) == trained, (profile.finetuning.steps, steps)


def _same_reports(a, b) -> bool:
    return list(a) == list(b) and all(
        (a[e].clean, a[e].robust, a[e].per_attack, a[e].eps, a[e].norm) ==
        (b[e].clean, b[e].robust, b[e].per_attack, b[e].eps, b[e].norm) and torch.equal(a[e].standing, b[e].standing)
        for e in a)


def test_the_notebooks_of_a_run_share_each_evaluation_and_make_it_once(smoke_profile, tmp_path, monkeypatch):
    """05 and 06 both evaluate the original and FARE-full: with the run's evaluation cache the second notebook reads
    the reports the first made, equal to what it would have made itself; another weight or budget is another
    evaluation."""
    profile = dataclasses.replace(smoke_profile, sweeps=dataclasses.replace(smoke_profile.sweeps, images=24))
    alone = study.FinetuneStudy(profile)
    expected = alone.evaluate({"original": alone.original})["original"]
    shared = study.FinetuneStudy(profile.with_runtime(evaluation_cache=str(tmp_path / "evaluations")))
    assert _same_reports(shared.evaluate({"original": shared.original})["original"], expected)
    assert 0 < int(expected[shared.threat.eps[0]].standing.sum()) < 24  # some images survive, some fall

    def made_again(*args, **kwargs):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(study.finetuning.ThreatModel, "evaluate", made_again)
    assert _same_reports(shared.evaluate({"original": shared.original})["original"], expected)  # read, not made
    changed = copy.deepcopy(shared.original)
    with torch.no_grad():
        next(changed.model.visual.parameters()).view(-1)[0] += 1e-3
    with pytest.raises(AssertionError, match="evaluated again"):
        shared.evaluate({"changed": changed})
    other_budget = study.FinetuneStudy(dataclasses.replace(shared.profile, evaluation=dataclasses.replace(
        shared.profile.evaluation, queries=shared.profile.evaluation.queries + 1)))
    with pytest.raises(AssertionError, match="evaluated again"):
        other_budget.evaluate({"original": other_budget.original})


def test_a_notebook_makes_its_own_evaluations_before_waiting_for_one_another_is_making(smoke_profile, tmp_path):
    """While another process evaluates the original (its lock held here), the study evaluates its other model first,
    then waits, and returns the reports in the models' order."""
    import threading

    from cliplab._io import file_lock

    cache = tmp_path / "evaluations"
    setup = study.FinetuneStudy(smoke_profile.with_runtime(evaluation_cache=str(cache)))
    other = copy.deepcopy(setup.original)
    with torch.no_grad():
        next(other.model.visual.parameters()).view(-1)[0] += 1e-3
    settings = dict(threat=dataclasses.asdict(setup.threat), batch_size=smoke_profile.sweeps.batch_size, seed=0)
    original_key = study.shared.fingerprint(setup.original, setup.x_test, setup.y_test, settings)
    other_key = study.shared.fingerprint(other, setup.x_test, setup.y_test, settings)
    results = {}
    with file_lock(cache / f".{original_key}.lock"):  # another notebook is evaluating the original
        evaluating = threading.Thread(target=lambda: results.update(setup.evaluate({"original": setup.original,
                                                                                    "other": other})))
        evaluating.start()
        deadline = time.monotonic() + 120
        while not (cache / f"{other_key}.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (cache / f"{other_key}.json").is_file(), "the free evaluation was not made first"
        assert evaluating.is_alive() and not (cache / f"{original_key}.json").exists()  # waiting for the original
    evaluating.join(timeout=120)
    assert list(results) == ["original", "other"] and (cache / f"{original_key}.json").is_file()
    with file_lock(cache / f".{other_key}.lock"):
        assert study.shared.shared(cache, "nobody-has-made-this", lambda: {}, wait=False) == {}
        assert study.shared.shared(cache, other_key, lambda: {}, wait=False) is not None  # made: read, lock or not
    with file_lock(cache / ".taken.lock"):
        assert study.shared.shared(cache, "taken", lambda: {}, wait=False) is None


def test_a_shared_evaluation_wanted_twice_at_once_is_made_once(tmp_path):
    import threading

    report = cliplab.evaluation.RobustnessReport(cliplab.evaluation.Proportion(3, 4), cliplab.evaluation.Proportion(1, 4),
                                                 {"apgd-ce": cliplab.evaluation.Proportion(1, 4)},
                                                 torch.tensor([False, True, False, False]), 1 / 255)
    made, results = [], [None, None]

    def evaluate():
        made.append(threading.get_ident())
        return {report.eps: report}

    def want(i):
        results[i] = study.shared.shared(tmp_path, "key", evaluate)

    wanting = [threading.Thread(target=want, args=(i,)) for i in range(2)]
    for thread in wanting:
        thread.start()
    for thread in wanting:
        thread.join()
    assert len(made) == 1 and all(_same_reports(r, {report.eps: report}) for r in results)


def test_finetune_and_evaluate_writes_weights_and_metrics(smoke_profile, tmp_path):
    config = smoke_profile.finetune_config("tecoa", "oft", block_size=8, save_every=1)
    metrics = study.finetune_and_evaluate(smoke_profile, config, tmp_path / "run")
    assert metrics == json.loads((tmp_path / "run" / "metrics.json").read_text())
    for when in ("before", "after"):
        for kind in ("clean", "robust"):
            entry = metrics[when][kind]
            assert entry["n"] == smoke_profile.defences.images and entry["ci95"][0] <= entry["value"] <= entry["ci95"][1]
    assert metrics["config"]["block_size"] == 8
    loaded = cliplab.load_classifier("shapes", pretrained=tmp_path / "run" / "final.safetensors", device="cpu")
    assert loaded.num_classes == 100
    with pytest.raises(FileExistsError, match="resume"):  # found before any model is loaded
        study.finetune_and_evaluate(smoke_profile, config, tmp_path / "run")


def test_trainable_parameters_count_what_each_adapter_trains(random_shapes_clf):
    from cliplab.study.measures import ADAPTED_WEIGHTS, trainable_parameters

    profile = cliplab.get_profile("shapes")
    visual = random_shapes_clf.model.visual
    full = trainable_parameters(random_shapes_clf, profile.finetune_config("fare", "full"))
    assert full == sum(p.numel() for p in visual.parameters())
    oft = trainable_parameters(random_shapes_clf, profile.finetune_config("fare", "oft", block_size=16))
    # OFT rotates the inputs of every adapted weight: (in / b) blocks of b (b - 1) / 2 angles each
    widths = [w.shape[1] for name, w in visual.state_dict().items() if name.endswith(ADAPTED_WEIGHTS)]
    assert oft == sum(w // 16 * (16 * 15 // 2) for w in widths) < full
    assert not any("parametrizations" in name for name, _ in visual.named_parameters()), "counted on a copy"
    # counted on the meta device as on a real copy, for every run of the study
    from cliplab.study.finetuning import finetune_runs, frontier_runs
    from cliplab.training.adapters import trained_parameter_count
    from cliplab.training.trainer import prepare

    for _, config in (finetune_runs(profile) | frontier_runs(profile, visual)).values():
        real = trained_parameter_count(config, prepare(copy.deepcopy(random_shapes_clf), config))
        assert trainable_parameters(random_shapes_clf, config) == real, config.adapter


def test_the_study_runs_name_the_committed_encoders_with_their_settings():
    """05, 06 and 07 name their fine-tuned models through finetune_runs: every committed encoder is one of them,
    trained with exactly its settings, so that `cliplab reproduce` on shapes trains nothing it has."""
    from pathlib import Path

    from cliplab.study.finetuning import finetune_runs, frontier_runs
    from cliplab.training.runs import check_same_run

    committed = Path(__file__).resolve().parents[1] / "notebooks" / "encoders" / "shapes"
    profile = cliplab.get_profile("shapes")
    runs = finetune_runs(profile) | frontier_runs(profile, profile.load_classifier().model.visual)
    assert sorted(cache for cache, _ in runs.values()) == sorted(p.stem for p in committed.glob("*.safetensors"))
    for cache, config in runs.values():
        check_same_run(json.loads((committed / f"{cache}.json").read_text())["config"], config, cache)


def test_each_other_restricted_update_is_set_against_the_oft_model_of_its_size_and_clean_weight(tmp_path):
    """06's frontier compares like with like: never an OFT model trained with another clean weight (cw=2, 3). (The
    whole profile: a smoke run has one OFT block size.)"""
    setup = study.FinetuneStudy(cliplab.get_profile("shapes", encoder_cache=tmp_path / "cache"))
    pairs = setup.nearest_oft(list(setup.every_run()))
    assert list(pairs) == list(setup.frontier())  # LoRA, the last blocks and BitFit, each paired
    assert pairs == {"FARE-LoRA r=3": "FARE-OFT b=16 cw=1", "FARE-LoRA r=28": "FARE-OFT b=128 cw=1",
                     "FARE-last-1": "FARE-OFT b=128 cw=1", "FARE-last-2": "FARE-OFT b=128 cw=1",
                     "FARE-BitFit": "FARE-OFT b=16 cw=1"}
    assert setup.nearest_oft(["FARE-LoRA r=3", "FARE-OFT b=128 cw=2"]) == {}  # no OFT model of its clean weight


def test_the_study_refuses_a_model_it_does_not_know_and_shows_each_model_attacked(smoke_profile):
    setup = study.FinetuneStudy(smoke_profile)
    with pytest.raises(ValueError, match="names must be among FARE-full, TeCoA-full"):
        setup.models("FARE-ful")
    cache = smoke_profile.encoder_cache_dir
    assert not cache.exists() or not any(cache.glob("*.safetensors")), "refused before training anything"
    fig = setup.adversarial_views({"original": setup.original}, images=2)
    assert len(fig.axes) == 2 * 2 * 2  # the clean row and the model's: image and perturbation for each of 2 images
    assert fig.axes[4].get_title().startswith("original:\n")


def test_training_times_multiply_out():
    """06's frontier table: the minutes are the shown seconds per step times the steps (0.81 s x 1000 is 13.5 min)."""
    from cliplab.study.finetuning import _duration

    assert _duration(round(0.8149, 2) * 1000) == "13.5 min"
    assert _duration(95.4) == "95 s"

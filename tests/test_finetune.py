"""Robust fine-tuning: FARE/TeCoA steps learn, a killed run resumes to bit-identical weights, bad input fails."""
import copy
import functools
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import cliplab
from cliplab import training as ft, study
from cliplab._io import RunLocked, run_lock
from cliplab.training import objectives
from cliplab.training import oft_parameters


def tiny_config(**overrides):
    settings = dict(steps=4, batch_size=8, attack_steps=2, save_every=2, warmup=1, lr=1e-3, progress=False)
    return ft.FinetuneConfig(**{**settings, **overrides})


@pytest.fixture()
def data(shapes_test):
    x, y, _ = shapes_test
    return x[:64], y[:64]


@functools.cache
def _random_classifier():
    torch.manual_seed(0)
    return cliplab.load_classifier("shapes", pretrained=None, device="cpu", precision="fp32")


def fresh():
    """A new classifier for a run to train in place: a copy of one built once per process (seeded), not a rebuild
    (which re-encodes the text head)."""
    classifier = copy.deepcopy(_random_classifier())
    torch.manual_seed(0)
    return classifier


def weights(classifier):
    return {k: v.clone() for k, v in classifier.model.state_dict().items()}


class Killed(Exception):
    pass


@pytest.mark.parametrize("method, adapter, eval_every", [("fare", "full", 0), ("tecoa", "oft", 1), ("fare", "lora", 0),
                                                        ("tecoa", "last-k", 0), ("fare", "bitfit", 0)])
def test_killed_run_resumes_to_exactly_the_uninterrupted_weights(tmp_path, data, method, adapter, eval_every):
    x, y = data
    config = tiny_config(method=method, adapter=adapter, eval_every=eval_every)
    held_out = (x[:16], y[:16])
    reference = weights(ft.finetune(fresh(), x, y, config, tmp_path / "full", eval_data=held_out))

    # killed after the checkpoint of step 2 and one more optimiser step
    assert _killed_at_step(4, lambda: ft.finetune(fresh(), x, y, config, tmp_path / "killed", eval_data=held_out))
    assert json.loads((tmp_path / "killed" / "latest.json").read_text()) == {"step": 2}
    resumed = weights(ft.finetune(fresh(), x, y, config, tmp_path / "killed", resume=True, eval_data=held_out))
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == [
        ".lock", "checkpoint-4.safetensors", "checkpoint-4.state.pt", "history.json", "latest.json"]
    history = json.loads((tmp_path / "killed" / "history.json").read_text())
    assert history == json.loads((tmp_path / "full" / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]


def test_checkpoints_hold_the_image_encoder_alone_and_resuming_loads_only_it(tmp_path, data):
    """Only the image encoder trains, so a checkpoint holds only it, and a resumed run takes only it, also from an
    older checkpoint of the whole model: the rest of the model it resumes into stays as it is (06's fine-tuned copies
    share the original's text tower and logit scale)."""
    from safetensors.torch import save_file

    x, y = data
    config = tiny_config(steps=2)
    trained = weights(ft.finetune(fresh(), x, y, config, tmp_path))
    checkpoint = tmp_path / "checkpoint-2.safetensors"
    stored = load_file(checkpoint)
    assert stored.keys() == {key for key in trained if key.startswith("visual.")}
    # an older checkpoint of the whole model, whose text side is not the model's
    stored |= {key: value + 1 for key, value in trained.items() if not key.startswith("visual.")}
    save_file(stored, checkpoint)
    before = weights(fresh())
    resumed = weights(ft.finetune(fresh(), x, y, config, tmp_path, resume=True))  # nothing left to train: loads only
    for key in resumed:
        assert torch.equal(resumed[key], (trained if key.startswith("visual.") else before)[key]), key


KILLED_RUN = """
import json, os, signal, sys, torch
import cliplab
from cliplab import training as ft
from cliplab.training import objectives
config, out, kill_at = ft.FinetuneConfig(**json.loads(sys.argv[1])), sys.argv[2], int(sys.argv[3])
real, calls = objectives.adversarial_loss, []
def killed(*args):
    calls.append(1)
    if len(calls) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no cleanup, no exception
    return real(*args)
objectives.adversarial_loss = killed
x, y, _ = cliplab.load_dataset("shapes", split="test", n=64)
torch.manual_seed(0)
classifier = cliplab.load_classifier("shapes", pretrained=None, device="cpu", precision="fp32")
torch.manual_seed(0)
ft.finetune(classifier, x, y, config, out, resume=os.path.exists(os.path.join(out, "latest.json")))
"""


@pytest.mark.slow  # three processes per adapter
@pytest.mark.parametrize("adapter", ["lora", "last-k", "bitfit"])
def test_every_adapter_resumes_after_kill_9_to_the_uninterrupted_weights(tmp_path, data, adapter):
    import subprocess
    import sys

    x, y = data
    settings = dict(steps=4, batch_size=8, attack_steps=2, save_every=2, warmup=1, lr=1e-3, progress=False,
                    adapter=adapter)
    reference = weights(ft.finetune(fresh(), x, y, ft.FinetuneConfig(**settings), tmp_path / "whole"))
    run = [sys.executable, "-c", KILLED_RUN, json.dumps(settings), str(tmp_path / "killed")]
    assert subprocess.run([*run, "3"], capture_output=True).returncode == -9  # killed in its third step
    assert json.loads((tmp_path / "killed" / "latest.json").read_text()) == {"step": 2}
    resumed = subprocess.run([*run, "0"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = load_file(tmp_path / "killed" / "checkpoint-4.safetensors")
    assert final.keys() == {key for key in reference if key.startswith("visual.")}  # the image encoder alone
    assert all(torch.equal(final[key], reference[key]) for key in final)


def test_checkpoint_clean_up_deletes_only_its_own_files(tmp_path, data):
    """Old checkpoints are dropped as training goes on, but nothing else in the run's directory that happens to
    start with checkpoint- (here a user's files, put beside a run that is then resumed)."""
    x, y = data
    run = tmp_path / "run"
    config = tiny_config()
    killed = _killed_at_step(3, lambda: ft.finetune(fresh(), x, y, config, run))
    assert killed and json.loads((run / "latest.json").read_text()) == {"step": 2}
    theirs = {"checkpoint-best.pt": b"a user's model", "checkpoint-3.safetensors.bak": b"a backup"}
    for name, content in theirs.items():
        (run / name).write_bytes(content)
    ft.finetune(fresh(), x, y, config, run, resume=True)
    assert sorted(p.name for p in run.iterdir()) == sorted([
        *theirs, ".lock", "checkpoint-4.safetensors", "checkpoint-4.state.pt", "history.json", "latest.json"])
    assert all((run / name).read_bytes() == content for name, content in theirs.items())


def _killed_at_step(step, run) -> bool:
    """Run ``run()`` with the step function raising at training step ``step``; True if it was killed."""
    real_loss, calls = objectives.adversarial_loss, []

    def dies(*args):
        calls.append(1)
        if len(calls) == step:
            raise Killed
        return real_loss(*args)

    objectives.adversarial_loss = dies
    try:
        run()
    except Killed:
        return True
    finally:
        objectives.adversarial_loss = real_loss
    return False


def test_a_new_run_refuses_a_directory_of_other_files_or_another_run(tmp_path, data):
    x, y = data
    (tmp_path / "notes.txt").write_text("mine")
    classifier = fresh()
    before = weights(classifier)
    with pytest.raises(FileExistsError, match=r"not a cliplab run \(notes\.txt\)"):
        ft.finetune(classifier, x, y, tiny_config(), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    ft.finetune(fresh(), x, y, tiny_config(steps=2), tmp_path / "run")
    with pytest.raises(FileExistsError, match="already holds a run"):
        ft.finetune(classifier, x, y, tiny_config(steps=2), tmp_path / "run")
    after = weights(classifier)
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused run must not touch the model"


def test_a_second_run_into_the_same_directory_fails_at_once_naming_the_holder(tmp_path, data):
    import threading

    x, y = data
    held, release = threading.Event(), threading.Event()

    def running_job():  # holds the lock as a training job in another thread of this process would
        with run_lock(tmp_path / "run"):
            held.set()
            release.wait(30)

    job = threading.Thread(target=running_job)
    job.start()
    try:
        assert held.wait(30)
        with pytest.raises(RunLocked, match=rf"in use by another fine-tuning run \(pid {os.getpid()}\)"):
            ft.finetune(fresh(), x, y, tiny_config(), tmp_path / "run")
    finally:
        release.set()
        job.join()
    ft.finetune(fresh(), x, y, tiny_config(steps=2), tmp_path / "run")  # free again once the holder is done


@pytest.mark.slow
def test_a_second_process_is_locked_out(tmp_path):
    """The lock is the kernel's (flock): another process sees it, and it goes with the holder's death."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from cliplab._io import RunLocked, run_lock\n"
            "try:\n    run_lock(Path(sys.argv[1])).__enter__()\nexcept RunLocked as e:\n"
            "    print(e); sys.exit(3)\n")
    with run_lock(tmp_path):
        locked = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert locked.returncode == 3 and f"pid {os.getpid()}" in locked.stdout
    free = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert free.returncode == 0, free.stdout + free.stderr


def test_temporary_files_of_a_killed_run_are_removed_on_resume(tmp_path, data):
    x, y = data
    config = tiny_config()
    assert _killed_at_step(3, lambda: ft.finetune(fresh(), x, y, config, tmp_path))
    leftover = tmp_path / ".checkpoint-3.safetensors.abc123.tmp"  # as atomic_write leaves it when killed -9
    leftover.write_bytes(b"half a checkpoint")
    ft.finetune(fresh(), x, y, config, tmp_path, resume=True)
    assert not leftover.exists() and not list(tmp_path.glob("*.tmp"))


def test_a_failed_resume_leaves_the_classifier_untouched(tmp_path, data):
    x, y = data
    ft.finetune(fresh(), x, y, tiny_config(steps=2, adapter="oft"), tmp_path)
    (tmp_path / "checkpoint-2.safetensors").write_bytes(b"truncated")
    classifier = fresh()
    before = weights(classifier)
    with pytest.raises(ValueError, match=r"checkpoint-2\.safetensors is corrupted"):
        ft.finetune(classifier, x, y, tiny_config(steps=2, adapter="oft"), tmp_path, resume=True)
    assert weights(classifier).keys() == before.keys(), "no OFT modules may have been added"
    assert all(torch.equal(before[k], v) for k, v in weights(classifier).items())


def test_truncated_weights_are_refused_by_the_checks_before_any_model_loads(tmp_path, data):
    """check_run_directory (what cliplab finetune runs before loading anything) reads the weights file's header too."""
    x, y = data
    ft.finetune(fresh(), x, y, tiny_config(steps=2), tmp_path)
    weights_file = tmp_path / "checkpoint-2.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"cannot resume: .*checkpoint-2\.safetensors is corrupted or truncated"):
        ft.check_run_directory(tmp_path, tiny_config(steps=2), resume=True)


def test_state_files_are_named_when_corrupt_and_pickles_are_refused(tmp_path, data):
    x, y = data
    ft.finetune(fresh(), x, y, tiny_config(steps=2), tmp_path)
    state = tmp_path / "checkpoint-2.state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"checkpoint-2\.state\.pt is corrupted"):
        ft.finetune(fresh(), x, y, tiny_config(steps=2), tmp_path, resume=True)
    torch.save({"config": Killed()}, state)  # an arbitrary pickled object: never unpickled
    with pytest.raises(ValueError, match=r"checkpoint-2\.state\.pt is corrupted or not a cliplab checkpoint"):
        ft.finetune(fresh(), x, y, tiny_config(steps=2), tmp_path, resume=True)


def adversarial_distance(classifier, target, x, eps):
    """Mean ||f(x_adv) - f0(x)||^2 under a fixed-seed FARE attack: what FARE minimises."""
    from cliplab.attacks.pgd import pgd_maximize

    distance = lambda images: (classifier.image_features(images) - target).pow(2).sum(1)  # noqa: E731
    x_adv = pgd_maximize(distance, x, eps=eps, alpha=eps / 4, steps=10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return distance(x_adv).mean().item()


@pytest.mark.slow
def test_fare_pulls_adversarial_embeddings_back_to_the_original_ones(data, tmp_path):
    x, y = data
    classifier = cliplab.load_classifier("shapes", device="cpu", precision="fp32")
    with torch.no_grad():
        target = classifier.image_features(x)  # f0(x)
    before = adversarial_distance(classifier, target, x, 4 / 255)
    ft.finetune(classifier, x, y, tiny_config(steps=15, batch_size=32, attack_steps=3, lr=1e-3), tmp_path)
    after = adversarial_distance(classifier, target, x, 4 / 255)
    assert after < 0.7 * before, (before, after)
    assert not any(p.requires_grad for p in classifier.model.transformer.parameters())  # text tower frozen
    assert not classifier.model.logit_scale.requires_grad


def test_oft_trains_only_rotations_and_export_merges(data, tmp_path):
    x, y = data
    classifier = fresh()
    ft.finetune(classifier, x, y, tiny_config(adapter="oft"), tmp_path)
    trainable = {id(p) for p in classifier.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in oft_parameters(classifier.model.visual)}
    probe = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        before = classifier(probe)
    study.export_weights(classifier, tmp_path / "final.safetensors")
    loaded = cliplab.load_classifier("shapes", pretrained=tmp_path / "final.safetensors", device="cpu",
                                     precision="fp32")
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe), before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("overrides, match", [
    (dict(lr=0.0), "lr"), (dict(lr=-1e-3), "lr"), (dict(steps=0), "steps"), (dict(eps=1.5), "eps"),
    (dict(eps=0.0), r"eps must be in \(0, 1\].*adversarial fine-tuning needs a radius"),
    (dict(eps=-0.1), "eps"), (dict(method="pgd"), "method"), (dict(adapter="prompt"), "adapter"),
    (dict(adapter="lora", rank=0), "rank"), (dict(adapter="lora", rank=128), "rank must be below both sides"),
    (dict(adapter="last-k", blocks=9), "blocks must be at most the encoder's depth, 4 blocks"),
    (dict(adapter="oft", block_size=5), "block_size must divide"),
    (dict(save_every=0), "save_every"), (dict(eval_every=-1), "eval_every"),
])
def test_bad_config_names_the_field(overrides, match, data, tmp_path):
    x, y = data
    with pytest.raises(ValueError, match=match):
        ft.finetune(fresh(), x, y, tiny_config(**overrides), tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written


def test_resume_without_checkpoint_or_from_a_corrupted_one_fails_clearly(data, tmp_path):
    x, y = data
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ft.finetune(fresh(), x, y, tiny_config(), tmp_path, resume=True)
    ft.finetune(fresh(), x, y, tiny_config(steps=2), tmp_path)
    (tmp_path / "checkpoint-2.safetensors").write_bytes(b"not a safetensors file")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="corrupted"):
        ft.finetune(fresh(), x, y, tiny_config(steps=2), tmp_path, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    (tmp_path / "latest.json").write_text("{oops")
    with pytest.raises(ValueError, match="corrupted"):
        ft.finetune(fresh(), x, y, tiny_config(steps=2), tmp_path, resume=True)


def test_resume_with_other_settings_is_refused(data, tmp_path):
    x, y = data
    ft.finetune(fresh(), x, y, tiny_config(steps=4), tmp_path / "run")  # leaves checkpoint-4
    with pytest.raises(ValueError, match="lr=0.001 there, 0.01 now"):
        ft.finetune(fresh(), x, y, tiny_config(lr=1e-2), tmp_path / "run", resume=True)


def test_load_or_finetune_trains_once_then_loads_and_checks_the_settings(data, tmp_path, monkeypatch):
    x, y = data
    config = tiny_config(steps=2)
    trained, history = study.load_or_finetune(fresh(), "fare", config, x, y, tmp_path)
    # the run directory is gone; the lock that makes a concurrent caller wait stays (an empty file)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fare.lock", "fare.json", "fare.safetensors"]
    assert [h["step"] for h in history] == [1, 2]

    def no_training(*args, **kwargs):
        raise AssertionError("a cached encoder must not be retrained")

    monkeypatch.setattr(study.finetuning, "finetune", no_training)  # the trainer the cache calls
    loaded, loaded_history = study.load_or_finetune(fresh(), "fare", tiny_config(steps=2, progress=True), x, y,
                                                 tmp_path)
    assert loaded_history == history
    for key, value in weights(trained).items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    with pytest.raises(ValueError, match="steps=2 there, 3 now"):
        study.load_or_finetune(fresh(), "fare", tiny_config(steps=3), x, y, tmp_path)


def test_two_callers_of_load_or_finetune_at_once_train_the_encoder_once(data, tmp_path, monkeypatch):
    """cliplab reproduce runs 05 and 06 at once, and both want FARE-full: the second waits for the first's training
    and loads its encoder (threads here; the lock is a file lock, so processes wait the same way)."""
    import threading

    x, y = data
    trainings, real_finetune = [], study.finetuning.finetune

    def counted(*args, **kwargs):
        trainings.append(threading.get_ident())
        return real_finetune(*args, **kwargs)

    monkeypatch.setattr(study.finetuning, "finetune", counted)
    results = [None, None]

    def call(i):
        results[i] = study.load_or_finetune(fresh(), "fare", tiny_config(steps=2), x, y, tmp_path)

    callers = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(trainings) == 1
    (first, first_history), (second, second_history) = results
    assert first_history == second_history and [h["step"] for h in first_history] == [1, 2]
    for key, value in weights(first).items():
        assert torch.equal(second.model.state_dict()[key], value), key


def test_profile_finetune_config_takes_the_profile_budgets_per_adapter():
    profile = cliplab.get_profile("shapes")
    full = profile.finetune_config("fare", "full")
    assert (full.steps, full.lr, full.eps, full.clean_weight) == (profile.finetuning.steps, profile.finetuning.lr, 4 / 255, 0)
    assert (full.batch_size, full.attack_steps) == (profile.finetuning.batch_size, profile.finetuning.attack_steps)
    oft = profile.finetune_config("fare", "oft")
    assert (oft.lr, oft.clean_weight, oft.block_size) == (profile.finetuning.oft_lr, profile.finetuning.oft_clean_weight,
                                                          profile.finetuning.oft_block_sizes[0])
    custom = profile.finetune_config("tecoa", "oft", block_size=4, lr=1e-2, steps=3)
    assert (custom.method, custom.block_size, custom.lr, custom.steps) == ("tecoa", 4, 1e-2, 3)
    with pytest.raises(ValueError, match=r"^block_size must be >= 1"):  # not silently the profile's 128
        profile.finetune_config("fare", "oft", block_size=0).validate()
    for adapter in ("lora", "last-k", "bitfit"):  # every restricted update: OFT's clean weight
        assert profile.finetune_config("fare", adapter).clean_weight == profile.finetuning.oft_clean_weight
    for adapter in ("lora", "bitfit"):  # updates that start at zero, as OFT's rotations do: OFT's learning rate
        assert profile.finetune_config("fare", adapter).lr == profile.finetuning.oft_lr
    assert profile.finetune_config("fare", "last-k").lr == profile.finetuning.lr  # it trains weights themselves
    with pytest.raises(ValueError, match="rank applies to adapter='lora' only, got it with adapter='oft'"):
        profile.finetune_config("fare", "oft", rank=4)


def test_a_printed_config_shows_only_its_own_adapters_size():
    """``print(config)`` (05 prints one) leaves out the sizes of the other adapters, which mean nothing to it: a
    ``blocks=1`` beside ``adapter='full'`` reads as one block trained. The repr keeps every field."""
    profile = cliplab.get_profile("shapes")
    full, lora = profile.finetune_config("fare", "full"), profile.finetune_config("fare", "lora", rank=3)
    assert not any(size in str(full) for size in ("block_size=", "rank=", "blocks="))
    assert "rank=3" in str(lora) and "block_size=" not in str(lora) and "blocks=" not in str(lora)
    assert str(full).startswith("FinetuneConfig(method='fare', adapter='full', eps=") and "blocks=1" in repr(full)


def test_periodic_evaluation_joins_the_history_and_needs_data(data, tmp_path):
    x, y = data
    ft.finetune(fresh(), x, y, tiny_config(eval_every=2), tmp_path / "run", eval_data=(x[:16], y[:16]))
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    evaluated = [h["step"] for h in history if "eval_robust" in h]
    assert evaluated == [2, 4] and all(h["eval_n"] == 16 for h in history if "eval_n" in h)
    assert all(0 <= h["eval_robust"] <= h["eval_clean"] <= 1 for h in history if "eval_n" in h)
    with pytest.raises(ValueError, match="eval_data"):
        ft.finetune(fresh(), x, y, tiny_config(eval_every=2), tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_a_lock_taken_where_there_was_no_directory_leaves_none_when_its_block_fails(tmp_path):
    """reproduce locks its results directory before it checks weights and data: a bad input must leave no folder
    (nor a lock file) behind; one that was there, or that got other files, stays."""
    with pytest.raises(ValueError, match="bad weights"):
        with run_lock(tmp_path / "results" / "shapes", "reproduce run"):
            raise ValueError("bad weights")
    assert not (tmp_path / "results").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(ValueError):
        with run_lock(tmp_path / "kept" / "out", "evaluation"):
            (tmp_path / "kept" / "out" / "evaluation.json").write_text("{}")
            raise ValueError("stopped later")
    assert (tmp_path / "kept" / "out" / "evaluation.json").is_file()
    with run_lock(tmp_path / "done", "evaluation"):
        pass
    assert (tmp_path / "done" / ".lock").is_file()  # a run that ended marks its directory

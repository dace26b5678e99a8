"""The `cuda` tier: every kernel of the study on a GPU, and CPU-vs-GPU agreement. Skipped without a GPU.

Run it with ``pytest -m cuda``. ``CLIPLAB_TEST_DEVICE=cpu pytest -m cuda`` runs the same tests on the CPU (a dry
run of this file where no GPU is lent). On CUDA the classifier's default precision is bf16 autocast, so both
precisions are exercised.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

import cliplab
from cliplab import Denoised, GaussianNoise, RandomizedSmoothing, apply_oft, merge_adapters
from cliplab.defences import denoise
from cliplab import training as ft
from cliplab.training import objectives

pytestmark = pytest.mark.cuda
DEVICE = os.environ.get("CLIPLAB_TEST_DEVICE", "cuda")
EPS = 4 / 255


def _devices(module: torch.nn.Module) -> set[str]:
    return {t.device.type for t in [*module.parameters(), *module.buffers()]}


@pytest.fixture(scope="module")
def clf(shapes_clf):
    """The trained shapes CLIP, moved to the device (the default precision: bf16 on CUDA)."""
    return copy.deepcopy(shapes_clf).to(DEVICE)


@pytest.fixture(scope="module")
def images(shapes_test):
    x, y, _ = shapes_test
    return x[:64].to(DEVICE), y[:64].to(DEVICE)


def _with_precision(classifier, precision):
    classifier = copy.deepcopy(classifier)
    classifier.precision = precision
    return classifier


def test_loaded_classifiers_are_wholly_on_the_device():
    shapes = cliplab.load_classifier("shapes", device=DEVICE)
    vit = cliplab.load_classifier("ViT-B-32", pretrained=None, class_names=["cat", "dog", "truck"],
                                  templates=["a photo of a {}."], device=DEVICE)
    for classifier in (shapes, vit):
        assert _devices(classifier) == {torch.device(DEVICE).type}
    x = torch.rand(4, 3, 32, 32, device=DEVICE)
    result = cliplab.pgd(vit, x, eps=EPS, steps=2, seed=0)  # the study's architecture, end to end
    assert result.x_adv.device == x.device and torch.isfinite(result.loss_history).all()
    assert (result.x_adv - x).abs().max() <= EPS + 1e-6


def test_logits_agree_with_the_cpu(shapes_clf, clf, images):
    x, _ = images
    with torch.no_grad():
        cpu = shapes_clf(x.cpu())
        fp32 = _with_precision(clf, "fp32")(x).cpu()
        default = clf(x).cpu()
    torch.testing.assert_close(fp32, cpu, atol=1e-3, rtol=1e-3)
    assert default.dtype == torch.float32
    torch.testing.assert_close(default, cpu, atol=0.5, rtol=0.05)  # bf16 on CUDA: close, not equal
    assert (default.argmax(1) == cpu.argmax(1)).float().mean() >= 0.95


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("norm, eps", [("linf", EPS), ("l2", 0.5)])
def test_pgd(shapes_clf, clf, images, precision, norm, eps):
    x, y = images
    result = cliplab.pgd(_with_precision(clf, precision), x, y, eps=eps, steps=10, norm=norm, loss="margin", seed=0)
    delta = (result.x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert result.x_adv.device == x.device
    assert (size <= eps + 1e-5).all() and result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    cpu = cliplab.pgd(shapes_clf, x.cpu(), y.cpu(), eps=eps, steps=10, norm=norm, loss="margin", seed=0)
    rate, cpu_rate = result.success.float().mean().item(), cpu.success.float().mean().item()
    assert abs(rate - cpu_rate) <= 0.1, (rate, cpu_rate)
    assert rate >= 0.3, "the attack must bite"


def test_eot_pgd_through_a_randomised_defence(clf, images):
    x, y = images
    defence = Denoised(clf, GaussianNoise(sigma=0.03))
    result = cliplab.pgd(defence, x, y, eps=EPS, steps=5, eot_samples=4, seed=0)
    assert result.x_adv.device == x.device and (result.x_adv - x).abs().max() <= EPS + 1e-6
    gradient = cliplab.eot_gradient(defence, x, y, eot_samples=4)
    assert torch.isfinite(gradient).all() and (gradient.flatten(1).abs().amax(1) > 0).all()


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_smoothing_predict_and_certify(shapes_clf, clf, images, precision):
    x, y = images
    smoothed = RandomizedSmoothing(cliplab.WithPrecision(clf, precision), sigma=0.03, batch_size=512)
    prediction = smoothed.predict(x, n=32, seed=0)
    classes, radii = smoothed.certify(x, n0=16, n=128, seed=0)
    assert prediction.device.type == classes.device.type == "cpu"
    assert (radii >= 0).all() and ((classes == -1) == (radii == 0)).all()
    cpu = RandomizedSmoothing(shapes_clf, sigma=0.03).predict(x.cpu(), n=32, seed=0)
    both = (prediction != -1) & (cpu != -1)
    assert both.sum() >= 32 and (prediction[both] == cpu[both]).float().mean() >= 0.9
    soft = smoothed(x[:8])  # the differentiable soft classifier
    assert soft.device == x.device and torch.isfinite(soft).all()


@pytest.mark.parametrize("denoiser", [denoise.Bilateral(sigma_space=1.0), denoise.Guided(), denoise.Median()],
                         ids=["bilateral", "guided", "median"])
def test_denoisers_agree_with_the_cpu(images, denoiser):
    x, _ = images
    out = denoiser(x)
    assert out.device == x.device
    torch.testing.assert_close(out.cpu(), denoiser(x.cpu()), atol=1e-5, rtol=1e-5)


def test_random_denoiser_and_sweep(images):
    x, _ = images
    out = denoise.RandomBilateral()(x)
    assert out.device == x.device and out.shape == x.shape and torch.isfinite(out).all()
    sweep = denoise.bilateral_sweep(x[:8], [0.5, 1.0, 2.0])
    assert sweep.device == x.device
    torch.testing.assert_close(sweep.cpu(), denoise.bilateral_sweep(x[:8].cpu(), [0.5, 1.0, 2.0]), atol=1e-5,
                               rtol=1e-5)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("method, adapter", [("fare", "full"), ("tecoa", "oft")])
def test_finetune_steps_save_and_resume(clf, images, tmp_path, monkeypatch, method, adapter):
    """A few fine-tuning steps on the device; a run killed after its step-2 checkpoint resumes to the weights
    of an uninterrupted run (equal up to the GPU's non-deterministic reductions)."""
    x, y = images
    config = ft.FinetuneConfig(method=method, adapter=adapter, block_size=8, steps=4, batch_size=16, attack_steps=2,
                               save_every=2, warmup=1, lr=1e-4, progress=False)
    straight = ft.finetune(copy.deepcopy(clf), x, y, config, tmp_path / "straight")
    real_loss, calls = objectives.adversarial_loss, []

    def killed_at_step_three(*args):
        calls.append(1)
        if len(calls) == 3:
            raise _Killed
        return real_loss(*args)

    monkeypatch.setattr(objectives, "adversarial_loss", killed_at_step_three)
    with pytest.raises(_Killed):
        ft.finetune(copy.deepcopy(clf), x, y, config, tmp_path / "resumed")
    monkeypatch.setattr(objectives, "adversarial_loss", real_loss)
    resumed = ft.finetune(copy.deepcopy(clf), x, y, config, tmp_path / "resumed", resume=True)
    assert _devices(straight) == _devices(resumed) == {torch.device(DEVICE).type}
    for (name, a), (_, b) in zip(straight.model.visual.state_dict().items(), resumed.model.visual.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=name)
    moved = any(not torch.equal(a, b) for a, b in zip(straight.model.visual.state_dict().values(),
                                                      clf.model.visual.state_dict().values()))
    assert moved, "fine-tuning must change the encoder"


def test_merge_adapters(clf, images):
    x, _ = images
    model = _with_precision(clf, "fp32")
    apply_oft(model.model.visual, block_size=8)
    torch.manual_seed(0)
    for parameter in ft.oft_parameters(model.model.visual):
        parameter.data.normal_(0, 0.05)
    with torch.no_grad():
        before = model(x)
        merge_adapters(model.model.visual)
        after = model(x)
    assert not ft.oft_parameters(model.model.visual) and _devices(model) == {torch.device(DEVICE).type}
    torch.testing.assert_close(after, before, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_worst_case_evaluation_agrees_with_the_cpu(shapes_clf, clf, images, precision):
    x, y = images
    budget = cliplab.AttackBudget(steps=10, num_targets=3, queries=50)
    on_device = cliplab.evaluate_robustness(_with_precision(clf, precision), x, y, eps=EPS, budget=budget,
                                            progress=False)
    on_cpu = cliplab.evaluate_robustness(shapes_clf, x.cpu(), y.cpu(), eps=EPS, budget=budget, progress=False)
    assert abs(on_device.clean.hits - on_cpu.clean.hits) <= 2
    assert abs(on_device.robust.hits - on_cpu.robust.hits) <= 0.1 * len(y)
    assert on_device.robust.value <= on_device.clean.value


def test_apgd_and_square_loops_never_wait_for_the_gpu(clf, images):
    """Inside a run every decision is a tensor mask: with sync debugging set to error, a host sync would raise."""
    from cliplab.attacks.apgd import _apgd_run
    from cliplab.attacks.common import Strongest
    from cliplab.attacks import attack_objective
    from cliplab.attacks.square import _square_run

    if torch.device(DEVICE).type != "cuda":
        pytest.skip("host syncs exist only on CUDA")
    x, y = images
    best, index = Strongest(x), torch.arange(len(x), device=x.device)
    history = torch.full((11, len(x)), float("nan"), device=x.device)
    objective = (lambda logits, labels: attack_objective(logits, labels, "ce", targeted=False))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:  # as _run_restarts calls it (its choice of the standing images syncs once per run, outside the loop)
        _apgd_run(clf, x, index, [y], best, objective, history, eps=EPS, steps=10, norm="linf", eot_samples=1,
                  generator=None, early_stop=False)
        _square_run(clf, x, y, eps=EPS, queries=10, generator=None, early_stop=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")

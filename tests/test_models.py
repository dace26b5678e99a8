"""load_classifier / save_weights: checkpoints round-trip through the same call as downloaded weights,
saving is atomic, bad names fail clearly, and a missing download fails fast when offline."""
from __future__ import annotations

import os
import socket

import pytest
import torch

import cliplab
from cliplab.shapes100 import render_shapes


def _logits(clf, x):
    with torch.no_grad():
        return clf(x)


def test_shapes_checkpoint_round_trip(shapes_clf, tmp_path):
    path = tmp_path / "m.safetensors"
    cliplab.save_weights(shapes_clf, path)
    loaded = cliplab.load_classifier("shapes", pretrained=path, device="cpu", precision="fp32")
    x = render_shapes(8, seed=0)[0]
    assert torch.equal(_logits(loaded, x), _logits(shapes_clf, x))
    assert not loaded.training
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"], "save left temporary files behind"
    # a str path goes through the same call
    loaded_str = cliplab.load_classifier("shapes", pretrained=str(path), device="cpu", precision="fp32")
    assert torch.equal(_logits(loaded_str, x), _logits(shapes_clf, x))


def test_random_shapes_checkpoint_round_trip_float16(random_shapes_clf, tmp_path):
    """Saving in float16 (as the shipped checkpoint is) loads back as float32, close to the original."""
    path = tmp_path / "half.safetensors"
    cliplab.save_weights(random_shapes_clf, path, dtype=torch.float16)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert torch.float16 in dtypes and torch.float32 not in dtypes
    loaded = cliplab.load_classifier("shapes", pretrained=path, device="cpu", precision="fp32")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = render_shapes(4, seed=0)[0]
    torch.testing.assert_close(_logits(loaded, x), _logits(random_shapes_clf, x), atol=5e-2, rtol=0)


@pytest.mark.slow
def test_vit_checkpoint_round_trip(random_vit, tmp_path):
    """The `cifar100` architecture: a checkpoint saved here loads through load_classifier(name, path)."""
    path = tmp_path / "vit.safetensors"
    cliplab.save_weights(random_vit, path)
    loaded = cliplab.load_classifier("ViT-B-32", pretrained=path, class_names=random_vit.class_names,
                                     templates=random_vit.templates, device="cpu", precision="fp32")
    x = render_shapes(2, seed=0)[0]
    assert torch.equal(_logits(loaded, x), _logits(random_vit, x))
    assert sorted(os.listdir(tmp_path)) == ["vit.safetensors"]


def test_save_is_atomic_on_failure(random_shapes_clf, tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    cliplab.save_weights(random_shapes_clf, path)
    original = path.read_bytes()

    import safetensors.torch

    def crash(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        cliplab.save_weights(random_shapes_clf, path)
    assert path.read_bytes() == original, "a failed save must leave the previous file untouched"
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"], "a failed save left temporary files behind"


def test_save_creates_parent_directories(random_shapes_clf, tmp_path):
    path = tmp_path / "a" / "b" / "m.safetensors"
    cliplab.save_weights(random_shapes_clf.model, path)  # a bare open_clip model works too
    assert path.is_file()


def test_loaded_classifier_defaults():
    torch.manual_seed(0)
    clf = cliplab.load_classifier("shapes", pretrained=None, device="cpu", precision="fp32")
    assert not clf.training
    assert clf.num_classes == 100 and clf.class_names[0] == "red circle"
    assert clf.image_size == (32, 32)
    assert next(clf.parameters()).device.type == "cpu"


# ------------------------------------------------------------------------------------- bad names
def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"^name must be a profile"):
        cliplab.load_classifier("ViT-Z-99", device="cpu")


def test_unknown_profile():
    with pytest.raises(ValueError, match=r"^profile must be one of"):
        cliplab.get_profile("imagenet")
    with pytest.raises(ValueError, match=r"^name must be a profile"):
        cliplab.load_classifier("imagenet", device="cpu")


def test_model_name_needs_explicit_weights():
    with pytest.raises(ValueError, match=r"^pretrained must be given"):
        cliplab.load_classifier("ViT-B-32", device="cpu")


def test_unknown_pretrained_tag():
    with pytest.raises(ValueError, match=r"^pretrained must be a tag of 'ViT-B-32'.*openai"):
        cliplab.load_classifier("ViT-B-32", pretrained="no_such_tag", device="cpu")


def test_missing_checkpoint_file(tmp_path):
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        cliplab.load_classifier("shapes", pretrained=missing, device="cpu")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        cliplab.load_classifier("ViT-B-32", pretrained=str(missing), device="cpu")


# ------------------------------------------------------------------------------------------ offline
def _no_network(*args, **kwargs):
    raise AssertionError("offline mode must not open a connection")


def test_offline_download_fails_fast_and_says_how(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # nothing cached: an empty Hugging Face cache and home directory
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(socket, "create_connection", _no_network)  # fast by construction: no connection is tried
    with pytest.raises(FileNotFoundError) as error:
        cliplab.load_classifier("cifar100", device="cpu")
    message = str(error.value)
    assert "pretrained=" in message and "offline" in message
    assert "ViT-B-32" in message


# ----------------------------------------------------------------------------------------- profiles
def test_profiles(monkeypatch):
    monkeypatch.delenv("CLIPLAB_DEVICE", raising=False)
    monkeypatch.setenv("CLIPLAB_PROFILE", "cifar100")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="CUDA"):
        profile = cliplab.get_profile()
    assert profile.name == "cifar100" and profile.runtime.device == "cpu"
    monkeypatch.delenv("CLIPLAB_PROFILE")
    shapes = cliplab.get_profile()
    assert shapes.name == "shapes" and shapes.runtime.device == "cpu"
    assert shapes.sweeps.eps == [e / 255 for e in shapes.sweeps.eps_255]
    with pytest.raises(ValueError, match=r"^device must be one of"):
        cliplab.get_profile("shapes", device="tpu")


def test_profile_settings_round_trip_through_the_environment(monkeypatch, tmp_path):
    """What `cliplab reproduce` sets in a notebook's kernel is what get_profile() there returns."""
    from cliplab.study.profiles import ENVIRONMENT, profile_environment

    for variable in [*ENVIRONMENT.values(), "CLIPLAB_PROFILE"]:
        monkeypatch.delenv(variable, raising=False)
    profile = cliplab.get_profile("cifar100", device="cpu", precision="fp32", weights=tmp_path / "w.safetensors",
                                  data_root=tmp_path, encoder_cache=tmp_path / "ckpt", smoke=True)
    for variable, value in profile_environment(profile).items():
        monkeypatch.setenv(variable, value)
    assert cliplab.get_profile() == profile
    assert profile.runtime.weights == str(tmp_path / "w.safetensors") and profile.encoder_cache_dir == tmp_path / "ckpt"
    # every setting is written, so nothing comes from the caller's environment (a smoke flag left in a shell)
    full = cliplab.get_profile("shapes", device="cpu")
    monkeypatch.setenv("CLIPLAB_SMOKE", "1")
    monkeypatch.setenv("CLIPLAB_PRETRAINED", str(tmp_path / "other.safetensors"))
    written = profile_environment(full)
    assert set(written) == {"CLIPLAB_PROFILE", *ENVIRONMENT.values()}
    for variable, value in written.items():
        monkeypatch.setenv(variable, value)
    assert cliplab.get_profile() == full
    monkeypatch.setenv("CLIPLAB_SMOKE", "maybe")  # a misspelt flag is an error, not silently False
    with pytest.raises(ValueError, match=r"^\$CLIPLAB_SMOKE must be one of 1/true/yes or 0/false/no, got 'maybe'"):
        cliplab.get_profile()


def test_smoke_shrinks_every_budget_of_either_profile():
    from cliplab.study.profiles import SMOKE_BUDGETS

    for name in ("shapes", "cifar100"):
        full, smoke = cliplab.get_profile(name, device="cpu"), cliplab.get_profile(name, device="cpu", smoke=True)
        assert smoke.smoke and not full.smoke and smoke.name == name
        assert smoke.single_template and smoke.runtime == full.runtime
        for section, changes in SMOKE_BUDGETS.items():
            for field, value in changes.items():
                assert getattr(getattr(smoke, section), field) == value
                if isinstance(value, int):
                    assert value <= getattr(getattr(full, section), field), f"{section}.{field}"
        assert 8 in smoke.sweeps.eps_255, "notebook 01 reports the success rate at 8/255"


def test_a_profile_prints_one_section_per_line():
    lines = str(cliplab.get_profile("shapes", device="cpu", smoke=True)).splitlines()
    assert lines[0] == "profile 'shapes' (smoke, single_template)"
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["sweeps", "evaluation", "defences", "certification",
                                                                  "finetuning", "runtime"]


def test_profile_loads_what_it_names(tmp_path, monkeypatch):
    for variable in ("CLIPLAB_PRETRAINED", "CLIPLAB_PRECISION"):
        monkeypatch.delenv(variable, raising=False)
    torch.manual_seed(0)
    path = tmp_path / "shapes.safetensors"
    cliplab.save_weights(cliplab.load_classifier("shapes", pretrained=None, device="cpu"), path)
    profile = cliplab.get_profile("shapes", device="cpu", weights=path, precision="fp32", smoke=True)
    classifier = profile.load_classifier()
    reference = cliplab.load_classifier("shapes", pretrained=path, device="cpu", templates=["a photo of a {}."],
                                        precision="fp32")
    x, y, names = profile.load_dataset("test", n=4)
    assert classifier.precision == "fp32" and classifier.templates == ["a photo of a {}."]
    with torch.no_grad():
        assert torch.equal(classifier(x), reference(x))
    assert x.shape == (4, 3, 32, 32) and len(names) == 100
    with pytest.raises(ValueError, match=r"^precision must be one of"):
        cliplab.get_profile("shapes", precision="fp16")


def test_check_weights_is_fast_and_names_the_problem(tmp_path, monkeypatch):
    """Fast by construction: the architecture is built on the meta device and no classifier (text head) is built."""
    from cliplab import models
    from cliplab.models import check_weights
    from cliplab.shapes_clip import WEIGHTS

    def no_classifier(*args, **kwargs):
        raise AssertionError("check_weights must not build a classifier")

    monkeypatch.setattr(models, "ZeroShotClassifier", no_classifier)
    check_weights("shapes")  # the shipped checkpoint
    with pytest.raises(ValueError, match="another architecture"):
        check_weights("ViT-B-32", pretrained=WEIGHTS)
    truncated = tmp_path / "half.safetensors"
    truncated.write_bytes(WEIGHTS.read_bytes()[: WEIGHTS.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"half\.safetensors.*truncated"):
        check_weights("shapes", pretrained=truncated)


@pytest.mark.slow
def test_cifar100_profile_builds_openai_clip_for_local_weights_too(tmp_path):
    """OpenAI's CLIP uses QuickGELU: a local copy of its weights (or none) must get that activation and OpenAI's
    normalisation, as the 'openai' tag would; a bare model name keeps open_clip's own config."""
    import open_clip
    from open_clip.transformer import QuickGELU

    from cliplab.data import CIFAR100_CLASSES

    torch.manual_seed(0)
    path = tmp_path / "vit.safetensors"
    cliplab.save_weights(open_clip.create_model("ViT-B-32"), path, dtype=torch.float16)
    names = dict(class_names=list(CIFAR100_CLASSES[:3]), templates=["a photo of a {}."], device="cpu",
                 precision="fp32")
    profile = cliplab.load_classifier("cifar100", pretrained=path, **names)
    bare = cliplab.load_classifier("ViT-B-32", pretrained=path, **names)
    activation = lambda clf: type(clf.model.visual.transformer.resblocks[0].mlp.gelu)  # noqa: E731
    assert activation(profile) is QuickGELU and activation(bare) is not QuickGELU
    openai = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    torch.testing.assert_close(profile.mean.flatten(), torch.tensor(openai["mean"]))
    torch.testing.assert_close(profile.std.flatten(), torch.tensor(openai["std"]))
    reference = open_clip.create_model("ViT-B-32-quickgelu", pretrained=str(path))  # open_clip's own QuickGELU config
    x = render_shapes(2, seed=0)[0]
    with torch.no_grad():
        torch.testing.assert_close(profile.image_features(x), reference.encode_image(profile.preprocess(x)).float())


def test_a_checkpoint_with_pickled_objects_is_refused_as_such(tmp_path):
    """torch refuses to unpickle objects that are not tensors; the message says that, not 'truncated', and does not
    pass on torch's advice to unpickle anyway."""
    import argparse

    path = tmp_path / "with-objects.pt"
    state = cliplab.load_classifier("shapes", pretrained=None, device="cpu").model.state_dict()
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ValueError, match="holds pickled Python objects besides tensors") as caught:
        cliplab.load_classifier("shapes", pretrained=path, device="cpu")
    assert "weights_only=False" not in str(caught.value) and "truncated" not in str(caught.value)

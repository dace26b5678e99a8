"""Data sets in the data contract: Shapes-100 (generated) and CIFAR-100 (torchvision, converted), the
offline failure mode, and argument validation."""
from __future__ import annotations

import pickle
import socket

import numpy as np
import pytest
import torch

from cliplab import load_dataset
from cliplab.data import class_names, sample_indices, templates
from cliplab.shapes100 import SHAPES100_CLASSES, render_shapes


def _check_contract(x, y, n):
    assert x.shape == (n, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() <= 1 and torch.isfinite(x).all()


# ---------------------------------------------------------------------------------------- Shapes-100
def test_shapes_contract():
    x, y, names = load_dataset("shapes", split="test", n=300)
    _check_contract(x, y, 300)
    assert names == list(SHAPES100_CLASSES) and len(set(names)) == 100
    assert y.min() >= 0 and y.max() < 100


def test_shapes_deterministic():
    a = load_dataset("shapes", split="train", n=200)
    b = load_dataset("shapes", split="train", n=200)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x1, y1 = render_shapes(50, seed=7)
    x2, y2 = render_shapes(50, seed=7)
    x3, _ = render_shapes(50, seed=8)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


def test_shapes_n_keeps_the_first_images():
    """``n`` keeps the first n images of the split (load_dataset's docstring): a smaller evaluation set
    is a prefix of a larger one, so results at different n are on nested image sets."""
    x100, y100, _ = load_dataset("shapes", split="test", n=100)
    x500, y500, _ = load_dataset("shapes", split="test", n=500)
    assert torch.equal(y100, y500[:100])
    assert torch.equal(x100, x500[:100]), "same labels but different images: n changes what is drawn"


def test_shapes_splits_disjoint():
    # equal sizes: were both splits drawn from one stream, the two sets would be identical
    train, _, _ = load_dataset("shapes", split="train", n=2000)
    test, _, _ = load_dataset("shapes", split="test", n=2000)
    # L2 distance from every test image to its nearest training image (identical images -> 0)
    distance = torch.cdist(test.flatten(1).double(), train.flatten(1).double())  # (2000, 2000)
    assert distance.min() > 1 / 255, "a test image also occurs in the training split"
    # and no duplicate inside a split
    within = torch.cdist(test.flatten(1).double(), test.flatten(1).double()) + torch.eye(2000) * 100
    assert within.min() > 1 / 255


def test_shapes_all_classes_present():
    _, y, _ = load_dataset("shapes", split="test", n=5000)
    counts = torch.bincount(y, minlength=100)
    assert (counts > 0).all()
    assert counts.max() < 3 * counts.float().mean()  # roughly balanced


def test_shapes_label_encodes_colour_and_shape():
    x, y = render_shapes(400, seed=0)
    names = [SHAPES100_CLASSES[i] for i in y.tolist()]
    # a black shape has darker pixels than a white one of the same image size
    black = x[[n.startswith("black") for n in names]]
    white = x[[n.startswith("white") for n in names]]
    assert black.amin(dim=(1, 2, 3)).mean() < 0.1 and white.amax(dim=(1, 2, 3)).mean() > 0.9


def test_shapes_generation_renders_a_whole_split_at_once():
    x, y = render_shapes(10_000, seed=0)  # batched rendering (its speed is a benchmark's job, not a test's)
    assert x.shape == (10_000, 3, 32, 32) and y.shape == (10_000,)


def test_shapes_size_capped_at_split():
    x, y, _ = load_dataset("shapes", split="test", n=10)
    assert len(x) == len(y) == 10


def test_names_and_templates():
    assert len(class_names("cifar100")) == 100 and "aquarium fish" in class_names("cifar100")
    assert all("_" not in name for name in class_names("cifar100"))
    for name in ("shapes", "cifar100"):
        assert all(t.count("{}") == 1 for t in templates(name))
        assert templates(name, single=True) == ["a photo of a {}."]
    assert len(templates("cifar100")) == 18


# ----------------------------------------------------------------------------------------- CIFAR-100
def test_cifar_offline_fails_without_touching_the_network_naming_the_directory(tmp_path, monkeypatch):
    """Fast by construction, not by a wall-clock bound: offline, no connection (nor its timeout) is attempted."""
    def no_network(*args, **kwargs):
        raise AssertionError("offline mode must not open a connection")

    monkeypatch.setenv("CLIPLAB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("cifar100", root=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "cifar-100-python") in message
    assert "root=" in message or "CLIPLAB_DATA" in message


def test_cifar_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPLAB_OFFLINE", "1")
    monkeypatch.setenv("CLIPLAB_DATA", str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match="data"):
        load_dataset("cifar100")
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("cifar100")
    assert str(tmp_path / "data" / "cifar-100-python") in str(error.value)


@pytest.fixture()
def fake_cifar(tmp_path, monkeypatch):
    """A tiny CIFAR-100 in torchvision's on-disk format (pickles with latin-1 str keys, as the real
    Python 2 pickles load), with the checksum checks patched out."""
    import torchvision.datasets.cifar as cifar

    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"class_{i}" for i in range(100)]
    names[1] = "aquarium_fish"
    names[58] = "pickup_truck"
    splits = {}
    for split, n in (("train", 12), ("test", 7)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 100, size=n).tolist()
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * n}, f)
        splits[split] = (data, labels)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": ["x"] * 20}, f)
    monkeypatch.setattr(cifar.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)  # the meta file's md5
    monkeypatch.setenv("CLIPLAB_OFFLINE", "1")  # conversion must never touch the network
    return tmp_path, splits


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar_conversion(fake_cifar, split):
    root, splits = fake_cifar
    data, labels = splits[split]
    x, y, names = load_dataset("cifar100", split=split, root=root)
    _check_contract(x, y, len(data))
    order = sample_indices(len(data), None)  # every split is read in one seeded order
    expected = torch.from_numpy(data).view(-1, 3, 32, 32).float() / 255  # CIFAR rows are CHW planes
    torch.testing.assert_close(x, expected[order], atol=0, rtol=0)
    assert y.tolist() == torch.tensor(labels)[order].tolist()
    assert names[1] == "aquarium fish" and names[58] == "pickup truck" and len(names) == 100
    x3, y3, _ = load_dataset("cifar100", split=split, root=root, n=3)
    assert torch.equal(x3, x[:3]) and torch.equal(y3, y[:3])
    x3, y3, _ = load_dataset("cifar100", split=split, root=root, n=3, seed=1)
    assert torch.equal(x3, expected[sample_indices(len(data), 3, seed=1)])


# ---------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(name="imagenet"), ValueError, r"^name must be one of"),
    (dict(name="shapes", split="val"), ValueError, r"^split must be one of"),
    (dict(name="shapes", n=0), ValueError, r"^n must be >= 1"),
    (dict(name="shapes", n=-5), ValueError, r"^n must be >= 1"),
    (dict(name="shapes", n=2.5), TypeError, r"^n must be an int"),
    (dict(name="shapes", n=20_000), ValueError, r"^n must be at most 10000, the size of the shapes test split"),
    (dict(name="cifar100", split="validation"), ValueError, r"^split must be one of"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        load_dataset(**kwargs)

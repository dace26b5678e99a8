"""Shared fixtures: models and data are built once per session, every test starts from a fixed seed.

Everything runs on the CPU (the data contract makes device a property of the inputs, so nothing here
depends on a GPU), except the `cuda` tier (test_cuda.py), which runs where a GPU is present. The trained `shapes` CLIP is loaded from its shipped checkpoint; when that file is
missing the tests that need it error with load_classifier's own FileNotFoundError.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch
from torch import nn

import cliplab
from cliplab._memory import malloc_environment
from cliplab.cli.reproduce import LONGEST_FIRST as NOTEBOOKS_LONGEST_FIRST

os.environ.setdefault("MPLBACKEND", "Agg")
# One intra-op thread: these models are tiny, and on a shared 2-core machine two OpenMP threads that
# compete with other processes make every forward pass 5-10x slower (measured: 0.4 s -> 3 s for a
# forward+backward of 200 Shapes images).
torch.set_num_threads(1)
# The same for the notebook kernels that nbval and `cliplab reproduce` start (they inherit this environment): the
# suite runs on two workers, and a kernel with one torch thread per core beside another busy process thrashes
# (a notebook measured 30x slower under load). torch reads these when a kernel imports it.
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")
# and they keep the memory a pass frees for the next pass, as `cliplab reproduce`'s kernels do (cliplab._memory); so do
# xdist's workers, started after this
os.environ.update(malloc_environment())
# nbval compares the notebooks' checked outputs with the committed ones, which are fp32 (`cliplab reproduce --update`
# pins it): their kernels inherit this, so that "auto" (bf16 where the CPU computes it) changes no digit of them
os.environ["CLIPLAB_PRECISION"] = "fp32"


# The longest test files, longest first (measured on 2 cores, one thread per worker): xdist hands whole files to its
# two workers in collection order (pyproject: --dist=loadfile --no-loadscope-reorder), so starting these first keeps
# one of them from starting last and running on alone at the end. The notebooks in `cliplab reproduce`'s order, the
# cifar100 smoke run (about 500 s) after the longest; the rest keep their order.
LONGEST_FIRST = (f"{NOTEBOOKS_LONGEST_FIRST[0]}.ipynb", "test_real_path.py",
                 *(f"{name}.ipynb" for name in NOTEBOOKS_LONGEST_FIRST[1:]))


def pytest_configure(config):
    """One directory where the notebooks of this test run share their worst-case evaluations, as those of one
    ``cliplab reproduce`` do (05 and 06 evaluate the original and FARE-full alike): made by the controlling process,
    before xdist starts its workers, which inherit the variable."""
    if not hasattr(config, "workerinput") and "CLIPLAB_TEST_EVALUATIONS" not in os.environ:
        os.environ["CLIPLAB_TEST_EVALUATIONS"] = config._cliplab_evaluations = tempfile.mkdtemp(prefix="cliplab-evaluations-")
    config.pluginmanager.register(_NotebooksShareEvaluations(), "cliplab-notebooks-share-evaluations")


class _NotebooksShareEvaluations:
    """A notebook's kernel, started before its first cell, shares the run's evaluations; tests in this process do not
    (one that counts an evaluation's passes must see it made). A plugin, not a hook of this conftest: a conftest's
    hooks reach only the items under its own directory, and the notebooks are not under tests/."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        if item.path.suffix == ".ipynb":
            os.environ["CLIPLAB_EVALUATION_CACHE"] = os.environ["CLIPLAB_TEST_EVALUATIONS"]
        else:
            os.environ.pop("CLIPLAB_EVALUATION_CACHE", None)


def pytest_unconfigure(config):
    if getattr(config, "_cliplab_evaluations", None):
        shutil.rmtree(config._cliplab_evaluations, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Mark nbval's notebook cells `notebooks`; put the longest files first; skip the `cuda` tier where there is no
    GPU, unless CLIPLAB_TEST_DEVICE points it at another device."""
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.notebooks)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: cells and tests keep their order
    if torch.cuda.is_available() or os.environ.get("CLIPLAB_TEST_DEVICE", "cuda") != "cuda":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (CLIPLAB_TEST_DEVICE=cpu runs the cuda tier on the CPU)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


# The models the tests share compute in fp32, on every machine: what a test checks to float rounding (against
# open_clip, torchattacks, AutoAttack) must not move with the CPU, and "auto" is bf16 on a CPU that computes it.
# Tests of the precision switch set it themselves.
FIXTURES_PRECISION = "fp32"


@pytest.fixture(autouse=True)
def _seed():
    """Same global RNG state at the start of every test, whatever ran before (order independence)."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shapes_clf():
    """The trained `shapes` profile's zero-shot classifier (tiny open_clip CLIP, 100 classes), eval mode.

    ``CLIPLAB_TEST_SHAPES_WEIGHTS=/path/to/candidate.safetensors`` runs the suite against a candidate
    checkpoint instead of the shipped one (e.g. before replacing it).
    """
    candidate = os.environ.get("CLIPLAB_TEST_SHAPES_WEIGHTS")
    if candidate:
        return cliplab.load_classifier("shapes", pretrained=candidate, device="cpu", precision=FIXTURES_PRECISION)
    return cliplab.load_classifier("shapes", device="cpu", precision=FIXTURES_PRECISION)


@pytest.fixture(scope="session")
def random_shapes_clf():
    """The `shapes` architecture, randomly initialised (seeded): no checkpoint needed."""
    torch.manual_seed(0)
    return cliplab.load_classifier("shapes", pretrained=None, device="cpu", precision=FIXTURES_PRECISION)


@pytest.fixture(scope="session")
def random_vit():
    """A randomly initialised (seeded) ViT-B-32 classifier on 10 CIFAR-100 classes and 3 prompts (a
    subset keeps the CPU text encoding short): the `cifar100` architecture without a download."""
    from cliplab.data import CIFAR100_CLASSES, CIFAR_TEMPLATES

    torch.manual_seed(0)
    return cliplab.load_classifier("ViT-B-32", pretrained=None, class_names=list(CIFAR100_CLASSES[:10]),
                                   templates=list(CIFAR_TEMPLATES[:3]), device="cpu", precision=FIXTURES_PRECISION)


@pytest.fixture(scope="session")
def shapes_test():
    """The first 1000 Shapes-100 test images: x (1000, 3, 32, 32) in [0, 1], y (1000,), class names."""
    return cliplab.load_dataset("shapes", split="test", n=1000)


@pytest.fixture(scope="session")
def shapes_pred(shapes_clf, shapes_test):
    """Predictions of the trained classifier on ``shapes_test``, computed once."""
    x, _, _ = shapes_test
    return cliplab.predict(shapes_clf, x)


@pytest.fixture(scope="session")
def batch(shapes_test):
    """16 test images and labels for the attack-contract tests."""
    x, y, _ = shapes_test
    return x[:16].clone(), y[:16].clone()


class ToyNet(nn.Module):
    """A tiny seeded conv net with dropout (so train/eval mode matters); 10 classes, no ``num_classes``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                                 nn.Linear(8 * 15 * 15, 10))

    def forward(self, x):
        return self.net(x)


@pytest.fixture()
def toy_model():
    return ToyNet().eval()


@pytest.fixture()
def held_lock():
    """``held_lock(out, what)``: another process holding ``run_lock`` on ``out`` for the block (a run in progress
    there); yields its pid."""
    import contextlib
    import subprocess
    import sys

    @contextlib.contextmanager
    def hold(out, what):
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path\n"
                                   "from cliplab._io import run_lock\n"
                                   "with run_lock(Path(sys.argv[1]), sys.argv[2]):\n"
                                   "    print('held', flush=True); time.sleep(120)", str(out), what],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            yield holder.pid
        finally:
            holder.kill()
            holder.wait()

    return hold

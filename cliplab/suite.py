"""The standard zero-shot suite (the sets the FARE paper and CLIP_benchmark report), read from torchvision's on-disk
formats, as (x, y, class_names) tensors in the data contract.

Class names and prompt templates come from maintained sources, not from lists written here: CLIP_benchmark's
``en_classnames.json`` and ``en_zeroshot_classification_templates.json`` (``pip install --no-deps clip-benchmark``),
the data set's own class names where CLIP_benchmark takes those (with its clean-ups), and open_clip's ImageNet
metadata. Nothing is downloaded: every set is read from ``root`` (``--data``), where torchvision's classes verify
the checksums they know, and a missing or damaged set is named with its path and where to get it.

Images stay at their native resolution where every image of a set shares it (CIFAR 32, EuroSAT 64, STL-10 and PCAM
96); the sets of photographs of many sizes are resized (shorter side, bicubic, antialiased) and centre-cropped to
``image_size`` (224), as CLIP's preprocessing does, and attacked at that resolution, as RobustVLM attacks them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import torch

from ._arguments import check_choice
from .data import CIFAR_URL, DATASETS, data_root, load_dataset, sample_indices

# how each set's class names are found: CLIP_benchmark's list, or the data set's own (cleaned as CLIP_benchmark
# cleans them)
CLIP_BENCHMARK, OWN_NAMES, OPEN_CLIP_IMAGENET = "clip_benchmark", "own", "open_clip"


@dataclass(frozen=True)
class SuiteSet:
    """One data set of the suite: how torchvision reads its test split and where its zero-shot prompts come from."""

    reader: str  # the torchvision.datasets class
    folder: str  # what it reads under the data root
    source: str  # where to get it (said when it is missing)
    options: dict = field(default_factory=dict)  # the reader's arguments for the test split
    native_size: int | None = None  # every image's size, or None: resized and centre-cropped to image_size
    names: str = OWN_NAMES  # CLIP_BENCHMARK, OWN_NAMES or OPEN_CLIP_IMAGENET
    drop_names: int = 0  # leading names of CLIP_benchmark's list the reader does not have (Caltech's background)
    needs: str | None = None  # a module the reader imports


SUITE = {
    "cifar10": SuiteSet("CIFAR10", "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                        {"train": False}, native_size=32),
    "cifar100": SuiteSet("CIFAR100", "cifar-100-python", CIFAR_URL, {"train": False}, native_size=32),
    "stl10": SuiteSet("STL10", "stl10_binary", "https://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
                      {"split": "test"}, native_size=96),
    "caltech101": SuiteSet("Caltech101", "caltech101/101_ObjectCategories",
                           "https://data.caltech.edu/records/mzrjq-6wc02 (caltech-101.zip, unpacked into caltech101/)",
                           {"target_type": "category"}, names=CLIP_BENCHMARK, drop_names=1),
    "flowers": SuiteSet("Flowers102", "flowers-102", "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
                        {"split": "test"}, names=CLIP_BENCHMARK),
    "pets": SuiteSet("OxfordIIITPet", "oxford-iiit-pet", "https://www.robots.ox.ac.uk/~vgg/data/pets/",
                     {"split": "test", "target_types": "category"}, names=CLIP_BENCHMARK),
    "food101": SuiteSet("Food101", "food-101", "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
                        {"split": "test"}),
    "dtd": SuiteSet("DTD", "dtd/dtd", "https://www.robots.ox.ac.uk/~vgg/data/dtd/ (unpacked into dtd/)",
                    {"split": "test"}),
    "eurosat": SuiteSet("EuroSAT", "eurosat/2750", "https://madm.dfki.de/files/sentinel/EuroSAT.zip (unpacked into "
                        "eurosat/)", native_size=64, names=CLIP_BENCHMARK),
    "fgvc_aircraft": SuiteSet("FGVCAircraft", "fgvc-aircraft-2013b",
                              "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/",
                              {"split": "test", "annotation_level": "variant"}),
    "cars": SuiteSet("StanfordCars", "stanford_cars", "the Stanford Cars files as torchvision's StanfordCars "
                     "documents them (devkit/, cars_test/, cars_test_annos_withlabels.mat)", {"split": "test"}),
    "pcam": SuiteSet("PCAM", "pcam", "https://github.com/basveeling/pcam (the test split's two .h5 files)",
                     {"split": "test"}, native_size=96, names=CLIP_BENCHMARK, needs="h5py"),
    "sun397": SuiteSet("SUN397", "SUN397", "https://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz"),
    "imagenet1k": SuiteSet("ImageFolder", "imagenet/val", "the ILSVRC-2012 validation images in one folder per "
                           "WordNet id (imagenet/val/n01440764/...)", names=OPEN_CLIP_IMAGENET),
}
IMAGE_SIZE = 224  # the side of the resized photographs (CLIP's input)


def suite_templates(name: str) -> list[str]:
    """The set's zero-shot prompt templates, each with one ``{}`` (CLIP_benchmark's; open_clip's for ImageNet)."""
    check_choice(name, "dataset", SUITE)
    if SUITE[name].names == OPEN_CLIP_IMAGENET:
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]
    return [t.replace("{c}", "{}") for t in _clip_benchmark("en_zeroshot_classification_templates.json")[name]]


def open_set(name: str, root: str | os.PathLike | None = None):
    """The torchvision data set of ``name``'s test split under ``root``, verified as torchvision verifies it.

    Raises:
        FileNotFoundError: the set is not under ``root`` (says what to put where).
        ValueError: its files are there but damaged (a checksum or a file torchvision cannot parse).
        ModuleNotFoundError: the reader needs a module that is not installed (PCAM: h5py).
    """
    import torchvision.datasets as readers

    check_choice(name, "dataset", SUITE)
    spec, root = SUITE[name], data_root(root)
    if spec.needs is not None and find_spec(spec.needs) is None:
        raise ModuleNotFoundError(f"dataset {name}: torchvision reads it with {spec.needs}, which is not installed "
                                  f"(pip install {spec.needs})")
    where = root / spec.folder
    if not where.exists():
        raise FileNotFoundError(f"dataset {name}: {where} does not exist. Get it from {spec.source} and put it under "
                                f"{root} (the --data directory), as torchvision's {spec.reader} reads it")
    try:
        if spec.reader == "ImageFolder":
            dataset = readers.ImageFolder(str(where))
        else:
            dataset = getattr(readers, spec.reader)(str(root), download=False, **spec.options)
        len(dataset)  # some readers open their files only here (PCAM's HDF5)
        return dataset
    except (RuntimeError, OSError, ValueError, KeyError, IndexError) as error:  # torchvision's "not found or corrupted"
        raise ValueError(f"dataset {name}: {where} is incomplete or damaged: torchvision's {spec.reader} cannot read "
                         f"it ({type(error).__name__}: {error}). Get it again from {spec.source}") from error


def suite_class_names(name: str, dataset) -> list[str]:
    """Readable class names of ``dataset`` (opened by ``open_set(name)``), in its label order."""
    spec = SUITE[name]
    if spec.names == OPEN_CLIP_IMAGENET:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        names = list(IMAGENET_CLASSNAMES)
    elif spec.names == CLIP_BENCHMARK:
        names = _clip_benchmark("en_classnames.json")[name][spec.drop_names:]
    else:
        names = [c.replace("_", " ").replace("/", " ").strip() for c in dataset.classes]
    own = _number_of_classes(dataset)
    if own is not None and own != len(names):
        raise ValueError(f"dataset {name}: its files have {own} classes where the class names list {len(names)}: "
                         "it is not the published data set")
    return names


def load_suite_set(name: str, root: str | os.PathLike | None = None, n: int | None = None, *, seed: int = 0,
                   image_size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``n`` test images of a suite set, drawn without replacement by a seeded permutation (``sample_indices``: test
    splits are often sorted by class, so the first ``n`` would be a few classes only). CIFAR-100 is the study's own
    set: ``data.load_dataset`` reads it, the same images for the same ``n`` and seed.

    Returns:
        x: (n, 3, H, W) float32 in [0, 1] (native size, or ``image_size`` square); y: (n,) int64; class names.
    """
    if name in DATASETS:
        open_set(name, root)  # missing or damaged: the suite's message, naming --data
        return load_dataset(name, "test", n, root, seed=seed)
    dataset = open_set(name, root)
    names = suite_class_names(name, dataset)
    chosen = sample_indices(len(dataset), n, seed)
    pictures = [_picture(dataset, int(i), SUITE[name].native_size, image_size, name) for i in chosen]
    x = torch.stack([p for p, _ in pictures]) if pictures else torch.empty(0, 3, image_size, image_size)
    return x, torch.tensor([label for _, label in pictures], dtype=torch.int64), names


def check_suite_images(name: str, root: str | os.PathLike | None = None, n: int | None = None, *,
                       seed: int = 0) -> None:
    """Open and decode every image ``load_suite_set(name, root, n, seed=seed)`` will read, without keeping them: a
    truncated or unreadable file is named (with its path where the set has files) before any model loads."""
    dataset = open_set(name, root)
    for index in sample_indices(len(dataset), n, seed).tolist():
        image, _ = _read(dataset, index, name)
        _check_size(image, dataset, index, name)


def _picture(dataset, index: int, native_size: int | None, image_size: int, name: str) -> tuple[torch.Tensor, int]:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    image, label = _read(dataset, index, name)
    _check_size(image, dataset, index, name)
    image = image.convert("RGB")
    if native_size is None:
        image = TF.center_crop(TF.resize(image, image_size, InterpolationMode.BICUBIC, antialias=True), image_size)
    return TF.pil_to_tensor(image).float().div(255), int(label)


def _read(dataset, index: int, name: str):
    """``dataset[index]`` with its pixels decoded (PIL opens lazily), or an error naming the set, the image and its
    file."""
    try:
        image, label = dataset[index]
        image.load()
    except OSError as error:  # a truncated or unreadable image file
        path = _image_file(dataset, index)
        raise ValueError(f"dataset {name}: image {index}{f' ({path})' if path else ''} cannot be read "
                         f"({error})") from None
    return image, label


def _check_size(image, dataset, index: int, name: str) -> None:
    """Every image of a set of one size (CIFAR 32, EuroSAT 64, STL-10 and PCAM 96) is that size: another is named,
    before any work, rather than stacked with the others."""
    size = SUITE[name].native_size
    if size is not None and image.size != (size, size):
        path = _image_file(dataset, index)
        raise ValueError(f"dataset {name}: image {index}{f' ({path})' if path else ''} is {image.size[0]}x"
                         f"{image.size[1]}, where every image of {name} is {size}x{size}: the set is not the published "
                         "one")


def _image_file(dataset, index: int) -> str | None:
    """The file of image ``index`` where torchvision's class keeps one (image folders and file lists)."""
    for attribute in ("samples", "imgs", "_samples", "_image_files", "_images"):
        files = getattr(dataset, attribute, None)
        if isinstance(files, (list, tuple)) and index < len(files):
            entry = files[index]
            return str(entry[0] if isinstance(entry, (list, tuple)) else entry)
    folder = getattr(dataset, "_base_folder", None)  # a set in a few large files (PCAM's HDF5): their folder
    return f"in {folder}" if folder is not None else None


def _number_of_classes(dataset) -> int | None:
    """How many classes the set's own files name (None where torchvision keeps no list: Flowers102, PCAM)."""
    own = getattr(dataset, "categories", None) or getattr(dataset, "classes", None)
    return None if own is None else len(own)


def _clip_benchmark(filename: str) -> dict[str, list[str]]:
    """One of CLIP_benchmark's JSON files of class names or templates, from the installed package."""
    spec = find_spec("clip_benchmark")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the zero-shot suite's class names and prompts come from CLIP_benchmark, which is "
                                  "not installed: pip install --no-deps clip-benchmark")
    return json.loads((Path(spec.origin).parent / "datasets" / filename).read_text())

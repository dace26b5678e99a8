"""Stand-ins for the zero-shot suite's data sets, each in the on-disk format torchvision's reader of it expects: a few
random images per class, written by ``write(name, root)``. Where torchvision verifies published checksums (CIFAR,
STL-10, Flowers102) the writer returns the stand-in's own, as ``{reader class: {attribute: value}}``, which
``accept_checksums`` sets for one test: torchvision still verifies every file, against these."""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

# classes a stand-in has where the class names come from the data set's own files
OWN_CLASSES = ("red_thing", "blue_thing", "green_thing")


def write(name: str, root: Path, per_class: int = 2, seed: int = 0) -> dict:
    """Write the stand-in of suite set ``name`` under ``root``; return the checksums torchvision must accept."""
    rng = np.random.default_rng(seed)
    return WRITERS[name](Path(root), per_class, rng) or {}


def accept_checksums(monkeypatch, patches: dict) -> None:
    """In this process, for this test: torchvision verifies the stand-ins against their own checksums."""
    import torchvision.datasets as readers

    for reader, attributes in patches.items():
        for attribute, value in attributes.items():
            monkeypatch.setattr(getattr(readers, reader), attribute, value)


def checksum_source(patches: dict) -> str:
    """Python source that applies ``patches`` (for a subprocess: ``sitecustomize.py``)."""
    lines = ["import torchvision.datasets as readers"]
    lines += [f"setattr(readers.{reader}, {attribute!r}, {value!r})"
              for reader, attributes in patches.items() for attribute, value in attributes.items()]
    return "\n".join(lines) + "\n"


def _jpeg(path: Path, rng, size: tuple[int, int] | None = None) -> None:
    width, height = size or (int(rng.integers(24, 60)), int(rng.integers(24, 60)))  # photographs of many sizes
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=90)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _pickle(path: Path, entry: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def _cifar10(root, per_class, rng):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels = [c for c in range(10) for _ in range(per_class)]
    for part in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _pickle(folder / part, {"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), "labels": labels})
    _pickle(folder / "batches.meta", {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                      "horse", "ship", "truck"]})
    return {"CIFAR10": {"train_list": [[f"data_batch_{i}", _md5(folder / f"data_batch_{i}")] for i in range(1, 6)],
                        "test_list": [["test_batch", _md5(folder / "test_batch")]],
                        "meta": {"filename": "batches.meta", "key": "label_names",
                                 "md5": _md5(folder / "batches.meta")}}}


def _cifar100(root, per_class, rng):
    from standins import write_cifar100

    labels = [c for c in range(100) for _ in range(per_class)]
    md5 = write_cifar100(root, {"train": labels, "test": labels}, seed=int(rng.integers(1000)))
    return {"CIFAR100": {"train_list": [["train", md5["train"]]], "test_list": [["test", md5["test"]]],
                         "meta": {"filename": "meta", "key": "fine_label_names", "md5": md5["meta"]}}}


def _stl10(root, per_class, rng):
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    labels = np.array([c + 1 for c in range(10) for _ in range(per_class)], dtype=np.uint8)  # 1-based, as STL-10's
    for split in ("train", "test"):
        rng.integers(0, 256, (len(labels), 3, 96, 96), dtype=np.uint8).tofile(folder / f"{split}_X.bin")
        labels.tofile(folder / f"{split}_y.bin")
    np.zeros((0, 3, 96, 96), dtype=np.uint8).tofile(folder / "unlabeled_X.bin")
    (folder / "class_names.txt").write_text("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse",
                                                       "monkey", "ship", "truck"]) + "\n")
    listed = lambda *parts: [[part, _md5(folder / part)] for part in parts]  # noqa: E731
    return {"STL10": {"train_list": listed("train_X.bin", "train_y.bin", "unlabeled_X.bin"),
                      "test_list": listed("test_X.bin", "test_y.bin")}}


def _caltech101(root, per_class, rng):
    folder = root / "caltech101" / "101_ObjectCategories"
    for category in ["BACKGROUND_Google"] + [f"category_{c:03d}" for c in range(101)]:
        for i in range(per_class):
            _jpeg(folder / category / f"image_{i + 1:04d}.jpg", rng)


def _flowers(root, per_class, rng):
    from scipy.io import savemat

    folder = root / "flowers-102"
    labels = [c + 1 for c in range(102) for _ in range(per_class)]
    for i in range(len(labels)):
        _jpeg(folder / "jpg" / f"image_{i + 1:05d}.jpg", rng)
    savemat(folder / "imagelabels.mat", {"labels": np.array(labels)})
    ids = np.arange(1, len(labels) + 1)
    savemat(folder / "setid.mat", {"trnid": ids[:1], "valid": ids[1:2], "tstid": ids})
    return {"Flowers102": {"_file_dict": {"image": ("102flowers.tgz", "unused"),
                                          "label": ("imagelabels.mat", _md5(folder / "imagelabels.mat")),
                                          "setid": ("setid.mat", _md5(folder / "setid.mat"))}}}


def _pets(root, per_class, rng):
    from cliplab.suite import _clip_benchmark

    folder = root / "oxford-iiit-pet"
    lines = []
    for label, breed in enumerate(_clip_benchmark("en_classnames.json")["pets"]):
        stem = breed.replace(" ", "_") if breed[0].isupper() else breed.lower().replace(" ", "_")
        for i in range(per_class):
            _jpeg(folder / "images" / f"{stem}_{i + 1}.jpg", rng)
            lines.append(f"{stem}_{i + 1} {label + 1} 1 1")
    (folder / "annotations").mkdir(parents=True)
    (folder / "annotations" / "test.txt").write_text("\n".join(lines) + "\n")


def _food101(root, per_class, rng):
    folder = root / "food-101"
    (folder / "meta").mkdir(parents=True)
    (folder / "meta" / "classes.txt").write_text("\n".join(OWN_CLASSES) + "\n")
    split = {c: [f"{c}/{i + 1}" for i in range(per_class)] for c in OWN_CLASSES}
    (folder / "meta" / "test.json").write_text(json.dumps(split))
    for stems in split.values():
        for stem in stems:
            _jpeg(folder / "images" / f"{stem}.jpg", rng)


def _dtd(root, per_class, rng):
    folder = root / "dtd" / "dtd"
    files = [f"{c}/{c}_{i + 1:04d}.jpg" for c in OWN_CLASSES for i in range(per_class)]
    for file in files:
        _jpeg(folder / "images" / file, rng)
    (folder / "labels").mkdir(parents=True)
    (folder / "labels" / "test1.txt").write_text("\n".join(files) + "\n")


def _eurosat(root, per_class, rng):
    for c in ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
              "Residential", "River", "SeaLake"):  # EuroSAT's folders, in CLIP_benchmark's order of their names
        for i in range(per_class):
            _jpeg(root / "eurosat" / "2750" / c / f"{c}_{i + 1}.jpg", rng, size=(64, 64))


def _fgvc_aircraft(root, per_class, rng):
    folder = root / "fgvc-aircraft-2013b" / "data"
    variants = [c.replace("_", "-") for c in OWN_CLASSES]
    (folder / "images").mkdir(parents=True)
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    lines = []
    for k, variant in enumerate(variants):
        for i in range(per_class):
            image = f"{1000 * k + i:07d}"
            _jpeg(folder / "images" / f"{image}.jpg", rng)
            lines.append(f"{image} {variant}")
    (folder / "images_variant_test.txt").write_text("\n".join(lines) + "\n")


def _cars(root, per_class, rng):
    from scipy.io import savemat

    folder = root / "stanford_cars"
    (folder / "devkit").mkdir(parents=True)
    savemat(folder / "devkit" / "cars_meta.mat", {"class_names": np.array(OWN_CLASSES, dtype=object)})
    records = np.zeros(len(OWN_CLASSES) * per_class, dtype=[("fname", "O"), ("class", "O")])
    for j, (k, i) in enumerate((k, i) for k in range(len(OWN_CLASSES)) for i in range(per_class)):
        records[j] = (f"{j + 1:05d}.jpg", k + 1)
        _jpeg(folder / "cars_test" / f"{j + 1:05d}.jpg", rng)
    savemat(folder / "cars_test_annos_withlabels.mat", {"annotations": records})


def _pcam(root, per_class, rng):
    import h5py

    folder = root / "pcam"
    folder.mkdir(parents=True)
    labels = np.array([c for c in range(2) for _ in range(per_class)], dtype=np.uint8)
    with h5py.File(folder / "camelyonpatch_level_2_split_test_x.h5", "w") as file:
        file["x"] = rng.integers(0, 256, (len(labels), 96, 96, 3), dtype=np.uint8)
    with h5py.File(folder / "camelyonpatch_level_2_split_test_y.h5", "w") as file:
        file["y"] = labels.reshape(-1, 1, 1, 1)


def _sun397(root, per_class, rng):
    folder = root / "SUN397"
    classes = [f"/{c[0]}/{c}" for c in OWN_CLASSES]
    for c in classes:
        for i in range(per_class):
            _jpeg(folder / c.strip("/") / f"sun_{i + 1:04d}.jpg", rng)
    (folder / "ClassName.txt").write_text("\n".join(classes) + "\n")


def _imagenet1k(root, per_class, rng):
    for k in range(1000):  # one folder per WordNet id, sorted as the real ones are
        for i in range(per_class):
            _jpeg(root / "imagenet" / "val" / f"n{k:08d}" / f"ILSVRC2012_val_{k * per_class + i + 1:08d}.JPEG", rng,
                  size=(24, 20))


WRITERS = {"cifar10": _cifar10, "cifar100": _cifar100, "stl10": _stl10, "caltech101": _caltech101,
           "flowers": _flowers, "pets": _pets, "food101": _food101, "dtd": _dtd, "eurosat": _eurosat,
           "fgvc_aircraft": _fgvc_aircraft, "cars": _cars, "pcam": _pcam, "sun397": _sun397,
           "imagenet1k": _imagenet1k}


def write_hub_model(hf_home: Path, repo_id: str, model_config: dict, weights: Path) -> None:
    """A model in a local Hugging Face hub cache, laid out as the hub lays it out (``hub/models--ORG--NAME/`` with
    ``refs/main`` naming a snapshot), holding what open_clip reads from a hub model: ``open_clip_config.json`` and
    ``open_clip_model.safetensors``."""
    import shutil

    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_config, "preprocess_cfg": {}}))
    shutil.copyfile(weights, snapshot / "open_clip_model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

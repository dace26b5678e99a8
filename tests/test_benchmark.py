"""``cliplab benchmark`` and the zero-shot suite it reads: every set in its real on-disk format (stand-ins written by
``suite_standins``, read by torchvision's own classes), damaged or missing sets named before any model loads, and the
grid run end to end as a user runs it (a random ViT-B-32 from a local file, a hub model from a local hub cache with
``HF_HUB_OFFLINE=1``), resumed after kill -9 with identical results."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import suite_standins
import cliplab
from cliplab import suite
from cliplab.evaluation import ThreatModel
from cliplab.study.benchmark import ModelSpec

SHAPES_CONFIG = Path(suite.__file__).parent / "model_configs" / "cliplab-shapes-tiny.json"
SHAPES_WEIGHTS = Path(suite.__file__).parent / "weights" / "cliplab-shapes-tiny.safetensors"
GRID = ("cifar10", "eurosat", "dtd")  # three formats: pickled batches (checksummed), an image folder, a split file


@pytest.mark.parametrize("name", list(suite.SUITE))
def test_every_suite_set_is_read_from_its_torchvision_format(name, tmp_path, monkeypatch):
    if suite.SUITE[name].needs:
        pytest.importorskip(suite.SUITE[name].needs)
    suite_standins.accept_checksums(monkeypatch, suite_standins.write(name, tmp_path))
    x, y, names = suite.load_suite_set(name, tmp_path, n=4, seed=1)
    size = suite.SUITE[name].native_size or suite.IMAGE_SIZE
    assert x.shape == (4, 3, size, size) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64 and ((0 <= y) & (y < len(names))).all()
    templates = suite.suite_templates(name)
    assert templates and all(t.count("{}") == 1 for t in templates)
    again, _, _ = suite.load_suite_set(name, tmp_path, n=4, seed=1)
    assert torch.equal(x, again)  # the seeded sample is the same every time


def test_evaluate_and_benchmark_judge_a_model_on_the_same_cifar100_images(tmp_path, monkeypatch):
    """``cliplab evaluate --dataset cifar100`` (the report, through ``data.load_dataset``) and ``cliplab benchmark
    --datasets cifar100`` (the suite) read the same images for the same n and seed: one reader, one sampling rule.
    (Before, the report took the first n images and the benchmark a seeded sample.)"""
    from cliplab import data, models
    from cliplab.study import report
    from cliplab.study.profiles import Runtime

    suite_standins.accept_checksums(monkeypatch, suite_standins.write("cifar100", tmp_path))
    monkeypatch.setenv("CLIPLAB_OFFLINE", "1")
    read, load_dataset = {}, data.load_dataset

    def stop_after_the_data(*args, **kwargs):
        raise StopIteration  # what the report read is all this test needs

    monkeypatch.setattr(models, "load_classifier", stop_after_the_data)
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: read.setdefault("report", load_dataset(*a, **k)))
    for n, seed in ((5, 0), (7, 3)):
        read.clear()
        with pytest.raises(StopIteration):
            report.evaluate(report.ReportSettings(dataset="cifar100", n=n, seed=seed,
                                                  runtime=Runtime(device="cpu", data_root=str(tmp_path))))
        x, y, names = suite.load_suite_set("cifar100", tmp_path, n=n, seed=seed)
        assert torch.equal(read["report"][0], x) and torch.equal(read["report"][1], y), (n, seed)
        assert read["report"][2] == names


def test_class_names_and_templates_come_from_their_maintained_sources(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    suite_standins.write("eurosat", tmp_path)
    names = suite.suite_class_names("eurosat", suite.open_set("eurosat", tmp_path))
    assert names == suite._clip_benchmark("en_classnames.json")["eurosat"] and names[0] == "annual crop land"
    assert suite.suite_templates("cifar10")[0] == "a photo of a {}." and len(suite.suite_templates("cifar10")) == 18
    assert suite.suite_templates("imagenet1k")[0] == "a bad photo of a {}." and len(IMAGENET_CLASSNAMES) == 1000


def test_a_missing_or_damaged_set_is_named_with_its_path(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'food-101'} does not exist.*food-101.tar.gz"):
        suite.open_set("food101", tmp_path)
    suite_standins.write("cifar10", tmp_path)  # its checksums are not the published ones, and are not accepted here
    with pytest.raises(ValueError, match="cifar-10-batches-py is incomplete or damaged"):
        suite.open_set("cifar10", tmp_path)
    suite_standins.write("dtd", tmp_path)
    for image in (tmp_path / "dtd").rglob("*.jpg"):
        image.write_bytes(image.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match=rf"dataset dtd: image \d+ \({tmp_path / 'dtd'}/.*\.jpg\) cannot be read"):
        suite.load_suite_set("dtd", tmp_path, n=2)
    with pytest.raises(ValueError, match=r"dataset dtd: image \d+ .* cannot be read"):
        suite.check_suite_images("dtd", tmp_path, n=2)
    with pytest.raises(ValueError, match="n must be at most 6"):
        suite.load_suite_set("dtd", tmp_path, n=7)


def test_a_reader_that_needs_a_missing_module_says_which(tmp_path, monkeypatch):
    monkeypatch.setitem(suite.SUITE, "pcam", replace(suite.SUITE["pcam"], needs="no_such_module_here"))
    with pytest.raises(ModuleNotFoundError, match="dataset pcam: .* no_such_module_here, which is not installed"):
        suite.open_set("pcam", tmp_path)


def test_model_specs():
    assert ModelSpec.parse("ViT-B-32:openai") == ModelSpec("ViT-B-32:openai", "ViT-B-32", "openai")
    assert ModelSpec.parse("fare=hf-hub:chs20/fare2-clip") == ModelSpec("fare", "hf-hub:chs20/fare2-clip")
    spec = ModelSpec.parse("mine=shapes+runs/fare/encoder.safetensors")
    assert (spec.label, spec.name, spec.pretrained, spec.encoder) == ("mine", "shapes", None,
                                                                        "runs/fare/encoder.safetensors")
    assert ModelSpec.parse("ViT-B-32:/ckpt/final.safetensors").slug == "ViT-B-32_ckpt_final.safetensors"
    with pytest.raises(ValueError, match="names no model"):
        ModelSpec.parse(":openai")
    with pytest.raises(ValueError, match="'shapes:' names no weights after ':'"):
        ModelSpec.parse("shapes:")


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The three stand-in sets under one --data, a local hub cache holding the shapes CLIP as a hub model, and a
    sitecustomize that makes torchvision accept the stand-ins' checksums in a ``cliplab`` subprocess."""
    root = tmp_path_factory.mktemp("grid")
    patches = {}
    for name in GRID:
        patches.update(suite_standins.write(name, root / "data", per_class=2))
    suite_standins.write_hub_model(root / "hf", "cliplab/shapes-tiny", json.loads(SHAPES_CONFIG.read_text()),
                                   SHAPES_WEIGHTS)
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(suite_standins.checksum_source(patches))
    return root


def benchmark_command(grid: Path, models: str, out: Path, *extra: str) -> tuple[list[str], dict]:
    command = [sys.executable, "-m", "cliplab", "benchmark", "--models", models, "--datasets", ",".join(GRID),
               "--data", str(grid / "data"), "--eps", "2/255,4/255", "--steps", "3", "--targets", "1", "--queries",
               "4", "--batch-size", "4", "--single-template", "--device", "cpu", "--out", str(out), "--quiet", *extra]
    env = {**os.environ, "HF_HOME": str(grid / "hf"), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(grid / "site"), os.environ.get("PYTHONPATH", "")])}
    return command, env


@pytest.mark.slow
def test_the_grid_end_to_end_with_a_local_vit_and_a_hub_model(grid, tmp_path):
    """Two models x three data sets, as a user runs it offline: the Markdown table, the CSV and the figure."""
    import open_clip

    import cliplab

    weights = tmp_path / "ViT-B-32-random.safetensors"
    cliplab.save_weights(open_clip.create_model("ViT-B-32"), weights, dtype=torch.float16)
    models = f"vit=ViT-B-32:{weights},hub=hf-hub:cliplab/shapes-tiny"
    command, env = benchmark_command(grid, models, tmp_path / "out", "--n", "4")
    job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "cells").iterdir()) == sorted(f"{m}--{d}.json" for m in ("vit", "hub")
                                                                       for d in GRID)
    assert job.stdout.count("| vit |") == 2 and job.stdout.count("| hub |") == 2  # a table per radius
    assert (out / "benchmark.md").read_text().strip() in job.stdout
    rows = list(csv.DictReader((out / "benchmark.csv").open()))
    assert len(rows) == 2 * 3 * 2 and {r["n"] for r in rows} == {"4"}
    assert all(float(r["robust"]) <= float(r["clean"]) for r in rows)
    assert (out / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "text-heads").glob("*.safetensors"))) == 6


@pytest.mark.slow
def test_a_run_killed_mid_grid_resumes_to_the_uninterrupted_results(grid, tmp_path):
    models = "shapes,hub=hf-hub:cliplab/shapes-tiny"
    command, env = benchmark_command(grid, models, tmp_path / "whole", "--n", "6")
    assert subprocess.run(command, env=env, capture_output=True, timeout=300).returncode == 0
    command, env = benchmark_command(grid, models, tmp_path / "killed", "--n", "6")
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cells = tmp_path / "killed" / "cells"
    while job.poll() is None and not (cells.is_dir() and any(cells.glob("*.json"))):
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait()
    finished = len(list(cells.glob("*.json")))
    assert 1 <= finished < 6, "the run was not killed mid-grid"
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("(resumed)") == finished
    assert (tmp_path / "killed" / "benchmark.csv").read_text() == (tmp_path / "whole" / "benchmark.csv").read_text()


def test_cells_made_with_other_settings_are_refused_before_any_model_loads(grid, tmp_path):
    command, env = benchmark_command(grid, "shapes", tmp_path / "out", "--n", "2")
    assert subprocess.run(command, env=env, capture_output=True, timeout=300).returncode == 0
    again = subprocess.run([*command, "--seed", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "made with other settings: " in again.stderr
    assert again.stderr.count("(seed differ)") == len(GRID)  # every stale cell named at once
    command, env = benchmark_command(grid, "x=hf-hub:cliplab/missing", tmp_path / "other", "--n", "2")
    missing = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "hf-hub:cliplab/missing" in missing.stderr and "offline" in missing.stderr


@pytest.mark.slow
def test_a_cell_and_a_text_head_belong_to_the_weights_not_to_their_path(grid, tmp_path):
    """Other weights behind the same path and label: the cells made with the old ones are refused, naming the
    weights; once deleted, the cells are evaluated again with a text head of the new weights, as a fresh --out
    evaluates them (the old text head, kept under the label, is not reused)."""
    import shutil

    import cliplab

    checkpoint = tmp_path / "mine.safetensors"
    shutil.copy(SHAPES_WEIGHTS, checkpoint)
    command, env = benchmark_command(grid, f"mine=shapes:{checkpoint}", tmp_path / "out", "--n", "2")
    assert subprocess.run(command, env=env, capture_output=True, timeout=300).returncode == 0
    torch.manual_seed(1)
    cliplab.save_weights(cliplab.load_classifier("shapes", pretrained=None, device="cpu"), checkpoint)
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "(weights_sha256 differ)" in again.stderr, again.stderr[-2000:]
    for cell in (tmp_path / "out" / "cells").glob("*.json"):  # as the refusal advises
        cell.unlink()
    assert subprocess.run(command, env=env, capture_output=True, timeout=300).returncode == 0
    fresh_command, _ = benchmark_command(grid, f"mine=shapes:{checkpoint}", tmp_path / "fresh", "--n", "2")
    assert subprocess.run(fresh_command, env=env, capture_output=True, timeout=300).returncode == 0
    assert (tmp_path / "out" / "benchmark.csv").read_text() == (tmp_path / "fresh" / "benchmark.csv").read_text()


def test_every_data_set_is_checked_before_any_model_loads(tmp_path, monkeypatch):
    from cliplab.study import benchmark

    suite_standins.write("eurosat", tmp_path / "data")  # 10 classes x 2 images
    suite_standins.write("dtd", tmp_path / "data")  # 3 classes x 2 images
    settings = benchmark.BenchmarkSettings(models=(ModelSpec.parse("shapes"),), datasets=("eurosat", "dtd"), n=8,
                                           threat=ThreatModel((2 / 255, 4 / 255),
                                                              budget=cliplab.AttackBudget(num_targets=2)),
                                           runtime=benchmark.Runtime(data_root=str(tmp_path / "data")))
    monkeypatch.setattr("cliplab.models.check_weights", lambda *a, **k: pytest.fail("a model was checked first"))
    with pytest.raises(ValueError, match="n must be at most 6, the size of dtd's test split, got 8"):
        benchmark.check(settings, tmp_path / "out")
    for image in (tmp_path / "data" / "dtd").rglob("*.jpg"):
        image.write_bytes(image.read_bytes()[:40])  # the second set's images truncated
    with pytest.raises(ValueError, match=rf"dataset dtd: image \d+ \({tmp_path / 'data' / 'dtd'}/.*jpg\) cannot be"):
        benchmark.check(replace(settings, n=6), tmp_path / "out")


def test_an_out_with_files_the_user_had_or_another_run_in_it_is_refused(tmp_path):
    """A benchmark writes nothing over benchmark.md/.csv/.png that it did not write (an --out no run has locked), and
    a second run into one --out is refused at once, naming the run that holds it."""
    import threading

    from cliplab.study import benchmark
    from cliplab._io import RunLocked, run_lock

    settings = benchmark.BenchmarkSettings(models=(ModelSpec.parse("shapes"),), datasets=("cifar10",))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "benchmark.csv").write_text("my own table\n")
    with pytest.raises(FileExistsError, match=r"holds benchmark.csv, which no benchmark run wrote there"):
        benchmark.run(settings, tmp_path / "mine")
    assert (tmp_path / "mine" / "benchmark.csv").read_text() == "my own table\n"

    held, release = threading.Event(), threading.Event()

    def another_run():
        with run_lock(tmp_path / "busy", "benchmark run"):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=another_run)
    thread.start()
    try:
        held.wait(30)
        with pytest.raises(RunLocked, match=rf"in use by another benchmark run \(pid {os.getpid()}\)"):
            benchmark.run(settings, tmp_path / "busy", checked=True)
    finally:
        release.set()
        thread.join()


@pytest.mark.slow
def test_a_two_class_set_evaluates_with_the_default_budget(tmp_path):
    """PCAM has 2 classes: with the default 9 targets the ensemble fits itself (1 target, the targeted
    cross-entropy) and the table says what ran."""
    patches = suite_standins.write("pcam", tmp_path / "data", per_class=3)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(suite_standins.checksum_source(patches))
    command = [sys.executable, "-m", "cliplab", "benchmark", "--models", "shapes", "--datasets", "pcam", "--data",
               str(tmp_path / "data"), "--n", "6", "--steps", "3", "--queries", "4", "--single-template",
               "--device", "cpu", "--out", str(tmp_path / "out"), "--quiet"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "pcam has 2 classes: the ensemble ran as apgd-ce, apgd-t-ce (1 target), square" in job.stdout
    cell = json.loads((tmp_path / "out" / "cells" / "shapes--pcam.json").read_text())
    assert cell["ensemble"] == {"attacks": ["apgd-ce", "apgd-t-ce", "square"], "num_targets": 1}


def test_every_folder_a_benchmark_writes_in_is_probed_before_it_runs(tmp_path, monkeypatch):
    from cliplab.study import benchmark

    probed = []
    monkeypatch.setattr(benchmark, "check_directory", lambda path, name: probed.append(Path(path)))
    settings = benchmark.BenchmarkSettings(models=(ModelSpec.parse("shapes"),), datasets=("cifar10",))
    monkeypatch.setattr("cliplab.suite.open_set", lambda *a, **k: pytest.fail("a data set was read first"))
    with pytest.raises(pytest.fail.Exception):
        benchmark.check(settings, tmp_path / "out")
    assert probed == [tmp_path / "out", tmp_path / "out" / "cells", tmp_path / "out" / "text-heads"]


def test_labels_are_checked_where_they_are_written():
    """A label names a row and its files: other characters, or a label too long for a file name, are refused as
    what they are; a long path given as the label makes a short file name; two labels of one file name are refused."""
    from cliplab.study import benchmark

    for label in ("my model", "a/b", "x" * 101):
        with pytest.raises(ValueError, match=r"may use letters, digits, '_', '.' and '-' only, at most 100"):
            ModelSpec.parse(f"{label}=shapes")
    long_path = ModelSpec.parse("ViT-B-32:/" + "d" * 300 + "/final.safetensors")
    assert len(long_path.slug) <= 100 and long_path.slug != ModelSpec.parse("ViT-B-32:/" + "d" * 301).slug
    twins = (ModelSpec.parse("ViT-B-32:/a/b.safetensors"), ModelSpec.parse("ViT-B-32:/a_b.safetensors"))
    with pytest.raises(ValueError, match="would share the files ViT-B-32_a_b.safetensors--"):
        benchmark.check(benchmark.BenchmarkSettings(models=twins, datasets=("cifar10",)), "/tmp/unused-out")


def test_a_damaged_text_head_is_computed_again(tmp_path):
    from cliplab.study import benchmark

    path = tmp_path / "text-heads" / "shapes--cifar10.safetensors"
    benchmark._write_text_head(path, torch.ones(3, 4), "key")
    assert torch.equal(benchmark._read_text_head(path, "key"), torch.ones(3, 4))
    assert benchmark._read_text_head(path, "other key") is None
    path.write_bytes(path.read_bytes()[:20])  # truncated
    assert benchmark._read_text_head(path, "key") is None


def test_a_truncated_hub_model_is_named_without_a_traceback(grid, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(SHAPES_WEIGHTS.read_bytes()[:1000])
    suite_standins.write_hub_model(grid / "hf", "cliplab/truncated", json.loads(SHAPES_CONFIG.read_text()), truncated)
    command, env = benchmark_command(grid, "x=hf-hub:cliplab/truncated", tmp_path / "out", "--n", "2")
    job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 2 and "Traceback" not in job.stderr, job.stderr[-2000:]
    assert "hf-hub:cliplab/truncated cannot be loaded from its cached weights" in job.stderr
    assert "open_clip_model.safetensors" in job.stderr


def test_a_second_benchmark_into_the_same_out_is_refused_before_its_checks(tmp_path, held_lock, capsys):
    """The lock comes first: a second run is told the directory is in use, not that the running one's cells were
    made with other settings and should be deleted."""
    from cliplab.cli import main

    out = tmp_path / "out"
    (out / "cells").mkdir(parents=True)
    (out / "cells" / "shapes--dtd.json").write_text('{"settings": {"n": 6}}')  # the running one's first cell
    with held_lock(out, "benchmark run") as pid:
        assert main(["benchmark", "--models", "shapes", "--datasets", "dtd", "--n", "4", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"is in use by another benchmark run (pid {pid})" in error and "other settings" not in error


def test_files_a_user_had_are_never_replaced_even_beside_an_empty_cells_folder(tmp_path, capsys):
    from cliplab.cli import main

    out = tmp_path / "out"
    (out / "cells").mkdir(parents=True)
    (out / "benchmark.md").write_text("my notes")
    assert main(["benchmark", "--models", "shapes", "--datasets", "dtd", "--out", str(out)]) == 2
    assert "holds benchmark.md, which no benchmark run wrote there" in capsys.readouterr().err
    assert (out / "benchmark.md").read_text() == "my notes"


def test_an_image_of_another_size_in_a_set_of_one_size_is_named_before_any_work(tmp_path, monkeypatch):
    """EuroSAT's images are all 64x64: one of 30x30 is named with its file by the check (it used to be resized to 224
    and fail to stack with the others, after the sets before it were evaluated)."""
    from PIL import Image

    suite_standins.write("eurosat", tmp_path)
    odd = sorted((tmp_path / "eurosat").rglob("*.jpg"))[0]
    Image.new("RGB", (30, 30)).save(odd)
    for call in (lambda: suite.check_suite_images("eurosat", tmp_path), lambda: suite.load_suite_set("eurosat", tmp_path)):
        with pytest.raises(ValueError, match=rf"dataset eurosat: image \d+ \({odd}\) is 30x30, where every image of "
                                             r"eurosat is 64x64"):
            call()


def test_a_truncated_pcam_file_is_named_as_damaged(tmp_path, monkeypatch):
    pytest.importorskip("h5py")
    suite_standins.accept_checksums(monkeypatch, suite_standins.write("pcam", tmp_path))
    images = next((tmp_path / "pcam").glob("*_x.h5"))
    images.write_bytes(images.read_bytes()[:len(images.read_bytes()) // 2])
    with pytest.raises(ValueError, match=f"dataset pcam: {tmp_path / 'pcam'} is incomplete or damaged"):
        suite.open_set("pcam", tmp_path)

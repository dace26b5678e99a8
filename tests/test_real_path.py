"""The real study's path, proven offline: `cliplab reproduce --profile cifar100 --smoke` executes every cell of
all seven notebooks with OpenAI CLIP's architecture (ViT-B-32, randomly initialised and saved to a local file,
loaded through --pretrained PATH) on a CIFAR-100 stand-in in torchvision's on-disk format (read by
torchvision's CIFAR100 through --data DIR); bad weights or data fail within seconds, before any notebook runs."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
import torch

import cliplab
from cliplab.cli import main
from cliplab._torch import cpu_has_bf16
from cliplab.cli import reproduce as runner
from cliplab.data import sample_indices
from standins import accept_checksums, kernel_startup, relabel, write_cifar100

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# the stand-in (a ViT-B-32 built, saved and run over the data to label it) takes seconds before any test starts
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """Local ViT-B-32 weights and a CIFAR-100 stand-in whose test labels are the stand-in model's own
    predictions (of the smoke profile's classifier), so that the attacks have correctly classified images
    to work on, as with real weights."""
    import open_clip

    root = tmp_path_factory.mktemp("standin")
    torch.manual_seed(0)
    weights = root / "ViT-B-32-random.safetensors"
    cliplab.save_weights(open_clip.create_model("ViT-B-32"), weights, dtype=torch.float16)
    write_cifar100(root / "data", {"train": torch.randint(100, (32,)).tolist(), "test": [0] * 16})
    with pytest.MonkeyPatch.context() as patch:
        accept_checksums(patch, relabel(root / "data", "test", [0] * 16))
        profile = cliplab.get_profile("cifar100", device="cpu", smoke=True, weights=weights, data_root=root / "data")
        x, _, _ = profile.load_dataset("test")  # in the seeded order every command reads
        predictions = cliplab.predict(profile.load_classifier(), x)
    labels = torch.empty_like(predictions)
    labels[sample_indices(len(x), None)] = predictions  # back to the file's order
    md5 = relabel(root / "data", "test", labels.tolist())
    return SimpleNamespace(weights=weights, data=root / "data", md5=md5,
                           ipython=kernel_startup(root / "ipython", md5))


@pytest.fixture()
def offline(standin, monkeypatch):
    """The stand-in's checksums accepted here and in notebook kernels; no download may be attempted."""
    accept_checksums(monkeypatch, standin.md5)
    monkeypatch.setenv("IPYTHONDIR", str(standin.ipython))
    monkeypatch.setenv("CLIPLAB_OFFLINE", "1")
    for variable in ("CLIPLAB_PROFILE", "CLIPLAB_DEVICE", "CLIPLAB_PRETRAINED", "CLIPLAB_DATA", "CLIPLAB_SMOKE",
                     "CLIPLAB_PRECISION", "CLIPLAB_ENCODER_CACHE", "CLIPLAB_FIGURES"):
        monkeypatch.delenv(variable, raising=False)
    return standin


def _reproduce(*args: str, results: Path) -> int:
    return main(["reproduce", "--notebooks", str(NOTEBOOKS), "--results", str(results), *args])


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in directory.rglob("*") if p.is_file()}


@pytest.mark.notebooks
def test_smoke_run_executes_every_cell_of_the_cifar100_study(offline, tmp_path, capsys):
    """In bf16 autocast where the CPU has bf16 arithmetic: the precision the study runs in on CUDA, so the CPU run
    covers its autocast path too, and about twice as fast per ViT-B-32 pass (fp32 is the path of every shapes test)."""
    _check_smoke_run(offline, tmp_path, capsys, "cpu", "bf16" if cpu_has_bf16() else "fp32")


@pytest.mark.cuda
@pytest.mark.notebooks
def test_smoke_run_on_the_gpu(offline, tmp_path, capsys):
    """The same run on CUDA (bf16 autocast, the study's default there)."""
    _check_smoke_run(offline, tmp_path, capsys, os.environ.get("CLIPLAB_TEST_DEVICE", "cuda"), "auto")


def _check_smoke_run(offline, tmp_path: Path, capsys, device: str, precision: str) -> None:
    before = _snapshot(NOTEBOOKS)
    # one notebook at a time: the suite's two workers already keep both cores busy (two kernels here slowed the other
    # worker's notebook more than they saved; notebooks side by side are tested in test_cli.py)
    code = _reproduce("--profile", "cifar100", "--smoke", "--device", device, "--pretrained", str(offline.weights),
                      "--data", str(offline.data), "--precision", precision, "--jobs", "1", results=tmp_path)
    printed = capsys.readouterr().out
    print(printed)  # the notebooks' times and slowest cells, in the report of a passed test too (pytest -rP)
    assert code == 0, printed
    out = tmp_path / "cifar100-smoke"
    executed = sorted(out.glob("*.ipynb"))
    assert [p.name for p in executed] == sorted(p.name for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    for path in executed:
        notebook = nbformat.read(path, as_version=4)
        code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(cell.execution_count for cell in code_cells), f"{path.name}: a cell did not run"
        errors = [o for cell in code_cells for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
        assert list((out / "figures" / path.stem).glob("*.png")), f"{path.name} saved no figure"
        # the conclusions are written from the smoke run's own numbers: there, and never of an empty sample
        said = [o.data["text/markdown"] for cell in code_cells for o in cell.outputs
                if "text/markdown" in o.get("data", {})]
        assert said and not any("nan" in text for text in said), f"{path.name}: {said}"
    profile_print = "".join(o.get("text", "") for o in nbformat.read(executed[0], as_version=4).cells[1].outputs)
    assert profile_print.startswith("profile 'cifar100' (smoke") and f"device='{device}'" in profile_print
    assert f"precision='{precision}'" in profile_print
    assert str(offline.weights) in profile_print, "the notebooks must load the --pretrained weights"
    # 05 and 06 cached their encoders in the results directory, and the repository is untouched
    # (the smoke run's one OFT block size, 128, and three clean weights; 06's frontier: LoRA at the rank matching its
    # parameter count for ViT-B/32, 28, the last one and two blocks, BitFit)
    assert sorted(p.name for p in (out / "encoders").glob("*.safetensors")) == [
        "fare-bitfit.safetensors", "fare-full.safetensors", "fare-last1.safetensors", "fare-last2.safetensors",
        "fare-lora28.safetensors", "fare-oft128-cw2.safetensors", "fare-oft128-cw3.safetensors",
        "fare-oft128.safetensors", "tecoa-full.safetensors"]
    assert _snapshot(NOTEBOOKS) == before, "a smoke run wrote into the repository"


# ------------------------------------------------------------------------------------------ bad input
def _fails_fast(capsys, results: Path, *args: str) -> str:
    """Fast by construction, not by a wall-clock bound: the bad input is found before any notebook starts."""
    def no_notebook(*args, **kwargs):
        raise AssertionError("a notebook started although the inputs are bad")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "execute_notebook", no_notebook)
        code = _reproduce("--profile", "cifar100", "--smoke", "--device", "cpu", *args, results=results)
    error = capsys.readouterr().err
    assert code == 2, error
    assert not results.exists(), "nothing may be written when the inputs are bad"
    return error


def test_missing_weights_file(offline, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "ViT-B-32.safetensors"
    error = _fails_fast(capsys, tmp_path / "results", "--pretrained", str(missing), "--data", str(offline.data))
    assert str(missing) in error and "not found" in error


def test_truncated_weights_file(offline, tmp_path, capsys):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(offline.weights.read_bytes()[:1_000_000])
    error = _fails_fast(capsys, tmp_path / "results", "--pretrained", str(truncated), "--data", str(offline.data))
    assert str(truncated) in error and "truncated" in error


def test_weights_of_another_architecture(offline, tmp_path, capsys):
    from cliplab.shapes_clip import WEIGHTS

    error = _fails_fast(capsys, tmp_path / "results", "--pretrained", str(WEIGHTS), "--data", str(offline.data))
    assert str(WEIGHTS) in error and "ViT-B-32" in error and "architecture" in error


def test_empty_data_directory(offline, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    error = _fails_fast(capsys, tmp_path / "results", "--pretrained", str(offline.weights), "--data", str(empty))
    assert "missing train, test, meta" in error and str(empty) in error


def test_partial_data_directory(offline, tmp_path, capsys):
    partial = tmp_path / "partial" / "cifar-100-python"
    partial.mkdir(parents=True)
    (partial / "meta").write_bytes((offline.data / "cifar-100-python" / "meta").read_bytes())
    error = _fails_fast(capsys, tmp_path / "results", "--pretrained", str(offline.weights),
                        "--data", str(partial.parent))
    assert "missing train, test in" in error


def test_data_failing_the_checksum(offline, tmp_path, capsys, monkeypatch):
    from torchvision.datasets import CIFAR100

    monkeypatch.setattr(CIFAR100, "test_list", [["test", "0" * 32]])  # not the file's checksum
    error = _fails_fast(capsys, tmp_path / "results", "--pretrained", str(offline.weights),
                        "--data", str(offline.data))
    assert "checksum" in error and str(offline.data) in error


def test_smoke_never_updates_the_repository(offline, tmp_path, capsys):
    before = _snapshot(NOTEBOOKS)
    error = _fails_fast(capsys, tmp_path / "results", "--pretrained", str(offline.weights),
                        "--data", str(offline.data), "--update")
    assert "--update" in error and "--smoke" in error
    assert _snapshot(NOTEBOOKS) == before


@pytest.mark.notebooks
def test_smoke_run_of_the_shapes_profile(offline, tmp_path, capsys):
    """--smoke is the same code on either profile."""
    assert _reproduce("--profile", "shapes", "--smoke", "--only", "01", results=tmp_path) == 0, capsys.readouterr()
    assert (tmp_path / "shapes-smoke" / "01_attacks.ipynb").is_file()
    assert not (tmp_path / "shapes").exists()


def _evaluate_cifar100(offline, tmp_path, device: str) -> dict:
    import json

    code = main(["evaluate", "--model", "cifar100", "--pretrained", str(offline.weights), "--dataset", "cifar100",
                     "--data", str(offline.data), "--single-template", "--n", "8", "--eps", "4/255", "--steps", "2",
                     "--targets", "2", "--queries", "3", "--batch-size", "4", "--device", device, "--quiet",
                     "--out", str(tmp_path)])
    assert code == 0
    return json.loads((tmp_path / "evaluation.json").read_text())


def test_evaluate_report_card_on_the_cifar100_path(offline, tmp_path, capsys):
    """`cliplab evaluate` loads ViT-B-32 from a local checkpoint and CIFAR-100 through torchvision, then runs the
    whole standard ensemble on them."""
    document = _evaluate_cifar100(offline, tmp_path, "cpu")
    result = document["results"][0]
    assert result["clean"]["n"] == 8 and list(result["per_attack"]) == ["apgd-ce", "apgd-t", "square"]
    assert "| eps 4/255 |" in capsys.readouterr().out


@pytest.mark.cuda
def test_evaluate_report_card_on_the_gpu(offline, tmp_path):
    device = os.environ.get("CLIPLAB_TEST_DEVICE", "cuda")
    document = _evaluate_cifar100(offline, tmp_path, device)
    assert document["settings"]["runtime"]["device"] == device and document["results"][0]["clean"]["n"] == 8

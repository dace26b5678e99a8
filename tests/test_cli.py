"""`cliplab reproduce`: runs numbered notebooks headless in a fresh kernel with the profile in the
environment, writes executed copies and figures under results/<profile>/, reports failures by notebook
and cell, and sets the exit code."""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import nbformat
import psutil
import pytest
import torch

import cliplab._torch
from cliplab.cli import commands as cli
from cliplab.cli import main
from cliplab.cli import checked
from cliplab.cli import reproduce as runner

OK_CELLS = [
    "import os\nimport matplotlib.pyplot as plt\nfrom cliplab import plots as P",
    "assert os.environ['CLIPLAB_PROFILE'] == 'shapes', os.environ.get('CLIPLAB_PROFILE')\n"
    "fig = plt.figure()\nplt.plot([0, 1], [1, 0])\nimport cliplab\nprint(P.save_figure(fig, 'demo', cliplab.get_profile().runtime.figures))",
    "import torch\nprint('threads', torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])",
]
FAIL_CELLS = ["x = 1", "raise ValueError('boom')", "never = True"]


def _write_notebook(path, cells, markdown_first=False):
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = ([nbformat.v4.new_markdown_cell("# title")] if markdown_first else []) + \
        [nbformat.v4.new_code_cell(source) for source in cells]
    nbformat.write(notebook, path)


@pytest.fixture(scope="module")
def notebooks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("notebooks")
    _write_notebook(directory / "01_ok.ipynb", OK_CELLS)
    _write_notebook(directory / "02_fail.ipynb", FAIL_CELLS)
    (directory / "README.ipynb").write_text("not a numbered notebook, never run")
    return directory


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    for variable in ("CLIPLAB_PROFILE", "CLIPLAB_FIGURES", "CLIPLAB_DEVICE"):
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.notebooks
def test_reproduce_runs_all_and_reports_failure(notebooks, tmp_path, capsys):
    out = tmp_path / "results"
    code = main(["reproduce", "--notebooks", str(notebooks), "--results", str(out)])
    printed = capsys.readouterr().out
    assert code == 1
    shapes = out / "shapes"
    assert sorted(p.name for p in shapes.glob("*.ipynb")) == ["01_ok.ipynb", "02_fail.ipynb"]
    assert (shapes / "figures" / "01_ok" / "demo.png").is_file()
    assert (shapes / "figures" / "01_ok" / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in shapes.rglob("*") if p.name.endswith(".tmp")], "temporary files left behind"

    # the executed copies carry their outputs; the failing one stops at the failing cell
    ok = nbformat.read(shapes / "01_ok.ipynb", as_version=4)
    printed_path = "".join(o.get("text", "") for o in ok.cells[1].outputs)
    assert printed_path.strip().endswith("demo.png")
    assert any("image/png" in o.get("data", {}) for o in ok.cells[1].outputs), "figures must be embedded inline"
    fail = nbformat.read(shapes / "02_fail.ipynb", as_version=4)
    errors = [o for cell in fail.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert len(errors) == 1 and errors[0].ename == "ValueError" and errors[0].evalue == "boom"
    assert fail.cells[1].outputs == errors
    assert fail.cells[2].outputs == [], "execution must stop at the failing cell"

    # the summary names the failing notebook, the cell and the error
    lines = {line.split()[0]: line for line in printed.splitlines() if line.startswith("  ")}
    assert "FAILED" not in lines["01_ok"] and "1 figures" in lines["01_ok"]
    assert re.search(r"slowest: cell [123], \d+ s", lines["01_ok"]), lines["01_ok"]  # one of its three cells
    assert "FAILED" in lines["02_fail"]
    assert re.search(r"cell \d+", lines["02_fail"]), lines["02_fail"]
    assert "ValueError: boom" in lines["02_fail"]
    assert "README" not in printed
    # the profile never leaks into the calling process, nor does a kernel outlive its notebook
    assert "CLIPLAB_PROFILE" not in os.environ
    kernels = [p for p in psutil.Process().children(recursive=True) if _is_kernel(p)]
    assert not kernels, f"kernels left running: {kernels}"


@pytest.mark.notebooks
def test_reproduce_only_with_threads(notebooks, tmp_path, capsys):
    """--only runs the named notebooks; --threads sets each kernel's torch threads (the test session's
    environment says 1), which wait passively, and the run says how many it used."""
    out = tmp_path / "results"
    code = main(["reproduce", "--notebooks", str(notebooks), "--results", str(out), "--only", "01",
                     "--threads", "2"])
    printed = capsys.readouterr().out
    assert code == 0
    assert [p.name for p in (out / "shapes").glob("*.ipynb")] == ["01_ok.ipynb"]
    assert "02_fail" not in printed and "2 torch threads per notebook kernel" in printed
    executed = nbformat.read(out / "shapes" / "01_ok.ipynb", as_version=4)
    assert executed.cells[-1].outputs[0]["text"] == "threads 2 PASSIVE\n"


def _checked_notebook(path, printed):
    """A notebook of two checked cells and one unchecked, committed with the outputs ``printed`` (one line each)."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    sources = ["# NBVAL_CHECK_OUTPUT\nprint('robust 45.0% [40.1, 50.0] (n=400)')",
               "print('not checked')",
               "# NBVAL_CHECK_OUTPUT\nprint('clean 90.2% [87.0, 92.7] (n=400)')"]
    notebook.cells = [nbformat.v4.new_code_cell(source, outputs=[
        nbformat.v4.new_output("stream", name="stdout", text=text + "\n")]) for source, text in zip(sources, printed)]
    nbformat.write(notebook, path)


@pytest.mark.notebooks
@pytest.mark.parametrize("update", [False, True])
def test_reproduce_ends_by_comparing_the_checked_outputs_with_the_committed_ones(update, tmp_path, capsys):
    """A run of the shapes profile says which checked cells read as committed and, for each one that does not, how
    many lines differ and by how much their numbers do; --update compares with the notebooks as they were before it
    rewrote them. Unchecked cells do not count."""
    directory = tmp_path / "notebooks"
    directory.mkdir()
    _checked_notebook(directory / "01_checked.ipynb",
                      ["robust 45.0% [40.1, 50.0] (n=400)", "something else", "clean 90.0% [86.8, 92.6] (n=400)"])
    code = main(["reproduce", "--notebooks", str(directory), "--results", str(tmp_path / "results"),
                 *(["--update"] if update else []), "--precision", "fp32"])
    printed = capsys.readouterr().out
    assert code == 0
    against = "the notebooks before this run" if update else "the committed notebooks"
    assert (f"Checked outputs: 1 of 2 cells read as in {against}; these differ:\n"
            "  01_checked, code cell 3: 1 line differs, numbers by up to 0.2\n") in printed
    # the same notebooks again: with --update they now read as the run left them, without it as committed
    assert main(["reproduce", "--notebooks", str(directory), "--results", str(tmp_path / "results"),
                 *(["--update"] if update else []), "--precision", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert (f"Checked outputs: all 2 cells read as in {against}." in printed) == update


def test_checked_outputs_and_their_changes(tmp_path):
    """``checked_outputs`` reads the text of the checked cells alone; ``changes`` pairs each changed line with its new
    version and counts the lines one side lacks."""
    path = tmp_path / "01_checked.ipynb"
    _checked_notebook(path, ["robust 45.0% [40.1, 50.0] (n=400)", "something", "clean 90.0% [86.8, 92.6] (n=400)"])
    before = checked.checked_outputs(path)
    assert before == {1: ["robust 45.0% [40.1, 50.0] (n=400)"], 3: ["clean 90.0% [86.8, 92.6] (n=400)"]}
    after = {1: ["robust 44.5% [39.6, 49.5] (n=400)", "a line more"], 3: before[3]}
    (change,) = checked.changes("01_checked", before, after)
    assert (change.cell, change.unpaired) == (1, 1) and change.largest == pytest.approx(0.5)
    assert change.summary() == "01_checked, code cell 1: 2 lines differ, numbers by up to 0.5"
    assert checked.changes("01_checked", before, before) == []
    assert checked.comparison({}, {}) == ""  # nothing checked, nothing said


@pytest.mark.parametrize("argv, message", [
    (["reproduce", "--threads", "0"], "threads must be >= 1, got 0"),
    (["reproduce", "--jobs", "0"], "jobs must be >= 1, got 0"),
    (["reproduce", "--results", "{file}"], "results must be a directory, but {file} is a file"),
    (["finetune", "--out", "{tmp}/run", "--eps", "-1/255"], "--eps: must be in [0, 1]"),
    (["finetune", "--out", "{tmp}/run", "--eps", "2"], "--eps: must be in [0, 1]"),
    (["finetune", "--out", "{tmp}/run", "--block-size", "0"], "block_size applies to adapter='oft' only"),
    (["finetune", "--out", "{tmp}/run", "--adapter", "oft", "--block-size", "0"], "block_size must be >= 1"),
    (["finetune", "--out", "{tmp}/run", "--adapter", "oft", "--block-size", "7"], "block_size must divide the width"),
])
def test_bad_arguments_fail_before_anything_runs(argv, message, notebooks, tmp_path, capsys, monkeypatch):
    """Each is refused with a message naming the argument, before a notebook, a model or data is loaded (the
    block size is checked against the architecture built on the meta device)."""
    from cliplab.study import Profile

    def never(*args, **kwargs):
        raise AssertionError("started work before the arguments were checked")

    monkeypatch.setattr(Profile, "load_classifier", never)
    monkeypatch.setattr(Profile, "load_dataset", never)
    monkeypatch.setattr(runner, "execute_notebook", never)
    file = tmp_path / "a-file"
    file.write_text("mine")
    argv = [arg.format(file=file, tmp=tmp_path) for arg in argv]
    if argv[0] == "reproduce":
        argv += ["--notebooks", str(notebooks)]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    assert code == 2
    assert message.format(file=file) in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and file.read_text() == "mine"


@pytest.mark.parametrize("variable, value", [("CLIPLAB_PROFILE", "nope"), ("CLIPLAB_DEVICE", "gpu"),
                                             ("CLIPLAB_PRECISION", "half")])
def test_profile_environment_is_validated_by_the_cli(variable, value, notebooks, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(variable, value)
    assert main(["reproduce", "--notebooks", str(notebooks), "--results", str(tmp_path)]) == 2
    assert f"${variable} must be" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_cli_default_profile_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("CLIPLAB_PROFILE", "cifar100")
    monkeypatch.setenv("CLIPLAB_DEVICE", "cpu")
    parser_args = type("Args", (), dict(profile=None, device=None, precision=None, pretrained=None, data=None))
    assert cli._profile(parser_args).name == "cifar100"


@pytest.mark.parametrize("options, precision", [([], "auto"), (["--precision", "bf16"], "bf16"), (["--fp32"], "fp32")])
def test_precision_option_reaches_the_profile(options, precision, monkeypatch):
    monkeypatch.delenv("CLIPLAB_PRECISION", raising=False)
    for command in ("reproduce", "finetune --out x"):
        args = cli.build_parser().parse_args([*command.split(), *options])
        assert cli._profile(args).runtime.precision == precision
    for command in ("evaluate --model shapes", "benchmark --models shapes --datasets cifar10 --out x"):
        args = cli.build_parser().parse_args([*command.split(), *options])
        assert cli._runtime(args, weights=None).precision == precision


@pytest.mark.parametrize("machine, has_bf16, emulated", [("x86_64", True, False), ("x86_64", False, True),
                                                        ("AMD64", False, True), ("aarch64", False, False)])
def test_which_cpus_emulate_bf16(machine, has_bf16, emulated, monkeypatch):
    """x86 without AVX512-BF16 or AMX; an ARM CPU is not judged (torch reports only the x86 features)."""
    monkeypatch.setattr(cliplab._torch.platform, "machine", lambda: machine)
    monkeypatch.setattr(cliplab._torch, "cpu_has_bf16", lambda: has_bf16)
    assert cliplab._torch.cpu_emulates_bf16() is emulated


@pytest.mark.parametrize("has_bf16", [True, False])
def test_bf16_on_a_cpu_without_bf16_arithmetic_is_warned_about(has_bf16, monkeypatch):
    monkeypatch.setattr(cliplab._torch, "cpu_emulates_bf16", lambda: not has_bf16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli._profile(cli.build_parser().parse_args(["reproduce", "--device", "cpu", "--precision", "bf16"]))
        cli._runtime(cli.build_parser().parse_args(["evaluate", "--device", "cpu", "--precision", "bf16"]), None)
        cli._profile(cli.build_parser().parse_args(["reproduce", "--device", "cpu", "--fp32"]))
    emulated = [w for w in caught if "no bf16 arithmetic" in str(w.message)]
    assert len(emulated) == (0 if has_bf16 else 2)


def test_precision_and_fp32_together_are_refused(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["reproduce", "--precision", "bf16", "--fp32"])
    assert "--fp32: not allowed with argument --precision" in capsys.readouterr().err


def test_a_missing_notebooks_extra_is_named(notebooks, tmp_path, capsys, monkeypatch):
    find_spec = runner.importlib.util.find_spec
    monkeypatch.setattr(runner.importlib.util, "find_spec", lambda name: None if name == "ipywidgets" else find_spec(name))
    assert main(["reproduce", "--notebooks", str(notebooks), "--results", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "ipywidgets" in error and "pip install 'cliplab[notebooks]'" in error


def test_reproduce_unknown_notebook(notebooks, tmp_path, capsys):
    code = main(["reproduce", "--notebooks", str(notebooks), "--results", str(tmp_path), "--only", "01,07"])
    captured = capsys.readouterr()
    assert code == 2
    assert "07" in captured.err and "--only" in captured.err
    assert not list(tmp_path.rglob("*.ipynb")), "nothing may run when --only names a missing notebook"


def test_reproduce_only_naming_nothing(notebooks, tmp_path, capsys):
    code = main(["reproduce", "--notebooks", str(notebooks), "--results", str(tmp_path), "--only", ","])
    assert code == 2 and "--only names no notebook" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ipynb"))


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--out", ""], "--out: must be a path"),
    (["train-shapes-clip", "--out", ""], "--out: must be a path"),
])
def test_empty_out_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_train_shapes_clip_refuses_zero_steps(tmp_path, capsys):
    for steps in ("0", "-1"):
        assert main(["train-shapes-clip", "--out", str(tmp_path / "w.safetensors"), "--steps", steps]) == 2
        assert "steps must be >= 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "no untrained model may be saved"


def test_finetune_out_that_is_a_file(tmp_path, capsys):
    file = tmp_path / "taken"
    file.write_text("a user's file")
    assert main(["finetune", "--out", str(file)]) == 2
    assert "out must be a directory" in capsys.readouterr().err and file.read_text() == "a user's file"


def test_an_error_is_written_as_one_whole_line(tmp_path, monkeypatch):
    """Under torchrun every process writes to the launcher's stderr: a line written in two pieces (print writes the
    text, then the newline) can have another process's line land between them."""
    writes = []
    monkeypatch.setattr(sys, "stderr", SimpleNamespace(write=writes.append))
    file = tmp_path / "taken"
    file.write_text("a user's file")
    assert main(["finetune", "--out", str(file)]) == 2
    assert len(writes) == 1 and writes[0].startswith("cliplab finetune: ") and writes[0].count("\n") == 1
    assert writes[0].endswith("\n")


def test_finetune_resume_problems_are_found_before_anything_is_loaded(tmp_path, capsys, monkeypatch):
    """A bad --resume directory fails before the model, the data and the "before" evaluation (minutes on
    cifar100): the profile's loaders must never be called."""
    from cliplab.study import Profile

    def never(*args, **kwargs):
        raise AssertionError("loaded before the resume directory was checked")

    monkeypatch.setattr(Profile, "load_classifier", never)
    monkeypatch.setattr(Profile, "load_dataset", never)
    assert main(["finetune", "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["finetune", "--out", str(tmp_path / "other")]) == 2
    assert "not a cliplab run" in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    (["--adapter", "lora", "--rank", "0"], "rank must be >= 1"),
    (["--adapter", "lora", "--rank", "128"], "rank must be below both sides of every adapted weight: 128"),
    (["--adapter", "oft", "--block-size", "48"], "block_size must divide the width of every adapted weight"),
    (["--adapter", "last-k", "--blocks", "5"], "blocks must be at most the encoder's depth, 4 blocks, got 5"),
    (["--adapter", "full", "--rank", "4"], "rank applies to adapter='lora' only, got it with adapter='full'"),
    (["--adapter", "bitfit", "--blocks", "2"], "blocks applies to adapter='last-k' only"),
])
def test_an_adapter_size_that_does_not_fit_is_refused_before_anything_is_loaded(args, says, tmp_path, capsys,
                                                                                 monkeypatch):
    from cliplab.study import Profile

    def never(*args, **kwargs):
        raise AssertionError("loaded before the adapter was checked")

    monkeypatch.setattr(Profile, "load_classifier", never)
    monkeypatch.setattr(Profile, "load_dataset", never)
    assert main(["finetune", "--out", str(tmp_path / "run"), *args]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_adapter_option_names_every_adapter(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--out", "x", "--adapter", "prompt"])
    assert "(choose from 'full', 'oft', 'lora', 'last-k', 'bitfit')" in capsys.readouterr().err


@pytest.mark.slow  # renders the profile's 10,000 training images
@pytest.mark.parametrize("adapter, size", [("lora", ["--rank", "2"]), ("last-k", ["--blocks", "2"]),
                                           ("bitfit", [])])
def test_every_adapter_trains_merges_and_evaluates_through_the_command_line(adapter, size, tmp_path, capsys):
    """cliplab finetune writes the merged weights, which cliplab evaluate loads as any checkpoint."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert main(["finetune", "--adapter", adapter, *size, "--steps", "2", "--save-every", "1", "--out", str(out),
                 "--device", "cpu"]) == 0
    weights = load_file(out / "final.safetensors")
    assert not any("parametrizations" in key for key in weights), "merged into plain weights"
    capsys.readouterr()
    assert main(["evaluate", "--pretrained", str(out / "final.safetensors"), "--n", "8", "--eps", "4/255",
                 "--attacks", "apgd-ce", "--steps", "2", "--device", "cpu", "--quiet"]) == 0
    assert "| eps 4/255 |" in capsys.readouterr().out


def test_shell_replies_are_polled_in_slices():
    """A reply that a long get_msg would only see at its timeout (jupyter/nbclient#312) is found by the next
    one-second poll; with nothing to receive, the overall timeout still holds."""
    import asyncio
    from queue import Empty
    from types import SimpleNamespace

    calls = []

    def get_msg(timeout=None):
        calls.append(timeout)
        if len(calls) < 3:
            raise Empty
        return {"reply": len(calls)}

    channel = SimpleNamespace(get_msg=get_msg)
    runner._poll_in_slices(channel, slice_s=0.01)
    assert asyncio.run(channel.get_msg(timeout=3600)) == {"reply": 3}
    assert all(timeout <= 0.01 for timeout in calls)
    empty = SimpleNamespace(get_msg=lambda timeout=None: (_ for _ in ()).throw(Empty()))
    runner._poll_in_slices(empty, slice_s=0.01)
    with pytest.raises(Empty):
        asyncio.run(empty.get_msg(timeout=0.05))


def test_reproduce_missing_notebook_directory(tmp_path, capsys):
    """A mistyped --notebooks directory is a usage error, not a successful run of nothing."""
    missing = tmp_path / "no_such_dir"
    code = main(["reproduce", "--notebooks", str(missing), "--results", str(tmp_path / "results")])
    assert code == 2, "running zero notebooks must not report success"
    assert "no_such_dir" in capsys.readouterr().err


def test_unknown_profile_is_a_usage_error(notebooks, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["reproduce", "--profile", "imagenet", "--notebooks", str(notebooks)])
    assert exit_.value.code == 2
    assert "imagenet" in capsys.readouterr().err


def test_find_notebooks(notebooks):
    assert [p.name for p in runner.find_notebooks(notebooks, None)] == ["01_ok.ipynb", "02_fail.ipynb"]
    assert [p.name for p in runner.find_notebooks(notebooks, ["02"])] == ["02_fail.ipynb"]
    with pytest.raises(ValueError, match="07"):
        runner.find_notebooks(notebooks, ["07"])


@pytest.mark.slow  # renders the profile's 10,000 training images; study.finetune_and_evaluate is tested quickly
def test_finetune_command_writes_weights_and_metrics_and_refuses_to_overwrite(tmp_path, capsys):
    import json

    out = tmp_path / "run"
    args = ["finetune", "--profile", "shapes", "--method", "tecoa", "--adapter", "oft", "--block-size", "8",
            "--eps", "2/255", "--steps", "2", "--save-every", "1", "--eval-every", "2", "--out", str(out),
            "--device", "cpu"]
    assert main(args) == 0
    history = json.loads((out / "history.json").read_text())
    assert ["eval_robust" in h for h in history] == [False, True]
    metrics = json.loads((out / "metrics.json").read_text())
    for when in ("before", "after"):
        for kind in ("clean", "robust"):
            entry = metrics[when][kind]
            assert entry["n"] > 0 and entry["ci95"][0] <= entry["value"] <= entry["ci95"][1]
    assert abs(metrics["eps"] - 2 / 255) < 1e-12
    profile = __import__("cliplab").get_profile("shapes")
    assert (metrics["config"]["block_size"], metrics["config"]["lr"]) == (8, profile.finetuning.oft_lr)  # flag, profile
    cliplab_loaded = __import__("cliplab").load_classifier("shapes", pretrained=out / "final.safetensors",
                                                           device="cpu")
    assert cliplab_loaded.num_classes == 100
    assert main(args) == 2  # a second run into the same directory needs --resume
    assert "--resume" in capsys.readouterr().err
    assert main(args[:-4] + ["--out", str(tmp_path / "other"), "--lr", "0"]) == 2  # args[-4:]: --out, --device
    assert not (tmp_path / "other").exists()


def test_parallelism_shares_the_cores_among_the_notebooks_on_the_cpu_and_runs_one_at_a_time_on_a_gpu(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runner, "usable_cores", lambda: 16)
    assert runner.parallelism("cpu", 6) == (6, 2)  # every notebook at once, 16 // 6 threads each
    assert runner.parallelism("cpu", 1) == (1, 16)
    assert runner.parallelism("cuda", 6) == (1, 16)  # one device: one notebook at a time, every core
    assert runner.parallelism("cpu", 6, threads=8) == (2, 8)  # what is given is kept, the rest follows
    assert runner.parallelism("cpu", 6, jobs=3) == (3, 5)
    assert runner.parallelism("cpu", 6, threads=32) == (1, 32)
    monkeypatch.setattr(runner, "usable_cores", lambda: 2)
    assert runner.parallelism("cpu", 6) == (2, 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's thread count, as if given
    assert runner.parallelism("cpu", 6) == (1, 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    with pytest.raises(ValueError, match=r"^\$OMP_NUM_THREADS must be a whole number >= 1, got 'lots'"):
        runner.parallelism("cpu", 6)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's policy is kept
    assert runner.thread_environment(2) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}


@pytest.mark.notebooks
def test_notebooks_run_at_the_same_time_each_in_its_own_kernel(tmp_path, capsys):
    """With --jobs 2 the two notebooks run at once (each waits until the other has started: run one at a time, they
    would time out), and the summary lists them in order."""
    directory = tmp_path / "notebooks"
    directory.mkdir()
    for mine, other in (("01", "02"), ("02", "01")):
        _write_notebook(directory / f"{mine}_meet.ipynb", [
            f"import pathlib, time\npathlib.Path({str(tmp_path)!r}, '{mine}').touch()\ndeadline = time.time() + 60\n"
            f"while not pathlib.Path({str(tmp_path)!r}, '{other}').exists():\n"
            f"    assert time.time() < deadline, 'the other notebook never started'\n    time.sleep(0.1)\n"
            f"print('met')"])
    code = main(["reproduce", "--notebooks", str(directory), "--results", str(tmp_path / "results"),
                     "--jobs", "2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "2 notebooks at a time, 1 torch thread per notebook kernel" in printed  # the session's 1 thread
    assert [line.split()[0] for line in printed.splitlines() if line.startswith("  ")] == ["01_meet", "02_meet"]
    for name in ("01_meet", "02_meet"):
        executed = nbformat.read(tmp_path / "results" / "shapes" / f"{name}.ipynb", as_version=4)
        assert executed.cells[0].outputs[0]["text"] == "met\n"


def test_several_at_a_time_the_longest_notebooks_start_first():
    """The study's notebooks start in LONGEST_FIRST order, which names every committed notebook (a renamed one would
    otherwise start last); notebooks it does not know start after them, the last numbered first."""
    committed = sorted(runner.default_notebook_dir().glob("[0-9][0-9]_*.ipynb"))
    assert sorted(runner.LONGEST_FIRST) == [path.stem for path in committed]
    assert [path.stem for path in runner.start_order(committed)] == list(runner.LONGEST_FIRST)
    mine = [Path(f"{name}.ipynb") for name in ("01_attacks", "02_mine", "06_orthogonal_finetune", "07_mine")]
    assert [path.stem for path in runner.start_order(mine)] == ["06_orthogonal_finetune", "01_attacks", "07_mine",
                                                                  "02_mine"]


def test_clean_notebook_drops_what_changes_on_every_run():
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["widgets"] = {"state": {"abc": {}}}
    cell = nbformat.v4.new_code_cell("interact(f)", execution_count=7, metadata={"execution": {"started": "now"}})
    cell.outputs = [nbformat.v4.new_output("display_data", data={
        runner.WIDGET_VIEW: {"model_id": "6b97d98e", "version_major": 2, "version_minor": 0},
        "text/plain": "interactive(children=(FloatSlider(value=1.0),))"})]
    notebook.cells = [cell]
    runner.clean_notebook(notebook)
    assert "widgets" not in notebook.metadata and "execution" not in cell.metadata
    assert cell.execution_count == 1
    assert cell.outputs[0]["data"] == {"text/plain": "interactive(children=(FloatSlider(value=1.0),))"}


def test_committed_notebooks_show_their_figures_and_diff_cleanly():
    """Every notebook that draws embeds its figures (PNG), all seven stay under 4 MB, and nothing in them changes
    from one run to the next (widget views name a kernel-side model id that does)."""
    paths = sorted(runner.default_notebook_dir().glob("[0-9][0-9]_*.ipynb"))
    assert len(paths) == 7
    assert sum(path.stat().st_size for path in paths) < 4 * 2**20
    for path in paths:
        notebook = nbformat.read(path, as_version=4)
        outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} has no inline figure"
        assert not any(runner.WIDGET_VIEW in o.get("data", {}) for o in outputs), path.name


# ------------------------------------------------------------------ outputs: checked before the work, never replaced
UNWRITABLE = "/proc/self/cliplab-out"  # a directory nobody can create files in, root included (CI runs as root)


class Started(Exception):
    """Raised where the heavy work would start: the checks before it have passed."""


@pytest.fixture()
def no_work(monkeypatch):
    """Every command's heavy work raises ``Started``: a test sees whether the checks let it begin."""
    from cliplab.study import pretraining as shapes_clip
    from cliplab.study import report
    from cliplab.study import Profile

    def started(*args, **kwargs):
        raise Started

    for owner, name in ((Profile, "load_classifier"), (Profile, "load_dataset"), (runner, "execute_notebook"),
                        (report, "evaluate"), (shapes_clip, "train_shapes_clip")):
        monkeypatch.setattr(owner, name, started)


@pytest.mark.parametrize("argv", [["reproduce", "--results", UNWRITABLE], ["finetune", "--out", UNWRITABLE],
                                  ["evaluate", "--out", UNWRITABLE], ["train-shapes-clip", "--out", f"{UNWRITABLE}/w"]])
def test_an_output_location_that_cannot_be_written_fails_before_the_work(argv, no_work, notebooks, capsys):
    if argv[0] == "reproduce":
        argv += ["--notebooks", str(notebooks)]
    assert main(argv) == 2  # not Started
    error = capsys.readouterr().err
    assert "cannot write in /proc/self" in error and "Traceback" not in error


@pytest.mark.parametrize("argv, existing", [(["evaluate", "--out", "{tmp}"], "evaluation.json"),
                                            (["train-shapes-clip", "--out", "{tmp}/w.safetensors"], "w.safetensors")])
def test_an_existing_output_is_replaced_only_with_overwrite(argv, existing, no_work, tmp_path, capsys):
    (tmp_path / existing).write_text("the user's earlier result")
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert f"{existing} exists" in error and "--overwrite" in error
    assert (tmp_path / existing).read_text() == "the user's earlier result"
    with pytest.raises(Started):  # asked for: the checks pass and the work begins
        main([*argv, "--overwrite"])


@pytest.mark.parametrize("command", [["reproduce"], ["finetune", "--out", "{tmp}/run"], ["evaluate"]])
def test_an_explicit_cuda_device_without_a_gpu_is_refused_by_every_command(command, no_work, notebooks, tmp_path,
                                                                          capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [arg.format(tmp=tmp_path) for arg in command]
    if command[0] == "reproduce":
        argv += ["--notebooks", str(notebooks), "--results", str(tmp_path / "results")]
    assert main([*argv, "--device", "cuda"]) == 2
    error = capsys.readouterr().err
    assert "--device cuda: no CUDA GPU is available" in error and "Traceback" not in error
    monkeypatch.setenv("CLIPLAB_DEVICE", "cuda")  # the same request from the environment: the same answer, once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("$CLIPLAB_DEVICE cuda: no CUDA GPU is available") == 1 and not caught


def _is_kernel(process: psutil.Process) -> bool:
    """A notebook's kernel, as nbclient starts it (``python -m ipykernel_launcher``)."""
    try:
        return any("ipykernel" in part for part in process.cmdline())
    except psutil.Error:  # it ended meanwhile
        return False


def _interrupt_reproduce(directory, results, jobs: int, started, signum) -> tuple[int, str]:
    """``_interrupt`` of ``cliplab reproduce`` on ``directory``."""
    return _interrupt(["reproduce", "--notebooks", str(directory), "--results", str(results), "--jobs", str(jobs)],
                      started, signum)


def _interrupt(argv: list[str], started, signum, poll_s: float = 0.2) -> tuple[int, str]:
    """Run ``cliplab *argv`` in its own session, send ``signum`` once ``started(pid)`` (Ctrl-C goes to the whole process
    group, kernels included, as a terminal sends it; SIGTERM to cliplab alone); its exit status and stderr."""
    process = subprocess.Popen([sys.executable, "-m", "cliplab", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not started(process.pid) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(poll_s)
        assert started(process.pid), process.communicate(timeout=5)
        os.killpg(process.pid, signum) if signum == signal.SIGINT else process.send_signal(signum)
        _, error = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert "Traceback" not in error, error
    return process.returncode, error


@pytest.mark.notebooks
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_reproduce_says_in_one_line_what_finished_and_writes_no_half_run(signum, status, tmp_path):
    """Ctrl-C or SIGTERM stops the run: exit 130 / 143, one line naming the notebooks that finished, no traceback, and
    no executed copy of the notebook that was running."""
    directory = tmp_path / "notebooks"
    directory.mkdir()
    marker = tmp_path / "started"
    _write_notebook(directory / "01_ok.ipynb", ["print('fast')"])
    _write_notebook(directory / "02_slow.ipynb", [f"open({str(marker)!r}, 'w').close()\nimport time\ntime.sleep(120)"])
    code, error = _interrupt_reproduce(directory, tmp_path / "results", 1, lambda _: marker.exists(), signum)
    assert code == status, error
    assert error.strip().splitlines()[-1].startswith("cliplab reproduce: interrupted; notebooks finished: 01_ok;")
    assert sorted(p.name for p in (tmp_path / "results" / "shapes").glob("*.ipynb")) == ["01_ok.ipynb"]


@pytest.mark.notebooks
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_reproduce_stops_every_notebook_running_at_the_time(signum, status, tmp_path):
    """Two notebooks at a time: the signal stops both kernels (none outlives the run), and neither is written."""
    directory = tmp_path / "notebooks"
    directory.mkdir()
    markers = [tmp_path / "01_slow", tmp_path / "02_slow"]
    for marker in markers:
        _write_notebook(directory / f"{marker.name}.ipynb", [
            f"import os, time\nopen({str(marker)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)"])
    code, error = _interrupt_reproduce(directory, tmp_path / "results", 2,
                                       lambda _: all(m.exists() and m.read_text() for m in markers), signum)
    assert code == status, error
    assert error.strip().splitlines()[-1].startswith("cliplab reproduce: interrupted; notebooks finished: none;")
    assert not list((tmp_path / "results").rglob("*.ipynb"))
    kernels = [int(m.read_text()) for m in markers]  # both had started: they ran at the same time
    assert not [pid for pid in kernels if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_while_cliplab_starts_is_one_line(signum, status, tmp_path):
    """A stop in the first seconds, while torch is importing: one line and the signal's status (before the handler
    came first, Ctrl-C printed the import's traceback, 15 to 58 lines, and SIGTERM ended it without a word)."""
    def torch_importing(pid):
        return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()

    code, error = _interrupt(["evaluate", "--out", str(tmp_path / "eval")], torch_importing, signum, poll_s=0.005)
    assert code == status, error
    assert len(error.splitlines()) == 1 and error.startswith("cliplab") and "interrupted" in error, error
    assert not (tmp_path / "eval").exists()


@pytest.mark.notebooks
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_while_a_kernel_starts_is_one_line(signum, status, tmp_path):
    """The signal comes as the notebook's kernel process starts, before its first cell (an asyncio.CancelledError
    traceback, in two of three tries, before): one line, the signal's status, no kernel left."""
    directory = tmp_path / "notebooks"
    directory.mkdir()
    _write_notebook(directory / "01_slow.ipynb", ["import time\ntime.sleep(120)"])
    kernels = []

    def kernel_started(pid):  # the kernel, not a passing child such as torch's ``ldconfig -p`` while it imports
        kernels.extend(child for child in psutil.Process(pid).children(recursive=True) if _is_kernel(child))
        return bool(kernels)

    code, error = _interrupt_reproduce(directory, tmp_path / "results", 1, kernel_started, signum)
    assert code == status, error
    # the notebook's progress bar, then one line
    assert [line for line in error.strip().splitlines() if not line.startswith("01_slow:")] == [
        "cliplab reproduce: interrupted; notebooks finished: none; those running were stopped and not written "
        "(their earlier copies, if any, are unchanged)"]
    time.sleep(1)
    assert not [kernel for kernel in kernels if kernel.is_running() and kernel.status() != "zombie"]


def test_nbclients_pollers_end_quietly_once_a_stop_took_the_kernel_away():
    """nbclient polls a running cell's kernel every second and reads its outputs as they come; a stop shuts the kernel
    down and its client goes. The kernel poller then reads the kernel as dead, cancelling the wait for the cell's
    reply as nbclient does for a dead kernel, and the output poller ends cancelled: neither ends in the AssertionError
    that asyncio printed as a traceback (3 of 8 test runs of two kernels each beside other work, before)."""
    client = runner._client_class()(nbformat.v4.new_notebook())
    client.stop(signal.SIGINT)  # before any kernel: nothing to shut down, the signal kept
    assert client.kc is None and client.stopped_by == signal.SIGINT

    async def poll_kernel() -> bool:
        client.task_poll_for_reply = asyncio.ensure_future(asyncio.sleep(60))  # the cell's wait for its reply
        await client._async_poll_kernel_alive()  # returns after its one-second period, raising nothing
        with contextlib.suppress(asyncio.CancelledError):
            await client.task_poll_for_reply
        return client.task_poll_for_reply.cancelled()

    assert asyncio.run(poll_kernel())
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(client._async_poll_output_msg("a message id", nbformat.v4.new_code_cell(), 0))


@pytest.mark.parametrize("argv, says", [
    (["evaluate", "--out", "{tmp}/eval"], "interrupted; nothing was written ({tmp}/eval/evaluation.json is as it "
                                          "was)"),
    (["finetune", "--out", "{tmp}/run"], "interrupted before the first checkpoint; nothing to resume in {tmp}/run"),
    (["train-shapes-clip", "--out", "{tmp}/w.safetensors"], "interrupted; nothing was saved to {tmp}/w.safetensors"),
])
def test_ctrl_c_stops_every_command_with_one_line(argv, says, tmp_path, capsys, monkeypatch):
    from cliplab.study import pretraining as shapes_clip
    from cliplab.study import finetuning, report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    for owner, name in ((report, "evaluate"), (finetuning, "finetune_and_evaluate"), (shapes_clip, "train_shapes_clip")):
        monkeypatch.setattr(owner, name, interrupted)
    assert main([arg.format(tmp=tmp_path) for arg in argv]) == 130
    assert capsys.readouterr().err == f"cliplab {argv[0]}: {says.format(tmp=tmp_path)}\n"


def test_an_interrupted_finetune_says_whether_it_can_resume(tmp_path):
    """Before its first checkpoint a stopped run has nothing to resume (it used to advise --resume all the same)."""
    args = SimpleNamespace(command="finetune", out=tmp_path)
    assert cli._interrupted(args, []) == f"interrupted before the first checkpoint; nothing to resume in {tmp_path}"
    (tmp_path / "latest.json").write_text("{}")
    assert cli._interrupted(args, []).endswith("continue with the same command and --resume")


def test_a_signal_while_torch_imports_is_said_once_the_import_is_over(monkeypatch, capsys):
    """Ctrl-C while the commands (torch) import: raised there, the KeyboardInterrupt broke numpy's import into an
    AttributeError or a RecursionError, and inside torch's C++ start-up it aborted the process (SIGABRT, about 90
    lines). The signal is kept until the import is over, then said in one line, status 130."""
    import types

    imported = []

    class Importing(types.ModuleType):
        def __getattr__(self, name):
            if name != "run":
                raise AttributeError(name)
            os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the import
            imported.append(name)  # the import goes on to its end
            return lambda *args: pytest.fail("the command ran after the signal")

    monkeypatch.setitem(sys.modules, "cliplab.cli.commands", Importing("cliplab.cli.commands"))
    monkeypatch.delattr(cliplab.cli, "commands", raising=False)
    assert main(["evaluate"]) == 130 and imported == ["run"]
    assert capsys.readouterr().err == "cliplab: interrupted while starting; nothing was done\n"


def test_finetune_into_a_directory_in_use_is_refused_before_loading(no_work, tmp_path, capsys):
    """The run's lock is taken right after the checks: a second run fails at once, not after loading the model."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from cliplab._io import run_lock\nwith run_lock(Path(sys.argv[1])):\n"
                               "    print('held', flush=True); time.sleep(60)", str(tmp_path / "run")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["finetune", "--out", str(tmp_path / "run")]) == 2  # not Started
        assert f"is in use by another fine-tuning run (pid {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()


@pytest.mark.parametrize("device, native, precision, resolved", [
    ("cpu", True, "auto", "bf16"), ("cpu", False, "auto", "fp32"), ("cpu", False, "bf16", "bf16"),
    ("cpu", True, "fp32", "fp32"), ("meta", True, "auto", "fp32")])
def test_auto_precision_is_bf16_where_the_device_computes_it(device, native, precision, resolved, monkeypatch):
    """--precision auto: bf16 autocast on a CPU with bf16 arithmetic, fp32 on one without; the line every command
    prints names the arithmetic and the reason."""
    monkeypatch.setattr(cliplab._torch, "cpu_has_bf16", lambda: native)
    assert cliplab._torch.resolve_precision(device, precision) == resolved
    line = cliplab._torch.precision_line(device, precision)
    assert line.startswith(f"precision: {'bf16 autocast' if resolved == 'bf16' else 'fp32'}")
    assert ("computes bf16 natively" in line) == (precision == "auto" and resolved == "bf16")
    if device == "cpu":
        with cliplab._torch.autocast(torch.device(device), precision):
            assert torch.is_autocast_enabled("cpu") == (resolved == "bf16")


def test_update_pins_fp32_and_refuses_bf16(monkeypatch):
    """The committed notebooks read the same on every machine: --update runs fp32 whatever the CPU computes."""
    monkeypatch.setattr(cliplab._torch, "cpu_has_bf16", lambda: True)
    monkeypatch.delenv("CLIPLAB_PRECISION", raising=False)
    job = runner.plan_reproduction(cliplab.get_profile("shapes", device="cpu"), only=["01"], update=True)
    assert job.profile.runtime.precision == "fp32" and "precision: fp32" in str(job)
    assert "committed notebooks they rewrote" in job.arithmetic()
    with pytest.raises(ValueError, match="--update writes the committed notebooks.*drop --precision bf16"):
        runner.plan_reproduction(cliplab.get_profile("shapes", device="cpu", precision="bf16"), only=["01"],
                                 update=True)
    plain = runner.plan_reproduction(cliplab.get_profile("shapes", device="cpu"), only=["01"])
    assert "bf16 autocast (auto: this CPU computes bf16 natively" in str(plain)
    assert "bf16" in plain.arithmetic() and "--precision fp32" in plain.arithmetic()
    # an fp32 run of the shapes profile is the committed notebooks' arithmetic, whose checked outputs it holds to
    # compare with when it ends; a smoke run's have nothing to compare with
    fp32 = runner.plan_reproduction(cliplab.get_profile("shapes", device="cpu", precision="fp32"), only=["01"])
    assert fp32.arithmetic().endswith("in fp32, the arithmetic of the committed notebooks.")
    assert fp32.committed["01_attacks"] == checked.checked_outputs(runner.default_notebook_dir() / "01_attacks.ipynb")
    smoke = runner.plan_reproduction(cliplab.get_profile("shapes", device="cpu", precision="fp32", smoke=True),
                                     only=["01"])
    assert smoke.committed == {} and smoke.compared([]) == ""


def test_the_suite_pins_the_notebooks_to_fp32():
    """nbval's kernels inherit the test process's environment (conftest): fp32, the committed outputs' arithmetic."""
    assert os.environ["CLIPLAB_PRECISION"] == "fp32"
    assert cliplab.get_profile("shapes").runtime.precision == "fp32"


@pytest.mark.parametrize("option", ["threads", "jobs"])
def test_more_threads_or_jobs_than_cores_are_refused(option):
    cores = runner.usable_cores()
    with pytest.raises(ValueError, match=rf"^--{option} must be at most {cores}, the cores this process may use, "
                                         rf"got {cores + 1}$"):
        runner.plan_reproduction(cliplab.get_profile("shapes", device="cpu"), only=["01"], **{option: cores + 1})


def test_update_probes_the_notebooks_directory_before_any_notebook_runs(monkeypatch, tmp_path):
    """--update writes into the notebooks' directory: it is probed with --results, before the first kernel starts
    (this suite runs as root, for whom no mode bit makes a directory read-only: the probe is made to fail)."""
    probed = []

    def probe(path, name):
        probed.append(name)
        if name == "notebooks":
            raise PermissionError(f"notebooks: cannot write in {path} (Read-only file system)")

    monkeypatch.setattr(runner, "check_directory", probe)
    with pytest.raises(PermissionError, match="^notebooks: cannot write in"):
        runner.plan_reproduction(cliplab.get_profile("shapes", device="cpu"), only=["01"], update=True,
                                 results=tmp_path)
    assert probed == ["results", "notebooks"]
    probed.clear()
    runner.plan_reproduction(cliplab.get_profile("shapes", device="cpu"), only=["01"], results=tmp_path)
    assert probed == ["results"]


def test_evaluate_help_prints_its_percent_signs_once(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert "95% CIs" in out and "%%" not in out


def test_a_truncated_notebook_is_named_before_any_kernel_starts(tmp_path, notebooks):
    broken = tmp_path / "notebooks"
    broken.mkdir()
    for path in Path(notebooks).glob("*.ipynb"):
        (broken / path.name).write_text(path.read_text())
    victim = sorted(broken.glob("[0-9][0-9]_*.ipynb"))[-1]
    victim.write_text(victim.read_text()[:50])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(victim))} is not a readable notebook"):
        runner.plan_reproduction(cliplab.get_profile("shapes", device="cpu"), notebooks=broken, results=tmp_path)


def test_the_notebooks_are_found_from_anywhere_in_an_editable_install(tmp_path, monkeypatch):
    """Run from another directory, ``reproduce`` finds the checkout's notebooks (the path beside the package was
    cliplab/notebooks, which never exists)."""
    monkeypatch.chdir(tmp_path)
    assert runner.default_notebook_dir() == Path(runner.__file__).resolve().parents[2] / "notebooks"


def test_reproduce_replaces_only_a_runs_notebooks_and_runs_once_per_results(notebooks, tmp_path, held_lock, capsys):
    """A notebook the user had in the results directory is not replaced; a second run into the same results
    directory is refused at once, naming the first."""
    results = tmp_path / "results"
    (results / "shapes").mkdir(parents=True)
    (results / "shapes" / "01_ok.ipynb").write_text("my notebook")
    assert main(["reproduce", "--notebooks", str(notebooks), "--results", str(results), "--only", "01"]) == 2
    assert "holds 01_ok.ipynb, which no reproduce run wrote there" in capsys.readouterr().err
    (results / "shapes" / "01_ok.ipynb").unlink()
    with held_lock(results / "shapes", "reproduce run") as pid:
        assert main(["reproduce", "--notebooks", str(notebooks), "--results", str(results), "--only", "01"]) == 2
    assert f"is in use by another reproduce run (pid {pid})" in capsys.readouterr().err


def test_threads_from_the_environment_are_checked_as_the_flag_is(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1000")
    with pytest.raises(ValueError, match=r"^\$OMP_NUM_THREADS must be at most \d+, the cores this process may use"):
        runner.parallelism("cpu", 7)


def test_update_names_a_notebook_it_could_not_replace_before_any_kernel_starts(tmp_path, monkeypatch):
    """An immutable notebook (chattr +i; root passes every permission check) failed after its run: found first."""
    directory = tmp_path / "notebooks"
    directory.mkdir()
    _write_notebook(directory / "01_ok.ipynb", ["print('fast')"])
    real_open = open

    def immutable(path, *args, **kwargs):
        if str(path).endswith("01_ok.ipynb") and args[:1] == ("a",):
            raise PermissionError(1, "Operation not permitted", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", immutable)
    with pytest.raises(PermissionError, match=r"notebooks: .*01_ok.ipynb cannot be replaced \(Operation not "
                                              r"permitted\)"):
        runner.plan_reproduction(cliplab.get_profile("shapes"), notebooks=directory, results=tmp_path / "results",
                                 update=True)

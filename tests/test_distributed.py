"""cliplab under torchrun, on the CPU: two processes (gloo) train like one, a killed rank resumes exactly, sharded
evaluations give exactly the single-process counts, and bad launches fail on every rank without hanging.

The tests marked ``distributed`` launch real ``torchrun`` jobs (``python -m torch.distributed.run --standalone``) of
``distributed_worker.py`` or of ``cliplab`` itself; the last two check the helpers without a process group."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cliplab
from cliplab import _distributed, training as ft
from cliplab._io import RunLocked
from cliplab.cli import main

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402


WORKER = Path(__file__).with_name("distributed_worker.py")
CONFIG = dict(steps=4, batch_size=8, attack_steps=2, save_every=2, eval_every=2, warmup=1, lr=1e-3, progress=False)
RUNS = {"fare-full": dict(method="fare", adapter="full"), "tecoa-oft": dict(method="tecoa", adapter="oft")}


def torchrun_job(test):
    """Marks a test that launches torchrun jobs: ``distributed``, and ``slow`` (every job starts Python thrice)."""
    return pytest.mark.distributed(pytest.mark.slow(test))


def torchrun(*args, processes: int = 2, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """A torchrun job of ``processes`` CPU processes on this machine, one torch thread each; its output as text."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               *map(str, args)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)


def run_worker(*args, **kwargs) -> subprocess.CompletedProcess:
    return torchrun(WORKER, *args, **kwargs)


def config_json(run: str, **overrides) -> str:
    return json.dumps({**CONFIG, **RUNS[run], **overrides})


def single_process(run: str, out: Path) -> cliplab.ZeroShotClassifier:
    """The same fine-tuning in this process (no process group), with the worker's data and classifier."""
    x, y = worker.training_data()
    config = ft.FinetuneConfig(**json.loads(config_json(run)))
    return ft.finetune(worker.random_classifier(), x, y, config, out, eval_data=(x[:16], y[:16]))


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """Each run of ``RUNS`` trained once by a torchrun job of two processes: its directory."""
    runs = {}
    for run in RUNS:
        runs[run] = tmp_path_factory.mktemp(run) / "out"
        job = run_worker("finetune", runs[run], config_json(run))
        assert job.returncode == 0, job.stderr[-3000:]
    return runs


@torchrun_job
@pytest.mark.parametrize("run", RUNS)
def test_two_processes_train_like_one_with_the_same_global_batch(two_process_runs, tmp_path, run):
    """The 2-process run splits each global batch of 8 into two halves whose gradients DDP averages; the sum of two
    half-batch means rounds differently from one mean, so the weights agree within float tolerance, not bitwise."""
    single = single_process(run, tmp_path / "single").model.state_dict()
    distributed = load_file(two_process_runs[run] / f"checkpoint-{CONFIG['steps']}.safetensors")
    single = {name: weight for name, weight in single.items() if name.startswith("visual.")}  # all a checkpoint holds
    assert distributed.keys() == single.keys()
    for name, weight in single.items():
        torch.testing.assert_close(distributed[name], weight, atol=2e-4, rtol=1e-4, msg=name)
    initial = worker.random_classifier().model.state_dict()  # OFT's rotations start at zero, the identity
    assert any(not torch.equal(weight, initial.get(name, torch.zeros_like(weight))) for name, weight in single.items())
    history = json.loads((two_process_runs[run] / "history.json").read_text())
    reference = json.loads((tmp_path / "single" / "history.json").read_text())
    assert [entry.keys() for entry in history] == [entry.keys() for entry in reference]
    for entry, expected in zip(history, reference):  # whole-batch figures, and the held-out evaluation
        assert entry == pytest.approx(expected, abs=1e-4)


@torchrun_job
def test_a_rank_killed_mid_run_resumes_to_exactly_the_uninterrupted_run(two_process_runs, tmp_path):
    out = tmp_path / "killed"
    killed = run_worker("finetune", out, config_json("fare-full"), "--kill-at-step", 3)
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr + killed.stdout
    assert json.loads((out / "latest.json").read_text()) == {"step": 2}  # the checkpoint before the kill
    resumed = run_worker("finetune", out, config_json("fare-full"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = two_process_runs["fare-full"]
    final = f"checkpoint-{CONFIG['steps']}.safetensors"
    expected, got = load_file(reference / final), load_file(out / final)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert (out / "history.json").read_text() == (reference / "history.json").read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


@torchrun_job
def test_sharded_evaluation_gives_exactly_the_single_process_counts(tmp_path):
    """evaluate_robustness (APGD-CE, APGD-T, Square), attack_success_rate, pgd_accuracy and attack_dataset on 90
    images in batches of 16: each process attacks every other batch with that batch's seed."""
    job = run_worker("evaluate", tmp_path / "two.json")
    assert job.returncode == 0, job.stderr[-3000:]
    worker.evaluate(type("Args", (), {"out": tmp_path / "one.json"}), rank=0)
    two, one = (json.loads((tmp_path / name).read_text()) for name in ("two.json", "one.json"))
    assert two == one
    assert 0 < one["robust"]["hits"] < one["clean"]["hits"]  # the attacks did something, and not everything


@torchrun_job
def test_cliplab_evaluate_under_torchrun_reports_the_single_process_numbers(tmp_path, capsys):
    args = ["evaluate", "--dataset", "shapes", "--images", "40", "--eps", "2/255,4/255", "--steps", "3", "--targets",
            "2", "--queries", "10", "--batch-size", "8", "--device", "cpu", "--quiet"]
    job = torchrun("-m", "cliplab", *args, "--out", tmp_path / "two")
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout.count("| eps 4/255 |") == 1  # the table, printed by rank 0 only
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two, one = (json.loads((tmp_path / name / "evaluation.json").read_text()) for name in ("two", "one"))
    assert (two["processes"], one["processes"]) == (2, 1)
    assert two["results"] == one["results"] and two["settings"] == one["settings"]


@torchrun_job
def test_cliplab_benchmark_under_torchrun_writes_the_single_process_cells(tmp_path):
    """The grid sharded over two processes: the same cells, table and CSV as one process, written by rank 0 once."""
    import suite_standins

    for name in ("eurosat", "dtd"):
        suite_standins.write(name, tmp_path / "data", per_class=4)
    args = ["benchmark", "--models", "shapes", "--datasets", "eurosat,dtd", "--data", str(tmp_path / "data"),
            "--images", "12", "--eps", "2/255,4/255", "--steps", "3", "--targets", "2", "--queries", "8",
            "--batch-size", "4", "--device", "cpu", "--quiet"]
    job = torchrun("-m", "cliplab", *args, "--out", tmp_path / "two")
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout.count("| shapes |") == 2  # a table per radius, printed by rank 0 only
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    for cell in ("shapes--eurosat.json", "shapes--dtd.json"):
        two, one = (json.loads((tmp_path / run / "cells" / cell).read_text()) for run in ("two", "one"))
        assert two["results"] == one["results"] and two["settings"] == one["settings"]
    assert (tmp_path / "two" / "benchmark.csv").read_text() == (tmp_path / "one" / "benchmark.csv").read_text()


@torchrun_job
def test_cliplab_finetune_under_torchrun_trains_like_one_process_and_writes_once(tmp_path):
    """The command line end to end (the shapes profile, 2 steps): a global --batch-size of 4 over two processes,
    the before/after evaluations sharded, one final.safetensors and metrics.json, as a single process writes them."""
    args = ["finetune", "--profile", "shapes", "--device", "cpu", "--steps", "2", "--batch-size", "4",
            "--save-every", "1"]
    two = torchrun("-m", "cliplab", *args, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("weights: ") == 1  # the summary, printed by rank 0 only
    one = subprocess.run([sys.executable, "-m", "cliplab", *args, "--out", str(tmp_path / "one")], text=True,
                         capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    distributed, single = (load_file(tmp_path / run / "final.safetensors") for run in ("two", "one"))
    for name, weight in single.items():
        torch.testing.assert_close(distributed[name], weight, atol=2e-4, rtol=1e-4, msg=name)
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("two", "one")]
    assert metrics[0]["config"] == metrics[1]["config"] and metrics[0]["before"] == metrics[1]["before"]


@torchrun_job
def test_a_batch_the_processes_cannot_share_fails_on_every_rank_before_loading(tmp_path):
    out = tmp_path / "run"
    job = torchrun("-m", "cliplab", "finetune", "--profile", "shapes", "--device", "cpu", "--batch-size", "3",
                   "--out", out, timeout=120)
    assert job.returncode != 0
    for rank in (0, 1):
        assert (f"cliplab finetune (rank {rank} of 2): cliplab finetune's checks failed on every process: batch_size "
                f"is the global batch, split evenly over the 2 processes: it must be a multiple of 2, got 3\n"
                in job.stderr)
    assert not out.exists()


@torchrun_job
def test_processes_given_different_settings_all_refuse_to_start(tmp_path):
    out = tmp_path / "run"
    job = run_worker("finetune", out, config_json("fare-full"), "--rank1-seed", 7, timeout=120)
    assert job.returncode != 0
    message = "fine-tuning's settings differ across processes: rank 1 got {'seed': 7} where rank 0 got {'seed': 0}"
    assert job.stderr.count(message) == 2  # raised by both processes
    assert not out.exists()


@torchrun_job
def test_a_resume_directory_one_rank_cannot_see_fails_on_every_rank(two_process_runs, tmp_path):
    """A multi-node run whose --out is not on a shared file system: rank 1 finds no checkpoint to resume."""
    out = tmp_path / "run"
    shutil.copytree(two_process_runs["fare-full"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}  # the lock records its holder
    job = run_worker("finetune", out, config_json("fare-full"), "--resume", "--rank1-out",
                     tmp_path / "elsewhere", timeout=120)
    assert job.returncode != 0
    assert job.stderr.count("failed on 1 of 2 processes: rank 1: cannot resume: no checkpoint in") == 2
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == before  # nothing written


def test_without_a_process_group_the_helpers_are_those_of_one_process():
    assert (_distributed.active(), _distributed.rank_and_size(), _distributed.is_main()) == (False, (0, 1), True)
    assert list(_distributed.my_batches(range(0, 10, 4))) == [0, 4, 8] and _distributed.my_rows(8) == slice(0, 8)
    counts = torch.arange(3)
    assert _distributed.sum_over_ranks(counts) is counts and counts.tolist() == [0, 1, 2]
    _distributed.check_same_everywhere({"seed": 0}, "settings")  # nothing to compare with

    def missing():
        raise FileNotFoundError("no checkpoint")

    with pytest.raises(FileNotFoundError, match="^no checkpoint$"):  # the error itself, not a summary
        _distributed.on_every_rank(missing)


def test_another_process_failure_is_raised_as_its_nearest_built_in_exception():
    """A rank learns of another's failure by class names only: cliplab's RunLocked arrives as FileExistsError, which
    the command line reports as a clean error; a class with no built-in base as RuntimeError."""
    locked = [kind.__name__ for kind in RunLocked.__mro__]
    assert _distributed._exception_type(locked) is FileExistsError
    assert _distributed._exception_type(["Mine", "Exception", "BaseException", "object"]) is RuntimeError


LEAVE_A_GROUP_OF_ONE = """
import os, torch
from cliplab import _distributed
_distributed.start()
import open_clip, torchvision  # both import torch.distributed.nn, which binds the world group when first imported
_distributed.sum_over_ranks(torch.ones(3))
_distributed.stop()
print(sorted(open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's threads from /proc")
def test_leaving_the_process_group_joins_its_threads_even_after_open_clip_is_imported():
    """A process group that outlives stop() keeps gloo's threads running while Python shuts down, and a thread that
    then drops a collective's tensor aborts the process (a torchrun job failed one run in ten this way)."""
    with socket.socket() as probe:  # a free port for the group's store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    group = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    job = subprocess.run([sys.executable, "-c", LEAVE_A_GROUP_OF_ONE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **group, "CUDA_VISIBLE_DEVICES": ""})
    assert job.returncode == 0, job.stderr[-3000:]
    threads = job.stdout.strip().splitlines()[-1]
    assert "gloo" not in threads, f"the process group's threads survived stop(): {threads}"

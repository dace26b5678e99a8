"""Command line: ``cliplab reproduce`` runs the notebooks headless; ``cliplab evaluate`` writes a robustness report
card; ``cliplab finetune``; ``cliplab train-shapes-clip``."""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from ._checks import check_directory, check_int
from .profiles import PROFILES, Profile, get_profile, profile_environment

# what executing the notebooks needs (04 imports ipywidgets), installed by the `notebooks` extra
NOTEBOOK_MODULES = ("nbclient", "nbformat", "ipykernel", "ipywidgets")


@dataclass
class NotebookRun:
    name: str  # notebook file stem, e.g. "01_attacks"
    seconds: float  # wall-clock execution time
    error: str | None  # "cell N: ErrorName: message" when a cell failed


def find_notebooks(directory: Path, only: list[str] | None) -> list[Path]:
    """The numbered notebooks of ``directory``, restricted to the ``only`` prefixes (e.g. ["01", "04"])."""
    notebooks = sorted(directory.glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.ipynb) found in {directory}")
    if only is not None and not only:
        raise ValueError("--only names no notebook: give comma-separated prefixes such as 01,04")
    if only:
        unknown = set(only) - {nb.name[:2] for nb in notebooks}
        if unknown:
            raise ValueError(f"--only names notebooks that do not exist in {directory}: {sorted(unknown)} "
                             f"(have: {', '.join(nb.name[:2] for nb in notebooks)})")
        notebooks = [nb for nb in notebooks if nb.name[:2] in only]
    return notebooks


def clean_notebook(notebook) -> None:
    """Strip what changes on every run (timestamps, widget state, kernel details) but keep the outputs,
    as ``nbstripout --keep-output`` does, so committed notebooks diff cleanly. Execution counts are
    renumbered 1, 2, ...: nbval needs them on cells with outputs, and sequential numbers never change."""
    notebook.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                         "language_info": {"name": "python"}}
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    for count, cell in enumerate(code_cells, start=1):
        cell.execution_count = count
        for output in cell.outputs:
            if "execution_count" in output:
                output.execution_count = count
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)


def _client_class():
    """nbclient's ``NotebookClient`` whose shell channel is polled in slices of a second.

    After a cell that opens widgets (04's ``interact``), the execute reply can sit in the shell socket unseen until
    the pending ``get_msg`` times out (jupyter/nbclient#312); with the cell timeout of an hour that stalled a run
    for the hour (seen here: CI 89 minutes instead of 28; the GPU smoke run stuck on that cell). A fresh poll
    every second finds the waiting reply."""
    from nbclient import NotebookClient

    class SlicedPollClient(NotebookClient):
        async def async_start_new_kernel_client(self):
            client = await super().async_start_new_kernel_client()
            _poll_in_slices(client.shell_channel)
            return client

    return SlicedPollClient


def _poll_in_slices(channel, slice_s: float = 1.0) -> None:
    """Make ``channel.get_msg(timeout)`` wait in ``slice_s`` polls up to the same overall timeout."""
    from queue import Empty

    from jupyter_core.utils import ensure_async

    get_msg = channel.get_msg

    async def sliced(timeout: float | None = None, **kwargs):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = slice_s if deadline is None else min(slice_s, max(0.0, deadline - time.monotonic()))
            try:
                return await ensure_async(get_msg(timeout=left, **kwargs))
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    channel.get_msg = sliced


def execute_notebook(path: Path, out_dir: Path, env: dict[str, str], timeout: int = 3600) -> NotebookRun:
    """Execute ``path`` in a fresh kernel with ``env`` set; write the cleaned executed copy to ``out_dir``."""
    import nbformat
    from nbclient.exceptions import CellExecutionError

    from ._io import atomic_write

    notebook = nbformat.read(path, as_version=4)
    code_cells = sum(cell.cell_type == "code" for cell in notebook.cells)
    bar = tqdm(total=code_cells, desc=path.stem, unit="cell")
    failed_cell = {}

    def on_cell_executed(cell, cell_index, execute_reply, **_):
        bar.update(1)
        if execute_reply and execute_reply.get("content", {}).get("status") == "error":
            failed_cell.setdefault("index", cell_index + 1)  # 1-based, markdown cells counted

    client = _client_class()(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}},
                            on_cell_executed=on_cell_executed)
    start, error = time.perf_counter(), None
    try:
        client.execute(env={**os.environ, **env})  # the kernel's environment carries the profile
    except CellExecutionError as exc:
        error = f"cell {failed_cell.get('index', '?')}: {exc.ename}: {exc.evalue}"
    finally:
        bar.close()
    clean_notebook(notebook)
    with atomic_write(out_dir / path.name) as tmp:
        nbformat.write(notebook, tmp)
    return NotebookRun(path.stem, time.perf_counter() - start, error)


def check_notebook_extra() -> None:
    """Fail at once, saying what to install, when the ``notebooks`` extra is missing."""
    missing = [module for module in NOTEBOOK_MODULES if importlib.util.find_spec(module) is None]
    if missing:
        raise ModuleNotFoundError(f"executing the notebooks needs {', '.join(missing)}: "
                                  "pip install 'cliplab[notebooks]' (in a checkout: pip install -e '.[notebooks]')")


def default_threads() -> int:
    """The torch threads of each notebook kernel: ``$OMP_NUM_THREADS`` where the user set it, else every core this
    process may use (one kernel runs at a time)."""
    given = os.environ.get("OMP_NUM_THREADS")
    if given:
        if not given.strip().isdigit() or int(given) < 1:
            raise ValueError(f"$OMP_NUM_THREADS must be a whole number >= 1, got {given!r}")
        return int(given)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_environment(threads: int) -> dict[str, str]:
    """The environment that gives a kernel ``threads`` torch threads which yield their cores when idle.

    OpenMP's threads spin at every barrier by default, and beside other work on the same cores the spinning
    steals the time the working threads need. ``benchmarks/bench_threads.py`` on 2 cores: beside one busy process
    a PGD workload took 2.4x its quiet time with the default wait and 1.3x waiting passively; quiet, passive
    waiting cost 0-20% (noisy). A shared machine is the case that hurt (a main job of 81 minutes), so passive is
    the default; a policy the user set (``OMP_WAIT_POLICY=ACTIVE`` on a dedicated machine) is kept."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def reproduce(profile: Profile, only: list[str] | None = None, notebooks: Path | None = None,
              results: Path = Path("results"), update: bool = False, threads: int | None = None) -> list[NotebookRun]:
    """Execute the study's notebooks headless for ``profile``; executed copies and PNG figures go to
    ``results_dir(results, profile)`` (figures under ``figures/<notebook>/``). ``update`` writes the executed
    notebooks back in place instead (how the committed outputs are made). Each kernel runs ``threads`` torch
    threads (default: ``default_threads()``).

    Everything that can fail fast does, before the first notebook starts: a missing ``notebooks`` extra,
    unknown notebooks, a results path that cannot be a directory, a smoke run asked to update the repository,
    weights or data that cannot be loaded. A smoke run writes nothing into the repository: its fine-tuned
    encoders go to its results directory too.
    """
    if update and profile.smoke:
        raise ValueError("--update writes the executed notebooks into the repository, which a --smoke run must "
                         "never do: drop --update (a smoke run's notebooks go to its results directory)")
    threads = default_threads() if threads is None else threads
    check_int(threads, "threads")
    check_notebook_extra()
    paths = find_notebooks(notebooks or default_notebook_dir(), only)
    out = results_dir(results, profile)
    check_directory(out, "results")
    profile.check_inputs()
    if profile.smoke and profile.checkpoints is None:
        profile = replace(profile, checkpoints=str((out / "checkpoints").resolve()))
    # the inline backend embeds every figure in the executed notebook (Agg would leave readers no plot)
    print(f"profile {profile.name}{' (smoke run)' if profile.smoke else ''} on {profile.device}, "
          f"{threads} torch thread{'s' * (threads != 1)} per notebook kernel", flush=True)
    env = {**profile_environment(profile), **thread_environment(threads),
           "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    runs = []
    for path in paths:
        env["CLIPLAB_FIGURES"] = str((out / "figures" / path.stem).resolve())
        runs.append(execute_notebook(path, path.parent if update else out, env))
    return runs


def results_dir(results: Path, profile: Profile) -> Path:
    """``results/<profile>``, or ``results/<profile>-smoke`` for a smoke run (never mixed with real results)."""
    return results / (f"{profile.name}-smoke" if profile.smoke else profile.name)


def default_notebook_dir() -> Path:
    """``./notebooks`` when run from a checkout, else the one beside the installed package."""
    for candidate in (Path.cwd() / "notebooks", Path(__file__).resolve().parents[1] / "notebooks"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("no notebooks/ directory found: run from the cliplab checkout or pass --notebooks")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cliplab", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("reproduce", help="execute the notebooks headless and collect their figures")
    _add_profile_arguments(run)
    run.add_argument("--smoke", action="store_true",
                     help="shrink every budget to seconds: runs every cell of every notebook, measures nothing "
                          "(results go to RESULTS/<profile>-smoke, nothing is written into the repository)")
    run.add_argument("--only", type=lambda s: [p.strip() for p in s.split(",") if p.strip()],
                     help="comma-separated notebook numbers, e.g. 01,02")
    run.add_argument("--notebooks", type=Path, help="directory of the notebooks (default: ./notebooks)")
    run.add_argument("--results", type=Path, default=Path("results"))
    run.add_argument("--update", action="store_true",
                     help="write the executed notebooks back into --notebooks (to commit their outputs)")
    run.add_argument("--threads", type=int, default=None,
                     help="torch threads of each notebook kernel (default: $OMP_NUM_THREADS, else the usable cores)")
    tune = commands.add_parser("finetune", help="adversarially fine-tune the image encoder (FARE or TeCoA)")
    _add_profile_arguments(tune)
    tune.add_argument("--method", default="fare", help="fare (unsupervised) or tecoa (supervised)")
    tune.add_argument("--adapter", default="full", help="full or oft")
    tune.add_argument("--block-size", type=int, help="OFT block size (default: the profile's first)")
    tune.add_argument("--eps", type=_radius, help="L-inf radius, e.g. 4/255 or 0.0157 (default: 4/255)")
    tune.add_argument("--steps", type=int, help="optimiser steps (default: the profile's)")
    tune.add_argument("--lr", type=float, help="peak AdamW learning rate (default: the profile's, per adapter)")
    tune.add_argument("--clean-weight", type=float, help="weight of FARE's clean term (default: the profile's)")
    tune.add_argument("--save-every", type=int, default=50)
    tune.add_argument("--eval-every", type=int, default=0,
                      help="clean and robust accuracy on the held-out test images every this many steps (0: never)")
    tune.add_argument("--out", type=_path, required=True, help="directory for checkpoints and results")
    tune.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    tune.add_argument("--seed", type=int, default=0)
    _add_evaluate_parser(commands)
    train = commands.add_parser("train-shapes-clip", help="retrain the shapes profile's tiny CLIP")
    train.add_argument("--out", type=_path, required=True, help="where to write the .safetensors weights")
    train.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(_attach_negative_values(sys.argv[1:] if argv is None else argv))

    try:
        if args.command == "train-shapes-clip":
            return _train_shapes_clip(args.out, args.steps)
        if args.command == "finetune":
            return _finetune(args, _profile(args))
        if args.command == "evaluate":
            return _evaluate(args)
        profile = _profile(args, smoke=args.smoke)
        runs = reproduce(profile, args.only, args.notebooks, args.results, args.update, args.threads)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ModuleNotFoundError) as error:
        print(f"cliplab {args.command}: {error}", file=sys.stderr)
        return 2
    out = results_dir(args.results, profile)
    print(f"\nprofile {profile.name}{' (smoke run)' if profile.smoke else ''}: results in {out}")
    for run_ in runs:
        figures = out / "figures" / run_.name
        count = len(list(figures.glob("*.png"))) if figures.is_dir() else 0
        status = f"FAILED at {run_.error}" if run_.error else f"ok, {count} figures"
        print(f"  {run_.name:<28} {run_.seconds:7.1f} s  {status}")
    return 1 if any(run_.error for run_ in runs) else 0


def _add_evaluate_parser(commands) -> None:
    from .evaluation import ATTACKS, ENSEMBLES, AttackBudget

    default = AttackBudget()
    evaluate = commands.add_parser(
        "evaluate", help="worst-case robust accuracy of a model over an attack ensemble (a robustness report card)",
        description="Clean, per-attack and worst-case robust accuracy at each radius, with n and 95%% CIs: a "
                    "Markdown table on stdout and, with --out, a JSON file with the settings, versions and seed.")
    evaluate.add_argument("--model", default=None,
                          help="a profile (shapes, cifar100) or an open_clip model name such as ViT-B-32 "
                               "(default: the data set's profile)")
    evaluate.add_argument("--pretrained", metavar="PATH_OR_TAG",
                          help="a local checkpoint (a cliplab finetune final.safetensors too) or an open_clip tag "
                               "(default: the profile's own weights; required for a bare model name)")
    evaluate.add_argument("--encoder", type=_path, metavar="PATH",
                          help="an image encoder alone, loaded on top of the model (the notebooks' cache, e.g. "
                               "notebooks/checkpoints/shapes/fare-full.safetensors)")
    evaluate.add_argument("--dataset", default="shapes", choices=("shapes", "cifar100"))
    evaluate.add_argument("--data", type=Path, metavar="DIR", help="directory holding cifar-100-python/")
    evaluate.add_argument("--single-template", action="store_true",
                          help="one prompt per class instead of the data set's prompt ensemble (a faster text head)")
    evaluate.add_argument("--eps", type=_radii, default=(1 / 255, 2 / 255, 4 / 255),
                          help="comma-separated L-inf radii, e.g. 1/255,2/255,4/255 (the default)")
    evaluate.add_argument("--n", type=int, default=1000, help="the first N test images (default: 1000)")
    evaluate.add_argument("--attacks", type=_attack_names, default="standard",
                          help=f"an ensemble: {', '.join(ENSEMBLES)} (default: standard = "
                               f"{', '.join(ENSEMBLES['standard'])}; rand for randomised defences), or "
                               f"comma-separated attacks from {', '.join(ATTACKS)}")
    evaluate.add_argument("--steps", type=int, default=default.steps, help="APGD iterations (default: %(default)s)")
    evaluate.add_argument("--targets", type=int, default=default.num_targets,
                          help="APGD-T target classes (default: %(default)s)")
    evaluate.add_argument("--queries", type=int, default=default.queries,
                          help="Square queries per image (default: %(default)s)")
    evaluate.add_argument("--eot-samples", type=int, default=None,
                          help="EOT draws per APGD step (default: 20 with --attacks rand, else 1)")
    evaluate.add_argument("--votes", type=int, default=1, help="majority vote of this many passes scores an image")
    evaluate.add_argument("--batch-size", type=int, default=256)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", choices=("cpu", "cuda"), help="default: CUDA when available")
    evaluate.add_argument("--fp32", action="store_true", help="float32 on CUDA too (default there: bf16 autocast)")
    evaluate.add_argument("--out", type=_path, help="directory for evaluation.json")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")


def _evaluate(args) -> int:
    """``cliplab evaluate``: check everything, evaluate, print the Markdown table, write the JSON atomically."""
    import torch

    from . import report
    from .evaluation import AttackBudget

    eot = args.eot_samples if args.eot_samples is not None else (20 if args.attacks == "rand" else 1)
    for name in ("n", "steps", "targets", "queries", "votes", "batch_size"):
        check_int(getattr(args, name), f"--{name.replace('_', '-')}")
    check_int(eot, "--eot-samples")
    settings = report.ReportSettings(
        model=args.model or args.dataset, pretrained=_weights(args.pretrained),
        encoder=str(args.encoder.expanduser().resolve()) if args.encoder else None, dataset=args.dataset,
        data_root=str(args.data.expanduser().resolve()) if args.data else None,
        single_template=args.single_template, eps=tuple(args.eps), n=args.n,
        attacks=args.attacks, budget=AttackBudget(steps=args.steps, num_targets=args.targets, queries=args.queries,
                                                  eot_samples=eot),
        votes=args.votes, batch_size=args.batch_size, seed=args.seed,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        precision="fp32" if args.fp32 else "auto")
    if args.out is not None:
        check_directory(args.out, "--out")
    report.check(settings)
    reports = report.evaluate(settings, progress=not args.quiet)
    print(report.markdown(reports))
    if args.out is not None:
        print(f"\nwritten: {report.write_json(args.out / 'evaluation.json', settings, reports)}")
    return 0


def _radii(text: str) -> tuple[float, ...]:
    """``"1/255,2/255,4/255"`` as radii in (0, 1] (argparse type)."""
    radii = tuple(_radius(part.strip()) for part in text.split(",") if part.strip())
    if not radii or any(r == 0 for r in radii):
        raise argparse.ArgumentTypeError(f"expected one or more radii in (0, 1] such as 1/255,4/255, got {text!r}")
    return radii


def _attack_names(text: str) -> str | tuple[str, ...]:
    """An ensemble name, or comma-separated attack names (argparse type)."""
    from .evaluation import ATTACKS, ENSEMBLES

    if text in ENSEMBLES:
        return text
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in ATTACKS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(ENSEMBLES)} or comma-separated attacks from "
                                         f"{', '.join(ATTACKS)}; unknown: {', '.join(unknown) or repr(text)}")
    return names


def _add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose a profile and what it loads, shared by ``reproduce`` and ``finetune``."""
    parser.add_argument("--profile", choices=sorted(PROFILES), help="default: $CLIPLAB_PROFILE, else shapes")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: the profile's (CUDA for cifar100)")
    parser.add_argument("--pretrained", metavar="PATH_OR_TAG",
                        help="model weights: a local checkpoint (.safetensors/.pt/.bin) or an open_clip tag "
                             "(default: the profile's own; cifar100: OpenAI's, from the Hugging Face cache)")
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help="directory holding cifar-100-python/ (default: $CLIPLAB_DATA or ~/.cache/cliplab/data)")
    parser.add_argument("--fp32", action="store_true",
                        help="run in float32 on CUDA too (default there: bfloat16 autocast)")


def _profile(args, smoke: bool = False) -> Profile:
    """The profile the command line names, with local paths made absolute (notebooks run elsewhere)."""
    return get_profile(args.profile, args.device, precision="fp32" if args.fp32 else None,
                       weights=_weights(args.pretrained),
                       data_root=args.data.expanduser().resolve() if args.data else None, smoke=smoke)


def _weights(text: str | None) -> str | None:
    """``--pretrained``: a local file made absolute (notebooks and workers run elsewhere), or a tag as given."""
    if text and (os.sep in text or Path(text).suffix or Path(text).exists()):
        return str(Path(text).expanduser().resolve())
    return text


def _fraction(text: str) -> float:
    """``"4/255"`` or ``"0.0157"`` as a float (argparse type)."""
    numerator, _, denominator = text.partition("/")
    try:
        return float(numerator) / float(denominator or 1)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction such as 4/255, got {text!r}")


def _radius(text: str) -> float:
    """An L-inf radius on [0, 1] images, as ``_fraction`` reads it (argparse type)."""
    value = _fraction(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (pixel values are in [0, 1]), e.g. 4/255; got {text}")
    return value


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--eps -1/255`` as ``--eps=-1/255``. argparse takes a value that starts with '-' and is not a plain number
    for an option and reports only "expected one argument"; attached, the value reaches its type check, which
    says what is allowed."""
    attached: list[str] = []
    for token in argv:
        if attached and re.fullmatch(r"--[\w-]+", attached[-1]) and re.match(r"-[\d.]", token):
            attached[-1] = f"{attached[-1]}={token}"
        else:
            attached.append(token)
    return attached


def _finetune(args, profile: Profile) -> int:
    """``cliplab finetune``: evaluate, fine-tune with checkpoints, evaluate, write final weights and metrics."""
    import json

    from . import finetune as ft
    from ._io import atomic_write
    from .evaluation import robust_accuracy
    from .oft import check_block_size

    given = dict(eps=args.eps, steps=args.steps, lr=args.lr, clean_weight=args.clean_weight,
                 save_every=args.save_every, eval_every=args.eval_every, seed=args.seed)
    config = ft.study_config(profile, args.method, args.adapter, block_size=args.block_size,
                             **{k: v for k, v in given.items() if v is not None})
    config.validate()
    ft.check_out(args.out, config, args.resume)  # before the model, the data and the "before" evaluation
    architecture = profile.check_inputs()
    if config.adapter == "oft":
        check_block_size(architecture.visual, config.block_size)
    classifier = profile.load_classifier()
    x, y, _ = profile.load_dataset("train", n=profile.finetune_images)
    x_test, y_test, _ = profile.load_dataset("test", n=profile.n_defence)

    def evaluate(model):
        result = robust_accuracy(model, x_test, y_test, eps=config.eps, steps=profile.attack_steps,
                                 restarts=profile.restarts, loss="margin", seed=0, progress=False)
        return {"clean": _as_dict(result.clean), "robust": _as_dict(result.robust)}

    metrics = {"config": {**vars(config)}, "eps": config.eps, "before": evaluate(classifier)}
    ft.finetune(classifier, x, y, config, args.out, resume=args.resume, eval_data=(x_test, y_test))
    metrics["after"] = evaluate(classifier)
    ft.export_weights(classifier, args.out / "final.safetensors")
    with atomic_write(args.out / "metrics.json") as tmp:
        Path(tmp).write_text(json.dumps(metrics, indent=2))
    for when in ("before", "after"):
        print(f"{when:>6}: clean {metrics[when]['clean']['text']}, robust at eps={255 * config.eps:g}/255 "
              f"{metrics[when]['robust']['text']}")
    print(f"weights: {args.out / 'final.safetensors'} (load_classifier({profile.name!r}, pretrained=...))")
    return 0


def _as_dict(proportion) -> dict:
    low, high = proportion.ci95
    return {"value": proportion.value, "n": proportion.n, "ci95": [low, high], "text": str(proportion)}


def _path(text: str) -> Path:
    """An argparse type: a non-empty path (an empty one would silently mean the working directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a path, got an empty string")
    return Path(text)


def _train_shapes_clip(out: Path, steps: int | None) -> int:
    import torch

    from .models import save_weights
    from .shapes_clip import ShapesCLIPConfig, train_shapes_clip

    config = ShapesCLIPConfig() if steps is None else ShapesCLIPConfig(steps=steps)
    save_weights(train_shapes_clip(config), out, dtype=torch.float16)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

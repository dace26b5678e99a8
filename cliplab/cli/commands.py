"""Command line: ``cliplab reproduce`` runs the notebooks headless; ``cliplab evaluate`` writes a robustness report
card; ``cliplab benchmark`` a grid of them (models x zero-shot data sets); ``cliplab finetune``;
``cliplab train-shapes-clip``.

This module only parses arguments and dispatches: the notebook runner is ``cli.reproduce``, the evaluation
``study.report``, the grid ``study.benchmark``, the fine-tuning workflow ``study.finetuning.finetune_and_evaluate``."""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import warnings
from pathlib import Path

from .. import _distributed
from .._arguments import check_int, check_new_file
from .._torch import PRECISIONS
from ..study.profiles import PROFILES, Profile, Runtime, get_profile
from ..training.config import ADAPTERS
from .reproduce import plan_reproduction, reproduce
from .stopping import StopSignals

# what bad input raises: reported as one line and exit status 2, not as a traceback
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, ModuleNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    """Every command and flag (the docs' commands are checked against it: tests/test_docs.py)."""
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
    run.add_argument("--jobs", type=int, default=None,
                     help="notebooks executed at a time (default: on the CPU, one per share of the usable cores; on "
                          "a GPU, one)")
    run.add_argument("--threads", type=int, default=None,
                     help="torch threads of each notebook kernel (default: $OMP_NUM_THREADS, else the usable cores "
                          "divided among the notebooks running at a time)")
    tune = commands.add_parser("finetune", help="adversarially fine-tune the image encoder (FARE or TeCoA)")
    _add_profile_arguments(tune)
    tune.add_argument("--method", default="fare", help="fare (unsupervised) or tecoa (supervised)")
    tune.add_argument("--adapter", default="full", choices=ADAPTERS,
                      help="what is trained: full (every weight), oft (orthogonal rotations), lora (low-rank "
                           "updates), last-k (the last blocks), bitfit (biases and norms); default: full")
    tune.add_argument("--block-size", type=int, help="oft: block size (default: the profile's first)")
    tune.add_argument("--rank", type=int, help="lora: rank (default: the profile's first)")
    tune.add_argument("--blocks", type=int, help="last-k: how many of the last blocks (default: the profile's first)")
    tune.add_argument("--eps", type=_radius, help="L-inf radius, e.g. 4/255 or 0.0157 (default: 4/255)")
    tune.add_argument("--steps", type=int, help="optimiser steps (default: the profile's)")
    tune.add_argument("--batch-size", type=int,
                      help="images per optimiser step, over all processes under torchrun (default: the profile's)")
    tune.add_argument("--lr", type=float, help="peak AdamW learning rate (default: the profile's, per adapter)")
    tune.add_argument("--clean-weight", type=float, help="weight of FARE's clean term (default: the profile's)")
    tune.add_argument("--save-every", type=int, default=50)
    tune.add_argument("--eval-every", type=int, default=0,
                      help="clean and robust accuracy on the held-out test images every this many steps (0: never)")
    tune.add_argument("--out", type=_path, required=True, help="directory for checkpoints and results")
    tune.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    tune.add_argument("--seed", type=int, default=0)
    _add_evaluate_parser(commands)
    _add_benchmark_parser(commands)
    train = commands.add_parser("train-shapes-clip", help="retrain the shapes profile's tiny CLIP")
    train.add_argument("--out", type=_path, required=True, help="where to write the .safetensors weights")
    train.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    train.add_argument("--steps", type=int, default=None)
    return parser


def run(argv: list[str] | None, stop: StopSignals) -> int:
    """The command ``argv`` asks for, under ``stop`` (``cli.main``'s handler of SIGINT and SIGTERM)."""
    args = build_parser().parse_args(_attach_negative_values(sys.argv[1:] if argv is None else argv))
    runs = []  # the notebooks that ran to the end, for the message of an interrupted reproduce
    try:
        if args.command in WORKFLOWS and _launched_by_torchrun():
            return _distributed_command(args)
        if args.command == "train-shapes-clip":
            return _train_shapes_clip(args.out, args.steps, args.overwrite)
        if args.command in WORKFLOWS:
            return WORKFLOWS[args.command](args)
        with contextlib.ExitStack() as held:  # one run per results (and, with --update, notebooks) directory
            job = plan_reproduction(_profile(args, smoke=args.smoke), args.only, args.notebooks, args.results,
                                    args.update, args.threads, args.jobs,
                                    hold=lambda where: held.enter_context(_output_lock(where, "reproduce run")))
            print(job, flush=True)  # everything is checked: say what runs, then run it
            runs.extend(reproduce(job))
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt) or stop.received is not None:
            _print_error(f"cliplab {args.command}: {_interrupted(args, runs)}")
            return stop.status(error)
        if isinstance(error, USER_ERRORS):
            _print_error(f"cliplab {args.command}: {error}")
            return 2
        raise
    profile, out = job.profile, job.out
    print(f"\nprofile {profile.name}{' (smoke run)' if profile.smoke else ''}: results in {out}")
    for run_ in sorted(runs, key=lambda run_: run_.name):
        figures = out / "figures" / run_.name
        count = len(list(figures.glob("*.png"))) if figures.is_dir() else 0
        status = f"FAILED at {run_.error}" if run_.error else f"ok, {count} figures"
        if run_.cell_seconds:  # where the time went (benchmarks/notebook_cells.py gives every cell)
            cell = max(run_.cell_seconds, key=run_.cell_seconds.get)
            status += f"; slowest: cell {cell}, {run_.cell_seconds[cell]:.0f} s"
        print(f"  {run_.name:<28} {run_.seconds:7.1f} s  {status}")
    print(job.arithmetic())
    if compared := job.compared(runs):
        print(compared)
    return 1 if any(run_.error for run_ in runs) else 0


def _interrupted(args, runs) -> str:
    """One line for a stopped command: what finished, what did not, and that nothing was half-written."""
    if args.command == "reproduce":
        done = ", ".join(sorted(run.name for run in runs)) or "none"
        return (f"interrupted; notebooks finished: {done}; those running were stopped and not written "
                f"(their earlier copies, if any, are unchanged)")
    if args.command == "finetune":
        if not (args.out / "latest.json").is_file():
            return f"interrupted before the first checkpoint; nothing to resume in {args.out}"
        return (f"interrupted; {args.out} keeps the last saved checkpoint: continue with the same command and "
                f"--resume")
    if args.command == "evaluate":
        return "interrupted; nothing was written" + (f" ({args.out / 'evaluation.json'} is as it was)" if args.out
                                                     else "")
    if args.command == "benchmark":
        return f"interrupted; {args.out}/cells keeps every finished cell: run the same command to resume"
    return f"interrupted; nothing was saved to {args.out}"


def _print_error(line: str) -> None:
    """Write ``line`` to stderr in one piece: under torchrun every process shares the launcher's stderr, and print's
    two writes (the text, then the newline) let another process's line fall between them."""
    sys.stderr.write(line + "\n")


def _launched_by_torchrun() -> bool:
    """torchrun (and any launcher of its kind) describes the process group in these variables."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def _distributed_command(args) -> int:
    """``finetune`` or ``evaluate`` as one process of a torchrun job: join the group, check that every process was
    given the same arguments, run; errors are reported by every process, results by the main one."""
    _distributed.start()
    try:
        _distributed.check_same_everywhere(vars(args), "the command-line arguments")
        if args.command == "finetune":
            return _finetune(args, _distributed.on_every_rank(lambda: _profile(args), "choosing the profile"))
        return WORKFLOWS[args.command](args)
    except USER_ERRORS as error:
        rank, world = _distributed.rank_and_size()
        _print_error(f"cliplab {args.command} (rank {rank} of {world}): {error}")
        return 2
    finally:
        _distributed.stop()


# the one-line help (cliplab --help) and the description (cliplab COMMAND --help) of the two evaluation commands
SUMMARIES = {
    "evaluate": "worst-case robust accuracy of a model over an attack ensemble (a robustness report card)",
    "benchmark": "worst-case zero-shot robustness of several models on several data sets (a grid)",
}
DESCRIPTIONS = {
    "evaluate": "Clean, per-attack and worst-case robust accuracy at each radius, with n and 95% CIs: a Markdown table "
                "on stdout and, with --out, a JSON file with the settings, versions and seed.",
    "benchmark": "Clean and worst-case robust accuracy of every model on every data set of the zero-shot suite, one "
                 "cell at a time, each written to OUT/cells as it finishes (run the same command again to resume); "
                 "then OUT/benchmark.md, .csv and .png.",
}


def _add_evaluate_parser(commands) -> None:
    evaluate = commands.add_parser("evaluate", help=SUMMARIES["evaluate"], description=DESCRIPTIONS["evaluate"])
    evaluate.add_argument("--model", default=None,
                          help="a profile (shapes, cifar100) or an open_clip model name such as ViT-B-32 "
                               "(default: the data set's profile)")
    _add_pretrained_argument(evaluate, "the profile's own weights; required for a bare model name")
    evaluate.add_argument("--encoder", type=_path, metavar="PATH",
                          help="an image encoder alone, loaded on top of the model (the notebooks' cache, e.g. "
                               "notebooks/encoders/shapes/fare-full.safetensors)")
    evaluate.add_argument("--dataset", default="shapes", choices=("shapes", "cifar100"))
    evaluate.add_argument("--data", type=Path, metavar="DIR", help="directory holding cifar-100-python/")
    evaluate.add_argument("--single-template", action="store_true",
                          help="one prompt per class instead of the data set's prompt ensemble (a faster text head)")
    evaluate.add_argument("--eps", type=_radii, default=(1 / 255, 2 / 255, 4 / 255),
                          help="comma-separated L-inf radii, e.g. 1/255,2/255,4/255 (the default)")
    evaluate.add_argument("--n", "--images", type=int, default=1000, dest="n",
                          help="test images, a seeded sample of the test split, the benchmark's for the same N and "
                               "seed (default: 1000; Shapes-100: its first N, already random; under torchrun write "
                               "--images: torchrun takes --n for an abbreviation of its own options)")
    _add_attack_budget_arguments(evaluate)
    evaluate.add_argument("--eot-samples", type=int, default=None,
                          help="EOT draws per APGD step (default: 20 with --attacks rand, else 1)")
    evaluate.add_argument("--votes", type=int, default=1, help="majority vote of this many passes scores an image")
    evaluate.add_argument("--batch-size", type=int, default=256)
    evaluate.add_argument("--seed", type=int, default=0, help="seeds the sample of images and every attack")
    _add_precision_arguments(evaluate, device="default: CUDA when available")
    evaluate.add_argument("--out", type=_path, help="directory for evaluation.json")
    evaluate.add_argument("--overwrite", action="store_true",
                          help="replace an evaluation.json already in --out (default: refuse, before any work)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_attack_budget_arguments(parser) -> None:
    """The attack ensemble and its budget, as ``evaluate`` and ``benchmark`` take them."""
    from ..evaluation.ensemble import ATTACKS, ENSEMBLES, AttackBudget

    default = AttackBudget()
    parser.add_argument("--attacks", type=_attack_names, default="standard",
                        help=f"an ensemble: {', '.join(ENSEMBLES)} (default: standard = "
                             f"{', '.join(ENSEMBLES['standard'])}; rand for randomised defences), or "
                             "comma-separated attacks: " + "; ".join(f"{name} ({attack.about})"
                                                                      for name, attack in ATTACKS.items()))
    parser.add_argument("--steps", type=int, default=default.steps, help="APGD iterations (default: %(default)s)")
    parser.add_argument("--targets", type=int, default=default.num_targets,
                        help="APGD-T target classes (default: %(default)s)")
    parser.add_argument("--queries", type=int, default=default.queries,
                        help="Square queries per image (default: %(default)s)")


def _add_benchmark_parser(commands) -> None:
    from ..suite import SUITE

    bench = commands.add_parser("benchmark", help=SUMMARIES["benchmark"], description=DESCRIPTIONS["benchmark"])
    bench.add_argument("--models", type=_model_specs, required=True,
                       help="comma-separated [LABEL=]NAME[:PRETRAINED][+ENCODER]: a profile (shapes, cifar100), an "
                            "open_clip architecture with a tag or a checkpoint (ViT-B-32:openai, "
                            "ViT-B-32:/ckpt.safetensors) or a hub model (fare=hf-hub:chs20/fare2-clip)")
    bench.add_argument("--datasets", type=_dataset_names, required=True,
                       help=f"comma-separated, from {', '.join(SUITE)}; or all")
    bench.add_argument("--data", type=Path, metavar="DIR",
                       help="the directory holding every data set in torchvision's layout (default: $CLIPLAB_DATA or "
                            "~/.cache/cliplab/data); see docs/benchmark.md")
    bench.add_argument("--eps", type=_radii, default=(2 / 255, 4 / 255),
                       help="comma-separated L-inf radii (default: 2/255,4/255)")
    bench.add_argument("--n", "--images", type=int, default=1000, dest="n",
                       help="images per data set, a seeded sample of its test split (default: 1000)")
    _add_attack_budget_arguments(bench)
    bench.add_argument("--batch-size", type=int, default=128)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--single-template", action="store_true",
                       help="one prompt per class instead of each data set's prompt ensemble")
    bench.add_argument("--image-size", type=int, default=224,
                       help="side to which photographs of many sizes are resized and cropped (default: 224)")
    _add_precision_arguments(bench, device="default: CUDA when available")
    bench.add_argument("--out", type=_path, required=True, help="directory of the cells and the results")
    bench.add_argument("--quiet", action="store_true", help="no progress bars")


def _benchmark(args) -> int:
    """``cliplab benchmark``: check everything, evaluate the missing cells, write the table, CSV and figure."""
    from ..study import benchmark

    benchmark.check_not_theirs(args.out)
    # one run per --out, from its checks (they read the cells there) to the tables; run takes the same lock
    with _output_lock(args.out, "benchmark run"):
        settings = _distributed.on_every_rank(lambda: _benchmark_settings(args), "cliplab benchmark's checks")
        _say_precision(settings.runtime)
        cells = benchmark.run(settings, args.out, progress=not args.quiet, log=print, checked=True)
        if _distributed.is_main():
            written = benchmark.write_outputs(cells, settings, args.out)
            print("\n" + benchmark.markdown(cells, settings))
            print("\nwritten: " + ", ".join(map(str, written)))
    return 0


def _benchmark_settings(args):
    from ..study import benchmark

    for name in ("n", "steps", "targets", "queries", "batch_size", "image_size"):
        check_int(getattr(args, name), f"--{name.replace('_', '-')}")
    settings = benchmark.BenchmarkSettings(
        models=args.models, datasets=args.datasets, threat=_threat(args, _budget(args)), n=args.n,
        batch_size=args.batch_size, seed=args.seed, single_template=args.single_template, image_size=args.image_size,
        runtime=_runtime(args, weights=None))
    benchmark.check(settings, args.out)
    return settings


def _model_specs(text: str):
    """Comma-separated model specs (argparse type)."""
    from ..study.benchmark import ModelSpec

    try:
        specs = tuple(ModelSpec.parse(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not specs:
        raise argparse.ArgumentTypeError("expected one or more models, e.g. ViT-B-32:openai,hf-hub:chs20/fare2-clip")
    return specs


def _dataset_names(text: str) -> tuple[str, ...]:
    """Comma-separated names of the zero-shot suite, or ``all`` (argparse type)."""
    from ..suite import SUITE

    return tuple(SUITE) if text.strip() == "all" else _listed(text, SUITE, "all or comma-separated names from")


def _threat(args, budget):
    """The ``ThreatModel`` of ``--eps`` and ``--attacks`` with ``budget`` (it checks itself; ``--eps`` names the radii
    in its errors)."""
    from ..evaluation.ensemble import ThreatModel

    try:
        return ThreatModel(tuple(args.eps), "linf", args.attacks, budget)
    except ValueError as error:
        raise ValueError(f"--{error}" if str(error).startswith("eps ") else str(error)) from None


def _budget(args, eot_samples: int = 1):
    from ..evaluation.ensemble import AttackBudget

    return AttackBudget(steps=args.steps, num_targets=args.targets, queries=args.queries, eot_samples=eot_samples)


def _runtime(args, weights) -> Runtime:
    """Device (checked: an explicit cuda needs a GPU), precision, weights and the data directory of ``args``."""
    import torch

    _check_device(args.device)
    return _warn_if_bf16_is_emulated(Runtime(
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), precision=args.precision or "auto",
        weights=weights, data_root=str(args.data.expanduser().resolve()) if args.data else None))


def _evaluate(args) -> int:
    """``cliplab evaluate``: check everything, evaluate, print the Markdown table, write the JSON atomically."""
    from ..study import report

    settings = _distributed.on_every_rank(lambda: _report_settings(args), "cliplab evaluate's checks")
    _say_precision(settings.runtime)
    with _output_lock(args.out, "evaluation"):  # a second evaluation into --out is refused before any model loads
        reports = report.evaluate(settings, progress=not args.quiet)
        if _distributed.is_main():
            print(report.markdown(reports))
            if args.out is not None:
                print(f"\nwritten: {report.write_json(args.out / 'evaluation.json', settings, reports)}")
    return 0


def _output_lock(out: Path | None, what: str):
    """``run_lock`` on a command's output directory, held by the main process (none without ``--out``)."""
    from .._io import run_lock

    return run_lock(out, what) if out is not None and _distributed.is_main() else contextlib.nullcontext()


def _report_settings(args):
    """``cliplab evaluate``'s settings, each checked, with the weights and the data, before any model is built."""
    from ..study import report

    eot = args.eot_samples if args.eot_samples is not None else (20 if args.attacks == "rand" else 1)
    for name in ("n", "steps", "targets", "queries", "votes", "batch_size"):
        check_int(getattr(args, name), f"--{name.replace('_', '-')}")
    check_int(eot, "--eot-samples")
    runtime = _runtime(args, weights=_weights(args.pretrained))
    settings = report.ReportSettings(
        model=args.model or args.dataset, encoder=str(args.encoder.expanduser().resolve()) if args.encoder else None,
        dataset=args.dataset, single_template=args.single_template, threat=_threat(args, _budget(args, eot)), n=args.n,
        votes=args.votes, batch_size=args.batch_size, seed=args.seed, runtime=runtime)
    if args.out is not None:
        check_new_file(args.out / "evaluation.json", "--out", args.overwrite)
    report.check(settings)
    return settings


def _radii(text: str) -> tuple[float, ...]:
    """``"1/255,2/255,4/255"`` as radii in (0, 1] (argparse type)."""
    radii = tuple(_radius(part.strip()) for part in text.split(",") if part.strip())
    if not radii or any(r == 0 for r in radii):
        raise argparse.ArgumentTypeError(f"expected one or more radii in (0, 1] such as 1/255,4/255, got {text!r}")
    return radii


def _attack_names(text: str) -> str | tuple[str, ...]:
    """An ensemble name, or comma-separated attack names (argparse type)."""
    from ..evaluation.ensemble import ATTACKS, ENSEMBLES

    return text if text in ENSEMBLES else _listed(text, ATTACKS, f"one of {', '.join(ENSEMBLES)} or comma-separated "
                                                                 "attacks from")


def _listed(text: str, known, allowed: str) -> tuple[str, ...]:
    """The comma-separated names of ``text``, each one of ``known``; else an error saying what is ``allowed``."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"must be {allowed} {', '.join(known)}; unknown: "
                                         f"{', '.join(unknown) or repr(text)}")
    return names


def _add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose a profile and what it loads, shared by ``reproduce`` and ``finetune``."""
    parser.add_argument("--profile", choices=sorted(PROFILES), help="default: $CLIPLAB_PROFILE, else shapes")
    _add_pretrained_argument(parser, "the profile's own; cifar100: OpenAI's, from the Hugging Face cache")
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help="directory holding cifar-100-python/ (default: $CLIPLAB_DATA or ~/.cache/cliplab/data)")
    _add_precision_arguments(parser, device="default: the profile's (CUDA for cifar100)")


def _add_pretrained_argument(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--pretrained", metavar="PATH_OR_TAG",
                        help="model weights: a local checkpoint (.safetensors/.pt/.bin; a cliplab finetune "
                             f"final.safetensors too) or an open_clip tag (default: {default})")


def _add_precision_arguments(parser: argparse.ArgumentParser, device: str) -> None:
    """``--device`` (``device`` says its default), then ``--precision`` and its shorthand ``--fp32``, one or the
    other."""
    parser.add_argument("--device", choices=("cpu", "cuda"), help=device)
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument(
        "--precision", choices=PRECISIONS,
        help="auto (the default): bfloat16 autocast where the device computes bf16 natively (CUDA GPUs from Ampere "
             "on, CPUs with AVX512-BF16 or AMX), float32 elsewhere; bf16: bfloat16 autocast on any device; fp32: "
             "float32 everywhere, the arithmetic of the committed notebooks (reproduce --update always runs it). "
             "reproduce and finetune default to $CLIPLAB_PRECISION")
    precision.add_argument("--fp32", dest="precision", action="store_const", const="fp32", help="--precision fp32")


def _check_device(device: str | None) -> None:
    """One rule for every command: a CUDA device asked for (``--device cuda``, or ``$CLIPLAB_DEVICE=cuda`` where
    ``--device`` is not given) without a GPU is an error, before any work; only a device nobody asked for (the
    cifar100 profile's default) falls back to the CPU, with a warning."""
    import torch

    source = "--device" if device else "$CLIPLAB_DEVICE"
    if (device or os.environ.get("CLIPLAB_DEVICE")) == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{source} cuda: no CUDA GPU is available to torch here (torch.cuda.is_available() is "
                         f"False); use --device cpu, or leave {source} out")


def _warn_if_bf16_is_emulated(runtime: Runtime) -> Runtime:
    """bf16 on an x86 CPU without bf16 arithmetic runs, but slower than fp32: say so before the work starts."""
    from .. import _torch

    if runtime.precision == "bf16" and runtime.device == "cpu" and _torch.cpu_emulates_bf16():
        warnings.warn("precision bf16: this CPU has no bf16 arithmetic (AVX512-BF16 or AMX), so torch emulates it, "
                      "more slowly than fp32")
    return runtime


def _say_precision(runtime: Runtime) -> None:
    """Every command's one line on the precision it runs in, and why (on the main process only)."""
    from .. import _torch

    if _distributed.is_main():
        print(_torch.precision_line(runtime.device, runtime.precision), flush=True)


def _profile(args, smoke: bool = False) -> Profile:
    """The profile the command line names, with local paths made absolute (notebooks run elsewhere)."""
    _check_device(args.device)
    profile = get_profile(args.profile, args.device, precision=args.precision, weights=_weights(args.pretrained),
                          data_root=args.data.expanduser().resolve() if args.data else None, smoke=smoke)
    _warn_if_bf16_is_emulated(profile.runtime)
    return profile


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
    from ..study.finetuning import finetune_and_evaluate

    given = dict(eps=args.eps, steps=args.steps, batch_size=args.batch_size, lr=args.lr, clean_weight=args.clean_weight,
                 save_every=args.save_every, eval_every=args.eval_every, seed=args.seed)
    config = profile.finetune_config(args.method, args.adapter, block_size=args.block_size, rank=args.rank,
                                     blocks=args.blocks, **given)
    _say_precision(profile.runtime)
    metrics = finetune_and_evaluate(profile, config, args.out, resume=args.resume)
    if not _distributed.is_main():
        return 0
    for when in ("before", "after"):
        print(f"{when:>6}: clean {metrics[when]['clean']['text']}, robust at eps={255 * config.eps:g}/255 "
              f"{metrics[when]['robust']['text']}")
    print(f"weights: {args.out / 'final.safetensors'} (load_classifier({profile.name!r}, pretrained=...))")
    return 0


def _path(text: str) -> Path:
    """An argparse type: a non-empty path (an empty one would silently mean the working directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a path, got an empty string")
    return Path(text)


def _train_shapes_clip(out: Path, steps: int | None, overwrite: bool) -> int:
    import torch

    from ..models import save_weights
    from ..study.pretraining import ShapesCLIPConfig, train_shapes_clip

    config = ShapesCLIPConfig() if steps is None else ShapesCLIPConfig(steps=steps)
    check_new_file(out, "--out", overwrite)  # before the training, whose model would otherwise be lost
    save_weights(train_shapes_clip(config), out, dtype=torch.float16)
    print(f"saved {out}")
    return 0


# the commands that run under torchrun too, each from its parsed arguments
WORKFLOWS = {"finetune": lambda args: _finetune(args, _profile(args)), "evaluate": _evaluate, "benchmark": _benchmark}

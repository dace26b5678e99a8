"""How a notebook kernel's torch threads fare beside other work: the choices behind ``cliplab reproduce --threads``
and ``--jobs``.

One PGD workload (the shapes CLIP, 256 images, 3 x PGD-5) runs in a fresh process, the way a notebook kernel
runs it, under each thread setting: quiet, then beside ``--busy`` processes that each spin one core. Prints each
time and its ratio to the quiet run with ``cliplab.cli.reproduce.thread_environment``'s setting (the baseline, measured in
the same invocation). Then (``--jobs``) as many workloads as there are cores, one after the other with every core
each, against all at once with one thread each (``cliplab reproduce``'s default on the CPU).

    python benchmarks/bench_threads.py [--busy 1] [--repeats 2] [--jobs]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from cliplab.cli.reproduce import thread_environment, usable_cores

WORKLOAD = """
import time, torch, cliplab
clf = cliplab.load_classifier("shapes")
x, y, _ = cliplab.load_dataset("shapes", "test", n=256)
cliplab.pgd(clf, x[:8], y[:8], eps=4 / 255, steps=1)
start = time.perf_counter()
for _ in range(3):
    cliplab.pgd(clf, x, y, eps=4 / 255, steps=5, seed=0)
print(time.perf_counter() - start)
"""


def run_workload(environment: dict[str, str], repeats: int) -> float:
    """The fastest of ``repeats`` runs of the workload in a fresh process with ``environment``."""
    return min(max(run_together(environment, 1)) for _ in range(repeats))


def run_together(environment: dict[str, str], count: int) -> list[float]:
    """The workload's seconds in each of ``count`` fresh processes with ``environment``, all started at once."""
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    processes = [subprocess.Popen([sys.executable, "-c", WORKLOAD], env={**env, **environment},
                                  stdout=subprocess.PIPE, text=True) for _ in range(count)]
    outputs = [process.communicate()[0] for process in processes]
    if any(process.returncode for process in processes):
        raise RuntimeError("a workload failed")
    return [float(output) for output in outputs]


def compare_jobs(cores: int, repeats: int) -> None:
    """``cores`` workloads one after the other with every core each, then all at once with one thread each."""
    alone = sum(run_workload(thread_environment(cores), repeats) for _ in range(cores))
    together = min(max(run_together(thread_environment(1), cores)) for _ in range(repeats))
    print(f"{cores} workloads one after the other, {cores} threads each: {alone:6.2f} s; all at once, 1 thread each: "
          f"{together:6.2f} s (the slowest); {alone / together:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, default=1, help="processes spinning one core each, for the loaded runs")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--jobs", action="store_true", help="only compare notebooks at a time (cliplab reproduce --jobs)")
    args = parser.parse_args()
    cores = usable_cores()
    if args.jobs:
        return compare_jobs(cores, args.repeats)
    settings = {f"{cores} threads, passive (cliplab)": thread_environment(cores),
                f"{cores} threads, OpenMP's default wait": {"OMP_NUM_THREADS": str(cores)},
                "1 thread": {"OMP_NUM_THREADS": "1"}}
    baseline = None
    for load in (0, args.busy):
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
        try:
            time.sleep(0.5 if load else 0)
            for name, environment in settings.items():
                seconds = run_workload(environment, args.repeats)
                baseline = baseline or seconds  # the first: cliplab's setting on a quiet machine
                print(f"{'quiet' if not load else f'beside {load} busy':>14}  {name:<40} {seconds:6.2f} s  "
                      f"{seconds / baseline:5.2f}x", flush=True)
        finally:
            for spinner in spinners:
                spinner.kill()


if __name__ == "__main__":
    main()

"""How a notebook kernel's torch threads fare beside other work: the choice behind ``cliplab reproduce --threads``.

One PGD workload (the shapes CLIP, 256 images, 3 x PGD-5) runs in a fresh process, the way a notebook kernel
runs it, under each thread setting: quiet, then beside ``--busy`` processes that each spin one core. Prints each
time and its ratio to the quiet run with ``cliplab.cli.reproduce.thread_environment``'s setting (the baseline, measured in
the same invocation).

    python benchmarks/bench_threads.py [--busy 1] [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from cliplab.cli.reproduce import default_threads, thread_environment

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
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    times = [float(subprocess.run([sys.executable, "-c", WORKLOAD], env={**env, **environment}, check=True,
                                  capture_output=True, text=True).stdout) for _ in range(repeats)]
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, default=1, help="processes spinning one core each, for the loaded runs")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cores = default_threads()
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

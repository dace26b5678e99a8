"""Attacks with glibc's malloc as it comes, and as cliplab sets it for its notebook kernels and commands
(``cliplab._memory``: the memory a pass frees kept for the next).

Each setting runs in fresh processes, one after the other and alternating (a process's malloc settings cannot be
undone): the shapes CLIP as the notebooks attack it, 250 images, one torch thread, a PGD run of ``--steps`` steps
(forward + input-backward passes) and a Square run of as many queries (forward passes), each after a warm-up run.
Prints the median time per step over the processes, the system time and minor page faults per step (the pages the
kernel mapped and zeroed anew), and each time's ratio to glibc's defaults (the baseline, measured in the same
invocation).

    python benchmarks/bench_malloc.py [--steps 20] [--processes 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from cliplab._memory import malloc_environment

WORKLOAD = """
import json, resource, sys, time, torch, cliplab
torch.set_num_threads(1)
clf = cliplab.load_classifier("shapes", device="cpu", precision="fp32")  # as the notebooks attack it
x, y, _ = cliplab.load_dataset("shapes", split="test", n=250)
steps, result = int(sys.argv[1]), {}
attacks = {"PGD (forward + input-backward passes)": lambda: cliplab.pgd(clf, x, y, eps=4 / 255, steps=steps, seed=0),
           "Square (forward passes)": lambda: cliplab.square(clf, x, y, eps=4 / 255, queries=steps, seed=0)}
for name, attack in attacks.items():
    attack()  # warm-up
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    attack()
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    result[name] = dict(ms=1000 * seconds / steps, sys_ms=1000 * (after.ru_stime - before.ru_stime) / steps,
                        faults=(after.ru_minflt - before.ru_minflt) / steps)
print(json.dumps(result))
"""

SETTINGS = {"glibc's defaults": {}, "cliplab's (GLIBC_TUNABLES)": malloc_environment({})}


def run(environment: dict[str, str], steps: int) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **environment)
    done = subprocess.run([sys.executable, "-c", WORKLOAD, str(steps)], env=env, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="PGD steps and Square queries per run")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per setting, alternating")
    args = parser.parse_args(argv)
    runs = {name: [] for name in SETTINGS}
    for _ in range(args.processes):
        for name, environment in SETTINGS.items():
            runs[name].append(run(environment, args.steps))
    print(f"shapes CLIP, 250 images, one thread; per step, medians over {args.processes} processes of {args.steps} steps:\n")
    print("| attack | malloc | ms per step (speed-up) | system ms per step | minor page faults per step |")
    print("|---|---|---:|---:|---:|")
    for kind in runs["glibc's defaults"][0]:
        baseline = statistics.median(result[kind]["ms"] for result in runs["glibc's defaults"])
        for name, results in runs.items():
            ms, sys_ms, faults = (statistics.median(result[kind][key] for result in results)
                                  for key in ("ms", "sys_ms", "faults"))
            print(f"| {kind} | {name} | {ms:.0f} ({baseline / ms:.2f}x) | {sys_ms:.1f} | {faults:.0f} |")


if __name__ == "__main__":
    main()

"""cliplab._memory: glibc's malloc keeps the blocks attack steps free, in a child given its environment and in a
process that calls keep_freed_memory, measured by what it saves: the pages the kernel maps anew (minor page faults)
when the same blocks come back."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cliplab import _memory
from cliplab.cli import reproduce as runner

glibc_only = pytest.mark.skipif(_memory._glibc_mallopt() is None, reason="glibc's malloc only")

# Attack steps on the shapes CLIP as the notebooks run them (250 images, its weights trainable): the minor page faults
# of the last two of four PGD runs of two steps (each run two forward + input-backward passes and a forward pass)
CHURN = """
import json, resource, sys
import torch, cliplab
if sys.argv[1] == "mallopt":
    from cliplab._memory import keep_freed_memory
    print(json.dumps(keep_freed_memory()))
torch.set_num_threads(1)
clf = cliplab.load_classifier("shapes", device="cpu", precision="fp32")
x, y, _ = cliplab.load_dataset("shapes", split="test", n=250)
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cliplab.pgd(clf, x, y, eps=4 / 255, steps=2, seed=0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(sum(faults[2:])))
"""
MAPPED_EACH_TIME = "glibc.malloc.mmap_threshold=131072"  # a user's own: every block of more than 128 KiB mapped


def _churn(tunables: str | None, mode: str = "env") -> list:
    env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    done = subprocess.run([sys.executable, "-c", CHURN, mode], env=env, capture_output=True, text=True, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()]


@glibc_only
@pytest.mark.slow
def test_a_child_with_the_environment_and_a_process_after_keep_freed_memory_map_fewer_pages_than_glibcs_defaults():
    (by_default,) = _churn(None)
    if by_default < 5_000:  # e.g. transparent huge pages for every mapping: little left to save
        pytest.skip(f"glibc's defaults mapped only {by_default} pages anew here")
    (kept,) = _churn(_memory.malloc_environment({})["GLIBC_TUNABLES"])
    took, kept_here = _churn(None, "mallopt")
    assert kept < by_default / 5 and kept_here < by_default / 5 and took is True


@glibc_only
@pytest.mark.parametrize("environ", [{"GLIBC_TUNABLES": MAPPED_EACH_TIME}, {"MALLOC_TRIM_THRESHOLD_": "0"}])
def test_keep_freed_memory_leaves_the_thresholds_the_environment_set(environ):
    done = subprocess.run([sys.executable, "-c", "from cliplab._memory import keep_freed_memory as k; print(k())"],
                          env={**os.environ, **environ}, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_the_environment_puts_other_tunables_of_the_users_after_cliplabs_and_leaves_their_thresholds_alone():
    ours = _memory.malloc_environment({})["GLIBC_TUNABLES"]
    assert ours == f"glibc.malloc.mmap_threshold={32 << 20}:glibc.malloc.trim_threshold={256 << 20}"
    assert _memory.malloc_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) == \
        {"GLIBC_TUNABLES": f"{ours}:glibc.malloc.hugetlb=1"}
    for theirs in ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, {"MALLOC_MMAP_THRESHOLD_": "65536"},
                   {"GLIBC_TUNABLES": ours}):  # the user's own thresholds, in either form, or ours inherited
        assert _memory.malloc_environment(theirs) == {}


def test_reproduces_kernels_get_the_threads_and_the_malloc_settings(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert runner.kernel_environment(1) == {**runner.thread_environment(1), **_memory.malloc_environment({})}

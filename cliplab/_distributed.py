"""The few ``torch.distributed`` operations cliplab needs, each a no-op in a single process.

Under ``torchrun`` every process runs the same program; the data-set level functions (``attack_dataset``,
``evaluate_robustness``, the trainer) split their batches by rank with ``my_batches`` and add up what each process
found with ``sum_over_ranks``. Checks that can fail on one process only (a directory another node cannot see) go
through ``on_every_rank``, so that every process raises the same error instead of the others waiting forever in the
next collective.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def active() -> bool:
    """Whether this process belongs to a process group (torchrun), even a group of one."""
    return dist.is_available() and dist.is_initialized()


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 without an initialised process group)."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and shows progress."""
    return rank_and_size()[0] == 0


def start(timeout: timedelta = timedelta(minutes=30)) -> None:
    """Join the process group ``torchrun`` describes in the environment: NCCL for CUDA tensors when there is a GPU,
    gloo for CPU tensors (and for the small objects the checks exchange). Each process uses the GPU of its local
    rank, so that ``"cuda"`` means a different GPU in every process."""
    if dist.is_initialized():
        return
    # torch.distributed.nn binds the world group as its functions' default argument when it is first imported, and
    # torchvision and open_clip import it. Imported after the group exists, it keeps the group alive past
    # destroy_process_group: gloo's worker threads then outlive the interpreter, and one that drops a collective's
    # tensor while Python shuts down aborts the process ("terminate called without an active exception"). Imported
    # now, it binds nothing, and stop() joins those threads.
    import torch.distributed.nn  # noqa: F401
    cuda = torch.cuda.is_available()
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timeout)
    if cuda:
        torch.cuda.set_device(dist.get_node_local_rank(fallback_rank=dist.get_rank() % torch.cuda.device_count()))


def stop() -> None:
    """Leave the process group; its worker threads are joined, so that the process can exit cleanly."""
    if active():
        dist.destroy_process_group()


def my_batches(starts: Sequence[int]) -> Sequence[int]:
    """This process's share of a data set's batches (given by their first index): every ``world``-th one from its
    rank on, so that each batch, with its seed, is attacked by exactly one process, as in a single process."""
    rank, world = rank_and_size()
    return starts[rank::world]


def my_rows(batch_size: int) -> slice:
    """This process's contiguous share of a global batch of ``batch_size`` rows (which the world size divides)."""
    rank, world = rank_and_size()
    share = batch_size // world
    return slice(rank * share, (rank + 1) * share)


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all processes, in place (the tensor itself without a process group).
    Where each element was filled by exactly one process and is zero in the others, this gathers them exactly."""
    if active():  # a group of one too: a torchrun job of one process runs the same collectives as a large one
        dtype = tensor.dtype
        summed = tensor.to(torch.int64) if dtype == torch.bool else tensor  # gloo cannot add booleans
        dist.all_reduce(summed)
        if dtype == torch.bool:
            tensor.copy_(summed.bool())
    return tensor


def on_every_rank(check: Callable[[], T], what: str = "check") -> T:
    """Run ``check`` in every process; if it raises in any, raise in all of them, naming the ranks and their errors
    (with the first failure's exception type). A single process just runs it."""
    if rank_and_size()[1] == 1:
        return check()
    error: BaseException | None = None
    result = None
    try:
        result = check()
    except Exception as caught:  # collected, so that the other processes learn of it
        error = caught
    errors = _gather(([kind.__name__ for kind in type(error).__mro__], str(error)) if error is not None else None)
    failed = [(rank, failure) for rank, failure in enumerate(errors) if failure is not None]
    if failed:
        ranks_by_text: dict[str, list[int]] = {}
        for rank, (_, text) in failed:
            ranks_by_text.setdefault(text, []).append(rank)
        if len(failed) == len(errors) and len(ranks_by_text) == 1:
            message = f"{what} failed on every process: {failed[0][1][1]}"
        else:
            message = f"{what} failed on {len(failed)} of {len(errors)} processes: " + "; ".join(
                f"rank {', '.join(map(str, ranks))}: {text}" for text, ranks in ranks_by_text.items())
        kind = type(error) if error is not None else _exception_type(failed[0][1][0])
        try:
            raised = kind(message)
        except Exception:  # an exception class that wants other arguments
            raised = RuntimeError(message)
        raise raised from error
    return result


def check_same_everywhere(settings: Any, what: str) -> None:
    """Refuse to go on unless every process was given the same ``settings`` (a picklable value): different batch
    sizes or data on different ranks would otherwise make them wait for each other forever, or silently mix runs."""
    if rank_and_size()[1] == 1:
        return
    every = _gather(settings)
    differing = [rank for rank, theirs in enumerate(every) if theirs != every[0]]
    if differing:
        ranks = ", ".join(map(str, differing))
        raise ValueError(f"{what} differ across processes: rank {ranks} got {_describe(every[differing[0]], every[0])}"
                         f" where rank 0 got {_describe(every[0], every[differing[0]])}; launch every process with "
                         f"the same arguments")


def _gather(value: Any) -> list:
    every = [None] * rank_and_size()[1]
    dist.all_gather_object(every, value)
    return every


def _describe(settings: Any, other: Any) -> str:
    """The entries of ``settings`` that ``other`` does not share (all of it when it is not a dict)."""
    if isinstance(settings, dict) and isinstance(other, dict):
        return repr({k: settings.get(k) for k in sorted(settings.keys() | other.keys(), key=str)
                     if settings.get(k) != other.get(k)})
    return repr(settings)


def _exception_type(names: list[str]) -> type[Exception]:
    """The first built-in exception class among ``names`` (the class hierarchy of a failure on another process, e.g.
    FileExistsError for cliplab's RunLocked), else ``RuntimeError``."""
    import builtins

    for name in names:
        kind = getattr(builtins, name, None)
        if isinstance(kind, type) and issubclass(kind, Exception) and kind is not Exception:
            return kind
    return RuntimeError

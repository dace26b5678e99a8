"""The notebook runner behind ``cliplab reproduce``: execute the study's notebooks headless in fresh kernels, each
with its profile's settings and its own torch threads, and write the executed copies (or update them in place)."""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .._arguments import check_directory, check_int
from .._io import atomic_write
from .._memory import malloc_environment
from .._torch import precision_line, resolve_precision
from ..study.profiles import Profile, profile_environment
from .._io import written_by_a_run
from . import checked
from .stopping import STOP_SIGNALS, interruption

# what executing the notebooks needs (04 imports ipywidgets), installed by the `notebooks` extra
NOTEBOOK_MODULES = ("nbclient", "nbformat", "ipykernel", "ipywidgets")
# a widget's view names a model id that lives only in the kernel: new on every run, and nothing without the kernel
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# The study's notebooks from the longest to the shortest: seconds of one torch thread each on the shapes profile, none
# sharing an evaluation (2-core AMD EPYC, 2026-11-29; RESULTS.md of that day, in git): 06 1,135, 05 616, 02 422, 04 350,
# 03 287, 01 117. Several at a time they start in this order, so that no long one starts late and runs on alone at
# the end; 07 comes last, as it reads the evaluations 05 and 06 make and adds a few of its own.
# tests/conftest.py hands pytest's workers the notebooks in the same order.
LONGEST_FIRST = ("06_orthogonal_finetune", "05_adversarial_finetune", "02_eot", "04_denoising",
                 "03_randomized_smoothing", "01_attacks", "07_every_defence")


@dataclass
class NotebookRun:
    name: str  # notebook file stem, e.g. "01_attacks"
    seconds: float  # wall-clock execution time
    error: str | None  # "cell N: ErrorName: message" when a cell failed
    cell_seconds: dict[int, float] = field(default_factory=dict)  # wall time of each code cell run (1-based index)


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
    """Strip what changes on every run (timestamps, widget state and views, kernel details) but keep the outputs,
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
        for output in cell.get("outputs", []):  # the text beside it (what the widget is) stays
            output.get("data", {}).pop(WIDGET_VIEW, None)


def _client_class():
    """nbclient's ``NotebookClient`` whose shell channel is polled in slices of a second, and which leaves signals to
    ``reproduce``.

    After a cell that opens widgets (04's ``interact``), the execute reply can sit in the shell socket unseen until
    the pending ``get_msg`` times out (jupyter/nbclient#312); with the cell timeout of an hour that stalled a run
    for the hour (seen here: CI 89 minutes instead of 28; the GPU smoke run stuck on that cell). A fresh poll
    every second finds the waiting reply.

    nbclient's own setup points SIGINT and SIGTERM at the kernel of the client that set up last, which with several
    notebooks at a time would leave the others running: here ``reproduce`` owns the handlers and stops every
    running client (``stop``)."""
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    class SlicedPollClient(NotebookClient):
        stopped_by = None  # the signal (SIGINT, SIGTERM) that stopped the run, if one did
        _async_cleanup_kernel_future = None  # the shutdown a stop started

        async def async_start_new_kernel_client(self):
            client = await super().async_start_new_kernel_client()
            _poll_in_slices(client.shell_channel)
            return client

        @contextlib.asynccontextmanager
        async def async_setup_kernel(self, **kwargs):
            """Start the kernel and its client, and shut the kernel down afterwards (as nbclient's setup does,
            without its signal handlers)."""
            cleanup_kc = kwargs.pop("cleanup_kc", self.owns_km)
            if self.km is None:
                self.km = self.create_kernel_manager()
            atexit.register(self._cleanup_kernel)  # a kernel never outlives this process
            try:
                if not self.km.has_kernel:
                    await self.async_start_new_kernel(**kwargs)
                if self.kc is None:
                    await self.async_start_new_kernel_client()
                if self.stopped_by is not None:  # stopped while the kernel started: run no cell
                    raise RuntimeError("stopped before the first cell")
                yield
            finally:
                atexit.unregister(self._cleanup_kernel)
                if self._async_cleanup_kernel_future is not None:  # a stop is shutting the kernel down already
                    await self._async_cleanup_kernel_future
                elif cleanup_kc and self.km is not None:
                    await self._async_cleanup_kernel()

        async def _async_check_alive(self):
            """nbclient's check, which takes a kernel that a stop shut down (its client gone) for the dead kernel it
            is. nbclient asserts that the client is there: its poller, which checks every second, met a stop in 3 of
            8 test runs of two kernels each beside other work, and asyncio printed the AssertionError it ended with
            as a traceback ("Task exception was never retrieved")."""
            if self.kc is None and self.stopped_by is not None:
                raise DeadKernelError("the kernel was stopped")
            await super()._async_check_alive()

        async def _async_poll_output_msg(self, *args, **kwargs):
            """nbclient's poller of a cell's outputs, which reads the client's channel at every message: one that ends
            in an error after a stop took the client away ends cancelled instead, which asyncio does not report."""
            try:
                return await super()._async_poll_output_msg(*args, **kwargs)
            except Exception:
                if self.stopped_by is None:
                    raise
                raise asyncio.CancelledError from None

        def stop(self, signum):
            """Shut the kernel down, remembering the signal, so the caller can tell an interruption from a crash."""
            self.stopped_by = signum
            if self.km is not None and self._async_cleanup_kernel_future is None:  # not shut down, nor shutting
                self._async_cleanup_kernel_future = asyncio.ensure_future(self._async_cleanup_kernel())

    return SlicedPollClient


def _local_kernel_manager(sockets: Path):
    """A kernel manager whose kernel talks over Unix sockets in ``sockets`` rather than TCP on the loopback: no port
    another local user could connect to, and no "Kernel is running over TCP without encryption" warning on every
    notebook (the sockets go with the directory)."""
    from jupyter_client.manager import AsyncKernelManager

    return AsyncKernelManager(kernel_name="python3", transport="ipc", ip=str(sockets / "kernel"))


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


async def execute_notebook(path: Path, out_dir: Path, env: dict[str, str], running: set,
                           timeout: int = 3600) -> NotebookRun:
    """Execute ``path`` in a fresh kernel with ``env`` set; write the cleaned executed copy to ``out_dir``. Its
    client is in ``running`` while it runs (``reproduce`` stops what is there when a signal comes)."""
    import nbformat
    from nbclient.exceptions import CellExecutionError

    notebook = nbformat.read(path, as_version=4)
    code_cells = sum(cell.cell_type == "code" for cell in notebook.cells)
    bar = tqdm(total=code_cells, desc=path.stem, unit="cell")
    failed_cell, cell_seconds, started = {}, {}, {}

    def on_cell_start(cell, cell_index, **_):
        started[cell_index] = time.perf_counter()

    def on_cell_executed(cell, cell_index, execute_reply, **_):
        bar.update(1)
        cell_seconds[cell_index + 1] = time.perf_counter() - started.pop(cell_index, time.perf_counter())
        if execute_reply and execute_reply.get("content", {}).get("status") == "error":
            failed_cell.setdefault("index", cell_index + 1)  # 1-based, markdown cells counted

    start, error = time.perf_counter(), None
    with tempfile.TemporaryDirectory(prefix="cliplab-kernel-") as scratch:
        client = _client_class()(notebook, km=_local_kernel_manager(Path(scratch)), timeout=timeout,
                                 kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                                 on_cell_start=on_cell_start, on_cell_executed=on_cell_executed)
        log = Path(scratch) / "kernel.log"
        running.add(client)
        try:
            with open(log, "w") as kernel_output:  # the kernel's own messages, shown only if it dies
                # the kernel's environment carries the profile
                # cleanup_kc: shut the kernel down afterwards, which nbclient does on its own only for a kernel
                # manager it made itself
                await client.async_execute(env={**os.environ, **env}, stdout=kernel_output, stderr=kernel_output,
                                           cleanup_kc=True)
        except CellExecutionError as exc:
            error = f"cell {failed_cell.get('index', '?')}: {exc.ename}: {exc.evalue}"
        except Exception as exc:  # a kernel that died (a failed notebook), or one a signal stopped
            last_words = " | ".join(log.read_text().strip().splitlines()[-3:]) or "nothing"
            error = f"{type(exc).__name__}: {exc} (the kernel's last output: {last_words})"
        finally:
            running.discard(client)
            bar.close()
    if client.stopped_by is not None:  # interrupted: write no half-run copy
        raise _interruption(client.stopped_by)
    clean_notebook(notebook)
    with atomic_write(out_dir / path.name) as tmp:
        nbformat.write(notebook, tmp)
    return NotebookRun(path.stem, time.perf_counter() - start, error, cell_seconds)


def _interruption(signum) -> KeyboardInterrupt:
    """What a stopped run raises (``stopping.interruption``), with the kernel clients' last words silenced."""
    # the kernel clients, collected at exit with their channels half-closed, would log a harmless warning
    logging.getLogger("traitlets").setLevel(logging.ERROR)
    return interruption(signum)


def check_notebook(path: Path) -> None:
    """A notebook nbformat can read (a truncated or hand-broken file is named before any kernel starts)."""
    import nbformat

    try:
        nbformat.read(path, as_version=4)
    except Exception as error:  # JSON, schema or encoding errors, each of nbformat's own kinds
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is not a readable notebook ({type(error).__name__}: {reason})") from None


def check_replaceable(path: Path) -> None:
    """``--update`` can replace ``path``: opened for writing (and left as it is), so that an immutable or read-only
    notebook is named now, not after its run."""
    try:
        with open(path, "a"):
            pass
    except OSError as error:
        raise PermissionError(f"notebooks: {path} cannot be replaced ({error.strerror}): --update writes the executed "
                              "notebook over it") from None


def check_notebook_extra() -> None:
    """Fail at once, saying what to install, when the ``notebooks`` extra is missing."""
    missing = [module for module in NOTEBOOK_MODULES if importlib.util.find_spec(module) is None]
    if missing:
        raise ModuleNotFoundError(f"executing the notebooks needs {', '.join(missing)}: "
                                  "pip install 'cliplab[notebooks]' (in a checkout: pip install -e '.[notebooks]')")


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _threads_in_environment() -> int | None:
    """``$OMP_NUM_THREADS`` where the user set it (checked), else None."""
    given = os.environ.get("OMP_NUM_THREADS")
    if not given:
        return None
    if not given.strip().isdigit() or int(given) < 1:
        raise ValueError(f"$OMP_NUM_THREADS must be a whole number >= 1, got {given!r}")
    if int(given) > usable_cores():  # as --threads: more would only queue for the cores and thrash
        raise ValueError(f"$OMP_NUM_THREADS must be at most {usable_cores()}, the cores this process may use, got "
                         f"{given}")
    return int(given)


def parallelism(device: str, notebooks: int, threads: int | None = None, jobs: int | None = None) -> tuple[int, int]:
    """``(jobs, threads)``: how many of ``notebooks`` notebooks run at a time, and each kernel's torch threads.

    What is given is kept (``threads`` defaults to ``$OMP_NUM_THREADS``). On the CPU the kernels share the usable
    cores: as many notebooks run at a time as there are cores for them, each with an equal share. Kernels of one
    thread each get more done than one kernel with every thread: the study's small matrices and elementwise passes
    do not split well (``benchmarks/bench_threads.py``, 2 cores: 2 threads run a PGD workload 1.39x faster than 1,
    not 2x). On a GPU one notebook runs at a time with every core: kernels would only queue for the one device and
    share its memory."""
    cores = usable_cores()
    threads = threads if threads is not None else _threads_in_environment()
    if jobs is None:
        jobs = 1 if device != "cpu" else max(1, min(notebooks, cores // (threads or 1)))
    if threads is None:
        threads = max(1, cores // jobs)
    return jobs, threads


def thread_environment(threads: int) -> dict[str, str]:
    """The environment that gives a kernel ``threads`` torch threads which yield their cores when idle.

    OpenMP's threads spin at every barrier by default, and beside other work on the same cores the spinning
    steals the time the working threads need. ``benchmarks/bench_threads.py`` on 2 cores: beside one busy process
    a PGD workload took 2.4x its quiet time with the default wait and 1.3x waiting passively; quiet, passive
    waiting cost 0-20% (noisy). A shared machine is the case that hurt (a main job of 81 minutes), so passive is
    the default; a policy the user set (``OMP_WAIT_POLICY=ACTIVE`` on a dedicated machine) is kept."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def kernel_environment(threads: int) -> dict[str, str]:
    """What a notebook kernel runs with, beside the profile: ``threads`` torch threads (``thread_environment``) and a
    malloc that keeps the memory a pass frees for the next (``cliplab._memory``)."""
    return {**thread_environment(threads), **malloc_environment()}


@dataclass(frozen=True)
class Reproduction:
    """A checked ``cliplab reproduce`` job (``plan_reproduction``): which notebooks, for which profile, where to."""

    profile: Profile
    notebooks: list[Path]
    out: Path  # executed copies and figures/<notebook>/ (the notebooks' own directory with ``update``)
    update: bool
    jobs: int  # notebooks executed at a time
    threads: int  # torch threads of each notebook kernel
    # notebook stem -> its checked outputs as committed (read before the run, which --update replaces), for a run of
    # the profile they were made with (shapes, not a smoke run); else empty
    committed: dict[str, dict[int, list[str]]] = field(default_factory=dict)

    def __str__(self) -> str:
        at_a_time = f"{self.jobs} notebooks at a time" if self.jobs > 1 else "one notebook at a time"
        runtime = self.profile.runtime
        precision = ("precision: fp32, the committed outputs' arithmetic (--update writes them)" if self.update
                     else precision_line(runtime.device, runtime.precision))
        return (f"profile {self.profile.name}{' (smoke run)' if self.profile.smoke else ''} on "
                f"{runtime.device}, {at_a_time}, {self.threads} torch "
                f"thread{'s' * (self.threads != 1)} per notebook kernel\n{precision}")

    def arithmetic(self) -> str:
        """What the run's numbers are, said when it ends: the committed fp32 ones, or bf16's."""
        runtime = self.profile.runtime
        if resolve_precision(runtime.device, runtime.precision) == "fp32":
            if self.update:
                return "These numbers were computed in fp32, the arithmetic of the committed notebooks they rewrote."
            return "These numbers were computed in fp32" + (", the arithmetic of the committed notebooks." if
                                                            self.committed else ".")
        return ("These numbers were computed in bf16 autocast: a few images can stand or fall otherwise than in the "
                "fp32 arithmetic of the committed notebooks (--precision fp32 gives theirs).")

    def compared(self, runs: list[NotebookRun]) -> str:
        """The checked outputs of the ``runs`` that ended without an error against the committed ones (with
        ``update``, as they were before the run): ``checked.comparison``'s paragraph, empty where there is nothing to
        compare with (a smoke run, the cifar100 profile)."""
        where = {path.stem: path if self.update else self.out / path.name for path in self.notebooks}
        executed = {run.name: where[run.name] for run in runs if run.error is None and run.name in self.committed}
        return checked.comparison(self.committed, executed,
                                  "the notebooks before this run" if self.update else "the committed notebooks")


def plan_reproduction(profile: Profile, only: list[str] | None = None, notebooks: Path | None = None,
                      results: Path = Path("results"), update: bool = False, threads: int | None = None,
                      jobs: int | None = None, hold=None) -> Reproduction:
    """Check a ``cliplab reproduce`` job, before the first notebook starts: a missing ``notebooks`` extra, unknown
    notebooks, a results path that cannot be a directory, a smoke run asked to update the repository, weights or
    data that cannot be loaded. Executed copies and PNG figures go to ``results_dir(results, profile)`` (figures
    under ``figures/<notebook>/``); ``update`` writes the executed notebooks back in place instead (how the
    committed outputs are made). ``jobs`` notebooks run at a time, each kernel with ``threads`` torch threads
    (defaults: ``parallelism``). A smoke run writes nothing into the repository: its fine-tuned encoders go to its
    results directory too. ``hold(directory)``, if given, is called on each directory the run will write into
    (``Reproduction.outputs``) once they are checked and before the weights and data are: ``cliplab reproduce``
    locks them there, so that a second run is refused at once.
    """
    if update and profile.smoke:
        raise ValueError("--update writes the executed notebooks into the repository, which a --smoke run must "
                         "never do: drop --update (a smoke run's notebooks go to its results directory)")
    if update:  # the committed outputs read the same on every machine: fp32, whatever the CPU computes
        if profile.runtime.precision == "bf16":
            raise ValueError("--update writes the committed notebooks, whose outputs are fp32 on every machine: drop "
                             "--precision bf16 (or $CLIPLAB_PRECISION=bf16)")
        profile = profile.with_runtime(precision="fp32")
    for value, name in ((threads, "threads"), (jobs, "jobs")):
        if value is not None:
            check_int(value, name)
            if value > usable_cores():  # more would only queue for the cores and thrash
                raise ValueError(f"--{name} must be at most {usable_cores()}, the cores this process may use, got "
                                 f"{value}")
    check_notebook_extra()
    paths = find_notebooks(notebooks or default_notebook_dir(), only)
    for path in paths:
        check_notebook(path)
    jobs, threads = parallelism(profile.runtime.device, len(paths), threads, jobs)
    out = results_dir(results, profile)
    check_directory(out, "results")
    check_not_theirs(out)
    if update:  # the executed notebooks replace these, each by a rename in their directory
        check_directory(paths[0].parent, "notebooks")
        for path in paths:
            check_replaceable(path)
    if hold is not None:
        for directory in [out, *([paths[0].parent] if update else [])]:
            hold(directory)
    profile.check_inputs()
    if profile.smoke and profile.runtime.encoder_cache is None:
        profile = profile.with_runtime(encoder_cache=str((out / "encoders").resolve()))
    committed = ({path.stem: checked.checked_outputs(path) for path in paths}
                 if profile.name == "shapes" and not profile.smoke else {})
    return Reproduction(profile, paths, out, update, jobs, threads, committed)


def check_not_theirs(out: Path) -> None:
    """The executed notebooks a run writes into ``out`` replace only a run's (``runs.written_by_a_run``), never
    notebooks a user had there."""
    theirs = sorted(path.name for path in out.glob("[0-9][0-9]_*.ipynb")) if out.is_dir() else []
    if theirs and not written_by_a_run(out):
        raise FileExistsError(f"results: {out} holds {', '.join(theirs)}, which no reproduce run wrote there; "
                              "choose another --results, or move those files away")


def reproduce(job: Reproduction) -> Iterator[NotebookRun]:
    """Execute the notebooks of ``job`` headless, one fresh kernel each, ``job.jobs`` at a time, yielding each run as
    it ends (so that a caller interrupted half-way knows which finished).

    One at a time they run in order. Several at a time, the longest start first (``start_order``). SIGINT or
    SIGTERM stops every running kernel and raises ``KeyboardInterrupt`` or ``Terminated``, with no half-run copy
    written."""
    # the notebooks of this run share their evaluations (05 and 06 evaluate two models alike), and only they: a
    # directory that goes with the run, unless the user named one
    with tempfile.TemporaryDirectory(prefix="cliplab-evaluations-") as evaluations:
        profile = job.profile if job.profile.runtime.evaluation_cache else \
            job.profile.with_runtime(evaluation_cache=evaluations)
        yield from _execute_all(job, profile)


def _execute_all(job: Reproduction, profile: Profile) -> Iterator[NotebookRun]:
    """``reproduce``'s work, with ``profile`` in every kernel."""
    # the inline backend embeds every figure in the executed notebook (Agg would leave readers no plot)
    env = {**kernel_environment(job.threads), "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    waiting = list(job.notebooks) if job.jobs == 1 else start_order(job.notebooks)
    running, tasks, stopped = set(), set(), []  # the kernel clients, the notebooks' tasks, the signals received

    def stop(signum):
        stopped.append(signum)
        for client in list(running):
            client.stop(signum)

    async def run(path):  # an interruption returned, not raised: a KeyboardInterrupt would escape the event loop
        figures = str((job.out / "figures" / path.stem).resolve())
        try:
            return await execute_notebook(path, path.parent if job.update else job.out,
                                          {**env, **profile_environment(profile.with_runtime(figures=figures))},
                                          running)
        except KeyboardInterrupt as stopped_here:
            return stopped_here
        except (Exception, asyncio.CancelledError):  # a kernel start cancelled, a channel closed: what a stop caused
            if stopped:
                return _interruption(stopped[0])
            raise

    with _event_loop(stop) as loop:
        try:
            while (waiting and not stopped) or tasks:
                while waiting and not stopped and len(tasks) < job.jobs:
                    tasks.add(loop.create_task(run(waiting.pop(0))))
                done, tasks = loop.run_until_complete(asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED))
                for result in sorted((task.result() for task in done), key=lambda result: getattr(result, "name", "")):
                    if isinstance(result, KeyboardInterrupt):
                        raise result
                    yield result
            if stopped:
                raise _interruption(stopped[0])
        except (Exception, asyncio.CancelledError):
            if stopped:  # whatever broke as the kernels were being stopped, the run was interrupted
                raise _interruption(stopped[0]) from None
            raise
        finally:
            if tasks:  # an interruption or an error: stop the other kernels and wait for them to shut down
                stop(stopped[0] if stopped else signal.SIGTERM)
                loop.run_until_complete(asyncio.wait(tasks))


@contextlib.contextmanager
def _event_loop(stop):
    """A fresh event loop, the current one for the block, on which SIGINT and SIGTERM call ``stop(signum)``;
    afterwards the tasks left on it (nbclient's pollers of stopped kernels) are cancelled, the caller's signal
    handlers are back and the loop is closed."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # nbclient and jupyter_client look the loop up
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    with contextlib.suppress(RuntimeError, NotImplementedError):  # not the main thread; Windows
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, stop, signum)
    try:
        yield loop
    finally:
        leftovers = asyncio.all_tasks(loop)
        for task in leftovers:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        asyncio.set_event_loop(None)
        for signum, handler in previous.items():
            with contextlib.suppress(RuntimeError, NotImplementedError):
                loop.remove_signal_handler(signum)
            if handler is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signum, handler)  # removing the loop's handler left the default, not the caller's
        loop.close()


def start_order(notebooks: list[Path]) -> list[Path]:
    """``notebooks`` in the order they start when several run at a time: the study's in ``LONGEST_FIRST`` order, then
    any others, the last numbered first (a study's later notebooks build on the earlier ones, and cost more)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # sorted() is stable: the others stay last numbered first
    return sorted(reversed(notebooks), key=lambda path: rank.get(path.stem, len(rank)))


def results_dir(results: Path, profile: Profile) -> Path:
    """``results/<profile>``, or ``results/<profile>-smoke`` for a smoke run (never mixed with real results)."""
    return results / (f"{profile.name}-smoke" if profile.smoke else profile.name)


def default_notebook_dir() -> Path:
    """``./notebooks`` when run from a checkout, else the checkout's that an editable install runs from."""
    for candidate in (Path.cwd() / "notebooks", Path(__file__).resolve().parents[2] / "notebooks"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("no notebooks/ directory found: run from the cliplab checkout or pass --notebooks")

"""Scale-out over a Dask cluster: one task per slide, with the guarantees of a single run.

``preprocess`` and ``predict`` hand each slide to a worker process as one task
(``Client.submit`` and ``as_completed``, as PathML does). The worker opens the slide itself,
builds the encoder (and for predict the model) once per process and keeps it, writes the
slide's outputs to the shared output folder atomically, and returns its small status record;
the client gathers the records as they complete, rebuilds ``status.csv`` and
``predictions.csv``, and shows one progress bar over slides.

Faults. A worker that dies mid-slide (SIGKILL, the nanny's memory limit, a segfault in a C slide
library) loses nothing: its slide goes to another worker, and the lock of the dead worker's
slide (:mod:`zoompipe.locks`) is released by the kernel. A slide that has killed a worker on
every try is marked failed once the scheduler's ``allowed-failures`` are spent
(``ClusterSpec.retries`` for the clusters zoompipe starts), and the run goes on; the nanny
restarts the dead worker. Files are only ever renamed into place complete, so no partial file
looks finished.

Where the cluster comes from (:func:`parse_cluster`): ``local:N`` starts a ``LocalCluster`` of N
worker processes, each running one slide at a time with the machine's cores split between
them (``local:NxT`` for T threads each); ``tcp://HOST:8786`` or a scheduler file joins a
cluster the user started (SLURM through dask-jobqueue, see the README). On CUDA each task
asks for the Dask resource ``GPU=1``, so a worker declared with one GPU takes one slide at a
time.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from tqdm import tqdm

from .errors import UsageError, ZoompipeError, one_line
from .predict import PredictOutcome, predict_one, write_predictions_csv
from .preprocess import PreprocessConfig, preprocess_one, run_contract
from .run_status import SlideStatus, write_record, write_table
from .slide import SlideSource, slide_source

try:
    import dask
    from distributed import Client, KilledWorker, LocalCluster, as_completed
except ImportError as err:  # an optional extra: asking for a cluster without it is a usage error
    raise UsageError(f"--cluster needs Dask ({err.name} is not installed): pip install 'zoompipe[cluster]'") from None

#: Seconds between two rebuilds of ``status.csv`` while a run goes on (and once at its end).
TABLE_INTERVAL = 2.0


@dataclass(frozen=True)
class ClusterSpec:
    """Where slides are sent.

    Attributes
    ----------
    address : str, optional
        Scheduler of a running cluster, ``tcp://HOST:8786``.
    scheduler_file : str, optional
        Scheduler file of a running cluster (``dask scheduler --scheduler-file``).
    workers : int, optional
        Start a ``LocalCluster`` of this many worker processes.
    threads : int, optional
        Compute threads of each local worker [default: the cores split between the workers].
        Workers of a cluster the user started keep their own setting (``OMP_NUM_THREADS``).
    retries : int
        Local clusters: how many worker deaths a slide may cause and still be retried; the next
        one marks it failed. A running cluster keeps its scheduler's ``allowed-failures``.
    """

    address: str | None = None
    scheduler_file: str | None = None
    workers: int | None = None
    threads: int | None = None
    retries: int = 2


def parse_cluster(text: str) -> ClusterSpec:
    """``local:N``, ``local:NxT``, ``tcp://HOST:PORT`` (or ``tls://``) or a scheduler file.

    Raises
    ------
    UsageError
        Anything else.
    """
    match = re.fullmatch(r"local:(\d+)(?:x(\d+))?", text)
    if match:
        workers, threads = int(match[1]), int(match[2]) if match[2] else None
        if workers < 1 or threads == 0:
            raise UsageError(f"--cluster {text}: give at least one worker and one thread")
        return ClusterSpec(workers=workers, threads=threads)
    if re.fullmatch(r"(tcp|tls|ucx)://[^/\s]+", text):
        return ClusterSpec(address=text)
    if Path(text).is_file():
        return ClusterSpec(scheduler_file=text)
    raise UsageError(f"--cluster {text!r}: give local:N, local:NxT, tcp://HOST:8786 or a scheduler file")


def local_threads(spec: ClusterSpec) -> int | None:
    """Compute threads of each worker zoompipe starts; None for a cluster the user started."""
    if spec.workers is None:
        return None
    return spec.threads or max(1, len(os.sched_getaffinity(0)) // spec.workers)


@contextmanager
def connect(cluster: str | ClusterSpec | Client, gpu: bool = False) -> Iterator[tuple[Client, ClusterSpec]]:
    """A client of the cluster, and the cluster's spec; a local cluster lives as long as the block.

    A :class:`~distributed.Client` passed in is used as it is and left open.

    Raises
    ------
    ZoompipeError
        The scheduler cannot be reached.
    """
    if isinstance(cluster, Client):
        yield cluster, ClusterSpec()
        return
    spec = parse_cluster(cluster) if isinstance(cluster, str) else cluster
    if spec.workers is not None:
        # Read when the scheduler starts. One task per thread, for the tasks that the scheduler
        # queues itself (large batches): a worker that dies then takes only its own slide into
        # its count of failures.
        with dask.config.set({"distributed.scheduler.allowed-failures": spec.retries,
                              "distributed.scheduler.worker-saturation": 1.0}):
            local = LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True,
                                 dashboard_address=None, resources={"GPU": 1} if gpu else None)
        with local, Client(local) as client:
            yield client, spec
        return
    try:
        client = (Client(spec.address, timeout="30s") if spec.address
                  else Client(scheduler_file=spec.scheduler_file, timeout="30s"))
    except (OSError, ValueError) as err:
        raise ZoompipeError(f"cannot reach the Dask scheduler at {spec.address or spec.scheduler_file}: "
                            f"{one_line(err)}") from None
    with client:
        if gpu and not any(w.get("resources", {}).get("GPU") for w in client.scheduler_info()["workers"].values()):
            warnings.warn("no worker declares a GPU resource yet; slides wait until one does "
                          "(start GPU workers with --resources GPU=1)", stacklevel=2)
        yield client, spec


# Worker side. Everything a worker process builds once (encoder, predictor) is kept here,
# keyed by what it was built from, with a lock that gives it to one slide at a time.

@dataclass
class _Kept:
    lock: threading.Lock
    value: Any = None


_KEPT: dict[tuple, _Kept] = {}
_KEPT_LOCK = threading.Lock()


def _kept(key: tuple) -> _Kept:
    with _KEPT_LOCK:
        return _KEPT.setdefault(key, _Kept(threading.Lock()))


def _build_once(slot: _Kept, build: Callable[[], Any], threads: int | None) -> Any:
    if slot.value is None:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        slot.value = build()
    return slot.value


def _preprocess_task(source: SlideSource, out_dir: Path, config: PreprocessConfig, mpp: float | None,
                     overwrite: bool, wait: bool, threads: int | None) -> SlideStatus | None:
    from .encoders import create_encoder

    slot = _kept(("encoder", config.encoder, config.weights, config.device, config.precision, config.runtime))

    def encoder_source():
        encoder = _build_once(slot, lambda: create_encoder(config.encoder, config.weights, config.device,
                                                           config.precision, config.runtime), threads)
        return encoder, run_contract(config, encoder)

    with slot.lock:
        return preprocess_one(source, out_dir, config, encoder_source, mpp, overwrite=overwrite, wait=wait)


def _predict_task(source: SlideSource, settings: Any, out: Path, heatmap: bool, geojson: bool, mpp: float | None,
                  backend: str, threads: int | None, wait: bool) -> PredictOutcome:
    del wait  # predict takes no slide locks: a slide is never held by another run
    slot = _kept(("predictor", settings))
    with slot.lock:
        predictor = _build_once(slot, settings.build, threads)
        return predict_one(source, predictor, out, heatmap, geojson, mpp, backend)


def _embed_task(source: SlideSource, contract: Any, grid: Any, settings: Any, device: str, precision: str,
                threads: int | None) -> Any:
    from .engine import contract_encoder
    from .sparse import embed_grid

    slot = _kept(("sparse-encoder", contract.encoder.model_dump_json(), settings.weights, device, precision,
                  settings.runtime))
    with slot.lock:
        encoder = _build_once(slot, lambda: contract_encoder(contract, settings.weights, device, precision,
                                                             settings.runtime), threads)
        return embed_grid(source, contract, grid, encoder, settings)


# Client side.

def _absolute(source: SlideSource) -> SlideSource:
    """A local slide by its absolute path: workers may run elsewhere, in another folder."""
    return source if source.remote else slide_source(source.local_path.resolve())


def _lost(source: SlideSource, deaths: int) -> str:
    return (f"{source}: the worker processing this slide died {deaths} times, the last ones with no other slide "
            "in flight (killed, out of memory, or a crash inside a C library); gave up on it")


def run_slides(client: Client, task: Callable[..., Any], paths: Sequence[SlideSource],
               kwargs: Callable[[SlideSource], dict], on_result: Callable[[SlideSource, Any], None],
               on_lost: Callable[[SlideSource, int], Any], resources: dict | None = None,
               progress: bool = True, label: str = "zoompipe") -> dict[SlideSource, Any]:
    """Run ``task(source, wait=..., **kwargs(source))`` once per slide on the cluster, gathering as they complete.

    No more slides are in flight than the cluster has worker threads, so a worker that dies
    mostly takes only its own slide into the scheduler's count of failures. Mostly: while a
    worker restarts, the scheduler may queue a second slide behind one that kills its worker.
    So a slide whose workers all died is sent once more with nothing else in flight, and only
    then gets ``on_lost``'s result (with the number of worker deaths it saw). A task that
    returns None found its slide held by another run: it is sent again with ``wait=True`` once
    every other slide has been handed out.

    Returns
    -------
    dict
        Each path's result.

    Raises
    ------
    Exception
        What a task raised (a setting every slide would fail with); the others are cancelled.
    """
    run = uuid.uuid4().hex[:8]
    todo: list[tuple[SlideSource, bool]] = [(p, False) for p in reversed(paths)]
    later: list[SlideSource] = []
    alone: list[SlideSource] = []  # lost beside other slides: to be sent again by themselves
    deaths: dict[SlideSource, int] = {}
    origin: dict[str, tuple[SlideSource, bool]] = {}
    running = as_completed()
    results: dict[SlideSource, Any] = {}
    if not client.nthreads():
        client.wait_for_workers(1)

    def top_up() -> None:
        if not todo:
            todo.extend((p, True) for p in reversed(later))
            later.clear()
        if not todo and alone and not running.count():
            todo.append((alone.pop(), False))
        capacity = max(1, sum(client.nthreads().values()))
        while todo and running.count() < capacity:
            path, wait = todo.pop()
            future = client.submit(task, path, wait=wait, **kwargs(path), resources=resources, pure=False,
                                   key=f"{label}-{path.slide_id}-{run}-{int(wait)}")
            origin[future.key] = (path, wait)
            running.add(future)

    top_up()
    with tqdm(total=len(paths), desc="slides", unit="slide", disable=not progress) as bar:
        for future in running:
            path, _ = origin[future.key]
            try:
                result = future.result()
            except KilledWorker as err:
                deaths[path] = deaths.get(path, 0) + err.allowed_failures + 1
                if deaths[path] == err.allowed_failures + 1:
                    alone.insert(0, path)
                    future.release()
                    top_up()
                    continue
                result = on_lost(path, deaths[path])
            except BaseException:
                client.cancel(list(running.futures))
                raise
            future.release()  # its result need not outlive its worker
            if result is None:
                later.append(path)
            else:
                results[path] = result
                on_result(path, result)
                bar.update()
            top_up()
    return results


def embed_on_cluster(client: Client, source: SlideSource, contract: Any, grid: Any, settings: Any, device: str,
                     precision: str, threads: int | None) -> Any:
    """Sparse training's :func:`~zoompipe.sparse.embed_grid` as a task on a worker; waits for the features.

    The worker builds the contract's encoder once and keeps it (``settings`` is the run's
    :class:`~zoompipe.sparse.SparseSettings`, ``threads`` its compute threads, None to keep its
    own). A worker that dies takes the task to another one, as a slide of ``preprocess``.
    """
    future = client.submit(_embed_task, _absolute(source), contract, grid, settings, device, precision, threads,
                           resources={"GPU": 1} if device.startswith("cuda") else None, pure=False)
    try:
        return future.result()
    finally:
        future.release()


class _Table:
    """Rebuilds ``status.csv`` at most every :data:`TABLE_INTERVAL` seconds, and at the end."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir, self.last = out_dir, time.monotonic()

    def update(self, force: bool = False) -> None:
        if force or time.monotonic() - self.last >= TABLE_INTERVAL:
            write_table(self.out_dir)
            self.last = time.monotonic()


def preprocess_on_cluster(slides: Sequence[SlideSource], out_dir: Path, config: PreprocessConfig,
                          overrides: dict[str, float], cluster: str | ClusterSpec | Client,
                          overwrite: bool = False, progress: bool = True) -> list[SlideStatus]:
    """:func:`zoompipe.preprocess.preprocess_slides` over a cluster (inputs already checked)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = _Table(out_dir)
    gpu = config.device.startswith("cuda")
    slides = [_absolute(s) for s in slides]
    with connect(cluster, gpu=gpu) as (client, spec):
        def lost(source: SlideSource, deaths: int) -> SlideStatus:
            row = SlideStatus(source.slide_id, source.name, "failed", error=_lost(source, deaths))
            write_record(out_dir, row)
            return row

        try:
            results = run_slides(
                client, _preprocess_task, slides,
                lambda p: dict(out_dir=out_dir.resolve(), config=config, mpp=overrides.get(p.slide_id, config.mpp),
                               overwrite=overwrite, threads=local_threads(spec)),
                on_result=lambda path, row: table.update(), on_lost=lost,
                resources={"GPU": 1} if gpu else None, progress=progress, label="zoompipe-preprocess")
        finally:
            table.update(force=True)
    return [results[p] for p in slides]


def predict_on_cluster(paths: Sequence[SlideSource], settings: Any, out: Path, heatmap: bool, geojson: bool,
                       mpp: float | None, overrides: dict[str, float], backend: str, class_names: Sequence[str],
                       cluster: str | ClusterSpec | Client, progress: bool = True) -> list[PredictOutcome]:
    """:func:`zoompipe.predict.predict_slides` over a cluster; ``settings`` is a
    :class:`~zoompipe.predictor_settings.PredictorSettings`."""
    out.mkdir(parents=True, exist_ok=True)
    table = _Table(out)
    paths = [_absolute(s) for s in paths]
    done: dict[SlideSource, PredictOutcome] = {}
    gpu = settings.device.startswith("cuda")

    def arrived(path: SlideSource, outcome: PredictOutcome) -> None:
        done[path] = outcome
        write_predictions_csv(out / "predictions.csv", [done[p] for p in paths if p in done], class_names)
        table.update()

    with connect(cluster, gpu=gpu) as (client, spec):
        def lost(source: SlideSource, deaths: int) -> PredictOutcome:
            outcome = PredictOutcome(source, error=_lost(source, deaths))
            write_record(out, SlideStatus(source.slide_id, source.name, "failed", error=outcome.error))
            return outcome

        try:
            run_slides(client, _predict_task, paths,
                       lambda p: dict(settings=settings, out=out.resolve(), heatmap=heatmap, geojson=geojson,
                                      mpp=overrides.get(p.slide_id, mpp), backend=backend, threads=local_threads(spec)),
                       on_result=arrived, on_lost=lost, resources={"GPU": 1} if gpu else None, progress=progress,
                       label="zoompipe-predict")
        finally:
            table.update(force=True)
    return [done[p] for p in paths]

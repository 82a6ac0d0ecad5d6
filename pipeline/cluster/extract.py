"""Extraction on Ray: long-lived actors, each holding one teacher, take the pending views of one block at a time from a queue.

The driver (the ``pipeline extract`` process) has checked everything against
the store without loading the teacher's weights (``prepare_extract(load=False)``);
it holds the teacher lock, creates the teacher's arrays, starts actors that each
build their teacher from the same ``ExtractJob``, and hands each actor one block's
pending (view, block) units to run plus the block it will get next, whose first
batches it renders in a thread while its teacher runs on the current one. A
block's views render together, so each image is decoded once for all of them,
as in one process. Each unit is written whole and committed by the actor
(``stages.teachers.extract.UnitExtractor``) as its last batch is done, so a block retried
after an actor died, or run twice, is harmless. A user error in a unit (a bad
image, a changed render) ends the whole run with its line; committed units stay.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from itertools import groupby
from typing import Callable, Iterator

from stages.progress import Progress
from stages.teachers.extract import ExtractResult, pending_units
from stages.teachers.extract_job import ExtractJob, ReadyExtract, worker_extractor
from storage import UserError

from pipeline.cluster import ray_env

log = logging.getLogger("pipeline")

MAX_RESTARTS = 3  # per actor; a killed actor's block is retried on its restarted self (its committed units are written again, the same bytes)


class ExtractActor:
    """One teacher on one device, built from the job (``stages.teachers.extract_job.worker_extractor``); ``run``
    commits a block's units while the next block renders in a thread.

    Plain Python, testable without Ray; ``extract_on_ray`` wraps it with ``ray.remote``.
    """

    def __init__(self, job: ExtractJob):
        self.unit = worker_extractor(job)
        self.next = None  # (units, their batches rendering ahead)

    def run(self, units: list[tuple[int, int]], next_units: list[tuple[int, int]] | None = None) -> int:
        """Commit ``units`` (one block's views) and start rendering ``next_units``; returns their rows."""
        units = [tuple(u) for u in units]
        rendered = None
        if self.next is not None and self.next[0] == units:
            rendered = self.next[1]  # its error (a bad image) is this block's error
        elif self.next is not None:
            self.next[1].close()
        self.next = None
        if next_units is not None:
            upcoming = [tuple(u) for u in next_units]
            self.next = (upcoming, RenderAhead(lambda: self.unit.render(upcoming)))
        try:
            return self.unit.run(units, rendered)
        finally:
            if rendered is not None:
                rendered.close()  # a failed block leaves no thread waiting to hand over its batches


class RenderAhead:
    """Batches from ``make()``, rendered in a thread at most ``depth`` batches ahead of their reader.

    The bound keeps a block of many views from sitting rendered in memory (about 150 MB
    per view of 1,024 samples at 224 px); an error comes out where its batch would.
    """

    _END = object()

    def __init__(self, make: Callable[[], Iterator], depth: int = 4):
        self.queue: queue.Queue = queue.Queue(depth)
        self.closed = threading.Event()
        threading.Thread(target=self._fill, args=(make,), name="render-ahead", daemon=True).start()

    def _put(self, item) -> bool:
        while not self.closed.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, make) -> None:
        try:
            for batch in make():
                if not self._put((batch, None)):
                    return
            self._put((self._END, None))
        except BaseException as e:  # noqa: BLE001 - handed to the reader, who raises it
            self._put((None, e))

    def __iter__(self) -> Iterator:
        while True:
            batch, error = self.queue.get()
            if error is not None:
                raise error
            if batch is self._END:
                return
            yield batch

    def close(self) -> None:
        """Stop rendering (a block that went elsewhere)."""
        self.closed.set()


def plan_actors(gpus_per_worker: float | None, actors: int | None, device: str | None) -> tuple[float, int, str]:
    """(GPUs per actor, actors, actor device) from the flags and the cluster, checked against it."""
    import ray

    gpus_have = ray.cluster_resources().get("GPU", 0)
    if gpus_per_worker is None:  # --device decides; else GPUs when the cluster has them
        gpus_per_worker = (1.0 if device.startswith("cuda") else 0.0) if device else (1.0 if gpus_have else 0.0)
    if device and device.startswith("cuda") and gpus_per_worker <= 0:
        raise UserError(f"--device {device} needs GPU actors: pass --gpus-per-worker 1 (or more), or --device cpu")
    if not actors:  # one per GPU, or one per node on a CPU cluster
        nodes = sum(1 for n in ray.nodes() if n["Alive"])
        actors = max(1, int(gpus_have // gpus_per_worker)) if gpus_per_worker > 0 else nodes
    ray_env.require_gpus(gpus_per_worker, actors)
    # Ray gives a GPU actor its own devices as cuda:0.., so any cuda:N means "the actor's GPU".
    return gpus_per_worker, actors, "cuda" if gpus_per_worker > 0 else (device or "cpu")


def join_cluster(args) -> tuple[float, int, str]:
    """Connect (or start a local instance), check GPUs and that every node sees the store: before any work."""
    ray_env.connect(args.ray_address)
    plan = plan_actors(args.gpus_per_worker, args.actors, args.device)
    ray_env.check_visible(ray_env.for_workers(args.store), "store")
    return plan


def extract_on_ray(
    ready: ReadyExtract,
    job: ExtractJob,
    *,
    actors: int,
    gpus_per_worker: float,
    on_unit: Callable[[int], None] | None = None,
) -> ExtractResult:
    """Extract ``ready``'s job with ``actors`` Ray actors, each built from ``job`` (the same job, with the data, store and
    device as the actors see them); resumable, like ``ReadyExtract.run``. Hold the teacher's lock.

    ``on_unit(rows)`` is called as each unit is committed (benchmarks time the steady state with it).
    """
    import ray

    teacher_id, views = job.id, job.views
    ready.open_teacher()
    store = ready.open_store()
    units = pending_units(store, teacher_id, views)
    skipped = views * store.num_blocks - len(units)
    if skipped:
        log.info("teacher %s: %d units already committed, %d to do", teacher_id, skipped, len(units))
    if not units:
        return ExtractResult(0, skipped, 0, 0.0)
    rows = {b: len(store.block_range(b)) for b in range(store.num_blocks)}
    total_views = sum(rows[b] for _, b in units)
    blocks = [list(same) for _, same in groupby(sorted(units, key=lambda u: (u[1], u[0])), key=lambda u: u[1])]
    actors = min(actors, len(blocks))
    log.info("ray: %d extraction actor(s), %g GPU each, device %s", actors, gpus_per_worker, job.device)
    remote = ray.remote(ExtractActor).options(
        num_cpus=1, num_gpus=gpus_per_worker, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS
    )
    progress = Progress(f"extract {teacher_id}", total_views)
    start = time.perf_counter()
    dispatch = _Dispatch([remote.remote(job) for _ in range(actors)], blocks)
    try:
        for block in dispatch.results():
            progress.what = f"extract {teacher_id}: {dispatch.done}/{len(units)} units"
            for _, b in block:
                progress.update(rows[b])
                if on_unit is not None:
                    on_unit(rows[b])
    finally:
        for actor in dispatch.pool:  # a finished or failed run leaves nothing running on the cluster
            ray.kill(actor, no_restart=True)
    return ExtractResult(len(units), skipped, total_views, time.perf_counter() - start)


class _Dispatch:
    """Hands queued blocks (each a list of one block's pending units) to actors, each with the block it renders ahead;
    a dead actor's blocks go back to the queue."""

    def __init__(self, pool: list, blocks: list[list[tuple[int, int]]]):
        self.pool, self.queue, self.done = pool, deque(blocks), 0
        self.running = {}  # ref -> (actor, block, the block it renders ahead)
        for actor in pool:
            if self.queue:
                self.submit(actor, self.queue.popleft())

    def submit(self, actor, block) -> None:
        ahead = self.queue.popleft() if self.queue else None  # reserved for this actor: it renders it now
        self.running[actor.run.remote(block, ahead)] = (actor, block, ahead)

    def results(self) -> Iterator[list[tuple[int, int]]]:
        """Each block as its units are committed, until none is left."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        while self.running:
            (ref,), _ = ray.wait(list(self.running), num_returns=1)
            actor, block, ahead = self.running.pop(ref)
            try:
                ray.get(ref)
            except (RayTaskError, RayActorError) as e:
                user = ray_env.user_error(e)
                if user is not None:
                    raise UserError(str(user)) from None
                if not isinstance(e, RayActorError):
                    raise
                self.lose(actor, [x for x in (ahead, block) if x is not None], e)
                continue
            self.done += len(block)
            yield block
            if ahead is not None:
                self.submit(actor, ahead)
            elif self.queue:
                self.submit(actor, self.queue.popleft())

    def lose(self, actor, blocks: list, error: Exception) -> None:
        """An actor dead for good (restarts used up): its blocks go back to the queue for the others."""
        log.warning("extraction actor died (%s); %d left", type(error).__name__, len(self.pool) - 1)
        self.pool.remove(actor)
        self.queue.extendleft(blocks)
        if not self.pool:
            raise UserError(
                "every extraction actor died (see the Ray logs of the nodes): committed units are kept; "
                "run the same command again to resume"
            ) from None
        busy = [r[0] for r in self.running.values()]
        for a in self.pool:
            if self.queue and all(a is not b for b in busy):
                self.submit(a, self.queue.popleft())

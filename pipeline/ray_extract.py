"""Extraction on Ray: long-lived actors, each holding one teacher, take (view, block) units from a queue.

The driver (the ``pipeline extract`` process) has checked everything against
the store without loading the teacher's weights (``prepare_extract(load=False)``);
it holds the teacher lock, creates the teacher's arrays, starts actors that each
build their teacher from the same ``ExtractJob``, and hands each actor one unit to run plus the unit it
will get next, which the actor renders in a thread while its teacher runs on
the current one. A unit is written whole and committed by the actor
(``stages.extract.UnitExtractor``), so a unit retried after an actor died, or
run twice, is harmless. A user error in a unit (a bad image, a changed render)
ends the whole run with its line; committed units stay.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

from stages.progress import Progress
from stages.teachers.extract import ExtractResult, pending_units
from stages.teachers.extract_job import ExtractJob, ReadyExtract, worker_extractor
from storage import UserError

from . import ray_env

log = logging.getLogger("pipeline")

MAX_RESTARTS = 3  # per actor; a killed actor's unit is retried on its restarted self


class ExtractActor:
    """One teacher on one device, built from the job (``stages.teachers.extract_job.worker_extractor``); ``run``
    commits a unit while the next unit renders in a thread.

    Plain Python, testable without Ray; ``extract_on_ray`` wraps it with ``ray.remote``.
    """

    def __init__(self, job: ExtractJob):
        self.unit = worker_extractor(job)
        self.ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render-ahead")
        self.next = None  # (unit, future of its rendered batches)

    def run(self, view: int, block: int, next_unit: tuple[int, int] | None = None) -> tuple[int, int, int]:
        """Commit unit (view, block) and start rendering ``next_unit``; returns (view, block, rows)."""
        rendered = None
        if self.next is not None and self.next[0] == (view, block):
            rendered = self.next[1].result()  # its error (a bad image) is this unit's error
        self.next = None
        if next_unit is not None:
            self.next = (tuple(next_unit), self.ahead.submit(self.unit.render, *next_unit))
        rows = self.unit.run(view, block, rendered)
        return view, block, rows


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
    ready: ReadyExtract, job: ExtractJob, *, actors: int, gpus_per_worker: float, on_unit: Callable[[int], None] | None = None
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
    actors = min(actors, len(units))
    log.info("ray: %d extraction actor(s), %g GPU each, device %s", actors, gpus_per_worker, job.device)
    remote = ray.remote(ExtractActor).options(
        num_cpus=1, num_gpus=gpus_per_worker, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS
    )
    progress = Progress(f"extract {teacher_id}", total_views)
    start = time.perf_counter()
    dispatch = _Dispatch([remote.remote(job) for _ in range(actors)], units)
    try:
        for unit in dispatch.results():
            progress.what = f"extract {teacher_id}: {dispatch.done}/{len(units)} units"
            progress.update(rows[unit[1]])
            if on_unit is not None:
                on_unit(rows[unit[1]])
    finally:
        for actor in dispatch.pool:  # a finished or failed run leaves nothing running on the cluster
            ray.kill(actor, no_restart=True)
    return ExtractResult(len(units), skipped, total_views, time.perf_counter() - start)


class _Dispatch:
    """Hands queued units to actors, each with the unit it renders ahead; a dead actor's units go back to the queue."""

    def __init__(self, pool: list, units: list[tuple[int, int]]):
        self.pool, self.queue, self.done = pool, deque(units), 0
        self.running = {}  # ref -> (actor, unit, the unit it renders ahead)
        for actor in pool:
            if self.queue:
                self.submit(actor, self.queue.popleft())

    def submit(self, actor, unit) -> None:
        ahead = self.queue.popleft() if self.queue else None  # reserved for this actor: it renders it now
        self.running[actor.run.remote(*unit, ahead)] = (actor, unit, ahead)

    def results(self) -> Iterator[tuple[int, int]]:
        """Each unit as it is committed, until none is left."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        while self.running:
            (ref,), _ = ray.wait(list(self.running), num_returns=1)
            actor, unit, ahead = self.running.pop(ref)
            try:
                ray.get(ref)
            except (RayTaskError, RayActorError) as e:
                user = ray_env.user_error(e)
                if user is not None:
                    raise UserError(str(user)) from None
                if not isinstance(e, RayActorError):
                    raise
                self.lose(actor, [u for u in (ahead, unit) if u is not None], e)
                continue
            self.done += 1
            yield unit
            if ahead is not None:
                self.submit(actor, ahead)
            elif self.queue:
                self.submit(actor, self.queue.popleft())

    def lose(self, actor, units: list, error: Exception) -> None:
        """An actor dead for good (restarts used up): its units go back to the queue for the others."""
        log.warning("extraction actor died (%s); %d left", type(error).__name__, len(self.pool) - 1)
        self.pool.remove(actor)
        self.queue.extendleft(units)
        if not self.pool:
            raise UserError(
                "every extraction actor died (see the Ray logs of the nodes): committed units are kept; "
                "run the same command again to resume"
            ) from None
        busy = [r[0] for r in self.running.values()]
        for a in self.pool:
            if self.queue and all(a is not b for b in busy):
                self.submit(a, self.queue.popleft())

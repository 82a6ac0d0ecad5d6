"""Extraction on Ray: long-lived actors, each holding one teacher, take (view, block) units from a queue.

The driver (the ``pipeline extract`` process) holds the teacher lock, creates
the teacher's arrays, and hands each actor one unit to run plus the unit it
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
from dataclasses import dataclass
from typing import Callable

from stages.extract import ExtractResult, UnitExtractor, open_teacher, pending_units
from stages.progress import Progress
from storage import Store, UserError

from . import ray_env

log = logging.getLogger("pipeline")

# Tests only: seconds each actor sleeps after a unit, so that a kill lands mid-extraction.
TEST_UNIT_SLEEP_ENV = "PIPELINE_TEST_UNIT_SLEEP"
MAX_RESTARTS = 3  # per actor; a killed actor's unit is retried on its restarted self


@dataclass(frozen=True)
class ActorSpec:
    """What an actor builds its teacher, dataset and store from: small values, no objects."""

    data: str
    fingerprint: str
    store: str  # an absolute local path or a URL: workers do not share the driver's working directory
    teacher_id: str
    teacher: str
    weights: str | None
    random_init: bool
    seed: int
    size: int | None
    info: dict  # teacher.json as the driver wrote it
    device: str
    batch_size: int
    workers: int  # loader processes per actor rendering a unit
    unit_sleep: float = 0.0


class ExtractActor:
    """One teacher on one device; ``run`` commits a unit while the next unit renders in a thread.

    Plain Python, testable without Ray; ``extract_on_ray`` wraps it with ``ray.remote``.
    """

    def __init__(self, spec: ActorSpec):
        from stages.datasets import open_dataset
        from stages.extract import TeacherRunner
        from stages.teachers import build_teacher

        dataset = open_dataset(spec.data)
        if dataset.fingerprint() != spec.fingerprint:
            raise UserError(f"dataset {spec.data} differs on this Ray node from the driver's: every node must see the same data")
        teacher = build_teacher(
            spec.teacher, weights=spec.weights, random_init=spec.random_init, num_classes=dataset.num_classes, seed=spec.seed, input_size=spec.size
        )
        if teacher.weights != spec.info["weights"]:
            raise UserError(f"teacher weights differ on this Ray node ({teacher.weights}, driver: {spec.info['weights']}): every node must see the same file")
        runner = TeacherRunner(teacher, spec.info, spec.device)
        self.unit = UnitExtractor(Store(spec.store), dataset, runner, spec.teacher_id, batch_size=spec.batch_size, workers=spec.workers)
        self.sleep = spec.unit_sleep
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
        if self.sleep:
            time.sleep(self.sleep)
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
    store: Store, dataset, spec: ActorSpec, *, views: int, actors: int, gpus_per_worker: float, on_unit: Callable[[int], None] | None = None
) -> ExtractResult:
    """Extract ``views`` views into ``store`` with ``actors`` Ray actors; resumable, like ``stages.extract.extract``.

    ``on_unit(rows)`` is called as each unit is committed (benchmarks time the steady state with it).
    """
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    teacher_id = spec.teacher_id
    open_teacher(store, teacher_id, spec.info, dataset.num_classes, views)
    queue = deque(pending_units(store, teacher_id, views))
    total_units = len(queue)
    skipped = views * store.num_blocks - total_units
    if skipped:
        log.info("teacher %s: %d units already committed, %d to do", teacher_id, skipped, total_units)
    rows = {b: len(store.block_range(b)) for b in range(store.num_blocks)}
    total_views = sum(rows[b] for _, b in queue)
    start = time.perf_counter()
    if not queue:
        return ExtractResult(0, skipped, 0, 0.0)
    actors = min(actors, total_units)
    log.info("ray: %d extraction actor(s), %g GPU each, device %s", actors, gpus_per_worker, spec.device)
    remote = ray.remote(ExtractActor).options(
        num_cpus=1, num_gpus=gpus_per_worker, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS
    )
    pool = [remote.remote(spec) for _ in range(actors)]
    running = {}  # ref -> (actor, unit, the unit it renders ahead)
    progress = Progress(f"extract {teacher_id}", total_views)
    done_units = 0

    def submit(actor, unit):
        ahead = queue.popleft() if queue else None  # reserved for this actor: it renders it now
        running[actor.run.remote(*unit, ahead)] = (actor, unit, ahead)

    try:
        for actor in pool:
            if queue:
                submit(actor, queue.popleft())
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, unit, ahead = running.pop(ref)
            try:
                ray.get(ref)
            except (RayTaskError, RayActorError) as e:
                user = ray_env.user_error(e)
                if user is not None:
                    raise UserError(str(user)) from None
                if not isinstance(e, RayActorError):
                    raise
                # Dead for good (restarts used up): its units go back to the queue for the others.
                log.warning("extraction actor died (%s); %d left", type(e).__name__, len(pool) - 1)
                pool.remove(actor)
                queue.extendleft([u for u in (ahead, unit) if u is not None])
                if not pool:
                    raise UserError(
                        "every extraction actor died (see the Ray logs of the nodes): committed units are kept; "
                        "run the same command again to resume"
                    ) from None
                idle = [a for a in pool if all(a is not r[0] for r in running.values())]
                for a in idle:
                    if queue:
                        submit(a, queue.popleft())
                continue
            done_units += 1
            progress.what = f"extract {teacher_id}: {done_units}/{total_units} units"
            progress.update(rows[unit[1]])
            if on_unit is not None:
                on_unit(rows[unit[1]])
            if ahead is not None:
                submit(actor, ahead)
            elif queue:
                submit(actor, queue.popleft())
    finally:
        for actor in pool:  # a finished or failed run leaves nothing running on the cluster
            ray.kill(actor, no_restart=True)
    return ExtractResult(total_units, skipped, total_views, time.perf_counter() - start)

"""`pipeline prepare` on Ray: actors, each holding the opened source, write whole shards taken from a queue.

The driver has checked everything and claimed the output; each actor opens the source itself (checked against
the driver's fingerprint) and writes and commits whole shards (``stages.data.prepare.ShardMaker``), so a shard
retried after its actor died, or written twice, is harmless: same bytes, same record. A run whose actors all
died keeps its finished shards; the same command again makes the rest.
"""

from __future__ import annotations

import logging

from stages.data.prepare import PrepareJob, ShardMaker, ShardPlan
from stages.progress import Progress
from storage import UserError

from pipeline.cluster import ray_env

log = logging.getLogger("pipeline")

MAX_RESTARTS = 3  # per actor; a killed actor's shard is retried on its restarted self


def prepare_on_ray(job: PrepareJob, shards: list[int], plan: ShardPlan, actors: int) -> dict[int, dict]:
    """Write ``shards`` of ``plan`` with ``actors`` Ray actors; their records by shard number."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError
    from ray.util import ActorPool

    if not shards:
        return {}
    actors = min(actors, len(shards))
    log.info("ray: %d preparation actor(s) for %d shards", actors, len(shards))
    remote = ray.remote(ShardMaker).options(num_cpus=1, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
    pool_actors = [remote.remote(job) for _ in range(actors)]
    progress = Progress("prepare", sum(len(plan.positions(k)) for k in shards), unit="images")
    records = {}
    try:
        pool = ActorPool(pool_actors)
        # in order, run side by side
        for k, record in zip(shards, pool.map(lambda actor, k: actor.write.remote(k), shards)):
            records[k] = record
            progress.update(record["samples"])
    except (RayTaskError, RayActorError) as e:
        user = ray_env.user_error(e)
        if user is not None:
            raise UserError(str(user)) from None
        raise UserError(
            f"a preparation actor died ({type(e).__name__}; see the Ray logs of the nodes): finished shards are kept; "
            "run the same command again to make the rest"
        ) from None
    finally:
        for actor in pool_actors:  # a finished or failed run leaves nothing running on the cluster
            ray.kill(actor, no_restart=True)
    return records

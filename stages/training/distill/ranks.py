"""Several processes (DDP): batch sizes over the workers and metrics summed over the ranks."""

from __future__ import annotations

import logging

import torch

from storage import UserError

from ..settings import TrainSettings


log = logging.getLogger(__name__)


def _all_sum(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def resolve_batch(
    batch_size: int | None, global_batch: int | None, world: int, where: str = "the recipe"
) -> tuple[int, int]:
    """(per-worker batch, global batch) for ``world`` workers (1: a single process takes the whole global batch).

    ``batch_size`` (per worker, as timm's --batch-size) wins when given; else
    ``global_batch`` (a paper's batch over all its GPUs, as a recipe states it) is
    split over the workers, which must divide it.
    """
    world = max(1, world)
    if batch_size is not None:
        return batch_size, batch_size * world
    if global_batch is None:
        batch_size = TrainSettings.batch_size
        return batch_size, batch_size * world
    if global_batch % world:
        raise UserError(
            f"global_batch {global_batch} in {where} does not divide over {world} workers: choose a number of workers that divides it, "
            f"or pass --batch-size B for B per worker"
        )
    return global_batch // world, global_batch

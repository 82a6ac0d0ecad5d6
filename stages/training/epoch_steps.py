"""Each DDP rank's share of an epoch and the steps it takes: every rank takes the same number of batches in every
epoch, or one waits on another forever. With one process the share is the whole epoch."""

from __future__ import annotations

from itertools import groupby

from storage import UserError


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks: (0, 1) unless torch.distributed is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_units(units: list[tuple[int, int]], rank: int, world: int) -> list[tuple[int, int]]:
    """This rank's share of an epoch's (view, block) units: every world-th block's, so each rank reads its own
    shards; the consecutive units of one block (its repeated views) stay together on one rank."""
    groups = [list(g) for _, g in groupby(units, key=lambda unit: unit[1])]
    return [unit for g in groups[rank::world] for unit in g]


def steps_per_epoch(num_samples: int, block: int, batch_size: int, world: int, repeats: int = 1) -> int:
    """Optimiser steps every rank takes in every epoch.

    DDP hangs when ranks take different numbers of steps, and a rank's rows
    depend on which blocks the epoch's shuffle gives it. So every rank is cut
    to a bound that holds for all epochs: the fewest whole blocks a rank can
    get, with the short last block among them. With one rank it is the whole
    training set, as without DDP. With ``repeats`` R an epoch takes a share
    1 / R of the blocks, R views of each (``epoch_units``).
    """
    num_blocks = -(-num_samples // block)
    if num_blocks // repeats < world:
        if repeats > 1:
            raise UserError(
                f"with repeats {repeats} an epoch takes {num_blocks // repeats} of the store's {num_blocks} blocks, fewer than the {world} "
                f"workers: use at most {max(1, num_blocks // repeats)} workers, fewer repeats, or smaller blocks"
            )
        raise UserError(
            f"the store has {num_blocks} blocks of samples but {world} workers: use at most {num_blocks} workers"
        )
    last = num_samples - (num_blocks - 1) * block
    return repeats * ((num_blocks // repeats // world - 1) * block + last) // batch_size


def steps_or_refuse(
    num_samples: int, block: int, batch_size: int, world: int, repeats: int, *, name: str, unit: str, fix: str = ""
) -> int:
    """``steps_per_epoch``, or one line when a batch is larger than one ``unit``'s (rank's, worker's) share of the
    data; ``name`` is the batch size as the caller knows it (``--batch-size``, ``batch size``)."""
    steps = steps_per_epoch(num_samples, block, batch_size, world, repeats)
    if steps == 0:
        raise UserError(
            f"{name} {batch_size} is larger than a {unit}'s share of the training set ({num_samples} samples, "
            f"{world} {unit}(s))" + (f": {fix}" if fix else "")
        )
    return steps


def epoch_note(num_samples: int, block: int, batch_size: int, world: int, repeats: int = 1) -> str:
    """One line: how many views an epoch holds against the samples, and why when it is fewer (whole blocks per rank,
    each epoch cut to what every epoch has; with repeats R, R views of a share 1 / R of the blocks)."""
    steps = steps_per_epoch(num_samples, block, batch_size, world, repeats)
    views, num_blocks = steps * batch_size * world, -(-num_samples // block)
    line = f"an epoch holds {views:,} views ({steps} steps of {batch_size} x {world} worker(s)), {views / num_samples:.0%} of the {num_samples:,} samples"
    if views >= 0.95 * num_samples:
        return line
    share = num_blocks // repeats // world
    if repeats > 1:
        why = (
            f"with repeats {repeats} an epoch takes {repeats} views of each of {share * world} of the {num_blocks} blocks of {block} samples "
            f"(the blocks split {repeats} ways, and every epoch is cut to the smallest share); a block count that {repeats * world} divides keeps it whole"
        )
    elif world > 1:
        why = f"each of the {world} workers takes the same number of whole blocks of {block} samples (DDP waits on the slowest); {world} dividing the block count keeps it whole"
    else:
        why = f"a last partial batch is dropped each epoch (at most {batch_size - 1} samples)"
    return f"{line}: {why}"


def resolve_ranks(rank: int | None, world: int | None) -> tuple[int, int]:
    if rank is None and world is None:
        return rank_and_world()
    if rank is None or world is None:
        raise UserError("pass both rank and world (or neither, to take them from torch.distributed)")
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"rank {rank} is not one of the {world} ranks 0..{world - 1}: pass a rank below world")
    return rank, world

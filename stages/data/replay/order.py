"""Which samples a block holds, which (view, block) units an epoch takes and in what order, and which samples keep
their label: pure functions of seeds, so every worker and every resumed run computes the same."""

from __future__ import annotations

import numpy as np

from ..views import uniforms


ORDER_STREAM = 1000  # the uniforms' stream of the sample order (the view ops use 0..5)


def sample_order(num_samples: int, seed: int, permute: bool = True) -> np.ndarray:
    """(N,) int64: the sample id at each position; block b is positions [b * B, (b + 1) * B).

    A seeded uniform permutation, so that every block is a random sample of the
    dataset: real datasets list their images class by class (a folder per
    class, ImageNet's layout), and blocks of consecutive ids would hold one or
    two classes each, making batches and mixing partners far from independent.
    It sorts a counter-based hash of (seed, id), so it is the same with any
    numpy. ``permute=False`` keeps the id order, for sources that must be read
    front to back (``ImageDataset.sequential``: tar shards, shuffled when written).
    """
    ids = np.arange(num_samples, dtype=np.int64)
    if not permute:
        return ids
    return np.argsort(uniforms(seed, 0, ids, ORDER_STREAM, 1)[:, 0], kind="stable").astype(np.int64)


def block_slice(order: np.ndarray, block: int, size: int) -> np.ndarray:
    """The sample ids of ``block`` (blocks of ``size`` positions) in ``order``."""
    return order[block * size : (block + 1) * size]


def epoch_units(
    epoch: int, num_views: int, num_blocks: int, seed: int, repeats: int = 1, view_groups: int = 1
) -> list[tuple[int, int]]:
    """The (view, block) units of one epoch: every block once, in a shuffled order.

    Each block walks through a fresh permutation of all views before it repeats
    any, so ``num_views`` epochs use every stored view exactly once.

    ``repeats`` R > 1 is repeated augmentation (timm's ``--aug-repeats``, its
    RepeatAugSampler): an epoch takes a share 1 / R of the blocks, each with R
    different views, the R units of a block next to each other so that one
    shuffle window holds them all. An epoch keeps about N samples' worth of
    rows, and every R epochs take every block once. R = 1 is the plain order.

    ``view_groups`` K > 1 (the recipe's ``mix_pair_views``: views 0..K-1, K..2K-1, ... share their
    mixing partners) walks the views group by group, in a shuffled order of groups, so that with
    R = K a block's R views of an epoch are one group: its samples and their partners form groups
    of 2R rows that render from one decode per image (``shuffle_windows``).
    """
    if not 1 <= repeats <= num_views:
        raise ValueError(f"repeats must lie in [1, {num_views}] (the views), not {repeats}")
    rnd, part = divmod(epoch, repeats)
    order = np.random.default_rng([seed, epoch, 0] if repeats == 1 else [seed, rnd, 0, repeats]).permutation(num_blocks)
    # A block is used once per round of R epochs, taking R views of its current pass over the views.
    cycle, use = divmod(rnd, num_views // repeats)
    units = []
    for b in np.array_split(order, repeats)[part]:
        rng = np.random.default_rng([seed, int(b), cycle, 1])
        if view_groups == 1:
            views = rng.permutation(num_views)
        else:
            groups = [np.arange(g, min(g + view_groups, num_views)) for g in range(0, num_views, view_groups)]
            views = np.concatenate([rng.permutation(groups[k]) for k in rng.permutation(len(groups))])
        units += [(int(v), int(b)) for v in views[use * repeats : (use + 1) * repeats]]
    return units


def window_units(window_rows: int, block: int, repeats: int = 1) -> int:
    """Units shuffled together in memory: about ``window_rows`` rows, whole blocks, a multiple of ``repeats``
    (so a block's repeated views share a window)."""
    return repeats * max(1, window_rows // block // repeats)


def labelled_mask(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Which samples keep their label: a stratified ``fraction`` of each class, fixed by ``seed``."""
    if fraction >= 1.0:
        return np.ones(len(labels), bool)
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        keep = int(round(fraction * len(members)))
        mask[np.random.default_rng([seed, int(c)]).permutation(members)[:keep]] = True
    return mask

"""Use a teacher cache in your own training loop: open a store, iterate its replayed views with their teacher outputs.

Example:
    >>> from stages.loader import open_cache, normalize
    >>> cache = open_cache("s3://bucket/caches/in1k-beitv2l")         # any store location
    >>> loader = cache.loader(batch_size=256, teachers=["beitv2_l"], needs=["logits"], workers=8)
    >>> for epoch in range(epochs):
    ...     loader.set_epoch(epoch)
    ...     for batch in loader:                                          # a Batch
    ...         batch = batch.to("cuda", non_blocking=True)
    ...         x = normalize(batch.images, mean, std)                    # uint8 -> float32, on the GPU
    ...         loss = kd(student(x), batch.teachers["beitv2_l"]["logits"], batch.targets.soft)

The loader is the one ``pipeline distill`` trains from: the same views, order, mixing, targets and checks.
Under ``torch.distributed`` (torchrun, Ray Train) each rank reads its own share of the store and takes the
same number of batches. ``loader.state_dict()`` / ``load_state_dict`` resume mid-epoch with the same batches.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from storage import Store, UserError


from .cache.store_setup import store_dataset, stored_plan
from .data.datasets import ImageDataset
from .data.replay import StoredViews
from .data.views import ViewPlan, normalize
from .methods import Targets
from .teachers.teacher_sources import CachedTeacher
from .training.batch import Batch
from .training.loader import ReplayLoader

__all__ = [
    "open_cache",
    "Cache",
    "ReplayLoader",
    "Batch",
    "Targets",
    "normalize",
    "UserError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

OUTPUTS = ("logits", "features", "tokens")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's IMAGENET_DEFAULT_MEAN / _STD


def open_cache(location: str, data: str | None = None) -> Cache:
    """Open a store made by ``pipeline extract`` and the training data its views replay.

    Args:
        location: the store, a directory or an fsspec URL (``s3://bucket/caches/in1k``).
        data: the training images, where they moved since extraction (``folder:PATH``, ``wds:PATTERN``);
            default: the source the store recorded. Either way it must match the store's fingerprint.

    Returns:
        A ``Cache``, whose ``loader`` gives batches.

    Raises:
        UserError: no store at ``location``, a damaged store, data that does not match the store's fingerprint.

    Example:
        >>> cache = open_cache("runs/digits")
        >>> cache.teacher_ids, cache.num_classes, cache.size
        (['resnet18'], 10, 32)
    """
    store = Store(location)
    return Cache(store, stored_plan(store), store_dataset(store, data))


class Cache:
    """A store with its view plan and training data, opened and checked against each other (see ``open_cache``).

    Attributes:
        store: the opened ``storage.Store``.
        plan: the store's view plan (``ViewPlan``), which renders any stored view again.
        dataset: the training images the views are replayed from.
    """

    def __init__(self, store: Store, plan: ViewPlan, dataset: ImageDataset):
        self.store, self.plan, self.dataset = store, plan, dataset

    @property
    def teacher_ids(self) -> list[str]:
        """The ids of the teachers the store holds (``teachers/<id>/``), for ``loader(teachers=...)``."""
        return self.store.teacher_ids()

    @property
    def num_classes(self) -> int:
        """The training data's class count: the width of ``Batch.targets.soft``."""
        return self.dataset.num_classes

    @property
    def size(self) -> int:
        """The render size of the stored views, in pixels (``loader(size=...)`` resizes them for another student)."""
        return self.store.record.plan.size

    def loader(
        self,
        batch_size: int,
        *,
        teachers: Sequence[str] | None = None,
        needs: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        temperature: float | Mapping[str, float] = 1.0,
        size: int | None = None,
        workers: int = 0,
        seed: int = 0,
        repeats: int = 1,
        label_smoothing: float = 0.0,
        label_fraction: float = 1.0,
        label_seed: int = 0,
        window_rows: int = 16384,
        verify: str = "sample",
        normalize: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        rank: int | None = None,
        world: int | None = None,
    ) -> ReplayLoader:
        """A loader of this cache's replayed views, with the named teachers' outputs.

        Args:
            batch_size: views per batch on each rank (a last partial batch is dropped).
            teachers: the teacher ids to read (``Batch.teachers`` has one entry per id); default: every teacher
                in the store; ``[]``: none (images and targets only).
            needs: the outputs to read, ``logits``, ``features``, ``tokens``: one list for every teacher, or one per
                id; default: all that each teacher stored.
            temperature: the temperature the loss softens teacher logits at; a top-k cache rebuilds its tail for
                it (one value, or one per id). Logits come out unscaled either way.
            size: the student's input size (default: the stored views' size); the crops are the stored ones,
                resized to it, and replay checks still fingerprint them at the stored size.
            workers: loader processes rendering views (0: in this process).
            seed: the seed of the data order (with the epoch number: ``set_epoch``).
            repeats: R > 1 takes R different stored views of each sample per epoch (timm's --aug-repeats).
            label_smoothing: timm's smoothing of the target rows (``Batch.targets.soft``).
            label_fraction: the stratified share of samples that keep their label; the others get label -1 and a
                zero target row (1.0: every label).
            label_seed: the seed that picks which samples keep their label.
            window_rows: about how many rows are shuffled together in memory.
            verify: replayed views checked against the stored fingerprints: ``"all"``, ``"sample"`` (about one in
                a hundred) or ``"none"``.
            normalize: hand out float32 images normalised with ``mean`` and ``std`` instead of uint8 images. The
                default (uint8) is the faster one: normalise on the device with ``stages.loader.normalize``, and a
                quarter of the bytes cross the bus.
            mean: the per-channel mean on the 0..1 scale that ``normalize=True`` uses (default: ImageNet's).
            std: the per-channel standard deviation that ``normalize=True`` uses (default: ImageNet's).
            rank: this process's rank (default: from torch.distributed, else 0).
            world: the number of ranks (default: from torch.distributed, else 1).

        Returns:
            A ``ReplayLoader``: ``len(loader)`` batches per epoch on every rank, ``set_epoch``, ``state_dict``.

        Raises:
            UserError: a teacher the store lacks, an output it did not store, ``teachers`` given as one string,
                a store with no complete view yet.

        Example:
            >>> loader = cache.loader(batch_size=256, teachers=["beitv2_l"], needs=["logits"], size=224, workers=8)
            >>> batch = next(iter(loader))
            >>> batch.images.shape, batch.teachers["beitv2_l"]["logits"].shape
            (torch.Size([256, 3, 224, 224]), torch.Size([256, 1000]))
        """
        if isinstance(teachers, str):
            raise UserError(f"teachers is a list of teacher ids: write teachers=['{teachers}']")
        ids = self.teacher_ids if teachers is None else list(teachers)
        sources = {
            tid: CachedTeacher(self.store, tid, self._needs(tid, needs), prefix=f"t{j}:") for j, tid in enumerate(ids)
        }
        views = StoredViews(self.store, self.plan, min((s.num_views for s in sources.values()), default=None))
        if views.num_views == 0:
            raise UserError(f"store {self.store.path} has no complete view yet: finish `pipeline extract` first")
        return ReplayLoader(
            self.dataset,
            self.plan,
            views,
            batch_size,
            teachers=sources,
            temperature=temperature,
            size=size,
            label_fraction=label_fraction,
            label_seed=label_seed,
            label_smoothing=label_smoothing,
            seed=seed,
            repeats=repeats,
            window_rows=window_rows,
            workers=workers,
            verify=verify,
            normalize=(mean, std) if normalize else None,
            rank=rank,
            world=world,
        )

    def _needs(self, teacher_id: str, needs) -> tuple[str, ...]:
        """The outputs to read of ``teacher_id``, checked by name here and against what it stored by ``CachedTeacher``."""
        stored = self.store.teacher_info(teacher_id).outputs  # an unknown id names the store's teachers
        if isinstance(needs, Mapping):
            if teacher_id not in needs:
                raise UserError(
                    f"needs names outputs for {', '.join(needs)} but not for teacher '{teacher_id}': add it, or pass one list for all"
                )
            needs = needs[teacher_id]
        if isinstance(needs, str):
            needs = [needs]
        wanted = tuple(stored if needs is None else needs)
        unknown = [k for k in wanted if k not in OUTPUTS]
        if unknown:
            raise UserError(f"needs '{unknown[0]}' is not a teacher output: choose from {', '.join(OUTPUTS)}")
        return wanted

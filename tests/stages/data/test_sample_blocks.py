"""Sample blocks are random samples of the dataset, on class-ordered data (ImageNet's layout, ``folder:PATH``).

A class-per-folder dataset lists its images class by class, so blocks of
consecutive ids hold one or two classes each. These tests use data shaped that
way: ImageNet-1k's shape on ids and labels alone (numpy only), and a folder
dataset of 10 classes x 60 images with blocks of 16, much smaller than a class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import STUDENT
from stages.data.datasets import open_dataset
from stages.training.distill import train
from stages.training.settings import TrainSettings
from stages.data.replay import (
    DrawnViews,
    StoredViews,
    epoch_units,
    rebatch,
    sample_order,
    shuffle_windows,
    window_units,
)
from stages.cache.store_setup import open_store
from stages.data.views import ViewPlan, ViewRecipe
from storage import Store

# -- what independent sampling gives -----------------------------------------------------------


def expected_distinct(class_sizes: np.ndarray, batch: int) -> float:
    """E[distinct classes] in ``batch`` draws with replacement from class shares p_c: sum_c 1 - (1 - p_c)^batch."""
    p = class_sizes / class_sizes.sum()
    return float((1 - (1 - p) ** batch).sum())


def random_pairing_rate(class_sizes: np.ndarray) -> float:
    """P(two samples drawn at random share their label) = sum_c p_c^2."""
    p = class_sizes / class_sizes.sum()
    return float((p**2).sum())


def epoch_batches(
    labels: np.ndarray, order: np.ndarray, block: int, window_rows: int, batch: int, epoch: int = 0, seed: int = 0
):
    """The label column of an epoch's batches, made by the trainer's own epoch_units, shuffle_windows and rebatch."""
    num_blocks = -(-len(labels) // block)

    def tables():
        for _, b in epoch_units(epoch, 1, num_blocks, seed):
            ids = order[b * block : (b + 1) * block]
            yield {"id": ids, "label": labels[ids]}

    rng = np.random.default_rng([seed, epoch, 2])
    for t in rebatch(shuffle_windows(tables(), window_units(window_rows, block), rng), batch, drop_last=True):
        yield t["label"]


def class_ordered_labels(num_classes: int, num_samples: int) -> np.ndarray:
    """Labels listed class by class, as a folder dataset lists them (near-equal classes)."""
    return np.repeat(np.arange(num_classes), np.diff(np.linspace(0, num_samples, num_classes + 1).round().astype(int)))


# -- ImageNet's shape, ids and labels only ---------------------------------------------------------

IMAGENET = dict(num_samples=1_281_167, num_classes=1000, block=1024, window_rows=16384, batch=256)


def test_imagenet_shaped_batches_hold_as_many_classes_as_independent_sampling():
    n, c, block, window, batch = (IMAGENET[k] for k in ("num_samples", "num_classes", "block", "window_rows", "batch"))
    labels = class_ordered_labels(c, n)
    expected = expected_distinct(np.bincount(labels), batch)
    assert 225 < expected < 227  # about 226

    def distinct(order, batches=400):
        counts = []
        for labels_of_batch in epoch_batches(labels, order, block, window, batch):
            counts.append(len(np.unique(labels_of_batch)))
            if len(counts) == batches:
                break
        return float(np.mean(counts))

    permuted = distinct(sample_order(n, seed=0))
    assert abs(permuted - expected) < 0.1 * expected  # measured: 226.1 over the whole epoch
    # What blocks of consecutive ids gave (the store format before 2): about 27 classes per batch.
    assert distinct(np.arange(n), batches=100) < 40


def test_imagenet_shaped_mixing_partners_share_a_label_as_often_as_random_pairs():
    n, c, block = IMAGENET["num_samples"], IMAGENET["num_classes"], IMAGENET["block"]
    labels = class_ordered_labels(c, n)
    plan = ViewPlan(ViewRecipe(mixup_alpha=0.2, cutmix_alpha=1.0), seed=0)
    sizes = np.full((block, 2), 256)

    def same_label_rate(order, blocks):
        same = total = 0
        for b in blocks:
            ids = order[b * block : (b + 1) * block]
            partner = plan.draw(0, ids, sizes[: len(ids)])["mix_partner"]
            mixes = partner >= 0
            same += int((labels[ids][mixes] == labels[partner[mixes]]).sum())
            total += int(mixes.sum())
        return same / total

    rate = same_label_rate(sample_order(n, seed=0), range(0, 1251, 10))  # 126 blocks, 129k views
    expected = random_pairing_rate(np.bincount(labels))  # 0.001
    assert abs(rate - expected) < 5 * np.sqrt(expected / 64_000)  # pairs: about 64k independent draws
    assert same_label_rate(np.arange(n), range(0, 1251, 50)) > 0.5  # consecutive ids: about 0.75


# -- a class-ordered folder dataset ---------------------------------------------------------------

CLASSES, PER_CLASS, VAL_PER_CLASS = 10, 60, 20
BLOCK, WINDOW_ROWS, BATCH = 16, 64, 16  # blocks a quarter of a class; a window of 4 blocks


def _write_folder(root: Path, per_class: int, seed: int, ext: str) -> None:
    """Class-coloured images under noise (learnable at 32 px in a few epochs), 40 x 40 so that crops vary."""
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True)
        base = np.array([(37 * c) % 256, (91 * c) % 256, (151 * c) % 256])
        for j in range(per_class):
            pixels = np.clip(base + rng.integers(-70, 71, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{j:03d}.{ext}")


@pytest.fixture(scope="session")
def class_ordered(tmp_path_factory):
    """(train, val) folder datasets: 10 classes x 60 PNGs listed class by class, and 10 x 20 JPEGs."""
    root = tmp_path_factory.mktemp("class_ordered")
    _write_folder(root / "train", PER_CLASS, 0, "png")
    _write_folder(root / "val", VAL_PER_CLASS, 1, "jpg")
    train_data = open_dataset(f"folder:{root / 'train'}")
    assert np.array_equal(train_data.labels, np.repeat(np.arange(CLASSES), PER_CLASS))  # class-ordered ids
    return train_data, open_dataset(f"folder:{root / 'val'}")


def test_a_store_records_a_seeded_permutation_and_keeps_it(class_ordered, tmp_path):
    data, _ = class_ordered
    plan = ViewPlan(ViewRecipe(), seed=3)
    store = open_store(tmp_path / "s", data, plan, views=1, block=BLOCK, size=32)
    order = store.order
    assert sorted(order) == list(range(len(data))) and not np.array_equal(order, np.arange(len(data)))
    assert np.array_equal(order, sample_order(len(data), 3))  # and training without a store uses the same blocks
    assert np.array_equal(DrawnViews(plan, data, 1, block=BLOCK).ids(2), store.block_ids(2))
    assert store.record.order.kind == "permuted" and store.record.order.seed == 3
    views = StoredViews(store, plan, 1)
    assert np.array_equal(np.concatenate([views.ids(b) for b in range(store.num_blocks)]), order)
    # Every block is a mix of classes, not a run of one.
    assert all(len(np.unique(data.labels[views.ids(b)])) >= 5 for b in range(store.num_blocks))
    # Appending views keeps the order; so does reopening.
    store.add_views(2)
    assert np.array_equal(Store(tmp_path / "s").order, order)
    assert not np.array_equal(sample_order(len(data), 4), order)  # the seed fixes it


def test_folder_batches_hold_as_many_classes_as_independent_sampling(class_ordered):
    data, _ = class_ordered
    labels = data.labels
    expected = expected_distinct(np.bincount(labels), BATCH)  # 8.15
    order = DrawnViews(ViewPlan(seed=0), data, 1, block=BLOCK).order
    counts = [
        len(np.unique(b)) for epoch in range(20) for b in epoch_batches(labels, order, BLOCK, WINDOW_ROWS, BATCH, epoch)
    ]
    assert abs(np.mean(counts) - expected) < 0.1 * expected
    before = [
        len(np.unique(b))
        for epoch in range(5)
        for b in epoch_batches(labels, np.arange(len(data)), BLOCK, WINDOW_ROWS, BATCH, epoch)
    ]
    assert np.mean(before) < 0.6 * expected  # consecutive ids: 4.2 (a window is 4 one-class blocks); permuted: 8.17


def test_folder_mixing_partners_share_a_label_as_often_as_random_pairs(class_ordered):
    data, _ = class_ordered
    plan = ViewPlan(ViewRecipe(mixup_alpha=0.2, cutmix_alpha=1.0), seed=0)
    views = DrawnViews(plan, data, num_views=8, block=BLOCK)
    same = total = 0
    for v in range(views.num_views):
        for b in range(views.num_blocks):
            ids, partner = views.ids(b), views.params(v, b)["mix_partner"]
            mixes = partner >= 0
            same += int((data.labels[ids][mixes] == data.labels[partner[mixes]]).sum())
            total += int(mixes.sum())
    rate, expected = same / total, random_pairing_rate(np.bincount(data.labels))  # 0.1
    pairs = total / 2  # a mate pair is counted from both sides
    assert abs(rate - expected) < 4 * np.sqrt(expected * (1 - expected) / pairs)


def test_a_student_learns_from_class_ordered_folders_as_from_mixed_order(class_ordered):
    """Small blocks and a small shuffle window on class-ordered ids train as well as the same images interleaved."""
    data, val = class_ordered
    plan = ViewPlan(ViewRecipe(scale=(0.35, 1.0)), seed=0)
    epochs = 3  # measured: both reach 1.0 by epoch 2 (consecutive ids, the old layout: 0.7 after 4)
    # size 32: the views' own scale (40 px images); without it the student renders at resnet10t's default 176 px, 30x the work
    settings = TrainSettings(
        **STUDENT,
        method="ce",
        epochs=epochs,
        batch_size=BATCH,
        lr=0.004,
        window_rows=WINDOW_ROWS,
        verify="none",
        size=32,
    )
    # class 0, 1, .., 9, 0, ..
    interleaved = np.argsort(np.arange(len(data)) % PER_CLASS * CLASSES + data.labels, kind="stable")

    def accuracy(order):
        views = DrawnViews(plan, data, num_views=epochs, block=BLOCK, order=order)
        return train(settings, data, val, views, plan).metrics[-1]["val_top1"]

    permuted, mixed = accuracy(None), accuracy(interleaved)  # None: the store's order, a seeded permutation
    assert mixed > 0.8
    assert permuted >= mixed - 0.1  # within noise of each other (200 validation images)


def test_the_store_checks_its_order(tmp_path):
    import zarr

    from storage import ArraySpec, DatasetRecord, PlanRecord, UserError

    made = dict(
        dataset=DatasetRecord(source="test", fingerprint="f", num_samples=10, num_classes=1, classes=("a",)),
        plan=PlanRecord(recipe={}, seed=0, size=32),
        versions={},
        num_views=1,
        block=4,
        plan_specs={"crop": ArraySpec((4,), "float32")},
    )
    with pytest.raises(UserError, match="permutation"):
        Store.create(tmp_path / "a", **made, order=np.zeros(10, int))
    store = Store.create(tmp_path / "b", **made, order=np.arange(10)[::-1])
    assert list(store.block_ids(2)) == [1, 0] and list(store.block_range(2)) == [8, 9]
    assert list(store.positions([9, 0, 5])) == [0, 9, 4]
    with pytest.raises(UserError, match=r"has sample ids 0..9, not 0..10"):
        store.positions([0, 10])
    zarr.open_array(str(tmp_path / "b" / "order"), mode="r+")[:] = np.arange(10)  # another order than the one recorded
    with pytest.raises(UserError, match="does not match its checksum"):
        Store(tmp_path / "b").order


# -- repeated augmentation: a sample's views share one decode ---------------------------------------------


def test_with_repeats_a_samples_views_travel_together_and_batches_stay_random_samples():
    """repeats 3 on ImageNet's shape: every batch holds all 3 views of each of its samples (one decode renders them),
    about 256 / 3 samples of as many classes as 85 independent draws give."""
    n, c, block, window, batch, repeats = 1_281_167, 1000, 1024, 16384, 255, 3
    labels = class_ordered_labels(c, n)
    order = sample_order(n, seed=0)
    num_blocks = -(-n // block)

    def tables():
        for v, b in epoch_units(0, repeats, num_blocks, 0, repeats)[: repeats * 32]:
            ids = order[b * block : (b + 1) * block]
            yield {"id": ids, "label": labels[ids], "view": np.full(len(ids), v)}

    rng = np.random.default_rng([0, 0, 2])
    batches = list(
        rebatch(
            shuffle_windows(tables(), window_units(window, block, repeats), rng, by_sample=True), batch, drop_last=True
        )
    )
    assert len(batches) > 300
    for t in batches:
        ids, counts = np.unique(t["id"], return_counts=True)
        assert (counts == repeats).all()  # each sample's three views, none elsewhere
        assert len({(i, v) for i, v in zip(t["id"].tolist(), t["view"].tolist())}) == batch  # three different views
    classes = np.median([len(np.unique(t["label"])) for t in batches])
    assert classes > 0.95 * expected_distinct(np.bincount(labels), batch // repeats)


MIXING = dict(mixup_alpha=0.8, cutmix_alpha=1.0)


@pytest.mark.parametrize(
    "recipe, batch, once",
    [
        ({}, 15, True),  # no mixing: a sample's three views share a batch
        ({**MIXING, "mix_pair_views": 3}, 18, True),  # its three views share their partner: 6 rows, 2 decodes
        (MIXING, 18, False),  # a partner per view: the views of a window link into one component, decoded per view
    ],
    ids=["no-mixing", "shared-partner", "partner-per-view"],
)
def test_a_repeated_epoch_decodes_each_image_once(recipe, batch, once, monkeypatch):
    """train with repeats 3: the renderer decodes each image of the epoch once, for its three views (and for its
    partner's views, when the plan pairs the three views alike); partners drawn per view cost a decode per view."""
    from collections import Counter

    data = open_dataset("fake:48?size=32")
    calls = Counter()
    original = type(data).image

    def counted(self, i):
        calls[i] += 1
        return original(self, i)

    monkeypatch.setattr(type(data), "image", counted)
    plan = ViewPlan(ViewRecipe(**recipe), seed=0)
    s = TrainSettings(**STUDENT, method="ce", epochs=1, repeats=3, batch_size=batch, verify="none")
    result = train(s, data, None, DrawnViews(plan, data, num_views=3, block=16), plan)
    assert result.metrics[0]["train_ce"] > 0
    assert calls and len(calls) * 3 >= batch  # at least a batch of views rendered
    assert (max(calls.values()) == 1) == once, calls  # one decode per sample, for all its views


def test_shared_partners_on_imagenets_shape_keep_a_samples_and_its_partners_views_in_one_batch():
    """repeats 3 and mixing with ``mix_pair_views`` 3 on ImageNet's shape: every batch holds each of its samples' 3
    views and its partner's, and as many classes as independent draws of its images give."""
    from stages.data.replay import with_partner_params

    n, c, block, window, batch, repeats = 1_281_167, 1000, 1024, 16384, 258, 3
    labels = class_ordered_labels(c, n)
    order = sample_order(n, seed=0)
    num_blocks = -(-n // block)
    plan = ViewPlan(ViewRecipe(**MIXING, mix_pair_views=repeats), seed=0)
    sizes = np.full((block, 2), 256)

    def tables():
        for v, b in epoch_units(0, repeats, num_blocks, 0, repeats, view_groups=repeats)[: repeats * 16]:
            ids = order[b * block : (b + 1) * block]
            table = {
                **plan.draw(v, ids, sizes[: len(ids)]),
                "id": ids,
                "label": labels[ids],
                "view": np.full(len(ids), v),
            }
            yield with_partner_params(table, plan.fields)

    rng = np.random.default_rng([0, 0, 2])
    batches = list(
        rebatch(
            shuffle_windows(tables(), window_units(window, block, repeats), rng, by_sample=True), batch, drop_last=True
        )
    )
    assert len(batches) > 150
    for t in batches:
        _, counts = np.unique(t["id"], return_counts=True)
        assert (counts == repeats).all()  # each image's three views, none elsewhere: one decode each
        mixing = t["mix_partner"] >= 0
        assert np.isin(t["mix_partner"][mixing], t["id"]).all()  # every partner renders in the batch
    classes = np.median([len(np.unique(t["label"])) for t in batches])
    assert classes > 0.95 * expected_distinct(np.bincount(labels), batch // repeats)

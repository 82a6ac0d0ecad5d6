"""The public loader (``stages.loader``): what a user's own loop gets from a store, batch by batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import BATCH, BLOCK, SIZE, VIEWS, runner_for
from stages.cache.store_setup import open_store
from stages.data.views import ViewPlan, ViewRecipe
from stages.loader import Batch, UserError, normalize, open_cache
from stages.teachers.extract import extract
from storage import Store


def epoch(loader) -> list[Batch]:
    return list(loader)


def test_an_epoch_holds_every_sample_once_with_its_own_stored_teacher_rows(two_teacher_store):
    cache = open_cache(str(two_teacher_store))
    assert cache.teacher_ids == ["t1", "t2"] and cache.num_classes == 10 and cache.size == SIZE
    loader = cache.loader(16, teachers=["t1", "t2"], needs=["logits"])
    batches = epoch(loader)
    assert len(batches) == len(loader) == 80 // 16
    ids = torch.cat([b.ids for b in batches]).numpy()
    assert sorted(ids) == list(range(80))  # every sample once: the whole training set, one view each
    store = Store(two_teacher_store)
    stored = store.teacher("t1").array("logits")[:]  # [V, N, C] float32 (full logits), rows in the store's sample order
    row_of = np.argsort(np.concatenate([store.block_ids(b) for b in range(store.num_blocks)]))  # sample id -> its row
    for b in batches:
        assert b.images.dtype == torch.uint8 and b.images.shape == (16, 3, SIZE, SIZE)
        assert set(b.teachers) == {"t1", "t2"} and set(b.teachers["t1"]) == {"logits"}
        # Each row's logits are the ones the teacher wrote for that very (view, sample), whatever the shuffle did.
        np.testing.assert_array_equal(
            b.teachers["t1"]["logits"].numpy(), stored[b.views.numpy(), row_of[b.ids.numpy()]]
        )
        assert b.teachers["t2"]["logits"].shape == (16, 10)  # top-3 rows rebuilt to all classes
        assert torch.equal(b.targets.labels, torch.from_numpy(cache.dataset.labels[b.ids.numpy()]))
        assert torch.equal(b.targets.soft.argmax(1), b.targets.labels)


def test_epochs_walk_through_the_stored_views_and_repeat_with_the_epoch(base_store):
    loader = open_cache(str(base_store)).loader(16, teachers=[])
    seen = []
    for e in range(VIEWS):
        loader.set_epoch(e)
        seen.append({(int(i), int(v)) for b in loader for i, v in zip(b.ids, b.views)})
    assert {v for _, v in seen[0] | seen[1]} == set(range(VIEWS))
    assert all(len({i for i, _ in s}) == 80 for s in seen)
    assert not seen[0] & seen[1]  # VIEWS epochs use every stored view of every sample exactly once
    loader.set_epoch(0)
    again = {(int(i), int(v)) for b in loader for i, v in zip(b.ids, b.views)}
    assert again == seen[0]


def test_a_resumed_loader_gives_the_rest_of_the_epoch_batch_for_batch(base_store):
    cache = open_cache(str(base_store))
    whole = cache.loader(16, seed=3)
    whole.set_epoch(1)
    reference = epoch(whole)
    first = cache.loader(16, seed=3)
    first.set_epoch(1)
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["position"] == 2
    resumed = cache.loader(16, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the usual loop calls it again: the loaded position holds
    rest = epoch(resumed)
    assert len(rest) == len(reference) - 2
    for a, b in zip(rest, reference[2:]):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.images, b.images)
        assert torch.equal(a.teachers["t1"]["logits"], b.teachers["t1"]["logits"])
    assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["position"] == 0  # a whole epoch taken
    with pytest.raises(UserError, match="batch_size 16 .* has batch_size 32"):
        cache.loader(32, seed=3).load_state_dict(state)


def test_ranks_take_disjoint_shares_and_the_same_number_of_batches(base_store):
    cache = open_cache(str(base_store))
    ranks = [cache.loader(8, teachers=[], rank=r, world=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    ids = [torch.cat([b.ids for b in loader]) for loader in ranks]
    assert len(ids[0]) == len(ids[1]) == len(ranks[0]) * 8  # no rank waits on another
    assert not set(ids[0].tolist()) & set(ids[1].tolist())
    with pytest.raises(UserError, match="rank 2 is not one of the 2 ranks"):
        cache.loader(8, rank=2, world=2)


def test_normalised_images_are_the_uint8_ones_normalised(base_store):
    cache = open_cache(str(base_store))
    raw = next(iter(cache.loader(16, teachers=[])))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    floats = next(iter(cache.loader(16, teachers=[], normalize=True, mean=mean, std=std)))
    assert floats.images.dtype == torch.float32
    assert torch.equal(floats.images, normalize(raw.images, mean, std))
    moved = raw.to("cpu", non_blocking=True)
    assert torch.equal(moved.images, raw.images) and len(moved) == 16


def test_repeats_put_a_samples_views_in_one_batch(base_store):
    loader = open_cache(str(base_store)).loader(16, teachers=["t1"], needs=["features"], repeats=2)
    for b in loader:
        ids, counts = np.unique(b.ids.numpy(), return_counts=True)
        assert (counts == 2).all()  # both views of each sample, side by side (one decode renders both)
        assert set(b.teachers["t1"]) == {"features"}
        for i in ids:
            assert len(set(b.views[b.ids == int(i)].tolist())) == 2


def test_mixed_views_carry_mixed_targets_and_their_partners_label(tmp_path, train_data, teacher1):
    recipe = ViewRecipe(mixup_alpha=0.8, cutmix_alpha=1.0)
    store = open_store(tmp_path / "mix", train_data, ViewPlan(recipe, seed=0), views=VIEWS, block=BLOCK, size=SIZE)
    extract(store, train_data, runner_for(teacher1, logits="topk", k=3), "t1", views=1, batch_size=BATCH)
    cache = open_cache(str(tmp_path / "mix"))
    loader = cache.loader(16, label_smoothing=0.1, verify="all")
    mixed = 0
    for b in loader:
        partner = b.rows["mix_partner"]
        for j in range(len(b)):
            y = int(b.targets.labels[j])
            expect = torch.full((10,), 0.01, dtype=torch.float64)
            expect[y] += 0.9 * b.lam[j]
            if partner[j] >= 0:
                expect[int(cache.dataset.labels[partner[j]])] += 0.9 * (1 - b.lam[j])
                mixed += int(b.lam[j] < 1)
            else:
                expect[y] += 0.9 * (1 - b.lam[j])
            torch.testing.assert_close(b.targets.soft[j].double(), expect, rtol=0, atol=1e-6)
    assert mixed > 40  # most views mix, each weighted by its own share


def test_mistakes_are_one_line_that_names_the_fix(base_store, two_teacher_store):
    cache = open_cache(str(base_store))
    with pytest.raises(UserError, match=r"has no teacher 'beitv2_l' \(it has: t1\)"):
        cache.loader(16, teachers=["beitv2_l"])
    with pytest.raises(UserError, match="has no tokens .* --outputs"):
        cache.loader(16, teachers=["t1"], needs=["tokens"])
    with pytest.raises(UserError, match="'logit' is not a teacher output: choose from logits"):
        cache.loader(16, needs=["logit"])
    with pytest.raises(UserError, match=r"write teachers=\['t1'\]"):
        cache.loader(16, teachers="t1")
    with pytest.raises(UserError, match="verify must be one of"):
        cache.loader(16, verify="off")
    with pytest.raises(UserError, match="repeats 3 needs 3 different views"):
        cache.loader(16, repeats=3)
    with pytest.raises(UserError, match="larger than a rank's share"):
        cache.loader(200)
    with pytest.raises(UserError, match="not for teacher 't2'"):
        open_cache(str(two_teacher_store)).loader(16, needs={"t1": ["logits"]})
    with pytest.raises(UserError, match="temperature has no value for teacher t2"):
        open_cache(str(two_teacher_store)).loader(16, temperature={"t1": 2.0})
    with pytest.raises(UserError, match="size must be a positive"):
        cache.loader(16, size=-4)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"temperature": 0}, "temperature of t1 must be a number > 0"),
        ({"temperature": {"t9": 2.0}}, "temperature names t9, which the loader does not read"),
        ({"workers": -1}, "workers must be an integer in"),
        ({"label_fraction": 2}, "label_fraction must be"),
        ({"label_smoothing": -1}, "label_smoothing must be a number in"),
        ({"window_rows": 0}, "window_rows must be an integer >= 1"),
        ({"normalize": True, "mean": (1, 2)}, r"mean takes 3 numbers, one per channel"),
        ({"normalize": True, "std": (0.2, 0.0, 0.2)}, "std must be a number > 0"),
    ],
)
def test_a_library_callers_bad_value_is_one_line_naming_the_argument(base_store, kwargs, words):
    with pytest.raises(UserError, match=words):
        open_cache(str(base_store)).loader(16, **kwargs)

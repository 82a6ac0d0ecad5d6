"""Mixing partners are mates: a random perfect matching of each block, kept together up to the renderer.

The renderer then decodes and renders each image once and mixes both views of
a pair from the two renders; what it returns is exactly what mixing each view
with a fresh render of its partner gives (test_augment.py checks that part).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.data import replay
from stages.data.toy_datasets import FakeDataset
from stages.data.replay import (
    PAIR,
    DrawnViews,
    ViewRenderer,
    even_batches,
    pack_groups,
    rebatch,
    render_batches,
    shuffle_windows,
    unit_table,
)
from stages.data.views import ViewPlan, ViewRecipe, pair_partners, row

A2 = dict(randaugment="rand-m7-mstd0.5", mixup_alpha=0.1, cutmix_alpha=1.0)


class CountingFake(FakeDataset):
    """Fake images that count their decodes."""

    decodes = 0

    def image(self, i):
        CountingFake.decodes += 1
        return super().image(i)


def _sizes(n):
    return np.full((n, 2), 32)


@pytest.mark.parametrize("n", [50, 51])
def test_partners_are_a_random_perfect_matching_of_the_block(n):
    plan = ViewPlan(ViewRecipe(**A2), seed=3)
    block = np.arange(1000, 1000 + n)
    mates = set()
    for v in range(30):
        partner = plan.draw(v, block, _sizes(n))["mix_partner"]
        assert np.isin(partner, block).all() and (partner != block).all()
        back = partner[partner - 1000]  # the partner's own partner
        mutual = back == block
        assert (~mutual).sum() == n % 2  # all mates, but for the odd one out
        if n % 2:
            odd = int(np.flatnonzero(~mutual)[0])
            assert mutual[partner[odd] - 1000]  # which mixes with a sample that has a mate of its own
        mates |= {(int(a), int(b)) for a, b in zip(block, partner)}
    assert len(mates) > 20 * n  # another matching for every view
    # The matching is a function of the block's ids and draws, not of their order.
    order = np.random.default_rng(0).permutation(n)
    again = plan.draw(29, block[order], _sizes(n))["mix_partner"]
    np.testing.assert_array_equal(again, partner[order])


def test_pair_partners_edge_cases():
    assert pair_partners(np.array([7]), np.array([0.5])).tolist() == [-1]
    assert pair_partners(np.array([4, 9]), np.array([0.9, 0.1])).tolist() == [9, 4]
    # Repeated ids share one mate.
    assert pair_partners(np.array([4, 9, 4]), np.array([0.9, 0.1, 0.9])).tolist() == [9, 4, 9]


def _units(plan, data, views=2, block=32):
    source = DrawnViews(plan, data, num_views=views, block=block)
    names = list(plan.fields)
    return [unit_table(source, v, b, data.labels, names) for v in range(views) for b in range(source.num_blocks)]


def _mates_in_batch(batch) -> tuple[int, int]:
    """(views that mix, of those the ones whose partner is in the same batch)."""
    keys = set(zip(batch["id"].tolist(), batch["view"].tolist()))
    mixing = np.flatnonzero(batch["mix_partner"] >= 0)
    found = sum((int(batch["mix_partner"][j]), int(batch["view"][j])) in keys for j in mixing)
    return len(mixing), found


@pytest.mark.parametrize("batch_size", [16, 15])
def test_shuffling_and_rebatching_keep_mates_in_one_batch(batch_size):
    data = FakeDataset(200, size=32)
    plan = ViewPlan(ViewRecipe(**A2), seed=1)
    units = _units(plan, data)  # 2 views x 7 blocks (the last of 8 rows)
    batches = list(rebatch(shuffle_windows(iter(units), 3, np.random.default_rng(0)), batch_size, drop_last=False))
    rows = sorted(
        zip(np.concatenate([b["id"] for b in batches]).tolist(), np.concatenate([b["view"] for b in batches]).tolist())
    )
    assert rows == sorted((i, v) for v in range(2) for i in range(200))  # every row once
    assert all(len(b["id"]) == batch_size for b in batches[:-1])
    mixing, together = map(sum, zip(*map(_mates_in_batch, batches)))
    assert mixing == 400
    if batch_size % 2 == 0:
        assert together == mixing  # blocks of 32 and a last one of 8: all pairs, and pairs tile an even batch
    else:
        assert together >= mixing - 2 * len(batches)  # an odd batch of pairs cuts a pair now and then
    # Shuffled: a batch holds rows of several blocks, and the order is not the units' order.
    assert np.mean([len(np.unique(b["id"] // 32)) for b in batches]) > 2


def test_rebatch_keeps_mates_when_views_mix_at_random():
    data = FakeDataset(256, size=32)
    plan = ViewPlan(ViewRecipe(mixup_alpha=0.2, mix_prob=0.5), seed=0)
    units = _units(plan, data, views=1)
    batches = list(rebatch(shuffle_windows(iter(units), 8, np.random.default_rng(1)), 32, drop_last=True))
    assert len(batches) == 8 and all(len(b["id"]) == 32 for b in batches)
    mixing, together = map(sum, zip(*map(_mates_in_batch, batches)))
    assert 80 < mixing < 180 and together == mixing


def test_pack_groups_fills_batches_and_cuts_only_when_it_must():
    pair = np.repeat(np.arange(10), [2, 2, 1, 2, 2, 2, 1, 2, 2, 2])  # 18 rows, groups of two and two single rows
    order, full = pack_groups(pair, 5)
    # Two whole batches; a third would need a third single row, so its rows wait for the next table.
    assert sorted(order.tolist()) == list(range(18)) and full == 10
    cuts = [set(pair[order[s : s + 5]].tolist()) for s in (0, 5, 10)]
    assert all(not (a & b) for a in cuts for b in cuts if a is not b)  # no group in two batches
    assert [len(np.unique(pair[order[s : s + 5]])) for s in (0, 5)] == [3, 3]
    # Pairs only and an odd batch: a pair is cut once in a while, and every row still comes out once.
    pair = np.repeat(np.arange(20), 2)
    order, full = pack_groups(pair, 7)
    assert sorted(order.tolist()) == list(range(40)) and full == 28  # the last rows wait for more
    batch_of = {}
    for k, r in enumerate(order[:full]):
        batch_of.setdefault(int(pair[r]), set()).add(k // 7)
    assert sum(len(b) > 1 for b in batch_of.values()) == 2  # one pair cut per two odd batches, where nothing else fits


def test_extraction_batches_keep_mates_together():
    data = FakeDataset(70, size=32)
    plan = ViewPlan(ViewRecipe(**A2), seed=2)
    (unit, *_) = _units(plan, data, views=1, block=70)
    batches = list(even_batches(unit, 16))
    assert len(batches) == 5 and all(12 <= len(b["id"]) <= 16 for b in batches)  # near 70 / 5, cut between mates
    assert sorted(np.concatenate([b["id"] for b in batches]).tolist()) == list(range(70))
    mixing, together = map(sum, zip(*map(_mates_in_batch, batches)))
    assert mixing == 70 and together == 70  # 70 is even: every sample has a mate


def test_a_batch_of_mates_decodes_and_renders_each_image_once(monkeypatch):
    data = CountingFake(64, size=32)
    plan = ViewPlan(ViewRecipe(**A2), seed=4)
    units = _units(plan, data, views=1)
    batches = list(rebatch(shuffle_windows(iter(units), 2, np.random.default_rng(0)), 32, drop_last=True))
    renders = []
    render_own = ViewPlan.render_own
    monkeypatch.setattr(ViewPlan, "render_own", lambda self, *a: renders.append(a[2]) or render_own(self, *a))
    renderer = ViewRenderer(data, plan, (32, 24), plan_size=32)
    CountingFake.decodes = 0
    out = list(render_batches(renderer, iter(batches), list(plan.fields), 0, None))
    assert CountingFake.decodes == 64 and sorted(renders) == [24] * 64 + [32] * 64  # one decode, one render per size
    # Each view equals its own render mixed with its partner's, rendered on its own.
    for batch, rendered in out:
        for j in range(0, 32, 5):
            p = int(batch["mix_partner"][j])
            mate = plan.render_own(data.image(p), {k[2:]: v[j] for k, v in batch.items() if k.startswith("p:")}, 24)
            own = plan.render_own(data.image(int(batch["id"][j])), row(batch, j), 24)
            assert torch.equal(rendered["views"][1][j], plan.mixer.mix(own, mate, row(batch, j)))
    monkeypatch.undo()
    again = list(render_batches(renderer, iter(batches), list(plan.fields), 2, None))  # loader workers: the same views
    for (_, a), (_, b) in zip(out, again):
        assert all(torch.equal(x, y) for x, y in zip(a["views"], b["views"])) and torch.equal(a["lam"], b["lam"])


def test_one_decode_per_image_in_extraction(tmp_path):
    from conftest import make_teacher, runner_for

    from stages.teachers.extract import extract
    from stages.cache.store_setup import open_store
    from storage import Store

    data = CountingFake(64, size=32)
    plan = ViewPlan(ViewRecipe(**A2), seed=0)
    store = open_store(tmp_path / "s", data, plan, views=1, block=32, size=32)
    CountingFake.decodes = 0
    extract(store, data, runner_for(make_teacher(), logits="full", dtype="float32"), "t", views=1, batch_size=16)
    assert CountingFake.decodes == 64
    # The rows went back in block order: the plan's partners and fingerprints are the drawn ones.
    store = Store(tmp_path / "s")
    stored = store.plan.read_unit(0, 1, ["mix_partner", "crop"])
    ids = store.block_ids(1)
    drawn = plan.draw(0, ids, data.sizes()[ids])
    np.testing.assert_array_equal(stored["mix_partner"], drawn["mix_partner"])
    np.testing.assert_array_equal(stored["crop"], drawn["crop"])


def test_a_unit_table_names_groups_of_mates():
    data = FakeDataset(33, size=32)
    plan = ViewPlan(ViewRecipe(cutmix_alpha=1.0), seed=0)
    (unit,) = _units(plan, data, views=1, block=33)
    sizes = np.bincount(np.unique(unit[PAIR], return_inverse=True)[1])
    assert sorted(sizes.tolist()) == [1] + [2] * 16  # 16 pairs and the odd one out
    assert replay.mix_groups(np.arange(3), np.zeros(3, bool)).tolist() == [0, 1, 2]


def test_mixup_by_table_is_the_float64_blend_and_pil_conversions_keep_the_bytes():
    from PIL import Image

    from stages.data.views import MixupCutmix, from_pil, to_pil

    rng = np.random.default_rng(0)
    mixer = MixupCutmix(mixup_alpha=1.0)
    for lam in [0.0, 1.0, 0.5, 1e-12, 1 - 1e-12, *rng.random(20)]:
        a = torch.from_numpy(rng.integers(0, 256, (3, 19, 23), dtype=np.uint8))
        b = torch.from_numpy(rng.integers(0, 256, (3, 19, 23), dtype=np.uint8))
        blend = (
            torch.round(a.to(torch.float64) * lam + b.to(torch.float64) * (1.0 - lam)).clamp_(0, 255).to(torch.uint8)
        )
        assert torch.equal(mixer.mix(a, b, {"mix_box": np.zeros(4, np.float32), "mix_lam": np.float64(lam)}), blend)
    x = torch.from_numpy(rng.integers(0, 256, (3, 19, 23), dtype=np.uint8))
    assert np.array_equal(np.asarray(to_pil(x)), x.permute(1, 2, 0).numpy())
    assert torch.equal(from_pil(Image.fromarray(x.permute(1, 2, 0).numpy())), x) and from_pil(to_pil(x)).is_contiguous()
    assert torch.equal(
        from_pil(to_pil(x).convert("L")),
        torch.from_numpy(np.array(to_pil(x).convert("L").convert("RGB"))).permute(2, 0, 1),
    )

"""The view plan: counter-based draws, recorded crop boxes, deterministic rendering and fingerprints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stages.data.replay import ViewRenderer, render_batches
from stages.data.views import (
    RandomResizedCrop,
    ViewPlan,
    ViewRecipe,
    crop_resize,
    eval_params,
    fingerprint,
    row,
    uniforms,
)

# -- uniforms --------------------------------------------------------------------------------


def test_uniforms_same_arguments_same_values():
    ids = np.arange(200)
    a = uniforms(3, 1, ids, 0, 5)
    assert a.shape == (200, 5) and a.dtype == np.float64
    assert ((a >= 0) & (a < 1)).all()
    np.testing.assert_array_equal(a, uniforms(3, 1, ids, 0, 5))


def test_uniforms_rows_do_not_depend_on_which_ids_are_drawn_together():
    full = uniforms(7, 2, np.arange(100), 1, 4)
    subset = np.array([93, 5, 41, 0, 77, 5])  # any order, repeats allowed
    np.testing.assert_array_equal(uniforms(7, 2, subset, 1, 4), full[subset])
    np.testing.assert_array_equal(uniforms(7, 2, np.array([41]), 1, 4), full[[41]])


@pytest.mark.parametrize("changed", [dict(seed=1), dict(view=1), dict(stream=1)], ids=["seed", "view", "stream"])
def test_uniforms_differ_when_seed_view_or_stream_differ(changed):
    args = dict(seed=0, view=0, stream=0)
    ids = np.arange(500)
    a = uniforms(args["seed"], args["view"], ids, args["stream"], 3)
    args.update(changed)
    b = uniforms(args["seed"], args["view"], ids, args["stream"], 3)
    assert (a != b).all()
    # Independent streams, not shifted copies of one another.
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.1


def test_uniforms_look_uniform():
    u = uniforms(0, 0, np.arange(5000), 0, 4).ravel()
    counts, _ = np.histogram(u, bins=10, range=(0, 1))
    assert abs(u.mean() - 0.5) < 0.01
    assert counts.min() > 0.9 * len(u) / 10 and counts.max() < 1.1 * len(u) / 10


# -- RandomResizedCrop -----------------------------------------------------------------------


def _fallback_box(H, W, ratio):
    """torchvision's fallback when no attempt fits: the largest centred crop within the ratio range."""
    in_ratio = W / H
    if in_ratio < ratio[0]:
        w, h = W, round(W / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(H * ratio[1]), H
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


@pytest.mark.parametrize("H,W", [(32, 32), (37, 53), (200, 120)])
@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.35, 0.6), (0.5, 2.0))])
def test_random_resized_crop_boxes_lie_on_pixels_inside_the_image_within_scale_and_ratio(H, W, scale, ratio):
    op = RandomResizedCrop(scale, ratio)
    n = 2000
    box = op.draw(uniforms(0, 0, np.arange(n), 0, op.draws), np.tile([H, W], (n, 1)))["crop"]
    assert box.dtype == np.float32 and box.shape == (n, 4)
    assert (box >= 0).all() and (box <= 1).all()
    assert (box[:, 0] + box[:, 2] <= 1 + 1e-6).all() and (box[:, 1] + box[:, 3] <= 1 + 1e-6).all()

    px = box.astype(np.float64) * [H, W, H, W]
    # The recorded fractions are whole pixels: they map back to the same pixels.
    assert np.abs(px - np.round(px)).max() < 1e-3
    top, left, h, w = np.round(px).T
    assert (h >= 1).all() and (w >= 1).all() and (top + h <= H).all() and (left + w <= W).all()

    # torchvision draws area and aspect in real numbers and rounds w and h: allow half a pixel each.
    area = H * W
    ok = (
        ((w + 0.5) * (h + 0.5) >= scale[0] * area)
        & ((w - 0.5) * (h - 0.5) <= scale[1] * area)
        & ((w + 0.5) / (h - 0.5) >= ratio[0])
        & ((w - 0.5) / (h + 0.5) <= ratio[1])
    )
    fallback = np.array(_fallback_box(H, W, ratio), dtype=np.float64)
    is_fallback = (np.stack([top, left, h, w], axis=1) == fallback).all(axis=1)
    assert (ok | is_fallback).all()
    assert ok.mean() > 0.99  # the fallback is rare
    if H == W:  # where every (area, aspect) pair fits, the whole ranges are used, not a corner of them
        frac, aspect = (w * h / area)[ok], (w / h)[ok]
        assert frac.min() < scale[0] + 0.05 * (scale[1] - scale[0])
        assert aspect.min() < ratio[0] * 1.1 and aspect.max() > ratio[1] * 0.9


def test_horizontal_flip_probability():
    ids, sizes = np.arange(4000), np.full((4000, 2), 32)
    flips = ViewPlan(ViewRecipe(hflip=0.5)).draw(0, ids, sizes)["flip"]
    assert flips.dtype == np.uint8 and set(np.unique(flips)) == {0, 1}
    assert abs(flips.mean() - 0.5) < 0.03
    assert not ViewPlan(ViewRecipe(hflip=0.0)).draw(0, ids, sizes)["flip"].any()


def test_crop_box_maps_back_to_exact_pixels():
    # A box stored as float32 fractions cuts exactly the pixels it was made from.
    image = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    H, W = 37, 53
    rng = np.random.default_rng(0)
    for _ in range(50):
        side = int(rng.integers(1, 37))
        top, left = int(rng.integers(0, H - side + 1)), int(rng.integers(0, W - side + 1))
        box = np.array([top / H, left / W, side / H, side / W], dtype=np.float32)
        # Square box rendered at its own size: no resampling, so the crop is exact.
        assert torch.equal(crop_resize(image, box, side), image[:, top : top + side, left : left + side])


# -- rendering -------------------------------------------------------------------------------


def _render_all(plan, dataset, view, ids, size):
    params = plan.draw(view, ids, dataset.sizes()[ids])
    return {int(i): plan.render(dataset.image(int(i)), row(params, j), size) for j, i in enumerate(ids)}


def test_render_is_deterministic_in_any_order(train_data):
    ids = np.arange(12)
    first = _render_all(ViewPlan(seed=5), train_data, 1, ids, 24)
    again = _render_all(ViewPlan(seed=5), train_data, 1, ids[::-1].copy(), 24)
    for i, view in first.items():
        assert view.dtype == torch.uint8 and view.shape == (3, 24, 24)
        assert torch.equal(view, again[i])
    # Another view index is another draw.
    other = _render_all(ViewPlan(seed=5), train_data, 2, ids, 24)
    assert sum(not torch.equal(first[i], other[i]) for i in first) >= 10


def test_params_survive_a_json_round_trip_bit_for_bit(train_data):
    plan = ViewPlan(seed=3)
    ids = np.arange(16)
    params = plan.draw(0, ids, train_data.sizes()[ids])
    text = json.dumps({k: v.tolist() for k, v in params.items()})
    back = {k: np.asarray(v, dtype=plan.fields[k].dtype) for k, v in json.loads(text).items()}
    for k in params:
        np.testing.assert_array_equal(back[k], params[k])
    for j, i in enumerate(ids):
        image = train_data.image(int(i))
        assert torch.equal(plan.render(image, row(params, j), 32), plan.render(image, row(back, j), 32))


def test_render_does_not_depend_on_loader_workers(train_data):
    plan = ViewPlan(seed=1)
    ids = np.arange(40)
    table = {"id": ids, **plan.draw(0, ids, train_data.sizes()[ids]), "check": np.ones(40, bool)}
    batches = [{k: v[s] for k, v in table.items()} for s in (slice(0, 20), slice(20, 40))]
    renderer = ViewRenderer(train_data, plan, (32,), plan_size=32)

    def fingerprints(workers):
        out = []
        for batch, rendered in render_batches(renderer, iter(batches), list(plan.fields), workers, "check"):
            out.append((batch["id"].tolist(), rendered["fingerprint"].tolist(), rendered["views"][0]))
        return out

    serial, parallel = fingerprints(0), fingerprints(2)
    assert [b[0] for b in serial] == [b[0] for b in parallel] == [list(range(20)), list(range(20, 40))]
    for (_, fp_a, views_a), (_, fp_b, views_b) in zip(serial, parallel):
        assert fp_a == fp_b
        assert torch.equal(views_a, views_b)


@pytest.mark.parametrize("H,W", [(32, 32), (37, 53), (200, 120)])
def test_eval_params_are_centred_squares(H, W):
    box = eval_params(np.array([[H, W]]), 0.875)
    assert not box["flip"].any()
    top, left, h, w = (box["crop"][0].astype(np.float64) * [H, W, H, W]).round()
    side = round(0.875 * min(H, W))
    assert h == w == side
    # Centred: the margins on either side differ by at most one pixel.
    assert abs(top - (H - top - h)) <= 1 and abs(left - (W - left - w)) <= 1


def test_eval_view_is_the_centre_crop(train_data):
    image = train_data.image(0)
    params = row(eval_params(train_data.sizes()[:1], 0.875), 0)
    view = ViewPlan().render(image, params, 28)  # 0.875 * 32 = 28: no resampling
    assert torch.equal(view, image[:, 2:30, 2:30])


def test_fingerprint_changes_with_one_pixel(train_data):
    view = ViewPlan(seed=0).render(train_data.image(3), row(eval_params(train_data.sizes()[:1], 1.0), 0), 32)
    same = view.clone()
    assert fingerprint(same) == fingerprint(view)
    changed = view.clone()
    changed[1, 17, 5] ^= 1
    assert fingerprint(changed) != fingerprint(view)
    # A non-contiguous tensor is fingerprinted by its values, not its memory layout.
    flipped = view.flip(-1)
    assert fingerprint(flipped) == fingerprint(flipped.contiguous())

"""Recorded augmentations: RandAugment, colour jitter, erasing, mixup/cutmix and mixed targets.

Every parameter is recorded, so a view replays bit for bit from its record; the
pixel work is timm's and torchvision's own, which the tests compare against.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from stages.data.replay import ViewRenderer, render_batches, with_partner_params
from stages.data.views import (
    NEGATED_OPS,
    ColorJitter,
    RandAugment,
    ViewPlan,
    ViewRecipe,
    eval_params,
    fingerprint,
    from_pil,
    mixed_targets,
    pixel_box,
    row,
    to_pil,
)
from storage import DatasetRecord, PlanRecord, Store, UserError

FULL = dict(
    randaugment="rand-m9-mstd0.5-inc1",
    color_jitter=(0.4, 0.4, 0.4, 0.1),
    erase_prob=0.5,
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
)
SINGLE = {
    "randaugment": dict(randaugment="rand-m9-mstd0.5-inc1"),
    "randaugment_plain": dict(randaugment="rand-m7-mstd0.5", ra_interpolation="bicubic"),
    "color_jitter": dict(color_jitter=(0.4, 0.4, 0.4, 0.1)),
    "erasing": dict(erase_prob=1.0),
    "mixup": dict(mixup_alpha=0.8),
    "cutmix": dict(cutmix_alpha=1.0),
    "all": FULL,
}
BLOCK = np.arange(32)


def _draw(plan, dataset, view=0, ids=BLOCK):
    return plan.draw(view, ids, dataset.sizes()[ids])


def _partner(plan, dataset, params, j):
    """(partner image, partner params) of row j, looked up in the same drawn block."""
    p = int(params["mix_partner"][j]) if "mix_partner" in params else -1
    if p < 0:
        return None
    k = int(np.flatnonzero(BLOCK == p)[0])
    return dataset.image(p), row(params, k)


# -- the default recipe is what it was -------------------------------------------------------

# Drawn by the code before RandAugment, jitter, erasing and mixing were added (seed 0, view 1 and
# seed 7, view 0; ids and image sizes below): existing stores must stay valid.
PIN_IDS = np.array([0, 1, 5, 31, 77])
PIN_SIZES = np.array([[32, 32], [37, 53], [200, 120], [32, 32], [64, 48]])
PINNED = {
    (0, 1): (
        [
            [0.03125, 0.28125, 0.40625, 0.4375],
            [0.0, 0.3962264060974121, 0.4864864945411682, 0.3962264060974121],
            [0.4449999928474426, 0.1666666716337204, 0.4300000071525574, 0.8333333134651184],
            [0.1875, 0.03125, 0.75, 0.90625],
            [0.109375, 0.02083333395421505, 0.546875, 0.9375],
        ],
        [1, 0, 1, 1, 1],
    ),
    (7, 0): (
        [
            [0.625, 0.40625, 0.375, 0.34375],
            [0.13513512909412384, 0.3962264060974121, 0.8108108043670654, 0.43396225571632385],
            [0.23000000417232513, 0.44999998807907104, 0.2150000035762787, 0.4166666567325592],
            [0.1875, 0.34375, 0.78125, 0.625],
            [0.265625, 0.3958333432674408, 0.46875, 0.5833333134651184],
        ],
        [0, 1, 1, 1, 0],
    ),
}
# Fingerprints of views 1 of samples 0..5 at 24 px (seed 0), rendered by the same earlier code.
PINNED_PRINTS = [517538201, 4037859901, 1743255526, 2309774171, 4206993515, 3672069395]


@pytest.mark.parametrize("seed,view", list(PINNED))
def test_default_recipe_draws_exactly_what_it_drew_before(seed, view):
    plan = ViewPlan(ViewRecipe(), seed=seed)
    assert list(plan.fields) == ["crop", "flip"]
    params = plan.draw(view, PIN_IDS, PIN_SIZES)
    crop, flip = PINNED[(seed, view)]
    np.testing.assert_array_equal(params["crop"], np.array(crop, dtype=np.float32))
    np.testing.assert_array_equal(params["flip"], np.array(flip, dtype=np.uint8))
    # Turning other augmentations on draws them from streams of their own: crop and flip do not move.
    full = ViewPlan(ViewRecipe(**FULL), seed=seed).draw(view, PIN_IDS, PIN_SIZES)
    np.testing.assert_array_equal(full["crop"], params["crop"])
    np.testing.assert_array_equal(full["flip"], params["flip"])


def test_default_recipe_renders_and_saves_as_before(train_data):
    plan = ViewPlan(ViewRecipe(), seed=0)
    ids = np.arange(6)
    params = _draw(plan, train_data, 1, ids)
    assert [
        fingerprint(plan.render(train_data.image(int(i)), row(params, j), 24)) for j, i in enumerate(ids)
    ] == PINNED_PRINTS
    # The recipe a store records is unchanged, so stores made before still match it.
    assert ViewRecipe().to_dict() == {"scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "hflip": 0.5, "eval_crop": 0.875}


# -- purity ----------------------------------------------------------------------------------


def test_params_are_pure_functions_of_seed_view_and_id(train_data):
    plan = ViewPlan(ViewRecipe(**FULL), seed=4)
    block = np.arange(32, 64)
    full = plan.draw(3, block, train_data.sizes()[block])
    # Any order of the block: the same parameters per id, partners included.
    order = np.random.default_rng(0).permutation(32)
    shuffled = plan.draw(3, block[order], train_data.sizes()[block[order]])
    for k in plan.fields:
        np.testing.assert_array_equal(shuffled[k], full[k][order], err_msg=k)
    # Any subset: the same parameters, except the partner, which is drawn among the ids of the call.
    subset = np.array([60, 33, 47])
    part = plan.draw(3, subset, train_data.sizes()[subset])
    for k in plan.fields:
        if k != "mix_partner":
            np.testing.assert_array_equal(part[k], full[k][subset - 32], err_msg=k)
    assert set(part["mix_partner"][part["mix_partner"] >= 0]) <= set(subset)
    # Another view is another draw.
    other = plan.draw(4, block, train_data.sizes()[block])
    assert (other["ra_mag"] != full["ra_mag"]).all()


def test_partner_is_in_the_same_block_and_never_the_sample_itself():
    plan = ViewPlan(ViewRecipe(mixup_alpha=0.2, cutmix_alpha=1.0), seed=0)
    block = np.arange(1024, 1024 + 50)
    partners = np.concatenate([plan.draw(v, block, np.full((50, 2), 32))["mix_partner"] for v in range(40)])
    assert (partners >= 0).all()  # mix_prob 1: every view mixes
    assert np.isin(partners, block).all()
    assert (partners != np.tile(block, 40)).all()
    assert len(np.unique(partners)) == 50  # every other sample of the block gets picked
    # mix_prob: the share of views that mix; a block of one has nobody to mix with.
    half = ViewPlan(ViewRecipe(mixup_alpha=0.2, mix_prob=0.5), seed=0).draw(0, np.arange(4000), np.full((4000, 2), 32))
    assert abs((half["mix_partner"] >= 0).mean() - 0.5) < 0.03
    assert (half["mix_lam"][half["mix_partner"] < 0] == 1.0).all()
    alone = plan.draw(0, np.array([7]), np.array([[32, 32]]))
    assert alone["mix_partner"][0] == -1 and alone["mix_lam"][0] == 1.0


def test_a_group_of_views_shares_its_partners_and_draws_its_own_lambdas():
    """``mix_pair_views`` 3: views 0-2 pair each sample with one partner, views 3-5 with another; lambdas, boxes and
    whether a view mixes stay per view; the default recipe's record and draws do not change."""
    block, sizes = np.arange(500, 564), np.full((64, 2), 32)
    shared = ViewPlan(ViewRecipe(mixup_alpha=0.8, cutmix_alpha=1.0, mix_pair_views=3), seed=0)
    views = [shared.draw(v, block, sizes) for v in range(6)]
    assert all((views[v]["mix_partner"] == views[0]["mix_partner"]).all() for v in (1, 2))
    assert (views[3]["mix_partner"] != views[0]["mix_partner"]).mean() > 0.9
    assert all((views[v]["mix_partner"] == views[3]["mix_partner"]).all() for v in (4, 5))
    assert (views[1]["mix_lam"] != views[0]["mix_lam"]).all()
    per_view = ViewPlan(ViewRecipe(mixup_alpha=0.8, cutmix_alpha=1.0), seed=0)
    assert (per_view.draw(1, block, sizes)["mix_partner"] != per_view.draw(0, block, sizes)["mix_partner"]).mean() > 0.9
    for k in ("mix_lam", "mix_box", "crop"):  # only the matching moved
        assert (per_view.draw(1, block, sizes)[k] == views[1][k]).all()
    assert "mix_pair_views" not in per_view.recipe.to_dict() and shared.recipe.to_dict()["mix_pair_views"] == 3
    assert ViewRecipe.from_dict(shared.recipe.to_dict()) == shared.recipe


# -- replay ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SINGLE))
def test_every_op_replays_bit_identically_after_a_json_round_trip(name, train_data):
    plan = ViewPlan(ViewRecipe(**SINGLE[name]), seed=2)
    params = _draw(plan, train_data)
    text = json.dumps({k: v.tolist() for k, v in params.items()})
    back = {k: np.asarray(v, dtype=plan.fields[k].dtype) for k, v in json.loads(text).items()}
    plain = ViewPlan(ViewRecipe(), seed=2)
    changed = 0
    for j, i in enumerate(BLOCK):
        image = train_data.image(int(i))
        for size in (32, 24):
            view = plan.render(image, row(params, j), size, _partner(plan, train_data, params, j))
            again = plan.render(image, row(back, j), size, _partner(plan, train_data, back, j))
            assert view.dtype == torch.uint8 and view.shape == (3, size, size)
            assert torch.equal(view, again)
            changed += not torch.equal(view, plain.render(image, row(params, j), size))
    assert changed >= 10  # the op does something


def test_params_survive_the_store_bit_for_bit(tmp_path, train_data):
    plan = ViewPlan(ViewRecipe(**FULL), seed=0)
    dataset = DatasetRecord(source="test", fingerprint="f", num_samples=32, num_classes=1, classes=("a",))
    store = Store.create(
        tmp_path / "s",
        dataset=dataset,
        plan=PlanRecord(**plan.describe(), size=32),
        versions={},
        num_views=1,
        block=32,
        plan_specs=plan.fields,
    )
    params = _draw(plan, train_data)
    store.plan.write_unit(0, 0, params)
    back = Store(tmp_path / "s").plan.read_unit(0, 0, list(plan.fields), rows=32)
    for k, spec in plan.fields.items():
        assert back[k].dtype == np.dtype(spec.dtype) and back[k].shape == (32, *spec.row_shape)
        np.testing.assert_array_equal(back[k], params[k], err_msg=k)


def _mix_by_hand(own: torch.Tensor, mate: torch.Tensor, lam: float, box) -> torch.Tensor:
    """Mixing written out independently of the renderer (numpy, pixel edges rounded)."""
    own, mate = own.numpy(), mate.numpy()
    size = own.shape[-1]
    if box[2] > 0 and box[3] > 0:
        y0, y1 = round(float(box[0]) * size), round((float(box[0]) + float(box[2])) * size)
        x0, x1 = round(float(box[1]) * size), round((float(box[1]) + float(box[3])) * size)
        out = own.copy()
        out[:, y0:y1, x0:x1] = mate[:, y0:y1, x0:x1]
        return torch.from_numpy(out)
    mixed = own.astype(np.float64) * lam + mate.astype(np.float64) * (1.0 - lam)
    return torch.from_numpy(np.clip(np.rint(mixed), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("workers", [0, 2])
def test_mixed_views_replayed_by_the_loader_equal_the_views_made_from_the_two_images(workers, train_data):
    plan = ViewPlan(ViewRecipe(**FULL), seed=1)
    names = list(plan.fields)
    params = _draw(plan, train_data)
    unit = with_partner_params({"id": BLOCK, **params, "check": np.ones(32, bool)}, names)
    # As distillation does: shuffle the unit's rows and cut them into batches.
    order = np.random.default_rng(5).permutation(32)
    shuffled = {k: v[order] for k, v in unit.items()}
    batches = [{k: v[s] for k, v in shuffled.items()} for s in (slice(0, 16), slice(16, 32))]
    renderer = ViewRenderer(train_data, plan, (32, 24), plan_size=32)
    kinds = set()
    seen = 0
    for batch, rendered in render_batches(renderer, iter(batches), names, workers, "check"):
        for b, i in enumerate(batch["id"]):
            j, p = int(i), int(batch["mix_partner"][b])
            k = int(np.flatnonzero(BLOCK == p)[0])
            box = params["mix_box"][j]
            kinds.add("cutmix" if box[2] > 0 else "mixup")
            for s_index, size in enumerate((32, 24)):
                own = plan.render_own(train_data.image(j), row(params, j), size)
                mate = plan.render_own(train_data.image(p), row(params, k), size)
                expected = _mix_by_hand(own, mate, float(params["mix_lam"][j]), box)
                assert torch.equal(rendered["views"][s_index][b], expected), (j, size)
                if box[2] > 0:
                    y0, y1, x0, x1 = pixel_box(box, size)
                    assert rendered["lam"][b, s_index].item() == 1 - (y1 - y0) * (x1 - x0) / size**2
                else:
                    assert rendered["lam"][b, s_index].item() == params["mix_lam"][j]
            assert int(rendered["fingerprint"][b]) == fingerprint(rendered["views"][0][b])
            seen += 1
    assert seen == 32 and kinds == {"mixup", "cutmix"}


def test_a_mixing_batch_without_partner_params_fails_loudly(train_data):
    plan = ViewPlan(ViewRecipe(mixup_alpha=1.0), seed=0)
    table = {"id": BLOCK, **_draw(plan, train_data)}
    renderer = ViewRenderer(train_data, plan, (32,))
    with pytest.raises(ValueError, match="with_partner_params"):
        next(render_batches(renderer, iter([table]), list(plan.fields)))
    with pytest.raises(ValueError, match="pass partner"):
        plan.render(train_data.image(0), row(table, 0), 32)


def test_with_partner_params_looks_partners_up_by_id_within_the_unit(train_data):
    plan = ViewPlan(ViewRecipe(cutmix_alpha=1.0, randaugment="rand-m9"), seed=0)
    ids = np.arange(64, 96)
    params = plan.draw(0, ids, train_data.sizes()[ids - 64])
    order = np.random.default_rng(1).permutation(32)  # the unit's rows in any order
    table = with_partner_params({"id": ids[order], **{k: v[order] for k, v in params.items()}}, list(plan.fields))
    for j in range(32):
        k = int(np.flatnonzero(ids == table["mix_partner"][j])[0])
        for name in plan.fields:
            np.testing.assert_array_equal(table["p:" + name][j], params[name][k])
    # A plan that does not mix: the table comes back as it was.
    plain = {"id": ids, **ViewPlan().draw(0, ids, train_data.sizes()[:32])}
    assert with_partner_params(plain, ["crop", "flip"]) is plain
    # A partner outside the table: the table was not a whole unit.
    with pytest.raises(ValueError, match="not in its unit table"):
        with_partner_params({k: v[:8] for k, v in table.items()}, list(plan.fields))


def test_evaluation_views_ignore_the_training_augmentations(train_data):
    plan = ViewPlan(ViewRecipe(**FULL), seed=0)
    ids = np.arange(16)
    table = {"id": ids, "label": train_data.labels[ids], **eval_params(train_data.sizes()[ids], 0.875)}
    renderer = ViewRenderer(train_data, plan, (28,))
    ((batch, rendered),) = render_batches(renderer, iter([table]), list(plan.fields))
    for b, i in enumerate(ids):
        assert torch.equal(rendered["views"][0][b], train_data.image(int(i))[:, 2:30, 2:30])
    assert (rendered["lam"] == 1).all()


# -- mixing statistics -----------------------------------------------------------------------


def test_lambda_follows_beta_alpha_and_cutmix_lambda_is_the_pasted_area():
    n = 20000
    ids, sizes = np.arange(n), np.full((n, 2), 32)
    for alpha in (0.2, 1.0):
        lam = ViewPlan(ViewRecipe(mixup_alpha=alpha), seed=0).draw(0, ids, sizes)["mix_lam"]
        assert lam.dtype == np.float64 and ((lam >= 0) & (lam <= 1)).all()
        assert abs(lam.mean() - 0.5) < 0.01
        assert abs(lam.var() - 1 / (4 * (2 * alpha + 1))) < 0.01  # Var of Beta(a, a)
    cut = ViewPlan(ViewRecipe(cutmix_alpha=1.0), seed=0).draw(0, ids, sizes)
    box = cut["mix_box"].astype(np.float64)
    assert (cut["mix_lam"] == 1.0 - box[:, 2] * box[:, 3]).all()  # timm's correct_lam, on the recorded box
    assert ((box[:, :2] >= 0) & (box[:, :2] + box[:, 2:] <= 1 + 1e-6)).all()
    # Clipping at the border only shrinks boxes: lam is above Beta(1, 1)'s mean of 0.5.
    assert 0.55 < cut["mix_lam"].mean() < 0.75
    # Both kinds with the switch probability.
    both = ViewPlan(ViewRecipe(mixup_alpha=0.8, cutmix_alpha=1.0, mix_switch_prob=0.3), seed=0).draw(0, ids, sizes)
    assert abs((both["mix_box"][:, 2] > 0).mean() - 0.3) < 0.02


@pytest.mark.parametrize("size", [32, 24, 17])
def test_cutmix_lambda_at_a_size_is_the_fraction_of_own_pixels(size):
    plan = ViewPlan(ViewRecipe(cutmix_alpha=1.0, hflip=0.0), seed=3)
    ids = np.arange(64)
    params = plan.draw(0, ids, np.full((64, 2), 32))
    black, white = torch.zeros(3, 32, 32, dtype=torch.uint8), torch.full((3, 32, 32), 255, dtype=torch.uint8)
    for j in range(64):
        p = row(params, j)
        view = plan.render(black, p, size, (white, row(params, 0)))
        own = int((view == 0).all(0).sum()) / size**2
        assert abs(plan.lam(p, size) - own) < 1e-12
        # The recorded lam is the box's exact share; at a pixel grid it is off by at most the box's rim.
        assert abs(plan.lam(p, size) - float(p["mix_lam"])) <= 2.0 / size


# -- RandAugment -----------------------------------------------------------------------------


def test_randaugment_draws_like_timm():
    n = 20000
    ids, sizes = np.arange(n), np.full((n, 2), 32)
    plan = ViewPlan(ViewRecipe(randaugment="rand-m7-mstd0.5"), seed=0)
    p = plan.draw(0, ids, sizes)
    op, mag, apply = p["ra_op"].ravel(), p["ra_mag"].ravel().astype(np.float64), p["ra_apply"].ravel()
    names = plan.ops[2].names
    assert p["ra_op"].shape == (n, 2) and len(names) == 15
    assert abs(np.abs(mag).mean() - 7.0) < 0.02 and abs(np.abs(mag).std() - 0.5) < 0.02
    assert abs(apply.mean() - 0.5) < 0.02  # timm's prob 0.5 per op
    counts = np.bincount(op, minlength=15)
    assert counts.min() > 0.9 * len(op) / 15 and counts.max() < 1.1 * len(op) / 15
    negated = np.array([names[k] in NEGATED_OPS for k in op])
    assert (mag[~negated] >= 0).all()
    assert abs((mag[negated] < 0).mean() - 0.5) < 0.02  # timm's random sign
    # Clipped to [0, 10]: with m9 and mstd 2, P(m > 10) = P(z > 0.5) = 0.3085 sit at 10 exactly.
    wide = np.abs(ViewPlan(ViewRecipe(randaugment="rand-m9-mstd2"), seed=0).draw(0, ids, sizes)["ra_mag"])
    assert wide.max() == 10.0 and wide.min() >= 0
    assert abs((wide == 10.0).mean() - 0.3085) < 0.01
    # mstd 0: the magnitude itself; mstd > 100: uniform in [0, m]; n and inc pick the layers and op list.
    assert (np.abs(ViewPlan(ViewRecipe(randaugment="rand-m5"), seed=0).draw(0, ids, sizes)["ra_mag"]) == 5.0).all()
    uni = np.abs(ViewPlan(ViewRecipe(randaugment="rand-m8-mstd101"), seed=0).draw(0, ids, sizes)["ra_mag"])
    assert uni.max() <= 8 and abs(uni.mean() - 4.0) < 0.05
    inc = ViewPlan(ViewRecipe(randaugment="rand-m9-n3-inc1"), seed=0)
    assert inc.fields["ra_op"].row_shape == (3,) and "PosterizeIncreasing" in inc.ops[2].names


@pytest.mark.parametrize("increasing", [False, True])
def test_randaugment_ops_are_timms_ops(increasing):
    from PIL import Image
    from timm.data import auto_augment as aa

    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fill = (124, 116, 104)
    op = RandAugment("rand-m9-inc1" if increasing else "rand-m9", fill, "random")
    state = random.getstate()
    try:
        for index, name in enumerate(op.names):
            for seed in (0, 1):  # random() first gives 0.84 (timm negates) then 0.13 (it does not)
                for mag, interp in ((6.5, 1), (10.0, 0), (1.0, 1)):
                    hparams = dict(
                        aa._HPARAMS_DEFAULT, img_mean=fill, interpolation=(Image.BILINEAR, Image.BICUBIC)[interp]
                    )
                    timm_op = aa.AugmentOp(name, prob=1.0, magnitude=mag, hparams=hparams)
                    random.seed(seed)
                    try:
                        expected = from_pil(timm_op(to_pil(image)))
                    except ValueError:
                        # timm asks to keep 0 bits, which Pillow >= 11 refuses; older Pillow gave black.
                        assert name.startswith("Posterize") and aa.LEVEL_TO_ARG[name](mag, hparams)[0] == 0
                        expected = torch.zeros_like(image)
                    negate = name in NEGATED_OPS and seed == 0
                    params = {
                        "ra_op": np.array([index, 0], np.int8),
                        "ra_apply": np.array([1, 0], np.uint8),
                        "ra_mag": np.array([-mag if negate else mag, 0], np.float32),
                        "ra_interp": np.array([interp, 0], np.uint8),
                    }
                    assert torch.equal(op.apply(image, params, 40), expected), (name, seed, mag)
    finally:
        random.setstate(state)


# -- colour jitter and erasing ---------------------------------------------------------------


def test_color_jitter_is_torchvisions_with_its_draws_recorded():
    from torchvision import transforms as T

    image = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    jitter = T.ColorJitter(0.4, 0.4, 0.4, 0.1)
    op = ColorJitter((0.4, 0.4, 0.4, 0.1))
    for seed in range(8):
        torch.manual_seed(seed)
        order, *factors = T.ColorJitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        torch.manual_seed(seed)
        expected = from_pil(jitter(to_pil(image)))
        params = {"cj_factors": np.array(factors, np.float32), "cj_order": order.numpy().astype(np.uint8)}
        assert torch.equal(op.apply(image, params, 24), expected)
    # The draws: factors in torchvision's ranges, orders uniform permutations.
    p = ViewPlan(ViewRecipe(color_jitter=0.4), seed=0).draw(0, np.arange(6000), np.full((6000, 2), 32))
    f = p["cj_factors"]
    assert (f[:, :3] >= 0.6).all() and (f[:, :3] <= 1.4).all() and (f[:, 3] == 0).all()
    assert abs(f[:, :3].mean() - 1.0) < 0.01
    assert (np.sort(p["cj_order"], axis=1) == np.arange(4)).all()
    assert len({tuple(o) for o in p["cj_order"]}) == 24


def test_random_erasing_boxes_and_fill(train_data):
    n = 8000
    recipe = ViewRecipe(erase_prob=0.25, fill=(1, 2, 3))
    box = ViewPlan(recipe, seed=0).draw(0, np.arange(n), np.full((n, 2), 32))["erase_box"].astype(np.float64)
    erased = box[:, 2] > 0
    assert abs(erased.mean() - 0.25) < 0.015
    area, aspect = box[erased, 2] * box[erased, 3], box[erased, 2] / box[erased, 3]
    assert (area >= 0.02 - 1e-6).all() and (area <= 1 / 3 + 1e-6).all()
    assert (aspect >= 0.3 - 1e-4).all() and (aspect <= 1 / 0.3 + 1e-3).all()
    assert (box[erased, :2] + box[erased, 2:] <= 1 + 1e-6).all() and (box[~erased] == 0).all()

    plan, plain = ViewPlan(ViewRecipe(erase_prob=1.0, fill=(1, 2, 3)), seed=0), ViewPlan(seed=0)
    params = _draw(plan, train_data)
    for j in range(8):
        image = train_data.image(j)
        before = image.clone()
        for size in (32, 20):
            view, base = plan.render(image, row(params, j), size), plain.render(image, row(params, j), size)
            y0, y1, x0, x1 = pixel_box(params["erase_box"][j], size)
            inside = torch.zeros(size, size, dtype=torch.bool)
            inside[y0:y1, x0:x1] = True
            assert inside.any()
            assert (view[:, inside] == torch.tensor([[1], [2], [3]], dtype=torch.uint8)).all()
            assert torch.equal(view[:, ~inside], base[:, ~inside])
        assert torch.equal(image, before)  # the source image is never written into


# -- targets ---------------------------------------------------------------------------------


def test_mixed_targets_by_hand():
    labels = np.array([0, 2, 1, -1, 3])
    partners = np.array([2, 2, -1, 0, -1])
    lam = np.array([0.3, 0.6, 1.0, 0.5, 0.7])
    targets, mask = mixed_targets(labels, partners, lam, num_classes=4, smoothing=0.1)
    off, on = 0.025, 0.925
    expected = np.array(
        [
            [0.3 * on + 0.7 * off, off, 0.3 * off + 0.7 * on, off],  # 0 mixed with 2
            [off, off, on, off],  # 2 with 2
            [off, on, off, off],  # no partner, lam 1
            [0, 0, 0, 0],  # unlabelled
            [0, 0, 0, 0],  # labelled, but 30% of the image is an unlabelled partner's
        ]
    )
    assert targets.dtype == torch.float32 and targets.shape == (5, 4)
    np.testing.assert_allclose(targets.numpy(), expected, rtol=0, atol=1e-7)
    assert mask.tolist() == [True, True, True, False, False]
    np.testing.assert_allclose(targets[mask].sum(1).numpy(), 1.0, atol=1e-6)


def test_mixed_targets_match_timm():
    from timm.data.mixup import mixup_target

    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    for lam, smoothing in ((0.37, 0.0), (0.8, 0.1)):
        ours, mask = mixed_targets(labels.numpy(), labels.flip(0).numpy(), np.full(8, lam), 10, smoothing)
        assert mask.all()
        torch.testing.assert_close(ours, mixup_target(labels, 10, lam, smoothing), rtol=0, atol=1e-6)


# -- settings --------------------------------------------------------------------------------


def test_recipe_round_trips_through_json_and_rejects_bad_settings():
    recipe = ViewRecipe(**FULL)
    assert ViewRecipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert ViewRecipe(color_jitter=[0.4, 0.4, 0.4]).color_jitter == (0.4, 0.4, 0.4)  # YAML lists
    for bad in (
        dict(randaugment="rand-m9-x3"),
        dict(randaugment="augmix-m5"),
        dict(randaugment="rand-m9-tweights"),
        dict(randaugment="rand-m9", ra_interpolation="nearest"),
        dict(color_jitter=(0.4, 0.4)),
        dict(color_jitter=(0.4, 0.4, 0.4, 0.7)),
        dict(erase_prob=1.5),
        dict(erase_prob=0.5, erase_area=(0.5, 0.2)),
        dict(mixup_alpha=-1.0),
        dict(mix_prob=2.0),
    ):
        with pytest.raises(UserError):
            ViewRecipe(**bad)


def test_stored_bytes_per_view():
    fields = ViewPlan(ViewRecipe(**FULL)).fields
    nbytes = {k: np.dtype(s.dtype).itemsize * int(np.prod(s.row_shape)) for k, s in fields.items()}
    # fmt: skip
    assert nbytes == {
        "crop": 16,
        "flip": 1,
        "ra_op": 2,
        "ra_apply": 2,
        "ra_mag": 8,
        "ra_interp": 2,
        "cj_factors": 16,
        "cj_order": 4,
        "erase_box": 16,
        "mix_partner": 8,
        "mix_lam": 8,
        "mix_box": 16,
    }

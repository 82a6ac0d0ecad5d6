"""The papers' batches and epochs: a recipe's global batch over workers, repeated augmentation, evaluation views."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import DATA

from pipeline.settings import config
from pipeline.cli import main
from pipeline.settings.recipe import train_settings
from stages.training.distill import resolve_batch
from stages.training.epoch_steps import epoch_note, rank_units, steps_per_epoch
from stages.data.replay import epoch_units, window_units
from stages.data.views import EVAL_FIELDS, ViewPlan, ViewRecipe, eval_params, row
from stages.training.settings import TrainSettings
from storage import UserError

# -- the global batch ------------------------------------------------------------------------


def _settings(config_file=None, ray_workers: int = 0, **flags):
    """Settings as distill resolves them from a --config file and flags, for ``ray_workers`` Ray Train workers."""
    return train_settings(
        config.load_yaml(config_file) if config_file else {}, flags, config_file or "the command line", ray_workers
    )


@pytest.mark.parametrize("workers,per_worker", [(0, 2048), (1, 2048), (8, 256), (16, 128)])
def test_a_recipes_global_batch_is_split_over_the_workers(workers, per_worker):
    s = _settings(str(config.CONFIG_DIR / "vanillakd_a2.yaml"), workers)
    assert (s.batch_size, s.global_batch) == (per_worker, 2048)


def test_batch_size_on_the_command_line_is_per_worker_and_the_config_records_both(tmp_path):
    recipe = str(config.CONFIG_DIR / "kdpp_r34_r18.yaml")
    s = _settings(recipe, 4, batch_size=64)
    assert (s.batch_size, s.global_batch) == (64, 256)  # timm's --batch-size: per worker
    text = config.dump({"train": s})
    assert "batch_size: 64" in text and "global_batch: 256" in text
    plain = _settings()  # no recipe batch: the per-worker default, one process
    assert (plain.batch_size, plain.global_batch) == (TrainSettings.batch_size, TrainSettings.batch_size)


def test_a_global_batch_that_does_not_divide_is_refused():
    with pytest.raises(UserError, match="global_batch 2048 in .* does not divide over 3 workers"):
        _settings(str(config.CONFIG_DIR / "vanillakd_a1.yaml"), 3)
    with pytest.raises(UserError, match="does not divide"):
        resolve_batch(None, 100, 8)
    assert resolve_batch(32, 100, 8) == (32, 256)  # a per-worker batch never needs to divide


def test_a_file_stating_both_batches_must_agree(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text("global_batch: 512\nbatch_size: 64\n")
    assert _settings(str(both), 8).batch_size == 64
    with pytest.raises(UserError, match="states both batch_size 64 .* and global_batch 512"):
        _settings(str(both), 4)


# -- repeated augmentation -------------------------------------------------------------------


@pytest.mark.parametrize("repeats,num_views,num_blocks", [(3, 3, 10), (3, 5, 7), (2, 4, 9), (3, 10, 1000)])
def test_repeated_epochs_give_each_sample_r_different_views_and_keep_n_samples_of_rows(repeats, num_views, num_blocks):
    covered = Counter()
    for epoch in range(4 * repeats):
        units = epoch_units(epoch, num_views, num_blocks, seed=2, repeats=repeats)
        per_block = {}
        for v, b in units:
            per_block.setdefault(b, []).append(v)
        for b, views in per_block.items():
            assert len(views) == repeats and len(set(views)) == repeats  # R different views of the block
        blocks = [b for _, b in units]
        for i in range(0, len(blocks), repeats):  # a block's R units are next to each other: one window holds them
            assert len(set(blocks[i : i + repeats])) == 1
        # About N samples' worth of units: R x (blocks / R).
        assert abs(len(units) - num_blocks) < repeats
        covered.update(per_block.keys())
        if epoch % repeats == repeats - 1:  # every R epochs, every block once
            assert set(covered.values()) == {epoch // repeats + 1} and len(covered) == num_blocks


def test_repeats_take_a_whole_group_of_views_that_share_their_partners():
    """views in groups of 3 (``mix_pair_views``) and repeats 3: a block's views of an epoch are one group, and every
    group once before any block repeats one; a plan without groups keeps its order."""
    num_views, num_blocks, repeats = 9, 12, 3
    used = {b: [] for b in range(num_blocks)}
    for epoch in range(num_views):  # 3 rounds of 3 epochs: each block takes each of its 3 groups once
        for v, b in (units := epoch_units(epoch, num_views, num_blocks, seed=5, repeats=repeats, view_groups=3)):
            used[b].append(v)
        for i in range(0, len(units), repeats):
            assert len({v // 3 for v, _ in units[i : i + repeats]}) == 1  # one group
    assert all(sorted(views) == list(range(num_views)) for views in used.values())
    assert epoch_units(4, num_views, num_blocks, 5, repeats) == epoch_units(
        4, num_views, num_blocks, 5, repeats, view_groups=1
    )


def test_one_repeat_is_the_plain_order():
    for epoch in range(6):
        assert epoch_units(epoch, 4, 6, 1, repeats=1) == epoch_units(epoch, 4, 6, 1)
    assert window_units(16384, 1024) == 16 and window_units(16384, 1024, 3) == 15 and window_units(100, 1024, 3) == 3


def test_ranks_keep_a_blocks_repeats_together_and_take_equal_steps():
    num_samples, block, world, repeats = 1000, 64, 2, 3
    num_blocks = -(-num_samples // block)
    steps = steps_per_epoch(num_samples, block, 16, world, repeats)
    for epoch in range(6):
        units = epoch_units(epoch, 4, num_blocks, seed=0, repeats=repeats)
        shares = [rank_units(units, r, world) for r in range(world)]
        assert sorted(u for share in shares for u in share) == sorted(units)
        assert not set(b for _, b in shares[0]) & set(b for _, b in shares[1])  # no block split over ranks
        for share in shares:
            assert sum(min(block, num_samples - b * block) for _, b in share) // 16 >= steps
    with pytest.raises(UserError, match="with repeats 3 an epoch takes 1 of the store's 4 blocks"):
        steps_per_epoch(256, 64, 16, 2, 3)


def test_repeats_larger_than_the_stored_views_is_one_line(base_store, tmp_path, capsys):
    store, out = base_store, tmp_path / "run"  # 2 views
    recipe = tmp_path / "r.yaml"
    recipe.write_text("repeats: 3\n")
    rc = main(
        [
            "--quiet",
            "distill",
            "--from-cache",
            str(store),
            "--data",
            DATA,
            "--config",
            str(recipe),
            "--student",
            "resnet10t",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        rc == 2
        and len(err) == 1
        and "repeats 3 needs 3 different views of each sample" in err[0]
        and "--views 3" in err[0]
    )
    assert not out.exists()
    recipe.write_text("global_batch: 64\n")
    rc = main(
        [
            "--quiet",
            "distill",
            "--from-cache",
            str(store),
            "--data",
            DATA,
            "--config",
            str(recipe),
            "--student",
            "resnet10t",
            "--epochs",
            "1",
            "--ray-workers",
            "3",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "global_batch 64" in err[0] and "3 workers" in err[0]
    assert not out.exists()


# -- evaluation views ------------------------------------------------------------------------


def test_evaluation_views_use_the_recipes_crop_and_interpolation(train_data):
    image, sizes = train_data.image(5), train_data.sizes()[5:6]
    plan = ViewPlan(ViewRecipe(), seed=0)
    default = plan.render(image, row(eval_params(sizes, 0.875), 0), 32)
    # The default is what evaluation always rendered: a bilinear crop.
    before = plan.render(image, {k: v for k, v in row(eval_params(sizes, 0.875), 0).items() if k != "crop_interp"}, 32)
    assert torch.equal(default, before)
    bicubic = plan.render(image, row(eval_params(sizes, 0.95, "bicubic"), 0), 32)
    assert not torch.equal(bicubic, plan.render(image, row(eval_params(sizes, 0.95), 0), 32))
    assert set(eval_params(sizes, 0.95, "bicubic")) == set(EVAL_FIELDS)
    a1 = config.recipe("vanillakd_a1")["views"]
    assert ViewRecipe(**a1).eval_interpolation == "bicubic" and ViewRecipe(**a1).eval_crop == 0.95
    assert ViewRecipe().eval_interpolation == "bilinear" and ViewRecipe().eval_crop == 0.875


def test_an_unknown_eval_interpolation_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("views:\n  eval_interpolation: lanczos\n")
    out = tmp_path / "run"
    rc = main(
        [
            "--quiet",
            "train",
            "--data",
            "fake:32?size=32",
            "--model",
            "resnet10t",
            "--config",
            str(recipe),
            "--epochs",
            "1",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "eval_interpolation" in err[0] and "bilinear, bicubic" in err[0]
    assert not out.exists()


def test_the_run_says_how_many_views_an_epoch_holds_and_why_when_fewer_than_the_samples():
    # 8 blocks with repeats 3: the blocks split 3, 3, 2 ways and every epoch is cut to 2 blocks x 3 views.
    line = epoch_note(800, 100, 32, 1, 3)
    assert line.startswith(
        "an epoch holds 576 views (18 steps of 32 x 1 worker(s)), 72% of the 800 samples: with repeats 3"
    )
    assert (
        epoch_note(900, 100, 32, 1, 3)
        == "an epoch holds 896 views (28 steps of 32 x 1 worker(s)), 100% of the 900 samples"
    )
    assert "each of the 4 workers takes the same number of whole blocks" in epoch_note(1000, 100, 32, 4, 1)
    assert epoch_note(36, 16, 16, 1, 1).endswith("a last partial batch is dropped each epoch (at most 15 samples)")


def test_lr_base_follows_the_global_batch_as_timms_rule():
    s = train_settings({}, {"lr_base": 0.1, "batch_size": 64, "optimizer": "sgd"}, "flags")
    assert s.lr == pytest.approx(0.1 * 64 / 256) and s.lr_base_scale == "linear"
    s = train_settings(
        {"optimizer": "lamb", "lr_base": 0.008, "lr_base_size": 4096, "global_batch": 1024}, {}, "a2.yaml"
    )
    assert s.lr == pytest.approx(0.004) and s.lr_base_scale == "sqrt"  # adaptive optimisers: the square root
    assert train_settings({"lr_base": 0.1}, {"lr": 0.5}, "x").lr == 0.5  # an explicit --lr wins over a recipe's lr_base
    # --lr-base over a recipe's lr (adamw: sqrt)
    assert train_settings({"lr": 0.5}, {"lr_base": 0.1, "batch_size": 512}, "x").lr == pytest.approx(0.1 * 2**0.5)
    with pytest.raises(UserError, match="--lr and --lr-base both set the learning rate: keep one"):
        train_settings({}, {"lr": 0.1, "lr_base": 0.1}, "flags")


def test_a_recipes_lr_at_another_global_batch_is_said(caplog):
    with caplog.at_level("WARNING", logger="pipeline"):
        train_settings({"lr": 0.01, "global_batch": 256}, {"batch_size": 32}, "ft.yaml")
    assert (
        "ft.yaml's lr 0.01 is for its global batch 256; this run's is 32: pass --lr-base 0.01 --lr-base-size 256"
        in caplog.text
    )

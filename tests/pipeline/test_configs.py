"""Every shipped recipe loads into the settings it names, and its method accepts its arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.settings import config
from stages.settings import build
from stages.training.distill import lr_factor
from pipeline.settings.recipe import train_settings
from stages.methods import MethodContext, create_method
from stages.data.views import ViewPlan, ViewRecipe

ALL = sorted(p.relative_to(config.CONFIG_DIR).with_suffix("").as_posix() for p in config.CONFIG_DIR.rglob("*.yaml"))
# cluster/: Ray launcher configs; sweeps/: sweep files (tests/pipeline/test_sweep.py)
RECIPES = [name for name in ALL if not name.startswith(("cluster/", "sweeps/"))]


def test_the_paper_recipes_are_shipped():
    assert {"vanillakd_a1", "vanillakd_a2", "kdpp_r34_r18", "srd_r34_r18", "vanillakd_a2_cospress", "demo"} <= set(
        RECIPES
    )


def test_the_two_teacher_recipe_is_a2_with_cospress_parts():
    a2, both = (
        train_settings(config.recipe("vanillakd_a2"), {}, "a2"),
        train_settings(config.recipe("vanillakd_a2_cospress"), {}, "both"),
    )
    assert both.method == "kd@beitv2_l+cospress@dinov2_s"
    assert both.method_args["kd"] == {**a2.method_args, "weight": 1.0}
    assert (both.optimizer, both.lr, both.global_batch, both.repeats) == (
        a2.optimizer,
        a2.lr,
        a2.global_batch,
        a2.repeats,
    )
    assert config.recipe("vanillakd_a2_cospress")["views"] == config.recipe("vanillakd_a2")["views"]


@pytest.mark.parametrize("recipe", ["vanillakd_a2", "kdpp_r34_r18"])
@pytest.mark.parametrize("method", ["kd", "dkd", "dist", "ce"])
def test_a_paper_recipe_takes_any_method(recipe, method):
    """`--config vanillakd_a2.yaml --method dkd`: the recipe's optimisation applies, its method_args belong to its own method."""
    data = config.recipe(recipe)
    settings = train_settings(data, {"method": method}, recipe)
    assert settings.method == method and (settings.optimizer, settings.lr) == (data["optimizer"], data["lr"])
    expected = data["method_args"] if method == data["method"] else {}
    assert settings.method_args == expected


@pytest.mark.parametrize("name", [r for r in RECIPES if r != "demo"])
def test_recipe_builds_views_settings_and_method(name):
    data = config.recipe(name)
    views = data.pop("views", {})
    plan = ViewPlan(build(ViewRecipe, {**ViewRecipe().to_dict(), **views}, name))
    settings = train_settings(data, {}, name)  # a list of parts becomes the method string and method_args
    context = MethodContext(
        num_classes=10, student_dim=512, teacher_dim=512, class_means=torch.randn(10, 512), epochs=settings.epochs
    )
    for part, (_, args) in zip(settings.methods.parts, settings.methods.part_args(settings.method_args, name)):
        create_method(part.method, context, **args)
    assert lr_factor(settings, steps_per_epoch=10)(0) > 0
    # The plan is the recipe's views section (nothing dropped on the way), and draws exactly the fields the store records.
    for key, value in views.items():
        assert getattr(plan.recipe, key) == (tuple(value) if isinstance(value, list) else value), key
    expected = {"crop", "flip"}
    if views.get("randaugment"):
        expected |= {"ra_op", "ra_apply", "ra_mag"}
        if views.get("ra_interpolation", "random") == "random":  # timm's per-op choice is drawn and recorded
            expected |= {"ra_interp"}
    if views.get("erase_prob"):
        expected |= {"erase_box"}
    if views.get("mixup_alpha") or views.get("cutmix_alpha"):
        expected |= {"mix_partner", "mix_lam", "mix_box"}  # the teacher saw the mixed image: the partner is recorded
    assert set(plan.fields) == expected
    drawn = plan.draw(0, np.arange(8), np.full((8, 2), 64))
    assert set(drawn) == expected
    for key, spec in plan.fields.items():
        assert drawn[key].shape == (8, *spec.row_shape) and drawn[key].dtype == np.dtype(spec.dtype), key


def test_vanillakd_a2_is_the_papers_recipe():
    data = config.recipe("vanillakd_a2")
    assert data["views"]["randaugment"] == "rand-m7-mstd0.5" and data["views"]["mixup_alpha"] == 0.1
    assert (data["optimizer"], data["lr"], data["weight_decay"], data["global_batch"], data["epochs"]) == (
        "lamb",
        0.005,
        0.02,
        2048,
        300,
    )
    assert data["repeats"] == 3 and (data["views"]["eval_crop"], data["views"]["eval_interpolation"]) == (
        0.95,
        "bicubic",
    )
    assert data["method_args"]["hard_loss"] == "bce" and data["drop_path"] == 0.05


@pytest.mark.parametrize("name", [n for n in ALL if n.startswith("cluster/")])
def test_cluster_config_is_valid_for_rays_launcher(name):
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = yaml.safe_load((config.CONFIG_DIR / f"{name}.yaml").read_text())
    validate_config(prepare_config(cluster))  # Ray's own schema, as `ray up` applies it
    assert any("pip install" in c and "-e ." in c for c in cluster["setup_commands"])  # every node installs the project

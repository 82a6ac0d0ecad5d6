"""The teacher registry: short names, outputs, weights from files, and failing fast offline."""

from __future__ import annotations

import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from stages.teachers.teachers import build_teacher, list_teachers, resolve_teacher
from storage import UserError


# tests register tiny teachers of their own
@pytest.mark.parametrize("name", [n for n in list_teachers() if not n.startswith("test_")])
def test_every_short_name_maps_to_a_timm_model(name):
    spec = resolve_teacher(name)
    assert timm.is_model(spec.timm_name)
    assert spec.input_size == 224 and spec.mean and spec.std
    assert spec.outputs == (("features",) if name.startswith("dinov2") else ("logits", "features"))


def test_dinov2_gives_features_only_at_the_render_size():
    teacher = build_teacher("dinov2_s", random_init=True, num_classes=10, input_size=28)
    out = teacher(torch.randn(2, 3, 28, 28))
    assert set(out) == {"features"} and out["features"].shape == (2, 384)
    assert teacher.num_classes == 0 and teacher.input_size == 28


def test_any_timm_name_works_and_random_init_is_deterministic():
    a = build_teacher("resnet10t", random_init=True, num_classes=7, seed=3, input_size=32)
    b = build_teacher("resnet10t", random_init=True, num_classes=7, seed=3, input_size=32)
    c = build_teacher("resnet10t", random_init=True, num_classes=7, seed=4, input_size=32)
    x = torch.randn(16, 3, 32, 32)
    assert torch.equal(a(x)["logits"], b(x)["logits"]) and not torch.equal(a(x)["logits"], c(x)["logits"])
    assert a(x)["logits"].shape == (16, 7) and a(x)["features"].shape == (16, a.feature_dim)
    assert not a.training and not any(p.requires_grad for p in a.parameters())


@pytest.mark.parametrize("name,tokens", [("deit_tiny_patch16_224", 1 + 2 * 2), ("vit_small_patch14_dinov2", 1 + 4 * 4)])
def test_a_timm_vit_built_for_one_size_is_built_for_the_render_size(name, tokens):
    """Any timm name, not only a short one: a fixed-size ViT (DINOv2 at 518 px) rendered at --size 56 or 32."""
    size = 56 if "patch14" in name else 32
    teacher = build_teacher(name, random_init=True, num_classes=10, input_size=size)
    out = teacher(torch.randn(2, 3, size, size), outputs=("logits", "tokens"))
    assert out["logits"].shape == (2, 10) and out["tokens"].shape[:2] == (2, tokens)


@pytest.mark.parametrize("fmt", ["safetensors", "checkpoint"])
def test_weights_from_a_file_set_the_class_count(tmp_path, fmt):
    model = timm.create_model("resnet10t", num_classes=4)
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(model.state_dict(), str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    teacher = build_teacher("resnet10t", weights=str(path), input_size=32)
    assert teacher.num_classes == 4 and teacher.weights.startswith("sha256:")
    x = torch.randn(16, 3, 32, 32)
    assert torch.equal(teacher(x)["logits"], model.eval()(x))


def test_offline_without_weights_fails_fast_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.perf_counter()
    with pytest.raises(UserError, match="--weights FILE"):
        build_teacher("resnet152")
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize(
    "key,value", [("input_size", "abc"), ("input_size", "0"), ("mean", "5"), ("mean", "[1, 2]"), ("std", '{"a": 1}')]
)
def test_a_weights_files_metadata_of_the_wrong_type_is_one_line(key, value, tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(timm.create_model("resnet18", num_classes=3).state_dict(), str(path), metadata={key: value})
    with pytest.raises(UserError, match=f"weights file {path}: metadata '{key}' is '") as e:
        build_teacher("resnet18", weights=str(path))
    assert "\n" not in str(e.value)


# -- model folders: local-dir:PATH and hf-hub:REPO -------------------------------------------------------------

VIT_ARGS = dict(img_size=64, patch_size=8, depth=1)


def _vit_folder(tmp_path, name="fitted"):
    """A narrow ViT saved as `pipeline train` saves a model: weights, timm's config.json, its input settings."""
    from stages.training.student import build_student
    from stages.training.student_card import StudentCard
    from stages.training.student_files import save_student

    model = build_student("vit_tiny_patch16_224", 3, 0, **VIT_ARGS).eval()
    card = StudentCard(
        "vit_tiny_patch16_224", dict(VIT_ARGS), 3, 64, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), "bicubic", 0.9, ["a", "b", "c"]
    )
    save_student(tmp_path / name, model.state_dict(), card, "model.safetensors")
    return tmp_path / name, model


def test_a_model_folder_is_a_teacher_built_from_its_config(tmp_path):
    from stages.teachers.teachers import default_teacher_id
    from stages.teachers.weight_files import file_sha256

    folder, model = _vit_folder(tmp_path)
    teacher = build_teacher(f"local-dir:{folder}")
    assert (teacher.spec.timm_name, teacher.input_size, teacher.num_classes, teacher.interpolation) == (
        "vit_tiny_patch16_224",
        64,
        3,
        "bicubic",
    )
    assert teacher.mean == (0.5, 0.4, 0.3) and teacher.std == (0.2, 0.2, 0.2) and teacher.spec.kwargs["patch_size"] == 8
    assert teacher.weights == f"sha256:{file_sha256(folder / 'model.safetensors')}" and teacher.model_args == {}
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(teacher(x)["logits"], model(x))
    described = build_teacher(f"local-dir:{folder}", load=False)  # a Ray driver: shapes only, the same description
    assert (described.num_classes, described.input_size, described.weights) == (3, 64, teacher.weights)
    # rendered smaller: position embeddings resampled, as timm does
    small = build_teacher(f"local-dir:{folder}", input_size=32)
    assert small.input_size == 32 and small(torch.randn(2, 3, 32, 32), outputs=("tokens",))["tokens"].shape == (
        2,
        1 + 4 * 4,
        192,
    )
    assert default_teacher_id(f"local-dir:{folder}/") == "fitted" and default_teacher_id("local-dir:.") == "local-dir_."


def test_model_args_build_any_timm_name_and_a_misfit_is_one_line(tmp_path):
    teacher = build_teacher("vit_tiny_patch16_224", random_init=True, num_classes=3, model_args=VIT_ARGS)
    # built for 64 px: rendered at 64 unless --size says
    assert teacher.input_size == 64 and teacher.model_args == VIT_ARGS
    for args, words in (
        ({"depth_of_field": 2}, "cannot be built with depth_of_field=2"),
        ({"num_classes": 5}, "--model-arg num_classes"),
    ):
        with pytest.raises(UserError, match=words) as e:
            build_teacher("vit_tiny_patch16_224", random_init=True, num_classes=3, model_args=args)
        assert "\n" not in str(e.value)


def test_a_model_folder_that_is_not_one_is_one_line(tmp_path):
    folder, _ = _vit_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    cases = {
        f"local-dir:{tmp_path / 'missing'}": "is not a folder",
        f"local-dir:{tmp_path / 'empty'}": "holds no config.json",
        f"local-dir:{tmp_path / 'bad'}": "is not a timm model config",
        "local-dir:": "names no folder",
    }
    for name, words in cases.items():
        with pytest.raises(UserError, match=words) as e:
            build_teacher(name)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="is a model folder with weights of its own"):
        build_teacher(f"local-dir:{folder}", weights=str(folder / "model.safetensors"))


def test_a_hub_model_offline_comes_from_the_hub_cache_or_is_one_line(tmp_path, monkeypatch):
    """hf-hub:REPO offline: the cached snapshot (config.json and weights) is a model folder; a repo not cached is one line, at once."""
    import shutil

    import huggingface_hub.constants

    folder, model = _vit_folder(tmp_path)
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-vit" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (cache / "models--someone--tiny-vit" / "refs").mkdir()
    (cache / "models--someone--tiny-vit" / "refs" / "main").write_text("0123abcd")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, snapshot / name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    teacher = build_teacher("hf-hub:someone/tiny-vit")
    assert teacher.weights == build_teacher(f"local-dir:{folder}").weights and teacher.input_size == 64
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(teacher(x)["logits"], model(x))
    start = time.perf_counter()
    with pytest.raises(
        UserError,
        match=r"needs config.json of hub repo someone/other, which are not in the local hub cache.*local-dir:FOLDER",
    ) as e:
        build_teacher("hf-hub:someone/other")
    assert "\n" not in str(e.value) and time.perf_counter() - start < 5

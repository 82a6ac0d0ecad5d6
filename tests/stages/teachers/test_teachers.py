"""The teacher registry: short names, outputs, weights from files, and failing fast offline."""

from __future__ import annotations

import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from stages.teachers.teachers import build_teacher, list_teachers, resolve_teacher
from storage import UserError


@pytest.mark.parametrize("name", [n for n in list_teachers() if not n.startswith("test_")])  # tests register tiny teachers of their own
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


@pytest.mark.parametrize("key,value", [("input_size", "abc"), ("input_size", "0"), ("mean", "5"), ("mean", "[1, 2]"), ("std", '{"a": 1}')])
def test_a_weights_files_metadata_of_the_wrong_type_is_one_line(key, value, tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(timm.create_model("resnet18", num_classes=3).state_dict(), str(path), metadata={key: value})
    with pytest.raises(UserError, match=f"weights file {path}: metadata '{key}' is '") as e:
        build_teacher("resnet18", weights=str(path))
    assert "\n" not in str(e.value)

"""Students that start from weights: an earlier run's file or folder, another class count, and the one-line refusals."""

from __future__ import annotations

import pytest
import torch

from conftest import STUDENT
from stages.training.student import StudentCard, build_student, save_student
from storage import UserError

KW = STUDENT["student_kwargs"]


def _saved(tmp_path, num_classes: int = 10, seed: int = 3):
    model = build_student(STUDENT["student"], num_classes, seed, **KW)
    card = StudentCard(STUDENT["student"], dict(KW), num_classes, 32, (0.5,) * 3, (0.5,) * 3)
    save_student(tmp_path / "run", model.state_dict(), card)
    return model


def test_a_student_starts_from_an_earlier_runs_file_or_folder(tmp_path):
    before = _saved(tmp_path).state_dict()
    for weights in (tmp_path / "run" / "student.safetensors", tmp_path / "run"):
        after = build_student(STUDENT["student"], 10, 0, str(weights), **KW).state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_another_class_count_keeps_the_backbone_and_starts_the_classifier_afresh(tmp_path):
    before = _saved(tmp_path, num_classes=10).state_dict()
    after = build_student(STUDENT["student"], 4, 0, str(tmp_path / "run" / "student.safetensors"), **KW).state_dict()
    assert after["fc.weight"].shape == (4, 64)
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("fc."))


@pytest.mark.parametrize("case", ["missing", "other architecture", "not weights", "hub offline", "a list for a tensor", "a number for a state"])
def test_weights_that_do_not_fit_are_one_line(tmp_path, monkeypatch, case):
    state = _saved(tmp_path).state_dict()
    weights = {"missing": tmp_path / "nope.safetensors", "other architecture": tmp_path / "run" / "student.safetensors",
               "not weights": tmp_path / "junk.pt", "hub offline": "hub", "a list for a tensor": tmp_path / "list.pt",
               "a number for a state": tmp_path / "five.pt"}[case]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({**state, "fc.weight": [1, 2]}, tmp_path / "list.pt")  # hand-made files: a value that is no tensor
    torch.save({"model": 5}, tmp_path / "five.pt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name, kwargs = ("resnet18", {}) if case in ("other architecture", "hub offline") else (STUDENT["student"], KW)
    with pytest.raises(UserError) as e:
        build_student(name, 10, 0, str(weights), **kwargs)
    assert "\n" not in str(e.value) and "--student-weights" in str(e.value)


def test_a_file_of_another_architecture_or_a_classifier_alone_is_refused_not_trained_from_scratch(tmp_path):
    # timm loads a file with another class count without checking keys: without this check both would start at random.
    import timm
    from safetensors.torch import save_file

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, depth=1)
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    with pytest.raises(UserError, match=r"does not fit student resnet10t \(\d+ of the student's \d+ weights are not in it \(first: "):
        build_student(STUDENT["student"], 10, 0, str(tmp_path / "vit.safetensors"), **KW)
    student = _saved(tmp_path).state_dict()
    save_file({k: v for k, v in student.items() if k.startswith("fc.")}, str(tmp_path / "fc.safetensors"))
    with pytest.raises(UserError, match="weights are not in it"):
        build_student(STUDENT["student"], 10, 0, str(tmp_path / "fc.safetensors"), **KW)


def test_a_backbone_without_a_classifier_loads_and_says_the_classifier_starts_afresh(tmp_path, caplog):
    from safetensors.torch import save_file

    before = _saved(tmp_path).state_dict()
    save_file({k: v for k, v in before.items() if not k.startswith("fc.")}, str(tmp_path / "body.safetensors"))
    with caplog.at_level("WARNING"):
        after = build_student(STUDENT["student"], 10, 0, str(tmp_path / "body.safetensors"), **KW).state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("fc."))
    assert "holds no classifier and the data has 10: the classifier starts afresh" in caplog.text

"""Students that start from weights: an earlier run's file or folder, another class count, and the one-line refusals;
the files a trained student is saved as: the same bytes for the same content, and what is true of the model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import STUDENT
from stages.training.student import build_student
from stages.training.student_card import StudentCard
from stages.training.student_files import save_student
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


@pytest.mark.parametrize(
    "case",
    ["missing", "other architecture", "not weights", "hub offline", "a list for a tensor", "a number for a state"],
)
def test_weights_that_do_not_fit_are_one_line(tmp_path, monkeypatch, case):
    state = _saved(tmp_path).state_dict()
    weights = {
        "missing": tmp_path / "nope.safetensors",
        "other architecture": tmp_path / "run" / "student.safetensors",
        "not weights": tmp_path / "junk.pt",
        "hub offline": "hub",
        "a list for a tensor": tmp_path / "list.pt",
        "a number for a state": tmp_path / "five.pt",
    }[case]
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
    with pytest.raises(
        UserError, match=r"does not fit student resnet10t \(\d+ of the student's \d+ weights are not in it \(first: "
    ):
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


def _card(**provenance) -> StudentCard:
    return StudentCard(
        STUDENT["student"], dict(KW), 3, 32, (0.5,) * 3, (0.25,) * 3, "bicubic", 0.9, ["cat", "dog", "fox"], provenance
    )


def test_the_same_weights_give_the_same_bytes_whatever_the_metadatas_order(tmp_path):
    """safetensors writes metadata from a hash map, in a new order every time: the writer sorts it, so one model is one sha256."""
    import random

    from safetensors import safe_open

    from stages.training.student_files import save_weights

    state = build_student(STUDENT["student"], 3, 0, **KW).state_dict()
    meta = {f"key{i}": f"value {i}" for i in range(12)}
    files = []
    for attempt in range(6):
        items = list(meta.items())
        random.Random(attempt).shuffle(items)
        files.append(tmp_path / f"w{attempt}.safetensors")
        save_weights(files[-1], state, dict(items))
    assert len({f.read_bytes() for f in files}) == 1
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == meta and all(torch.equal(f.get_tensor(k), state[k]) for k in state)


PROVENANCE = dict(
    run="distill",
    data={"source": "folder:/data/pets", "fingerprint": "f00d", "samples": 24},
    method="kd",
    epochs=2,
    seed=0,
    teachers=[{"id": "big", "name": "local-dir:/runs/big", "timm_name": "resnet50", "weights": "sha256:beef"}],
    store="/stores/pets",
)


def test_a_saved_student_says_what_is_true_of_it_and_twice_is_the_same_bytes(tmp_path):
    import timm

    state = build_student(STUDENT["student"], 3, 0, **KW).state_dict()
    metrics = [{"epoch": 1, "val_top1": 0.5, "seconds": 1.0}, {"epoch": 2, "val_top1": 0.25, "seconds": 2.0}]
    for name in ("a", "b"):
        save_student(tmp_path / name, state, _card(**PROVENANCE), "model.safetensors", metrics)
    for name in ("model.safetensors", "config.json", "README.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    text = (tmp_path / "a" / "config.json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"  # one fixed layout
    for imagenet in ("tag", "license", "origin_url", "hf_hub_id", "paper_ids", "url", "source"):
        assert imagenet not in config["pretrained_cfg"]  # resnet10t's pretrained config is c3_in1k, an ImageNet tag
    assert config["provenance"] == PROVENANCE and config["label_names"] == ["cat", "dog", "fox"]
    assert (
        config["pretrained_cfg"]["description"] == "resnet10t trained by `pipeline distill` (kd) on folder:/data/pets"
    )
    model = timm.create_model(f"local-dir:{tmp_path / 'a'}", pretrained=True)
    cfg = model.pretrained_cfg
    assert (
        cfg["input_size"] == (3, 32, 32)
        and cfg["std"] == [0.25] * 3
        and cfg["interpolation"] == "bicubic"
        and cfg["crop_pct"] == 0.9
    )
    card = (tmp_path / "a" / "README.md").read_text()
    for words in (
        "library_name: timm",
        "| command | `pipeline distill` |",
        "`folder:/data/pets`: 24 samples, fingerprint `f00d`",
        "`big` in the store: `local-dir:/runs/big` (timm `resnet50`), weights `sha256:beef`",
        "| store | `/stores/pets` |",
        "| epochs | 2 |",
        "| final | 2 | 25.00 % |",
        "| best | 1 | 50.00 % |",
        "3: cat, dog, fox",
    ):
        assert words in card, words
    assert "license" not in card


def test_a_card_without_validation_says_so(tmp_path):
    state = build_student(STUDENT["student"], 3, 0, **KW).state_dict()
    save_student(tmp_path / "run", state, _card(), metrics=[{"epoch": 1, "train_loss": 1.0}])
    card = (tmp_path / "run" / "README.md").read_text()
    assert "no validation figures" in card and "## Provenance" not in card  # nothing known of it is not made up
    assert "provenance" not in json.loads((tmp_path / "run" / "config.json").read_text())

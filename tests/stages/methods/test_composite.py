"""Composite methods: several methods in one student, each reading its own teacher, with a weight each."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from conftest import BATCH, STUDENT
from safetensors.torch import load_file

from pipeline.settings import config
from pipeline.cli import main
from pipeline.settings.recipe import train_settings
from pipeline.sweeps.spec import parse_sweep, trial_job, trial_settings
from stages.methods import build_method, list_methods, method_class, parse_method
from stages.teachers.teacher_sources import PartsTeacher, TeacherSource
from stages.training.batch import targets
from stages.training.job import DistillJob, OnlineTeacher, build_distill
from stages.training.settings import TrainSettings
from storage import Store, UserError

C, DT, B, T = 10, 48, 8, 17
VIT = dict(
    student="vit_tiny_patch16_224", student_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
)


class EveryOutput(TeacherSource):
    """A teacher with every output a method may read: C classes, DT-wide features, CLS + 4 x 4 patch tokens."""

    needs = ("logits", "features", "tokens")
    feature_dim, token_shape, token_prefix = DT, (T, DT), 1

    def class_means(self):
        return torch.randn(C, DT, generator=torch.Generator().manual_seed(3))

    def outputs(self, batch, views, temperature=1.0, needs=None):
        g = torch.Generator().manual_seed(4)
        return {
            "logits": torch.randn(B, C, generator=g),
            "features": torch.randn(B, DT, generator=g),
            "tokens": torch.randn(B, T, DT, generator=g),
        }


def _steps(spec: str, teacher, temperature, steps: int = 2):
    """Losses and the exported student after ``steps`` SGD steps of ``spec`` on a tiny ViT, through the trainer's hooks."""
    torch.manual_seed(0)
    model = timm.create_model(VIT["student"], pretrained=False, num_classes=C, **VIT["student_kwargs"])
    method = build_method(parse_method(spec), {}, model, teacher, num_classes=C, size=32, epochs=4)
    method.train()
    trained = method.wrap_student(model)
    opt = torch.optim.SGD([*trained.parameters(), *method.parameters()], lr=0.1)
    x = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    y = targets(np.arange(B) % C, C, 0.0)
    losses = []
    for _ in range(steps):
        torch.manual_seed(2)  # the same dropout and noise in both runs
        t_out = teacher.outputs(None, None, temperature(method))
        loss, _ = method(method.student_outputs(trained, x), t_out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, method.export_student(trained).state_dict()


@pytest.mark.parametrize("name", list_methods())
def test_a_composite_of_one_part_trains_as_its_method_alone_bit_for_bit(name):
    alone = _steps(name, EveryOutput(), lambda m: m.teacher_temperature)
    parts = PartsTeacher({"t": EveryOutput()}, ["t"] if method_class(name).needs else [None])
    composite = _steps(f"{name}@t", parts, lambda m: m.teacher_temperature)
    assert composite[0] == alone[0]
    assert composite[1].keys() == alone[1].keys()
    assert [k for k in alone[1] if not torch.equal(alone[1][k], composite[1][k])] == []
    assert alone[0][0] != alone[0][1]  # not vacuous: the steps changed the student


def _settings(method, **kw):
    return TrainSettings(**{**STUDENT, "epochs": 1, "batch_size": BATCH, "method": method, **kw})


def _timeless(metrics):
    return [{k: v for k, v in m.items() if k not in ("seconds", "views_per_s")} for m in metrics]


def test_a_cached_composite_of_one_part_gives_the_methods_run_and_student(base_store, tmp_path):
    alone = build_distill(DistillJob(str(base_store), _settings("kd"))).train(out_dir=tmp_path / "a")
    one = build_distill(DistillJob(str(base_store), _settings("kd@t1"))).train(out_dir=tmp_path / "b")
    assert [m["train_loss"] for m in one.metrics] == [m["train_loss"] for m in alone.metrics]
    assert one.metrics[0]["train_kd.kd"] == alone.metrics[0]["train_kd"]
    a, b = load_file(tmp_path / "a" / "student.safetensors"), load_file(tmp_path / "b" / "student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_parts_read_their_own_teachers_once_and_log_their_losses_apart(two_teacher_store, tmp_path, monkeypatch):
    reads = []
    from stages.teachers import teacher_sources

    original = teacher_sources.CachedTeacher.unit_rows

    def counted(self, view, block, rows):
        reads.append((self.teacher_id, view, block))
        return original(self, view, block, rows)

    monkeypatch.setattr(teacher_sources.CachedTeacher, "unit_rows", counted)
    job = DistillJob(
        str(two_teacher_store),
        _settings("kd@t1+dkd@t2+dist@t1", method_args={"dkd": {"weight": 0.5}, "kd": {"temperature": 4}}),
    )
    result = build_distill(job).train(out_dir=tmp_path)
    units = len(Store(two_teacher_store).units(2)) // 2  # an epoch of one view per block
    assert sorted(reads) == sorted({r for r in reads})  # each teacher's unit read once, though t1 serves two parts
    assert {r[0] for r in reads} == {"t1", "t2"} and len(reads) == 2 * units

    line = result.metrics[0]
    assert {"train_kd", "train_dkd", "train_dist", "train_kd.kd", "train_dkd.dkd", "train_dist.dist"} <= set(line)
    assert line["train_loss"] == pytest.approx(
        line["train_kd"] + 0.5 * line["train_dkd"] + line["train_dist"], rel=1e-5
    )
    written = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert written["train_dkd"] == line["train_dkd"]
    # The exported student is the plain timm model.
    plain = timm.create_model(STUDENT["student"], pretrained=False, num_classes=10, **STUDENT["student_kwargs"])
    plain.load_state_dict(load_file(tmp_path / "student.safetensors"))


def test_the_parts_weight_changes_the_run(base_store):
    runs = [
        build_distill(
            DistillJob(str(base_store), _settings("kd@t1+dkd@t1", method_args={"dkd": {"weight": w}}))
        ).train()
        for w in (0.0, 2.0)
    ]
    assert runs[0].metrics[0]["train_loss"] == pytest.approx(runs[0].metrics[0]["train_kd"])
    assert runs[0].metrics[0]["train_loss"] != runs[1].metrics[0]["train_loss"]


def test_an_online_composite_runs_each_model_live_and_matches_the_cache(base_store):
    cached = build_distill(DistillJob(str(base_store), _settings("kd@t1+dkd@t1"))).train()
    online = OnlineTeacher(None, random_init=True, seed=0)  # t1 is resnet18 at random-init seed 0
    live = build_distill(DistillJob(str(base_store), _settings("kd@resnet18+dkd@resnet18"), online=online)).train()
    assert _timeless(live.metrics) == _timeless(cached.metrics)


# -- settings: flags, YAML parts, recipes, sweeps ------------------------------------------------------


def test_a_recipe_lists_parts_as_the_flag_and_method_args_give_them():
    listed = {
        "method": [
            {"method": "kd", "teacher": "t1", "args": {"temperature": 4}},
            {"method": "cospress", "teacher": "t2", "weight": 0.5},
        ]
    }
    flagged = {
        "method": "kd@t1+cospress@t2",
        "method_args": config.parse_pairs(["kd.temperature=4", "cospress.weight=0.5"], "--method-arg"),
    }
    assert train_settings(listed, {}, "recipe") == train_settings({}, flagged, "flags")


def test_a_paper_recipes_method_settings_go_to_that_part_of_a_composite():
    a2 = config.recipe("vanillakd_a2")
    s = train_settings(a2, {"method": "kd@beitv2_l+cospress@dinov2_s"}, "configs/vanillakd_a2.yaml")
    assert s.method_args == {"kd": a2["method_args"]}


def test_a_sweep_searches_a_parts_weight(base_store):
    spec = parse_sweep(
        {"method": "kd@t1+dkd@t1", "epochs": 1, "search": {"method_args": {"dkd": {"weight": [0.5, 2.0]}}}},
        "sweep.yaml",
    )
    assert [a.name for a in spec.axes] == ["method_args.dkd.weight"]
    job = trial_job(
        {"store": str(base_store)}, trial_settings(spec.fixed, {"method_args.dkd.weight": 2.0}), "sweep.yaml"
    )
    assert job.train.method_args == {"dkd": {"weight": 2.0}}


@pytest.mark.parametrize(
    "method, args, says",
    [
        ("kd@t1+kd@t1", {}, "has part kd@t1 twice"),
        ("kd@t1+kdd@t1", {}, "unknown method 'kdd' (did you mean kd"),
        ("kd@../x", {}, "is not a plain name"),
        ("kd@t1+dkd@t1", {"temperature": 4}, "are keyed by part, kd, dkd: found temperature"),
        ("kd@t1+dkd@t1", {"dkd": {"weight": -1}}, "the weight of part dkd"),
        ("kd@t1+dkd@t1", {"dkd": {"tau": 2}}, "method 'dkd' has no setting tau (part dkd"),
        ("kd@t1+dkd@t1", {"kd": {"weight": 0}, "dkd": {"weight": 0.0}}, "every part of kd@t1+dkd@t1 has weight 0"),
    ],
)
def test_bad_parts_are_one_line_before_any_work(method, args, says):
    with pytest.raises(UserError, match=None) as e:
        train_settings({}, {"method": method, "method_args": args}, "the command line")
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "method, teacher_id, says",
    [
        ("kd@t1+dkd@t9", None, "no teacher 't9'"),
        ("kd+dkd@t2", None, "part kd names no teacher and store"),
        ("kd@t1+cospress@t2", None, "teacher 't2' (read by part cospress): the cached teacher has no tokens"),
        ("kd@t1+dkd", "t1,t2", "a composite names each part's teacher"),
        ("gpd@t1+srd@t2", None, "trains a widened network around the student"),
        ("kd@t1+dkd@t2", "t1", "--teacher-id t1 is read by no part"),
    ],
)
def test_a_store_or_student_that_cannot_serve_a_part_is_refused_in_one_line(
    two_teacher_store, tmp_path, capsys, method, teacher_id, says
):
    argv = [
        "--quiet",
        "distill",
        "--from-cache",
        str(two_teacher_store),
        "--method",
        method,
        "--student",
        "resnet10t",
        "--student-arg",
        "channels=[8,16,32,64]",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "run"),
    ]
    assert main([*argv, *(["--teacher-id", teacher_id] if teacher_id else [])]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_weight_given_twice_or_run_wide_teacher_flags_no_part_reads_are_one_line(base_store, two_teacher_store):
    with pytest.raises(UserError, match="part dkd gives its weight twice"):
        train_settings(
            {"method": [{"method": "kd"}, {"method": "dkd", "weight": 2, "args": {"weight": 3}}]}, {}, "recipe.yaml"
        )
    with pytest.raises(UserError, match="drop --teacher-weights"):
        build_distill(DistillJob(str(two_teacher_store), _settings("kd@t1+dkd@t2"), teacher_weights="0.7,0.3"))
    online = OnlineTeacher("resnet18", random_init=True, seed=0)
    with pytest.raises(UserError, match="--teacher resnet18 is run by no part"):
        build_distill(DistillJob(str(base_store), _settings("kd@resnet18+dkd@resnet18"), online=online))

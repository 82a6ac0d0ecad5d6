"""One extraction, one description: ``ExtractJob`` as plain values, a teacher described without its weights,
every store check once, and a worker built from the job alone writing the same bytes as this process."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BATCH, BLOCK, DATA, SIZE, read_tree
from safetensors.torch import save_file

from pipeline.cli import main
from stages.cache import store_setup
from stages.teachers import extract, extract_job
from stages.teachers.extract_job import ExtractJob, prepare_extract, worker_extractor
from stages.teachers.teachers import build_teacher
from storage import Store, UserError

FULL = dict(logits="full", dtype="float32")


def _job(store, **changes) -> ExtractJob:
    base = dict(
        store=str(store),
        data=DATA,
        teacher="resnet18",
        views=2,
        random_init=True,
        size=SIZE,
        block=BLOCK,
        batch_size=BATCH,
        device="cpu",
    )
    return ExtractJob(**{**base, **changes})


def test_a_job_is_plain_values_and_comes_back_equal(tmp_path):
    job = _job(
        tmp_path / "s", outputs=("logits", "features"), view_settings={"hflip": 0.25, "scale": [0.5, 1.0]}, plan_seed=3
    )
    again = ExtractJob.from_dict(json.loads(json.dumps(job.to_dict())))
    assert again == job and again.outputs == ("logits", "features")
    assert job.id == "resnet18" and _job(tmp_path, teacher="hf-hub:a/b").id == "hf-hub_a_b"


@pytest.mark.parametrize("weights", [None, "safetensors", "pth"])
def test_a_described_teacher_reads_no_weights_and_gives_the_same_record(tmp_path, weights):
    """What a Ray driver does: the model on torch's meta device, the class count from the file's header."""
    changes = dict(outputs=("features", "tokens"))  # no logits: 7 classes in the file may differ from the data's 10
    if weights is not None:
        state = build_teacher("resnet18", random_init=True, num_classes=7, input_size=SIZE, seed=5).model.state_dict()
        path = tmp_path / f"w.{weights}"
        save_file(state, str(path)) if weights == "safetensors" else torch.save(state, path)
        changes.update(random_init=False, weights=str(path))
    job = _job(tmp_path / "s", **changes)
    described, loaded = prepare_extract(job, load=False), prepare_extract(job)
    assert all(p.device.type == "meta" for p in described.teacher.parameters())
    assert all(p.device.type == "cpu" for p in loaded.teacher.parameters())
    assert described.info == loaded.info
    assert (described.info.num_classes, described.info.feature_dim) == (7 if weights else 10, 512)
    assert (described.info.num_tokens, described.info.token_dim) == (1, 512)  # 32 px through a resnet: one position
    assert not (tmp_path / "s").exists()  # preparing writes nothing


def test_extracting_into_a_store_checks_each_thing_once(store_copy, monkeypatch):
    """The command checks the data, the plan and the teacher's record once, and builds the plan once."""
    calls = {}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapper

    originals = {
        "check_dataset": store_setup.check_dataset,
        "check_plan": store_setup.check_plan,
        "check_teacher_record": extract.check_teacher_record,
    }
    for module in (store_setup, extract, extract_job):  # wherever a check can be called from
        for name, fn in originals.items():
            if hasattr(module, name):
                monkeypatch.setattr(module, name, counted(name, fn))
    monkeypatch.setattr(extract_job, "job_plan", counted("job_plan", extract_job.job_plan))
    argv = [
        "--quiet",
        "extract",
        "--data",
        DATA,
        "--teacher",
        "resnet18",
        "--random-init",
        "--teacher-id",
        "t1",
        "--size",
        str(SIZE),
        "--views",
        "3",
        "--logits",
        "full",
        "--dtype",
        "float32",
        "--batch-size",
        str(BATCH),
        "--store",
        str(store_copy),
    ]
    assert main(argv) == 0
    assert calls == {"check_dataset": 1, "check_plan": 1, "check_teacher_record": 1, "job_plan": 1}
    assert Store(store_copy).teacher_info("t1").views == 3


def test_a_worker_built_from_the_job_writes_what_this_process_writes(tmp_path):
    """The Ray path without Ray: a driver that never loads the teacher, and units run by a worker made from the job."""
    here = prepare_extract(_job(tmp_path / "here", **FULL))
    with here.open_store().lock_teacher("resnet18"):
        result = here.run()
    assert (result.units, result.skipped) == (6, 0)
    driver = prepare_extract(_job(tmp_path / "there", **FULL), load=False)
    store = driver.open_store()
    with store.lock_teacher("resnet18"):
        driver.open_teacher()
        worker = worker_extractor(driver.job)
        for view, block in reversed(store.units(2)):  # any order: each unit is written whole
            worker.run([(view, block)])
    got, want = read_tree(tmp_path / "there"), read_tree(tmp_path / "here")
    assert sorted(got) == sorted(want) and [k for k in got if got[k] != want[k]] == []


def test_a_worker_refuses_data_or_weights_other_than_the_stores(tmp_path):
    driver = prepare_extract(_job(tmp_path / "s", **FULL), load=False)
    with driver.open_store().lock_teacher("resnet18"):
        driver.open_teacher()
    with pytest.raises(UserError, match="differs on this node from the one store .* was made from"):
        worker_extractor(driver.job.replace(data="fake:64?size=32"))
    with pytest.raises(
        UserError,
        match="teacher weights differ on this node \\(random-init:seed=1, in the store: random-init:seed=0\\)",
    ):
        worker_extractor(driver.job.replace(teacher_seed=1))


def test_a_teacher_that_appears_while_an_extraction_starts_is_refused(tmp_path):
    first = prepare_extract(_job(tmp_path / "s", **FULL))
    store = first.open_store()
    second = prepare_extract(_job(tmp_path / "s", **FULL))  # checked before the first made its teacher
    with store.lock_teacher("resnet18"):
        first.open_teacher()
    with pytest.raises(UserError, match="appeared in .* while this extraction was starting"):
        second.open_teacher()

"""A Ray extraction actor without Ray: one block's views from one decode per image, rendered ahead within a bound."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from conftest import BATCH, BLOCK, DATA, SIZE, read_tree

from pipeline.cluster.extract import ExtractActor, RenderAhead
from stages.teachers.extract_job import ExtractJob, prepare_extract
from storage import UserError

VIEWS = 3


def _job(store) -> ExtractJob:
    return ExtractJob(
        store=str(store),
        data=DATA,
        teacher="resnet18",
        views=VIEWS,
        random_init=True,
        size=SIZE,
        block=BLOCK,
        batch_size=BATCH,
        device="cpu",
        logits="full",
        dtype="float32",
    )


def test_an_actor_decodes_each_image_once_per_block_and_writes_what_one_process_writes(tmp_path, monkeypatch):
    here = prepare_extract(_job(tmp_path / "here"))
    with here.open_store().lock_teacher("resnet18"):
        here.run()
    driver = prepare_extract(_job(tmp_path / "there"), load=False)
    store = driver.open_store()
    with store.lock_teacher("resnet18"):
        driver.open_teacher()
        actor = ExtractActor(driver.job)
        dataset = actor.unit.dataset
        calls = Counter()
        original = type(dataset).image
        monkeypatch.setattr(type(dataset), "image", lambda self, i: calls.update([i]) or original(self, i))
        # What the driver hands out: a block's views together, and the next block to render ahead.
        blocks = [[(v, b) for v in range(VIEWS)] for b in range(store.num_blocks)]
        rows = [actor.run(block, ahead) for block, ahead in zip(blocks, [*blocks[1:], None])]
    assert rows == [len(store.block_range(b)) * VIEWS for b in range(store.num_blocks)]
    assert sorted(calls) == list(range(len(dataset))) and set(calls.values()) == {1}  # once for all three views
    got, want = read_tree(tmp_path / "there"), read_tree(tmp_path / "here")
    got, want = ({k: v for k, v in t.items() if not k.startswith("logs/")} for t in (got, want))
    assert sorted(got) == sorted(want) and [k for k in got if got[k] != want[k]] == []


def test_an_actor_given_another_block_than_it_rendered_ahead_runs_that_block(tmp_path):
    driver = prepare_extract(_job(tmp_path / "s"), load=False)
    store = driver.open_store()
    with store.lock_teacher("resnet18"):
        driver.open_teacher()
        actor = ExtractActor(driver.job)
        actor.run([(0, 0)], [(0, 1)])  # block 1 renders ahead, then goes to another actor
        actor.run([(1, 2), (2, 2)])
    assert store.teacher("resnet18").committed() == {(0, 0), (1, 2), (2, 2)}


def test_render_ahead_stays_within_its_bound_and_raises_where_the_batch_would():
    made = []

    def batches():
        for i in range(10):
            made.append(i)
            yield i
        raise UserError("cannot decode image 10")

    ahead = RenderAhead(batches, depth=2)
    time.sleep(0.3)
    assert len(made) <= 3  # two queued, one waiting to be put
    got = []
    with pytest.raises(UserError, match="cannot decode image 10"):
        for batch in ahead:
            got.append(batch)
    assert got == list(range(10))


def test_a_closed_render_ahead_stops_its_thread():
    ahead = RenderAhead(lambda: iter(range(100)), depth=1)
    time.sleep(0.1)
    ahead.close()
    deadline = time.time() + 5
    while any(t.name == "render-ahead" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "render-ahead" for t in threading.enumerate())

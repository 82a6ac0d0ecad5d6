"""`pipeline inspect`: sizes that match the store, top-k mass and KL that mean what they say, the grid, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import build_parser, main
from stages.cache import store_report
from stages.cache import topk
from stages.cache.stats import write_stats
from stages.data.datasets import open_dataset
from storage import Store, UserError

from conftest import BLOCK, DATA, SIZE, VIEWS

N = 80  # samples in the conftest stores (fake:80)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["--quiet", "inspect", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def table_of(out: str, title: str) -> dict[str, list[str]]:
    """The array table printed under the line starting with ``title``: {array name: columns}."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    assert lines[start + 1].split()[:3] == ["array", "dtype", "shape"]
    rows = {}
    for line in lines[start + 2 :]:
        cols = line.split()
        rows[cols[0]] = cols
        if cols[0] == "total":
            return rows
    raise AssertionError(f"no total row under {title}")


def number(text: str) -> float:
    return float(text.rstrip("x").replace(",", ""))


def test_table_matches_the_stores_own_description(two_teacher_store, capsys):
    rc, out, _ = run(capsys, str(two_teacher_store))
    assert rc == 0
    store = Store(two_teacher_store)
    for tid in ("t1", "t2"):
        described = store.teacher(tid).describe()
        rows = table_of(out, f"teacher {tid} ")
        assert set(rows) == {*described, "total"}
        for name, d in described.items():
            _, dtype, shape, raw, stored, per_view, ratio = rows[name]
            assert (dtype, shape) == (d["dtype"], "x".join(map(str, d["shape"])))
            assert number(raw) == d["nbytes"] and number(stored) == d["stored_bytes"]
            assert number(per_view) == pytest.approx(d["stored_bytes"] / (VIEWS * N), abs=0.005)
            assert number(ratio) == pytest.approx(d["nbytes"] / d["stored_bytes"], abs=0.005)
        assert number(rows["total"][2]) == sum(d["stored_bytes"] for d in described.values())
    assert set(table_of(out, "teacher t2 ")) == {*topk.ARRAYS, "features", "total"}
    assert set(table_of(out, "recipe: ")) == {"crop", "flip", "fingerprint", "total"}
    blocks = -(-N // BLOCK)
    # plan, t1, t2
    assert out.count(f"{VIEWS} of {VIEWS} views complete, {VIEWS * blocks} of {VIEWS * blocks} units committed") == 3
    assert "KL(full || top-10 rebuilt) in nats, measured: T=1 mean" in out  # t1 keeps full logits
    assert "top-3 mass over" in out  # t2 keeps its own k
    assert "KL(full || top-3 rebuilt) in nats, estimated from the stored tail statistics" in out


def test_partial_teacher_and_stats_are_reported(store_copy, train_data, capsys):
    store = Store(store_copy)
    write_stats(store, "t1", train_data.labels)
    store.teacher("t1").uncommit(1, 2)  # the last block (16 rows) of view 1
    rc, out, _ = run(capsys, str(store_copy), "--teacher-id", "t1")
    assert rc == 0
    assert "1 of 2 views complete, 5 of 6 units committed" in out
    group = store.teacher("t1")
    # the uncommitted unit's shard is still on disk
    stored = group.describe(group.committed())["logits"]["stored_bytes"]
    assert stored < group.describe()["logits"]["stored_bytes"]
    assert number(table_of(out, "teacher t1 ")["logits"][5]) == pytest.approx(stored / (VIEWS * N - 16), abs=0.005)
    stats_line = next(line for line in out.splitlines() if line.startswith("stats/t1:"))
    assert "class_means float32 10x512" in stats_line and "from 2 views of 80 samples" in stats_line


def test_topk_mass_is_the_probability_the_top_k_keep(base_store, two_teacher_store):
    store = Store(base_store)
    q = store_report.logit_quality(store, "t1", units=2, k=3)
    # An independent computation on the same two units (the first and the last committed).
    units = sorted(store.teacher("t1").committed())
    logits = torch.cat(
        [
            torch.from_numpy(store.teacher("t1").read_unit(v, b, ["logits"], rows=len(store.block_range(b)))["logits"])
            for v, b in (units[0], units[-1])
        ]
    )
    mass = torch.softmax(logits.double(), 1).topk(3, 1).values.sum(1)
    assert q.rows == len(mass) and q.units == 2
    assert q.mass_mean == pytest.approx(float(mass.mean()), rel=1e-6)
    assert q.mass_p5 == pytest.approx(float(np.percentile(mass.numpy(), 5)), rel=1e-6)
    top3 = store_report.logit_quality(Store(two_teacher_store), "t2", units=3)
    assert top3.k == 3 and not top3.measured and set(top3.kl) == {1.0, 4.0}  # a top-k store estimates what it lost
    assert all(0 < share <= 1 for share, _ in top3.tail_share.values())
    assert 0 < top3.mass_p5 <= top3.mass_mean <= 1
    # A random-init teacher over 10 classes is nearly uniform: 3 classes keep about 0.3.
    assert 0.25 < top3.mass_mean < 0.5


def test_kl_is_zero_with_every_class_and_positive_without(base_store):
    store = Store(base_store)
    everything = store_report.logit_quality(store, "t1", units=6, k=10)
    assert everything.mass_mean == pytest.approx(1.0, abs=1e-6)
    assert all(mean < 1e-9 and p95 < 1e-9 for mean, p95 in everything.kl.values())
    fewer = store_report.logit_quality(store, "t1", units=6, k=3)
    assert all(mean > 0 and p95 >= mean * 0.5 for mean, p95 in fewer.kl.values())
    assert set(fewer.kl) == {1.0, 4.0}


def kl_full_vs_topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) KL(softmax(full) || softmax(rebuilt)), rebuilt from the row's top k (and its top class as target) in float32."""
    logits = logits.float()  # (B, C)
    rows = topk.TopK.of(logits, k, logits.argmax(1)).rows("float32", "int32")
    return topk.kl(logits, topk.logits_from_topk(rows, logits.shape[1]))


def test_kl_golden_value():
    # Logits (2, 1, 0) keeping k = 1: the rebuild keeps p0 and spreads the rest evenly.
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    p = torch.softmax(logits.double(), 1)[0]
    q = torch.tensor([p[0], (1 - p[0]) / 2, (1 - p[0]) / 2], dtype=torch.float64)
    expected = float((p * (p / q).log()).sum())
    assert float(kl_full_vs_topk(logits, 1)[0]) == pytest.approx(expected, rel=1e-5)
    assert float(kl_full_vs_topk(logits, 3)[0]) == pytest.approx(0.0, abs=1e-12)


def test_grid_shows_the_replayed_views_and_the_teachers_classes(base_store, train_data, tmp_path, capsys):
    png = tmp_path / "grid.png"
    rc, out, _ = run(capsys, str(base_store), "--grid", str(png), "--grid-ids", "0,1,2,3,4", "--grid-views", "3")
    assert rc == 0 and f"grid: 5 samples x 2 views of teacher t1 -> {png}" in out  # only 2 views exist
    width, height = store_report.tile_size(SIZE)
    image = Image.open(png)
    per_row = 1800 // (2 * width)  # samples side by side, wrapped to a screen's width
    assert image.size == (2 * per_row * width, -(-5 // per_row) * height) and per_row >= 2
    store = Store(base_store)
    cells = store_report.grid_cells(store, train_data, "t1", np.arange(5), views=2)
    assert [(c["id"], c["view"]) for c in cells] == [(i, v) for i in range(5) for v in range(2)]
    logits = store.teacher("t1").array("logits")
    for c in cells:
        row = torch.from_numpy(logits[c["view"], int(store.positions([c["id"]])[0])])  # rows are in the store's order
        assert c["top"][0][0] == int(row.argmax()) and c["top"][0][1] == pytest.approx(
            float(torch.softmax(row, 0).max())
        )
        assert c["label"] == int(train_data.labels[c["id"]])
    # The tile of sample 1, view 1 (the 4th tile of the first row) holds that replayed view, enlarged by whole pixels.
    side = width - 2 * store_report.PAD
    x = 3 * width + store_report.PAD
    tile = np.asarray(image.crop((x, store_report.PAD, x + side, store_report.PAD + side)))
    scale = side // SIZE
    assert np.array_equal(tile[::scale, ::scale], cells[3]["image"].permute(1, 2, 0).numpy())


def test_the_grid_draws_a_seeded_choice_across_classes_of_class_ordered_data(tmp_path):
    """On class-ordered data (ImageNet's folders) samples 0..15 are one class: the grid draws a seeded random choice,
    from named classes with --grid-classes, and --grid-ids outside the data is one line."""
    from stages.data.folder_dataset import FolderDataset

    for c in range(8):
        folder = tmp_path / "data" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (8, 8), (c * 30, i, 0)).save(folder / f"{i}.png")
    data = FolderDataset(str(tmp_path / "data"))
    ids = store_report.grid_ids(data, 16)
    # many classes, the same every time
    assert len(set(data.labels[ids])) >= 5 and np.array_equal(ids, store_report.grid_ids(data, 16))
    assert set(data.labels[store_report.grid_ids(data, 6, classes=["class2", "5"])]) == {2, 5}
    with pytest.raises(UserError, match="--grid-ids 160 is not a sample of the store: its ids run from 0 to 159"):
        store_report.grid_ids(data, 4, ids=[3, 160])
    with pytest.raises(UserError, match="--grid-classes dog is no class of the data"):
        store_report.grid_ids(data, 4, classes=["dog"])


def test_grid_refuses_views_that_no_longer_replay(store_copy, tmp_path, capsys):
    plan = Store(store_copy).plan
    unit = plan.read_unit(0, 0, rows=BLOCK)
    plan.write_unit(0, 0, {**unit, "fingerprint": unit["fingerprint"] ^ np.uint32(1)})  # a library "changed" the pixels
    rc, _, err = run(capsys, str(store_copy), "--grid", str(tmp_path / "g.png"))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    ids = store_report.grid_ids(open_dataset(DATA), 16)  # the grid's seeded choice of samples
    first = next(int(i) for i in Store(store_copy).block_ids(0) if i in ids)  # its first sample in block 0
    assert f"view 0 of sample {first} replays differently" in err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("case", ["missing store", "unknown teacher", "bad units", "bad temperature"])
def test_bad_input_is_one_line(base_store, tmp_path, capsys, case):
    argv = {
        "missing store": [str(tmp_path / "nowhere")],
        "unknown teacher": [str(base_store), "--teacher-id", "nope"],
        "bad units": [str(base_store), "--units", "0"],
        "bad temperature": [str(base_store), "--temperature", "1,0"],
    }[case]
    rc, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and out == ""
    expected = {
        "missing store": "no store at",
        "unknown teacher": "has no teacher 'nope' (it has: t1)",
        "bad units": "--units: must be an integer in [1,",
        "bad temperature": "--temperature must be a number in [0.001, 1000]",
    }
    assert expected[case] in lines[0]


def test_every_inspect_flag_states_its_default():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["inspect"]
    flags = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert {a.option_strings[0] for a in flags} == {
        "--teacher-id",
        "--units",
        "--topk",
        "--temperature",
        "--grid",
        "--grid-samples",
        "--grid-classes",
        "--grid-ids",
        "--grid-views",
        "--data",
    }
    for action in flags:
        assert "default:" in action.help, action.option_strings
        if action.default is not None:
            assert f"default: {action.default}" in action.help

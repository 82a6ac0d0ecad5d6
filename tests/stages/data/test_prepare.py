"""Shards made for replay (``stages.data.prepare``): random samples of class-ordered data, images kept or shrunk,
class names carried, and what a rerun trusts.

The source is a folder of 20 classes x 30 tiny JPEGs written class by class, as ImageNet's folders list them.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import image_bytes, read_tree
from stages.data import prepare as prep
from stages.data.prepare import (
    PrepareJob,
    PrepareSettings,
    ShardPlan,
    finished_shards,
    open_source,
    prepare,
    sample_key,
)
from stages.data.wds_dataset import WdsDataset
from storage import Location, UserError

CLASSES, PER_CLASS = 20, 30


pytestmark = pytest.mark.usefixtures("index_cache")  # never the user's own shard-index cache


def class_folder(root: Path, classes: int = CLASSES, per_class: int = PER_CLASS) -> Path:
    """Class by class, as ImageNet's folders are listed."""
    for c in range(classes):
        (root / f"n{c:03d}").mkdir(parents=True)
        for j in range(per_class):
            (root / f"n{c:03d}" / f"img{j:03d}.jpg").write_bytes(image_bytes(c * 1000 + j))
    return root


def run(src: Path, out: Path, **settings) -> prep.PrepareResult:
    data = open_source(f"folder:{src}")
    return prepare(PrepareJob(f"folder:{src}", str(out), PrepareSettings(**settings), data.fingerprint()), data)


def shards(out: Path) -> WdsDataset:
    return WdsDataset(f"{out}/{json.loads((out / 'manifest.json').read_text())['pattern']}")


def test_class_ordered_folders_become_shards_of_random_samples(tmp_path):
    src = class_folder(tmp_path / "src")
    source = open_source(f"folder:{src}")
    result = run(src, tmp_path / "out", shard_size=100)
    assert (result.written, result.skipped) == (6, 0)
    data = shards(tmp_path / "out")
    assert data.order_note() is None  # blocks follow the shards, and these hold no class order to report
    assert data.classes == source.classes  # names from the manifest, not numbers
    in_batches = [len(set(data.labels[i : i + 64])) for i in range(0, len(data) - 63, 64)]
    source_batches = [len(set(source.labels[i : i + 64])) for i in range(0, len(source) - 63, 64)]
    # independent draws: 19.3 of 20
    assert max(source_batches) <= 4 and min(in_batches) >= 14, (source_batches, in_batches)
    per_shard = [len(set(data.labels[data.shard == k])) for k in range(6)]
    assert min(per_shard) >= 18, per_shard
    # Every image kept byte for byte, with its label.
    want = sorted((int(source.labels[i]), (src / source.keys[i]).read_bytes()) for i in range(len(source)))
    assert sorted((int(data.labels[i]), bytes(b)) for i, b in enumerate(data.encoded(np.arange(len(data))))) == want
    # The same command gives the same bytes; another seed another order.
    run(src, tmp_path / "again", shard_size=100)
    assert read_tree(tmp_path / "again") == read_tree(tmp_path / "out")
    run(src, tmp_path / "seed1", shard_size=100, seed=1)
    assert not np.array_equal(shards(tmp_path / "seed1").labels, data.labels)


def test_shards_much_smaller_than_a_class_hold_most_classes(tmp_path):
    """ImageNet's shape in small: many images per class (200), listed class by class, and shards of 50, a quarter of
    a class. Read in source order every shard would hold one class; prepared, each is a random sample of all ten."""
    src = class_folder(tmp_path / "src", classes=10, per_class=200)
    source = open_source(f"folder:{src}")
    # the order a sequential reader sees
    assert all(len(set(source.labels[k * 50 : (k + 1) * 50])) == 1 for k in range(40))
    run(src, tmp_path / "out", shard_size=50)
    data = shards(tmp_path / "out")
    assert data.order_note() is None
    per_shard = [np.bincount(data.labels[data.shard == k], minlength=10) for k in range(40)]
    # 50 independent draws from 10 equal classes: 9.9 classes on average, the commonest about 9 of the 50.
    assert min(int((c > 0).sum()) for c in per_shard) >= 7, per_shard
    assert max(int(c.max()) for c in per_shard) <= 18, per_shard


def test_images_are_kept_or_reencoded_within_max_side(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    files = {
        "big.jpg": image_bytes(1, (48, 64)),  # longer side 64 > 32: re-encoded to 32 x 24
        "tall.png": image_bytes(2, (40, 20), "PNG"),  # 40 > 32: re-encoded as JPEG, 32 x 16
        "small.jpg": image_bytes(3, (16, 20)),  # within: kept byte for byte
        "tiny.png": image_bytes(4, (32, 8), "PNG"),  # exactly the max side: kept
        "odd.bmp": image_bytes(5, (10, 10), "BMP"),  # within, but not a format wds: reads: the same pixels as PNG
    }
    for name, data in files.items():
        (src / "a" / name).write_bytes(data)
    run(src, tmp_path / "out", max_side=32, quality=80)
    data = shards(tmp_path / "out")
    # "train-000000.tar/00000003-a_big" -> "a_big"
    by_source = {key.rsplit("-", 1)[1]: i for i, key in enumerate(data.keys)}
    got = {
        name: (
            data.ext[by_source[f"a_{name.split('.')[0]}"]],
            bytes(data.encoded([by_source[f"a_{name.split('.')[0]}"]])[0]),
        )
        for name in files
    }
    assert got["small.jpg"] == ("jpg", files["small.jpg"]) and got["tiny.png"] == ("png", files["tiny.png"])
    for name, size in (("big.jpg", (32, 24)), ("tall.png", (16, 32))):
        ext, blob = got[name]
        with Image.open(io.BytesIO(blob)) as im:
            assert (ext, im.format, im.size) == ("jpg", "JPEG", size)
    ext, blob = got["odd.bmp"]
    assert ext == "png" and np.array_equal(
        np.asarray(Image.open(io.BytesIO(blob))), np.asarray(Image.open(io.BytesIO(files["odd.bmp"])).convert("RGB"))
    )


def test_the_manifest_describes_every_shard(tmp_path):
    src = class_folder(tmp_path / "src", classes=3, per_class=10)
    manifest = run(src, tmp_path / "out", shard_size=8, max_side=64).manifest
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    assert {
        k: manifest[k]
        for k in ("source", "seed", "shard_size", "max_side", "quality", "num_samples", "num_shards", "pattern")
    } == {
        "source": f"folder:{src}",
        "seed": 0,
        "shard_size": 8,
        "max_side": 64,
        "quality": 90,
        "num_samples": 30,
        "num_shards": 4,
        "pattern": "train-{000000..000003}.tar",
    }
    assert manifest["classes"] == ["n000", "n001", "n002"]
    assert [s["samples"] for s in manifest["shards"]] == [8, 8, 8, 6]
    for s in manifest["shards"]:
        blob = (tmp_path / "out" / s["name"]).read_bytes()
        assert (len(blob), hashlib.sha256(blob).hexdigest()) == (s["bytes"], s["sha256"])


def test_class_names_come_only_from_a_manifest_that_lists_the_shards(tmp_path):
    src = class_folder(tmp_path / "src", classes=3, per_class=4)
    out = tmp_path / "out"
    run(src, out, shard_size=6)
    assert shards(out).classes == ["n000", "n001", "n002"]
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "shards": manifest["shards"][:1]}))  # about other shards
    assert shards(out).classes == ["0", "1", "2"]
    (out / "manifest.json").write_text(json.dumps({**manifest, "classes": ["only", "two"]}))  # fewer names than labels
    assert shards(out).classes == ["0", "1", "2"]
    (out / "manifest.json").unlink()
    assert WdsDataset(f"{out}/train-{{000000..000001}}.tar").classes == ["0", "1", "2"]


def test_a_rerun_trusts_a_shard_only_with_its_record_and_recorded_size(tmp_path):
    src = class_folder(tmp_path / "src", classes=2, per_class=10)
    out = tmp_path / "out"
    run(src, out, shard_size=5)
    data = open_source(f"folder:{src}")
    job = PrepareJob(f"folder:{src}", str(out), PrepareSettings(shard_size=5), data.fingerprint())
    plan, identity = ShardPlan.of(len(data), job.settings), job.identity(len(data))
    assert sorted(finished_shards(Location(out), plan, identity)) == [0, 1, 2, 3]
    (out / ".prepare" / "shard-000000.json").unlink()  # killed between the rename and the record
    with open(out / "train-000001.tar", "ab") as f:  # changed after it was recorded
        f.write(b"\0" * 512)
    (out / ".prepare" / "shard-000002.json").write_text("{")  # a damaged record
    (out / ".prepare" / "shard-000003.json").write_text("[1, 2]")  # a record of another type: made again, no traceback
    assert sorted(finished_shards(Location(out), plan, identity)) == []
    other = PrepareJob(job.source, job.out, PrepareSettings(shard_size=5, quality=50), job.fingerprint).identity(
        len(data)
    )
    assert finished_shards(Location(out), plan, other) == {}  # records of other settings count for nothing


def test_only_image_files_can_be_prepared(tmp_path):
    with pytest.raises(UserError, match="use --data folder:PATH or wds:PATTERN, not digits"):
        open_source("digits")
    assert ShardPlan.of(10, PrepareSettings(shard_size=4)).pattern == "train-{000000..000002}.tar"


def test_a_second_run_into_an_output_being_prepared_is_one_line_and_writes_nothing(tmp_path):
    """While one run writes an output (it holds the output's lock), a second one of the same command is refused before
    it touches a shard: it would otherwise remove the first one's temporary shard files as a killed run's."""
    from storage.lock import WriterLock

    src, out = class_folder(tmp_path / "src"), tmp_path / "out"
    data = open_source(f"folder:{src}")
    job = PrepareJob(f"folder:{src}", str(out), PrepareSettings(shard_size=100), data.fingerprint())
    prep.claim_output(Location(str(out)), job.identity(len(data)), job.source)  # as the first run did, before its lock
    with WriterLock(Location(str(out / prep.RECORDS / prep.LOCK)), "the first run"):
        before = read_tree(out)
        with pytest.raises(UserError, match=r"is being prepared by process \d+ on .*: wait for it to finish"):
            prepare(job, data)
        assert read_tree(out) == before
    assert run(src, out, shard_size=100).written == 6  # the lock released: the same command makes every shard


def test_a_samples_key_says_its_class_once():
    # ImageNet's files repeat their class folder's name: n01440764/n01440764_10026.JPEG.
    assert sample_key(3, "n01440764/n01440764_10026.JPEG") == "00000003-n01440764_10026"
    assert sample_key(4, "cat/1.jpg") == "00000004-cat_1"  # a file name alone would not say the class
    assert sample_key(5, "train-000001/k7") == "00000005-train-000001_k7"  # a shard's sample: shard and key

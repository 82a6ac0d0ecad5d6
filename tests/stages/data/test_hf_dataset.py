"""Hugging Face datasets as the input dataset (``hfds:``): the hub's parquet layout and save_to_disk's Arrow files.

The datasets are written here with pyarrow the way the ``datasets`` package writes them (an Image feature's
``{bytes, path}`` structs, the features in the schema metadata and dataset_info.json); where ``datasets`` is
installed, one made by it is read as well.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from stages.data.datasets import open_dataset, validation_data
from stages.data.hf_dataset import HfDataset
from storage import Store, UserError

CLASSES = ["cat", "dog", "eel"]
PER_CLASS = 5
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image feature in Arrow

pytestmark = pytest.mark.usefixtures("index_cache")  # image sizes are cached there: never the user's cache


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    h, w = 20 + seed % 7, 24 + seed % 5
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def decoded(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


def rows(split: str = "train", per_class: int = PER_CLASS, seed: int = 0) -> list[dict]:
    """Class-ordered rows, as ImageNet's class folders give them: an Image struct and a class number each."""
    out = []
    for c in range(len(CLASSES)):
        for i in range(per_class):
            k = seed + c * per_class + i
            out.append({"image": {"bytes": jpeg(k), "path": f"{CLASSES[c]}_{split}_{k}.jpg"}, "label": c})
    return out


def features(names: bool = True, image: str = "image", label: str = "label") -> dict:
    kind = {"names": CLASSES, "_type": "ClassLabel"} if names else {"dtype": "int64", "_type": "Value"}
    return {image: {"decode": True, "_type": "Image"}, label: kind}


def table(part: list[dict], names: bool = True, image: str = "image", label: str = "label") -> pa.Table:
    schema = pa.schema([(image, IMAGE), (label, pa.int64())]).with_metadata(
        {"huggingface": json.dumps({"info": {"features": features(names, image, label)}})}
    )
    return pa.table({image: [r["image"] for r in part], label: [r["label"] for r in part]}, schema=schema)


def hub_parquet(root: Path, splits=("train", "validation"), files: int = 2, **kw) -> Path:
    """The hub's layout: data/SPLIT-0000K-of-0000N.parquet, in row groups of 4 (datasets writes 100)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split in splits:
        data = rows(split, PER_CLASS if split == "train" else 2, seed=0 if split == "train" else 100)
        bounds = np.linspace(0, len(data), files + 1).astype(int)
        for k in range(files):
            pq.write_table(
                table(data[bounds[k] : bounds[k + 1]], **kw),
                root / "data" / f"{split}-{k:05d}-of-{files:05d}.parquet",
                row_group_size=4,
            )
    return root


def save_to_disk(folder: Path, data: list[dict], split: str | None = "train") -> Path:
    """What Dataset.save_to_disk writes: an Arrow stream, state.json listing it, dataset_info.json with the features."""
    folder.mkdir(parents=True, exist_ok=True)
    t = table(data)
    with (
        pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, t.schema) as writer,
    ):
        writer.write_table(t, max_chunksize=4)
    (folder / "state.json").write_text(
        json.dumps(
            {
                "_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                "_fingerprint": "x",
                "_format_columns": None,
                "_format_kwargs": {},
                "_format_type": None,
                "_split": split,
            }
        )
    )
    (folder / "dataset_info.json").write_text(json.dumps({"description": "", "features": features()}))
    return folder


def one_line(error) -> str:
    assert "\n" not in str(error.value)
    return str(error.value)


# -- the parquet layout ------------------------------------------------------------------------------


def test_parquet_rows_keys_labels_classes_and_sizes(tmp_path, monkeypatch):
    root = hub_parquet(tmp_path / "in")
    data = open_dataset(f"hfds:{root}")
    want = rows()
    assert isinstance(data, HfDataset) and data.source == f"hfds:{root}" and len(data) == 15 and data.split == "train"
    assert data.classes == CLASSES  # the ClassLabel names of the schema metadata
    np.testing.assert_array_equal(data.labels, np.repeat(np.arange(3), PER_CLASS))
    assert data.keys == [f"train/{i:08d}/{r['image']['path']}" for i, r in enumerate(want)]
    sizes = [Image.open(io.BytesIO(r["image"]["bytes"])).size[::-1] for r in want]
    np.testing.assert_array_equal(data.sizes(), sizes)
    assert data.sequential  # parquet row groups are read whole: blocks follow the rows
    monkeypatch.setattr(HfDataset, "_header", lambda self, i: pytest.fail("an image header read again"))
    np.testing.assert_array_equal(open_dataset(f"hfds:{root}").sizes(), sizes)  # cached for these files


def test_images_are_pillows_decode_of_the_bytes_read_in_any_order(tmp_path):
    data = open_dataset(f"hfds:{hub_parquet(tmp_path / 'in')}")
    want = rows()
    for i in np.random.default_rng(0).permutation(len(data)):
        assert torch.equal(data.image(int(i)), decoded(want[i]["image"]["bytes"]))
    ids = np.array([9, 0, 14, 3, 3])
    assert list(data.encoded(ids)) == [want[i]["image"]["bytes"] for i in ids]
    again = pickle.loads(pickle.dumps(data))  # what a loader worker gets: files opened again there
    assert torch.equal(again.image(7), decoded(want[7]["image"]["bytes"]))


def test_the_fingerprint_is_stable_and_changes_with_a_label(tmp_path):
    root = hub_parquet(tmp_path / "in")
    first = open_dataset(f"hfds:{root}").fingerprint()
    assert HfDataset(str(root)).fingerprint() == first
    assert open_dataset(f"hfds:{root}?split=validation").fingerprint() != first
    part = rows()[:7]
    part[2]["label"] = 1
    pq.write_table(table(part), root / "data" / "train-00000-of-00002.parquet", row_group_size=4)
    assert open_dataset(f"hfds:{root}").fingerprint() != first


def test_options_choose_the_split_and_columns(tmp_path):
    root = hub_parquet(tmp_path / "in")
    val = open_dataset(f"hfds:{root}?split=validation")
    assert (
        len(val) == 6
        and val.split == "validation"
        and val.keys[0].startswith("validation/")
        and val.source == f"hfds:{root}?split=validation"
    )
    # defaults are left out
    assert open_dataset(f"hfds:{root}?split=train&image=image&label=label").source == f"hfds:{root}"
    other = hub_parquet(tmp_path / "renamed", splits=("train",), image="img", label="fine_label")
    data = open_dataset(f"hfds:{other}?image=img&label=fine_label")
    assert len(data) == 15 and data.classes == CLASSES and data.source == f"hfds:{other}?image=img&label=fine_label"
    assert torch.equal(data.image(4), decoded(rows()[4]["image"]["bytes"]))
    with pytest.raises(UserError) as e:
        open_dataset(f"hfds:{other}")
    assert (
        f"hfds:{other}: no column 'image' in split train (its columns: img, fine_label): pass ?image=COLUMN"
        == one_line(e)
    )
    with pytest.raises(UserError, match=r"no column 'lbl' .*: pass \?label=COLUMN") as e:
        open_dataset(f"hfds:{other}?image=img&label=lbl")
    one_line(e)
    with pytest.raises(UserError, match=r"column 'fine_label' holds int64, not images .*: pass \?image=COLUMN"):
        open_dataset(f"hfds:{other}?image=fine_label&label=fine_label")
    with pytest.raises(UserError, match=r"unknown option colour \(known: split, image, label\)"):
        open_dataset(f"hfds:{root}?colour=red")
    with pytest.raises(
        UserError, match=r"has no split 'test' \(its splits: train, validation\): pass --data hfds:.*\?split=NAME"
    ):
        open_dataset(f"hfds:{root}?split=test")
    with pytest.raises(UserError, match="nowhere is no folder: pass a local folder written by save_to_disk"):
        open_dataset(f"hfds:{tmp_path / 'nowhere'}")


def test_class_numbers_without_names_and_unlabelled_rows(tmp_path):
    data = open_dataset(f"hfds:{hub_parquet(tmp_path / 'plain', splits=('train',), names=False)}")
    assert data.classes == ["0", "1", "2"]
    part = rows()
    part[3]["label"] = -1  # datasets' mark of a row without a label (ImageNet's test split)
    (tmp_path / "test" / "data").mkdir(parents=True)
    pq.write_table(table(part), tmp_path / "test" / "data" / "test-00000-of-00001.parquet")
    with pytest.raises(UserError, match="row 3 of split test has no class") as e:
        open_dataset(f"hfds:{tmp_path / 'test'}")
    one_line(e)


# -- save_to_disk's Arrow files -------------------------------------------------------------------------


def test_save_to_disk_folders_read_in_place_like_parquet(tmp_path):
    parquet = open_dataset(f"hfds:{hub_parquet(tmp_path / 'in')}")
    saved = open_dataset(f"hfds:{save_to_disk(tmp_path / 'saved', rows())}")
    assert (saved.keys, saved.classes) == (
        parquet.keys,
        parquet.classes,
    ) and saved.fingerprint() == parquet.fingerprint()
    np.testing.assert_array_equal(saved.sizes(), parquet.sizes())
    assert not saved.sequential and saved.encoded([0, 1]) is None  # memory-mapped: each row read in place, by id
    for i in (14, 0, 6):
        assert torch.equal(saved.image(i), parquet.image(i))
    assert torch.equal(pickle.loads(pickle.dumps(saved)).image(5), parquet.image(5))

    # A DatasetDict: a folder per split, listed in dataset_dict.json; validation by default for validation data.
    both = tmp_path / "dict"
    save_to_disk(both / "train", rows())
    save_to_disk(both / "validation", rows("validation", 2, seed=100), split="validation")
    (both / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    assert open_dataset(f"hfds:{both}").fingerprint() == parquet.fingerprint()
    assert (
        open_dataset(f"hfds:{both}", "val").fingerprint()
        == open_dataset(f"hfds:{tmp_path / 'in'}?split=validation").fingerprint()
    )


def test_an_image_kept_as_a_path_is_read_from_its_file(tmp_path):
    data = rows()
    (tmp_path / "files").mkdir()
    path = tmp_path / "files" / "cat_0.jpg"
    path.write_bytes(data[0]["image"]["bytes"])
    data[0]["image"] = {"bytes": None, "path": str(path)}
    saved = open_dataset(f"hfds:{save_to_disk(tmp_path / 'saved', data)}")
    assert torch.equal(saved.image(0), decoded(path.read_bytes())) and saved.keys[0] == f"train/00000000/{path}"
    path.unlink()
    with pytest.raises(UserError, match=r"row train/00000000/.*cat_0.jpg: cannot read its image file"):
        saved.image(0)


# -- validation data --------------------------------------------------------------------------------------


def test_validation_data_is_the_datasets_own_validation_split_unless_val_data_names_other(tmp_path):
    root = hub_parquet(tmp_path / "in")
    train = open_dataset(f"hfds:{root}?split=train")
    val = validation_data(train, None)
    assert val.split == "validation" and len(val) == 6 and val.classes == CLASSES
    assert validation_data(train, f"hfds:{root}?split=train").split == "train"  # --val-data wins
    # a bare path: hfds
    assert (
        validation_data(train, str(save_to_disk(tmp_path / "saved", rows("v", 1)))).source
        == f"hfds:{tmp_path / 'saved'}"
    )
    only = hub_parquet(tmp_path / "one", splits=("train",))
    with pytest.raises(
        UserError, match=r"hfds:.*one has no validation split apart from its training data: pass --val-data"
    ) as e:
        validation_data(open_dataset(f"hfds:{only}"), None)
    one_line(e)
    folder = tmp_path / "folder"
    for c in ("cat", "dog", "fox"):
        (folder / c).mkdir(parents=True)
        (folder / c / "0.jpg").write_bytes(jpeg(1))
    with pytest.raises(UserError, match=r"1 of its 3 classes missing \(eel\); 1 not among them \(fox\)"):
        validation_data(train, f"folder:{folder}")


# -- hub names and the datasets package -------------------------------------------------------------------------


def test_a_hub_name_without_the_datasets_package_is_one_line(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as if not installed
    with pytest.raises(
        UserError, match=r"hfds:ILSVRC/imagenet-1k: there is no folder ILSVRC/imagenet-1k, .*pip install datasets"
    ) as e:
        open_dataset("hfds:ILSVRC/imagenet-1k")
    one_line(e)


def test_what_the_datasets_package_writes_is_read(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    want = rows()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    made = datasets.Dataset.from_dict(
        {"image": [r["image"] for r in want], "label": [r["label"] for r in want]}, features=features
    )
    made.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "pq" / "data").mkdir(parents=True)
    made.to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    for source in (f"hfds:{tmp_path / 'saved'}", f"hfds:{tmp_path / 'pq'}"):
        data = open_dataset(source)
        assert data.classes == CLASSES and len(data) == 15
        np.testing.assert_array_equal(data.labels, [r["label"] for r in want])
        assert torch.equal(data.image(11), decoded(want[11]["image"]["bytes"]))
    # A hub name: load_dataset's DatasetDict, read from its Arrow files (here one loaded from disk: the hub's cache is Arrow files too).
    datasets.DatasetDict({"train": made, "validation": made.select([0, 5, 10])}).save_to_disk(str(tmp_path / "dict"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", lambda name: datasets.load_from_disk(str(tmp_path / "dict")))
    hub = open_dataset("hfds:someone/tiny-images")
    assert hub.source == "hfds:someone/tiny-images" and hub.classes == CLASSES and len(hub) == 15
    val = validation_data(hub, None)
    assert val.source == "hfds:someone/tiny-images?split=validation" and list(val.labels) == [0, 1, 2]
    assert torch.equal(val.image(1), decoded(want[5]["image"]["bytes"]))


# -- end to end ----------------------------------------------------------------------------------------


def test_extract_verify_and_distill_read_an_hf_dataset(tmp_path, monkeypatch):
    root = hub_parquet(tmp_path / "in")
    store, out = tmp_path / "store", tmp_path / "distilled"
    by_id = []
    image = HfDataset.image
    monkeypatch.setattr(HfDataset, "image", lambda self, i: by_id.append(i) or image(self, i))
    argv = [
        "--quiet",
        "extract",
        "--data",
        f"hfds:{root}",
        "--teacher",
        "resnet18",
        "--random-init",
        "--size",
        "32",
        "--views",
        "1",
        "--store",
        str(store),
    ]
    assert main(argv) == 0
    assert by_id == []  # parquet: every image came with its unit, its row groups read once
    record = Store(str(store)).record.dataset
    assert record.source == f"hfds:{root}" and record.num_samples == 15 and list(record.classes) == CLASSES
    assert record.fingerprint == open_dataset(f"hfds:{root}").fingerprint() and Store(str(store)).teacher_ids()
    assert main(["--quiet", "verify", str(store), "--replay", "1"]) == 0
    # The store's own source, validated on the dataset's validation split (no --val-data).
    student = [
        "--student",
        "resnet10t",
        "--student-arg",
        "channels=[8,16,32,64]",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--seed",
        "1",
    ]
    assert main(["--quiet", "distill", "--from-cache", str(store), *student, "--out", str(out)]) == 0
    assert "val_top1" in (out / "metrics.jsonl").read_text()

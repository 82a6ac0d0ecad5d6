"""Datasets: stable ids, fixed splits, fingerprints, and clear errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from stages.data import datasets
from stages.data.datasets import list_datasets, open_dataset, register_dataset, validation_data
from stages.data.folder_dataset import FolderDataset
from stages.data.toy_datasets import DigitsDataset, FakeDataset
from storage import UserError
from storage.registry import Registry

# -- digits ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return open_dataset("digits"), open_dataset("digits", "val")


def test_digits_split_sizes_are_fixed(digits):
    train, val = digits
    assert (len(train), len(val)) == (1433, 364)
    assert train.num_classes == val.num_classes == 10


def test_digits_split_is_disjoint_and_covers_everything(digits):
    train, val = digits
    assert not set(train.keys) & set(val.keys)
    assert len(set(train.keys) | set(val.keys)) == 1797


def test_digits_split_is_stratified(digits):
    train, val = digits
    n_train, n_val = np.bincount(train.labels, minlength=10), np.bincount(val.labels, minlength=10)
    assert (n_train > 0).all() and (n_val > 0).all()
    # Every class sends one in five of its samples (rounded up) to validation.
    np.testing.assert_array_equal(n_val, -(-(n_train + n_val) // 5))


def test_digits_images(digits):
    train, _ = digits
    image = train.image(0)
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert image.max() > image.min()  # a digit, not a blank
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])  # grey as RGB
    np.testing.assert_array_equal(train.sizes(), np.full((1433, 2), 32))


def test_digits_fingerprints_differ_between_splits_and_are_stable(digits):
    train, val = digits
    assert train.fingerprint() != val.fingerprint()
    assert DigitsDataset("train").fingerprint() == train.fingerprint()
    assert DigitsDataset("val").fingerprint() == val.fingerprint()
    assert train.describe()["fingerprint"] == train.fingerprint()


# -- fake ------------------------------------------------------------------------------------


def test_fake_images_are_a_function_of_the_id():
    a, b = open_dataset("fake:20?size=16"), open_dataset("fake:20?size=16")
    assert a.fingerprint() == b.fingerprint()
    for i in range(20):
        assert a.image(i).shape == (3, 16, 16) and a.image(i).dtype == torch.uint8
        assert torch.equal(a.image(i), b.image(i))
    assert not torch.equal(a.image(0), a.image(10))  # same class, other sample
    np.testing.assert_array_equal(a.labels, np.arange(20) % 10)


def test_fake_options_and_val_split():
    ds = open_dataset("fake:30?size=24&classes=3")
    assert ds.num_classes == 3 and len(ds) == 30 and ds.image(0).shape == (3, 24, 24)
    np.testing.assert_array_equal(ds.sizes(), np.full((30, 2), 24))
    val = open_dataset("fake:30?size=24&classes=3", "val")
    assert len(val) == 6
    assert val.fingerprint() != ds.fingerprint()
    assert not torch.equal(val.image(0), ds.image(0))


@pytest.mark.parametrize("source", ["fake:abc", "fake:10?colour=3", "nosuch", "digits:x", "folder:"])
def test_bad_dataset_names_raise_user_error(source):
    with pytest.raises(UserError):
        open_dataset(source)


# -- folder ----------------------------------------------------------------------------------


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def image_folder(tmp_path):
    """Two classes (written out of order), RGB and greyscale PNGs of different sizes, one stray text file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "train"
    pixels = {
        "zebra/b.png": rng.integers(0, 256, (10, 14, 3), dtype=np.uint8),
        "zebra/a.png": rng.integers(0, 256, (12, 8, 3), dtype=np.uint8),
        "apple/x.png": rng.integers(0, 256, (9, 9), dtype=np.uint8),  # greyscale
        "apple/sub/y.png": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
    }
    for name, array in pixels.items():
        _write_png(root / name, array)
    (root / "zebra" / "notes.txt").write_text("not an image")
    return root, pixels


def test_folder_classes_labels_and_sizes(image_folder):
    root, pixels = image_folder
    ds = open_dataset(f"folder:{root}")
    assert ds.classes == ["apple", "zebra"]
    assert ds.keys == ["apple/sub/y.png", "apple/x.png", "zebra/a.png", "zebra/b.png"]
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1])
    np.testing.assert_array_equal(ds.sizes(), [[5, 7], [9, 9], [12, 8], [10, 14]])
    for i, key in enumerate(ds.keys):
        expected = pixels[key]
        if expected.ndim == 2:
            expected = np.repeat(expected[..., None], 3, axis=2)
        image = ds.image(i)
        assert image.dtype == torch.uint8
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected)  # PNG is lossless
    assert ds.fingerprint() == FolderDataset(str(root)).fingerprint()


def test_folder_images_are_pillows_rgb_whatever_their_mode(tmp_path):
    # RGB images skip Pillow's convert (a copy); the others must still come out as convert("RGB") gives them.
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    files = {
        "a/rgb.jpg": rgb,
        "a/cmyk.jpg": rgb.convert("CMYK"),
        "b/palette.png": rgb.quantize(16),
        "b/grey.jpg": rgb.convert("L"),
    }
    for name, image in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        image.save(tmp_path / name)
    ds = open_dataset(f"folder:{tmp_path}")
    for i, key in enumerate(ds.keys):
        with Image.open(tmp_path / key) as im:
            expected = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(ds.image(i).permute(1, 2, 0).numpy(), expected, err_msg=key)


def test_folder_unreadable_image_raises_user_error_naming_the_file(image_folder):
    root, _ = image_folder
    bad = root / "zebra" / "c.png"
    bad.write_bytes(b"\x00garbage, not a png" * 10)
    ds = open_dataset(f"folder:{root}")
    with pytest.raises(UserError, match="c.png"):
        ds.sizes()
    with pytest.raises(UserError, match="c.png"):
        ds.image(ds.keys.index("zebra/c.png"))


def test_folder_truncated_image_raises_user_error_naming_the_file(image_folder):
    root, _ = image_folder
    good = (root / "zebra" / "b.png").read_bytes()
    (root / "zebra" / "t.png").write_bytes(good[: len(good) // 2])  # header fine, data cut short
    ds = open_dataset(f"folder:{root}")
    with pytest.raises(UserError, match="t.png"):
        ds.image(ds.keys.index("zebra/t.png"))


def test_folder_errors(tmp_path, image_folder):
    root, _ = image_folder
    with pytest.raises(UserError, match="does not exist"):
        open_dataset(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        open_dataset(f"folder:{tmp_path / 'empty'}")
    val = tmp_path / "val"
    _write_png(val / "apple" / "v.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(UserError, match="1 of its 2 classes missing \\(zebra\\)"):
        validation_data(f"folder:{root}", f"folder:{val}")
    _write_png(val / "zebra" / "v.png", np.zeros((4, 4, 3), np.uint8))
    assert validation_data(f"folder:{root}", f"folder:{val}").classes == ["apple", "zebra"]


def test_a_fake_datasets_recorded_source_reopens_the_same_images():
    data = open_dataset("fake:40?size=16&classes=4")
    again = open_dataset(data.source)  # what a store records, and distill reopens without --data
    assert again.fingerprint() == data.fingerprint() and again.size == 16 and len(again.classes) == 4


# -- the registry of sources -----------------------------------------------------------------


@pytest.mark.parametrize("source", ["nosuch", "nosuch:x", "digit"])
def test_an_unknown_kind_names_the_known_kinds(source):
    with pytest.raises(UserError, match="known kinds are digits, fake:N, folder:PATH") as e:
        open_dataset(source)
    assert all(usage in str(e.value) for usage in list_datasets()) and "--data" in str(e.value)
    if source == "digit":
        assert "did you mean digits" in str(e.value)


@pytest.mark.parametrize(
    "source, match", [("folder:", "needs an argument: use folder:PATH"), ("digits:x", "takes no argument: use digits")]
)
def test_a_kinds_argument_is_checked(source, match):
    with pytest.raises(UserError, match=match):
        open_dataset(source)


def test_a_new_source_is_one_registration(monkeypatch):
    fresh = Registry("data source")
    fresh.update(datasets._DATASETS)
    monkeypatch.setattr(datasets, "_DATASETS", fresh)  # leave the real registry as it was
    seen = []

    @register_dataset("tiny", usage="tiny:N")
    def _open_tiny(argument, split):
        seen.append((argument, split))
        data = FakeDataset(int(argument), size=8, split=split)
        data.source = f"tiny:{argument}"
        return data

    assert "tiny:N" in list_datasets()
    data = open_dataset("tiny:12")
    assert len(data) == 12 and data.image(0).shape == (3, 8, 8)
    val = validation_data("tiny:12", None)  # a kind has its own validation split unless it says otherwise
    assert val is not None and val.split == "val"
    # the training data (for its classes), then its validation split
    assert seen == [("12", "train"), ("12", "train"), ("12", "val")]
    with pytest.raises(UserError, match="needs an argument: use tiny:N"):
        open_dataset("tiny")


def test_validation_data_for_each_kind(image_folder, caplog):
    root, _ = image_folder
    val = validation_data("digits", None)
    assert len(val) == 364 and val.fingerprint() == DigitsDataset("val").fingerprint()
    assert len(validation_data("fake:30?size=24&classes=3", None)) == 6
    assert validation_data(f"folder:{root}", None) is None  # a folder has no validation split of its own
    assert "--val-data folder:PATH" in caplog.text
    assert validation_data(f"folder:{root}", f"folder:{root}").keys == open_dataset(f"folder:{root}").keys


def _jpegs(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6), (len(name) * 20 % 256, 0, 0)).save(path)


def test_a_parent_of_split_folders_is_refused_not_read_as_classes_named_train_and_val(tmp_path):
    # folder:PARENT of PARENT/train/<class>/ would read as classes "train" and "val": every image of a split one label.
    _jpegs(
        tmp_path,
        [f"{split}/{c}/{i}.jpg" for split in ("train", "val") for c in ("cat", "dog", "eel") for i in range(2)],
    )
    with pytest.raises(
        UserError,
        match=r"reads as 2 class\(es\) \(train, val\) whose images all sit in 3 sub-folders \(cat, dog, eel, \.\.\.\).*folder:.*/train",
    ):
        FolderDataset(str(tmp_path))
    assert FolderDataset(str(tmp_path / "train")).classes == ["cat", "dog", "eel"]


def test_a_folder_holding_one_split_is_refused_and_a_flat_single_class_folder_is_not(tmp_path):
    _jpegs(tmp_path / "a", [f"train/{c}/{i}.jpg" for c in ("cat", "dog") for i in range(2)])
    with pytest.raises(UserError, match=r"reads as 1 class\(es\) \(train\) whose images all sit in 2 sub-folders"):
        FolderDataset(str(tmp_path / "a"))
    _jpegs(tmp_path / "b", [f"cat/{i}.jpg" for i in range(2)])  # one class, as a folder to prepare or inspect may be
    assert FolderDataset(str(tmp_path / "b")).classes == ["cat"]


def test_class_folders_with_one_nested_folder_each_still_read_as_classes(tmp_path):
    # Some datasets keep each class's images one level down (cat/images/1.jpg): that is still one class per folder.
    _jpegs(tmp_path, [f"{c}/images/{i}.jpg" for c in ("cat", "dog", "eel") for i in range(2)])
    data = FolderDataset(str(tmp_path))
    assert data.classes == ["cat", "dog", "eel"] and list(data.labels) == [0, 0, 1, 1, 2, 2]


# -- validation data of any kind -----------------------------------------------------------------


def _class_folder(root, classes, per_class=4, seed=0):
    """A class-ordered folder of real JPEGs (as ImageNet's is), of a few sizes."""
    rng = np.random.default_rng(seed)
    for c in classes:
        for i in range(per_class):
            path = root / c / f"{c}_{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (12 + i, 16, 3), dtype=np.uint8)).save(path, quality=90)
    return root


def _prepare(folder, out, capsys, *flags):
    """``folder`` written as shards by `pipeline prepare`: the wds source of its manifest, and the hint it printed."""
    assert (
        main(["--quiet", "prepare", "--data", f"folder:{folder}", "--out", str(out), "--shard-size", "5", *flags]) == 0
    )
    return f"wds:{out}/{json.loads((out / 'manifest.json').read_text())['pattern']}", capsys.readouterr().out


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


@pytest.mark.usefixtures("index_cache")
def test_shards_and_a_folder_validate_each_other_with_the_same_class_names(tmp_path, capsys):
    train = _class_folder(tmp_path / "train", ["cat", "dog", "eel"])
    val = _class_folder(tmp_path / "val", ["cat", "dog", "eel"], per_class=2, seed=1)
    shards, hint = _prepare(train, tmp_path / "shards", capsys)
    assert f"read them with --data {shards}" in hint
    val_shards, hint = _prepare(val, tmp_path / "val-shards", capsys, "--prefix", "val")
    assert f"read them with --val-data {val_shards}" in hint  # validation images: the hint names the flag they go to

    on_shards = open_dataset(shards)
    assert on_shards.classes == ["cat", "dog", "eel"]  # from the manifest
    from_folder = validation_data(on_shards, f"folder:{val}")  # --data wds:... --val-data folder:...
    assert from_folder.source == f"folder:{val}" and len(from_folder) == 6 and from_folder.classes == on_shards.classes
    on_folder = open_dataset(f"folder:{train}")
    from_shards = validation_data(on_folder, val_shards)  # and the reverse
    assert from_shards.source == val_shards and len(from_shards) == 6 and from_shards.classes == on_folder.classes
    # A label means the same class in both: each image's label names the class folder it came from.
    assert [from_folder.classes[c] for c in from_folder.labels] == [k.split("/")[0] for k in from_folder.keys]
    # val-000000.tar/00000003-dog_1
    shard_classes = [k.split("/", 1)[1].split("-", 1)[1].rsplit("_", 1)[0] for k in from_shards.keys]
    assert [from_shards.classes[c] for c in from_shards.labels] == shard_classes
    assert validation_data(on_folder, str(val)).source == f"folder:{val}"  # a bare path: the training data's kind


@pytest.mark.usefixtures("index_cache")
def test_validation_data_with_other_classes_is_one_line_saying_what_differs(tmp_path, capsys):
    shards, _ = _prepare(_class_folder(tmp_path / "train", ["cat", "dog", "eel"]), tmp_path / "shards", capsys)
    on_shards = open_dataset(shards)
    other = _class_folder(tmp_path / "other", ["cat", "dog", "fox"], per_class=1)
    with pytest.raises(UserError) as e:
        validation_data(on_shards, f"folder:{other}")
    assert "1 of its 3 classes missing (eel); 1 not among them (fox)" in _one_line(e) and shards in str(e.value)
    fewer, _ = _prepare(_class_folder(tmp_path / "two", ["cat", "dog"], per_class=3), tmp_path / "two-shards", capsys)
    with pytest.raises(UserError, match=r"1 of its 3 classes missing \(eel\)") as e:
        validation_data(open_dataset(f"folder:{tmp_path / 'train'}"), fewer)
    _one_line(e)

    # Shards without a manifest name no classes: their labels are checked against the count of the training classes.
    raw = _raw_shards_of(tmp_path / "train", tmp_path, capsys)
    on_raw = open_dataset(raw)
    assert on_raw.classes == ["0", "1", "2"]
    assert validation_data(on_raw, f"folder:{tmp_path / 'train'}").classes == ["0", "1", "2"]
    # the training names
    assert validation_data(open_dataset(f"folder:{tmp_path / 'train'}"), raw).classes == ["cat", "dog", "eel"]
    four = _class_folder(tmp_path / "four", ["cat", "dog", "eel", "fox"], per_class=1)
    with pytest.raises(
        UserError, match=r"it has 4 classes \(cat, dog, eel, \.\.\. 1 more\), the training data 3 \(0, 1, 2\)"
    ) as e:
        validation_data(on_raw, f"folder:{four}")
    _one_line(e)
    with pytest.raises(UserError, match=r"it has 4 classes \(labels up to 3\), the training data 3 \(cat, dog, eel\)"):
        validation_data(open_dataset(f"folder:{tmp_path / 'train'}"), _raw_shards_of(four, tmp_path, capsys))


def _raw_shards_of(folder, tmp_path, capsys) -> str:
    """``folder`` prepared to shards, then without the manifest that names their classes: numbered classes."""
    source, _ = _prepare(folder, tmp_path / f"{folder.name}-shards", capsys)
    (tmp_path / f"{folder.name}-shards" / "manifest.json").unlink()
    return source


def test_val_data_names_its_own_kind_and_a_bare_path_is_the_training_kind(image_folder):
    root, _ = image_folder
    digits = open_dataset("digits")
    # any kind, even with a split of its own
    assert validation_data(digits, "fake:50?classes=10").source == "fake:50?size=32&classes=10"
    with pytest.raises(
        UserError, match="--val-data /some/path names no kind of source: write it as one of digits, fake:N"
    ):
        validation_data(digits, "/some/path")
    with pytest.raises(UserError, match="unknown dataset 'foldr:/x' \\(did you mean folder\\?\\)"):
        validation_data(f"folder:{root}", "foldr:/x")
    with pytest.raises(UserError, match=r"it has 10 classes \(labels up to 9\), the training data 2 \(apple, zebra\)"):
        validation_data(f"folder:{root}", "digits")

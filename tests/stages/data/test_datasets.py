"""Datasets: stable ids, fixed splits, fingerprints, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stages.data import datasets
from stages.data.datasets import DigitsDataset, FakeDataset, FolderDataset, list_datasets, open_dataset, register_dataset, validation_data
from storage import UserError

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
    files = {"a/rgb.jpg": rgb, "a/cmyk.jpg": rgb.convert("CMYK"), "b/palette.png": rgb.quantize(16), "b/grey.jpg": rgb.convert("L")}
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
    with pytest.raises(UserError, match="val"):
        open_dataset(f"folder:{root}", "val")
    val = tmp_path / "val"
    _write_png(val / "apple" / "v.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(UserError, match="same class"):
        open_dataset(f"folder:{root}", "val", val_source=f"folder:{val}")
    _write_png(val / "zebra" / "v.png", np.zeros((4, 4, 3), np.uint8))
    assert open_dataset(f"folder:{root}", "val", val_source=f"folder:{val}").classes == ["apple", "zebra"]


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


@pytest.mark.parametrize("source, match", [("folder:", "needs an argument: use folder:PATH"), ("digits:x", "takes no argument: use digits")])
def test_a_kinds_argument_is_checked(source, match):
    with pytest.raises(UserError, match=match):
        open_dataset(source)


def test_a_new_source_is_one_registration(monkeypatch):
    monkeypatch.setattr(datasets, "_DATASETS", dict(datasets._DATASETS))  # leave the real registry as it was
    seen = []

    @register_dataset("tiny", usage="tiny:N")
    def _open_tiny(argument, split, val_source):
        seen.append((argument, split, val_source))
        return FakeDataset(int(argument), size=8, split=split)

    assert "tiny:N" in list_datasets()
    data = open_dataset("tiny:12")
    assert len(data) == 12 and data.image(0).shape == (3, 8, 8)
    val = validation_data("tiny:12", None)  # a kind has its own validation split unless it says otherwise
    assert val is not None and val.split == "val"
    assert seen == [("12", "train", None), ("12", "val", None)]
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
    _jpegs(tmp_path, [f"{split}/{c}/{i}.jpg" for split in ("train", "val") for c in ("cat", "dog", "eel") for i in range(2)])
    with pytest.raises(UserError, match=r"reads as 2 class\(es\) \(train, val\) whose images all sit in 3 sub-folders \(cat, dog, eel, \.\.\.\).*folder:.*/train"):
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

"""Image shards as the input dataset (``wds:PATTERN``): ids, fingerprint, index cache, reading in one pass, bad input.

Shards are written here the way webdataset's writers write them (``KEY.jpg``
plus ``KEY.cls``); the end-to-end runs use them from a local directory and
from the S3 server (moto) the other object-store tests use.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from stages.data import wds_index
from stages.data.datasets import open_dataset
from stages.data.wds_dataset import WdsDataset
from storage import Store, UserError

from conftest import BUCKET, group_arrays

SHARDS, PER_SHARD, CLASSES = 4, 15, 5
TEACHER = [
    "--teacher",
    "resnet18",
    "--random-init",
    "--teacher-seed",
    "0",
    "--size",
    "32",
    "--logits",
    "full",
    "--dtype",
    "float32",
]
STUDENT = [
    "--student",
    "resnet10t",
    "--student-arg",
    "channels=[8,16,32,64]",
    "--epochs",
    "1",
    "--batch-size",
    "16",
    "--seed",
    "1",
]


pytestmark = pytest.mark.usefixtures("index_cache")  # never the user's own shard-index cache


def jpeg(seed: int, size=(40, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    h, w = size
    base = np.linspace(0, 255, w)[None, :, None] * rng.random(3)[None, None, :]
    pixels = np.clip(base + rng.integers(-40, 41, (h, w, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A tar of ``KEY.EXT`` members, samples in order (what webdataset's TarWriter writes)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))


def make_shards(
    root: Path, *, prefix="train", shards=SHARDS, per_shard=PER_SHARD, ordered=False, seed=0
) -> tuple[str, list]:
    """Shuffled class labels (or class order with ``ordered``); returns the brace pattern and the samples."""
    root.mkdir(parents=True, exist_ok=True)
    n = shards * per_shard
    labels = (
        np.sort(np.arange(n) % CLASSES) if ordered else np.random.default_rng(seed).permutation(np.arange(n) % CLASSES)
    )
    samples = []
    for i in range(n):
        size = (40, 48) if i % 3 else (36, 36)
        samples.append(
            (
                f"s{seed}_{i:05d}",
                {"jpg": jpeg(seed * 1000 + i, size), "cls": str(int(labels[i])).encode(), "json": b"{}"},
            )
        )
    for k in range(shards):
        write_shard(root / f"{prefix}-{k:04d}.tar", samples[k * per_shard : (k + 1) * per_shard])
    return f"{root}/{prefix}-{{0000..{shards - 1:04d}}}.tar", samples


def decoded(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


def run(*argv: str) -> int:
    return main(["--quiet", *argv])


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# -- the dataset -----------------------------------------------------------------------------


def test_ids_follow_shards_then_members(tmp_path):
    pattern, samples = make_shards(tmp_path / "shards")
    data = open_dataset(f"wds:{pattern}")
    assert isinstance(data, WdsDataset) and data.sequential and data.source == f"wds:{pattern}"
    assert len(data) == SHARDS * PER_SHARD and data.num_classes == CLASSES
    assert (
        data.keys[:2] == ["train-0000.tar/s0_00000", "train-0000.tar/s0_00001"]
        and data.keys[15] == "train-0001.tar/s0_00015"
    )
    np.testing.assert_array_equal(data.labels, [int(m["cls"]) for _, m in samples])
    assert data.sizes()[0].tolist() == [36, 36] and data.sizes()[1].tolist() == [40, 48]
    for i in (0, 14, 15, 59):
        assert torch.equal(data.image(i), decoded(samples[i][1]["jpg"]))
    got = data.encoded(np.array([17, 3, 40, 4]))
    assert [bytes(b) for b in got] == [samples[i][1]["jpg"] for i in (17, 3, 40, 4)]
    assert torch.equal(data.decode(17, got[0]), data.image(17))
    # A glob names the same shards in the same order: the same dataset.
    assert WdsDataset(str(tmp_path / "shards" / "train-*.tar")).fingerprint() == data.fingerprint()


def test_a_block_is_read_in_one_request_per_shard(tmp_path, monkeypatch):
    pattern, _ = make_shards(tmp_path / "shards")
    data = WdsDataset(pattern)
    reads = []
    read = WdsDataset._read
    monkeypatch.setattr(
        WdsDataset,
        "_read",
        lambda self, shard, start, end: reads.append((shard, start, end)) or read(self, shard, start, end),
    )
    data.encoded(np.arange(0, 32))  # samples 0..14, 15..29 and 30, 31: three shards
    assert [r[0] for r in reads] == [0, 1, 2]
    reads.clear()
    data.encoded(np.array([3, 50, 20]))  # far apart: one request each
    assert sorted(r[0] for r in reads) == [0, 1, 3]


def test_the_fingerprint_covers_shard_names_and_counts(tmp_path):
    pattern, samples = make_shards(tmp_path / "a")
    base = WdsDataset(pattern).fingerprint()
    # The same samples in shards of other sizes: other counts, another fingerprint.
    other = tmp_path / "b"
    other.mkdir()
    write_shard(other / "train-0000.tar", samples[:20])
    write_shard(other / "train-0001.tar", samples[20:40])
    write_shard(other / "train-0002.tar", samples[40:50])
    write_shard(other / "train-0003.tar", samples[50:])
    assert WdsDataset(f"{other}/train-{{0000..0003}}.tar").fingerprint() != base
    # The same shards moved elsewhere: the same dataset.
    moved = tmp_path / "c"
    (tmp_path / "a").rename(moved)
    assert WdsDataset(f"{moved}/train-{{0000..0003}}.tar").fingerprint() == base


def test_the_index_is_read_once_per_shard_version(tmp_path, monkeypatch, index_cache):
    pattern, samples = make_shards(tmp_path / "shards")
    first = WdsDataset(pattern)
    assert len(list(index_cache.rglob("*.json"))) == SHARDS

    def no_scan(url):
        raise AssertionError(f"scanned {url} again")

    monkeypatch.setattr(wds_index, "scan_shard", no_scan)
    assert WdsDataset(pattern).fingerprint() == first.fingerprint()  # every index from the cache
    # A rewritten shard is scanned again.
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(index_cache))
    write_shard(tmp_path / "shards" / "train-0001.tar", samples[15:25])
    os.utime(tmp_path / "shards" / "train-0001.tar", (1, 1))
    assert len(WdsDataset(pattern)) == SHARDS * PER_SHARD - 5


# -- bad input -------------------------------------------------------------------------------


def _bad_shards(tmp_path: Path, case: str) -> str:
    root = tmp_path / "bad"
    root.mkdir()
    good = [(f"k{i}", {"jpg": jpeg(i), "cls": b"1"}) for i in range(20)]
    if case == "no class":
        good[7] = ("k7", {"jpg": jpeg(7)})
    elif case == "bad jpeg":
        good[7] = ("k7", {"jpg": b"not a jpeg at all", "cls": b"1"})
    elif case == "truncated jpeg":
        data = jpeg(7)
        good[7] = ("k7", {"jpg": data[: len(data) // 2], "cls": b"1"})  # the header reads, the pixels do not
    write_shard(root / "train-0000.tar", good)
    return f"wds:{root}/train-0000.tar"


@pytest.mark.parametrize(
    "case,expected",
    [
        ("no class", "train-0000.tar: sample k7 has no .cls member"),
        ("bad jpeg", "train-0000.tar: sample k7: cannot read its image k7.jpg"),
        ("truncated jpeg", "train-0000.tar: sample k7: cannot decode its image k7.jpg"),
        ("nothing", "matches no shard"),
        ("missing shard", "train-0001.tar does not exist"),
    ],
)
def test_bad_shards_are_one_line_naming_shard_and_key(case, expected, tmp_path, capsys):
    if case == "nothing":
        data = f"wds:{tmp_path}/nowhere-*.tar"
    elif case == "missing shard":
        data = _bad_shards(tmp_path, "none").replace("train-0000.tar", "train-{0000..0001}.tar")
    else:
        data = _bad_shards(tmp_path, case)
    argv = [
        "extract",
        "--data",
        data,
        *TEACHER,
        "--views",
        "1",
        "--block",
        "16",
        "--batch-size",
        "16",
        "--store",
        str(tmp_path / "s"),
    ]
    assert run(*argv) == 2
    assert expected in error_line(capsys)
    assert not (tmp_path / "s" / "teachers").exists() or not any((tmp_path / "s" / "teachers").rglob("commits/*"))


def _damage_header(path: Path, name: str, how: str) -> int:
    """Damage the 512-byte header of member ``name`` in place; returns its byte offset."""
    data = bytearray(path.read_bytes())
    at = data.index(name.encode())
    assert at % 512 == 0
    if how == "checksum":  # name bytes overwritten: its checksum no longer adds up
        data[at : at + 4] = b"\0x#!"
    elif how == "zeroed":  # the whole block zero: what the tar's end marker looks like
        data[at : at + 512] = bytes(512)
    elif how == "size":  # garbage in the size field, with the checksum made to fit it
        data[at + 124 : at + 136] = b"zz!!garbage\0"
        data[at + 148 : at + 156] = b" " * 8
        data[at + 148 : at + 155] = b"%06o\0" % sum(data[at : at + 512])
    path.write_bytes(bytes(data))
    return at


@pytest.mark.parametrize(
    "how,says",
    [
        ("checksum", "a member header there cannot be read (bad checksum)"),
        (
            "zeroed",
            "a zero block (a zeroed member header, or the end marker of tars joined together) is followed by more members",
        ),
        ("size", "a member header there cannot be read (invalid header)"),
    ],
)
def test_a_damaged_member_header_is_refused_not_read_as_a_shorter_shard(how, says, tmp_path):
    """tarfile stops at a header it cannot read as if the tar ended there: 3 samples of 8, silently."""
    shard = tmp_path / "train-0000.tar"
    write_shard(shard, [(f"k{i}", {"jpg": jpeg(i, (8, 8)), "cls": b"1"}) for i in range(8)])
    at = _damage_header(shard, "k3.jpg", how)
    with pytest.raises(UserError) as e:
        WdsDataset(str(shard))
    assert f"train-0000.tar is damaged at byte {at} (after member k2.cls, 3 samples read): {says}" in str(e.value)


def test_a_shard_damaged_after_it_was_indexed_is_refused(tmp_path):
    shard = tmp_path / "train-0000.tar"
    write_shard(shard, [(f"k{i}", {"jpg": jpeg(i, (8, 8)), "cls": b"1"}) for i in range(8)])
    assert len(WdsDataset(str(shard))) == 8  # its index is cached now
    stat = shard.stat()
    _damage_header(shard, "k5.jpg", "zeroed")  # the same size, written again: another modification time
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(UserError, match="train-0000.tar is damaged at byte"):
        WdsDataset(str(shard))


@pytest.mark.parametrize("writer", ["tarfile", "webdataset"])
def test_whole_tars_are_read_whole_whatever_their_padding(writer, tmp_path):
    """tarfile pads a tar to its 10240-byte records (zeros after the end marker); webdataset's TarWriter too."""
    import webdataset as wds

    shard, samples = tmp_path / "train-0000.tar", [(f"k{i}", jpeg(i, (8, 8)), i % 3) for i in range(8)]
    if writer == "tarfile":
        with tarfile.open(shard, "w") as tar:  # the default format and record size
            for key, data, label in samples:
                for ext, member in (("jpg", data), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(member)
                    tar.addfile(info, io.BytesIO(member))
    else:
        with wds.TarWriter(str(shard)) as tar:
            for key, data, label in samples:
                tar.write({"__key__": key, "jpg": data, "cls": label})
    size = shard.stat().st_size
    assert size % tarfile.RECORDSIZE == 0 and not any(shard.read_bytes()[-2048:])  # more zeros than the end marker
    data = WdsDataset(str(shard))
    assert len(data) == 8 and data.labels.tolist() == [label for _, _, label in samples]
    assert [bytes(b) for b in data.encoded(np.arange(8))] == [d for _, d, _ in samples]


def test_extraction_from_class_ordered_shards_says_so_in_one_line(tmp_path, capsys):
    pattern, _ = make_shards(tmp_path / "sorted", ordered=True, shards=2, per_shard=10)
    assert WdsDataset(pattern).order_note() is not None
    shuffled, _ = make_shards(tmp_path / "shuffled", shards=2, per_shard=10)
    assert WdsDataset(shuffled).order_note() is None
    argv = [
        "extract",
        "--data",
        f"wds:{pattern}",
        *TEACHER,
        "--views",
        "1",
        "--block",
        "20",
        "--batch-size",
        "20",
        "--store",
        str(tmp_path / "s"),
    ]
    assert run(*argv) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "class order" in line]
    assert len(notes) == 1 and "the commonest class of shard" in notes[0] and "shuffle the samples" in notes[0]


# -- end to end ------------------------------------------------------------------------------

MIXING = "views:\n  cutmix_alpha: 1.0\n  mixup_alpha: 0.2\n  randaugment: rand-m7-mstd0.5\n"


def _extract(data: str, store, config: Path, *extra) -> list[str]:
    return [
        "extract",
        "--data",
        data,
        *TEACHER,
        "--teacher-id",
        "t",
        "--config",
        str(config),
        "--views",
        "2",
        "--block",
        "16",
        "--batch-size",
        "16",
        "--store",
        str(store),
        *extra,
    ]


def test_extract_verify_and_distill_from_local_shards(tmp_path, monkeypatch):
    pattern, _ = make_shards(tmp_path / "shards")
    val, _ = make_shards(tmp_path / "val", prefix="val", shards=1, per_shard=10, seed=1)
    config = tmp_path / "mix.yaml"
    config.write_text(MIXING)
    store = tmp_path / "store"
    per_image = []
    image = WdsDataset.image
    monkeypatch.setattr(WdsDataset, "image", lambda self, i: per_image.append(i) or image(self, i))
    assert run(*_extract(f"wds:{pattern}", store, config)) == 0
    assert per_image == []  # every image came with its unit, read in one pass; none by id
    assert Store(store).record.dataset.source == f"wds:{pattern}"
    assert run("verify", str(store), "--replay", "1") == 0
    assert (
        run(
            "distill",
            "--from-cache",
            str(store),
            *STUDENT,
            "--verify",
            "all",
            "--val-data",
            f"wds:{val}",
            "--out",
            str(tmp_path / "d"),
        )
        == 0
    )
    assert (tmp_path / "d" / "student.safetensors").exists()


def test_train_without_a_store_reads_shards(tmp_path):
    pattern, _ = make_shards(tmp_path / "shards")
    val, _ = make_shards(tmp_path / "val", prefix="val", shards=1, per_shard=10, seed=1)
    out = tmp_path / "scratch"
    argv = [
        "train",
        "--data",
        f"wds:{pattern}",
        "--val-data",
        f"wds:{val}",
        "--model",
        "resnet10t",
        "--model-arg",
        "channels=[8,16,32,64]",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--size",
        "32",
        "--out",
        str(out),
    ]
    assert run(*argv) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and 0 <= metrics[0]["val_top1"] <= 1 and (out / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.local_ray
def test_ray_train_distills_from_a_store_of_shards(local_ray, tmp_path):
    """distill --workers 2 (a local Ray): each worker opens the shard source and the validation shards itself."""
    pattern, _ = make_shards(tmp_path / "shards")
    val, _ = make_shards(tmp_path / "val", prefix="val", shards=1, per_shard=10, seed=1)
    config = tmp_path / "plain.yaml"
    config.write_text("views:\n  hflip: 0.5\n")
    assert run(*_extract(f"wds:{pattern}", tmp_path / "store", config)) == 0
    out = tmp_path / "ray-run"
    assert (
        run(
            "distill",
            "--from-cache",
            str(tmp_path / "store"),
            *STUDENT,
            "--val-data",
            f"wds:{val}",
            "--ray-workers",
            "2",
            "--out",
            str(out),
        )
        == 0
    )
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and "val_top1" in metrics[0] and (out / "student.safetensors").exists()


@pytest.mark.slow
def test_shards_in_a_bucket_extract_verify_distill_and_run_on_ray(s3, cluster, tmp_path):
    pattern, _ = make_shards(tmp_path / "shards")
    val, _ = make_shards(tmp_path / "val", prefix="val", shards=1, per_shard=10, seed=1)
    for path in [*(tmp_path / "shards").iterdir(), *(tmp_path / "val").iterdir()]:
        s3.upload_file(str(path), BUCKET, f"in/{path.name}")
    remote = f"wds:s3://{BUCKET}/in/train-{{0000..0003}}.tar"
    config = tmp_path / "mix.yaml"
    config.write_text(MIXING)
    assert run(*_extract(f"wds:{pattern}", tmp_path / "local", config)) == 0
    assert run(*_extract(remote, tmp_path / "s3", config)) == 0
    want = Store(tmp_path / "local")
    got = Store(tmp_path / "s3")
    assert got.record.dataset.fingerprint == want.record.dataset.fingerprint
    for group in ("plan", "t"):
        a = group_arrays(got.plan if group == "plan" else got.teacher(group))
        b = group_arrays(want.plan if group == "plan" else want.teacher(group))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), group
    assert run("verify", str(tmp_path / "s3"), "--replay", "1") == 0
    assert (
        run(
            "distill",
            "--from-cache",
            str(tmp_path / "s3"),
            *STUDENT,
            "--verify",
            "all",
            "--val-data",
            f"wds:s3://{BUCKET}/in/val-0000.tar",
            "--out",
            str(tmp_path / "d"),
        )
        == 0
    )
    # Ray actors on the session's two-node cluster read the shards from the bucket themselves (its nodes have the
    # S3 settings in their environment).
    import subprocess
    import sys

    cmd = [
        str(Path(sys.executable).with_name("pipeline")),
        "--quiet",
        *_extract(remote, tmp_path / "ray", config, "--ray-address", cluster.address),
    ]
    done = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ray_store = Store(tmp_path / "ray")
    for name, want_array in group_arrays(want.teacher("t")).items():
        np.testing.assert_array_equal(group_arrays(ray_store.teacher("t"))[name], want_array)


def test_validation_shards_keep_the_training_classes(tmp_path):
    pattern, _ = make_shards(tmp_path / "shards")
    val, _ = make_shards(tmp_path / "val", prefix="val", shards=1, per_shard=10, seed=1)
    from stages.data.datasets import validation_data

    data = validation_data(f"wds:{pattern}", f"wds:{val}")
    assert len(data) == 10 and data.num_classes == CLASSES
    assert validation_data(f"wds:{pattern}", None) is None
    with pytest.raises(UserError, match="matches no shard"):
        validation_data(f"wds:{pattern}", f"wds:{tmp_path}/nothing-*.tar")

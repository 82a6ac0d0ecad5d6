"""`pipeline prepare` from the command line: resuming a stopped run to the same bytes, `pipeline verify` on prepared
shards, the refusals, tar-shard input, a bucket, and Ray actors.

The source is a folder of tiny JPEGs written class by class (as ImageNet's folders list them); each command runs
in this process (``pipeline.cli.main``), except the Ray driver, which needs the cluster's token from its start.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import BUCKET, image_bytes, read_tree
from pipeline.cli import main
from stages.data.prepare import shards
from stages.data.wds_dataset import WdsDataset

PIPELINE = str(Path(sys.executable).with_name("pipeline"))


pytestmark = pytest.mark.usefixtures("index_cache")  # never the user's own shard-index cache


def class_folder(root: Path, classes: int = 10, per_class: int = 20) -> Path:
    """Class by class; every third image larger than the others (16 x 24), so --max-side 20 shrinks some, keeps the rest."""
    for c in range(classes):
        (root / f"n{c:03d}").mkdir(parents=True)
        for j in range(per_class):
            (root / f"n{c:03d}" / f"img{j:03d}.jpg").write_bytes(
                image_bytes(c * 1000 + j, (16, 24) if j % 3 == 0 else (12, 16))
            )
    return root


def prepare(src, out, *extra: str, quiet: bool = True) -> int:
    return main([*(["--quiet"] if quiet else []), "prepare", "--data", f"folder:{src}", "--out", str(out), *extra])


def one_error(capsys) -> str:
    """The run's stderr is exactly one line, the error."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# 200 images: 4 shards, a third of the images re-encoded
SHRINK = ["--shard-size", "50", "--max-side", "20", "--size", "20"]


def test_a_run_stopped_mid_shard_resumes_to_the_bytes_of_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    src = class_folder(tmp_path / "src")
    assert prepare(src, tmp_path / "clean", *SHRINK) == 0
    convert, calls = shards.convert, []

    def stopped(*args, **kwargs):  # Ctrl-C while shard 2 is being written (image 121 of 200)
        calls.append(1)
        if len(calls) == 121:
            raise KeyboardInterrupt
        return convert(*args, **kwargs)

    monkeypatch.setattr(shards, "convert", stopped)
    out = tmp_path / "resumed"
    assert prepare(src, out, *SHRINK) == 130
    monkeypatch.setattr(shards, "convert", convert)
    names = sorted(p.name for p in out.iterdir())
    # whole shards only, no manifest, no temporary file
    assert names == [".prepare", "train-000000.tar", "train-000001.tar"]
    assert sorted(p.name for p in (out / ".prepare").iterdir()) == [
        "settings.json",
        "shard-000000.json",
        "shard-000001.json",
    ]
    (out / ".train-000002.tar.0123abcd.tmp").write_bytes(b"half a shard")  # what a SIGKILL leaves instead
    capsys.readouterr()
    assert prepare(src, out, *SHRINK) == 0
    assert "2 shards written, 2 already finished" in capsys.readouterr().out
    assert read_tree(out) == read_tree(tmp_path / "clean")
    assert main(["--quiet", "verify", str(out)]) == 0
    assert prepare(src, out, *SHRINK) == 0  # finished: nothing to do
    assert "already prepared" in capsys.readouterr().out


def test_verify_names_each_damaged_shard_and_its_advice_repairs_them(tmp_path, capsys):
    src = class_folder(tmp_path / "src")
    out = tmp_path / "out"
    assert prepare(src, out, "--shard-size", "50") == 0
    clean = read_tree(out)
    assert main(["--quiet", "verify", str(out)]) == 0
    assert "sound (4 shards, 200 samples" in capsys.readouterr().out
    data = bytearray((out / "train-000001.tar").read_bytes())
    data[1600] ^= 0xFF  # inside the first image (after the .cls member and the image's header)
    (out / "train-000001.tar").write_bytes(bytes(data))  # same size, other bytes
    (out / "train-000002.tar").write_bytes((out / "train-000002.tar").read_bytes()[:-10240])  # cut short
    (out / "train-000003.tar").unlink()
    (out / "train-000009.tar").write_bytes(clean["train-000000.tar"])  # a stray shard a glob would read
    assert main(["--quiet", "verify", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "train-000001.tar: sha256 differs from the manifest's: the file is damaged",
        f"train-000002.tar: {len(clean['train-000002.tar']) - 10240:,} bytes, the manifest says {len(clean['train-000002.tar']):,}: the file was cut short or changed",
        f"train-000003.tar: missing (the manifest lists it with 50 samples, {len(clean['train-000003.tar']):,} bytes)",
        "train-000009.tar: a shard the manifest does not list (a glob for the shards would read it)",
    ]
    error = captured.err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: {out}: 4 problem(s) in the prepared shards")
    # what the line says to do
    for name in ("train-000001.tar", "train-000002.tar", "train-000009.tar", "manifest.json"):
        (out / name).unlink()
    assert prepare(src, out, "--shard-size", "50") == 0
    assert read_tree(out) == clean and main(["--quiet", "verify", str(out)]) == 0


def test_refusals_are_one_line_and_leave_nothing_that_looks_whole(tmp_path, capsys):
    src = class_folder(tmp_path / "src", classes=4, per_class=10)
    out = tmp_path / "out"
    # A max side below the view size: refused before anything exists, unless forced.
    assert prepare(src, out, "--max-side", "100", quiet=False) == 2
    line = one_error(capsys)
    assert (
        "--max-side 100 is below the view size 224" in line and "crops of small regions get fewer source pixels" in line
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("size: 64\nviews:\n  scale: [0.25, 1.0]\n")
    assert prepare(src, out, "--max-side", "48", "--config", str(recipe), quiet=False) == 2
    assert f"below the view size 64 (size in {recipe})" in one_error(capsys)
    assert not out.exists()
    assert prepare(src, out, "--max-side", "20", "--force") == 0
    finished = read_tree(out)
    # An output holding other shards: other settings, other data, or files no preparation wrote.
    assert prepare(src, out, "--max-side", "20", "--force", "--seed", "1", quiet=False) == 2
    assert "already holds shards prepared with other settings (seed 0, not 1)" in one_error(capsys)
    other = class_folder(tmp_path / "other", classes=2, per_class=5)
    assert prepare(other, out, "--max-side", "20", "--force", quiet=False) == 2
    assert f"already holds shards prepared from other data (folder:{src}, 40 samples" in one_error(capsys)
    assert read_tree(out) == finished
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert prepare(src, tmp_path / "notes", quiet=False) == 2
    assert "is not empty and holds no prepared shards" in one_error(capsys)
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["todo.txt"]
    assert main(["prepare", "--data", "digits", "--out", str(tmp_path / "d")]) == 2
    assert "use --data folder:PATH or wds:PATTERN, not digits" in one_error(capsys)


def test_a_corrupt_image_is_one_line_naming_it_and_no_manifest(tmp_path, capsys):
    src = class_folder(tmp_path / "src", classes=4, per_class=10)
    good = image_bytes(7, (64, 64))  # large enough that half of it holds the whole header
    (src / "n002" / "img005.jpg").write_bytes(good[: len(good) // 2])  # truncated: the header pass reads its end too
    out = tmp_path / "out"
    assert prepare(src, out, "--shard-size", "10") == 2
    line = one_error(capsys)
    assert (
        f"cannot decode image {src / 'n002' / 'img005.jpg'}: image file is truncated" in line
        and "replace the file" in line
    )
    assert not out.exists()  # refused at set-up
    # its header and its end read, its Huffman table does not: found while shards are written
    huffman = good.index(b"\xff\xc4")
    (src / "n002" / "img005.jpg").write_bytes(good[: huffman + 5] + b"\xff" * 16 + good[huffman + 21 :])
    assert prepare(src, out, "--shard-size", "10") == 2
    line = one_error(capsys)
    assert f"cannot read image {src / 'n002' / 'img005.jpg'} (" in line and "replace the file" in line
    assert not (out / "manifest.json").exists()
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    (src / "n002" / "img005.jpg").write_bytes(good)  # replaced: the same command finishes the job
    assert prepare(src, out, "--shard-size", "10") == 0
    assert main(["--quiet", "verify", str(out)]) == 0
    # no image header at all: found before any shard is written
    (src / "n001" / "img003.jpg").write_bytes(b"not an image")
    assert prepare(src, tmp_path / "out2", "--shard-size", "10") == 2
    assert f"cannot read image {src / 'n001' / 'img003.jpg'}" in one_error(capsys)
    assert not (tmp_path / "out2").exists()


def test_class_ordered_tar_shards_come_out_shuffled(tmp_path):
    import webdataset as wds

    (tmp_path / "in").mkdir()
    for k in range(2):  # 2 shards of 60 samples, class by class: what `order_note` warns of
        with wds.TarWriter(str(tmp_path / "in" / f"in-{k}.tar"), encoder=False, mtime=0) as tar:
            for i in range(k * 60, (k + 1) * 60):
                tar.write({"__key__": f"s{i:04d}", "jpg": image_bytes(i), "cls": str(i // 12).encode()})
    source = WdsDataset(f"{tmp_path}/in/in-{{0..1}}.tar")
    assert source.order_note() is not None
    argv = [
        "--quiet",
        "prepare",
        "--data",
        f"wds:{tmp_path}/in/in-{{0..1}}.tar",
        "--out",
        str(tmp_path / "out"),
        "--shard-size",
        "40",
    ]
    assert main(argv) == 0
    out = WdsDataset(f"{tmp_path}/out/train-{{000000..000002}}.tar")
    assert out.order_note() is None and out.classes == [str(c) for c in range(10)]
    assert sorted(map(bytes, out.encoded(np.arange(120)))) == sorted(map(bytes, source.encoded(np.arange(120))))


@pytest.mark.slow
def test_prepared_shards_in_a_bucket_equal_local_ones(s3, tmp_path, capsys):
    src = class_folder(tmp_path / "src", classes=4, per_class=10)
    url = f"s3://{BUCKET}/prepared"
    assert prepare(src, tmp_path / "local", "--shard-size", "16") == 0
    assert prepare(src, url, "--shard-size", "16") == 0

    def bucket() -> dict[str, bytes]:
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="prepared/")["Contents"]]
        return {k.removeprefix("prepared/"): s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}

    assert bucket() == read_tree(tmp_path / "local")
    assert main(["--quiet", "verify", url]) == 0
    assert WdsDataset(f"{url}/train-{{000000..000002}}.tar").classes == ["n000", "n001", "n002", "n003"]
    # A run stopped after shard 0: the rest are made again, the same bytes.
    for key in ("prepared/manifest.json", "prepared/train-000001.tar", "prepared/.prepare/shard-000002.json"):
        s3.delete_object(Bucket=BUCKET, Key=key)
    assert prepare(src, url, "--shard-size", "16") == 0
    assert "2 shards written, 1 already finished" in capsys.readouterr().out
    assert bucket() == read_tree(tmp_path / "local")


@pytest.mark.slow
def test_prepare_on_ray_equals_in_process(cluster, tmp_path):
    src = class_folder(tmp_path / "src", classes=4, per_class=10)
    assert prepare(src, tmp_path / "local", "--shard-size", "8") == 0
    out = tmp_path / "ray"
    cmd = [
        PIPELINE,
        "--quiet",
        "prepare",
        "--data",
        f"folder:{src}",
        "--out",
        str(out),
        "--shard-size",
        "8",
        "--ray-address",
        cluster.address,
        "--actors",
        "2",
    ]
    done = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "5 shards written" in done.stdout
    assert read_tree(out) == read_tree(tmp_path / "local")
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["shards"]] == [8] * 5


@pytest.mark.parametrize("where", ["file", "file/under"])
def test_an_out_at_or_under_a_file_is_one_line_and_leaves_the_file(tmp_path, capsys, where):
    src = class_folder(tmp_path / "src", classes=2, per_class=3)
    (tmp_path / "file").write_text("mine")
    assert prepare(src, tmp_path / where) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs through a file, not a folder; choose another location" in err[0], err
    assert (tmp_path / "file").read_text() == "mine"


def test_verify_names_an_unfinished_prepare_and_each_wrong_field_of_a_hand_edited_manifest(tmp_path, capsys):
    src, out = class_folder(tmp_path / "src", classes=2, per_class=6), tmp_path / "out"
    assert prepare(src, out, "--shard-size", "4") == 0
    good = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").unlink()  # as a killed prepare leaves its shards: no manifest yet
    assert main(["--quiet", "verify", str(out)]) == 2
    assert (
        "a `pipeline prepare` that has not finished (no manifest.json yet): run the same prepare command again"
        in capsys.readouterr().err
    )
    edits = {
        "'num_samples' is str '12', expected a whole number": lambda m: m.update(num_samples="12"),
        "'shards[1]' is str 'x', expected a mapping": lambda m: m["shards"].__setitem__(1, "x"),
        "'shards[0].name' is missing, expected a string": lambda m: m["shards"][0].pop("name"),
        "'shards' is dict": lambda m: m.update(shards={}),
    }
    for says, edit in edits.items():
        manifest = json.loads(json.dumps(good))
        edit(manifest)
        (out / "manifest.json").write_text(json.dumps(manifest))
        assert main(["--quiet", "verify", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], (says, err)

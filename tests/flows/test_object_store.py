"""Stores at an fsspec URL: a real S3-compatible server (moto) on 127.0.0.1, driven through the commands.

The server is a separate process started here, and the pipeline talks to it
with s3fs and botocore exactly as it would to a bucket in a cloud: only the
endpoint differs (``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from pipeline.cli import main
from storage import Store

from conftest import BATCH, BUCKET, DATA, VIEWS, free_port, group_arrays

TEACHER = ["--teacher", "resnet18", "--random-init", "--teacher-seed", "0", "--teacher-id", "t1", "--size", "32"]
EXTRACT = ["extract", "--data", DATA, *TEACHER, "--views", str(VIEWS), "--block", "32", "--logits", "full", "--dtype", "float32", "--batch-size", str(BATCH)]
DISTILL = ["--student", "resnet10t", "--student-arg", "channels=[8,16,32,64]", "--epochs", "1", "--batch-size", "32", "--seed", "1", "--verify", "all"]


def run(*argv: str) -> int:
    return main(["--quiet", *argv])


@pytest.mark.slow
def test_a_store_in_a_bucket_equals_a_local_one(s3, base_store, reference, tmp_path, capsys):
    url = f"s3://{BUCKET}/runs/fake"
    assert run(*EXTRACT, "--store", url) == 0
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/fake/")["Contents"]]
    assert "runs/fake/store.json" in keys and any(k.startswith("runs/fake/teachers/t1/commits/") for k in keys)
    assert any(k.startswith("runs/fake/logs/extract-t1-") and k.endswith(".log") for k in keys)  # the run log was uploaded
    store = Store(url)
    for group, arrays in (("plan", group_arrays(store.plan)), ("t1", group_arrays(store.teacher("t1")))):
        for name, want in reference[group].items():
            np.testing.assert_array_equal(arrays[name], want)

    # Re-running resumes: everything is committed, nothing is redone.
    capsys.readouterr()
    assert run(*EXTRACT, "--store", url) == 0
    assert "0 units extracted" in capsys.readouterr().out

    assert run("verify", url, "--replay", "0.5") == 0
    # The same student from the bucket as from the local copy.
    assert run("distill", "--from-cache", url, *DISTILL, "--out", str(tmp_path / "s3")) == 0
    assert run("distill", "--from-cache", str(base_store), *DISTILL, "--out", str(tmp_path / "local")) == 0
    a, b = load_file(tmp_path / "s3" / "student.safetensors"), load_file(tmp_path / "local" / "student.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_damage_in_a_bucket_is_found_and_repaired(s3, reference, capsys):
    url = f"s3://{BUCKET}/runs/damaged"
    assert run(*EXTRACT, "--store", url) == 0
    s3.delete_object(Bucket=BUCKET, Key="runs/damaged/teachers/t1/logits/c/1/1/0")
    capsys.readouterr()
    assert run("verify", url, "--replay", "0") == 2
    assert "teacher t1 view 1 block 1: missing shard (logits)" in capsys.readouterr().out
    assert run(*EXTRACT, "--store", url, "--repair") == 0
    np.testing.assert_array_equal(Store(url).teacher("t1").array("logits")[:], reference["t1"]["logits"])


def test_an_unreachable_endpoint_is_one_line_within_seconds(monkeypatch, capsys):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses file systems; the endpoint comes from the environment
    # Earlier tests' dropped file systems leave aiohttp sessions that complain ("Unclosed client session")
    # when collected: collect them now, not in the middle of the run whose stderr is checked.
    gc.collect()
    capsys.readouterr()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    start = time.perf_counter()
    assert run(*EXTRACT, "--store", f"s3://{BUCKET}/nowhere") == 2
    assert time.perf_counter() - start < 15  # botocore alone would retry for about 11 s
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot reach s3://") and "check the URL" in err[0]

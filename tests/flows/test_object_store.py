"""Stores at an fsspec URL: a real S3-compatible server (moto) on 127.0.0.1, driven through the commands.

The server is a separate process started here, and the pipeline talks to it
with s3fs and botocore exactly as it would to a bucket in a cloud: only the
endpoint differs (``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from pipeline.cli import main
from storage import Store

from conftest import BATCH, BUCKET, DATA, S3_SETTINGS, VIEWS, free_port, group_arrays, start_moto_server

TEACHER = ["--teacher", "resnet18", "--random-init", "--teacher-seed", "0", "--teacher-id", "t1", "--size", "32"]
EXTRACT = [
    "extract",
    "--data",
    DATA,
    *TEACHER,
    "--views",
    str(VIEWS),
    "--block",
    "32",
    "--logits",
    "full",
    "--dtype",
    "float32",
    "--batch-size",
    str(BATCH),
]
DISTILL = [
    "--student",
    "resnet10t",
    "--student-arg",
    "channels=[8,16,32,64]",
    "--epochs",
    "1",
    "--batch-size",
    "32",
    "--seed",
    "1",
    "--verify",
    "all",
]


def run(*argv: str) -> int:
    return main(["--quiet", *argv])


@pytest.mark.slow
def test_a_store_in_a_bucket_equals_a_local_one(s3, base_store, reference, tmp_path, capsys):
    url = f"s3://{BUCKET}/runs/fake"
    assert run(*EXTRACT, "--store", url) == 0
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/fake/")["Contents"]]
    assert "runs/fake/store.json" in keys and any(k.startswith("runs/fake/teachers/t1/commits/") for k in keys)
    # the run log was uploaded
    assert any(k.startswith("runs/fake/logs/extract-t1-") and k.endswith(".log") for k in keys)
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


@pytest.fixture
def own_s3_server():
    """A moto server of this test's own (the session's must not be paused), with the bucket made; stopped by its id."""
    pytest.importorskip("moto.server")
    import boto3
    from botocore.config import Config

    started = start_moto_server()
    if started is None:
        pytest.skip("a moto server could not start")
    proc, endpoint = started
    try:
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(connect_timeout=2, read_timeout=2),
        )
        client.create_bucket(Bucket=BUCKET)
        yield proc, endpoint, client
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_a_server_that_stops_answering_is_one_line_within_20_s(own_s3_server, tmp_path):
    """SIGSTOP the S3 server while an extraction writes to it: the connection stands and no byte comes. The
    command ends within README's 20 s with one line saying the server stopped answering, not a hang."""
    proc, endpoint, client = own_s3_server
    env = {**os.environ, **S3_SETTINGS, "AWS_ENDPOINT_URL": endpoint, "OMP_NUM_THREADS": "1"}
    argv = [*EXTRACT, "--store", f"s3://{BUCKET}/paused"]
    cmd = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "--quiet", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        deadline = time.time() + 120
        while cmd.poll() is None and time.time() < deadline:  # the extraction is under way once the plan has a commit
            keys = [
                o["Key"]
                for o in client.list_objects_v2(Bucket=BUCKET, Prefix="paused/plan/commits/").get("Contents", [])
            ]
            if keys:
                break
            time.sleep(0.05)
        assert cmd.poll() is None, "the extraction ended before the server could be paused"
        os.kill(proc.pid, signal.SIGSTOP)
        paused = time.perf_counter()
        out, err = cmd.communicate(timeout=60)
    finally:
        if cmd.poll() is None:
            cmd.kill()
            cmd.wait()
    took = time.perf_counter() - paused
    assert cmd.returncode == 2, (took, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: s3://") and "stopped answering" in lines[0], lines
    assert took < 20, took

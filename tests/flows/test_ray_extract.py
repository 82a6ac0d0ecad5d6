"""Extraction on a real two-node Ray cluster (loopback): same bytes as in-process, killed workers and drivers.

The session's one cluster (conftest's ``cluster``) serves the module. Each extraction runs as a real ``pipeline``
process joined with ``--ray-address``, so killing it is a real SIGKILL. Stores
are compared file by file (logs aside) with one made in this process without
Ray: every array, every commit record exactly once, no stray shard.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import free_port, read_tree
from ray_cluster import HEAD_IP, worker_pids

from pipeline.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PIPELINE = str(Path(sys.executable).with_name("pipeline"))
VIEWS, BLOCKS = 3, 5  # 80 samples in blocks of 16: 15 units
ARGS = [
    "extract",
    "--data",
    "fake:80?size=32",
    "--teacher",
    "resnet18",
    "--random-init",
    "--size",
    "32",
    "--logits",
    "full",
    "--dtype",
    "float32",
    "--views",
    str(VIEWS),
    "--block",
    "16",
    "--batch-size",
    "16",
]


def extract_args(store, *extra) -> list[str]:
    return [*ARGS, "--store", str(store), *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same plan extracted in this process, without Ray."""
    path = tmp_path_factory.mktemp("ref") / "store"
    assert main(["--quiet", *extract_args(path, "--actors", "0")]) == 0
    return path


def commits(store: Path) -> int:
    d = store / "teachers" / "resnet18" / "commits"
    return len(list(d.glob("*.json"))) if d.exists() else 0


# A whole-file write goes to ``.NAME.XXXXXXXX.tmp`` and is renamed into place (storage.location); a SIGKILL between the
# two leaves that hidden file behind. No reader lists it (a commit record must be named vVVVVVV-bBBBBBB.json), and
# nothing removes it yet, so the comparison leaves exactly these files out and says when it saw one.
KILLED_WRITE = re.compile(r"(.*/)?\.[^/]+\.[0-9a-f]{8}\.tmp")


def assert_same_store(got: Path, want: Path) -> None:
    """Byte-identical trees apart from logs: arrays, shards, each commit record once, nothing stray or locked.

    Only the hidden temp files of writes that a kill cut short are allowed beyond the clean run's files.
    """
    a = {k: v for k, v in read_tree(got).items() if not k.startswith("logs/")}
    b = {k: v for k, v in read_tree(want).items() if not k.startswith("logs/")}
    killed_writes = sorted(k for k in a if KILLED_WRITE.fullmatch(k))
    if killed_writes:
        print(f"left out of the comparison, temp files of writes cut short by the kill: {killed_writes}")
    a = {k: v for k, v in a.items() if k not in killed_writes}
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert commits(got) == VIEWS * BLOCKS


def run(cluster, store) -> subprocess.CompletedProcess:
    cmd = [PIPELINE, *extract_args(store, "--ray-address", cluster.address)]
    return subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=180)


def start(cluster, store) -> subprocess.Popen:
    """A driver in its own process, left running: the test kills it, or one of its actors, mid-extraction."""
    cmd = [PIPELINE, *extract_args(store, "--ray-address", cluster.address)]
    return subprocess.Popen(cmd, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_commits(store, n: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Watch the store's commits/ until ``n`` units are committed, with the run still going.

    The product has no test hook to slow it down: each actor takes a few tenths of a second per unit, so
    after the first commits a dozen units (seconds) are left, and a fine poll sees them long before the end.
    """
    deadline = time.time() + timeout
    while commits(store) < n:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "extraction made no progress"
        time.sleep(0.01)
    return commits(store)


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_the_store_is_whole(cluster, reference, tmp_path):
    store = tmp_path / "store"
    proc = start(cluster, store)
    try:
        wait_for_commits(store, 1, proc)
        victims = worker_pids(cluster.marks, "ExtractActor")
        assert victims, "no extraction actor process found"
        os.kill(victims[0], signal.SIGKILL)
        at_kill = commits(store)  # at least as many as when the kill landed
        assert 0 < at_kill < VIEWS * BLOCKS and proc.poll() is None, (
            f"the kill did not land mid-extraction ({at_kill} units committed)"
        )
        print(f"actor killed with {at_kill}/{VIEWS * BLOCKS} units committed")
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert_same_store(store, reference)


@pytest.mark.slow
def test_a_killed_driver_resumes_where_it_stopped_under_ray_job_submit(cluster, reference, tmp_path):
    """A driver SIGKILLed mid-extraction, then the same extraction as a Ray job (`ray job submit -- pipeline extract
    ...`, joined through the job's RAY_ADDRESS): it skips the units the dead driver committed, does the rest on both
    nodes, and the store equals the in-process one. (One cluster run fewer than a clean job run beside a resume.)"""
    store = tmp_path / "store"  # absolute: a job runs in its own working directory
    proc = start(cluster, store)
    try:
        wait_for_commits(store, 2, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    done = commits(store)  # a unit in flight may still commit after this: the rerun skips it too
    print(f"driver killed with {done}/{VIEWS * BLOCKS} units committed")
    assert 0 < done < VIEWS * BLOCKS, f"the kill did not land mid-extraction ({done} units committed)"
    assert (store / "teachers" / "resnet18" / "lock.json").exists()  # left behind by the dead driver
    deadline = time.time() + 180  # under a load of 10+ the agent has taken over 90 s
    while True:  # the head's job agent comes up a few seconds after `ray start`
        r = subprocess.run(
            [
                str(Path(sys.executable).with_name("ray")),
                "job",
                "submit",
                "--address",
                cluster.dashboard,
                "--",
                PIPELINE,
                *extract_args(store),
            ],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        if "No available agent" not in r.stdout + r.stderr or time.time() > deadline:
            break
        time.sleep(2)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "2 extraction actor(s)" in out  # one per node by default on a CPU cluster
    extracted, skipped = (
        int(n) for n in re.search(r"(\d+) units extracted .*?, (\d+) already committed", out).groups()
    )
    assert done <= skipped < VIEWS * BLOCKS and extracted + skipped == VIEWS * BLOCKS, out[-3000:]
    assert_same_store(store, reference)


# -- bad input: one line, exit 2, nothing created ----------------------------------------------


def _one_error_line(stderr: str) -> str:
    err = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def test_an_unreachable_cluster_fails_in_seconds(tmp_path, capsys):
    port = free_port(HEAD_IP)  # nobody listens here
    start = time.perf_counter()
    assert main(extract_args(tmp_path / "s", "--ray-address", f"{HEAD_IP}:{port}")) == 2
    assert time.perf_counter() - start < 15
    assert "cannot reach the Ray cluster" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "s").exists()


# Ray reads RAY_AUTH_MODE once, when imported: a driver with the cluster's token is a fresh process.
CHECKS = """
import contextlib, io, json, sys
from pipeline.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out.append([main(argv), err.getvalue()])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_gpus_and_store_visibility_are_checked_before_work(cluster, tmp_path):
    memory = f"memory://invisible-{uuid.uuid4().hex[:8]}"  # lives in the driver only: no Ray node sees it
    argvs = [
        extract_args(tmp_path / "s", "--ray-address", cluster.address, "--gpus-per-worker", "1"),
        extract_args(memory, "--ray-address", cluster.address),
    ]
    r = subprocess.run(
        [sys.executable, "-c", CHECKS, json.dumps(argvs)], env=cluster.env, capture_output=True, text=True, timeout=180
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (gpu_rc, gpu_err), (store_rc, store_err) = json.loads(r.stdout.strip().splitlines()[-1])
    assert (gpu_rc, store_rc) == (2, 2)
    assert "GPU per worker was asked for but the Ray cluster has 0 GPUs" in _one_error_line(gpu_err)
    assert "is not visible from Ray node(s)" in _one_error_line(store_err)
    assert not (tmp_path / "s").exists()

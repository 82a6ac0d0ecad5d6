"""Shared fixtures: a tiny dataset, real random-init timm teachers, and one extracted store.

Everything is sized for two CPU cores: 80 fake 32 px images in blocks of 32
(the last block holds 16 rows, so partial shards are exercised), two views,
batches of 32. Batches stay at 16 rows or more wherever results are compared
bit for bit: CPU convolutions give slightly different per-sample results in
smaller batches.

Session-scoped stores are never modified by a test; a test that changes a
store works on a copy (``store_copy``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stages.cache import teacher_rows
from stages.cpus import usable_cpus, use_threads
from stages.data.datasets import open_dataset
from stages.teachers.extract import TeacherRunner, extract, teacher_info
from stages.cache.store_setup import open_store
from stages.teachers.teachers import build_teacher
from stages.data.views import ViewPlan, ViewRecipe
from storage import TeacherRecord

# README's test command runs two pytest-xdist workers on two cores: each gets its share of the CPUs as threads,
# set before torch starts its thread pool (the commands read OMP_NUM_THREADS as their default --threads, and so
# do the subprocesses and Ray processes the tests start). Two workers with torch's default of a thread per core
# each would oversubscribe the machine several times over.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
    # torch was imported above, its pool sized already: as the commands do, from OMP_NUM_THREADS
    use_threads(None, workers=0)

# Ray Train's controller polls its workers every 2 s, and each run starts a preemption watcher actor (one more
# Python process to start on two cores): the Ray tests wait on the one and pay for the other, about 4 s a run,
# and neither changes what a run computes, checkpoints or reports. Set before any test starts Ray, whose
# drivers, local instances and cluster nodes take it from this process's environment.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

DATA = "fake:80?size=32"
VIEWS, BLOCK, SIZE, BATCH = 2, 32, 32, 32
# The bucket of the S3 tests, on the run's one moto server: one per xdist worker, as the ``s3`` fixture empties it
# before each test, and two workers run S3 tests at once.
BUCKET = f"teacher-cache-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
STUDENT = dict(student="resnet10t", student_kwargs=dict(channels=(8, 16, 32, 64)))


def make_teacher(seed: int = 0, num_classes: int = 10):
    return build_teacher("resnet18", random_init=True, num_classes=num_classes, input_size=SIZE, seed=seed)


def runner_for(teacher, **output_kwargs) -> TeacherRunner:
    return TeacherRunner(teacher, teacher_info(teacher, teacher_rows.output_info(teacher, **output_kwargs)))


def make_record(name: str = "t", **fields) -> TeacherRecord:
    """A teacher.json for tests that need no real teacher: 10 classes as top-3 float16 logits, 4-d features, unless ``fields`` say otherwise."""
    base = dict(
        format="zarr",
        precision="fp32",
        name=name,
        timm_name=name,
        weights="random-init:seed=0",
        input_size=SIZE,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        outputs=("logits", "features"),
        num_classes=10,
        feature_dim=4,
        logits="topk",
        k=3,
        dtype="float16",
        feature_dtype="float16",
        versions={},
    )
    return TeacherRecord(**{**base, **fields})


def image_bytes(seed: int, size=(12, 16), fmt="JPEG") -> bytes:
    """A small encoded image: one seeded colour under noise, ``size`` (height, width)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.integers(0, 256, 3) + rng.integers(-30, 31, (*size, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


@pytest.fixture
def index_cache(tmp_path, monkeypatch) -> Path:
    """A test's own cache of webdataset shard indexes (``XDG_CACHE_HOME``): never the user's, nor an earlier test's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def read_tree(root) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes: 'nothing changed' means equal trees."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def group_arrays(group) -> dict[str, np.ndarray]:
    """All arrays of a store group (plan or teacher), read whole."""
    return {name: group.array(name)[:] for name in group.names}


@pytest.fixture(scope="session")
def train_data():
    return open_dataset(DATA)


@pytest.fixture(scope="session")
def val_data():
    return open_dataset(DATA, "val")


@pytest.fixture(scope="session")
def plan():
    return ViewPlan(ViewRecipe(), seed=0)


@pytest.fixture(scope="session")
def teacher1():
    return make_teacher(seed=0)


@pytest.fixture(scope="session")
def teacher2():
    return make_teacher(seed=1)


@pytest.fixture(scope="session")
def base_store(tmp_path_factory, train_data, plan, teacher1) -> Path:
    """A store with teacher 't1' (resnet18, seed 0): full float32 logits and features, 2 views, all committed."""
    path = tmp_path_factory.mktemp("base") / "store"
    store = open_store(path, train_data, plan, views=VIEWS, block=BLOCK, size=SIZE)
    extract(
        store, train_data, runner_for(teacher1, logits="full", dtype="float32"), "t1", views=VIEWS, batch_size=BATCH
    )
    return path


@pytest.fixture(scope="session")
def two_teacher_store(tmp_path_factory, base_store, train_data, plan, teacher2) -> Path:
    """``base_store`` plus teacher 't2' (resnet18, seed 1) as top-3 float16 logits, extracted second."""
    path = tmp_path_factory.mktemp("two") / "store"
    shutil.copytree(base_store, path)
    store = open_store(path, train_data, plan, views=VIEWS, block=BLOCK, size=SIZE)
    extract(
        store,
        train_data,
        runner_for(teacher2, logits="topk", k=3, dtype="float16"),
        "t2",
        views=VIEWS,
        batch_size=BATCH,
    )
    return path


@pytest.fixture(scope="session")
def wide_store(tmp_path_factory, base_store, train_data, plan, teacher1) -> Path:
    """``base_store`` plus teacher 'wide' (t1's model again, full float32) extracted with 3 views: t1 keeps 2."""
    path = tmp_path_factory.mktemp("wide") / "store"
    shutil.copytree(base_store, path)
    store = open_store(path, train_data, plan, views=VIEWS, block=BLOCK, size=SIZE)
    extract(store, train_data, runner_for(teacher1, logits="full", dtype="float32"), "wide", views=3, batch_size=BATCH)
    return path


@pytest.fixture
def store_copy(base_store, tmp_path) -> Path:
    """A private copy of ``base_store`` that a test may change."""
    path = tmp_path / "store"
    shutil.copytree(base_store, path)
    return path


@pytest.fixture(scope="session")
def reference(base_store):
    """The arrays of the uninterrupted extraction in ``base_store``: plan and teacher 't1'."""
    from storage import Store

    store = Store(base_store)
    return {"plan": group_arrays(store.plan), "t1": group_arrays(store.teacher("t1"))}


# -- an S3-compatible server (moto) on 127.0.0.1 ---------------------------------------------------


def free_port(ip: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


S3_SETTINGS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def start_moto_server() -> tuple[subprocess.Popen, str] | None:
    """A moto S3 server on a free loopback port, once it accepts connections (within 30 s): (process, endpoint);
    None, its process stopped, when it does not start."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while time.time() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=10)
    return None


SHARED_S3 = "TEACHER_CACHE_TEST_S3"  # the endpoint of the server an xdist controller started for its workers
_s3_process = pytest.StashKey[subprocess.Popen]()


def pytest_configure(config):
    """Under pytest-xdist the controller starts the run's one S3 server, before its workers start: they inherit its
    endpoint in ``SHARED_S3``, so that S3 tests spread over the workers (each with its own bucket) while one server
    serves them all. Not for a run that leaves the slow tests out: none of those uses S3."""
    if (
        os.environ.get("PYTEST_XDIST_WORKER")
        or not config.getoption("numprocesses", None)
        or "not slow" in (config.option.markexpr or "")
    ):
        return
    import importlib.util

    if importlib.util.find_spec("moto") is None:
        return
    started = start_moto_server()
    if started is not None:
        config.stash[_s3_process], os.environ[SHARED_S3] = started


def pytest_unconfigure(config):
    proc = config.stash.get(_s3_process, None)
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server():
    """The run's one moto server: the xdist controller's (``pytest_configure``), or else one started by the first test
    that needs it and stopped by its process id."""
    if os.environ.get(SHARED_S3):
        yield os.environ[SHARED_S3]
        return
    pytest.importorskip("moto.server")
    started = start_moto_server()
    if started is None:
        pytest.fail("the moto S3 server did not start")
    proc, endpoint = started
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """Credentials and endpoint as a user would set them, and an empty bucket: a test sees only what it writes."""
    import boto3

    for key, value in {**S3_SETTINGS, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(key, value)
    import s3fs

    # fsspec keeps one S3FileSystem per set of arguments for the process, with its listings cached: one made
    # before an earlier test emptied the bucket (or for another endpoint) would otherwise be reused here.
    s3fs.S3FileSystem.clear_instance_cache()
    client = boto3.client("s3")
    if BUCKET in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})
    else:
        client.create_bucket(Bucket=BUCKET)
    return client


# -- a two-node Ray cluster on loopback (tests/ray_cluster.py) ------------------------------------


@pytest.fixture(scope="session")
def cluster(s3_server):
    """The session's one cluster, shared by every test that names it; its nodes can reach the S3 server."""
    from ray_cluster import SharedCluster

    shared = SharedCluster(dashboard=True, extra_env={**S3_SETTINGS, "AWS_ENDPOINT_URL": s3_server})
    yield shared.start()  # started here, so that its start-up shows as this fixture's set-up time
    shared.close()


@pytest.fixture
def local_ray():
    """For a test whose command starts a local Ray instance in this process: shut down after it, so that the later
    tests do not run beside its idle processes (``pipeline.cluster.ray_env.connect`` would also reuse it)."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(autouse=True)
def _cluster_left_whole(request):
    """After a test that used the cluster: a node it took down means a fresh cluster for the next test."""
    yield
    if "cluster" in request.fixturenames:
        request.getfixturevalue("cluster").restore()


# -- the slow marker -----------------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups into the tests' ids
def pytest_collection_modifyitems(config, items):
    """A test that starts an S3 server or a Ray cluster must be marked slow: README's fast command leaves those out.

    Under pytest-xdist (``--dist loadgroup``) the tests that use the cluster form one group, run by one worker, so
    that a run starts one cluster, not one per worker; the tests marked ``local_ray`` form another (one local Ray
    instance at a time); the other tests, those on S3 among them (``pytest_configure``), spread over the workers."""
    for item in items:
        uses = {"s3_server", "cluster"} & set(getattr(item, "fixturenames", ()))
        if uses and item.get_closest_marker("slow") is None:
            raise pytest.UsageError(f"{item.nodeid} uses {', '.join(sorted(uses))}: mark it @pytest.mark.slow")
        if "cluster" in uses:
            item.add_marker(pytest.mark.xdist_group("cluster"))
        elif item.get_closest_marker("local_ray") is not None:
            item.add_marker(pytest.mark.xdist_group("local-ray"))


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """Under ``--dist loadgroup`` xdist marks a grouped test by its id (``...@group``); where it could not (pytest
    9.2 with xdist 3.8, pytest-dev/pytest-xdist#1386) every worker would start its own cluster: refuse, in one line."""
    if session.config.getoption("dist", "no") != "loadgroup" or not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    grouped = [item for item in session.items if item.get_closest_marker("xdist_group") is not None]
    if grouped and "@" not in grouped[0].nodeid:
        raise pytest.UsageError(
            f"pytest {pytest.__version__} with this pytest-xdist does not group tests (pytest-xdist#1386): install pytest<9.2, as pyproject.toml asks"
        )

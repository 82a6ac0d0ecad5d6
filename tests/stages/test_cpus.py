"""The CPU budget of a process: its threads and its loader processes within the CPUs it may use."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.cli import main
from stages.cpus import cgroup_quota, default_threads, usable_cpus, use_threads


@pytest.mark.parametrize(
    "files, quota",
    [
        ({"cpu.max": "200000 100000\n"}, 2),
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: two threads may run, each part of the time
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_the_cgroup_quota_in_whole_cpus(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_quota(tmp_path) == quota


def test_threads_and_loader_processes_share_the_cpus(monkeypatch):
    assert default_threads(0, cpus=8) == 8 and default_threads(6, cpus=8) == 2 and default_threads(16, cpus=8) == 1
    if hasattr(os, "sched_getaffinity"):
        assert usable_cpus() <= len(os.sched_getaffinity(0))
    monkeypatch.setattr("stages.cpus.usable_cpus", lambda: 3)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert use_threads(None, 2) == 1 and torch.get_num_threads() == 1
        assert use_threads(2, 2) == 2 and torch.get_num_threads() == 2
        # the user's OMP_NUM_THREADS, when it is a number of threads
        for env, threads in (("3", 3), ("0", 1), ("many", 1)):
            monkeypatch.setenv("OMP_NUM_THREADS", env)
            assert use_threads(None, 2) == threads and torch.get_num_threads() == threads
        assert use_threads(2, 2) == 2  # --threads over OMP_NUM_THREADS
    finally:
        torch.set_num_threads(before)


def test_threads_is_a_checked_flag(capsys, tmp_path):
    assert main(["--quiet", "train", "--data", "fake:8", "--out", str(tmp_path / "r"), "--threads", "0"]) != 0
    assert "--threads: must be an integer in [1," in capsys.readouterr().err


def test_an_omp_num_threads_beyond_what_threads_takes_is_one_line(monkeypatch):
    from stages.cpus import env_threads
    from storage import UserError

    monkeypatch.setenv("OMP_NUM_THREADS", "3000")
    with pytest.raises(UserError, match="OMP_NUM_THREADS=3000 is more threads than the 1024"):
        env_threads()


def test_more_loader_processes_than_memory_holds_is_said_in_one_line(caplog):
    from stages.cpus import check_workers

    with caplog.at_level("WARNING"):
        assert check_workers(64, memory=24 * 2**30).startswith("--workers 64 asks for about 29 GB of loader processes")
    assert len(caplog.records) == 1 and "about 52 fit" in caplog.text
    assert check_workers(8, memory=24 * 2**30) is None

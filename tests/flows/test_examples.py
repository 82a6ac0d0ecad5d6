"""The scripts in examples/ run as a reader would run them, on a digits store: in one process and under torchrun."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from pipeline.cli import main
from stages.training.epoch_steps import steps_per_epoch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DIGITS_TRAIN, BLOCK, BATCH = 1433, 256, 64


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory) -> Path:
    """A resnet18 teacher (random init) over 2 views of digits at 32 px, logits and features, in blocks of 256 (6 blocks)."""
    store = tmp_path_factory.mktemp("examples") / "digits"
    argv = [
        "--quiet",
        "extract",
        "--data",
        "digits",
        "--teacher",
        "resnet18",
        "--random-init",
        "--views",
        "2",
        "--size",
        "32",
        "--block",
        str(BLOCK),
    ]
    assert main([*argv, "--store", str(store)]) == 0
    return store


def run_example(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def epoch_lines(out: str) -> list[re.Match]:
    return [
        m for m in re.finditer(r"epoch (\d+): loss ([\d.]+).*\((\d+) steps of (\d+) views on each of (\d+) rank", out)
    ]


def test_the_plain_loop_trains_a_student_from_the_cache(digits_store, tmp_path):
    out = run_example(
        sys.executable,
        str(EXAMPLES / "distill_loop.py"),
        "--store",
        str(digits_store),
        "--epochs",
        "2",
        "--out",
        str(tmp_path / "s.pt"),
    )
    lines = epoch_lines(out)
    assert [int(m[1]) for m in lines] == [1, 2]
    # the whole training set each epoch
    assert all(int(m[3]) == steps_per_epoch(DIGITS_TRAIN, BLOCK, BATCH, 1) for m in lines)
    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    student = timm.create_model("resnet10t", num_classes=10)
    student.load_state_dict(saved["model"])  # a plain timm student
    assert saved["loader"] == {
        "epoch": 2,
        "position": 0,
        "seed": 0,
        "batch_size": BATCH,
        "repeats": 1,
        "rank": 0,
        "world": 1,
    }


def test_the_same_loop_under_torchrun_splits_the_store_over_two_ranks(digits_store, tmp_path):
    # a free port of its own
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = run_example(
        *torchrun,
        str(EXAMPLES / "distill_loop.py"),
        "--store",
        str(digits_store),
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "s.pt"),
    )
    (line,) = epoch_lines(out)
    assert int(line[5]) == 2
    # Each rank takes its own blocks, and both take the same number of steps (none waits at a collective).
    assert int(line[3]) == steps_per_epoch(DIGITS_TRAIN, BLOCK, BATCH, 2) > 0
    assert torch.load(tmp_path / "s.pt", weights_only=True)["loader"]["world"] == 2


def test_timms_factories_and_the_cached_teacher_task_train_from_the_cache(digits_store, tmp_path):
    out = run_example(
        sys.executable,
        str(EXAMPLES / "timm_task_from_cache.py"),
        "--store",
        str(digits_store),
        "--epochs",
        "2",
        "--out",
        str(tmp_path / "s.pt"),
    )
    lines = re.findall(r"epoch (\d+): loss ([\d.]+), task_loss ([\d.]+), kd_loss ([\d.]+), lr ([\d.e+-]+)", out)
    assert [int(e) for e, *_ in lines] == [1, 2]
    assert all(float(kd) > 0 for *_, kd, _ in lines)  # the cached teacher's term is in the loss
    assert float(lines[0][4]) > float(lines[1][4])  # timm's cosine schedule, stepped per update, decays
    student = timm.create_model("resnet10t", num_classes=10)
    student.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True)["model"])

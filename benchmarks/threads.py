"""Threads against loader processes: one `pipeline distill` epoch with the default --threads, 1 and 2, quiet and loaded.

torch's own default is every core of the machine, however busy; `distill`, `train` and `extract` now default to
the CPUs the process may use (affinity, cgroup quota) less their loader processes (``stages.cpus``). Each cell is
the command line run as a user runs it (a subprocess, OMP_NUM_THREADS unset), the second epoch's views/s from its
metrics.jsonl (the first warms up); "loaded" runs as many busy processes beside it as the machine has CPUs, a
neighbour's job on a shared node. Rounds interleave every cell; medians are quoted, with each cell's ratio to the
default's in the same round.

    .venv/bin/python benchmarks/threads.py                  # about 14 minutes on 2 cores
    .venv/bin/python benchmarks/threads.py --rounds 1 --workers 0
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="fake:512?size=64&classes=10", help="dataset of the store")
    p.add_argument("--student", default="resnet18")
    p.add_argument(
        "--threads", default="default,1,2", help="the --threads values to compare; 'default' leaves the flag out"
    )
    p.add_argument("--workers", default="0,2", help="loader processes (comma-separated)")
    p.add_argument("--rounds", type=int, default=2)
    return p.parse_args()


def make_store(data: str, where: Path) -> Path:
    """One view of a random-init resnet18 teacher over ``data``, as `pipeline extract` writes it."""
    store = where / "store"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "--quiet",
        "extract",
        "--data",
        data,
        "--store",
        str(store),
        "--teacher",
        "resnet18",
        "--random-init",
        "--views",
        "2",
        "--size",
        "64",
        "--threads",
        "1",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return store


def epoch_rate(store: Path, student: str, threads: str, workers: int, out: Path) -> float:
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "--quiet",
        "distill",
        "--from-cache",
        str(store),
        "--student",
        student,
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--workers",
        str(workers),
        "--verify",
        "none",
        "--out",
        str(out),
    ]
    if threads != "default":
        cmd += ["--threads", threads]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    subprocess.run(cmd, cwd=ROOT, check=True, env=env)
    lines = [json.loads(text) for text in (out / "metrics.jsonl").read_text().splitlines()]
    return lines[-1]["views_per_s"]


def _busy() -> None:
    while True:
        pass


def main() -> None:
    args = parse_args()
    from stages.cpus import default_threads, usable_cpus

    threads, workers = args.threads.split(","), [int(w) for w in args.workers.split(",")]
    cpus = usable_cpus()
    print(
        f"CPUs this process may use: {cpus} (os.cpu_count {os.cpu_count()}); default threads: "
        + ", ".join(f"{default_threads(w)} with {w} loader process(es)" for w in workers)
    )
    rates: dict[tuple, list[float]] = {}
    ratios: dict[tuple, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(args.data, Path(tmp))
        for r in range(args.rounds):
            for load in ("quiet", "loaded"):
                hogs = [
                    multiprocessing.Process(target=_busy, daemon=True) for _ in range(cpus if load == "loaded" else 0)
                ]
                for h in hogs:
                    h.start()
                try:
                    for w in workers:
                        row = {
                            t: epoch_rate(store, args.student, t, w, Path(tmp) / f"run-{r}-{load}-{w}-{t}")
                            for t in threads
                        }
                        for t, rate in row.items():
                            rates.setdefault((load, w, t), []).append(rate)
                            ratios.setdefault((load, w, t), []).append(rate / row[threads[0]])
                finally:
                    for h in hogs:
                        h.terminate()
    print(
        f"\n{args.data}, student {args.student}, batch 64; views/s of the second epoch, median of {args.rounds} round(s)"
    )
    print(f"{'machine':<8}{'workers':>8}{'--threads':>14}{'views/s':>10}{'vs ' + threads[0]:>12}")
    for (load, w, t), values in rates.items():
        shown = f"{t} ({default_threads(w)})" if t == "default" else t
        print(
            f"{load:<8}{w:>8}{shown:>14}{statistics.median(values):>10.1f}{statistics.median(ratios[load, w, t]):>12.2f}"
        )


if __name__ == "__main__":
    main()

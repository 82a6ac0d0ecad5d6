"""How many CPU threads a training or extraction process should use, so that its threads and its loader
processes together stay within the CPUs it may use.

torch's default intra-op thread count is the machine's core count, whatever else runs: on a shared 2-core
machine a distill epoch ran at 30 views/s with it and at 202 with one thread (``benchmarks/threads.py``). The
CPUs a process may use are its affinity mask (``taskset``, Slurm, Ray), bounded by a cgroup CPU quota
(containers, Kubernetes); the loader processes each render on one of them.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP = Path("/sys/fs/cgroup")
MAX_THREADS = 1024  # the most --threads takes (stages.settings.MAX_WORKERS)
# the memory a loader process holds (measured: about 470 MB, a forked torch with its imports)
WORKER_BYTES = 470 * 2**20


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, bounded by its cgroup's CPU quota, at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_quota()
    return max(1, min(cpus, quota) if quota else cpus)


def cgroup_quota(root: Path = CGROUP) -> int | None:
    """The cgroup CPU quota in whole CPUs (rounded up), or None without one: cgroup v2 ``cpu.max``, else v1's
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return max(1, math.ceil(int(text[0]) / int(text[1])))
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota, period = (
            int((root / "cpu" / "cpu.cfs_quota_us").read_text()),
            int((root / "cpu" / "cpu.cfs_period_us").read_text()),
        )
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def default_threads(workers: int, cpus: int | None = None) -> int:
    """Intra-op threads for a process with ``workers`` loader processes: the CPUs left to it, at least 1."""
    return max(1, (usable_cpus() if cpus is None else cpus) - workers)


def env_threads() -> int | None:
    """``OMP_NUM_THREADS`` when it holds a whole number of at least 1: the user (or a scheduler such as Slurm,
    Ray, or a test runner giving each of its workers one core) has already chosen, and torch reads it too."""
    try:
        threads = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    if threads > MAX_THREADS:
        from storage import UserError

        raise UserError(
            f"OMP_NUM_THREADS={threads} is more threads than the {MAX_THREADS} this tool takes (as --threads): set it lower, or pass --threads N"
        )
    return threads if threads >= 1 else None


def available_memory() -> int | None:
    """Bytes of memory this machine has available now (``MemAvailable``), or None where that cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_workers(workers: int, memory: int | None = None) -> str | None:
    """One line when ``workers`` loader processes would need more memory than is available now (logged as a warning), else None."""
    memory = available_memory() if memory is None else memory
    if not memory or workers * WORKER_BYTES <= memory:
        return None
    line = (
        f"--workers {workers} asks for about {workers * WORKER_BYTES / 2**30:.0f} GB of loader processes (about {WORKER_BYTES >> 20} MB "
        f"each) with {memory / 2**30:.0f} GB available: the system may swap or kill them; about {max(1, memory // WORKER_BYTES)} fit"
    )
    log.warning(line)
    return line


def use_threads(requested: int | None, workers: int) -> int:
    """Set torch's intra-op threads to ``requested``, else to ``OMP_NUM_THREADS``, else to ``default_threads(workers)``;
    the number set. Says so in one line when the available memory cannot hold ``workers`` loader processes (``check_workers``)."""
    import torch

    check_workers(workers)

    threads = requested or env_threads() or default_threads(workers)
    torch.set_num_threads(threads)
    return threads

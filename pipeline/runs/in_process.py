"""A distill run in this process (``pipeline distill`` without Ray Train, a sweep trial), and the lines that report a run."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from stages.training.job import DistillJob, build_distill

from pipeline.runs.files import RunFiles
from pipeline.runs.resume import checkpoint_hooks


def run_record(job: DistillJob, **how) -> dict:
    """config.yaml of a distill run: the job, and how it ran."""
    return {"command": "distill", **how, "job": job.to_dict()}


def distill_here(
    job: DistillJob,
    out: Path,
    *,
    device,
    resume: bool,
    on_epoch: Callable[[dict], None] | None = None,
    record: dict | None = None,
    lock: bool = True,
):
    """A distill run in this process (the CLI without Ray Train, a sweep trial): OUT/checkpoint.pt every epoch.

    ``on_epoch(line)`` sees each epoch's metrics line (a sweep reports it to Ray Tune)."""
    run = build_distill(job, device)
    # Nothing is written to --out before the run has passed its set-up (see RunFiles).
    record = {**(record or run_record(job, device=str(device))), "views": run.plan.describe()}  # the store's, replayed
    with RunFiles(out, record, lock=lock) as files:
        hooks = checkpoint_hooks(out, job.run_record(), resume=resume, start=files.start, on_epoch=on_epoch)
        return run.train(out_dir=out, hooks=hooks, device=device)


def result_line(job: DistillJob, result, how: str = "") -> str:
    s = job.train
    return f"{s.student} ({s.method}{how}): {top1_text(result)} after {s.epochs} epochs, {result.seconds:.1f} s"


def top1_text(result) -> str:
    top1 = result.metrics[-1].get("val_top1")
    return "no validation data (pass --val-data)" if top1 is None else f"val top-1 {top1:.4f}"

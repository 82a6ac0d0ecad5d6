"""Distillation on Ray Train: ``stages.training.distill.train`` in N DDP workers, a checkpoint every epoch.

The driver resolves and checks everything, then hands each worker the run's
``DistillJob`` as a plain dict; a worker builds it (``build_distill``: the store,
its own teacher rows, the student) and trains on its share of every epoch's units (DDP: gloo
on CPUs, NCCL on GPUs). After each epoch rank 0 writes a checkpoint (the whole
training state plus the metrics so far) and every rank reports, so a failed
worker restarts the run from the last epoch (FailureConfig) and ``--resume``
continues a stopped one. The checkpoints live under ``OUT/ray/distill``, or
under ``--checkpoints DIR_OR_URL/distill`` (an s3:// prefix every node can
reach, on a multi-node cluster); at the end the driver writes the same files
into ``--out`` as a run without Ray.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

from stages.training.job import DistillJob, build_distill
from storage import Location, UserError

from pipeline.cluster import ray_env
from pipeline.runs.resume import check_same_run

log = logging.getLogger("pipeline")

RUN_NAME = "distill"  # one run per --out, so --resume finds it by name


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: build the run ``config["job"]`` describes, restore the last checkpoint if any, train."""
    import ray.train
    import torch

    from stages.training.distill import EpochHooks

    job = DistillJob.from_dict(config["job"])
    if config.get("threads"):  # else Ray's OMP_NUM_THREADS: the CPUs it gave this worker
        torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device() if config["gpus_per_worker"] else torch.device("cpu")
    run = build_distill(job, device)
    rank = ray.train.get_context().get_world_rank()
    # Rank 0 speaks for the run: its progress and epoch lines reach the driver's console through Ray.
    for name in ("stages", "pipeline"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(logging.StreamHandler())
        logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        logger.propagate = False  # Ray's worker has a root handler too: each line once

    state, starts = None, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            # tensors and plain values only
            state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
            starts = json.loads((Path(d) / "run.json").read_text())["starts"]
    starts = [*starts, state["epoch"] if state else 0]  # where each attempt of this run began: the restart record

    def save(state: dict, line: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            saved = None
            if rank == 0:  # DDP keeps the replicas equal: one copy is the checkpoint
                torch.save(state, Path(tmp) / "state.pt")
                run = {
                    "starts": starts,
                    "metrics": state["metrics"],
                    "settings": job.run_record(),
                    "student": state["student"],
                }
                (Path(tmp) / "run.json").write_text(json.dumps(run))
                saved = ray.train.Checkpoint.from_directory(tmp)
            # Every rank reports (a barrier); result.metrics keeps only metrics reported with a checkpoint.
            ray.train.report(line, checkpoint=saved, checkpoint_dir_name=f"epoch-{line['epoch']:04d}")

    run.train(hooks=EpochHooks(state, save), device=device)


def latest_checkpoint(run_dir: Location) -> Location | None:
    """The newest checkpoint of the run in ``run_dir`` that holds its run record."""
    for name in reversed([n for n in run_dir.listdir() if n.startswith("epoch-")]):
        if (run_dir / name / "run.json").exists():
            return run_dir / name
    return None


def distill_on_ray(
    job: DistillJob,
    out: Path,
    *,
    workers: int,
    gpus_per_worker: float,
    address: str | None,
    max_failures: int,
    resume: bool,
    checkpoints: str | None = None,
    on_start=None,
    threads: int | None = None,
):
    """Train on a Ray cluster (or a local Ray); write OUT/student.safetensors and OUT/metrics.jsonl like ``train``."""
    from ray.train import TrainingFailedError

    from stages.training.distill import TrainResult

    storage = ray_env.for_workers(checkpoints or str(out / "ray"))
    run_dir = storage / RUN_NAME
    if resume:
        last = latest_checkpoint(run_dir)
        if last is None:
            raise UserError(f"no checkpoint to resume under {run_dir}: run without --resume to start")
        check_same_run((last / "run.json").read_json()["settings"], job.run_record())
        log.info("resuming the run in %s from its checkpoint %s", run_dir, last.name)
    ray_env.connect(address)
    ray_env.require_gpus(gpus_per_worker, workers)
    ray_env.check_visible(Location(job.store), "store")
    _claim(storage)
    if on_start is not None:  # every check passed: the run's own files (its lock, config.yaml, run.log) may be written
        on_start()
    if not resume:  # only now that the folder is ours: a refused run leaves the old one's checkpoints alone
        run_dir.remove_tree()  # a fresh run: Ray Train would otherwise pick up the old run's checkpoints by name
    for stale in ("student.safetensors", "config.json", "metrics.jsonl"):  # a stale result must not pass for this run's
        (out / stale).unlink(missing_ok=True)
    trainer = _trainer(
        {"job": job.to_dict(), "gpus_per_worker": gpus_per_worker, "threads": threads},
        storage,
        workers,
        gpus_per_worker,
        max_failures,
    )
    start = time.perf_counter()
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        raise UserError(_worker_error(e, max_failures)) from e
    if result.checkpoint is None:
        raise UserError(f"the Ray Train run in {run_dir} reported no checkpoint: see {out / 'run.log'}")
    metrics = _write_outputs(result.checkpoint, out)
    return TrainResult(model=None, metrics=metrics, seconds=time.perf_counter() - start)  # the weights are on disk


def _claim(storage: Location) -> None:
    """The checkpoint location made, and checked visible to every node; a refused run leaves no empty folder."""
    made = not storage.exists()
    storage.makedirs()
    try:
        ray_env.check_visible(storage, "checkpoint location")
    except UserError:
        if made:
            storage.remove_tree()
        raise


def _trainer(config: dict, storage: Location, workers: int, gpus_per_worker: float, max_failures: int):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=gpus_per_worker > 0,
            resources_per_worker={"CPU": 1, **({"GPU": gpus_per_worker} if gpus_per_worker else {})},
        ),
        # Same name and storage path: Ray Train V2 reloads the run's checkpoint list, so --resume and a
        # restart after a failed worker both get the latest checkpoint from ray.train.get_checkpoint().
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage.url,  # pyarrow resolves URLs (s3://...) with the same AWS_* settings as the store
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # one per epoch, all kept: each is one student
        ),
    )


def _write_outputs(checkpoint, out: Path) -> list[dict]:
    """The last checkpoint's student and metrics, as the same OUT files a run without Ray writes."""
    import torch

    from stages.training.run_metrics import RunMetrics
    from stages.training.student_card import StudentCard
    from stages.training.student_files import save_student

    with checkpoint.as_directory() as d:
        run = json.loads((Path(d) / "run.json").read_text())
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    for epoch, attempt in zip(run["starts"][1:], range(1, len(run["starts"]))):
        log.info(
            "ray train: attempt %d (after a failed worker, or --resume) began from the checkpoint after epoch %d",
            attempt + 1,
            epoch,
        )
    save_student(
        out, state.get("student_weights", state["model"]), StudentCard(**run["student"]), metrics=run["metrics"]
    )
    settings = run["settings"]  # metrics.jsonl, TensorBoard events and --log's, as a run without Ray writes them
    with RunMetrics(out, tuple(settings.get("log") or ()), settings) as record:
        for line in run["metrics"]:
            record.write(line)
    for line in run["metrics"]:
        log.info("epoch %d: %s", line["epoch"], ", ".join(f"{k} {v:.4g}" for k, v in line.items() if k != "epoch"))
    return run["metrics"]


def _worker_error(e: Exception, max_failures: int) -> str:
    user = ray_env.user_error(e)
    if user is not None:  # a user mistake found inside a worker: its own line
        return str(user)
    text = str(e).strip()
    last = text.splitlines()[-1] if text else type(e).__name__
    return f"Ray Train failed after {max_failures} restart(s): {last}; run again with --resume to continue from the last checkpoint"

"""`pipeline sweep`: many `distill --from-cache` runs over one store, as Ray Tune trials, and their summary.

A sweep file is a distill ``--config`` file (any TrainSettings field,
``method_args``, plus ``teacher_id`` / ``teacher_weights``) with a ``search:``
section of grid values and random distributions over those settings::

    student: resnet10t
    epochs: 10
    search:
      method: [kd, dkd]                           # a grid: every value
      method_args.temperature: {grid: [1, 4]}     # a method argument, by its dotted name
      lr: {loguniform: [0.0005, 0.005]}           # a random draw per sample
    samples: 1          # random draws; each takes every grid combination
    metric: val_top1    # what the table ranks by (mode: max; train_* losses: min)
    early_stop: {grace_epochs: 2, reduction_factor: 2}   # ASHA on the per-epoch metric (or --early-stop)

Each trial is the distill run ``pipeline distill --from-cache STORE --config
OUT/<trial>/settings.yaml --out OUT/<trial>`` would make: the same ``DistillJob``
(``pipeline.sweeps.spec.trial_job``), built and trained in its Ray Tune process by the
same code (``pipeline.runs.in_process.distill_here``), with no command line parsed.
Everything that can be checked (setting names, values, distributions, method
arguments, teachers, validation data) is checked here, before Ray starts. The
file's grammar lives in ``pipeline.sweeps.spec``, the Tune side (trainable,
callbacks, restore) in ``pipeline.sweeps.tune``, the summary (table,
``sweep.csv``, ``sweep.png``, read from the trial folders alone, so
``--summary`` needs no Ray) in ``pipeline.sweeps.summary``.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

from storage import Location, UserError
from storage.lock import WriterLock

from pipeline.settings import config
from pipeline.sweeps.spec import (
    EARLY_STOP_DEFAULTS,
    LOG_FILE,
    SWEEP_FILE,
    SweepSpec,
    describe,
    load_sweep,
    trial_job,
    trial_settings,
)
from pipeline.settings.setting_flags import flag_type
from pipeline.sweeps.summary import print_summary

log = logging.getLogger("pipeline")

MAX_TRIALS = 1000  # trials a sweep may make unless --max-trials says more
MAX_CHECKED_TRIALS = 4096  # representative trials resolved before the sweep starts
# what validation reports (stages.training.distill.loop.validate); train_* depend on the method
VAL_METRICS = ("val_top1", "val_top1_ema")


def add_sweep_parser(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="many distill runs over one store as Ray Tune trials: grid and random search, early stopping, a ranked table",
    )
    p.add_argument(
        "--from-cache",
        metavar="STORE",
        help="the store made by `pipeline extract` (required unless --summary; default: none)",
    )
    p.add_argument(
        "--config",
        metavar="SWEEP_YAML",
        help="fixed distill settings plus a search: section (see configs/sweeps/) (required unless --summary)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="the sweep folder: one folder per trial (what distill --out writes), sweep.yaml, sweep.csv, sweep.png, sweep.log",
    )
    p.add_argument(
        "--summary",
        action="store_true",
        help="only print the table and write sweep.csv and sweep.png of the sweep in --out, from its trial folders (default: run the sweep)",
    )
    p.add_argument("--data", help="training data, when it moved since extraction (default: the store's)")
    p.add_argument(
        "--val-data",
        help="validation data for folder datasets, folder:PATH (default: digits and fake have their own split)",
    )
    _tune_flags(p)
    p.add_argument("--online", action="store_true", help="refused: sweeps run from the cache (default: off)")
    p.set_defaults(func=sweep_command)


def _tune_flags(p) -> None:
    g = p.add_argument_group("Ray Tune")
    g.add_argument(
        "--cpus-per-trial",
        type=flag_type("cpus_per_trial"),
        default=1.0,
        help="CPUs each trial holds; its torch threads follow (default: 1)",
    )
    g.add_argument(
        "--gpus-per-trial",
        type=flag_type("gpus_per_trial"),
        default=0.0,
        help="GPUs each trial holds (0.5: two trials share one); a trial with a GPU trains on CUDA (default: 0)",
    )
    g.add_argument(
        "--max-concurrent",
        type=flag_type("max_concurrent"),
        default=0,
        help="trials at once at most; 0: as many as the CPUs and GPUs hold (default: 0)",
    )
    g.add_argument(
        "--early-stop",
        action="store_true",
        help="stop weak trials early (ASHA on the metric per epoch; the sweep file's early_stop: tunes it) (default: off, unless the file has early_stop:)",
    )
    g.add_argument(
        "--max-trials",
        type=flag_type("max_trials"),
        default=MAX_TRIALS,
        help=f"refuse a sweep file that makes more trials than this (default: {MAX_TRIALS:,})",
    )
    g.add_argument(
        "--retry-errored",
        action="store_true",
        help="when resuming, run the trials that failed again from scratch (default: failed trials stay failed)",
    )
    g.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="Ray cluster to join, HOST:PORT, ray://HOST:PORT or auto (default: RAY_ADDRESS, else a local Ray instance)",
    )


def _representative_trials(spec: SweepSpec) -> list[dict]:
    grids = [a.values for a in spec.axes]  # every listed value, or both bounds of a range
    trials = []
    for values in itertools.product(*grids):
        trials.append(dict(zip((a.name for a in spec.axes), values)))
        if len(trials) >= MAX_CHECKED_TRIALS:
            break
    return trials


def check_sweep(spec: SweepSpec, job: dict, where: str) -> int:
    """Resolve every representative trial exactly as its run will; returns the most epochs a trial trains.

    Grid and choice values are checked one by one (every combination), a uniform or loguniform range at
    both bounds; each combination becomes its trial's ``DistillJob`` (types, ranges, the method's
    arguments), its student is built through timm (once per distinct model and arguments), its teacher(s)
    opened from the store.
    """
    from stages.cache.store_setup import data_source, store_dataset
    from stages.data.datasets import validation_data
    from stages.training.job import cached_source
    from stages.training.student import run_student
    from storage import Store

    store = Store(job["store"])
    # the store's data (or --data) exists and is the one it was made from
    dataset = store_dataset(store, job.get("data"))
    source = data_source(store, job.get("data"))
    if spec.metric.startswith("val_") and spec.metric not in VAL_METRICS:  # a trial would report nothing to rank by
        raise UserError(
            f"{where}: no trial reports metric {spec.metric}: validation gives {', '.join(VAL_METRICS)} (the _ema one with model_ema)"
        )
    if spec.metric.startswith("val_") and validation_data(dataset, job.get("val_data")) is None:
        raise UserError(
            f"{where}: metric {spec.metric} needs validation data, and {source} has none: pass --val-data folder:PATH, or rank by metric: train_loss"
        )
    epochs, teachers, students = 0, set(), set()
    for params in _representative_trials(spec):
        here = f"{where}, trial {describe(params)}"
        try:
            trial = trial_job(job, trial_settings(spec.fixed, params), "the sweep file")
            train = trial.train
            if spec.metric == "val_top1_ema" and not train.model_ema:
                raise UserError("metric val_top1_ema needs model_ema in every trial")
            epochs = max(epochs, train.epochs)
            kwargs = json.dumps(train.student_kwargs, sort_keys=True)
            student = (train.student, train.student_weights, kwargs, train.drop_path)
            teacher = (trial.teacher_id, trial.teacher_weights, train.method)
            if student not in students:  # timm refuses a bad model argument only when the model is built
                students.add(student)
                run_student(train, store.record.dataset.num_classes)
            if teacher not in teachers:
                teachers.add(teacher)
                cached_source(store, trial)  # each part's teacher too, for a composite method
        except UserError as e:
            raise UserError(f"{here}: {e}") from e
    return epochs


def _bounded(spec: SweepSpec, max_trials: int, where: str) -> SweepSpec:
    if spec.num_trials > max_trials:  # a typo (samples: 1000000000, three grids of 100) would never start a trial
        raise UserError(
            f"{where} makes {spec.num_trials:,} trials ({spec.grid_size:,} grid combination(s) x {spec.samples:,} sample(s)), more than "
            f"--max-trials {max_trials:,}: narrow the search, or raise --max-trials"
        )
    return spec


def _check_same_sweep(saved: Path, record: dict, out: Path) -> None:
    """A sweep folder resumes only the sweep it holds."""
    if not saved.is_file():
        return
    before = config.load_yaml(saved)
    changed = sorted(
        k
        for k in record
        if json.dumps(before.get(k), sort_keys=True) != json.dumps(json.loads(json.dumps(record[k])), sort_keys=True)
    )
    if changed:
        raise UserError(
            f"{out} holds a sweep with other settings ({', '.join(changed)} changed): run the same command to resume it, "
            "or pass another --out for a new sweep"
        )


def sweep_command(args) -> None:
    from pipeline.cluster import ray_env

    out = Path(args.out).absolute()
    if args.online:
        raise UserError(
            "sweeps run from the cache: drop --online (a live teacher in every trial is the cost the cache exists to save)"
        )
    if args.summary:
        print_summary(out)
        return
    _check_flags(args)
    where = f"sweep {args.config}"
    spec = _bounded(load_sweep(args.config), args.max_trials, where)
    if args.early_stop and spec.early_stop is None:
        spec.early_stop = dict(EARLY_STOP_DEFAULTS)
    job = _trial_base(args, spec, out)
    max_epochs = check_sweep(spec, job, where)
    record = {
        "command": "sweep",
        "store": job["store"],
        "data": job["data"],
        "val_data": job["val_data"],
        **spec.to_dict(),
    }
    saved = out / SWEEP_FILE
    _check_same_sweep(saved, record, out)
    from pipeline.runs.files import run_log
    from pipeline.sweeps.tune import join_cluster, run_sweep

    join_cluster(args.ray_address, args.cpus_per_trial, args.gpus_per_trial, out, job["store"])
    with (
        WriterLock(Location(str(out / "sweep.lock")), f"sweep folder {out}", busy="is in use"),
        run_log(out / LOG_FILE),
    ):
        config.save(saved, record)
        _say_sweep(out, spec, job)
        try:
            run_sweep(
                spec,
                job,
                out,
                max_epochs=max_epochs,
                cpus=args.cpus_per_trial,
                gpus=args.gpus_per_trial,
                max_concurrent=args.max_concurrent,
                retry_errored=args.retry_errored,
                debug=args.debug,
            )
        except KeyboardInterrupt:
            ray_env.leave_quietly()  # the trials end now, before the last line ("interrupted: ..."), and silently
            raise
    print_summary(out)


def _check_flags(args) -> None:
    if not args.from_cache or not args.config:
        raise UserError(
            "pipeline sweep needs --from-cache STORE and --config SWEEP_YAML (or --summary, to report the sweep in --out)"
        )


def _trial_base(args, spec: SweepSpec, out: Path) -> dict:
    """What every trial shares, as plain values a Tune worker receives (paths absolute for any node)."""
    from pipeline.cluster import ray_env

    return {
        "store": ray_env.for_workers(args.from_cache).url,
        "out": str(out),
        "data": ray_env.source_for_workers(args.data),
        "val_data": ray_env.source_for_workers(args.val_data),
        "device": "cuda" if args.gpus_per_trial > 0 else "cpu",
        "threads": max(1, int(args.cpus_per_trial)),
        "fixed": spec.fixed,
        "names": [a.name for a in spec.axes],
        "metric": spec.metric,
    }


def _say_sweep(out: Path, spec: SweepSpec, job: dict) -> None:
    log.info(
        "sweep %s: %d trial(s) (%d grid combination(s) x %d sample(s)) of %s over %s, ranked by %s (%s)%s",
        out,
        spec.num_trials,
        spec.grid_size,
        spec.samples,
        ", ".join(f"{a.name} {a.describe()}" for a in spec.axes) or "nothing",
        job["store"],
        spec.metric,
        spec.mode,
        f"; ASHA early stopping, grace {spec.early_stop['grace_epochs']} epoch(s)" if spec.early_stop else "",
    )

"""The Ray Tune side of `pipeline sweep`: the trial function, a line per trial event, a fresh start or Tune's restore.

A trial builds its ``DistillJob`` from the sweep's settings and its own values
(``pipeline.sweeps.spec.trial_job``) and trains it in its Tune process as an in-process
distill run does (``pipeline.runs.in_process.distill_here``: no Ray Train), reporting
every epoch line through ``on_epoch`` to ``tune.report``, which is what ASHA
stops on. Trial folders are
``--out/<trial>``; Tune's experiment state lives in ``--out`` itself, so the
same command after a killed driver finds it (``Tuner.can_restore``) and
continues (``Tuner.restore``). Tune saves that state only every ten seconds or
so, so a trial also leaves ``trial.json`` in its folder: a trial that Tune
restarts although it had finished (killed driver, state not yet saved) finds
its record, reports its stored epochs again and returns without training. A
trial killed mid-run continues from its folder's checkpoint.pt (``--resume``),
which it removes once it has ended.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from ray import tune

from storage import Location, UserError

from pipeline.cluster import ray_env
from pipeline.runs.resume import CHECKPOINT
from pipeline.runs.in_process import distill_here, result_line, run_record
from pipeline.sweeps.spec import (
    SweepSpec,
    TrialNamer,
    describe,
    read_record,
    rerun_command,
    trial_job,
    trial_settings,
    write_record,
    write_trial_settings,
)

log = logging.getLogger("pipeline")


def one_line(error: BaseException) -> str:
    """A trial's failure as one line: a UserError's own text, else the exception's type and its first line."""
    user = ray_env.user_error(error)
    if user is not None:
        return str(user)
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _plain(value):
    return json.loads(json.dumps(value))  # as a JSON record holds it: lists, not tuples


def _with_metric(line: dict, metric: str) -> dict:
    """Tune stops the whole sweep on a result without its metric (a loss part another method has not): NaN then."""
    return {**line, metric: line.get(metric, float("nan"))}


def finished_before(record: dict, job: dict, settings: dict) -> bool:
    return (
        record.get("status") == "finished" and record.get("job") == job and record.get("settings") == _plain(settings)
    )


def _trial_logging() -> None:
    """A Tune process logs at WARNING; the distill run's own run.log wants its INFO lines, the console only warnings."""
    root = logging.getLogger()
    if not any(getattr(h, "_sweep_console", False) for h in root.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.WARNING)
        console._sweep_console = True
        root.addHandler(console)
    for name in ("stages", "pipeline"):
        logging.getLogger(name).setLevel(logging.INFO)


def run_trial(params: dict, job: dict) -> None:
    """One Tune trial: the distill run of the sweep's settings with this trial's ``params``, each epoch reported."""
    import torch

    from stages.training.run_metrics import read_metrics

    out = Path(job["out"]) / Path(tune.get_context().get_trial_dir()).name
    settings = trial_settings(job["fixed"], params)
    trial = trial_job(job, settings, f"trial {describe(params)}")
    key = _plain(trial.to_dict())
    previous = read_record(out)
    if finished_before(previous, key, settings):
        for line in read_metrics(out):  # Tune (and ASHA) see its epochs again; nothing is trained or written
            tune.report(_with_metric(line, job["metric"]))
        return
    # A trial whose process was killed mid-run (with the driver) continues after its last finished epoch.
    resume = previous.get("job") == key and (out / CHECKPOINT).is_file()
    write_trial_settings(settings, out)
    record = {
        "status": "running",
        "params": _plain(params),
        "settings": _plain(settings),
        "job": key,
        "command": rerun_command(trial, out, job["device"], job["threads"]),
        "started": time.time(),
        "pid": os.getpid(),
    }
    write_record(out, record)
    _trial_logging()
    torch.set_num_threads(job["threads"])
    start, last = time.perf_counter(), []

    def on_epoch(line: dict) -> None:
        # Tune may end a trial inside any report (ASHA at max_t too): the last epoch is reported only once
        # the student is saved and the record says finished.
        if line.get("epoch", 0) < trial.train.epochs:
            tune.report(_with_metric(line, job["metric"]))
        else:
            last.append(_with_metric(line, job["metric"]))

    try:
        # the sweep holds its folder
        result = distill_here(
            trial,
            out,
            device=job["device"],
            resume=resume,
            on_epoch=on_epoch,
            record=run_record(trial, device=job["device"], sweep=job["out"]),
            lock=False,
        )
    except SystemExit:  # Tune ends a trial it stops early (ASHA) from inside tune.report
        _ended(out, record, "stopped early", start)
        raise
    except Exception as e:
        _ended(out, record, "error", start, error=one_line(e))
        raise
    _ended(out, record, "finished", start, result=result_line(trial, result))
    for line in last:
        tune.report(line)


def _ended(out: Path, record: dict, status: str, start: float, **more) -> None:
    """The trial's record says how it ended; an ended trial is never continued, so its checkpoint goes (a lean sweep folder)."""
    write_record(
        out, {**record, "status": status, "seconds": time.perf_counter() - start, "ended": time.time(), **more}
    )
    if status != "error":
        (out / CHECKPOINT).unlink(missing_ok=True)


class TrialLines(tune.Callback):
    """One console line per trial event: started (or already finished), each epoch, finished, failed."""

    def __init__(self, out: str, names: list[str], metric: str, epochs: int):
        self.out, self.namer, self.metric, self.epochs = out, TrialNamer(names), metric, epochs

    def _name(self, trial) -> str:
        return Path(trial.path).name if getattr(trial, "path", None) else self.namer(trial)

    def on_trial_start(self, iteration, trials, trial, **info):
        name = self._name(trial)
        record = read_record(Path(self.out) / name)
        again = (
            " (finished before: its epochs are read back, nothing is trained)"
            if record.get("status") == "finished"
            else ""
        )
        log.info(
            "%s (%s): started%s",
            name,
            describe({n: trial.config[n] for n in self.namer.names if n in trial.config}),
            again,
        )

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        shown = f"{self.metric} {value:.4f}" if isinstance(value, (int, float)) else "no " + self.metric
        log.info("%s: epoch %s/%d, %s", self._name(trial), result.get("epoch", "?"), self.epochs, shown)

    def on_trial_complete(self, iteration, trials, trial, **info):
        log.info("%s: done", self._name(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        name = self._name(trial)
        error = read_record(Path(self.out) / name).get("error")
        if not error:  # the trial's process died before it could say why (killed, out of memory)
            error = _last_line(getattr(trial, "error_file", None)) or "its process ended without a record"
        log.warning("%s: failed: %s", name, error)


class CtrlC(tune.Callback):
    """Ctrl-C during ``tuner.fit()`` stops the sweep, however Tune's loop handles it.

    The handler raises KeyboardInterrupt, as Python's own does. Under load a SIGINT was seen to vanish inside
    Tune (the sweep then ran its trials to the end, exit 0; Python's handler was in place before fit): so the
    handler also remembers it, the callback raises it again at Tune's next step, and ``fit`` returning after one
    raises it there. Either way the CLI then prints its "interrupted" line and exits 130.
    """

    seen = False  # on the class: a resumed sweep runs the copy of this callback that Tune saved with the sweep

    @classmethod
    def handle(cls, signum, frame):
        cls.seen = True
        raise KeyboardInterrupt

    def on_step_begin(self, iteration, trials, **info):
        if CtrlC.seen:
            raise KeyboardInterrupt

    @classmethod
    @contextlib.contextmanager
    def installed(cls):
        cls.seen = False
        previous = signal.signal(signal.SIGINT, cls.handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
        if cls.seen:
            raise KeyboardInterrupt


def _last_line(path: str | None) -> str | None:
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()] if path else []
    except OSError:
        return None
    return lines[-1] if lines else None


@contextlib.contextmanager
def _tune_quiet(debug: bool):
    """Tune's own reporter and trial tracebacks off, and no TensorBoard logger of its own (trials write theirs):
    the sweep prints a line per trial event instead. With --debug, Tune's error logs stay on."""
    saved = {
        k: os.environ.get(k)
        for k in ("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "RAY_AIR_NEW_OUTPUT", "TUNE_DISABLE_SIGINT_HANDLER")
    }
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # the JSON and CSV loggers are passed explicitly
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the classic reporter, silent at verbose=0
    # Ctrl-C stops the sweep as a killed driver does: running trials keep their records and checkpoints, and the same
    # command resumes them (Tune's own handler would end them as if stopped early, and throw their checkpoints away).
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    tune_log = logging.getLogger("ray.tune")
    level = tune_log.level
    if not debug:
        tune_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        tune_log.setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def param_space(spec: SweepSpec) -> dict:
    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(v[0], v[1] + 1),
    }
    return {a.name: make[a.kind](a.values) for a in spec.axes}


def _check_resources(cpus: float, gpus: float) -> None:
    import ray

    have = ray.cluster_resources()
    if gpus > 0 and have.get("GPU", 0) < gpus:
        raise UserError(
            f"--gpus-per-trial {gpus:g} was asked for but the Ray cluster has {have.get('GPU', 0):g} GPUs: "
            "add GPU nodes, or pass --gpus-per-trial 0 to train on CPUs"
        )
    if have.get("CPU", 0) < cpus:
        raise UserError(
            f"--cpus-per-trial {cpus:g} is more than the Ray cluster's {have.get('CPU', 0):g} CPUs: no trial could start; ask for fewer"
        )


def join_cluster(address: str | None, cpus: float, gpus: float, out: Path, store: str) -> None:
    """Connect to Ray and check, before anything is written, that a trial fits and every node sees the store and --out."""
    ray_env.connect(address)
    _check_resources(cpus, gpus)
    out.mkdir(parents=True, exist_ok=True)
    ray_env.check_visible(Location(str(out)), "sweep folder --out")  # trials write their folders there from any node
    ray_env.check_visible(Location(store), "store")


def run_sweep(
    spec: SweepSpec,
    job: dict,
    out: Path,
    *,
    max_epochs: int,
    cpus: float,
    gpus: float,
    max_concurrent: int,
    retry_errored: bool,
    debug: bool,
) -> None:
    """Start the sweep in ``out``, or continue the one there (after ``join_cluster``); outcomes are left in the trial folders."""
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), {"cpu": cpus, "gpu": gpus})
    ctrl_c = CtrlC()
    if tune.Tuner.can_restore(str(out)):
        done = sum(read_record(p).get("status") == "finished" for p in out.glob("trial-*"))
        log.info("resuming the sweep in %s: %d trial(s) finished before are not run again", out, done)
        tuner = tune.Tuner.restore(
            str(out), trainable, resume_unfinished=True, resume_errored=False, restart_errored=retry_errored
        )
    else:
        tuner = _new_tuner(spec, trainable, out, max_epochs, max_concurrent, ctrl_c)
    with _tune_quiet(debug), ctrl_c.installed():
        results = tuner.fit()
    _settle_records(out, results, spec)


def _new_tuner(spec: SweepSpec, trainable, out: Path, max_epochs: int, max_concurrent: int, ctrl_c) -> tune.Tuner:
    """A fresh sweep's Tuner: the search space, ASHA when the sweep stops early, and the callbacks that keep its
    trial folders and lines."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    scheduler = None
    if spec.early_stop:
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=max_epochs,
            grace_period=min(spec.early_stop["grace_epochs"], max_epochs),
            reduction_factor=spec.early_stop["reduction_factor"],
        )
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            num_samples=spec.samples,
            scheduler=scheduler,
            # The limit goes to the generator itself: Tune ignores max_concurrent_trials beside a generator instance.
            search_alg=BasicVariantGenerator(random_state=spec.search_seed, max_concurrent=max_concurrent),
            trial_dirname_creator=TrialNamer([a.name for a in spec.axes]),
            reuse_actors=True,  # the next trial runs in a finished trial's process: torch and the project are imported once
        ),
        run_config=tune.RunConfig(
            name=out.name,
            storage_path=str(out.parent),
            verbose=0,
            # a failed trial is reported, not retried: its error is the user's to fix
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[
                JsonLoggerCallback(),
                CSVLoggerCallback(),
                TrialLines(str(out), [a.name for a in spec.axes], spec.metric, max_epochs),
                ctrl_c,
            ],
        ),
    )


def _settle_records(out: Path, results, spec: SweepSpec) -> None:
    """After the sweep: a trial Tune stopped early, or one whose process died, says so in its record."""
    for result in results:
        folder = out / Path(result.path).name
        record = read_record(folder)
        if not record:
            continue
        if result.error is not None and record.get("status") != "error":
            write_record(folder, {**record, "status": "error", "error": record.get("error") or one_line(result.error)})
        elif result.error is None and record.get("status") == "running":
            write_record(folder, {**record, "status": "stopped early" if spec.early_stop else "stopped"})

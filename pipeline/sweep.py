"""`pipeline sweep`: many `distill --from-cache` runs over one store, as Ray Tune trials, and their summary.

A sweep file is a distill ``--config`` file (any TrainSettings field,
``method_args``, plus ``teacher`` / ``teacher_weights``) with a ``search:``
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

Each trial is exactly ``pipeline distill --from-cache STORE --config
OUT/<trial>/settings.yaml --out OUT/<trial> --workers 0``, run in-process in
a Ray Tune trial. Everything that can be checked (setting names, values,
distributions, method arguments, teachers, validation data) is checked here,
before Ray starts. The Tune side (trainable, callbacks, restore) lives in
``pipeline.ray_sweep``; the summary (table, ``sweep.csv``, ``sweep.png``) is
read from the trial folders alone, so ``--summary`` needs no Ray.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import itertools
import json
import logging
import math
import re
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stages.training.distill import TrainSettings
from stages.training.run_metrics import best_line, read_metrics
from storage import UserError
from storage.location import written_whole

from . import config, report

log = logging.getLogger("pipeline")

SWEEP_FILE, CSV_FILE, PNG_FILE, LOG_FILE = "sweep.yaml", "sweep.csv", "sweep.png", "sweep.log"
TRIAL_RECORD, TRIAL_SETTINGS, TRIAL_PREFIX = "trial.json", "settings.yaml", "trial-"
SWEEP_KEYS = ("search", "samples", "metric", "mode", "early_stop", "search_seed")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
FLAG_SETTINGS = {"teacher": "--teacher", "teacher_weights": "--teacher-weights"}  # distill settings that are flags, not TrainSettings fields
NESTED = ("method_args", "student_kwargs")  # dict settings searched key by key: method_args.temperature
REFUSED = {
    "online": "sweeps run from the cache: a live teacher in every trial is the cost the cache exists to save; drop online",
    "workers": "each trial trains in its own Ray Tune process (distill --workers 0); give trials CPUs with --cpus-per-trial",
    "gpus_per_worker": "give trials GPUs with --gpus-per-trial",
    "from_cache": "the store is --from-cache on the command line",
    "out": "trial folders go under --out",
    "data": "the training data is --data on the command line (trials of one sweep share one store and its data)",
    "val_data": "validation data is --val-data on the command line",
}
EARLY_STOP_DEFAULTS = {"grace_epochs": 1, "reduction_factor": 2}
MAX_CHECKED_TRIALS = 4096  # representative trials resolved before the sweep starts


def add_sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="many distill runs over one store as Ray Tune trials: grid and random search, early stopping, a ranked table")
    p.add_argument("--from-cache", metavar="STORE", help="the store made by `pipeline extract` (required unless --summary; default: none)")
    p.add_argument("--config", metavar="SWEEP_YAML", help="fixed distill settings plus a search: section (see configs/sweeps/) (required unless --summary)")
    p.add_argument("--out", required=True, help="the sweep folder: one folder per trial (what distill --out writes), sweep.yaml, sweep.csv, sweep.png, sweep.log")
    p.add_argument("--summary", action="store_true", help="only print the table and write sweep.csv and sweep.png of the sweep in --out, from its trial folders (default: run the sweep)")
    p.add_argument("--data", help="training data, when it moved since extraction (default: the store's)")
    p.add_argument("--val-data", help="validation data for folder datasets, folder:PATH (default: digits and fake have their own split)")
    g = p.add_argument_group("Ray Tune")
    g.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs each trial holds; its torch threads follow (default: 1)")
    g.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs each trial holds (0.5: two trials share one); a trial with a GPU trains on CUDA (default: 0)")
    g.add_argument("--max-concurrent", type=int, default=0, help="trials at once at most; 0: as many as the CPUs and GPUs hold (default: 0)")
    g.add_argument("--early-stop", action="store_true", help="stop weak trials early (ASHA on the metric per epoch; the sweep file's early_stop: tunes it) (default: off, unless the file has early_stop:)")
    g.add_argument("--retry-errored", action="store_true", help="when resuming, run the trials that failed again from scratch (default: failed trials stay failed)")
    g.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join, HOST:PORT, ray://HOST:PORT or auto (default: RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--online", action="store_true", help="refused: sweeps run from the cache (default: off)")
    p.set_defaults(func=sweep_command)


# -- the sweep file ------------------------------------------------------------------------------------


@dataclass
class Axis:
    """One searched setting: ``grid``/``choice`` values, or the [low, high] of ``uniform``/``loguniform``/``randint``."""

    name: str
    kind: str
    values: list

    def describe(self) -> str:
        return f"{self.kind} {self.values}"


@dataclass
class SweepSpec:
    fixed: dict  # settings as distill --config takes them, plus teacher / teacher_weights
    axes: list[Axis]
    samples: int = 1
    metric: str = "val_top1"
    mode: str = "max"
    early_stop: dict | None = None  # {"grace_epochs": G, "reduction_factor": R}: ASHA
    search_seed: int = 0

    @property
    def grid_size(self) -> int:
        return math.prod(len(a.values) for a in self.axes if a.kind == "grid")

    @property
    def num_trials(self) -> int:
        return self.grid_size * self.samples

    def to_dict(self) -> dict:
        return {
            "fixed": self.fixed, "search": {a.name: {a.kind: a.values} for a in self.axes}, "samples": self.samples,
            "metric": self.metric, "mode": self.mode, "early_stop": self.early_stop, "search_seed": self.search_seed,
        }


def known_settings() -> list[str]:
    return sorted({f.name for f in dataclasses.fields(TrainSettings)} | set(FLAG_SETTINGS))


def _check_name(name: str, where: str) -> None:
    """Refuse a setting a trial cannot take, naming the known ones (and a close match)."""
    head, dot, key = name.partition(".")
    if head in REFUSED:
        raise UserError(f"{where}: '{head}' cannot be set in a sweep: {REFUSED[head]}")
    known = known_settings()
    if head not in known or (dot and (head not in NESTED or not key)):
        close = difflib.get_close_matches(head, known + list(REFUSED), n=2)
        hint = f" (did you mean {', '.join(close)}?)" if close and not dot else ""
        nested = "; method arguments go as method_args.NAME" if not dot or head not in NESTED else ""
        raise UserError(f"{where}: unknown setting '{name}'{hint}: known are {', '.join(known)}{nested}")


def _axis(name: str, spec, where: str) -> Axis:
    here = f"{where}, search.{name}"
    if isinstance(spec, list):
        kind, values = "grid", spec
    elif isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS:
        kind, values = next(iter(spec.items()))
    else:
        raise UserError(
            f"{here}: give a list of values (a grid) or one of grid: [...], choice: [...], uniform: [LOW, HIGH], "
            f"loguniform: [LOW, HIGH], randint: [LOW, HIGH], not {spec!r}"
        )
    if kind in ("grid", "choice"):
        if not isinstance(values, list) or not values:
            raise UserError(f"{here}: the {kind} is empty: give at least one value, e.g. {kind}: [1, 4]")
        return Axis(name, kind, values)
    numbers = isinstance(values, list) and len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not numbers:
        raise UserError(f"{here}: {kind} takes [LOW, HIGH], two numbers, not {values!r}")
    low, high = values
    if kind == "randint":  # whole numbers from LOW to HIGH, both included (Tune's own randint leaves HIGH out)
        if not all(isinstance(v, int) for v in values) or not low < high:
            raise UserError(f"{here}: randint takes [LOW, HIGH], whole numbers with LOW < HIGH (both may be drawn), not {values!r}")
        return Axis(name, kind, [low, high])
    if not low < high:
        raise UserError(f"{here}: {kind} needs LOW < HIGH, not [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise UserError(f"{here}: loguniform needs LOW > 0 (it draws the logarithm), not {low}")
    return Axis(name, kind, [float(low), float(high)])


def _flat_search(search: dict, where: str) -> dict:
    """``{method_args: {temperature: [1, 4]}}`` -> ``{"method_args.temperature": [1, 4]}``; other names as they are."""
    flat = {}
    for name, spec in search.items():
        name = str(name).replace("-", "_")
        is_spec = isinstance(spec, list) or (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS)
        if name in NESTED and isinstance(spec, dict) and not is_spec:
            for key, sub in spec.items():
                flat[f"{name}.{key}"] = sub
        else:
            flat[name] = spec
    return flat


def parse_sweep(data: dict, where: str) -> SweepSpec:
    """A sweep file's mapping as a checked ``SweepSpec``; a mistake is one line naming the key."""
    data = dict(data)
    search = data.pop("search", None)
    if not isinstance(search, dict) or not search:
        raise UserError(f"{where}: a sweep needs a search: section mapping settings to values, e.g. search: {{lr: {{loguniform: [0.0005, 0.005]}}}}")
    fixed = {k: v for k, v in data.items() if k not in SWEEP_KEYS}
    fixed.pop("views", None)  # a recipe's view section is for extract and train, as distill --config ignores it
    for name in fixed:
        _check_name(name, where)
    axes = []
    for name, spec in _flat_search(search, where).items():
        _check_name(name, f"{where}, search")
        axes.append(_axis(name, spec, where))
    samples = data.get("samples", 1)
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise UserError(f"{where}: samples must be a whole number of random draws, 1 or more, not {samples!r}")
    metric = data.get("metric", "val_top1")
    if not isinstance(metric, str) or not re.fullmatch(r"(val|train)_[a-z0-9_]+", metric):
        raise UserError(f"{where}: metric must name a number of the epoch lines such as val_top1, train_loss or train_kd, not {metric!r}")
    mode = data.get("mode", "max" if metric.startswith("val_") else "min")
    if mode not in ("max", "min"):
        raise UserError(f"{where}: mode must be max or min, not {mode!r}")
    early = data.get("early_stop")
    if early is True or early == "asha":
        early = {}
    if early is not None and early is not False:
        if not isinstance(early, dict):
            raise UserError(f"{where}: early_stop takes true or {{grace_epochs: G, reduction_factor: R}}, not {early!r}")
        unknown = sorted(set(early) - set(EARLY_STOP_DEFAULTS))
        if unknown:
            raise UserError(f"{where}: early_stop has no setting {', '.join(unknown)}: known are {', '.join(EARLY_STOP_DEFAULTS)}")
        early = {**EARLY_STOP_DEFAULTS, **early}
        if not isinstance(early["grace_epochs"], int) or early["grace_epochs"] < 1:
            raise UserError(f"{where}: early_stop grace_epochs must be a whole number of epochs, 1 or more, not {early['grace_epochs']!r}")
        if not isinstance(early["reduction_factor"], (int, float)) or early["reduction_factor"] <= 1:
            raise UserError(f"{where}: early_stop reduction_factor must be more than 1, not {early['reduction_factor']!r}")
    else:
        early = None
    seed = data.get("search_seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"{where}: search_seed must be a whole number, not {seed!r}")
    return SweepSpec(fixed, axes, samples, metric, mode, early, seed)


def load_sweep(path: str | Path) -> SweepSpec:
    return parse_sweep(config.load_yaml(path), f"sweep {path}")


# -- one trial: its settings and its distill command line ----------------------------------------------


def trial_settings(fixed: dict, params: dict) -> dict:
    """The sweep's fixed settings with one trial's values; dotted names (method_args.temperature) nest."""
    values: dict = {}
    for name, value in params.items():
        head, _, key = name.partition(".")
        values = config.merge(values, {head: {key: value}} if key else {head: value})
    return config.merge(fixed, values)


def distill_argv(job: dict, settings: dict, out: Path) -> list[str]:
    """``pipeline distill`` arguments of one trial whose settings file is ``out/settings.yaml``."""
    argv = ["distill", "--from-cache", job["store"], "--config", str(out / TRIAL_SETTINGS), "--out", str(out), "--workers", "0", "--device", job["device"]]
    for flag, key in (("--data", "data"), ("--val-data", "val_data")):
        if job.get(key):
            argv += [flag, job[key]]
    for key, flag in FLAG_SETTINGS.items():
        value = settings.get(key)
        if value is not None:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    return argv


def write_trial_settings(settings: dict, out: Path) -> None:
    """The settings file a trial's distill run reads: TrainSettings fields only (teacher and its weights are flags)."""
    config.save(out / TRIAL_SETTINGS, {k: v for k, v in settings.items() if k not in FLAG_SETTINGS})


def parse_distill(argv: list[str]):
    """The argparse Namespace of ``pipeline distill ARGV``, from the project's own parser; a refusal is a UserError."""
    from .cli import build_parser  # the CLI imports this module

    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed its complaint
        raise UserError(f"pipeline distill refused the trial's arguments {shlex.join(argv)}") from e


def _value_text(value) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)
    return re.sub(r"[^A-Za-z0-9_.+-]", "", text)


class TrialNamer:
    """Tune's ``trial_dirname_creator``: ``trial-007-method=dkd,temperature=4``, readable as a TensorBoard run name."""

    def __init__(self, names: list[str]):
        short = [n.rpartition(".")[2] for n in names]
        self.names = names
        self.short = [s if short.count(s) == 1 else n for s, n in zip(short, names)]

    def __call__(self, trial) -> str:
        index = int(trial.trial_id.rsplit("_", 1)[-1])
        return self.name(index, trial.config)

    def name(self, index: int, params: dict) -> str:
        parts = ",".join(f"{s}={_value_text(params[n])}" for s, n in zip(self.short, self.names) if n in params)
        return (f"{TRIAL_PREFIX}{index:03d}" + (f"-{parts}" if parts else ""))[:120]


def describe(params: dict) -> str:
    return ", ".join(f"{n}={_value_text(v)}" for n, v in params.items()) or "no searched setting"


# -- checking the whole sweep before it starts ---------------------------------------------------------


def _representative_trials(spec: SweepSpec) -> list[dict]:
    grids = [a.values for a in spec.axes]  # every listed value, or both bounds of a range
    trials = []
    for values in itertools.product(*grids):
        trials.append(dict(zip((a.name for a in spec.axes), values)))
        if len(trials) >= MAX_CHECKED_TRIALS:
            break
    return trials


def check_sweep(spec: SweepSpec, job: dict, where: str) -> int:
    """Resolve every representative trial exactly as its distill run will; returns the most epochs a trial trains.

    Grid and choice values are checked one by one (every combination), a
    uniform or loguniform range at both bounds; each combination's settings go
    through distill's own parser and ``train_settings`` (types, ranges, the
    method's arguments), its student through timm (built once per distinct
    model and arguments), its teacher(s) through the store.
    """
    from stages.data.datasets import validation_data
    from stages.methods import method_class
    from stages.cache.store_setup import store_dataset
    from stages.training.student import build_student
    from stages.teachers.teacher_sources import cached_teacher
    from storage import Store

    from .distill_command import train_settings

    store = Store(job["store"])
    store_dataset(store, job.get("data"))  # the store's data (or --data) exists and is the one it was made from
    source = job.get("data") or store.meta["dataset"]["source"]
    if spec.metric.startswith("val_") and validation_data(source, job.get("val_data")) is None:
        raise UserError(f"{where}: metric {spec.metric} needs validation data, and {source} has none: pass --val-data folder:PATH, or rank by metric: train_loss")
    epochs, teachers, students = 0, set(), set()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for params in _representative_trials(spec):
            here = f"{where}, trial {describe(params)}"
            settings = trial_settings(spec.fixed, params)
            write_trial_settings(settings, out)
            args = parse_distill(distill_argv(job, settings, out))
            try:
                resolved = train_settings(args, size=store.meta["plan"]["size"])
            except UserError as e:
                raise UserError(f"{here}: {str(e).replace(str(out / TRIAL_SETTINGS), 'the sweep file')}") from e
            if resolved.epochs < 1:
                raise UserError(f"{here}: epochs must be 1 or more, not {resolved.epochs}")
            if spec.metric == "val_top1_ema" and not resolved.model_ema:
                raise UserError(f"{here}: metric val_top1_ema needs model_ema in every trial")
            epochs = max(epochs, resolved.epochs)
            student = (resolved.student, json.dumps(resolved.student_kwargs, sort_keys=True))
            if student not in students:  # timm refuses a bad model argument only when the model is built
                students.add(student)
                try:
                    build_student(resolved.student, store.meta["dataset"]["num_classes"], 0, **resolved.student_kwargs)
                except UserError as e:
                    raise UserError(f"{here}: {e}") from e
            needs = method_class(resolved.method).needs
            key = (args.teacher, args.teacher_weights, tuple(needs))
            if key not in teachers:
                teachers.add(key)
                try:
                    cached_teacher(store, args.teacher, args.teacher_weights, needs)
                except UserError as e:
                    raise UserError(f"{here}: {e}") from e
    return epochs


# -- the command ---------------------------------------------------------------------------------------


def sweep_command(args) -> None:
    from . import ray_env

    out = Path(args.out).absolute()
    if args.online:
        raise UserError("sweeps run from the cache: drop --online (a live teacher in every trial is the cost the cache exists to save)")
    if args.summary:
        print_summary(out)
        return
    if not args.from_cache or not args.config:
        raise UserError("pipeline sweep needs --from-cache STORE and --config SWEEP_YAML (or --summary, to report the sweep in --out)")
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0 or args.max_concurrent < 0:
        raise UserError(
            f"--cpus-per-trial must be more than 0 and --gpus-per-trial and --max-concurrent 0 or more, not "
            f"{args.cpus_per_trial:g}, {args.gpus_per_trial:g} and {args.max_concurrent}"
        )
    where = f"sweep {args.config}"
    spec = load_sweep(args.config)
    if args.early_stop and spec.early_stop is None:
        spec.early_stop = dict(EARLY_STOP_DEFAULTS)
    job = {
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
    max_epochs = check_sweep(spec, job, where)
    record = {"command": "sweep", "store": job["store"], "data": job["data"], "val_data": job["val_data"], **spec.to_dict()}
    saved = out / SWEEP_FILE
    if saved.is_file():
        before = config.load_yaml(saved)
        changed = sorted(k for k in record if json.dumps(before.get(k), sort_keys=True) != json.dumps(json.loads(json.dumps(record[k])), sort_keys=True))
        if changed:
            raise UserError(
                f"{out} holds a sweep with other settings ({', '.join(changed)} changed): run the same command to resume it, "
                "or pass another --out for a new sweep"
            )
    from .run_files import run_log
    from .ray_sweep import join_cluster, run_sweep

    join_cluster(args.ray_address, args.cpus_per_trial, args.gpus_per_trial, out, job["store"])
    with run_log(out / LOG_FILE):
        config.save(saved, record)
        log.info(
            "sweep %s: %d trial(s) (%d grid combination(s) x %d sample(s)) of %s over %s, ranked by %s (%s)%s",
            out, spec.num_trials, spec.grid_size, spec.samples, ", ".join(f"{a.name} {a.describe()}" for a in spec.axes) or "nothing",
            job["store"], spec.metric, spec.mode, f"; ASHA early stopping, grace {spec.early_stop['grace_epochs']} epoch(s)" if spec.early_stop else "",
        )
        run_sweep(spec, job, out, max_epochs=max_epochs, cpus=args.cpus_per_trial, gpus=args.gpus_per_trial,
                  max_concurrent=args.max_concurrent, retry_errored=args.retry_errored, debug=args.debug)
    print_summary(out)


# -- the summary, from the trial folders ---------------------------------------------------------------


@dataclass
class TrialRow:
    name: str
    status: str  # finished, stopped early, error, not finished
    params: dict
    lines: list[dict]
    best: dict | None
    seconds: float
    error: str | None = None

    @property
    def index(self) -> str:
        return "-".join(self.name.split("-", 2)[:2])  # trial-007


def read_record(folder: Path) -> dict:
    path = folder / TRIAL_RECORD
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def write_record(folder: Path, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with written_whole(folder / TRIAL_RECORD) as tmp:
        tmp.write_text(json.dumps(record, indent=1))


def collect(out: Path) -> tuple[dict, list[TrialRow]]:
    """The sweep's saved spec and one row per trial folder, best first (by the spec's metric and mode)."""
    saved = out / SWEEP_FILE
    if not saved.is_file():
        raise UserError(f"{out} holds no sweep ({SWEEP_FILE} is missing): run `pipeline sweep --from-cache STORE --config SWEEP_YAML --out {out}` first")
    spec = config.load_yaml(saved)
    metric, mode = spec.get("metric", "val_top1"), spec.get("mode", "max")
    rows = []
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and p.name.startswith(TRIAL_PREFIX)):
        record = read_record(folder)
        if not record:
            continue
        lines = read_metrics(folder)
        seconds = record.get("seconds")
        if seconds is None:
            seconds = sum(ln.get("seconds", 0.0) for ln in lines)
        status = {"running": "not finished"}.get(record.get("status"), record.get("status", "not finished"))
        rows.append(TrialRow(folder.name, status, record.get("params", {}), lines, best_line(lines, metric, mode), seconds, record.get("error")))
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda r: (r.best is None, sign * r.best[metric] if r.best else 0.0, r.name))
    return spec, rows


def summary_lines(spec: dict, rows: list[TrialRow]) -> list[str]:
    metric = spec.get("metric", "val_top1")
    names = list(spec.get("search", {}))
    header = ["trial", *names, f"best {metric}", f"last {metric}", "epochs", "seconds", "status"]
    body = []
    for r in rows:
        last = next((ln[metric] for ln in reversed(r.lines) if metric in ln), None)
        status = f"error: {r.error}" if r.status == "error" and r.error else r.status
        body.append([
            r.index, *[_value_text(r.params.get(n, "-")) for n in names],
            "-" if r.best is None else f"{report.fmt(r.best[metric])} ({r.best.get('epoch')})", report.fmt(last),
            str(int(r.lines[-1].get("epoch", len(r.lines))) if r.lines else 0), f"{r.seconds:.1f}", status,
        ])
    return report.text_table(header, body, left=1 + len(names), text_last=True)


def write_csv(path: Path, spec: dict, rows: list[TrialRow]) -> None:
    metric = spec.get("metric", "val_top1")
    names = list(spec.get("search", {}))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "status", *names, f"best_{metric}", "best_epoch", f"last_{metric}", "epochs", "seconds", "error", "folder"])
        for r in rows:
            last = next((ln[metric] for ln in reversed(r.lines) if metric in ln), None)
            w.writerow([
                r.index, r.status, *[json.dumps(r.params[n]) if isinstance(r.params.get(n), (list, dict)) else r.params.get(n, "") for n in names],
                "" if r.best is None else r.best[metric], "" if r.best is None else r.best.get("epoch", ""), "" if last is None else last,
                int(r.lines[-1].get("epoch", len(r.lines))) if r.lines else 0, round(r.seconds, 3), r.error or "", r.name,
            ])


def print_summary(out: Path) -> None:
    """The ranked table on the terminal, sweep.csv and sweep.png in ``out``."""
    spec, rows = collect(out)
    if not rows:
        raise UserError(f"{out} holds no trial folder yet: run the sweep command (the same one resumes it)")
    metric = spec.get("metric", "val_top1")
    write_csv(out / CSV_FILE, spec, rows)
    best = rows[0] if rows[0].best is not None else None
    report.plot_sweep([(r.name, r.lines) for r in rows], metric, best.name if best else None, out / PNG_FILE,
                      title=f"sweep {out.name}: {metric} per epoch, {len(rows)} trial(s)", mode=spec.get("mode", "max"),
                      notes={r.name: r.status for r in rows if r.status != "finished"})
    counts = {s: sum(r.status == s for r in rows) for s in dict.fromkeys(r.status for r in rows)}
    print("\n".join(summary_lines(spec, rows)))
    print(f"{len(rows)} trial(s): " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f" -> {out / CSV_FILE}, {out / PNG_FILE}")
    if best:
        print(f"best: {best.name}: {metric} {best.best[metric]:.4f} at epoch {best.best.get('epoch')} -> {out / best.name}")

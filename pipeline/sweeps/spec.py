"""The grammar of a sweep file (see ``pipeline.commands.sweep`` for its form): its settings and search axes checked into a
``SweepSpec``, one trial's settings and ``DistillJob``, trial folder names, and each trial's record (trial.json)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from stages.settings import Weights
from stages.training.job import DistillJob
from stages.training.settings import TrainSettings
from storage import UserError
from storage.local_files import written_whole

from pipeline.settings import config
from pipeline.settings.recipe import VIEWS, check_views, train_settings

SWEEP_FILE, CSV_FILE, PNG_FILE, LOG_FILE = "sweep.yaml", "sweep.csv", "sweep.png", "sweep.log"
TRIAL_RECORD, TRIAL_SETTINGS, TRIAL_PREFIX = "trial.json", "settings.yaml", "trial-"
SWEEP_KEYS = ("search", "samples", "metric", "mode", "early_stop", "search_seed")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
# distill settings a sweep file may set that are no TrainSettings field
JOB_SETTINGS = ("teacher_id", "teacher_weights")
NESTED = ("method_args", "student_kwargs")  # dict settings searched key by key: method_args.temperature
REFUSED = {
    "online": "sweeps run from the cache: a live teacher in every trial is the cost the cache exists to save; drop online",
    "ray_workers": "each trial trains in its own Ray Tune process, without Ray Train; give trials CPUs with --cpus-per-trial",
    "gpus_per_worker": "give trials GPUs with --gpus-per-trial",
    "from_cache": "the store is --from-cache on the command line",
    "out": "trial folders go under --out",
    "data": "the training data is --data on the command line (trials of one sweep share one store and its data)",
    "val_data": "validation data is --val-data on the command line",
}
EARLY_STOP_DEFAULTS = {"grace_epochs": 1, "reduction_factor": 2}


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
            "fixed": self.fixed,
            "search": {a.name: {a.kind: a.values} for a in self.axes},
            "samples": self.samples,
            "metric": self.metric,
            "mode": self.mode,
            "early_stop": self.early_stop,
            "search_seed": self.search_seed,
        }


def known_settings() -> list[str]:
    return sorted({f.name for f in dataclasses.fields(TrainSettings)} | set(JOB_SETTINGS))


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
        if not isinstance(values, list):
            raise UserError(f"{here}: {kind} takes a list of values, e.g. {kind}: [1, 4], not {values!r}")
        if not values:
            raise UserError(f"{here}: the {kind} is empty: give at least one value, e.g. {kind}: [1, 4]")
        return Axis(name, kind, values)
    return Axis(name, kind, _range_axis(kind, values, here))


def _range_axis(kind: str, values, here: str) -> list:
    """[LOW, HIGH] of a uniform, loguniform or randint axis, checked."""
    numbers = (
        isinstance(values, list)
        and len(values) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    )
    if not numbers:
        raise UserError(f"{here}: {kind} takes [LOW, HIGH], two numbers, not {values!r}")
    low, high = values
    if kind == "randint":  # whole numbers from LOW to HIGH, both included (Tune's own randint leaves HIGH out)
        if not all(isinstance(v, int) for v in values) or not low < high:
            raise UserError(
                f"{here}: randint takes [LOW, HIGH], whole numbers with LOW < HIGH (both may be drawn), not {values!r}"
            )
        return [low, high]
    if not low < high:
        raise UserError(f"{here}: {kind} needs LOW < HIGH, not [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise UserError(f"{here}: loguniform needs LOW > 0 (it draws the logarithm), not {low}")
    return [float(low), float(high)]


def _flat_search(search: dict, where: str) -> dict:
    """``{method_args: {temperature: [1, 4]}}`` -> ``{"method_args.temperature": [1, 4]}`` (and a composite part's
    ``method_args.kd.weight``); other names as they are."""
    flat = {}
    for name, spec in search.items():
        name = str(name).replace("-", "_")
        if name.partition(".")[0] in NESTED and isinstance(spec, dict) and not _is_axis(spec):
            # method_args: {cospress: {weight: [...]}} is method_args.cospress.weight, a composite part's setting
            flat.update(_flat_search({f"{name}.{key}": sub for key, sub in spec.items()}, where))
        else:
            flat[name] = spec
    return flat


def _is_axis(spec) -> bool:
    return isinstance(spec, list) or (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS)


def parse_sweep(data: dict, where: str) -> SweepSpec:
    """A sweep file's mapping as a checked ``SweepSpec``; a mistake is one line naming the key."""
    data = dict(data)
    search = data.pop("search", None)
    if not isinstance(search, dict) or not search:
        raise UserError(
            f"{where}: a sweep needs a search: section mapping settings to values, e.g. search: {{lr: {{loguniform: [0.0005, 0.005]}}}}"
        )
    fixed = {k: v for k, v in data.items() if k not in SWEEP_KEYS}
    # for extract and train, as distill --config ignores it; checked all the same
    check_views(fixed.pop(VIEWS, None), where)
    for name in fixed:
        _check_name(name, where)
    axes = []
    for name, spec in _flat_search(search, where).items():
        _check_name(name, f"{where}, search")
        axes.append(_axis(name, spec, where))
    samples = data.get("samples", 1)
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise UserError(f"{where}: samples must be a whole number of random draws, 1 or more, not {samples!r}")
    metric, mode = _metric(data, where)
    early = _early_stop(data.get("early_stop"), where)
    seed = data.get("search_seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"{where}: search_seed must be a whole number, not {seed!r}")
    return SweepSpec(fixed, axes, samples, metric, mode, early, seed)


def _metric(data: dict, where: str) -> tuple[str, str]:
    """The number trials are ranked by, and whether more (max) or less (min) is better."""
    metric = data.get("metric", "val_top1")
    if not isinstance(metric, str) or not re.fullmatch(r"(val|train)_[A-Za-z0-9_.@-]+", metric):
        raise UserError(
            f"{where}: metric must name a number of the epoch lines such as val_top1, train_loss or train_kd, not {metric!r}"
        )
    mode = data.get("mode", "max" if metric.startswith("val_") else "min")
    if mode not in ("max", "min"):
        raise UserError(f"{where}: mode must be max or min, not {mode!r}")
    return metric, mode


def _early_stop(early, where: str) -> dict | None:
    """ASHA's settings (``early_stop: true`` takes the defaults), or None for no early stopping."""
    if early is True or early == "asha":
        early = {}
    if early is None or early is False:
        return None
    if not isinstance(early, dict):
        raise UserError(f"{where}: early_stop takes true or {{grace_epochs: G, reduction_factor: R}}, not {early!r}")
    unknown = sorted(set(early) - set(EARLY_STOP_DEFAULTS))
    if unknown:
        raise UserError(
            f"{where}: early_stop has no setting {', '.join(unknown)}: known are {', '.join(EARLY_STOP_DEFAULTS)}"
        )
    early = {**EARLY_STOP_DEFAULTS, **early}
    if not isinstance(early["grace_epochs"], int) or early["grace_epochs"] < 1:
        raise UserError(
            f"{where}: early_stop grace_epochs must be a whole number of epochs, 1 or more, not {early['grace_epochs']!r}"
        )
    if not isinstance(early["reduction_factor"], (int, float)) or early["reduction_factor"] <= 1:
        raise UserError(f"{where}: early_stop reduction_factor must be more than 1, not {early['reduction_factor']!r}")
    return early


def load_sweep(path: str | Path) -> SweepSpec:
    return parse_sweep(config.load_yaml(path), f"sweep {path}")


def trial_settings(fixed: dict, params: dict) -> dict:
    """The sweep's fixed settings with one trial's values; dotted names (method_args.temperature, method_args.kd.weight) nest."""
    values: dict = {}
    for name, value in params.items():
        head, _, key = name.partition(".")
        part, dot, leaf = key.rpartition(".")  # method_args.cospress.weight: a setting of one part of a composite
        nested = {part: {leaf: value}} if dot else {key: value}
        values = config.merge(values, {head: nested} if key else {head: value})
    return config.merge(fixed, values)


def write_trial_settings(settings: dict, out: Path) -> None:
    """The trial's settings as a distill --config file (TrainSettings fields only), to rerun it by hand."""
    config.save(out / TRIAL_SETTINGS, {k: v for k, v in settings.items() if k not in JOB_SETTINGS})


def trial_job(base: dict, settings: dict, where: str) -> DistillJob:
    """One trial's distill run: the sweep's store and data (``base``), the trial's settings resolved as distill resolves a --config file."""
    train = train_settings({k: v for k, v in settings.items() if k not in JOB_SETTINGS}, {}, where)
    teacher_id, weights = (_joined(settings.get(k)) for k in JOB_SETTINGS)  # a YAML list, or "a,b" as the flag takes it
    if weights is not None:
        Weights()(weights, f"teacher_weights in {where}")
    return DistillJob(base["store"], train, teacher_id, weights, None, base.get("data"), base.get("val_data"))


def _joined(value):
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def rerun_command(job: DistillJob, out: Path, device: str, threads: int) -> str:
    """The `pipeline distill` command that runs a trial again by hand (its settings are OUT/settings.yaml), on the
    trial's torch threads: another thread count sums in another order, and the run drifts from the trial's."""
    words = [
        "pipeline",
        "distill",
        "--from-cache",
        job.store,
        "--config",
        str(out / TRIAL_SETTINGS),
        "--out",
        str(out),
        "--device",
        device,
        "--threads",
        str(threads),
    ]
    for flag, value in (
        ("--teacher-id", job.teacher_id),
        ("--teacher-weights", job.teacher_weights),
        ("--data", job.data),
        ("--val-data", job.val_data),
    ):
        if value is not None:
            words += [flag, str(value)]
    return shlex.join(words)


def _value_text(value) -> str:
    text = (
        f"{value:.4g}"
        if isinstance(value, float)
        else json.dumps(value, separators=(",", ":"))
        if isinstance(value, (list, dict))
        else str(value)
    )
    return re.sub(r"[^A-Za-z0-9_.+-]", "", text)


class TrialNamer:
    """Tune's ``trial_dirname_creator``: ``trial-007-method=dkd,temperature=4``, readable as a TensorBoard run name."""

    def __init__(self, names: list[str]):
        # method_args.temperature -> temperature; a composite part's method_args.dkd.weight -> dkd.weight (which part's weight)
        self.names = names
        self.short = [n.removeprefix("method_args.") for n in names]

    def __call__(self, trial) -> str:
        index = int(trial.trial_id.rsplit("_", 1)[-1])
        return self.name(index, trial.config)

    def name(self, index: int, params: dict) -> str:
        parts = ",".join(f"{s}={_value_text(params[n])}" for s, n in zip(self.short, self.names) if n in params)
        return (f"{TRIAL_PREFIX}{index:03d}" + (f"-{parts}" if parts else ""))[:120]


def describe(params: dict) -> str:
    return ", ".join(f"{n}={_value_text(v)}" for n, v in params.items()) or "no searched setting"


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

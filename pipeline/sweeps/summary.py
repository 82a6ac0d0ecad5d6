"""The summary of a sweep, read from its trial folders alone (so ``--summary`` needs no Ray): a ranked table,
``sweep.csv`` and ``sweep.png``."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from stages.training.run_metrics import best_line
from storage import UserError

from pipeline.settings import config

from pipeline.runs.plots import plot_sweep
from pipeline.runs.reading import read_epochs, skipped_line
from pipeline.runs.tables import fmt, text_table
from pipeline.sweeps.spec import CSV_FILE, PNG_FILE, SWEEP_FILE, TRIAL_PREFIX, TRIAL_RECORD, _value_text, read_record

log = logging.getLogger("pipeline")


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


def collect(out: Path) -> tuple[dict, list[TrialRow]]:
    """The sweep's saved spec and one row per trial folder, best first (by the spec's metric and mode)."""
    saved = out / SWEEP_FILE
    if not saved.is_file():
        raise UserError(
            f"{out} holds no sweep ({SWEEP_FILE} is missing): run `pipeline sweep --from-cache STORE --config SWEEP_YAML --out {out}` first"
        )
    spec = config.load_yaml(saved)
    metric, mode = spec.get("metric", "val_top1"), spec.get("mode", "max")
    rows = []
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and p.name.startswith(TRIAL_PREFIX)):
        record = read_record(folder)
        if not isinstance(record, dict):  # a hand-edited or foreign file: the rest of the sweep still reports
            log.warning(
                "%s holds a JSON %s, not a trial record: trial %s is left out of the table",
                folder / TRIAL_RECORD,
                type(record).__name__,
                folder.name,
            )
            continue
        if not record:
            continue
        rows.append(_row(folder, record, metric, mode))
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda r: (r.best is None, sign * r.best[metric] if r.best else 0.0, r.name))
    return spec, rows


def _row(folder: Path, record: dict, metric: str, mode: str) -> TrialRow:
    """One trial's row from its trial.json and metrics.jsonl; fields of the wrong type count as absent."""
    lines, bad = read_epochs(folder)
    if bad:
        log.warning(skipped_line(folder, bad))
    seconds = record.get("seconds")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        seconds = sum(ln["seconds"] for ln in lines if isinstance(ln.get("seconds"), (int, float)))
    status = record.get("status") if isinstance(record.get("status"), str) else "not finished"
    status = {"running": "not finished"}.get(status, status)
    params = record.get("params") if isinstance(record.get("params"), dict) else {}
    error = record.get("error") if isinstance(record.get("error"), str) else None
    return TrialRow(folder.name, status, params, lines, best_line(lines, metric, mode), seconds, error)


def summary_lines(spec: dict, rows: list[TrialRow]) -> list[str]:
    metric = spec.get("metric", "val_top1")
    names = list(spec.get("search", {}))
    header = ["trial", *names, f"best {metric}", f"last {metric}", "epochs", "seconds", "status"]
    body = []
    for r in rows:
        last = next((ln[metric] for ln in reversed(r.lines) if metric in ln), None)
        status = f"error: {r.error}" if r.status == "error" and r.error else r.status
        body.append(
            [
                r.index,
                *[_value_text(r.params.get(n, "-")) for n in names],
                "-" if r.best is None else f"{fmt(r.best[metric])} ({r.best.get('epoch')})",
                fmt(last),
                str(int(r.lines[-1].get("epoch", len(r.lines))) if r.lines else 0),
                f"{r.seconds:.1f}",
                status,
            ]
        )
    return text_table(header, body, left=1 + len(names), text_last=True)


def write_csv(path: Path, spec: dict, rows: list[TrialRow]) -> None:
    metric = spec.get("metric", "val_top1")
    names = list(spec.get("search", {}))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "trial",
                "status",
                *names,
                f"best_{metric}",
                "best_epoch",
                f"last_{metric}",
                "epochs",
                "seconds",
                "error",
                "folder",
            ]
        )
        for r in rows:
            last = next((ln[metric] for ln in reversed(r.lines) if metric in ln), None)
            w.writerow(
                [
                    r.index,
                    r.status,
                    *[
                        json.dumps(r.params[n]) if isinstance(r.params.get(n), (list, dict)) else r.params.get(n, "")
                        for n in names
                    ],
                    "" if r.best is None else r.best[metric],
                    "" if r.best is None else r.best.get("epoch", ""),
                    "" if last is None else last,
                    int(r.lines[-1].get("epoch", len(r.lines))) if r.lines else 0,
                    round(r.seconds, 3),
                    r.error or "",
                    r.name,
                ]
            )


def print_summary(out: Path) -> None:
    """The ranked table on the terminal, sweep.csv and sweep.png in ``out``."""
    spec, rows = collect(out)
    if not rows:
        raise UserError(f"{out} holds no trial folder yet: run the sweep command (the same one resumes it)")
    metric = spec.get("metric", "val_top1")
    write_csv(out / CSV_FILE, spec, rows)
    best = rows[0] if rows[0].best is not None else None
    plot_sweep(
        [(r.name, r.lines) for r in rows],
        metric,
        best.name if best else None,
        out / PNG_FILE,
        title=f"sweep {out.name}: {metric} per epoch, {len(rows)} trial(s)",
        mode=spec.get("mode", "max"),
        notes={r.name: r.status for r in rows if r.status != "finished"},
    )
    counts = {s: sum(r.status == s for r in rows) for s in dict.fromkeys(r.status for r in rows)}
    print("\n".join(summary_lines(spec, rows)))
    print(
        f"{len(rows)} trial(s): "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + f" -> {out / CSV_FILE}, {out / PNG_FILE}"
    )
    if best:
        print(
            f"best: {best.name}: {metric} {best.best[metric]:.4f} at epoch {best.best.get('epoch')} -> {out / best.name}"
        )
    elif any(r.lines for r in rows):  # epochs ran, and none reported the metric: the ranking ranked nothing
        reported = sorted({k for r in rows for ln in r.lines for k in ln if k.startswith(("train_", "val_"))})
        raise UserError(
            f"no trial reported metric {metric}, so nothing is ranked (their epochs report {', '.join(reported)}): "
            "set metric: in the sweep file to one of those and run the same sweep into a new --out"
        )

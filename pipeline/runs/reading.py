"""Reading run folders: which folders are runs, their epoch lines (metrics.jsonl), what they classify, and each
run's final numbers. ``pipeline report``, the demo and a sweep's summary read runs only through here.

A RUN is a folder written by ``train``, ``distill`` or a sweep trial (it holds ``metrics.jsonl``), or a folder of
such runs (a sweep's ``--out``, the demo's ``--out``), which stands for every run in it.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.training.run_metrics import METRICS_FILE, best_line
from storage import UserError

from pipeline.settings import config


# -- finding runs --------------------------------------------------------------------------------------


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders named by ``paths``: a folder with metrics.jsonl, or every such folder directly inside one."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise UserError(f"run folder {path} not found: pass a folder written by train, distill or sweep")
        if (path / METRICS_FILE).is_file():
            runs.append(path)
            continue
        inside = sorted(p for p in path.iterdir() if (p / METRICS_FILE).is_file())
        if not inside:
            raise UserError(
                f"{path} holds no {METRICS_FILE} (nor a run folder with one): pass a folder written by train, distill or sweep"
            )
        runs.extend(inside)
    return runs


def run_labels(runs: list[Path], labels: list[str] | None) -> list[str]:
    """One legend name per run: ``labels`` (one per run), else the folder's name, made unique by its parent where needed."""
    if labels is not None:
        if len(labels) != len(runs):
            raise UserError(f"{len(labels)} label(s) for {len(runs)} run(s): give one --label per run folder")
        return list(labels)
    names = [r.name for r in runs]
    return [f"{r.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]


# -- reading a run: its epoch lines, and what it classifies ---------------------------------------------


def read_epochs(run: Path) -> tuple[list[dict], list[int]]:
    """A run's epoch lines (JSON objects with a whole ``epoch`` number), and the numbers of the other lines.

    A torn last line (a run killed while writing it) is skipped without a word; any other line that is not
    an epoch line (garbage, ``"epoch": "one"``) is counted, so the report can say that it skipped it.
    """
    path = Path(run) / METRICS_FILE
    text = path.read_text(errors="replace") if path.is_file() else ""
    rows = text.splitlines()
    lines, bad = [], []
    for number, row in enumerate(rows, 1):
        if not row.strip():
            continue
        try:
            line = json.loads(row)
        except ValueError:
            line = None
        epoch = line.get("epoch") if isinstance(line, dict) else None
        if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1:
            lines.append(line)
        elif not (number == len(rows) and not text.endswith("\n")):
            bad.append(number)
    return lines, bad


def skipped_line(run: Path, bad: list[int]) -> str:
    """One line naming the lines of ``run``'s metrics.jsonl that are not epoch lines."""
    shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
    return f"{Path(run) / METRICS_FILE}: skipped {len(bad)} line(s) that are not epoch lines (a JSON object with a whole 'epoch'): line {shown}"


def run_task(run: Path) -> tuple | None:
    """What a run classifies: (class count, class names) from the timm config.json beside its weights, else from its
    store's store.json; None when neither says (an unfinished run of a remote store): such a run is not left out."""
    found = _json(Path(run) / "config.json")
    if found is not None and isinstance(found.get("num_classes"), int):
        names = found.get("label_names")
        return found["num_classes"], tuple(names) if isinstance(names, list) else None
    try:
        store = (config.load_yaml(Path(run) / "config.yaml").get("job") or {}).get("store")
    except UserError:
        return None
    record = _json(Path(store) / "store.json") if isinstance(store, str) and "://" not in store else None
    dataset = record.get("dataset") if record else None
    if isinstance(dataset, dict) and isinstance(dataset.get("num_classes"), int):
        return dataset["num_classes"], tuple(dataset["classes"]) if isinstance(dataset.get("classes"), list) else None
    return None


def _json(path: Path) -> dict | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def one_task(runs: list[Path], names: list[str]) -> tuple[list[int], list[str]]:
    """The runs (by index) of the task most of them share, and one line for each run left out, saying why.

    Curves of another task (other classes, another dataset) on the same axes would compare nothing."""
    tasks = [run_task(r) for r in runs]
    known = [t for t in tasks if t is not None]
    if len(set(known)) <= 1:
        return list(range(len(runs))), []
    main = max(dict.fromkeys(known), key=known.count)  # the commonest; on a tie the first run's

    def words(task) -> str:
        count, classes = task
        shown = f" ({', '.join(classes[:3])}{', ...' if len(classes) > 3 else ''})" if classes else ""
        return f"{count} classes{shown}"

    kept = [i for i, t in enumerate(tasks) if t is None or t == main]
    notes = [
        f"left out {names[i]} ({runs[i]}): it classifies {words(t)}, the other runs {words(main)}; report runs of one task together"
        for i, t in enumerate(tasks)
        if t is not None and t != main
    ]
    return kept, notes


# -- numbers -------------------------------------------------------------------------------------------


def run_row(lines: list[dict]) -> dict:
    """A run's final numbers: epochs, last train loss and val top-1, best val top-1 and its epoch, seconds, views/s."""
    last = lines[-1] if lines else {}
    best = best_line(lines, "val_top1", "max")
    rates = [ln["views_per_s"] for ln in lines if isinstance(ln.get("views_per_s"), (int, float))]
    return {
        "epochs": int(last.get("epoch", len(lines))) if lines else 0,
        "train_loss": last.get("train_loss"),
        "val_top1": last.get("val_top1"),
        "best_val_top1": best["val_top1"] if best else None,
        "best_epoch": best.get("epoch") if best else None,
        "seconds": sum(ln["seconds"] for ln in lines if is_number(ln.get("seconds"))),
        "views_per_s": sum(rates) / len(rates) if rates else None,
    }


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

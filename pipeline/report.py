"""`pipeline report RUN [RUN ...]`: a run's curves as a picture, and its final numbers as a table.

A RUN is a folder written by ``train``, ``distill`` or a sweep trial (it holds
``metrics.jsonl``), or a folder of such runs (a sweep's ``--out``, the demo's
``--out``), which stands for every run in it. The picture puts the training
loss and the validation top-1 of every run on shared axes, one colour per
label; runs that share a label (the seeds of one setting) share a colour.
``plot_runs`` is what the command and the demo call; ``plot_sweep`` draws a
sweep's metric per epoch for ``pipeline sweep``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from stages.training.run_metrics import METRICS_FILE, best_line
from storage import UserError

from .run_files import file_above

log = logging.getLogger(__name__)


def add_report_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="curves of one or more runs on shared axes (a PNG) and a table of their final numbers"
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="a run folder (train, distill, a sweep trial: it holds metrics.jsonl), or a folder of runs such as a sweep's or the demo's --out",
    )
    p.add_argument("--out", metavar="PNG", help="write the picture here, e.g. report.png (default: the table only)")
    p.add_argument(
        "--label",
        action="append",
        metavar="NAME",
        help="legend name of each RUN folder given, in order; runs with one name share a colour (repeatable; default: the folder names)",
    )
    p.add_argument("--title", help="title of the picture (default: none)")
    p.set_defaults(func=report_command)


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
    from . import config

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
        "seconds": sum(ln["seconds"] for ln in lines if _number(ln.get("seconds"))),
        "views_per_s": sum(rates) / len(rates) if rates else None,
    }


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt(value, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` significant digits, missing values as '-'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def text_table(header: list[str], rows: list[list], left: int = 1, text_last: bool = False) -> list[str]:
    """Aligned columns: the first ``left`` columns (and with ``text_last`` the last) left-aligned, numbers right-aligned."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    last = len(header) - 1 if text_last else -1
    return [
        "  ".join(
            c.ljust(w) if i < left or i == last else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in cells
    ]


def report_lines(labels: list[str], rows: list[dict]) -> list[str]:
    header = ["run", "epochs", "train loss", "val top-1", "best val top-1 (epoch)", "seconds", "views/s"]
    body = [
        [
            label,
            r["epochs"],
            fmt(r["train_loss"]),
            fmt(r["val_top1"]),
            "-" if r["best_val_top1"] is None else f"{r['best_val_top1']:.4f} ({r['best_epoch']})",
            f"{r['seconds']:.1f}",
            fmt(r["views_per_s"], 5),
        ]
        for label, r in zip(labels, rows)
    ]
    return text_table(header, body)


# -- pictures ------------------------------------------------------------------------------------------


def _colours(labels: list[str]) -> dict[str, tuple]:
    """One colour per distinct label, in order of first appearance."""
    from matplotlib import colormaps

    distinct = list(dict.fromkeys(labels))
    cmap = colormaps["tab10" if len(distinct) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(distinct)}


def _save(fig, out_png: Path | str) -> Path:
    out_png = Path(out_png)
    blocked = file_above(out_png)
    if blocked:
        raise UserError(
            f"cannot write the picture {out_png}: {blocked} is a file, not a directory; choose another --out"
        )
    try:
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, format="png", dpi=120, bbox_inches="tight")
    except OSError as e:
        raise UserError(f"cannot write the picture {out_png}: {e.strerror or e}") from e
    return out_png


def _series(lines: list[dict], key: str, scale: float = 1.0) -> tuple[list, list]:
    points = [(ln["epoch"], ln[key] * scale) for ln in lines if isinstance(ln.get(key), (int, float)) and "epoch" in ln]
    return [p[0] for p in points], [p[1] for p in points]


def is_reference(run: Path) -> bool:
    """A run that the others are measured against: one that `pipeline train` fitted (a teacher), not a distilled student."""
    from . import config

    try:
        return config.load_yaml(run / "config.yaml").get("command") == "train"
    except UserError:  # no or unreadable config.yaml: an ordinary run
        return False


def plot_runs(
    run_dirs: list[Path | str], out_png: Path | str, labels: list[str] | None = None, title: str | None = None
) -> Path:
    """Training loss and validation top-1 per epoch of every run, on shared axes; runs with one label share a colour.

    ``run_dirs`` are run folders (each with metrics.jsonl); ``labels`` one legend name per run (default: the folder
    names). Runs of one label (seeds) get different line styles; a one-epoch run a large marker. A reference run
    (a teacher fitted by `pipeline train`) is a dashed level at its final top-1, named in the legend, and the
    top-1 axis keeps to the students' range, so a strong teacher does not squeeze them into a band.
    """
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display backend

    runs = [Path(r) for r in run_dirs]
    names = run_labels(runs, labels)
    colours = _colours(names)
    every = [read_epochs(r)[0] for r in runs]
    with_val = any(_series(lines, "val_top1")[0] for lines in every)
    fig = Figure(figsize=(11 if with_val else 6, 4.2))
    axes = fig.subplots(1, 2 if with_val else 1, squeeze=False)[0]
    seen: dict[str, int] = {}
    references: list[tuple[list[dict], str]] = []
    styles = ("-", "--", "-.", ":")
    for run, name, lines in zip(runs, names, every):
        repeat = seen[name] = seen.get(name, -1) + 1
        style = dict(
            color=colours[name],
            linewidth=1.6,
            alpha=0.9,
            linestyle=styles[repeat % len(styles)],
            marker="o" if len(lines) <= 30 else None,
            markersize=8 if len(lines) == 1 else 3,
        )
        label = name if repeat == 0 else None
        if with_val and is_reference(run):
            references.append((lines, name))
            axes[0].plot(
                *_series(lines, "train_loss"),
                label=f"{name} (reference)" if repeat == 0 else None,
                **{**style, "linestyle": ":"},
            )
            continue
        axes[0].plot(*_series(lines, "train_loss"), label=label, **style)
        if with_val:
            axes[1].plot(*_series(lines, "val_top1", 100.0), **style)
    for lines, name in references:  # after the students: their range decides where a level goes
        _reference_level(axes[1], lines, name, colours[name])
    axes[0].set(title="training loss (mean over the epoch)", xlabel="epoch", ylabel="loss")
    if with_val:
        axes[1].set(title="validation top-1", xlabel="epoch", ylabel="top-1 accuracy (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    shown = len(seen)
    fig.legend(loc="lower center", ncol=min(4, max(1, shown)), frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.06 + 0.045 * ((shown - 1) // 4), 1, 0.95 if title else 1))
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


def _reference_level(ax, lines: list[dict], name: str, colour) -> None:
    """A reference run's final top-1 as a dashed level; above the students' range, a note at the top edge instead."""
    values = _series(lines, "val_top1", 100.0)[1]
    if not values:
        return
    level = values[-1]
    students = [y for line in ax.get_lines() for y in line.get_ydata()]
    low, high = (min(students), max(students)) if students else (level, level)
    if students and level > high + 0.5 * max(high - low, 5.0):  # far above: keep the students readable
        ax.annotate(
            f"{name}: {level:.1f}% (above)",
            xy=(0.99, 0.98),
            xycoords="axes fraction",
            ha="right",
            va="top",
            color=colour,
            fontsize=8,
        )
        return
    ax.axhline(level, color=colour, linestyle="--", linewidth=1.2, label=f"{name} (reference): {level:.1f}%")


def plot_sweep(
    trials: list[tuple[str, list[dict]]],
    metric: str,
    best: str | None,
    out_png: Path | str,
    title: str | None = None,
    mode: str = "max",
    notes: dict[str, str] | None = None,
) -> Path:
    """``metric`` per epoch for every trial (name, epoch lines, best first); the trial named ``best`` drawn bold in red.

    Each legend entry carries the trial's best value and its ``notes`` entry (``stopped early``); past 12 trials
    only the best is named. Trials without a single epoch (failed at once) have no curve: one legend line counts them.
    """
    notes = notes or {}
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    percent = metric.endswith("top1")
    scale = 100.0 if percent else 1.0
    listed = len(trials) <= 12  # a longer legend hides the curves
    palette = [colormaps["tab10"](i) for i in (0, 1, 2, 4, 5, 6, 7, 8, 9)]  # no red: red is the best trial's

    def value(name, lines) -> str:
        top = best_line(lines, metric, mode)
        words = [f"{top[metric] * scale:.4g}{'%' if percent else ''}"] if top else []
        words += [notes[name]] if name in notes else []
        return f" ({', '.join(words)})" if words else ""

    handles, empty = [], 0
    for i, (name, lines) in enumerate(t for t in trials if t[0] != best):
        xs, ys = _series(lines, metric, scale)
        if not xs:
            empty += 1
            continue
        (h,) = ax.plot(
            xs,
            ys,
            color=palette[i % len(palette)] if listed else "0.6",
            linewidth=1.1,
            alpha=0.8,
            marker="o",
            markersize=3,
            label=f"{name}{value(name, lines)}",
        )
        handles.append(h)
    if not listed:
        handles = [ax.plot([], [], color="0.6", linewidth=1.1, label=f"{len(handles)} other trials")[0]]
    if empty:
        handles.append(ax.plot([], [], color="none", label=f"{empty} trial(s) with no epoch (failed)")[0])
    if best is not None:
        lines = dict(trials)[best]
        (h,) = ax.plot(
            *_series(lines, metric, scale),
            color="crimson",
            linewidth=3.0,
            marker="o",
            markersize=5,
            label=f"best: {best}{value(best, lines)}",
            zorder=5,
        )
        handles.insert(0, h)
    ax.set(
        xlabel="epoch", ylabel=f"{metric} (%)" if percent else metric, title=title or f"{metric} per epoch, every trial"
    )
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if handles:
        ax.legend(handles=handles, fontsize="small", loc="best")
    fig.tight_layout()
    return _save(fig, out_png)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_picture_path(out: Path) -> None:
    """Refuse a --out that would write over anything but an earlier picture (a run's metrics.jsonl, say)."""
    if out.suffix.lower() != ".png":
        raise UserError(
            f"--out {out}: the picture is a PNG file: name it with .png (e.g. {out.with_suffix('.png').name})"
        )
    if out.is_dir() or (out.exists() and _head(out) != PNG_MAGIC):
        raise UserError(f"--out {out} exists and is not a picture: report does not write over it; choose another --out")


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(len(PNG_MAGIC))


def report_command(args) -> None:
    if args.out:
        check_picture_path(Path(args.out))
    runs = find_runs(args.runs)
    labels = None
    if args.label:
        if len(args.label) != len(args.runs):
            raise UserError(f"{len(args.label)} --label for {len(args.runs)} RUN folder(s): give one --label per RUN")
        # A folder of runs stands for all of them: its label goes to each.
        labels = [label for path, label in zip(args.runs, args.label) for _ in find_runs([path])]
    names = run_labels(runs, labels)
    kept, notes = one_task(runs, names)
    for note in notes:
        log.warning(note)
    runs, names = [runs[i] for i in kept], [names[i] for i in kept]
    read = [read_epochs(r) for r in runs]
    for run, (_, bad) in zip(runs, read):
        if bad:
            log.warning(skipped_line(run, bad))
    every = [lines for lines, _ in read]
    if not any(every):
        if any(bad for _, bad in read):
            raise UserError(
                f"no epoch line in {', '.join(str(r / METRICS_FILE) for r in runs)}: what it holds is not epoch lines "
                "(JSON objects with a whole 'epoch'); pass the folder of a train, distill or sweep run"
            )
        raise UserError(
            f"no epoch finished yet in {', '.join(map(str, runs))}: {METRICS_FILE} is empty; report again after the first epoch"
        )
    print("\n".join(report_lines(names, [run_row(lines) for lines in every])))
    if args.out:
        out = plot_runs(runs, args.out, labels=names, title=args.title)
        print(f"picture: training loss and validation top-1 of {len(runs)} run(s) -> {out}")

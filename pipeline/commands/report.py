"""`pipeline report RUN [RUN ...]`: runs' curves as a picture (``pipeline.runs.plots``), and their final numbers
as a table (``pipeline.runs.tables``); which folders are runs, and what they hold, is ``pipeline.runs.reading``."""

from __future__ import annotations

import logging
from pathlib import Path

from stages.training.run_metrics import METRICS_FILE
from storage import UserError

from pipeline.runs.plots import plot_runs
from pipeline.runs.reading import find_runs, one_task, read_epochs, run_labels, run_row, skipped_line
from pipeline.runs.tables import report_lines

log = logging.getLogger("pipeline")


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

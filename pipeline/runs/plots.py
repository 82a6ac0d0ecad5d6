"""Pictures of runs: ``plot_runs`` puts the training loss and validation top-1 of every run on shared axes, one
colour per label (runs that share a label, the seeds of one setting, share a colour); ``plot_sweep`` draws a
sweep's metric per epoch, its best trial in bold. matplotlib is imported only when a picture is drawn."""

from __future__ import annotations

from pathlib import Path

from stages.training.run_metrics import METRICS_FILE, best_line
from storage import UserError

from pipeline.runs.files import file_above
from pipeline.runs.reading import read_epochs, run_labels
from pipeline.settings import config

__all__ = ["plot_runs", "plot_sweep", "is_reference"]

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
    """A run that the others are measured against: one that `pipeline train` fitted (a teacher), not a distilled student.

    Args:
        run: a run folder.

    Returns:
        True when its ``config.yaml`` says ``command: train``; False without a readable ``config.yaml``.
    """
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

    Args:
        run_dirs: the run folders, each with its ``metrics.jsonl``.
        out_png: the picture to write (its folder is created); an existing file is replaced.
        labels: one legend name per run, in the order of ``run_dirs`` (default: the folder names, made unique by
            their parents).
        title: a title above both panels (default: none).

    Returns:
        The path of the written picture.

    Raises:
        UserError: a folder without metrics.jsonl, a label count that is not the run count, or a picture that
            cannot be written.

    Example:
        >>> plot_runs(["runs/demo/student-ce-labels0.2-seed0", "runs/demo/student-kd-labels0.2-seed0"], "report.png",
        ...           labels=["scratch", "kd"])
        PosixPath('report.png')
    """
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display backend

    runs = [Path(r) for r in run_dirs]
    missing = [str(r) for r in runs if not (r / METRICS_FILE).is_file()]
    if missing:
        raise UserError(f"{missing[0]} holds no {METRICS_FILE}: pass run folders written by train, distill or sweep")
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


def _other_trials(ax, trials, metric: str, scale: float, listed: bool, value) -> tuple[list, int]:
    """A thin curve per trial but the best (coloured when the legend lists them, grey when not): the legend
    handles, and how many trials had no epoch to draw."""
    from matplotlib import colormaps

    palette = [colormaps["tab10"](i) for i in (0, 1, 2, 4, 5, 6, 7, 8, 9)]  # no red: red is the best trial's
    handles, empty = [], 0
    for i, (name, lines) in enumerate(trials):
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
    return handles, empty


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

    Args:
        trials: (name, epoch lines) of every trial, best first.
        metric: the key drawn per epoch (``val_top1`` is drawn in percent).
        best: the name of the best trial, drawn bold in red (None: no trial is marked).
        out_png: the picture to write.
        title: a title above the plot (default: none).
        mode: ``"max"`` or ``"min"``, how each trial's best value in the legend is chosen.
        notes: a word per trial name for its legend entry (``stopped early``).

    Returns:
        The path of the written picture.
    """
    notes = notes or {}
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    percent = metric.endswith("top1")
    scale = 100.0 if percent else 1.0
    listed = len(trials) <= 12  # a longer legend hides the curves

    def value(name, lines) -> str:
        top = best_line(lines, metric, mode)
        words = [f"{top[metric] * scale:.4g}{'%' if percent else ''}"] if top else []
        words += [notes[name]] if name in notes else []
        return f" ({', '.join(words)})" if words else ""

    handles, empty = _other_trials(ax, [t for t in trials if t[0] != best], metric, scale, listed, value)
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

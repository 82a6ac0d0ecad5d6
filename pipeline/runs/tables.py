"""Plain-text tables of runs' numbers, as `pipeline report` and a sweep's summary print them."""

from __future__ import annotations

import math


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

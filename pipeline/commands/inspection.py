"""`pipeline inspect STORE`: what a store holds, what its logits keep, and (``--grid``) what the teacher saw.

The numbers come from ``stages.cache.store_report``; this module only prints them as
aligned tables and saves the grid.
"""

from __future__ import annotations

from stages.cache import store_report
from stages.cache.store_setup import store_dataset
from stages.methods.method_settings import TEMPERATURE
from storage import Store, UserError

UNITS, TOPK, GRID_SAMPLES, GRID_VIEWS = 4, 10, 16, 4
GRID_WIDTH = 1800  # pixels: the grid wraps its samples to fit a screen
TEMPERATURES = (1.0, 4.0)


def add_inspect_parser(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="what a store holds: arrays, bytes per view, top-k mass, KL of a top-k rebuild, a picture of replayed views",
    )
    p.add_argument("store", metavar="STORE", help="the store (a directory or URL such as s3://bucket/path)")
    p.add_argument("--teacher-id", help="teacher id in the store to inspect (default: every teacher)")
    p.add_argument(
        "--units",
        type=int,
        default=UNITS,
        help=f"whole committed units read per teacher for top-k mass and KL, spread over views and blocks (default: {UNITS})",
    )
    p.add_argument(
        "--topk",
        type=int,
        default=TOPK,
        help=f"k of the top-k kept from a full-logit store when measuring mass and KL; a top-k store uses its own k (default: {TOPK})",
    )
    p.add_argument(
        "--temperature",
        default=",".join(f"{t:g}" for t in TEMPERATURES),
        help="temperatures, comma-separated, at which to report what a top-k rebuild loses: the KL to the full logits (measured for a "
        "full-logit store, estimated from a top-k store's tail statistics) and the softened probability it spreads evenly "
        f"(default: {','.join(f'{t:g}' for t in TEMPERATURES)})",
    )
    p.add_argument(
        "--grid",
        metavar="PNG",
        help="write a picture of replayed views with the teacher's top-3 classes and the true label (default: none)",
    )
    p.add_argument(
        "--grid-samples",
        type=int,
        default=GRID_SAMPLES,
        help=f"samples in the grid, a seeded random choice (default: {GRID_SAMPLES})",
    )
    p.add_argument(
        "--grid-classes",
        metavar="A,B",
        help="draw the grid's samples from these classes only, by name or index (default: every class)",
    )
    p.add_argument(
        "--grid-ids", metavar="I,J", help="show exactly these sample ids (default: a random choice, see --grid-samples)"
    )
    p.add_argument(
        "--grid-views",
        type=int,
        default=GRID_VIEWS,
        help=f"views of each sample: the first ones committed for all of them (default: {GRID_VIEWS})",
    )
    p.add_argument("--data", help="the training data for --grid, when it moved since extraction (default: the store's)")
    p.set_defaults(func=inspect_command)


def table(header: list[str], rows: list[list]) -> list[str]:
    """Aligned text columns: the first column left-aligned, numbers right-aligned."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) if i == 0 or i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in cells
    ]


def _value(v) -> str:
    """A recipe value, short: floats to 4 significant digits, lists joined by commas."""
    if isinstance(v, (list, tuple)):
        return ",".join(map(_value, v))
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def usage_lines(usage: store_report.GroupUsage) -> list[str]:
    def row(a: store_report.ArrayUsage) -> list:
        return [
            a.name,
            a.dtype,
            "x".join(map(str, a.shape)),
            f"{a.nbytes:,}",
            f"{a.stored_bytes:,}",
            f"{a.bytes_per_view:,.2f}",
            f"{a.ratio:.2f}x",
        ]

    return table(
        ["array", "dtype", "shape", "raw bytes", "stored bytes", "bytes/view", "ratio"],
        [*map(row, usage.arrays), row(usage.total)],
    )


def progress_line(usage: store_report.GroupUsage) -> str:
    return f"{usage.complete_views} of {usage.views} views complete, {usage.committed_units} of {usage.expected_units} units committed"


def quality_lines(q: store_report.LogitQuality | None, full: bool) -> list[str]:
    if q is None:
        return ["logits: nothing committed to measure yet"]
    lines = [
        f"top-{q.k} mass over {q.units} units ({q.rows:,} rows): mean {q.mass_mean:.4f}, 5th percentile {q.mass_p5:.4f}"
    ]
    how = "measured" if full else "estimated from the stored tail statistics (Gaussian tail)"
    parts = "; ".join(f"T={t:g} mean {m:.4g}, 95th percentile {p95:.4g}" for t, (m, p95) in q.kl.items())
    lines.append(f"KL(full || top-{q.k} rebuilt) in nats, {how}: {parts}")
    parts = "; ".join(f"T={t:g} mean {m:.3f}, 95th percentile {p95:.3f}" for t, (m, p95) in q.tail_share.items())
    lines.append(f"softened probability the top-{q.k} rebuild spreads evenly over the other classes: {parts}")
    return lines


def temperatures(text: str) -> tuple[float, ...]:
    """--temperature: comma-separated, each a temperature a method takes (a KL at 1e300 overflows, and means nothing)."""
    try:
        return tuple(TEMPERATURE(float(t), "--temperature") for t in text.split(","))
    except ValueError:
        raise UserError(
            f"--temperature must be {TEMPERATURE.what}, or several separated by commas (e.g. 1,4), not '{text}'"
        ) from None


def order_text(store: Store) -> str:
    order = store.record.order
    if order.kind == "permuted":
        return f"random samples: ids permuted with seed {order.seed}"
    return "in the source's order (its shards)"


def inspect_command(args) -> None:
    # --units, --topk and the grid's sizes are checked by their declarations (pipeline.settings.setting_flags)
    store = Store(args.store)
    temps = temperatures(args.temperature)
    teacher_ids = [args.teacher_id] if args.teacher_id else sorted(store.teacher_ids())
    for tid in teacher_ids:
        store.teacher_info(tid)  # an unknown id fails here, naming the known ones, before anything prints
    data, plan = store.record.dataset, store.record.plan
    usage = store_report.group_usage(store, store.plan, store.num_views)
    out = [
        f"store {store.path}: {store.num_samples:,} samples in {store.num_blocks} blocks of {store.block} ({order_text(store)}), {store.num_views} views; "
        f"data {data.source} ({data.num_classes} classes, fingerprint {data.fingerprint[:12]})",
        "",
        f"plan: seed {plan.seed}, size {plan.size}; {progress_line(usage)}",
        f"recipe: {' '.join(f'{k}={_value(v)}' for k, v in plan.recipe.items())}",
        *usage_lines(usage),
    ]
    for tid in teacher_ids:
        info = store.teacher_info(tid)
        usage = store_report.group_usage(store, store.teacher(tid), info.views)
        stored = ", ".join(
            f"logits {info.logits}{'' if info.logits == 'full' else ' k=' + str(info.k)} {info.dtype}"
            if o == "logits"
            else f"{o} {info.feature_dtype}"
            for o in info.outputs
        )
        out += [
            "",
            f"teacher {tid} ({info.name}, timm {info.timm_name}, {info.weights}, {info.input_size} px): {stored}; {progress_line(usage)}",
        ]
        out += usage_lines(usage)
        if "logits" in info.outputs:
            q = store_report.logit_quality(store, tid, units=args.units, k=args.topk, temperatures=temps)
            out += quality_lines(q, info.logits == "full")
        stats = store_report.stats_arrays(store, tid)
        if stats is not None:
            made = store_report.stats_info(store, tid)
            stale = (
                ""
                if made.get("views") == info.views
                else f"; stale: the teacher now has {info.views} views, run `pipeline stats` again"
            )
            arrays = ", ".join(f"{name} {dtype} {'x'.join(map(str, shape))}" for name, (dtype, shape) in stats.items())
            out.append(
                f"stats/{tid}: {arrays} (from {made.get('views')} views of {made.get('samples')} samples{stale})"
            )
    print("\n".join(out))
    if args.grid:
        save_grid(store, args, teacher_ids)


def save_grid(store: Store, args, teacher_ids: list[str]) -> None:
    if not teacher_ids:
        raise UserError(f"store {store.path} holds no teacher yet: nothing to draw for --grid")
    dataset = store_dataset(store, args.data)  # the store's images, or --data where they moved
    tid = teacher_ids[0]
    ids = store_report.grid_ids(
        dataset,
        args.grid_samples,
        classes=_listed(args.grid_classes, str, "--grid-classes"),
        ids=_listed(args.grid_ids, int, "--grid-ids"),
    )
    cells = store_report.grid_cells(store, dataset, tid, ids, args.grid_views)
    views = len({c["view"] for c in cells})
    # samples side by side, to fit a screen
    columns = views * max(1, GRID_WIDTH // (views * store_report.tile_size(cells[0]["image"].shape[-1])[0]))
    image = store_report.render_grid(cells, dataset.classes, columns)
    try:
        image.save(args.grid, format="PNG")
    except OSError as e:
        raise UserError(f"cannot write --grid {args.grid}: {e}") from e
    more = f" (of teachers {', '.join(teacher_ids)}: choose one with --teacher-id)" if len(teacher_ids) > 1 else ""
    print(f"grid: {len(cells) // views} samples x {views} views of teacher {tid}{more} -> {args.grid}")


def _listed(text: str | None, kind, flag: str) -> list | None:
    """``"a,b"`` -> ``["a", "b"]`` (``kind`` each), None when the flag is not given."""
    if text is None:
        return None
    try:
        return [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} takes values separated by commas, not {text!r}") from None

"""`pipeline inspect STORE`: what a store holds, what its logits keep, and (``--grid``) what the teacher saw.

The numbers come from ``stages.inspect``; this module only prints them as
aligned tables and saves the grid. (Named ``inspection`` rather than
``inspect`` so that running a file of this package as a script can never
shadow the standard library's ``inspect``, which torch imports.)
"""

from __future__ import annotations

from stages import inspect
from stages.datasets import open_dataset
from stages.extract import check_dataset
from storage import Store, UserError

UNITS, TOPK, GRID_SAMPLES, GRID_VIEWS = 4, 10, 16, 4
TEMPERATURES = (1.0, 4.0)


def add_inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="what a store holds: arrays, bytes per view, top-k mass, KL of a top-k rebuild, a picture of replayed views")
    p.add_argument("store", metavar="STORE", help="the store (a directory or URL such as s3://bucket/path)")
    p.add_argument("--teacher", help="teacher id to inspect (default: every teacher)")
    p.add_argument("--units", type=int, default=UNITS, help=f"whole committed units read per teacher for top-k mass and KL, spread over views and blocks (default: {UNITS})")
    p.add_argument("--topk", type=int, default=TOPK, help=f"k of the top-k kept from a full-logit store when measuring mass and KL at T=1 and T=4; a top-k store uses its own k (default: {TOPK})")
    p.add_argument("--grid", metavar="PNG", help="write a picture of replayed views with the teacher's top-3 classes and the true label (default: none)")
    p.add_argument("--grid-samples", type=int, default=GRID_SAMPLES, help=f"grid rows: samples 0..N-1 (default: {GRID_SAMPLES})")
    p.add_argument("--grid-views", type=int, default=GRID_VIEWS, help=f"grid columns: the first views committed for those samples (default: {GRID_VIEWS})")
    p.add_argument("--data", help="the training data for --grid, when it moved since extraction (default: the store's)")
    p.set_defaults(func=inspect_command)


def table(header: list[str], rows: list[list]) -> list[str]:
    """Aligned text columns: the first column left-aligned, numbers right-aligned."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 or i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in cells]


def _value(v) -> str:
    """A recipe value, short: floats to 4 significant digits, lists joined by commas."""
    if isinstance(v, (list, tuple)):
        return ",".join(map(_value, v))
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def usage_lines(usage: inspect.GroupUsage) -> list[str]:
    def row(a: inspect.ArrayUsage) -> list:
        return [a.name, a.dtype, "x".join(map(str, a.shape)), f"{a.nbytes:,}", f"{a.stored_bytes:,}", f"{a.bytes_per_view:,.2f}", f"{a.ratio:.2f}x"]

    return table(["array", "dtype", "shape", "raw bytes", "stored bytes", "bytes/view", "ratio"], [*map(row, usage.arrays), row(usage.total)])


def progress_line(usage: inspect.GroupUsage) -> str:
    return f"{usage.complete_views} of {usage.views} views complete, {usage.committed_units} of {usage.expected_units} units committed"


def quality_lines(q: inspect.LogitQuality | None, full: bool) -> list[str]:
    if q is None:
        return ["logits: nothing committed to measure yet"]
    lines = [f"top-{q.k} mass over {q.units} units ({q.rows:,} rows): mean {q.mass_mean:.4f}, 5th percentile {q.mass_p5:.4f}"]
    if full:
        parts = "; ".join(f"T={t:g} mean {m:.4g}, 95th percentile {p95:.4g}" for t, (m, p95) in q.kl.items())
        lines.append(f"KL(full || top-{q.k} rebuilt) in nats: {parts}")
    return lines


def inspect_command(args) -> None:
    store = Store(args.store)
    if args.units < 1:
        raise UserError(f"--units must be at least 1, not {args.units}")
    if args.topk < 1:
        raise UserError(f"--topk must be at least 1, not {args.topk}")
    teacher_ids = [args.teacher] if args.teacher else sorted(store.teacher_ids())
    for tid in teacher_ids:
        store.teacher_info(tid)  # an unknown id fails here, naming the known ones, before anything prints
    data, plan = store.meta["dataset"], store.meta["plan"]
    usage = inspect.group_usage(store, store.plan, store.num_views)
    out = [
        f"store {store.path}: {store.num_samples:,} samples in {store.num_blocks} blocks of {store.block}, {store.num_views} views; "
        f"data {data['source']} ({data['num_classes']} classes, fingerprint {data['fingerprint'][:12]})",
        "",
        f"plan: seed {plan['seed']}, size {plan['size']}; {progress_line(usage)}",
        f"recipe: {' '.join(f'{k}={_value(v)}' for k, v in plan['recipe'].items())}",
        *usage_lines(usage),
    ]
    for tid in teacher_ids:
        info = store.teacher_info(tid)
        usage = inspect.group_usage(store, store.teacher(tid), info["views"])
        stored = ", ".join(
            f"logits {info['logits']}{'' if info['logits'] == 'full' else ' k=' + str(info['k'])} {info['dtype']}" if o == "logits"
            else f"{o} {info.get('feature_dtype', info['dtype'])}"
            for o in info["outputs"]
        )
        out += ["", f"teacher {tid} ({info['name']}, timm {info['timm_name']}, {info['weights']}, {info['input_size']} px): {stored}; {progress_line(usage)}"]
        out += usage_lines(usage)
        if "logits" in info["outputs"]:
            q = inspect.logit_quality(store, tid, units=args.units, k=args.topk, temperatures=TEMPERATURES)
            out += quality_lines(q, info["logits"] == "full")
        stats = inspect.stats_arrays(store, tid)
        if stats is not None:
            made = inspect.stats_info(store, tid)
            stale = "" if made.get("views") == info["views"] else f"; stale: the teacher now has {info['views']} views, run `pipeline stats` again"
            arrays = ", ".join(f"{name} {dtype} {'x'.join(map(str, shape))}" for name, (dtype, shape) in stats.items())
            out.append(f"stats/{tid}: {arrays} (from {made.get('views')} views of {made.get('samples')} samples{stale})")
    print("\n".join(out))
    if args.grid:
        save_grid(store, args, teacher_ids)


def save_grid(store: Store, args, teacher_ids: list[str]) -> None:
    if not teacher_ids:
        raise UserError(f"store {store.path} holds no teacher yet: nothing to draw for --grid")
    if args.grid_samples < 1 or args.grid_views < 1:
        raise UserError(f"--grid-samples and --grid-views must be at least 1, not {args.grid_samples} and {args.grid_views}")
    # The same data resolution as `pipeline stats` and `distill`: the store's source unless --data says where it moved.
    dataset = open_dataset(args.data or store.meta["dataset"]["source"])
    check_dataset(store, dataset)
    tid = teacher_ids[0]
    cells = inspect.grid_cells(store, dataset, tid, args.grid_samples, args.grid_views)
    columns = len({c["view"] for c in cells})
    image = inspect.render_grid(cells, dataset.classes, columns)
    try:
        image.save(args.grid, format="PNG")
    except OSError as e:
        raise UserError(f"cannot write --grid {args.grid}: {e}") from e
    more = f" (of teachers {', '.join(teacher_ids)}: choose one with --teacher)" if len(teacher_ids) > 1 else ""
    print(f"grid: {len(cells) // columns} samples x {columns} views of teacher {tid}{more} -> {args.grid}")
